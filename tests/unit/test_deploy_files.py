"""The files under docker/ that Prometheus, Grafana, compose and Kubernetes read.

- The worker's Prometheus text parses (prometheus-client's parser) and has the gauges;
- every query of the Grafana dashboard names a metric the worker exports, and its datasource
  is the provisioned one;
- the Prometheus scrape target matches the compose worker's metrics port and host;
- with ``promtool`` on PATH (Debian's ``prometheus`` package): the config and every dashboard
  query (Grafana variables substituted) pass ``promtool check``;
- the Kubernetes numbers hold together (grace period, preStop drain, KEDA topics and group).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from autoglm.config import load_settings
from autoglm.processors.metrics import PrometheusMetrics

DOCKER = Path(__file__).resolve().parents[2] / "docker"
PROMTOOL = shutil.which("promtool")


def exported_samples() -> dict[str, list]:
    """Sample name -> samples, from a registry where every metric was recorded once."""
    m = PrometheusMetrics()
    m.observe_batch("digits", 8, 0.01, [0.001] * 8)
    m.count_tasks("digits", "ok", 8)
    m.set_policy_state("digits", a_s=0.002, b_s=0.0001, sigma_s=0.0005, target_size=16, correction=1.0)
    m.set_in_flight(12, 1024)
    m.set_queue_depth("digits", 3)
    m.set_consumer_lag("digits", 0, 5)
    m.set_consumer_lag("digits", 1, 7)
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def dashboard_exprs() -> list[str]:
    doc = json.loads((DOCKER / "grafana" / "autoglm.json").read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def test_prometheus_text_parses_and_has_the_new_gauges():
    samples = exported_samples()
    assert samples["autoglm_in_flight_tasks"][0].value == 12
    assert samples["autoglm_in_flight_cap_tasks"][0].value == 1024
    assert samples["autoglm_queue_depth_tasks"][0].labels == {"model": "digits"}
    lags = {s.labels["partition"]: s.value for s in samples["autoglm_consumer_lag_records"]}
    assert lags == {"0": 5.0, "1": 7.0}


def test_a_revoked_partition_stops_being_exported():
    m = PrometheusMetrics()
    m.set_consumer_lag("digits", 0, 5)
    m.set_consumer_lag("digits", 1, 7)
    m.forget_partition("digits", 0)
    m.forget_partition("digits", 9)  # never set: no error
    text = generate_latest(m.registry).decode()
    assert 'partition="1"' in text and 'partition="0"' not in text


def test_every_dashboard_query_names_an_exported_metric():
    exported = set(exported_samples())
    names = {name for expr in dashboard_exprs() for name in re.findall(r"\bautoglm_[a-z_]+\b", expr)}
    assert names, "the dashboard has no autoglm query"
    assert names - exported == set(), f"queries name metrics the worker does not export: {names - exported}"
    # and every gauge the issue asks for is on the dashboard
    assert {"autoglm_in_flight_tasks", "autoglm_in_flight_cap_tasks", "autoglm_queue_depth_tasks",
            "autoglm_consumer_lag_records"} <= names


def test_dashboard_is_a_grafana_dashboard_on_the_provisioned_datasource():
    doc = json.loads((DOCKER / "grafana" / "autoglm.json").read_text())
    ds = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
    provider = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "autoglm.yml").read_text())
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    path = provider["providers"][0]["options"]["path"]
    assert f"./grafana/autoglm.json:{path}/autoglm.json:ro" in mounts


def test_prometheus_scrapes_the_compose_worker_on_its_metrics_port():
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    env = compose["services"]["worker"]["environment"]
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"worker:{env['AUTOGLM_METRICS_PORT']}"]
    assert env["AUTOGLM_METRICS_HOST"] == "0.0.0.0"
    assert set(compose["services"]) >= {"kafka", "worker", "console", "prometheus", "grafana"}
    console = compose["services"]["console"]
    assert console["ports"] == ["127.0.0.1:8321:8321"], "the console must be published on loopback only"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")
def test_promtool_accepts_the_config_and_every_dashboard_query(tmp_path):
    out = subprocess.run([PROMTOOL, "check", "config", str(DOCKER / "prometheus.yml")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"autoglm:dashboard_query_{i}",
         "expr": expr.replace("$__rate_interval", "1m").replace("$model", ".*")}
        for i, expr in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_kubernetes_numbers_hold_together():
    deploy = yaml.safe_load((DOCKER / "k8s" / "worker.yaml").read_text())
    scaled = yaml.safe_load((DOCKER / "k8s" / "scaledobject.yaml").read_text())
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["AUTOGLM_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    settings = load_settings(models=env["AUTOGLM_MODELS"]["value"], bootstrap_servers="k:9092")
    drain_s, stop_s = float(env["AUTOGLM_DRAIN_TIMEOUT_S"]["value"]), float(env["AUTOGLM_STOP_TIMEOUT_S"]["value"])
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    ctl_timeout_s = float(re.search(r"--timeout-s (\d+)", pre_stop).group(1))
    assert "ctl drain" in pre_stop and '--worker "$AUTOGLM_WORKER_ID"' in pre_stop and "--wait" in pre_stop
    assert ctl_timeout_s > drain_s, "ctl must wait longer than the worker's drain may take"
    assert pod["terminationGracePeriodSeconds"] > ctl_timeout_s + stop_s
    assert scaled["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    partitions = int(env["AUTOGLM_PARTITIONS"]["value"])
    assert scaled["spec"]["maxReplicaCount"] <= partitions
    topics = set()
    for trigger in scaled["spec"]["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["consumerGroup"] == settings.consumer_group
        assert meta["allowIdleConsumers"] == "false"
        assert int(meta["lagThreshold"]) > 0
        topics.add(meta["topic"])
    assert topics == {f"{settings.topic_prefix}.tasks.{m}" for m in settings.models}


def test_the_compose_pipeline_service_runs_a_shipped_pipeline_that_validates():
    from autoglm.pipelines import validate_file

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    service = compose["services"]["pipeline"]
    assert service["profiles"] == ["pipeline"]  # not part of the default stack
    (mount,) = service["volumes"]
    host, container, _ = mount.split(":")
    command = service["command"]
    assert command[:2] == ["pipeline", "run"] and command[2].startswith(container + "/")
    path = (DOCKER / host / command[2][len(container) + 1:]).resolve()
    pipeline, errors = validate_file(path)
    assert errors == [] and pipeline.name == "digits-routing"
    assert service["environment"]["AUTOGLM_BOOTSTRAP_SERVERS"] == compose["services"]["worker"]["environment"][
        "AUTOGLM_BOOTSTRAP_SERVERS"]
