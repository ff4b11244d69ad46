"""The container option: build the image with Podman and run it as ops would, then talk to it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("PILOTYS_WHISPER_ASSETS", Path.home() / ".cache" / "pilotys-whisper" / "assets"))
RIG_DIR = Path(os.environ.get("RIG_DIR", "/var/lib/pilotys-rig"))
BASE = "localhost/pilotys-base:trixie"
IMAGE = "localhost/pilotys-whisper:test"
KEY = "container-test-key-0123456789"
VERSION = subprocess.run([ROOT / "scripts" / "version"], capture_output=True, text=True, check=True).stdout.strip()
os.environ.setdefault("CONTAINERS_CONF", str(Path(__file__).with_name("containers.conf")))


def podman(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], check=False, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def build(context: Path, model_source: str, tag: str) -> float:
    started = time.monotonic()
    podman("build", "--format", "docker", "--file", str(context / "Containerfile"),
           "--build-arg", f"BASE_IMAGE={BASE}", "--build-arg", f"MODEL_SOURCE={model_source}",
           "--build-arg", f"VERSION={VERSION}",
           "--tag", tag, str(context), timeout=1800)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    if shutil.which("podman") is None:
        pytest.fail("podman is missing: `make deps` installs it", pytrace=False)
    if podman("image", "exists", BASE, check=False).returncode != 0:
        # No registry here: the base image is the disposable hosts' Debian root filesystem.
        rootfs = RIG_DIR / "rootfs-trixie"
        assert (rootfs / "usr" / "bin" / "python3").exists(), f"no rootfs in {rootfs}: run `rig/rig prepare trixie`"
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--exclude=./root/.ssh", "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True)
        tar.wait()
    context = tmp_path_factory.mktemp("context")
    for name in ("Containerfile", "pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(ROOT / "service" / name, context / name)
    shutil.copytree(ROOT / "service" / "src", context / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "service" / "certs", context / "certs")
    for ca in Path("/usr/local/share/ca-certificates").glob("*.crt"):  # this network intercepts HTTPS
        shutil.copy(ca, context / "certs" / ca.name)
    shutil.copytree(ASSETS / "models" / "base", context / "model")
    seconds = build(context, "context", IMAGE)
    build(context, "volume", IMAGE + "-volume")
    podman("image", "prune", "--force", check=False)  # the layers a rebuild replaced
    size = int(podman("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip())
    print(f"\nimage {IMAGE}: {size / 1e6:.0f} MB, built in {seconds:.0f} s")
    return IMAGE


class Container:
    def __init__(self, image: str, *extra: str):
        self.name = f"pw-test-{uuid.uuid4().hex[:8]}"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        podman("run", "--detach", "--name", self.name, "--publish", f"127.0.0.1:{self.port}:8000",
               "--secret", "pw_test_keys,target=whisper_api_keys,uid=10001,mode=0400", "--memory", "1500m", *extra, image)
        started = time.monotonic()
        while time.monotonic() - started < 120:
            try:
                if requests.get(self.url + "/ready", timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - started
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise AssertionError("container not ready:\n" + self.logs())

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return "\n".join(line for line in (done.stdout + done.stderr).splitlines() if "level=error" not in line)

    def remove(self) -> None:
        podman("rm", "--force", self.name, check=False)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    keys = tmp_path_factory.mktemp("secret") / "keys"
    keys.write_text(f"{KEY} label=container-test\n")
    podman("secret", "rm", "pw_test_keys", check=False)
    podman("secret", "create", "pw_test_keys", str(keys))
    yield
    podman("secret", "rm", "pw_test_keys", check=False)


@pytest.fixture(scope="module")
def container(images, secret):
    c = Container(images)
    print(f"\nready {c.startup_s:.1f} s after start")
    yield c
    c.remove()


def french(url: str, key: str | None, verify: bool | str = True):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with open(ASSETS / "audio" / "fr_meeting.webm", "rb") as f:
        return requests.post(url + "/v1/audio/transcriptions", files={"file": f}, headers=headers,
                             data={"language": "fr"}, timeout=300, verify=verify)


def test_health_and_config(container):
    body = requests.get(container.url + "/health", timeout=5).json()
    assert body["status"] == "ok" and body["model"] == "whisper-base" and body["ready"]
    image = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    # One version everywhere: the label, the installed wheel's metadata (what /health serves) and the source.
    assert image["Labels"]["org.opencontainers.image.version"] == VERSION == body["version"]
    assert image["Healthcheck"]["Test"][:2] == ["CMD", "python3"]
    assert image["Config"]["User"] == "whisper"
    # Run the health check as the runtime would.
    assert podman("exec", container.name, *image["Healthcheck"]["Test"][1:]).returncode == 0


def test_transcribes_french_with_the_key(container):
    r = french(container.url, KEY)
    assert r.status_code == 200, container.logs()
    assert "réunion" in r.json()["text"].lower()


def test_cuda_library_path_is_the_venvs_whatever_its_python(container):
    """LD_LIBRARY_PATH names /opt/whisper/site-packages, a link to the venv's own (python3.13 on trixie)."""
    env = podman("exec", container.name, "printenv", "LD_LIBRARY_PATH").stdout.strip()
    assert env == "/opt/whisper/site-packages/nvidia/cublas/lib:/opt/whisper/site-packages/nvidia/cudnn/lib"
    purelib = podman("exec", container.name, "python3", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    assert podman("exec", container.name, "readlink", "/opt/whisper/site-packages").stdout.strip() == \
        purelib.stdout.strip() == "/opt/whisper/lib/python3.13/site-packages"


def test_refuses_without_the_key(container):
    assert french(container.url, None).status_code == 401


def test_runs_as_non_root(container):
    assert podman("exec", container.name, "id", "-u").stdout.strip() == "10001"
    assert podman("top", container.name, "user").stdout.split()[1:] and \
        "root" not in podman("top", container.name, "user").stdout.split()[1:]


def test_model_mounted_as_a_volume(images, secret):
    c = Container(images + "-volume", "--volume", f"{ASSETS / 'models' / 'base'}:/models/base:ro")
    try:
        assert french(c.url, KEY).status_code == 200, c.logs()
    finally:
        c.remove()


def test_stops_cleanly_on_sigterm(images, secret):
    c = Container(images)
    started = time.monotonic()
    podman("stop", "--time", "30", c.name)
    elapsed = time.monotonic() - started
    try:
        code = podman("inspect", c.name, "--format", "{{.State.ExitCode}}").stdout.strip()
        assert code == "0", c.logs()
        assert "received SIGTERM, shutting down" in c.logs()
        assert elapsed < 25, f"SIGTERM took {elapsed:.1f} s: the service ignored it until the kill"
    finally:
        c.remove()


# -- the Ansible path: the whisper_service role runs the image on a provisioned host --------------------------

RIG_INDEX = 12  # 10.66.12.2: not the demo's (1) nor Molecule's (11)
RIG_HOST = "whisper-ctr"


def _ansible_playbook(inventory: Path, *extra: str) -> str:
    done = subprocess.run(["ansible-playbook", "-i", str(inventory), str(ROOT / "playbooks" / "site.yml"), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False,
                          env={**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_NOCOLOR": "1"})
    assert done.returncode == 0, f"site.yml failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def container_host(images, tmp_path_factory):
    """A disposable host provisioned by site.yml with whisper_service_deployment=container.

    The image comes from the controller as a `podman save` archive, as on an air-gapped host. Yields the
    inventory directory and the output of the second (idempotence) run.
    """
    work = tmp_path_factory.mktemp("ansible-container")
    archive = work / "image.tar"
    podman("save", "--format", "docker-archive", "--output", str(archive), images + "-volume", timeout=600)
    inventory = work / "inventory"
    inventory.mkdir()
    (inventory / "group_vars").symlink_to(ROOT / "inventories" / "local" / "group_vars")
    (inventory / "hosts.yml").write_text(
        f"all:\n  children:\n    whisper:\n      hosts:\n        {RIG_HOST}:\n"
        f"          ansible_host: 10.66.{RIG_INDEX}.2\n")
    extra = ["-e", "whisper_service_deployment=container", "-e", f"whisper_service_container_image={images}-volume",
             "-e", f"whisper_service_container_image_archive={archive}"]
    subprocess.run([str(ROOT / "rig" / "rig"), "down", RIG_HOST], capture_output=True, check=False)
    subprocess.run([str(ROOT / "rig" / "rig"), "up", RIG_HOST, str(RIG_INDEX)], capture_output=True, check=True)
    try:
        started = time.monotonic()
        _ansible_playbook(inventory, *extra)
        print(f"\ncontainer deployment converged in {time.monotonic() - started:.0f} s")
        second = _ansible_playbook(inventory, *extra)
        yield inventory, second
    finally:
        subprocess.run([str(ROOT / "rig" / "rig"), "down", RIG_HOST], capture_output=True, check=False)


def _on_host(command: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "rig" / "rig"), "ssh", RIG_HOST, command],
                          capture_output=True, text=True, timeout=120, check=False)


def test_ansible_runs_the_image_behind_caddy(container_host):
    inventory, second = container_host
    recap = [line for line in second.splitlines() if line.startswith(RIG_HOST) and "ok=" in line]
    assert recap and " changed=0 " in recap[-1], "the second run changed something:\n" + second[-4000:]
    url = f"https://10.66.{RIG_INDEX}.2"
    ca = inventory / "credentials" / "caddy-root-ca.crt"
    key = (inventory / "credentials" / "whisper-api-key").read_text().strip()
    r = french(url, key, verify=str(ca))
    assert r.status_code == 200, r.text
    assert "réunion" in r.json()["text"].lower()
    assert requests.get(url + "/v1/models", timeout=10, verify=str(ca)).status_code == 401
    # The unit runs the image, its process is not root, and the service port is not reachable from outside.
    assert _on_host("systemctl is-active whisper-service").stdout.strip() == "active"
    assert _on_host("podman exec whisper-service id -u").stdout.strip() == "10001"
    assert _on_host("podman inspect whisper-service --format '{{.ImageName}}'").stdout.strip() == IMAGE + "-volume"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://10.66.{RIG_INDEX}.2:8000/health", timeout=3)
