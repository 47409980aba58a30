"""load / unload / reload as replayable desired state."""

from __future__ import annotations

from autoglm.processors.control import ControlState, control_key
from autoglm.streams.events import ControlEvent as Ev


def ready(models=("digits",)) -> ControlState:
    state = ControlState("w1", models)
    state.ready = True
    return state


def test_load_adds_a_model_that_is_fetched_and_acknowledged_after_the_load():
    state = ready()
    d = state.apply(Ev("e1", "load", {"model": "tiny"}, issued_ms=1))
    assert (d.status, d.load, d.unload, d.reload, d.deferred_ack) == ("ok", ("tiny",), (), (), True)
    assert state.is_loaded("tiny") and not state.is_paused("tiny") and state.generation["tiny"] == 1
    assert state.snapshot()["models"]["tiny"]["loaded"] is True


def test_unload_stops_fetching_and_asks_for_a_drain_then_release():
    state = ready(("digits", "tiny"))
    d = state.apply(Ev("e1", "unload", {"model": "tiny"}, issued_ms=1))
    assert d.unload == ("tiny",) and d.deferred_ack
    assert state.is_paused("tiny") and not state.is_loaded("tiny") and not state.is_paused("digits")
    again = state.apply(Ev("e2", "unload", {"model": "tiny"}, issued_ms=2))
    assert again.unload == () and "not loaded" in again.reason


def test_reload_of_a_served_model_swaps_and_of_an_absent_one_loads():
    state = ready()
    d = state.apply(Ev("e1", "reload", {"model": "digits"}, issued_ms=1))
    assert d.reload == ("digits",) and d.load == () and state.generation["digits"] == 1
    d = state.apply(Ev("e2", "reload", {"model": "tiny"}, issued_ms=2))
    assert d.load == ("tiny",)
    assert state.apply(Ev("e3", "load", {"model": "tiny"}, issued_ms=3)).load == ()  # already loaded


def test_a_worker_that_starts_later_replays_to_the_latest_presence_of_each_model():
    events = [Ev("e1", "load", {"model": "a"}, issued_ms=1), Ev("e2", "load", {"model": "b"}, issued_ms=2),
              Ev("e3", "unload", {"model": "a"}, issued_ms=3), Ev("e4", "reload", {"model": "b"}, issued_ms=4)]
    state = ControlState("w2", ("digits",))
    decisions = [state.apply(e, replay=True) for e in events]
    assert not any(d.ack for d in decisions)
    assert state.is_loaded("b") and not state.is_loaded("a") and state.is_loaded("digits")
    # what the worker had to do while replaying: load a, load b, unload a; the replayed reload is a no-op
    assert [(d.load, d.unload, d.reload) for d in decisions] == [
        (("a",), (), ()), (("b",), (), ()), ((), ("a",), ()), ((), (), ())]


def test_model_commands_share_one_compaction_slot_and_need_a_model():
    assert control_key("load", {"model": "m"}) == control_key("unload", {"model": "m"}) == "model/*/m"
    assert control_key("reload", {"model": "m", "worker": "w1"}) == "model/w1/m"
    d = ready().apply(Ev("e1", "load", {}, issued_ms=1))
    assert d.status == "rejected" and "needs target.model" in d.reason


def test_a_stale_unload_does_not_undo_a_later_load():
    state = ready()
    state.apply(Ev("e2", "load", {"model": "m"}, issued_ms=20))
    d = state.apply(Ev("e1", "unload", {"model": "m"}, issued_ms=10))
    assert d.status == "ignored" and state.is_loaded("m")


def test_a_failed_load_leaves_the_model_unloaded_and_a_failed_unload_leaves_it_serving():
    state = ready()
    state.apply(Ev("e1", "load", {"model": "m"}, issued_ms=1))
    state.model_command_failed("load", "m")
    assert not state.is_loaded("m") and state.is_paused("m")
    state.apply(Ev("e2", "unload", {"model": "digits"}, issued_ms=2))
    assert state.is_paused("digits")
    state.model_command_failed("unload", "digits")
    assert state.is_loaded("digits") and not state.is_paused("digits")
