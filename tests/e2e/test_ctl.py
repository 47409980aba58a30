"""``autoglm ctl`` and ``autoglm status`` as an operator runs them, against worker processes.

Workers heartbeat every second (``status_interval_s=1``) so that they count as
live, and show a new state in ``autoglm status``, within about a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

AUTOGLM = [sys.executable, "-m", "autoglm"]
FAST = {"status_interval_s": "1"}


def cli_env(bootstrap: str, prefix: str) -> dict[str, str]:
    # a wide terminal: rich fits the status table to COLUMNS (80 when not a tty would truncate cells)
    return {**os.environ, "AUTOGLM_BOOTSTRAP_SERVERS": bootstrap, "AUTOGLM_TOPIC_PREFIX": prefix, "COLUMNS": "200"}


def autoglm(env: dict[str, str], *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([*AUTOGLM, *args], capture_output=True, text=True, timeout=timeout_s, env=env)


def wait_status(env: dict[str, str], predicate, what: str, timeout_s: float = 120) -> dict[str, dict]:
    """Poll ``autoglm status --json`` until ``predicate(live workers)``; returns them."""
    deadline = time.monotonic() + timeout_s
    live: dict[str, dict] = {}
    errors = ""
    while time.monotonic() < deadline:
        proc = autoglm(env, "status", "--json")
        if proc.returncode == 0:  # before the first worker created the topics it exits 1
            live = json.loads(proc.stdout)
            if predicate(live):
                return live
        errors = proc.stderr[-2000:]
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; live workers: {sorted(live)}; last stderr: {errors}")


def ready(n: int):
    return lambda live: sum(bool(hb["state"]["ready"]) for hb in live.values()) >= n


def start_workers(workers, bootstrap: str, prefix: str, n: int, *, embedded: bool = False,
                  **settings: str) -> list[subprocess.Popen]:
    """Start ``n`` workers and wait until each has rebuilt its control state (its topics exist then).

    The CLI is not run before: asked about a topic that does not exist, the
    embedded broker creates it with its default partition count (see
    test_ctl_against_a_prefix_without_topics_is_a_clear_error).
    """
    procs = [workers.start(bootstrap, prefix, embedded=embedded, **settings) for _ in range(n)]
    deadline = time.monotonic() + 120
    for proc in procs:
        while "control state rebuilt" not in Path(proc.log_path).read_text(errors="replace"):
            assert proc.poll() is None, workers.log(proc)
            assert time.monotonic() < deadline, workers.log(proc)
            time.sleep(0.3)
    wait_status(cli_env(bootstrap, prefix), ready(n), f"{n} ready workers")
    return procs


def table_states(stdout: str) -> dict[tuple[str, str], str]:
    """(worker, model) -> state column of the ``autoglm status`` table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 14 and cells[0] != "worker":
            rows[(cells[0], cells[1])] = cells[2]
    return rows


def wait_table(env: dict[str, str], expected: dict[tuple[str, str], str], timeout_s: float = 20) -> str:
    """Poll the ``autoglm status`` table until its states are ``expected``; returns its output."""
    deadline = time.monotonic() + timeout_s
    states: dict = {}
    while time.monotonic() < deadline:
        proc = autoglm(env, "status")
        assert proc.returncode == 0, proc.stderr[-3000:]
        states = table_states(proc.stdout)
        if states == expected:
            assert "2 live worker(s)" in proc.stdout
            return proc.stdout
        time.sleep(0.5)
    raise AssertionError(f"status table states {states}, expected {expected}")


def acked_lines(stdout: str) -> dict[str, str]:
    """worker -> status word of the per-worker lines ``  <worker>: <status> in <n> ms``."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("  ") and ": " in line and " ms" in line:
            worker, rest = line.strip().split(": ", 1)
            out[worker] = rest.split()[0]
    return out


def test_pause_status_resume_against_apache_kafka(kafka_bootstrap, prefix, workers, model_cache):
    env = cli_env(kafka_bootstrap, prefix)
    start_workers(workers, kafka_bootstrap, prefix, 2, **FAST)
    running = {("w0", "digits"): "running", ("w1", "digits"): "running"}
    wait_table(env, running)

    pause = autoglm(env, "ctl", "pause", "--wait")
    assert pause.returncode == 0, pause.stdout + pause.stderr[-3000:]
    assert pause.stdout.startswith("sent pause all (event ")
    assert acked_lines(pause.stdout) == {"w0": "ok", "w1": "ok"}
    wait_table(env, {k: "paused" for k in running})
    # ctl status prints every worker's full report, not only its ack, without --json
    report = autoglm(env, "ctl", "status")
    assert report.returncode == 0, report.stdout + report.stderr[-3000:]
    assert "status reports of 2 worker(s)" in report.stdout
    assert table_states(report.stdout) == {k: "paused" for k in running}

    resume = autoglm(env, "ctl", "resume", "--wait")
    assert resume.returncode == 0, resume.stdout + resume.stderr[-3000:]
    assert resume.stdout.startswith("sent resume all (event ")
    assert acked_lines(resume.stdout) == {"w0": "ok", "w1": "ok"}
    wait_table(env, running)

    # a target no live worker serves (a typo) is acknowledged by every worker, and exits 1 saying so
    typo = autoglm(env, "ctl", "pause", "--pipeline", "digits-routnig", "--wait")
    assert typo.returncode == 1, typo.stdout + typo.stderr[-3000:]
    assert acked_lines(typo.stdout) == {"w0": "ok", "w1": "ok"}
    assert "error: no live worker serves pipeline 'digits-routnig'" in typo.stderr
    wait_table(env, running)  # nothing was paused


def test_pause_and_resume_wait_against_the_embedded_broker(embedded_bootstrap, prefix, workers, model_cache):
    env = cli_env(embedded_bootstrap, prefix)
    start_workers(workers, embedded_bootstrap, prefix, 2, embedded=True, **FAST)

    pause = autoglm(env, "ctl", "pause", "--model", "digits", "--wait", "--json")
    assert pause.returncode == 0, pause.stdout + pause.stderr[-3000:]
    outcome = json.loads(pause.stdout)
    assert outcome["ok"] is True and outcome["missing"] == []
    assert outcome["command"] == "pause" and outcome["target"] == {"model": "digits"}
    assert outcome["expected"] == ["w0", "w1"] == sorted(outcome["acks"])
    for ack in outcome["acks"].values():
        assert ack["event_id"] == outcome["event_id"] and ack["status"] == "ok"
        assert ack["state"]["models"]["digits"] == {"paused": True, "loaded": True, "fetching": False,
                                                       "params": {}, "generation": 0}
    wait_status(env, lambda live: all(hb["state"]["models"]["digits"]["paused"] for hb in live.values())
                and len(live) == 2, "both workers to report paused", timeout_s=20)

    resume = autoglm(env, "ctl", "resume", "--wait")
    assert resume.returncode == 0, resume.stdout + resume.stderr[-3000:]
    assert acked_lines(resume.stdout) == {"w0": "ok", "w1": "ok"}
    wait_status(env, lambda live: len(live) == 2 and all(hb["state"]["models"]["digits"]["fetching"]
                                                         for hb in live.values()),
                "both workers to report fetching", timeout_s=20)


def test_wait_names_a_frozen_worker_and_exits_1(kafka_bootstrap, prefix, workers, model_cache):
    env = cli_env(kafka_bootstrap, prefix)
    # heartbeats every 3 s: a frozen worker still counts as live for 9 s after its last one
    _, frozen = start_workers(workers, kafka_bootstrap, prefix, 2, status_interval_s="3")
    frozen.send_signal(signal.SIGSTOP)
    try:
        proc = autoglm(env, "ctl", "pause", "--wait", "--timeout-s", "3")
    finally:
        frozen.send_signal(signal.SIGCONT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert acked_lines(proc.stdout) == {"w0": "ok"}
    assert "error: no acknowledgement within the timeout from: w1\n" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_configure_out_of_range_is_refused_before_it_reaches_the_control_topic(kafka_bootstrap, prefix, workers,
                                                                              model_cache):
    """An invalid value never lands in the compacted topic, where it would supersede a valid one."""
    env = cli_env(kafka_bootstrap, prefix)
    start_workers(workers, kafka_bootstrap, prefix, 1, **FAST)
    wait_status(env, ready(1), "a ready worker")
    proc = autoglm(env, "ctl", "configure", "--max-batch-size", "0", "--wait")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "error: max_batch_size must be between 1 and 65536, got 0"
    assert "sent" not in proc.stdout
    # the worker kept its own setting, and nothing was published
    live = wait_status(env, ready(1), "a ready worker")
    assert live["w0"]["models"]["digits"]["max_batch_size"] == 256   # the adaptive default
    assert live["w0"]["state"]["models"]["digits"]["params"] == {}
    proc = autoglm(env, "ctl", "configure", "--max-batch-size", "12", "--wait")
    assert proc.returncode == 0 and acked_lines(proc.stdout) == {"w0": "ok"}, proc.stdout + proc.stderr


@pytest.mark.parametrize("broker", ["kafka", "embedded"])
@pytest.mark.parametrize("command", [["ctl", "pause", "--wait"], ["ctl", "status"], ["status"]])
def test_ctl_against_a_prefix_without_topics_is_a_clear_error(request, broker, command, prefix):
    bootstrap = request.getfixturevalue(f"{broker}_bootstrap")
    proc = autoglm(cli_env(bootstrap, prefix), *command)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: topic '{prefix}.control' does not exist on "), proc.stderr
    assert f"is a worker running with prefix '{prefix}'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    # asking must not create them (a broker that auto-creates would make them with the wrong partition count)
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def topics() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    assert not {t for t in asyncio.run(topics()) if t.startswith(prefix)}
