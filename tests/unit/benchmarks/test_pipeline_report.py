"""The pipeline benchmark's pure figures: batch means, per-task times, routes, hop estimate, ratios,
medians over rounds, the drain rate and the README block (no broker, no model)."""

from __future__ import annotations

import pytest

from benchmarks.pipeline_report import (
    END,
    START,
    baseline_figures,
    batch_mean,
    chunks,
    compare,
    drain_rate,
    flatten,
    latency_figures,
    median_rounds,
    route_of,
    step_batch_means,
    table,
    task_times,
    update_readme,
)


def doc(e2e: float, *steps: tuple[str, int, float, float]) -> dict:
    """A pipeline result with ``end_to_end_ms`` and ``(step, batch_size, queue_ms, inference_ms)`` per step run."""
    return {"id": "t", "status": "ok", "end_to_end_ms": e2e,
            "steps": [{"step": s, "model": "m", "worker": "w", "batch_size": b, "queue_ms": q, "inference_ms": i}
                      for s, b, q, i in steps]}


def test_batch_mean_counts_batches_not_tasks():
    # one batch of 4 (4 tasks say 4) and two batches of 1: 6 tasks in 3 batches
    assert batch_mean([4, 4, 4, 4, 1, 1]) == pytest.approx(2.0)
    assert batch_mean([8] * 8) == pytest.approx(8.0)
    assert batch_mean([]) is None
    with pytest.raises(ValueError, match=">= 1"):
        batch_mean([0, 2])


def test_chunks_keep_order_and_a_short_tail():
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunks([], 4) == []
    with pytest.raises(ValueError):
        chunks([1], 0)


def test_task_times_split_latency_into_steps_outside_and_results_transit():
    d = doc(20.0, ("first", 2, 3.0, 4.0), ("second", 1, 1.0, 2.0))
    t = task_times(d, received_ms=1_025.0, created_ms=1_000.0)
    assert t["route"] == "first+second"
    assert t["latency_ms"] == pytest.approx(25.0)
    assert t["steps_ms"] == pytest.approx(10.0)         # 3 + 4 + 1 + 2
    assert t["outside_ms"] == pytest.approx(10.0)       # e2e 20 - steps 10
    assert t["results_transit_ms"] == pytest.approx(5.0)  # latency 25 - e2e 20
    assert route_of({"steps": []}) == "-"


def test_latency_figures_per_route_and_the_hop_between_routes():
    # route first: outside 4 ms; route first+second: outside 10 ms -> one hop adds 6 ms
    tasks = [task_times(doc(10.0, ("first", 1, 1.0, 5.0)), 1_012.0, 1_000.0) for _ in range(9)]
    tasks += [task_times(doc(20.0, ("first", 1, 1.0, 5.0), ("second", 1, 2.0, 2.0)), 1_023.0, 1_000.0)
              for _ in range(3)]
    f = latency_figures(tasks)
    assert f["tasks"] == 12
    assert list(f["routes"]) == ["first", "first+second"]
    assert f["routes"]["first"]["tasks"] == 9
    assert f["routes"]["first"]["outside_p50_ms"] == pytest.approx(4.0)
    assert f["routes"]["first+second"]["outside_p50_ms"] == pytest.approx(10.0)
    assert f["routes"]["first+second"]["results_transit_p50_ms"] == pytest.approx(3.0)
    assert f["hop_p50_ms"] == pytest.approx(6.0)
    assert f["latency_p50_ms"] == pytest.approx(12.0)
    assert f["steps"]["first"]["tasks"] == 12 and f["steps"]["second"]["tasks"] == 3
    assert f["steps"]["second"]["queue_p50_ms"] == pytest.approx(2.0)
    # a single route: no hop estimate
    assert latency_figures(tasks[:9])["hop_p50_ms"] is None


def test_step_batch_means_over_results():
    docs = [doc(1.0, ("a", 4, 0, 0), ("b", 2, 0, 0))] * 4 + [doc(1.0, ("a", 1, 0, 0))]
    means = step_batch_means(docs)
    assert means["a"] == pytest.approx(5 / 2)   # 5 tasks in 2 batches (4 and 1)
    assert means["b"] == pytest.approx(2.0)     # 4 tasks in batches of 2 (as the results report them)


def test_drain_rate_spans_the_interior_results():
    # 1,001 results 2 ms apart (500/s) after 5 s of start-up, the last 40 a straggling 10 s later:
    # the interior window (ranks 51..951) leaves out both and reads the steady 500/s
    ts = [5_000.0 + 2.0 * i for i in range(961)] + [20_000.0 + i for i in range(40)]
    assert drain_rate(ts, 1001) == pytest.approx(500.0)
    assert drain_rate(ts[:-1], 1001) is None           # incomplete
    assert drain_rate([5.0] * 10, 10) is None           # zero span


def test_compare_gives_ratios_and_the_overhead_per_topic():
    pipe = {"latency_p50_ms": 16.0, "latency_p99_ms": 60.0,
            "routes": {"first": {"latency_p50_ms": 15.0}, "first+second": {"latency_p50_ms": 22.0}}}
    base = baseline_figures([1.0] * 50 + [2.0] * 49 + [3.0], ["first"] * 90 + ["first+second"] * 10)
    assert base["routes"]["first+second"]["tasks"] == 10
    c = compare(pipe, base, pipe_rate=1_000.0, base_rate=4_000.0, pipe_cpu_us=100.0, base_cpu_us=25.0)
    assert c["p50_ratio"] == pytest.approx(16.0 / base["latency_p50_ms"])
    assert c["throughput_ratio"] == pytest.approx(0.25)
    assert c["cpu_ratio"] == pytest.approx(4.0)
    assert c["overhead_p50_ms"] == pytest.approx(16.0 - base["latency_p50_ms"])
    first = c["routes"]["first"]
    assert first["topics"] == 2                      # input topic + results topic
    assert first["per_topic_ms"] == pytest.approx((15.0 - base["routes"]["first"]["latency_p50_ms"]) / 2)
    assert c["routes"]["first+second"]["topics"] == 3  # + one intermediate hop
    assert compare(pipe, base, None, 4_000.0)["throughput_ratio"] is None


def test_median_rounds_over_flattened_figures():
    rounds = [{"a": {"x": 1.0, "y": None}, "n": 3}, {"a": {"x": 5.0}, "n": 1}, {"a": {"x": 2.0}, "n": 2, "s": "t"}]
    assert flatten(rounds[0]) == {"a.x": 1.0, "n": 3.0}
    m = median_rounds(rounds)
    assert m["a.x"] == {"median": 2.0, "min": 1.0, "max": 5.0, "n": 3}
    assert m["n"]["median"] == 2.0
    assert "a.y" not in m and "s" not in m


def _report() -> dict:
    tasks = [task_times(doc(10.0, ("first", 1, 1.0, 5.0)), 1_012.0, 1_000.0)] * 3
    pipe = latency_figures(tasks)
    base = baseline_figures([0.5, 0.5, 0.5], ["first"] * 3)
    r = {"pipe": {"latency": pipe, "drain": {"steps": pipe["steps"]}, "drain_per_s": 900.0, "cpu_us_per_task": 90.0},
         "base": {"latency": base, "tasks_per_s": 3_000.0, "cpu_us_per_task": 30.0, "batch_sizes": {"first": 40}},
         "cmp": compare(pipe, base, 900.0, 3_000.0, 90.0, 30.0)}
    return {"stamp": "20260101-000000", "broker": "Apache Kafka", "command": "python -m benchmarks.pipeline",
            "machine": {"cores": 2, "cpu": "x", "load_avg_at_start": [1.0, 1.0, 1.0], "torch": "2", "torch_threads": 1},
            "pipelines": {"p": {"settings": {"rate_per_s": 50.0, "latency_s": 15.0, "drain_tasks": 100},
                                "steps": ["first"], "routes": ["first"], "rounds": [r],
                                "summary": median_rounds([r])}}}


def test_table_shows_the_figures_and_ratios():
    text = table(_report())
    assert "| latency p50 ms | 12.0 | 0.50 | 24.0x |" in text
    assert "| throughput tasks/s | 900 | 3,000 | 0.30x |" in text
    assert "| first | 3 | 12.0 / 12.0 | 0.50 / 0.50 | 11.5 | 2 | 5.8 | 4.0 | 2.0 |" in text


def test_update_readme_replaces_only_its_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# B\n\nbefore\n\n{START}\nold figures\n{END}\n\nafter\n")
    update_readme(_report(), readme)
    text = readme.read_text()
    assert "old figures" not in text and "before" in text and "after" in text
    assert text.count(START) == 1 and "Run `20260101-000000`" in text
    readme.write_text("# B\n")
    update_readme(_report(), readme)
    assert readme.read_text().startswith("# B\n\n" + START)


def test_replay_in_process_waits_for_arrivals_and_counts_queueing():
    from benchmarks.pipeline_chains import replay_in_process

    now = [0.0]
    served = []

    def clock() -> float:
        return now[0]

    def sleep(s: float) -> None:  # wakes up 1 ms late
        now[0] += s + 0.001

    def call(i: int) -> str:  # each task takes 10 ms
        served.append((i, now[0]))
        now[0] += 0.010
        return "a" if i % 2 == 0 else "a+b"

    # task 0 at 0 ms, task 1 at 100 ms (the loop wakes at 101 ms: the late wake-up is not the
    # chain's), task 2 at 105 ms (arrives while task 1 runs, until 111 ms: that 6 ms wait counts)
    latencies, routes = replay_in_process(call, [0.0, 0.100, 0.105], clock=clock, sleep=sleep)
    assert routes == ["a", "a+b", "a"]
    assert [t for _, t in served] == pytest.approx([0.0, 0.101, 0.111])
    assert latencies == pytest.approx([10.0, 10.0, 16.0])
