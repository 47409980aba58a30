"""Pipeline steps as streams of the data path (streams/hops.py): hops, routing, results, commits.

No broker: the pipeline's ``produce``/``ack`` are the fakes of ``test_pipeline``; records produced to an
intermediate topic are fed back as the next step's consumer would read them.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from autoglm.processors.batching import FixedBatchPolicy
from autoglm.processors.control import ControlState, Stream, control_key
from autoglm.processors.dag import Condition, Pipeline, Ref, Step
from autoglm.streams.events import ControlEvent, Hop, decode_hop, encode_hop
from autoglm.streams.hops import stages_of
from autoglm.streams.pipeline import DLQ_HEADER_CODE, TaskPipeline
from autoglm.streams.topics import TopicNames
from autoglm.processors.routing import TaskState, advance, carried

from .test_pipeline import DLQ, RESULTS, FakeBroker, FakeRunner, _fresh_tokens, feed, raw_task, rows, settle, \
    task_bytes  # noqa: F401

INPUT = Ref(None, None, "input")
DOUBLED = Ref("double", "y", "double.outputs.y")
IN_TOPIC = "t.pipelines.p.in"
AGAIN_TOPIC = "t.pipelines.p.again"


def toy_pipeline(first_when: tuple = ()) -> Pipeline:
    """double (x2) -> again (x2 of double's output), ``again`` only when a row of double's output has max > 10."""
    return Pipeline(
        name="p", input_topic=None,
        steps=(Step("double", "toy", (INPUT,), when=first_when),
               Step("again", "toy", (DOUBLED,), when=(Condition(">", 10.0, ref=DOUBLED, func="max",
                                                                text="max(double.outputs.y) > 10"),))),
        outputs={"first": DOUBLED, "second": Ref("again", "y", "again.outputs.y")},
    )


def make(broker: FakeBroker, pipeline: Pipeline | None = None) -> tuple[TaskPipeline, dict]:
    pipeline = pipeline or toy_pipeline()
    stages = {st.name: st for st in stages_of(pipeline, TopicNames("t"), {"toy": (("x",), ("y",))})}
    runners = {name: FakeRunner() for name in stages}
    tp = TaskPipeline(
        names=TopicNames("t", streams={name: st.topic for name, st in stages.items()}), worker_id="w-test",
        runners=runners, policies={name: FixedBatchPolicy(max_batch_size=4, max_wait_s=0.0) for name in stages},
        produce=broker.produce, ack=broker.ack, max_in_flight=100, clock=lambda: 100.0, stages=stages,
    )
    tp.start()
    return tp, runners


async def finish(tp: TaskPipeline) -> None:
    await tp.stop(timeout_s=5.0)


def test_stage_topics_and_streams():
    stages = stages_of(toy_pipeline(), TopicNames("t"), {"toy": (("x",), ("y",))})
    assert [(s.name, s.topic) for s in stages] == [("p/double", IN_TOPIC), ("p/again", AGAIN_TOPIC)]
    assert stages[1].stream == Stream("toy", "p", "again")


async def test_a_task_runs_both_steps_through_a_hop_and_its_result_names_the_pipeline_and_steps():
    broker = FakeBroker()
    tp, runners = make(broker)
    await feed(tp, IN_TOPIC, 0, 0, b"k1", task_bytes("big", rows(1), attributes={"a": "1"}), "in0")
    await settle()
    (hop_record,) = broker.on(AGAIN_TOPIC)
    assert hop_record.key == b"big" and broker.on(RESULTS) == []
    assert broker.acked == ["in0"]  # the input offset is committed once the hop is acknowledged
    hop = decode_hop(hop_record.value)
    assert hop.step == "again" and hop.pipeline == "p" and hop.model == "toy"
    assert hop.state.inputs is None  # no later step reads the input: it does not travel
    np.testing.assert_array_equal(hop.state.outputs["double"]["y"], rows(1) * 2)
    assert [s["step"] for s in hop.steps] == ["double"] and hop.steps[0]["worker"] == "w-test"

    await feed(tp, AGAIN_TOPIC, 0, 0, hop_record.key, hop_record.value, "hop0")
    await finish(tp)
    result = broker.results_by_id()["big"]
    assert result.status == "ok" and result.pipeline == "p" and result.model == "toy"
    np.testing.assert_array_equal(result.outputs["first"], rows(1) * 2)
    np.testing.assert_array_equal(result.outputs["second"], rows(1) * 4)
    assert [s["step"] for s in result.steps] == ["double", "again"] and result.skipped == {}
    assert result.attributes == {"a": "1"}
    assert result.inference_ms == pytest.approx(sum(s["inference_ms"] for s in result.steps))
    assert broker.acked == ["in0", "hop0"]
    assert runners["p/double"].batch_sizes == [1] and runners["p/again"].batch_sizes == [1]


async def test_a_step_whose_when_does_not_hold_costs_no_hop_and_is_named_in_skipped():
    broker = FakeBroker()
    tp, runners = make(broker)
    await feed(tp, IN_TOPIC, 0, 0, b"s", task_bytes("small", rows(0)), "in0")  # doubled max 6: not > 10
    await finish(tp)
    assert broker.on(AGAIN_TOPIC) == []
    result = broker.results_by_id()["small"]
    assert result.status == "ok" and list(result.outputs) == ["first"]
    assert result.skipped == {"again": "skipped: when 'max(double.outputs.y) > 10' does not hold"}
    assert runners["p/again"].batch_sizes == [] and broker.acked == ["in0"]


async def test_a_first_step_skipped_on_an_attribute_goes_straight_on_without_the_model():
    gold = (Condition("==", "gold", attribute="tier", text='attributes.tier == "gold"'),)
    pipeline = Pipeline(name="p", input_topic=None,
                        steps=(Step("double", "toy", (INPUT,), when=gold), Step("again", "toy", (INPUT,))),
                        outputs={"first": DOUBLED, "second": Ref("again", "y", "again.outputs.y")})
    broker = FakeBroker()
    tp, runners = make(broker, pipeline)
    await feed(tp, IN_TOPIC, 0, 0, b"x", task_bytes("plain", rows(2), attributes={"tier": "bronze"}), "in0")
    await settle()
    (hop_record,) = broker.on(AGAIN_TOPIC)
    hop = decode_hop(hop_record.value)
    np.testing.assert_array_equal(hop.state.inputs, rows(2))  # `again` reads the input: it travels
    assert hop.state.skipped == {"double": "skipped: when 'attributes.tier == \"gold\"' does not hold"}
    assert hop.steps == [] and runners["p/double"].batch_sizes == []
    await feed(tp, AGAIN_TOPIC, 0, 0, hop_record.key, hop_record.value, "hop0")
    await finish(tp)
    result = broker.results_by_id()["plain"]
    assert list(result.outputs) == ["second"] and "double" in result.skipped
    np.testing.assert_array_equal(result.outputs["second"], rows(2) * 2)


async def test_offsets_are_committed_only_after_the_hop_is_acknowledged():
    broker = FakeBroker(auto_ack=False)
    tp, _ = make(broker)
    await feed(tp, IN_TOPIC, 0, 0, b"k", task_bytes("big", rows(1)), "in0")
    await settle()
    (hop_record,) = broker.on(AGAIN_TOPIC)
    assert broker.acked == [] and tp.in_flight == 1
    hop_record.ack.set_result(None)
    await settle()
    assert broker.acked == ["in0"] and tp.in_flight == 0
    await finish(tp)


async def test_bad_input_on_the_pipeline_topic_is_dead_lettered_and_the_rest_is_served():
    broker = FakeBroker()
    tp, _ = make(broker)
    await feed(tp, IN_TOPIC, 0, 0, b"bad", raw_task(id="bad", inputs=[[1, 2, 3]]), "in0")  # 3 columns, not 4
    await feed(tp, IN_TOPIC, 0, 1, b"nan", raw_task(id="nan", inputs={"dtype": "float32", "shape": [1, 4],
                                                                       "data": "AADAfwAAAAAAAAAAAAAAAA=="}), "in1")
    await feed(tp, IN_TOPIC, 0, 2, b"ok", task_bytes("ok", rows(0)), "in2")
    await finish(tp)
    results = broker.results_by_id()
    assert results["bad"].status == "rejected" and results["bad"].error.code == "input_signature"
    assert results["nan"].status == "rejected" and results["nan"].error.code == "invalid_tensor"
    assert results["ok"].status == "ok"
    assert sorted(d.header_map[DLQ_HEADER_CODE] for d in broker.on(DLQ)) == [b"input_signature", b"invalid_tensor"]
    assert broker.acked == ["in0", "in1", "in2"]


async def test_a_hop_the_next_model_refuses_becomes_an_error_result_naming_the_step():
    broker = FakeBroker()
    tp, _ = make(broker)
    state = TaskState("odd", None, {}, outputs={"double": {"y": np.zeros((1, 3), np.float32) + 20}})
    hop = Hop(state, "toy", "p", "again", created_ms=1)
    await feed(tp, AGAIN_TOPIC, 0, 0, b"odd", encode_hop(hop), "hop0")
    await finish(tp)
    result = broker.results_by_id()["odd"]
    assert result.status == "error" and result.error.code == "input_signature"
    assert result.error.message.startswith("step 'again': ") and result.pipeline == "p"
    assert broker.on(DLQ) == [] and broker.acked == ["hop0"]


async def test_a_malformed_hop_is_dead_lettered():
    broker = FakeBroker()
    tp, _ = make(broker)
    other = encode_hop(Hop(TaskState("x", None, {}), "toy", "q", "again", created_ms=1))
    await feed(tp, AGAIN_TOPIC, 0, 0, b"x", other, "hop0")
    await feed(tp, AGAIN_TOPIC, 0, 1, b"y", b'{"schema": "autoglm.hop/v2", "id": "y"}', "hop1")
    await finish(tp)
    codes = sorted(d.header_map[DLQ_HEADER_CODE] for d in broker.on(DLQ))
    assert codes == [b"invalid_field", b"schema"]
    assert broker.acked == ["hop0", "hop1"]


def test_hop_codec_round_trip_and_what_travels():
    state = TaskState("t", ["a text"], {"k": "v"}, outputs={"a": {"e": np.ones((1, 3), np.float32)},
                                                            "b": {"l": np.arange(2, dtype=np.int64)}},
                      skipped={"c": "skipped: ..."})
    hop = Hop(state, "m", "p", "d", priority=3, deadline_ms=5, created_ms=7, reply_to="r", steps=[{"step": "a"}])
    back = decode_hop(encode_hop(hop))
    assert (back.model, back.pipeline, back.step, back.priority, back.deadline_ms, back.created_ms, back.reply_to) == \
        ("m", "p", "d", 3, 5, 7, "r")
    assert back.state.inputs == ["a text"] and back.state.attributes == {"k": "v"} and back.steps == [{"step": "a"}]
    assert back.state.outputs["b"]["l"].dtype == np.int64 and back.state.skipped == {"c": "skipped: ..."}
    lean = decode_hop(encode_hop(hop, inputs=False, outputs={"b"}))
    assert lean.state.inputs is None and list(lean.state.outputs) == ["b"]
    assert "a" not in orjson.loads(encode_hop(hop, inputs=False, outputs={"b"}))["outputs"]


def test_carried_keeps_what_later_steps_and_the_result_read():
    # a -> b (reads a) -> c (reads input, when on b); result: c only
    a_out, b_out = Ref("a", "y", "a.outputs.y"), Ref("b", "y", "b.outputs.y")
    pipeline = Pipeline("p", None, (Step("a", "m", (INPUT,)), Step("b", "m", (a_out,)),
                                    Step("c", "m", (INPUT,), when=(Condition(">", 0.0, ref=b_out, func="max"),))),
                        {"out": Ref("c", "y", "c.outputs.y")})
    got = carried(pipeline)
    assert [(c.inputs, sorted(c.outputs)) for c in got] == [(True, ["a", "b", "c"]), (True, ["a", "b", "c"]),
                                                            (True, ["b", "c"])]
    state = TaskState("t", None, {}, outputs={"a": {"y": np.zeros((1, 1))}, "b": {"y": np.zeros((1, 1))}})
    assert advance(pipeline, state, 2) is None and "c" in state.skipped  # max(b) > 0 is false: c is skipped
    state2 = TaskState("t", None, {}, outputs={"a": {"y": np.zeros((1, 1))}, "b": {"y": np.ones((1, 1))}})
    assert advance(pipeline, state2, 2) == 2


def test_control_targets_select_pipeline_streams():
    streams = {"p/first": Stream("digits", "p", "first"), "p/second": Stream("digits-linear", "p", "second"),
               "q/first": Stream("digits", "q", "first")}
    state = ControlState("w", ["digits", *streams], streams=streams)
    state.ready = True

    def apply(command: str, issued_ms: int, **target: str) -> tuple[str, ...]:
        return state.apply(ControlEvent(f"e{issued_ms}", command, target, {}, issued_ms)).models

    assert apply("pause", 1, pipeline="p") == ("p/first", "p/second")
    assert [m for m in state.models if state.is_paused(m)] == ["p/first", "p/second"]
    assert apply("resume", 2, pipeline="p", step="second") == ("p/second",)
    assert apply("pause", 3, model="digits") == ("digits", "p/first", "q/first")  # its own topic and every step
    assert apply("resume", 4, model="q/first") == ("q/first",)
    assert state.is_paused("p/first") and not state.is_paused("q/first") and not state.is_paused("p/second")
    assert state.snapshot()["models"]["p/second"]["runs"] == "digits-linear"
    refused = state.apply(ControlEvent("e5", "unload", {"model": "p/first"}, {}, 5))
    assert refused.status == "rejected" and "pipeline step" in refused.reason
    assert control_key("pause", {"pipeline": "p"}) == "run/*/*@p"
    assert control_key("pause", {"pipeline": "p", "step": "s", "model": "m"}) == "run/*/m@p.s"
    assert control_key("pause", {"model": "m"}) == "run/*/m"


async def test_a_pipeline_task_whose_reply_to_is_checked_first_is_served_and_answered_there():
    from .test_pipeline import Topics

    async def exists(topic: str) -> bool:
        return topic == "mine"

    broker = FakeBroker()
    pipeline = toy_pipeline()
    stages = {st.name: st for st in stages_of(pipeline, TopicNames("t"), {"toy": (("x",), ("y",))})}
    tp = TaskPipeline(
        names=TopicNames("t", streams={name: st.topic for name, st in stages.items()}), worker_id="w",
        runners={name: FakeRunner() for name in stages},
        policies={name: FixedBatchPolicy(max_batch_size=4, max_wait_s=0.0) for name in stages},
        produce=broker.produce, ack=broker.ack, max_in_flight=100, clock=lambda: 100.0, stages=stages,
        topics=Topics(exists),
    )
    tp.start()
    await feed(tp, IN_TOPIC, 0, 0, b"a", task_bytes("a", rows(0), reply_to="mine"), "in0")
    await feed(tp, IN_TOPIC, 0, 1, b"b", task_bytes("b", rows(0), reply_to="nowhere"), "in1")
    await finish(tp)
    assert broker.results_by_id("mine")["a"].status == "ok"
    assert broker.results_by_id()["b"].status == "rejected" and broker.acked == ["in0", "in1"]


async def test_a_task_past_its_deadline_at_a_step_gets_an_expired_pipeline_result():
    broker = FakeBroker()
    tp, runners = make(broker)
    hop = Hop(TaskState("late", None, {}, outputs={"double": {"y": rows(1) * 2}}), "toy", "p", "again",
              deadline_ms=1, created_ms=1, steps=[{"step": "double", "batch_size": 1, "queue_ms": 1.0,
                                                   "inference_ms": 2.0}])
    await feed(tp, AGAIN_TOPIC, 0, 0, b"late", encode_hop(hop), "hop0")
    await finish(tp)
    result = broker.results_by_id()["late"]
    assert result.status == "expired" and result.error.code == "deadline" and "step 'again'" in result.error.message
    assert result.pipeline == "p" and [s["step"] for s in result.steps] == ["double"]
    assert runners["p/again"].batch_sizes == [] and broker.acked == ["hop0"]


async def test_a_step_that_outputs_nan_gives_that_task_an_error_and_the_rest_of_its_batch_results():
    class NanRunner(FakeRunner):
        async def run(self, items):
            outs = await super().run(items)
            return [np.full_like(o, np.nan) if o[0, 0] == 2000 else o for o in outs]

    broker = FakeBroker()
    tp, runners = make(broker)
    tp.runners["p/double"] = NanRunner()
    await feed(tp, IN_TOPIC, 0, 0, b"a", task_bytes("a", rows(0)), "in0")
    await feed(tp, IN_TOPIC, 0, 1, b"b", task_bytes("b", rows(0) + 1000), "in1")  # doubled: 2000 -> NaN
    await finish(tp)
    results = broker.results_by_id()
    assert results["a"].status == "ok"
    assert results["b"].status == "error" and results["b"].error.code == "invalid_output"
    assert "step 'double'" in results["b"].error.message and broker.acked == ["in0", "in1"]


def test_the_batch_encoder_of_pipeline_results_decodes_as_encode_result():
    import dataclasses

    from autoglm.streams.events import Result, decode_result, encode_result
    from autoglm.streams.results import PipelineResultEncoder

    result = Result(id="t", model="pipeline:p", status="ok", worker="w", batch_size=7, queue_ms=1.23456,
                    inference_ms=2.5, end_to_end_ms=9.0, attributes={"k": "v"}, pipeline="p",
                    outputs={"a.y": np.arange(6, dtype=np.float32).reshape(2, 3), "b.z": np.array([3], np.int64),
                             "c": np.arange(2, dtype=">f8")},
                    steps=({"step": "a", "model": "m", "worker": "w", "batch_size": 7, "queue_ms": 1.0,
                            "inference_ms": 2.5},), skipped={"d": "skipped: ..."})
    fast = decode_result(PipelineResultEncoder("p", "w", 7).encode(result))
    plain = decode_result(encode_result(result))
    for f in dataclasses.fields(Result):
        got, want = getattr(fast, f.name), getattr(plain, f.name)
        if f.name == "outputs":
            assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype
                                                   for k in got)
        else:
            assert got == want, f.name


@pytest.mark.parametrize("command, target, message", [
    ("pause", {"step": "s"}, "give --pipeline too"),
    ("drain", {"pipeline": "p"}, "drain applies to whole workers"),
    ("drain", {"model": "digits"}, "drain applies to whole workers"),
    ("unload", {"model": "digits", "pipeline": "p"}, "not to a pipeline"),
])
async def test_the_control_client_refuses_targets_that_mean_something_else_before_publishing(command, target, message):
    from autoglm.streams.control import ControlClient

    client = ControlClient(["127.0.0.1:9"], prefix="x")  # never started: nothing can be published
    with pytest.raises(ValueError, match=message):
        await client.send(command, **target)
