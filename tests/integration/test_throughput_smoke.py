"""The figure O/T harness end to end: ``benchmarks.throughput --smoke`` against a real Apache Kafka."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_drains_every_task_through_the_worker_and_the_lean_loop(kafka_bootstrap, model_cache, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--smoke", "--bootstrap", kafka_bootstrap,
         "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("*-throughput-smoke.json")).read_text())
    assert sorted(d["candidate"] for d in report["drains"]) == ["lean", "worker"]
    for d in report["drains"]:  # at-least-once: a rebalance may repeat a task, never lose one
        assert (d["unique"], d["not_ok"], d["committed"], d["complete"]) == (500, 0, 500, True), {
            k: v for k, v in d.items() if k != "log_tail"}
    cells = report["summary"]["brokers"][report["drains"][0]["broker"]]["digits-linear"]
    for cell in cells.values():  # 500 tasks take the lean loop ~0.1 s: too short to time its CPU (10 ms ticks)
        assert cell["tasks_per_s"]["median"] > 0
    assert cells["lean"]["vs_lean_tasks_per_s"]["median"] == 1.0
    assert next(tmp_path.glob("*-throughput-smoke.png")).stat().st_size > 10_000
