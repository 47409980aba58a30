"""The figure-C summary and table (pure functions, no broker)."""

from __future__ import annotations

import pytest

from benchmarks.control import summarize
from benchmarks.control_report import table


def command(acked: dict[str, float], applied: dict[str, float], ok: bool = True) -> dict:
    return {"ok": ok, "missing": [], "acked_ms": acked, "applied_ms": applied,
            "acked_max_ms": max(acked.values()), "applied_max_ms": max(applied.values())}


def cycle(i: int, pause_ms: float, resume_ms: float, late: int = 0, serving: dict | None = None) -> dict:
    serving = {"w0": 500.0, "w1": 700.0} if serving is None else serving
    return {"cycle": i, "pause": command({"w0": pause_ms / 2, "w1": pause_ms}, {"w0": 1.0, "w1": pause_ms / 2}),
            "resume": command({"w0": resume_ms, "w1": resume_ms / 2}, {"w0": 2.0, "w1": 3.0}),
            "echo_ms": 5.0, "late_results": late, "served_while_paused": 0, "in_flight_results_after_pause": 3,
            "serving_again_ms": serving,
            "serving_again_all_ms": max(serving.values()) if len(serving) == 2 else None}


def raw(cycles: list[dict]) -> dict:
    return {"workers": ["w0", "w1"], "rate_per_s": 300.0, "cycles": cycles, "tasks_sent": 10, "results": 10,
            "duplicates": 0, "lost": 0, "broker": "test broker"}


def test_summary_takes_the_slowest_worker_per_command_and_sums_the_checks():
    s = summarize(raw([cycle(0, 20, 10), cycle(1, 40, 30, late=2), cycle(2, 60, 50, serving={"w0": 400.0})]))
    assert (s["pause"]["acked_all"]["p50"], s["pause"]["acked_all"]["max"]) == (40.0, 60.0)
    assert s["pause"]["acked_per_worker"]["n"] == 6 and s["pause"]["acked_per_worker"]["max"] == 60.0
    assert s["resume"]["acked_all"]["p50"] == 30.0
    assert s["pause"]["acked_over_two_echo_p50"] == pytest.approx(40.0 / 10.0)
    # a cycle where one worker served nothing held is left out of "every worker", counted as missing
    assert s["resume"]["serving_again_all"]["n"] == 2 and s["resume"]["serving_again_missing"] == 1
    assert s["late_results"] == 2 and s["served_while_paused"] == 0
    assert s["meets_target_acked"] is True and s["meets_target_applied"] is True
    assert summarize(raw([cycle(0, 150, 10)]))["meets_target_acked"] is False


def test_table_has_a_row_per_broker_and_command_and_reports_the_checks():
    r = raw([cycle(0, 20, 10), cycle(1, 40, 30)])
    r["summary"] = summarize(r)
    text = table({"brokers": {"kafka": r}})
    rows = [line for line in text.splitlines() if line.startswith("| test broker |")]
    assert [row.split(" | ")[1] for row in rows] == ["pause", "resume"]
    assert "| 30.0 / 39.8 / 40.0 |" in rows[0]
    assert "**0**" in text and "10 tasks, 10 results, 0 lost" in text
