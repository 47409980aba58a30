"""The control-state machine: pause/resume/configure as replayable state, drain/status as live commands."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.processors.control import ControlState, check_configure_params, control_key
from autoglm.streams.events import ControlEvent


# the wire event type itself: the state machine reads its fields (ControlEventLike)
Ev = ControlEvent


def ready_state(models=("digits", "minilm"), worker="w1") -> ControlState:
    state = ControlState(worker, models)
    state.ready = True
    return state


def test_everything_counts_as_paused_until_the_control_topic_is_replayed():
    state = ControlState("w1", ["digits"])
    assert state.is_paused("digits")
    state.ready = True
    assert not state.is_paused("digits")
    assert state.is_paused("not-served") and state.is_paused(None)


def test_pause_one_model_leaves_the_other_fetching():
    state = ready_state()
    d = state.apply(Ev("e1", "pause", {"model": "digits"}, issued_ms=1))
    assert (d.status, d.ack, d.models) == ("ok", True, ("digits",))
    assert state.is_paused("digits") and not state.is_paused("minilm")


def test_a_later_global_command_overrides_earlier_per_model_ones_and_vice_versa():
    state = ready_state()
    state.apply(Ev("e1", "pause", issued_ms=1))
    state.apply(Ev("e2", "resume", {"model": "minilm"}, issued_ms=2))
    assert state.is_paused("digits") and not state.is_paused("minilm")
    state.apply(Ev("e3", "pause", issued_ms=3))
    assert state.is_paused("minilm")
    state.apply(Ev("e4", "resume", issued_ms=4))
    assert not state.is_paused("digits") and not state.is_paused("minilm")


def test_events_for_another_worker_are_neither_applied_nor_acknowledged():
    state = ready_state()
    d = state.apply(Ev("e1", "pause", {"worker": "w2"}, issued_ms=1))
    assert (d.status, d.ack) == ("ignored", False)
    assert not state.is_paused("digits")
    d = state.apply(Ev("e2", "pause", {"worker": "w1"}, issued_ms=2))
    assert d.status == "ok" and state.is_paused("digits")


def test_a_model_not_served_changes_nothing_but_is_acknowledged():
    state = ready_state()
    d = state.apply(Ev("e1", "pause", {"model": "resnet"}, issued_ms=1))
    assert (d.status, d.ack, d.models) == ("ok", True, ())
    assert "not served" in d.reason
    assert not state.is_paused("digits") and not state.is_paused("minilm")


def test_replayed_event_id_is_ignored():
    state = ready_state()
    state.apply(Ev("e1", "pause", issued_ms=1))
    state.apply(Ev("e2", "resume", issued_ms=2))
    d = state.apply(Ev("e1", "pause", issued_ms=1))
    assert d.status == "ignored" and "already applied" in d.reason
    assert not state.is_paused("digits")


def test_stale_state_event_with_a_new_id_is_ignored():
    """An old signed event re-published after compaction dropped the original: older issued_ms, same key."""
    state = ready_state()
    state.apply(Ev("b", "resume", issued_ms=2_000))
    d = state.apply(Ev("a", "pause", issued_ms=1_000))
    assert d.status == "ignored" and "stale" in d.reason
    assert not state.is_paused("digits")


def test_live_commands_are_skipped_on_replay_and_state_commands_are_not_acknowledged():
    state = ControlState("w1", ["digits"])
    assert state.apply(Ev("e1", "pause", issued_ms=1), replay=True).ack is False
    d = state.apply(Ev("e2", "drain", issued_ms=2), replay=True)
    assert (d.status, d.drain) == ("ignored", False)
    assert state.apply(Ev("e3", "status"), replay=True).report is False
    state.ready = True
    assert state.is_paused("digits") and not state.draining


def test_drain_stops_fetching_everything_until_a_global_resume():
    state = ready_state()
    d = state.apply(Ev("e1", "drain", issued_ms=1))
    assert d.drain and d.ack and state.draining
    assert state.is_paused("digits") and state.is_paused("minilm")
    state.apply(Ev("e2", "resume", {"model": "digits"}, issued_ms=2))
    assert state.is_paused("digits"), "a per-model resume does not end a drain"
    state.apply(Ev("e3", "resume", issued_ms=3))
    assert not state.draining and not state.is_paused("digits")


def test_configure_returns_the_params_per_served_model_and_rejects_bad_ones():
    state = ready_state()
    d = state.apply(Ev("e1", "configure", {"model": "digits"}, {"max_batch_size": 16, "latency_target_s": 0.05}))
    assert d.status == "ok" and dict(d.configure) == {"digits": {"max_batch_size": 16, "latency_target_s": 0.05}}
    d = state.apply(Ev("e2", "configure", {}, {"max_batch": 16}))
    assert d.status == "rejected" and "unknown configure parameter 'max_batch'" in d.reason
    d = state.apply(Ev("e3", "configure", {}, {"max_batch_size": 2.5}))
    assert d.status == "rejected"


@pytest.mark.parametrize("params, message", [
    ({}, "at least one"),
    ({"max_batch_size": True}, "must be int"),
    ({"latency_target_s": float("nan")}, "finite"),
    ({"mode": 3}, "must be str"),
    ({"mode": "bogus"}, "mode must be one of"),
    ({"max_wait_s": 1e9}, "max_wait_s must be between 0 and 60"),
    ({"latency_target_s": 1e12}, "between"),
    ({"max_batch_size": 100_000_000}, "max_batch_size must be between 1 and 65536"),
])
def test_check_configure_params_errors(params, message):
    with pytest.raises(ValueError, match=message):
        check_configure_params(params)


def test_control_keys_group_what_supersedes_what():
    assert control_key("pause", {}) == control_key("resume", {}) == "run/*/*"
    assert control_key("pause", {"model": "digits", "worker": "w1"}) == "run/w1/digits"
    assert control_key("configure", {"model": "m"}, {"max_wait_s": 1, "max_batch_size": 2}) == \
        "configure/*/m/max_batch_size,max_wait_s"
    assert control_key("drain", {"worker": "w9"}) == "drain/w9"


def test_seen_ids_are_bounded():
    state = ControlState("w1", ["digits"], seen_ids_max=3)
    state.ready = True
    for i in range(10):
        state.apply(Ev(f"e{i}", "pause" if i % 2 else "resume", issued_ms=i))
    assert len(state._seen) == 3


_commands = st.sampled_from(["pause", "resume"])
_targets = st.sampled_from([{}, {"model": "digits"}, {"model": "minilm"}])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_commands, _targets), max_size=30))
def test_replaying_only_the_latest_event_per_key_gives_the_same_state(events):
    """What log compaction keeps (the latest record per key, in order) rebuilds the same pause state."""
    evs = [Ev(f"e{i}", cmd, tgt, issued_ms=i) for i, (cmd, tgt) in enumerate(events)]
    full = ready_state()
    for ev in evs:
        full.apply(ev)
    latest = {control_key(ev.command, ev.target, ev.params): i for i, ev in enumerate(evs)}
    compacted = ready_state()
    for i in sorted(latest.values()):
        compacted.apply(evs[i], replay=True)
    for model in ("digits", "minilm"):
        assert compacted.is_paused(model) == full.is_paused(model)
