"""The console's memory: liveness, history horizon, aggregation, acks (no broker, no clock)."""

from __future__ import annotations

import pytest

from autoglm.streams.console.state import (PARTLY_PAUSED, ConsoleState, History, aggregate_model, model_state,
                                           pipeline_state, step_of)

T0 = 1_800_000_000_000


def heartbeat(worker: str, t_ms: int, *, paused: bool = False, interval_s: float = 5.0, **figures) -> dict:
    fig = {"results": 10, "throughput_per_s": 2.0, "p50_ms": 5.0, "p99_ms": 9.0, "mean_batch_size": 4.0,
           "target_size": 8, "queue_depth": 1, "lag": 3, "served_total": 100}
    fig.update(figures)
    return {"schema": "autoglm.status/v1", "kind": "heartbeat", "worker": worker, "time_ms": t_ms,
            "interval_s": interval_s, "in_flight": 2,
            "state": {"ready": True, "draining": False, "drained": False,
                      "models": {"digits": {"paused": paused, "fetching": not paused, "params": {}}}},
            "models": {"digits": fig}}


def test_history_keeps_only_the_horizon_before_the_newest_point():
    h = History(horizon_s=60.0)
    for i in range(10):
        h.add(("w0", "digits"), T0 + i * 10_000, {"throughput_per_s": float(i)})
    points = h.series(("w0", "digits"))
    # the newest is at +90 s: points before +30 s are gone
    assert [p["t"] - T0 for p in points] == [30_000, 40_000, 50_000, 60_000, 70_000, 80_000, 90_000]
    assert points[-1]["throughput_per_s"] == 9.0


def test_history_drops_an_out_of_order_point_and_prunes_empty_series():
    h = History(horizon_s=60.0)
    h.add(("w0", "m"), T0 + 5000, {})
    assert h.add(("w0", "m"), T0 + 4000, {}) is None
    assert len(h.series(("w0", "m"))) == 1
    h.prune(T0 + 5000 + 60_001)
    assert h.keys() == []


def test_liveness_live_stale_stopped_and_restart():
    s = ConsoleState()
    s.observe_status(heartbeat("w0", T0))
    assert s.liveness("w0", T0 + 15_000) == "live"       # three 5 s intervals
    assert s.liveness("w0", T0 + 15_001) == "stale"
    s.observe_status({"schema": "autoglm.status/v1", "kind": "stopped", "worker": "w0", "time_ms": T0 + 100})
    assert s.liveness("w0", T0 + 200) == "stopped"
    s.observe_status(heartbeat("w0", T0 + 60_000))      # restarted under the same id
    assert s.liveness("w0", T0 + 60_000) == "live"
    assert s.live_workers(T0 + 60_000) == ["w0"]


def test_worker_view_states_and_figures():
    s = ConsoleState()
    s.observe_status(heartbeat("w0", T0, paused=True))
    row = s.worker_view("w0", T0 + 2500)
    assert row["age_s"] == 2.5
    assert row["models"]["digits"]["state"] == "paused"
    assert row["models"]["digits"]["p99_ms"] == 9.0
    assert model_state({"ready": True, "draining": True, "models": {}}, "digits") == "draining"
    assert model_state({"ready": True, "drained": True, "draining": True}, "digits") == "drained"
    assert model_state({"ready": False}, "digits") == "starting"


def test_aggregate_sums_rates_takes_worst_p99_and_weights_batch_by_results():
    agg = aggregate_model([
        {"throughput_per_s": 10.0, "p99_ms": 20.0, "mean_batch_size": 2.0, "results": 30, "queue_depth": 1, "lag": 5},
        {"throughput_per_s": 5.0, "p99_ms": 80.0, "mean_batch_size": 8.0, "results": 10, "queue_depth": 0, "lag": None},
        {"throughput_per_s": 0.0, "p99_ms": None, "mean_batch_size": None, "results": 0},
    ])
    assert agg["throughput_per_s"] == 15.0
    assert agg["p99_ms"] == 80.0
    assert agg["mean_batch_size"] == pytest.approx((2.0 * 30 + 8.0 * 10) / 40)
    assert agg["queue_depth"] == 1 and agg["lag"] == 5 and agg["workers"] == 3


def test_models_view_counts_live_workers_only():
    s = ConsoleState()
    s.observe_status(heartbeat("w0", T0, throughput_per_s=4.0))
    s.observe_status(heartbeat("w1", T0 - 60_000, throughput_per_s=100.0))  # stale
    assert s.models_view(T0)["digits"]["throughput_per_s"] == 4.0


def test_command_acks_ok_rejected_and_missing_after_timeout():
    s = ConsoleState()
    for w in ("w0", "w1", "w2"):
        s.observe_status(heartbeat(w, T0))
    pending = s.command_sent(event_id="e1", command="configure", target={}, params={"max_batch_size": 8},
                             issued_ms=T0 + 100, now_ms=T0 + 100, timeout_s=10.0)
    assert pending.expected == ["w0", "w1", "w2"]
    s.observe_status({"schema": "autoglm.status/v1", "kind": "ack", "worker": "w0", "time_ms": T0 + 130,
                      "event_id": "e1", "command": "configure", "status": "ok", "reason": ""})
    s.observe_status({"schema": "autoglm.status/v1", "kind": "ack", "worker": "w1", "time_ms": T0 + 150,
                      "event_id": "e1", "command": "configure", "status": "rejected", "reason": "bad value"})
    before = pending.view(T0 + 5_000)
    assert before["acks"]["w0"] == {"status": "ok", "reason": "", "latency_ms": 30}
    assert before["acks"]["w1"]["status"] == "rejected" and before["acks"]["w1"]["reason"] == "bad value"
    assert before["acks"]["w2"]["status"] == "waiting" and not before["done"]
    after = pending.view(T0 + 100 + 10_000)
    assert after["acks"]["w2"]["status"] == "missing" and after["done"]


def test_an_ack_read_before_the_command_was_registered_is_kept():
    s = ConsoleState()
    s.observe_status(heartbeat("w0", T0))
    s.observe_status({"schema": "autoglm.status/v1", "kind": "ack", "worker": "w0", "time_ms": T0 + 20,
                      "event_id": "fast", "command": "pause", "status": "ok", "reason": "",
                      "state": {"ready": True, "models": {"digits": {"paused": True}}}})
    pending = s.command_sent(event_id="fast", command="pause", target={"worker": "w0"}, params={},
                             issued_ms=T0 + 10, now_ms=T0 + 30, timeout_s=5.0)
    assert pending.view(T0 + 30)["acks"]["w0"]["status"] == "ok"
    assert pending.view(T0 + 30)["done"]
    # the ack's state updated the worker at once (no need to wait for the next heartbeat)
    assert s.worker_view("w0", T0 + 30)["models"]["digits"]["state"] == "paused"


def test_a_command_for_one_worker_expects_only_that_worker():
    s = ConsoleState()
    s.observe_status(heartbeat("w0", T0))
    s.observe_status(heartbeat("w1", T0))
    pending = s.command_sent(event_id="e", command="pause", target={"worker": "w1"}, params={},
                             issued_ms=T0, now_ms=T0, timeout_s=1.0)
    assert pending.expected == ["w1"]


def test_dead_letters_keep_the_last_n_with_their_headers():
    s = ConsoleState(dead_letters_max=2)
    for offset in range(3):
        s.observe_dead_letter({"topic": "p.dlq", "partition": 0, "offset": offset, "timestamp_ms": T0,
                               "headers": {"autoglm.error.code": "bad_json", "autoglm.error.message": "oops",
                                           "autoglm.source.topic": "p.tasks.digits",
                                           "autoglm.source.partition": "1", "autoglm.source.offset": str(offset)}})
    rows = list(s.dead_letters)
    assert [r["source_offset"] for r in rows] == ["1", "2"]
    # read again (a restarted reader): kept once
    assert s.observe_dead_letter({"topic": "p.dlq", "partition": 0, "offset": 2, "headers": {}}) is None
    assert len(s.dead_letters) == 2
    assert rows[0]["code"] == "bad_json" and rows[0]["source_topic"] == "p.tasks.digits"


def test_snapshot_forgets_workers_silent_past_the_horizon():
    s = ConsoleState(forget_after_s=60.0)
    s.observe_status(heartbeat("old", T0))
    s.observe_status(heartbeat("new", T0 + 100_000))
    snap = s.snapshot(T0 + 100_000)
    assert [w["worker"] for w in snap["workers"]] == ["new"]
    assert [(h["worker"], h["model"]) for h in snap["history"]] == [("new", "digits")]


STEPS = (("first", "digits"), ("second", "digits-linear"))


def pipeline_heartbeat(worker: str, t_ms: int, *, paused_steps=(), throughput=(3.0, 1.0), digits_paused=False,
                       pipeline: str = "digits-routing") -> dict:
    """A heartbeat of a worker serving ``digits`` on its own topic and the two steps of a pipeline
    (the shape of ControlState.snapshot: a step's state entry carries pipeline, step and runs)."""
    doc = heartbeat(worker, t_ms, paused=digits_paused)
    for (step, model), rate in zip(STEPS, throughput):
        stream = f"{pipeline}/{step}"
        paused = step in paused_steps
        doc["state"]["models"][stream] = {"paused": paused, "fetching": not paused, "params": {}, "generation": 0,
                                          "pipeline": pipeline, "step": step, "runs": model}
        doc["models"][stream] = {"results": 5, "throughput_per_s": rate, "p99_ms": 10.0 + rate,
                                 "mean_batch_size": 2.0, "queue_depth": 1, "lag": 2, "served_total": 7}
    return doc


def test_step_of_reads_the_state_entry_not_the_name():
    state = pipeline_heartbeat("w0", T0)["state"]
    assert step_of(state, "digits-routing/second") == {"pipeline": "digits-routing", "step": "second",
                                                       "runs": "digits-linear"}
    assert step_of(state, "digits") is None
    # a slash alone does not make a step (a repository model may be named so)
    assert step_of({"models": {"team/ranker": {"paused": False}}}, "team/ranker") is None


@pytest.mark.parametrize("states, expected", [
    (["paused", "paused"], "paused"),
    (["running", "running"], "running"),
    (["paused", "running"], PARTLY_PAUSED),
    ([PARTLY_PAUSED, "paused"], PARTLY_PAUSED),
    (["draining", "draining"], "draining"),
    (["running", "draining"], "mixed"),
    ([], "running"),
])
def test_pipeline_state_is_paused_only_when_every_step_is(states, expected):
    assert pipeline_state(states) == expected


def test_steps_are_grouped_under_their_pipeline_not_listed_as_models():
    s = ConsoleState()
    s.observe_status(pipeline_heartbeat("w0", T0, throughput=(3.0, 1.0)))
    s.observe_status(pipeline_heartbeat("w1", T0, throughput=(5.0, 2.0)))
    assert list(s.models_view(T0)) == ["digits"]
    view = s.pipelines_view(T0)
    assert list(view) == ["digits-routing"]
    steps = view["digits-routing"]["steps"]
    assert [(st["step"], st["stream"], st["runs"]) for st in steps] == [
        ("first", "digits-routing/first", "digits"), ("second", "digits-routing/second", "digits-linear")]
    # each step aggregated over the live workers as a model is
    assert steps[0]["throughput_per_s"] == 8.0 and steps[1]["throughput_per_s"] == 3.0
    assert steps[0]["p99_ms"] == 15.0 and steps[0]["workers"] == 2 and steps[0]["served_total"] == 14
    assert view["digits-routing"]["workers"] == {"w0": "running", "w1": "running"}
    assert view["digits-routing"]["state"] == "running"
    snap = s.snapshot(T0)
    assert snap["pipelines"] == view and list(snap["models"]) == ["digits"]
    # the history stays per stream, so each step has its charts
    assert ("w0", "digits-routing/first") in s.history.keys()


def test_a_paused_pipeline_shows_paused_per_worker_and_on_each_step():
    s = ConsoleState()
    s.observe_status(pipeline_heartbeat("w0", T0))
    s.observe_status(pipeline_heartbeat("w1", T0))
    # the acks of "pause --pipeline digits-routing" carry the new state: w0 has applied it, w1 not yet
    s.observe_status({"schema": "autoglm.status/v1", "kind": "ack", "worker": "w0", "time_ms": T0 + 50,
                      "event_id": "e1", "command": "pause", "status": "ok", "reason": "",
                      "state": pipeline_heartbeat("w0", T0, paused_steps=("first", "second"))["state"]})
    view = s.pipelines_view(T0 + 60)["digits-routing"]
    assert view["workers"] == {"w0": "paused", "w1": "running"}
    assert view["state"] == PARTLY_PAUSED
    row = s.worker_view("w0", T0 + 60)
    assert row["pipelines"] == {"digits-routing": {"steps": {"first": "paused", "second": "paused"},
                                                   "state": "paused"}}
    first = row["models"]["digits-routing/first"]
    assert (first["state"], first["fetching"], first["pipeline"], first["step"], first["runs"]) == (
        "paused", False, "digits-routing", "first", "digits")
    # the model digits on its own topic is another stream: still running
    assert row["models"]["digits"]["state"] == "running" and "pipeline" not in row["models"]["digits"]
    s.observe_status(pipeline_heartbeat("w1", T0 + 1000, paused_steps=("first", "second")))
    assert s.pipelines_view(T0 + 1000)["digits-routing"]["state"] == "paused"
    # one step resumed on w1: that worker's pipeline is partly paused
    s.observe_status(pipeline_heartbeat("w1", T0 + 2000, paused_steps=("second",)))
    assert s.pipelines_view(T0 + 2000)["digits-routing"]["workers"]["w1"] == PARTLY_PAUSED
    assert s.worker_view("w1", T0 + 2000)["pipelines"]["digits-routing"]["steps"] == {
        "first": "running", "second": "paused"}


def test_a_stale_worker_leaves_the_pipeline_view():
    s = ConsoleState()
    s.observe_status(pipeline_heartbeat("w0", T0))
    s.observe_status(pipeline_heartbeat("old", T0 - 60_000, paused_steps=("first", "second")))
    view = s.pipelines_view(T0)["digits-routing"]
    assert view["workers"] == {"w0": "running"} and view["steps"][0]["workers"] == 1


def test_a_pipeline_command_expects_every_live_worker():
    """Every worker acknowledges a pipeline target (one that serves none of it says so in its reason)."""
    s = ConsoleState()
    s.observe_status(pipeline_heartbeat("w0", T0))
    s.observe_status(heartbeat("w1", T0))  # serves no pipeline
    pending = s.command_sent(event_id="e", command="pause", target={"pipeline": "digits-routing"}, params={},
                             issued_ms=T0, now_ms=T0, timeout_s=5.0)
    assert pending.expected == ["w0", "w1"]
    assert pending.view(T0)["target"] == {"pipeline": "digits-routing"}


def test_an_older_heartbeat_read_after_an_ack_does_not_undo_its_state():
    """The status topic may hold a heartbeat stamped before an ack after that ack (two sends of one
    worker interleaving): the worker's control state is the newest by time_ms."""
    s = ConsoleState()
    s.observe_status(pipeline_heartbeat("w0", T0))
    s.observe_status({"schema": "autoglm.status/v1", "kind": "ack", "worker": "w0", "time_ms": T0 + 500,
                      "event_id": "e1", "command": "pause", "status": "ok", "reason": "",
                      "state": pipeline_heartbeat("w0", T0, paused_steps=("first", "second"))["state"]})
    s.observe_status(pipeline_heartbeat("w0", T0 + 400, throughput=(9.0, 9.0)))  # built before the ack
    row = s.worker_view("w0", T0 + 600)
    assert row["pipelines"]["digits-routing"]["state"] == "paused"
    assert row["models"]["digits-routing/first"]["throughput_per_s"] == 9.0  # its figures are still the newest
    s.observe_status(pipeline_heartbeat("w0", T0 + 1500))  # after the ack: its state wins again
    assert s.worker_view("w0", T0 + 1600)["pipelines"]["digits-routing"]["state"] == "running"
