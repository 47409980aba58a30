"""Figure O/T: the per-drain figures, the round-paired summary, the targets and the table (no broker)."""

from __future__ import annotations

import pytest

from benchmarks.drain_io import interior
from benchmarks.throughput import CANDIDATES, interior_timestamps, tasks_for
from benchmarks.throughput_report import EMBEDDED, KAFKA, drain_figures, summarize, table, update_readme


def drain(candidate: str, rate: float, cpu_us: float, *, model: str = "digits-linear", round_: int = 0,
          broker: str = KAFKA, tasks: int = 1001, complete: bool = True, committed: int | None = None) -> dict:
    """A drain of ``tasks`` tasks whose results span (tasks - 1) / rate seconds and cost ``cpu_us`` each."""
    span_ms = (tasks - 1) / rate * 1000.0
    opens, closes = interior(tasks)
    return {"candidate": candidate, "model": model, "broker": broker, "round": round_, "tasks": tasks,
            "results": tasks, "unique": tasks if complete else tasks - 1, "duplicates": 0, "not_ok": 0,
            "first_ts_ms": 1_000_000, "last_ts_ms": 1_000_000 + span_ms, "complete": complete,
            "interior_ts": {"opens": opens, "closes": closes, "opens_ms": 1_000_000 + (opens - 1) / rate * 1000,
                            "closes_ms": 1_000_000 + (closes - 1) / rate * 1000},
            "committed": tasks if committed is None else committed,
            "window": {"s": 2.0, "results": 800, "cpu_s": cpu_us * 800 / 1e6}}


def limit(items_per_s: float, cpu_us: float = 10.0) -> dict:
    return {"1": {"items_per_s": items_per_s / 10, "cpu_us_per_item": cpu_us * 10},
            "256": {"items_per_s": items_per_s, "cpu_us_per_item": cpu_us}}


def test_drain_figures_span_the_interior_results_and_cpu_over_the_window():
    d = drain("lean", 500.0, 120.0)
    f = drain_figures(d)
    assert f["tasks_per_s"] == pytest.approx(500.0)           # ranks 51..951 over 1.8 s
    assert f["cpu_us_per_task"] == pytest.approx(120.0)       # 0.096 s of CPU over 800 results
    assert f["window_tasks_per_s"] == pytest.approx(400.0)
    # a first batch of 100 served in 0.2 s, its results out at once at 0.2 s: first-to-last counts
    # them without their time (1000 / 1.8 s), the interior window does not
    d["first_ts_ms"] += 200.0
    assert drain_figures(d)["tasks_per_s"] == pytest.approx(500.0)
    assert drain_figures(d)["tasks_per_s_first_last"] == pytest.approx(1000 / 1.8)
    del d["interior_ts"]                                       # a drain recorded before interior figures
    assert drain_figures(d)["tasks_per_s"] == drain_figures(d)["tasks_per_s_first_last"]
    assert set(drain_figures(drain("lean", 500.0, 120.0, complete=False)).values()) == {None}


def test_the_interior_window_opens_at_5_and_closes_at_95_percent_of_the_results():
    assert interior(30_000) == (1500, 28_500)
    assert interior(10) == (1, 10) and interior(1) == (1, 1)
    ts = [50, 10, 40, 20, 30, 60, 70, 80, 90, 100]            # read back partition by partition
    assert interior_timestamps(ts, 10) == {"opens": 1, "closes": 10, "opens_ms": 10, "closes_ms": 100}
    assert interior_timestamps(ts[:9], 10) is None             # a task without its result


def test_ratios_pair_candidates_of_the_same_round():
    # worker / lean per round: 0.75, 0.2, 0.9 -> median 0.75; the ratio of the medians would be 900/3000 = 0.3
    lean, worker, lims = (4000, 3000, 1000), (3000, 600, 900), (40_000, 20_000, 10_000)
    drains = [d for r in range(3) for d in (drain("lean", lean[r], 100, round_=r),
                                            drain("worker", worker[r], 300 + r, round_=r),
                                            drain("faust", worker[r] / 2, 400, round_=r))]
    s = summarize(drains, {"digits-linear": [limit(v) for v in lims]})
    w = s["brokers"][KAFKA]["digits-linear"]["worker"]
    assert w["vs_lean_tasks_per_s"]["median"] == pytest.approx(0.75)
    assert (w["vs_lean_tasks_per_s"]["min"], w["vs_lean_tasks_per_s"]["max"]) == (pytest.approx(0.2),
                                                                                   pytest.approx(0.9))
    assert w["t_over_l"]["median"] == pytest.approx(0.075)              # 3000/40000, 600/20000, 900/10000
    assert w["tasks_per_s"] == {"median": pytest.approx(900), "min": pytest.approx(600),
                                "max": pytest.approx(3000), "n": 3}
    assert w["vs_lean_cpu"]["median"] == pytest.approx(3.01)
    assert w["vs_faust_tasks_per_s"]["median"] == pytest.approx(2.0)
    assert s["limits"]["digits-linear"]["items_per_s"]["median"] == pytest.approx(20_000)
    assert s["limits"]["digits-linear"]["best_batch"] == [256, 256, 256]
    by_figure = {t["figure"]: t for t in s["targets"]}
    assert by_figure["worker_vs_lean_tasks_per_s"]["met"] is False
    assert by_figure["worker_vs_lean_cpu"]["met"] is False
    assert by_figure["worker_vs_faust_tasks_per_s"]["met"] is False   # 2.0 < 2.5
    assert {t["model"] for t in s["targets"]} == {"digits-linear"}     # no digits or minilm drains


def test_targets_met_and_the_demo_verdict():
    drains = [drain("lean", 4000, 100), drain("worker", 3800, 110), drain("faust", 1000, 300),
              drain("worker", 3000, 100, model="digits"), drain("lean", 3100, 90, model="digits"),
              drain("worker", 900, 100, broker=EMBEDDED), drain("lean", 3600, 100, broker=EMBEDDED)]
    s = summarize(drains, {"digits-linear": [limit(50_000)], "digits": [limit(8_000)]})
    assert all(t["met"] for t in s["targets"]), s["targets"]
    assert {t["model"] for t in s["targets"]} == {"digits-linear", "digits"}
    d = s["demo"]
    assert d["limits_demo"] == "the worker" and d["lean_over_worker_embedded"] == pytest.approx(4.0)
    assert d["worker_embedded_over_kafka"] == pytest.approx(900 / 3800)
    # when the lean loop is no faster than the worker on the embedded broker, the broker limits
    drains[-1] = drain("lean", 1000, 100, broker=EMBEDDED)
    assert summarize(drains, {"digits-linear": [limit(50_000)]})["demo"]["limits_demo"] == "the broker"


def test_incomplete_and_uncommitted_drains_are_flagged_in_the_table():
    drains = [drain("lean", 4000, 100), drain("worker", 2000, 300, committed=900),
              drain("faust", 1000, 400, complete=False)]
    drains[0].update(load_avg_1m_before=3.0, load_avg_1m_after=5.0)
    labels = {k: {"label": CANDIDATES[k].label} for k in ("lean", "worker", "faust")}
    report = {"machine": {"cores": 2}, "settings": {"candidates": labels},
              "summary": summarize(drains, {"digits-linear": [limit(40_000)]})}
    text = table(report)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows[CANDIDATES["worker"].label + " **incomplete**"].split(" | ")[2:5] == ["2,000", "300", "0.050"]
    assert "**incomplete**" in next(r for k, r in rows.items() if k.startswith(CANDIDATES["faust"].label))
    assert "| 1,001 | 4,000 | 100 | 0.100 | 1.00x | 1.00x |" in rows[CANDIDATES["lean"].label]
    assert "0.50 **not met**" in text
    assert "Load average (1 min) of the machine around the drains: median 4.0, 3.0-5.0 (on 2 cores)" in text


def test_update_readme_appends_then_replaces_its_section(tmp_path, monkeypatch):
    import benchmarks.throughput_report as rep

    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## Figure A\n<!-- results:start -->keep<!-- results:end -->\n")
    monkeypatch.setattr(rep, "README", readme)
    report = {"command": "python -m benchmarks.throughput", "settings": {"candidates": {}},
              "machine": {"cores": 2, "cpu": "x", "torch": "2", "device": "cpu", "torch_threads": 1,
                          "aiokafka": "0.14", "faust": "0.15", "confluent_kafka": "2.16", "librdkafka": "2.16"},
              "summary": summarize([drain("lean", 4000, 100)], {"digits-linear": [limit(40_000)]})}
    update_readme(report, "20990101-000000")
    update_readme(report, "20990102-000000")
    text = readme.read_text()
    assert text.count("<!-- throughput:start -->") == 1 and "20990102-000000" in text
    assert "20990101-000000" not in text and "<!-- results:start -->keep<!-- results:end -->" in text


def test_the_naive_consumer_drains_a_share_of_the_backlog():
    assert tasks_for("digits", CANDIDATES["naive"], 30_000, 3_000) == 2_000
    assert tasks_for("minilm", CANDIDATES["worker"], 30_000, 3_000) == 3_000
    assert tasks_for("minilm", CANDIDATES["naive"], 30_000, 600) == 50   # never below 50
