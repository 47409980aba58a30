"""The figure-A report's aggregation over interleaved rounds (pure functions, no broker)."""

from __future__ import annotations

import pytest

from benchmarks.batching import drain_throughput, median_summary, verdict


def summary(mean: float, p99: float, tput: float, burst_mean: float, tag: str, drain: float | None = None) -> dict:
    return {"tasks": 100, "completed": 100, "mean_ms": mean, "p50_ms": mean * 0.8, "p99_ms": p99,
            "throughput_per_s": tput, "drain_per_s": drain, "jitter": 0.5, "mean_batch_size": 8.0,
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
        "adaptive": median_summary([summary(10, 40, 100, 12, "a", drain=300)]),
        "fixed 32/10ms": median_summary([summary(20, 80, 100, 30, "d", drain=200)]),
        "fixed 64/20ms": median_summary([summary(12, 30, 110, 10, "e", drain=310)]),
    }
    v = verdict(runs)
    assert v["vs_default"]["mean_latency_change"] == pytest.approx(-0.5)
    assert v["vs_default"]["drain_throughput_change"] == pytest.approx(0.5)
    assert v["beats_every_fixed"]["fixed 64/20ms"] == {"mean": True, "p99": False, "throughput": False,
                                                     "drain_throughput": False}
    assert all(v["beats_every_fixed"]["fixed 32/10ms"].values())
    assert v["per_level"]["burst"]["best_fixed"] == "fixed 64/20ms"
    assert v["per_level"]["burst"]["within_10pct"] is False  # 12 > 1.1 * 10


def test_drain_throughput_counts_only_bins_with_a_backlog():
    """10 tasks sent at t=0 and served 2 per 0.25 s (8/s) until t=1.25, then 5 lone tasks each
    answered within its bin: only the bins that start with >= 4 outstanding count."""
    sent = [0.0] * 10 + [2.0, 2.5, 3.0, 3.5, 4.0]
    received = [0.1, 0.2, 0.35, 0.45, 0.6, 0.7, 0.85, 0.95, 1.1, 1.2, 2.05, 2.55, 3.05, 3.55, 4.05]
    # bins starting at 0, 0.25, 0.5, 0.75 have 10, 8, 6, 4 outstanding: 8 served in 1 s
    assert drain_throughput(sent, received, backlog_tasks=4) == pytest.approx(8.0)
    assert drain_throughput(sent, received, backlog_tasks=11) is None
    assert drain_throughput(sent, [], backlog_tasks=1) is None
