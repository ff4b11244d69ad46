"""The caddy role's verdict on the certificate an acme site is served with (roles/caddy/filter_plugins), on what
openssl prints for real certificates made here: Caddy's internal one, one from a Let's Encrypt-named CA, and
others."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("caddy_filters", ROOT / "roles" / "caddy" / "filter_plugins" / "caddy.py")
caddy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(caddy)

EXPECTED = ["Let's Encrypt", "ZeroSSL"]  # the role's default caddy_acme_expected_issuers


def openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=True).stdout


def served(tmp_path: Path, issuer_subject: str, names: list[str]) -> str:
    """What the role's task prints for a leaf certificate for NAMES signed by a CA named ISSUER_SUBJECT."""
    ca_key, ca_crt, key, csr, crt = (tmp_path / n for n in ("ca.key", "ca.crt", "leaf.key", "leaf.csr", "leaf.crt"))
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(ca_key),
            "-out", str(ca_crt), "-subj", issuer_subject, "-days", "2")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
            "-out", str(csr), "-subj", "/")
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n" if names else "basicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(crt), "-days", "1", "-extfile", str(ext))
    return openssl("x509", "-in", str(crt), "-noout", "-issuer", "-ext", "subjectAltName")


LETS_ENCRYPT = "/C=US/O=Let's Encrypt/CN=R11"


def test_a_public_certificate_for_the_name_passes(tmp_path):
    text = served(tmp_path, LETS_ENCRYPT, ["whisper.example.com"])
    assert caddy.caddy_certificate_problem(text, "whisper.example.com", EXPECTED) == ""
    assert caddy.caddy_certificate_problem(text, "WHISPER.example.com", EXPECTED) == ""


def test_a_wildcard_covers_one_label(tmp_path):
    text = served(tmp_path, "/C=AT/O=ZeroSSL/CN=ZeroSSL ECC Domain Secure Site CA", ["*.example.com"])
    assert caddy.caddy_certificate_problem(text, "whisper.example.com", EXPECTED) == ""
    assert "is for *.example.com" in caddy.caddy_certificate_problem(text, "a.whisper.example.com", EXPECTED)


@pytest.mark.parametrize(("issuer", "names", "problem"), [
    ("/CN=Caddy Local Authority - ECC Intermediate", ["whisper.example.com"], "Caddy's internal certificate"),
    ("/O=Some Appliance/CN=Self Signed", ["whisper.example.com"], "not from Let's Encrypt or ZeroSSL"),
    (LETS_ENCRYPT, ["other.example.com"], "is for other.example.com"),
    (LETS_ENCRYPT, [], "is for no DNS name"),
])
def test_other_certificates_are_refused_with_the_reason(tmp_path, issuer, names, problem):
    text = served(tmp_path, issuer, names)
    assert problem in caddy.caddy_certificate_problem(text, "whisper.example.com", EXPECTED)


def test_no_certificate_at_all(tmp_path):
    assert caddy.caddy_certificate_problem("", "whisper.example.com", EXPECTED) == "no certificate is served for it"


def test_an_operators_own_acme_ca_is_accepted_once_named(tmp_path):
    text = served(tmp_path, "/O=Example Corp/CN=Example ACME CA", ["whisper.example.com"])
    assert caddy.caddy_certificate_problem(text, "whisper.example.com", EXPECTED) != ""
    assert caddy.caddy_certificate_problem(text, "whisper.example.com", [*EXPECTED, "Example ACME CA"]) == ""
