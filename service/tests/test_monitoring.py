"""deploy/monitoring against the real service: every metric and label that the Grafana dashboard and the alert
rules read is in a /metrics scrape of the service after a transcription and a job, and promtool accepts it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
KEY = "monitoring-test-key-0123456789"
# A metric name followed by an optional {label matchers}; names the service does not export (scrape health,
# node_exporter, blackbox_exporter) are read from other exporters.
SELECTOR = re.compile(r"\b(whisper_[a-z_]+)\b(?:\{([^}]*)\})?")
OTHER_EXPORTERS = ("up", "node_", "probe_")


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_expressions() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def scrape(model_dir, audio, tmp_path_factory) -> str:
    uploads, state = tmp_path_factory.mktemp("uploads"), tmp_path_factory.mktemp("state")
    proc = ServerProcess({"WHISPER_MODEL": str(model_dir), "WHISPER_API_KEY": KEY,
                          "WHISPER_STATE_DIR": str(state)}, uploads).start()
    try:
        headers = {"Authorization": f"Bearer {KEY}"}
        with open(audio("fr_meeting.wav"), "rb") as f:
            r = requests.post(proc.url + "/v1/audio/transcriptions", files={"file": f}, data={"language": "fr"},
                              headers=headers, timeout=300)
        assert r.status_code == 200, r.text
        with open(audio("silence_20s.wav"), "rb") as f:
            r = requests.post(proc.url + "/v1/jobs", files={"file": f}, headers=headers, timeout=60)
        assert r.status_code in (200, 201, 202), r.text
        job = r.json()["id"]
        deadline = time.monotonic() + 120
        while requests.get(f"{proc.url}/v1/jobs/{job}", headers=headers, timeout=5).json()["status"] not in (
                "succeeded", "failed") and time.monotonic() < deadline:
            time.sleep(0.5)
        return requests.get(proc.url + "/metrics", timeout=5).text
    finally:
        proc.stop()


def exported(scrape: str) -> dict[str, set[str]]:
    """{sample name: label names} of a scrape (histogram buckets, counters' _total and _created included)."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


@pytest.mark.model
@pytest.mark.parametrize("source", [dashboard_expressions, alert_expressions], ids=["dashboard", "alerts"])
def test_every_metric_read_is_exported(scrape, source):
    names = exported(scrape)
    read = 0
    for expr in source():
        for name, matchers in SELECTOR.findall(expr):
            assert name in names, f"{name} (in {expr!r}) is not in the service's /metrics"
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in names[name] or label == "instance" or label == "job", \
                    f"{name} has no label {label} (in {expr!r}): it has {sorted(names[name])}"
            read += 1
        assert expr.startswith(OTHER_EXPORTERS) or SELECTOR.search(expr), f"{expr!r} reads no service metric"
    assert read


@pytest.mark.model
def test_promtool_accepts_the_scrape(scrape):
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `make deps` installs Debian's prometheus package", pytrace=False)
    done = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
