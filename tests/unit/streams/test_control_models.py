"""The control plane runs load/unload/reload through its ``model_command`` hook and acks afterwards (no broker)."""

from __future__ import annotations

import asyncio

import orjson

from autoglm.processors.control import ControlState
from autoglm.streams.control import ControlPlane
from autoglm.streams.events import ControlEvent, encode_control
from autoglm.streams.topics import TopicNames


def plane(model_command=None):
    state = ControlState("w1", ("digits",))
    state.ready = True
    sent: list[dict] = []

    async def produce(topic, key, value):
        sent.append(orjson.loads(value))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    cp = ControlPlane(bootstrap_servers="unused:1", names=TopicNames("t"), state=state, produce=produce,
                      configure=lambda m, p: None, drain=None, figures=lambda *a, **k: {},
                      model_command=model_command)
    return cp, state, sent


async def settle(done):
    """Let the plane's background acks run (no clock: bounded event-loop turns)."""
    for _ in range(200):
        if done():
            break
        await asyncio.sleep(0)
    for _ in range(20):  # and a few more turns, so that an ack that should not come would have come
        await asyncio.sleep(0)


def ev(command, model, i):
    return encode_control(ControlEvent(f"e{i}", command, {"model": model}, issued_ms=i))


async def test_load_is_acknowledged_after_the_hook_ran_with_its_figures():
    calls = []

    async def hook(command, model):
        calls.append((command, model))
        return {"sha256": "abc", "mtime_ms": 1}

    cp, state, sent = plane(hook)
    cp.handle(ev("load", "tiny", 1), replay=False)
    await settle(lambda: sent)
    assert calls == [("load", "tiny")]
    (ack,) = sent
    assert (ack["kind"], ack["command"], ack["status"]) == ("ack", "load", "ok")
    assert ack["models"] == {"tiny": {"sha256": "abc", "mtime_ms": 1}}
    assert ack["state"]["models"]["tiny"]["fetching"] is True


async def test_a_failing_reload_is_acknowledged_as_error_with_the_reason_and_keeps_the_model():
    async def hook(command, model):
        raise ValueError("model.yaml: key 'outputs[0].shape': expected float32 (1, 5)")

    cp, state, sent = plane(hook)
    cp.handle(ev("reload", "digits", 1), replay=False)
    await settle(lambda: sent)
    (ack,) = sent
    assert ack["status"] == "error" and "reload digits: model.yaml: key 'outputs[0].shape'" in ack["reason"]
    assert state.is_loaded("digits") and not state.is_paused("digits")


async def test_without_a_hook_the_commands_are_rejected_and_the_state_is_undone():
    cp, state, sent = plane(None)
    cp.handle(ev("unload", "digits", 1), replay=False)
    await settle(lambda: sent)
    (ack,) = sent
    assert ack["status"] == "rejected" and "cannot load or unload models at run time" in ack["reason"]
    assert state.is_loaded("digits") and not state.is_paused("digits")


async def test_replayed_loads_run_the_hook_but_are_not_acknowledged():
    calls = []

    async def hook(command, model):
        calls.append((command, model))
        return {}

    cp, state, sent = plane(hook)
    cp.handle(ev("load", "tiny", 1), replay=True)
    await settle(lambda: calls)
    assert calls == [("load", "tiny")] and sent == []
