"""The worker's status report: window figures, totals since start, lag figures (no broker)."""

from __future__ import annotations

import asyncio

import orjson

from autoglm.processors.control import ControlState
from autoglm.processors.metrics import MetricsGroup, PrometheusMetrics, TaskTotals, WindowStats
from autoglm.streams.control import ControlPlane, lag_figures, sign_control
from autoglm.streams.events import ControlEvent
from autoglm.streams.topics import TopicNames


def test_lag_figures_sum_partitions_and_keep_them():
    assert lag_figures({0: 3, 2: 4}) == {"lag": 7, "lag_by_partition": {"0": 3, "2": 4}}
    assert lag_figures(5) == {"lag": 5}
    assert lag_figures(None) == {"lag": None}


def test_task_totals_count_per_model_and_status_through_a_group():
    totals, prom = TaskTotals(), PrometheusMetrics()
    group = MetricsGroup(prom, totals)
    group.count_tasks("digits", "ok", 3)
    group.count_tasks("digits", "error")
    group.count_tasks("minilm", "rejected", 2)
    assert totals.snapshot() == {"digits": {"ok": 3, "error": 1}, "minilm": {"rejected": 2}}
    assert prom.registry.get_sample_value("autoglm_tasks_total", {"model": "digits", "status": "ok"}) == 3.0


async def test_status_report_carries_window_figures_and_totals_since_start():
    sent: list[tuple[str, bytes, bytes]] = []

    async def produce(topic, key, value):
        sent.append((topic, key, value))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    window = WindowStats()
    window.observe_batch(4, [0.01, 0.02, 0.03, 0.04])
    window.take(1.0)  # a heartbeat reset the window: the interval figures start again
    totals = TaskTotals()
    totals.count_tasks("digits", "ok", 3)
    totals.count_tasks("digits", "error", 1)
    state = ControlState("w0", ["digits"])
    state.ready = True
    plane = ControlPlane(
        bootstrap_servers="unused:9092", names=TopicNames("t"), state=state, produce=produce,
        configure=lambda m, p: None, drain=None,  # type: ignore[arg-type]
        figures=lambda window_s, reset: {"digits": window.take(window_s, reset=reset)},
        in_flight=lambda: 7, max_in_flight=64,
        counters=lambda: {"received": 5, "results_ok": 3, "results_error": 1, "dead_letters": 1},
        totals=totals.snapshot,
    )
    plane.handle(sign_control(ControlEvent(id="s1", command="status", target={}, params={}, issued_ms=1), None),
                 replay=False)
    for _ in range(5):
        await asyncio.sleep(0)
    (topic, key, value), = sent
    ack = orjson.loads(value)
    assert (topic, key, ack["kind"], ack["status"]) == ("t.status", b"w0", "ack", "ok")
    report = ack["report"]
    digits = report["models"]["digits"]
    assert digits["results"] == 0 and digits["p99_ms"] is None       # the last interval: nothing served
    assert digits["served_total"] == 4 and digits["batches_total"] == 1  # since start
    assert digits["totals"] == {"ok": 3, "error": 1}
    assert report["totals"]["dead_letters"] == 1 and report["totals"]["received"] == 5
    assert report["in_flight"] == 7 and report["max_in_flight"] == 64
    assert report["window_s"] >= 0 and report["uptime_s"] >= report["window_s"]


async def test_a_heartbeat_carries_the_state_as_of_its_time_not_of_before_the_lag_query():
    """An event applied while the heartbeat awaits the consumer lag (a broker round trip, up to the
    status interval) is acked first; the heartbeat stamped after that ack must not show it undone
    (the console takes the newest status event's state)."""
    sent: list[bytes] = []

    async def produce(topic, key, value):
        sent.append(value)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    state = ControlState("w0", ["digits"])
    state.ready = True

    async def lag():
        plane.handle(sign_control(ControlEvent(id="p1", command="pause", target={"model": "digits"}, params={},
                                               issued_ms=1), None), replay=False)
        for _ in range(5):
            await asyncio.sleep(0)
        return {"digits": {0: 0}}

    plane = ControlPlane(
        bootstrap_servers="unused:9092", names=TopicNames("t"), state=state, produce=produce,
        configure=lambda m, p: None, drain=None,  # type: ignore[arg-type]
        figures=lambda window_s, reset: {"digits": {}}, lag=lag,
    )
    await plane._heartbeat_once()
    docs = [orjson.loads(v) for v in sent]
    assert [d["kind"] for d in docs] == ["ack", "heartbeat"]
    ack, beat = docs
    assert beat["time_ms"] >= ack["time_ms"]
    assert beat["state"]["models"]["digits"]["paused"] is True
    assert beat["state"]["models"]["digits"]["fetching"] is False
