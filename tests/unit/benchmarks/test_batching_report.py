"""The figure-A report's aggregation over interleaved rounds (pure functions, no broker)."""

from __future__ import annotations

import pytest

from benchmarks.batching import median_summary, verdict


def summary(mean: float, p99: float, tput: float, burst_mean: float, tag: str) -> dict:
    return {"tasks": 100, "completed": 100, "mean_ms": mean, "p50_ms": mean * 0.8, "p99_ms": p99,
            "throughput_per_s": tput, "jitter": 0.5, "mean_batch_size": 8.0,
            "phases": {"burst": {"tasks": 50, "completed": 50, "mean_ms": burst_mean, "p99_ms": p99}},
            "timeline": {"tag": tag}}


def test_median_over_rounds_with_spread_and_the_median_rounds_timeline():
    rounds = [summary(10, 50, 100, 20, "a"), summary(30, 90, 80, 60, "b"), summary(20, 70, 90, 40, "c")]
    m = median_summary(rounds)
    assert (m["mean_ms"], m["p99_ms"], m["throughput_per_s"]) == (20.0, 70.0, 90.0)
    assert m["spread"]["mean_ms"] == [10, 30] and m["spread"]["throughput_per_s"] == [80, 100]
    assert m["phases"]["burst"]["mean_ms"] == 40.0 and m["phases"]["burst"]["spread_mean_ms"] == [20, 60]
    assert m["timeline"] == {"tag": "c"} and m["rounds"] == 3


def test_verdict_compares_medians_against_the_default_and_each_level():
    runs = {
        "adaptive": median_summary([summary(10, 40, 100, 12, "a")]),
        "fixed 32/10ms": median_summary([summary(20, 80, 100, 30, "d")]),
        "fixed 64/20ms": median_summary([summary(12, 30, 110, 10, "e")]),
    }
    v = verdict(runs)
    assert v["vs_default"]["mean_latency_change"] == pytest.approx(-0.5)
    assert v["beats_every_fixed"]["fixed 64/20ms"] == {"mean": True, "p99": False, "throughput": False}
    assert v["per_level"]["burst"]["best_fixed"] == "fixed 64/20ms"
    assert v["per_level"]["burst"]["within_10pct"] is False  # 12 > 1.1 * 10
