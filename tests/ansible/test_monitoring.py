"""The monitoring an operator plugs in (deploy/monitoring): the alert rules and the scrape configuration pass
promtool's checks, and the rules' unit tests pass (the service's metrics themselves: service/tests/test_monitoring.py)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"


def promtool(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `make deps` installs Debian's prometheus package", pytrace=False)
    return subprocess.run(["promtool", *args], capture_output=True, text=True, check=False, cwd=MONITORING)


@pytest.mark.parametrize("check", [("check", "rules", "alerts.yml"), ("check", "config", "prometheus.example.yml"),
                                   ("test", "rules", "alerts_test.yml")], ids=" ".join)
def test_promtool(check):
    done = promtool(*check)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_every_alert_has_a_unit_test():
    import yaml

    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())
    fired = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert fired == alerts, f"alerts never seen firing in alerts_test.yml: {sorted(alerts - fired)}"
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_dashboard_is_grafana_json():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus" and "instance" in variables
