"""The CLI as a user runs it: ``autoglm demo`` on the embedded broker, ``publish`` and ``results``
against Apache Kafka with a worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


pytestmark = pytest.mark.e2e

AUTOGLM = [sys.executable, "-m", "autoglm"]


def test_demo_json_reports_every_result_and_accuracy(model_cache):
    env = {k: v for k, v in os.environ.items() if k != "AUTOGLM_BOOTSTRAP_SERVERS"}
    proc = subprocess.run([*AUTOGLM, "demo", "--tasks", "200", "--json"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary) >= {"tasks", "results", "dlq", "accuracy", "p50_ms", "p99_ms", "mean_batch_size",
                            "throughput_per_s"}
    assert summary["tasks"] == 200 and summary["results"] == 200
    assert summary["dlq"] == 0
    assert summary["accuracy"] >= 0.95
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    assert summary["mean_batch_size"] >= 1
    assert summary["throughput_per_s"] > 0


def test_publish_digits_then_follow_results(kafka_bootstrap, prefix, workers, model_cache):
    env = {**os.environ, "AUTOGLM_BOOTSTRAP_SERVERS": kafka_bootstrap, "AUTOGLM_TOPIC_PREFIX": prefix}
    workers.start(kafka_bootstrap, prefix, "digits")
    # the worker creates the topics at start; publish waits for them through the producer's metadata
    pub = subprocess.run([*AUTOGLM, "publish", "--digits", "25", "--id-prefix", "cli"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert pub.returncode == 0, pub.stderr[-3000:]
    assert "published 25 tasks" in pub.stdout
    res = subprocess.run([*AUTOGLM, "results", "--from-beginning", "--count", "25", "--timeout-s", "90",
                          "--json"], capture_output=True, text=True, timeout=150, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert sorted(r["id"] for r in lines) == sorted(f"cli-{i}" for i in range(25))
    assert all(r["status"] == "ok" and r["outputs"]["shape"] == [1, 10] for r in lines)


def test_invalid_setting_is_a_clear_error():
    proc = subprocess.run([*AUTOGLM, "worker", "--max-batch-size", "0", "-b", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "max_batch_size (AUTOGLM_MAX_BATCH_SIZE)" in proc.stderr


def test_publish_reports_bad_lines_and_missing_topics_clearly(kafka_bootstrap, prefix, tmp_path):
    env = {**os.environ, "AUTOGLM_BOOTSTRAP_SERVERS": kafka_bootstrap, "AUTOGLM_TOPIC_PREFIX": prefix}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"schema":"autoglm.task/v1","id":"a","model":"digits","inputs":[[0.5]]}\n'
                   '{"schema":"autoglm.task/v1","id":"","model":"digits","inputs":[[0.5]]}\n')
    proc = subprocess.run([*AUTOGLM, "publish", "--file", str(bad)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 1
    assert f"error: {bad}:2: field 'id'" in proc.stderr
    assert "Traceback" not in proc.stderr

    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"schema":"autoglm.task/v1","id":"r1","model":"resnet","inputs":[[0.5]]}\n')
    proc = subprocess.run([*AUTOGLM, "publish", "--file", str(unknown)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 1
    assert f"topic '{prefix}.tasks.resnet' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
