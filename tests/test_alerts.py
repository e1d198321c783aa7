"""config/alerts.yml: valid for Prometheus, each rule fires on its series, and names only series we serve."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml
from fastapi.testclient import TestClient
from redis import Redis

from config.settings import Settings
from producer.web.api import create_app
from tests.conftest import ROOT

RULES = ROOT / "config" / "alerts.yml"
PROMTOOL = shutil.which("promtool") or "promtool"  # Debian's `prometheus` package (make test installs it)

# promtool's unit tests: synthetic series at 1-minute steps, and the alerts expected at a time.
RULE_TESTS = {
    "rule_files": [str(RULES)],
    "evaluation_interval": "1m",
    "tests": [
        {"interval": "1m",
         "input_series": [
             {"series": 'podembed_queue_oldest_age_seconds{queue="podembed-nightly"}', "values": "0+60x60"},
             {"series": 'podembed_queue_oldest_age_seconds{queue="podembed"}', "values": "0x60"},
             {"series": 'podembed_queue_batches{queue="podembed",state="failed"}', "values": "0x30 3x30"},
             {"series": 'podembed_workers{device="NVIDIA A10G"}', "values": "2x60"},
             {"series": 'podembed_gpu_seconds_total{device="NVIDIA A10G",model="m"}', "values": "0+1x60"},
             {"series": 'podembed_cost_usd_total{device="NVIDIA A10G",model="m"}', "values": "0+0.5x60"},
             {"series": "podembed_workers_lost", "values": "0x40 1x20"},
         ],
         "alert_rule_test": [
             # 1,860 s at minute 31, over 1,800 for the 5 minutes the rule waits: fires from minute 36.
             {"eval_time": "35m", "alertname": "PodembedQueueStuck", "exp_alerts": []},
             {"eval_time": "40m", "alertname": "PodembedQueueStuck",
              "exp_alerts": [{"exp_labels": {"queue": "podembed-nightly", "severity": "page"},
                              "exp_annotations": {"summary": "podembed queue podembed-nightly: oldest batch "
                                                             "waiting 40m 0s"}}]},
             {"eval_time": "20m", "alertname": "PodembedFailedBatchesRising", "exp_alerts": []},
             {"eval_time": "50m", "alertname": "PodembedFailedBatchesRising",
              "exp_alerts": [{"exp_labels": {"queue": "podembed", "severity": "ticket"},
                              "exp_annotations": {"summary": "podembed queue podembed: 3 more failed batches in the "
                                                             "last hour (podembed jobs, then retry)"}}]},
             # Two containers, 1 busy second a minute each: 0.8 % of their time, idle from minute 15 + 15.
             {"eval_time": "45m", "alertname": "PodembedWorkerBilledButIdle",
              "exp_alerts": [{"exp_labels": {"severity": "ticket"},
                              "exp_annotations": {"summary": "podembed: 2 workers billed but idle"}}]},
             # $0.5 a minute is $30 an hour.
             {"eval_time": "59m", "alertname": "PodembedCostPerHourHigh",
              "exp_alerts": [{"exp_labels": {"severity": "page"},
                              "exp_annotations": {"summary": "podembed compute costs $29.50 per hour"}}]},
             {"eval_time": "30m", "alertname": "PodembedContainersLost", "exp_alerts": []},
             {"eval_time": "50m", "alertname": "PodembedContainersLost",
              "exp_alerts": [{"exp_labels": {"severity": "ticket"},
                              "exp_annotations": {"summary": "podembed: 1 containers lost without an exit in the "
                                                             "last hour"}}]},
         ]},
        {"interval": "1m",
         "input_series": [
             {"series": 'podembed_workers{device="NVIDIA A10G"}', "values": "1x60"},
             {"series": 'podembed_gpu_seconds_total{device="NVIDIA A10G",model="m"}', "values": "0+50x60"},
             {"series": 'podembed_cost_usd_total{device="NVIDIA A10G",model="m"}', "values": "0+0.01x60"},
         ],
         "alert_rule_test": [
             {"eval_time": "45m", "alertname": "PodembedWorkerBilledButIdle", "exp_alerts": []},
             {"eval_time": "59m", "alertname": "PodembedCostPerHourHigh", "exp_alerts": []},
         ]},
    ],
}


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout


def test_each_rule_fires_on_its_series_and_not_otherwise(tmp_path: Path) -> None:
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(yaml.safe_dump(RULE_TESTS))
    out = subprocess.run([PROMTOOL, "test", "rules", str(tests)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {case["alertname"] for t in RULE_TESTS["tests"] for case in t["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]}


def test_the_rules_name_only_series_that_metrics_serves(settings: Settings, redis: Redis, db) -> None:  # noqa: ANN001
    served = TestClient(create_app(settings, open_access=True)).get("/metrics").text
    names = set(re.findall(r"^# TYPE (\w+) ", served, re.MULTILINE))
    used = set(re.findall(r"\bpodembed_\w+", RULES.read_text()))
    assert used and used <= names, used - names
