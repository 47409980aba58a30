"""The pure DAG logic: order, latency split, routing, gathering inputs, joins, results."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm.processors.dag import Condition, Pipeline, Ref, Step, StepError, heaviest_path, split_latency, \
    topological_order
from autoglm.processors.joins import JoinBuffer
from autoglm.processors.routing import TaskState, assemble_result, condition_holds, decide, gather_inputs

PROBS = Ref("a", "probabilities", "a.outputs.probabilities")


def test_topological_order_and_a_cycle_as_a_closed_walk():
    assert topological_order({"c": ["a", "b"], "b": ["a"], "a": []}) == (["a", "b", "c"], [])
    order, cycle = topological_order({"a": [], "b": ["a", "d"], "c": ["b"], "d": ["c"]})
    assert order == ["a"] and cycle == ["b", "d", "c", "b"]


def test_split_latency_is_proportional_along_the_heaviest_path_through_each_step():
    #   a(1) -> b(3) -> d(1);  a -> c(1) -> d
    deps = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}
    weights = {"a": 1.0, "b": 3.0, "c": 1.0, "d": 1.0}
    split = split_latency(["a", "b", "c", "d"], deps, weights, 1.0)
    assert split == pytest.approx({"a": 0.2, "b": 0.6, "c": 1 / 3, "d": 0.2})  # c: 1 / W(c) = 1 / 3
    worst, path = heaviest_path(["a", "b", "c", "d"], deps, split)
    assert worst == pytest.approx(1.0) and path == ["a", "b", "d"]  # the critical path uses the whole target
    assert split["a"] + split["c"] + split["d"] < 1.0


def state(**outputs) -> TaskState:
    return TaskState("t1", np.zeros((2, 64), np.float32), {"label": "7", "tier": "gold"},
                     outputs={k: v for k, v in outputs.items()})


@pytest.mark.parametrize("cond, expected", [
    (Condition("<", 0.9, ref=PROBS, func="max"), True),      # row 1 has max 0.6: any row routes the task
    (Condition("<", 0.5, ref=PROBS, func="max"), False),
    (Condition("==", 1.0, ref=PROBS, func="argmax"), True),  # row 0's argmax
    (Condition(">=", 0.99, ref=PROBS, func="sum"), True),
    (Condition("==", "7", attribute="label"), True),
    (Condition(">", 5.0, attribute="label"), True),          # a number-like attribute compares as a number
    (Condition(">", 5.0, attribute="tier"), False),          # not a number
    (Condition("==", "x", attribute="missing"), False),
])
def test_conditions(cond, expected):
    probs = np.array([[0.05, 0.95, 0.0], [0.6, 0.2, 0.2]], np.float32)
    assert condition_holds(cond, state(a={"probabilities": probs})) is expected


def test_decide_skips_after_a_skipped_step_and_fails_after_a_failed_one():
    step = Step("b", "m", (PROBS,), when=(Condition("<", 0.9, ref=PROBS, func="max", text="max(...) < 0.9"),))
    low = state(a={"probabilities": np.array([[0.5, 0.5]], np.float32)})
    high = state(a={"probabilities": np.array([[0.99, 0.01]], np.float32)})
    assert decide(step, low) is None
    assert decide(step, high).startswith("skipped: when")
    skipped = state()
    skipped.skipped["a"] = "skipped: ..."
    assert decide(step, skipped) == "skipped: step 'a' was skipped"
    failed = state()
    failed.errors["a"] = StepError("inference", "boom")
    assert decide(step, failed) == StepError("upstream_failed", "step 'b' not run: step 'a' failed")


def test_gather_inputs_renames_by_tensor_map_and_feeds_one_input_by_position():
    a, b = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    s = state(x={"y": a}, z={"y": b})
    two = Step("c", "pair", (Ref("x", "y", "x.outputs.y"), Ref("z", None, "z.outputs")),
               tensor_map={"x.outputs.y": "left", "z.outputs.y": "right"})
    got = gather_inputs(two, s, ["left", "right"])
    assert got["left"] is a and got["right"] is b
    one = Step("c", "m", (Ref(None, None, "input"),))
    assert gather_inputs(one, s, ["image"]) is s.inputs
    named = TaskState("t", {"image": a, "mask": b})
    assert gather_inputs(Step("c", "m", (Ref(None, "mask", "input.mask"),)), named, ["m"]) is b


def test_join_buffer_completes_expires_and_names_the_missing_sources():
    join = JoinBuffer(["input", "a", "b"], window_s=1.0)
    assert join.offer("t1", "a", 1, now_s=10.0) is None
    assert join.offer("t1", "a", 2, now_s=10.2) is None            # a duplicate replaces
    assert join.offer("t1", "input", 0, now_s=10.3) is None
    assert join.offer("t1", "b", 3, now_s=10.5) == {"input": 0, "a": 2, "b": 3}
    assert len(join) == 0
    join.offer("t2", "b", 1, now_s=20.0)
    join.offer("t3", "a", 1, now_s=20.5)
    assert join.next_deadline_s() == 21.0
    assert join.expire(20.9) == []
    (timeout,) = join.expire(21.0)
    assert (timeout.task_id, timeout.present, timeout.missing) == ("t2", ("b",), ("a", "input"))
    err = timeout.error("c")
    assert err.code == "join_timeout" and "no a, input within the join window" in err.message
    assert len(join) == 1
    with pytest.raises(KeyError):
        join.offer("t4", "nope", 1, now_s=0.0)


def test_assemble_result_leaves_skipped_steps_out_and_reports_the_failed_step():
    pipeline = Pipeline("p", None, (), {"a.probabilities": PROBS, "b.y": Ref("b", "y", "b.outputs.y")})
    probs = np.ones((1, 3), np.float32)
    s = state(a={"probabilities": probs})
    s.skipped["b"] = "skipped: when ..."
    result = assemble_result(pipeline, s)
    assert result.status == "ok" and list(result.outputs) == ["a.probabilities"] and result.skipped == {"b": "skipped: when ..."}
    s.errors["b"] = StepError("input_signature", "bad")
    s.errors["c"] = StepError("upstream_failed", "c not run")
    result = assemble_result(pipeline, s)
    assert result.status == "error" and result.error == {"code": "input_signature", "message": "step 'b': bad"}
    assert result.attributes == {"label": "7", "tier": "gold"}
