"""The caddy role's Caddyfile as Ansible renders it: which site a gateway asks its workers for."""

import re
import shutil
import subprocess

import pytest
from local_play import render

GATEWAY = {
    "caddy_site_address": "gw.example.com",
    "caddy_tls_mode": "internal",
    "caddy_upstreams": ["10.0.0.1:443", "10.0.0.2:443"],
    "caddy_upstreams_tls_ca_certs": ["/ctl/w1-ca.crt", "/ctl/w2-ca.crt"],
    "caddy_upstream_pools": [{"model": "whisper-large-v3", "upstreams": ["10.0.0.3:443"],
                              "tls_ca_certs": ["/ctl/g1-ca.crt"]}],
}


def proxies(caddyfile: str) -> list[str]:
    """The body of each reverse_proxy block (they end at the first line that closes them: one tab, '}')."""
    return re.findall(r"^\treverse_proxy [^\n]*\{\n(.*?)^\t\}$", caddyfile, re.MULTILINE | re.DOTALL)


def validate(caddyfile: str, tmp_path):
    """`caddy validate`, where this machine has caddy (the paths of the workers' CAs must then exist)."""
    caddy = shutil.which("caddy")
    if caddy is None:
        return
    for path in set(re.findall(r"/etc/caddy/upstream-cas/\S+", caddyfile)):
        local = tmp_path / "cas" / path.rsplit("/", 1)[1]
        local.parent.mkdir(exist_ok=True)
        caddyfile = caddyfile.replace(path, str(local))
        if not local.exists():
            # Any certificate will do for validation: Caddy only loads it.
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-subj", "/CN=test", "-keyout", str(tmp_path / "key.pem"), "-out",
                            str(local), "-days", "1"], check=True, capture_output=True)
    caddyfile = re.sub(r"output file \S+", f"output file {tmp_path}/access.log", caddyfile)
    (tmp_path / "Caddyfile.validate").write_text(caddyfile)
    # HOME and XDG dirs in tmp_path: validating "tls internal" provisions a throwaway local CA there.
    done = subprocess.run([caddy, "validate", "--adapter", "caddyfile", "--config", str(tmp_path / "Caddyfile.validate")],
                          check=False, capture_output=True, text=True,
                          env={"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"),
                               "XDG_CONFIG_HOME": str(tmp_path / "config"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr


def test_gateway_asks_for_the_dialled_address_by_default(tmp_path):
    caddyfile = render("caddy", "Caddyfile.j2", tmp_path, GATEWAY)
    blocks = proxies(caddyfile)
    assert len(blocks) == 2  # the model pool, then the default workers
    for block in blocks:
        assert "header_up Host {upstream_hostport}" in block
        assert "health_headers" not in block
        assert "tls_server_name" not in block
    validate(caddyfile, tmp_path)


def test_gateway_asks_for_the_workers_certified_name(tmp_path):
    caddyfile = render("caddy", "Caddyfile.j2", tmp_path,
                       {**GATEWAY, "caddy_upstreams_tls_server_name": "worker.internal"})
    blocks = proxies(caddyfile)
    assert len(blocks) == 2
    for block in blocks:
        assert "tls_server_name worker.internal" in block
        assert "header_up Host worker.internal" in block
        assert "{upstream_hostport}" not in block
        assert re.search(r"health_headers \{\n\s*Host worker\.internal\n\s*\}", block), block
    validate(caddyfile, tmp_path)


@pytest.mark.parametrize("server_name", ["", "worker.internal"])
def test_single_host_sets_no_host_header(tmp_path, server_name):
    """Without caddy_upstreams the proxy to the local service is the plain one, whatever the gateway settings."""
    caddyfile = render("caddy", "Caddyfile.j2", tmp_path, {
        "caddy_site_address": "whisper.example.com", "caddy_tls_mode": "internal",
        "caddy_upstreams_tls_server_name": server_name})
    (block,) = proxies(caddyfile)
    assert "reverse_proxy 127.0.0.1:8000 {" in caddyfile
    assert "header_up" not in block and "health_" not in block and "tls" not in block
    validate(caddyfile, tmp_path)


SINGLE = {"caddy_site_address": "whisper.example.com", "caddy_tls_mode": "internal"}


def errors_block(caddyfile: str) -> str:
    return re.search(r"^\thandle_errors \{\n(.*?)^\t\}$", caddyfile, re.MULTILINE | re.DOTALL).group(1)


def test_caddys_own_errors_carry_cors_for_the_allowed_origins(tmp_path):
    caddyfile = render("caddy", "Caddyfile.j2", tmp_path, {
        **SINGLE, "caddy_cors_origins": ["https://app.pilotys.fr/", "https://staging.pilotys.fr"]})
    block = errors_block(caddyfile)
    assert ('@cors_origin expression {http.request.header.Origin} in ["https://app.pilotys.fr", '
            '"https://staging.pilotys.fr"]\n') in block
    assert "Access-Control-Allow-Origin {http.request.header.Origin}" in block
    validate(caddyfile, tmp_path)
    anyone = errors_block(render("caddy", "Caddyfile.j2", tmp_path, {**SINGLE, "caddy_cors_origins": ["*"]}))
    assert "header Access-Control-Allow-Origin *" in anyone
    assert "Access-Control" not in errors_block(render("caddy", "Caddyfile.j2", tmp_path, SINGLE))
