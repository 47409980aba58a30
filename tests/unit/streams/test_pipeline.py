"""Unit tests of the per-record path (streams/pipeline.py) with fakes: no broker, no model thread.

The pipeline knows Kafka only through ``produce`` and ``ack``; here ``produce``
records what would be produced, one future per record that the test completes
(the broker's acknowledgement), and ``ack`` (a partition's commit position)
records the tokens the test gave the offsets it passed (:func:`feed`).
The clock is a constant and the policy never waits (``max_wait_s=0``), so
nothing sleeps.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import orjson
import pytest

from autoglm.errors import BrokerError, InferenceError, InputSignatureError, ModelError
from autoglm.models.base import InferenceModel, ItemError, ItemOutcome, Signature
from autoglm.processors.batching import FixedBatchPolicy
from autoglm.streams.events import Result, Task, decode_result, encode_task
from autoglm.streams.pipeline import (
    DLQ_HEADER_CODE,
    DLQ_HEADER_MESSAGE,
    DLQ_HEADER_OFFSET,
    DLQ_HEADER_PARTITION,
    DLQ_HEADER_TOPIC,
    TaskPipeline,
)
from autoglm.streams.topics import TopicNames

TOPIC = "t.tasks.toy"
RESULTS = "t.results"
DLQ = "t.dlq"


# -- fakes ----------------------------------------------------------------------------


class ToyModel(InferenceModel):
    """Doubles float32 rows of 4: inputs ``float32 (B, 4)`` -> outputs ``float32 (B, 4)``."""

    name = "toy"
    signature = Signature(input_kind="tensor", input="float32 (B, 4)", output="float32 (B, 4)", output_dim=4)

    def load(self, device: str) -> None:
        self.device = device

    def prepare(self, inputs: Any) -> np.ndarray:
        if not isinstance(inputs, np.ndarray):
            raise InputSignatureError(self.signature.input, f"text x{len(inputs)}")
        if inputs.dtype != np.float32 or inputs.ndim != 2 or inputs.shape[1] != 4:
            raise InputSignatureError(self.signature.input, f"{inputs.dtype} {inputs.shape}")
        return inputs

    def collate(self, items: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(items, axis=0)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return (batch * 2).astype(np.float32)


class FakeRunner:
    """What the pipeline needs of a ModelRunner: ``.model`` and ``async run_isolated(items, timeout_s)``.

    ``run_isolated`` here runs the batch once (no bisection: that is the runner's own tests' business);
    a batch that raises gives every task the error.
    """

    def __init__(self) -> None:
        self.model = ToyModel()
        self.batch_sizes: list[int] = []

    async def run(self, items: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.batch_sizes.append(len(items))
        out = self.model.forward(self.model.collate(items))
        return np.split(out, np.cumsum([len(i) for i in items])[:-1], axis=0)

    async def run_isolated(self, items: Sequence[np.ndarray], *, timeout_s: float | None) -> list[ItemOutcome]:
        try:
            outputs = await self.run(items)
        except ModelError as exc:
            return [ItemOutcome(self.model.name, error=ItemError.of(exc)) for _ in items]
        return [ItemOutcome(self.model.name, output=o) for o in outputs]


@dataclass
class Sent:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    ack: asyncio.Future

    @property
    def header_map(self) -> dict[str, bytes]:
        return dict(self.headers)

    def result(self) -> Result:
        return decode_result(self.value)


@dataclass
class FakeBroker:
    """``send`` records the record; its acknowledgement is a future, completed at once or by the test."""

    auto_ack: bool = True
    sent: list[Sent] = field(default_factory=list)
    acked: list[Any] = field(default_factory=list)
    positions: dict[Any, int] = field(default_factory=dict)

    async def send(self, topic: str, key: bytes | None, value: bytes | None, headers: list) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self.auto_ack:
            fut.set_result(None)
        self.sent.append(Sent(topic, key, value, list(headers), fut))
        return fut

    async def produce(self, records: list) -> None:
        await as_produce(self.send)(records)

    def ack(self, tp: Any, next_offset: int) -> None:
        """The commit position of ``tp`` moved to ``next_offset``: the tokens of the offsets it passed."""
        topic, partition = tp
        start = self.positions.get(tp, min(o for (t, p, o) in TOKENS if (t, p) == (topic, partition)))
        assert next_offset > start, "a commit position never moves back"
        self.acked += [TOKENS[(topic, partition, o)] for o in range(start, next_offset) if (topic, partition, o) in TOKENS]
        self.positions[tp] = next_offset

    def on(self, topic: str) -> list[Sent]:
        return [s for s in self.sent if s.topic == topic]

    def results_by_id(self, topic: str = RESULTS) -> dict[str, Result]:
        return {s.key.decode(): s.result() for s in self.on(topic)}

    def dead_letter_at(self, offset: int) -> Sent:
        (found,) = [s for s in self.on(DLQ) if s.header_map[DLQ_HEADER_OFFSET] == str(offset).encode()]
        return found


#: (topic, partition, offset) -> the token a test gave the record (what FakeBroker.ack reports)
TOKENS: dict[tuple[str, int, int], Any] = {}


@pytest.fixture(autouse=True)
def _fresh_tokens():
    TOKENS.clear()
    yield
    TOKENS.clear()


@dataclass
class Rec:
    """A consumed record as the pipeline reads it (aiokafka's ConsumerRecord has these)."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple = ()


async def feed(pipeline: TaskPipeline, topic: str, partition: int, offset: int, key: bytes | None,
               value: bytes | None, token: Any) -> None:
    """Hand one record to the pipeline as a poll of one record would; ``token`` names it in ``acked``."""
    TOKENS[(topic, partition, offset)] = token
    pipeline.on_records(topic, partition, [Rec(offset, key, value)])  # synchronous: one poll's records


def as_produce(send):
    """A per-record ``send(topic, key, value, headers) -> ack future`` fake as the pipeline's ``produce``."""
    async def produce(records: list) -> None:
        acks = [await send(topic, key, value, headers) for topic, key, value, headers in records]
        await asyncio.gather(*acks)

    return produce


class Topics:
    """A ``reply_to`` checker over an ``async exists(name)`` function, caching its answers."""

    def __init__(self, exists):
        self._exists, self.known = exists, {}

    def cached(self, topic: str) -> bool | None:
        return self.known.get(topic)

    async def exists(self, topic: str) -> bool:
        self.known[topic] = await self._exists(topic)
        return self.known[topic]


async def settle(times: int = 30) -> None:
    """Let every ready task run (``asyncio.sleep(0)`` only yields)."""
    for _ in range(times):
        await asyncio.sleep(0)


def make_pipeline(broker: FakeBroker, *, max_in_flight: int = 100, on_fatal: Any = None) -> tuple[TaskPipeline, FakeRunner]:
    runner = FakeRunner()
    pipeline = TaskPipeline(
        names=TopicNames("t"),
        worker_id="w-test",
        runners={"toy": runner},
        policies={"toy": FixedBatchPolicy(max_batch_size=4, max_wait_s=0.0)},
        produce=broker.produce,
        ack=broker.ack,
        max_in_flight=max_in_flight,
        on_fatal=on_fatal,
        clock=lambda: 100.0,
    )
    pipeline.start()
    return pipeline, runner


def rows(seed: int, n: int = 1) -> np.ndarray:
    return (np.arange(n * 4, dtype=np.float32).reshape(n, 4) + seed * 10).astype(np.float32)


def task_bytes(task_id: str, inputs: Any = None, **extra: Any) -> bytes:
    if inputs is None:
        inputs = rows(0)
    return encode_task(Task(id=task_id, model=extra.pop("model", "toy"), inputs=inputs, **extra))


def raw_task(**doc: Any) -> bytes:
    base = {"schema": "autoglm.task/v1", "id": "x", "model": "toy", "inputs": [[0, 0, 0, 0]]}
    base.update(doc)
    return orjson.dumps(base)


# -- results ----------------------------------------------------------------------------


async def test_valid_tasks_get_ok_results() -> None:
    broker = FakeBroker()
    pipeline, runner = make_pipeline(broker)
    inputs = {"a": rows(1), "b": rows(2, n=2), "c": rows(3)}
    for offset, (task_id, x) in enumerate(inputs.items()):
        await feed(pipeline, TOPIC, 0, offset, task_id.encode(), task_bytes(task_id, x), f"tok{offset}")
    await pipeline.stop()

    assert runner.batch_sizes == [3]
    assert [s.topic for s in broker.sent] == [RESULTS] * 3
    results = broker.results_by_id()
    assert sorted(results) == ["a", "b", "c"]
    for task_id, x in inputs.items():
        r = results[task_id]
        assert (r.id, r.model, r.status, r.error) == (task_id, "toy", "ok", None)
        assert r.outputs.dtype == np.float32
        assert np.array_equal(r.outputs, x * 2)
        assert r.batch_size == 3
        assert r.worker == "w-test"
    assert all(s.headers == [] for s in broker.sent)
    assert broker.acked == ["tok0", "tok1", "tok2"]
    assert pipeline.counters.results_ok == 3 and pipeline.counters.dead_letters == 0
    assert pipeline.limiter.in_flight == 0


async def test_batches_are_capped_at_max_batch_size() -> None:
    broker = FakeBroker()
    pipeline, runner = make_pipeline(broker)
    for offset in range(6):
        await feed(pipeline, TOPIC, 0, offset, None, task_bytes(f"t{offset}", rows(offset)), offset)
    await pipeline.stop()
    assert runner.batch_sizes == [4, 2]
    sizes = {k: r.batch_size for k, r in broker.results_by_id().items()}
    assert sizes == {"t0": 4, "t1": 4, "t2": 4, "t3": 4, "t4": 2, "t5": 2}
    assert broker.acked == list(range(6))


async def test_attributes_pass_through() -> None:
    broker = FakeBroker()
    pipeline, _ = make_pipeline(broker)
    await feed(pipeline, TOPIC, 0, 0, None, task_bytes("a", attributes={"user": "u1"}), 0)
    await pipeline.stop()
    assert broker.results_by_id()["a"].attributes == {"user": "u1"}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
async def test_non_finite_outputs_become_an_error_result() -> None:
    broker = FakeBroker()
    pipeline, _ = make_pipeline(broker)
    huge = np.full((1, 4), 3e38, dtype=np.float32)  # doubled: inf in float32
    await feed(pipeline, TOPIC, 0, 0, None, task_bytes("big", huge), "t0")
    await feed(pipeline, TOPIC, 0, 1, None, task_bytes("fine", rows(1)), "t1")
    await pipeline.stop()
    results = broker.results_by_id()
    assert results["big"].status == "error"
    assert results["big"].outputs is None
    assert results["big"].error.code == "invalid_output"
    assert results["fine"].status == "ok"
    assert broker.acked == ["t0", "t1"]


# -- dead letters ----------------------------------------------------------------------


async def test_malformed_records_are_dead_lettered_and_the_rest_is_served() -> None:
    broker = FakeBroker()
    pipeline, runner = make_pipeline(broker)
    records = [
        (b"k0", task_bytes("a", rows(1))),                                   # ok
        (b"k1", b"{not json"),                                               # decode
        (b"k2", task_bytes("c", np.zeros((1, 3), np.float32))),              # wrong shape
        (None, raw_task(id="d", schema="autoglm.task/v2")),                  # unknown schema
        (b"k4", raw_task(id="e", model="other")),                            # another model's task
        (b"k5", task_bytes("f", rows(5, n=2))),                              # ok
    ]
    for offset, (key, value) in enumerate(records):
        await feed(pipeline, TOPIC, 3, 100 + offset, key, value, 100 + offset)
    await pipeline.stop()

    expected_codes = {101: "decode", 102: "input_signature", 103: "schema", 104: "unknown_model"}
    assert len(broker.on(DLQ)) == len(expected_codes)
    for offset, code in expected_codes.items():
        dead = broker.dead_letter_at(offset)
        key, value = records[offset - 100]
        assert dead.key == key and dead.value == value          # the original bytes, unchanged
        headers = dead.header_map
        assert headers[DLQ_HEADER_CODE] == code.encode()
        assert headers[DLQ_HEADER_TOPIC] == TOPIC.encode()
        assert headers[DLQ_HEADER_PARTITION] == b"3"
        assert headers[DLQ_HEADER_MESSAGE]
    assert b"float32 (B, 4)" in broker.dead_letter_at(102).header_map[DLQ_HEADER_MESSAGE]
    assert b"v2" in broker.dead_letter_at(103).header_map[DLQ_HEADER_MESSAGE]
    assert b"t.tasks.other" in broker.dead_letter_at(104).header_map[DLQ_HEADER_MESSAGE]

    results = broker.results_by_id()
    assert sorted(results) == ["a", "c", "d", "e", "f"]                # no id in the record at 101
    for task_id, code in (("c", "input_signature"), ("d", "schema"), ("e", "unknown_model")):
        assert results[task_id].status == "rejected"
        assert results[task_id].error.code == code
        assert results[task_id].outputs is None
    assert results["e"].model == "other"
    for task_id, x in (("a", rows(1)), ("f", rows(5, n=2))):
        assert results[task_id].status == "ok"
        assert np.array_equal(results[task_id].outputs, x * 2)
        assert results[task_id].batch_size == 2
    assert runner.batch_sizes == [2]
    assert broker.acked == list(range(100, 106))
    assert pipeline.counters.dead_letters == 4 and pipeline.counters.results_ok == 2


async def test_tombstone_and_text_inputs_are_dead_lettered() -> None:
    broker = FakeBroker()
    pipeline, _ = make_pipeline(broker)
    await feed(pipeline, TOPIC, 0, 0, b"k", None, "t0")
    await feed(pipeline, TOPIC, 0, 1, None, raw_task(id="txt", inputs="hello"), "t1")
    await pipeline.stop()
    assert broker.dead_letter_at(0).value is None
    assert broker.dead_letter_at(0).header_map[DLQ_HEADER_CODE] == b"decode"
    assert broker.dead_letter_at(1).header_map[DLQ_HEADER_CODE] == b"input_signature"
    assert list(broker.results_by_id()) == ["txt"]
    assert broker.acked == ["t0", "t1"]


async def test_task_for_a_model_not_served_here() -> None:
    broker = FakeBroker()
    pipeline, _ = make_pipeline(broker)
    await feed(pipeline, "t.tasks.other", 0, 0, None, raw_task(id="o", model="other"), "t0")
    await pipeline.stop()
    dead = broker.dead_letter_at(0)
    assert dead.header_map[DLQ_HEADER_CODE] == b"unknown_model"
    assert dead.header_map[DLQ_HEADER_TOPIC] == b"t.tasks.other"
    assert broker.results_by_id()["o"].status == "rejected"
    assert broker.acked == ["t0"]


# -- commit after produce -----------------------------------------------------------------


async def test_commit_after_produce_in_offset_order() -> None:
    broker = FakeBroker(auto_ack=False)
    pipeline, _ = make_pipeline(broker)
    await feed(pipeline, TOPIC, 0, 0, None, task_bytes("a"), "tok0")
    await feed(pipeline, TOPIC, 0, 1, None, task_bytes("b"), "tok1")
    await feed(pipeline, TOPIC, 0, 2, None, b"garbage", "tok2")
    await settle()

    result_a, result_b = broker.on(RESULTS)
    (dead,) = broker.on(DLQ)
    assert broker.acked == []                     # produced, not acknowledged: nothing committed

    dead.ack.set_result(None)                     # the later offset is acknowledged first
    await settle()
    assert broker.acked == []                     # ... but 0 and 1 are still open

    result_a.ack.set_result(None)
    await settle()
    assert broker.acked == []                     # a batch settles when all of its results are acknowledged

    result_b.ack.set_result(None)
    await settle()
    assert broker.acked == ["tok0", "tok1", "tok2"]
    assert pipeline.limiter.in_flight == 0
    await pipeline.stop()


async def test_dead_letter_commits_after_both_its_records_are_acknowledged() -> None:
    broker = FakeBroker(auto_ack=False)
    pipeline, _ = make_pipeline(broker)
    await feed(pipeline, TOPIC, 0, 7, None, task_bytes("bad", np.zeros((2, 5), np.float32)), "tok7")
    await settle()
    (dead,) = broker.on(DLQ)
    (rejected,) = broker.on(RESULTS)
    assert rejected.result().status == "rejected"
    dead.ack.set_result(None)
    await settle()
    assert broker.acked == []
    rejected.ack.set_result(None)
    await settle()
    assert broker.acked == ["tok7"]
    await pipeline.stop()


async def test_partitions_commit_independently() -> None:
    broker = FakeBroker(auto_ack=False)
    pipeline, _ = make_pipeline(broker)
    await feed(pipeline, TOPIC, 0, 0, None, b"bad-0", "p0-0")
    await feed(pipeline, TOPIC, 1, 0, None, b"bad-1", "p1-0")
    await settle()
    dead0, dead1 = broker.on(DLQ)
    dead1.ack.set_result(None)
    await settle()
    assert broker.acked == ["p1-0"]
    assert pipeline.limiter.in_flight == 1
    dead0.ack.set_result(None)
    await settle()
    assert broker.acked == ["p1-0", "p0-0"]
    await pipeline.stop()


async def test_failed_delivery_is_fatal_and_never_committed() -> None:
    broker = FakeBroker(auto_ack=False)
    fatal: list[BaseException] = []
    pipeline, _ = make_pipeline(broker, on_fatal=fatal.append)
    await feed(pipeline, TOPIC, 0, 0, None, task_bytes("a"), "tok0")
    await settle()
    (result,) = broker.on(RESULTS)
    boom = BrokerError("not enough replicas")
    result.ack.set_exception(boom)
    await settle()
    assert fatal == [boom]
    assert broker.acked == []
    await pipeline.stop(timeout_s=1.0)


async def test_revoked_partition_is_not_committed() -> None:
    broker = FakeBroker(auto_ack=False)
    pipeline, _ = make_pipeline(broker)
    await feed(pipeline, TOPIC, 0, 0, None, b"bad", "tok0")
    await settle()
    pipeline.revoke([(TOPIC, 0)])
    broker.on(DLQ)[0].ack.set_result(None)
    await settle()
    assert broker.acked == []            # the new owner re-reads it
    assert pipeline.limiter.in_flight == 0
    await pipeline.stop()


# -- reply_to --------------------------------------------------------------------------------


async def test_reply_to_routes_the_result() -> None:
    broker = FakeBroker()
    pipeline, _ = make_pipeline(broker)
    await feed(pipeline, TOPIC, 0, 0, None, task_bytes("a", reply_to="client-1.replies"), "t0")
    await feed(pipeline, TOPIC, 0, 1, None, task_bytes("b"), "t1")
    await pipeline.stop()
    assert [s.key for s in broker.on("client-1.replies")] == [b"a"]
    assert broker.on("client-1.replies")[0].result().status == "ok"
    assert [s.key for s in broker.on(RESULTS)] == [b"b"]


async def test_reply_to_routes_a_rejected_result_but_not_the_dead_letter() -> None:
    broker = FakeBroker()
    pipeline, _ = make_pipeline(broker)
    bad = task_bytes("r", np.zeros((1, 3), np.float32), reply_to="client-1.replies")
    await feed(pipeline, TOPIC, 0, 0, b"k", bad, "t0")
    await feed(pipeline, TOPIC, 0, 1, None, raw_task(id="q", reply_to="no spaces allowed"), "t1")
    await pipeline.stop()
    assert broker.dead_letter_at(0).value == bad
    assert broker.dead_letter_at(1).header_map[DLQ_HEADER_CODE] == b"invalid_field"
    assert [s.result().status for s in broker.on("client-1.replies")] == ["rejected"]
    # an unusable reply_to cannot be used for the rejection either
    assert [s.key for s in broker.on(RESULTS)] == [b"q"]


# -- backpressure ------------------------------------------------------------------------------


async def test_backpressure_at_max_in_flight() -> None:
    """At the cap the pipeline asks for nothing more (the consumer pauses); slots come back only when
    results are acknowledged, and ``wait_capacity`` wakes the consumer then."""
    broker = FakeBroker(auto_ack=False)
    pipeline, _ = make_pipeline(broker, max_in_flight=2)
    assert pipeline.capacity == 2
    await feed(pipeline, TOPIC, 0, 0, None, task_bytes("a"), "tok0")
    await feed(pipeline, TOPIC, 0, 1, None, task_bytes("b"), "tok1")
    await settle()
    assert pipeline.capacity == 0 and pipeline.limiter.in_flight == 2
    waiting = asyncio.create_task(pipeline.wait_capacity(1, timeout_s=30.0))
    await settle()
    assert not waiting.done()
    assert [s.key for s in broker.sent] == [b"a", b"b"]

    for sent in broker.sent:
        sent.ack.set_result(None)
    await settle()
    assert waiting.done() and pipeline.capacity == 2
    assert broker.acked == ["tok0", "tok1"]
    await feed(pipeline, TOPIC, 0, 2, None, task_bytes("c"), "tok2")
    await settle()
    broker.sent[-1].ack.set_result(None)
    await pipeline.stop()
    assert broker.acked == ["tok0", "tok1", "tok2"]


async def test_wait_capacity_returns_after_its_timeout_when_nothing_frees() -> None:
    broker = FakeBroker(auto_ack=False)
    pipeline, _ = make_pipeline(broker, max_in_flight=1)
    await feed(pipeline, TOPIC, 0, 0, None, task_bytes("a"), "tok0")
    await asyncio.wait_for(pipeline.wait_capacity(1, timeout_s=0.02), 2.0)
    assert pipeline.capacity == 0
    await pipeline.stop(timeout_s=0.1)


# -- bugs ---------------------------------------------------------------------------------------


async def test_impossible_tensor_shape_is_dead_lettered() -> None:
    broker = FakeBroker()
    pipeline, _ = make_pipeline(broker)
    value = raw_task(id="h", inputs={"dtype": "float32", "shape": [0, 2**62], "data": ""})
    try:
        await feed(pipeline, TOPIC, 0, 0, None, value, "t0")
        await feed(pipeline, TOPIC, 0, 1, None, task_bytes("ok"), "t1")
    finally:
        await pipeline.stop(timeout_s=1.0)
    assert broker.dead_letter_at(0).header_map[DLQ_HEADER_CODE] == b"invalid_tensor"
    assert broker.acked == ["t0", "t1"]


async def test_send_that_raises_is_fatal() -> None:
    fatal: list[BaseException] = []
    broker = FakeBroker()
    boom = BrokerError("record too large")

    async def send(topic: str, key: Any, value: Any, headers: list) -> asyncio.Future:
        if topic == RESULTS:
            raise boom
        return await broker.send(topic, key, value, headers)

    pipeline = TaskPipeline(
        names=TopicNames("t"), worker_id="w", runners={"toy": FakeRunner()},
        policies={"toy": FixedBatchPolicy(max_batch_size=4, max_wait_s=0.0)},
        produce=as_produce(send), ack=broker.ack, max_in_flight=10, on_fatal=fatal.append, clock=lambda: 100.0,
    )
    pipeline.start()
    await feed(pipeline, TOPIC, 0, 0, None, task_bytes("a"), "t0")
    await pipeline.stop(timeout_s=1.0)
    assert fatal == [boom]
    assert broker.acked == []


class CycleRecorder(FixedBatchPolicy):
    """A fixed policy that records the cycle times the pipeline reports."""

    def __init__(self) -> None:
        super().__init__(max_batch_size=4, max_wait_s=0.0)
        self.cycles: list[tuple[int, float, int | None]] = []

    def observe_cycle(self, batch_size: int, cycle_s: float, target_size: int | None = None) -> None:
        self.cycles.append((batch_size, cycle_s, target_size))


async def test_back_to_back_batches_report_their_cycle_time() -> None:
    """With a backlog behind a batch and behind the next one, the time from its start to the
    next batch's start is reported for its size (and the size asked: a fixed policy has none,
    the batch's own); a batch with nothing queued behind the next one reports nothing."""
    broker = FakeBroker()
    now = [100.0]
    policy = CycleRecorder()

    class SlowRunner(FakeRunner):
        async def run(self, items):  # each batch costs 0.5 s of fake time
            now[0] += 0.5
            return await super().run(items)

    pipeline = TaskPipeline(
        names=TopicNames("t"), worker_id="w", runners={"toy": SlowRunner()}, policies={"toy": policy},
        produce=broker.produce, ack=broker.ack, max_in_flight=100, clock=lambda: now[0],
    )
    for offset in range(10):  # queued before the batcher runs: a backlog of 10
        await feed(pipeline, TOPIC, 0, offset, None, task_bytes(f"t{offset}", rows(offset)), offset)
    pipeline.start()
    await pipeline.stop()
    # batches of 4, 4, 2: the first two started with tasks waiting behind them, the last did not,
    # so only the first cycle (start of batch 1 -> start of batch 2) is a backlog's cost
    assert policy.cycles == [(4, 0.5, 4)]


async def test_reply_to_a_missing_topic_is_rejected_not_waited_on() -> None:
    """A producer naming a reply_to topic that does not exist must not wedge the worker: the task
    is dead-lettered, its rejected result goes to the default results topic, batch-mates are served."""
    broker = FakeBroker()
    existing = {"t.replies"}

    async def topic_exists(name: str) -> bool:
        return name in existing

    pipeline = TaskPipeline(
        names=TopicNames("t"), worker_id="w", runners={"toy": FakeRunner()},
        policies={"toy": FixedBatchPolicy(max_batch_size=4, max_wait_s=0.0)},
        produce=broker.produce, ack=broker.ack, max_in_flight=100, topics=Topics(topic_exists), clock=lambda: 100.0,
    )
    pipeline.start()
    await feed(pipeline, TOPIC, 0, 0, None, task_bytes("good", rows(1), reply_to="t.replies"), 0)
    await feed(pipeline, TOPIC, 0, 1, None, task_bytes("bad", rows(2), reply_to="t.nowhere"), 1)
    await feed(pipeline, TOPIC, 0, 2, None, task_bytes("plain", rows(3)), 2)
    await pipeline.stop()

    by_topic: dict[str, list[str]] = {}
    for s in broker.sent:
        by_topic.setdefault(s.topic, []).append(s.key.decode() if s.key else "")
    assert by_topic["t.replies"] == ["good"]
    assert sorted(by_topic[RESULTS]) == ["bad", "plain"]
    assert "t.nowhere" not in by_topic
    dead = [s for s in broker.sent if s.topic == "t.dlq"]
    assert len(dead) == 1 and dict(dead[0].headers)["autoglm.error.code"] == b"invalid_field"
    results = broker.results_by_id()
    assert results["bad"].status == "rejected" and "reply_to" in results["bad"].error.message
    assert results["plain"].status == "ok"
    good = [decode_result(s.value) for s in broker.sent if s.topic == "t.replies"]
    assert good[0].id == "good" and good[0].status == "ok"
    assert broker.acked == [0, 1, 2]


async def test_a_delivery_that_never_completes_is_fatal_after_the_timeout() -> None:
    fatal: list[BaseException] = []
    acked: list[Any] = []

    async def send_never_acked(topic, key, value, headers):
        return asyncio.get_running_loop().create_future()  # the broker never answers

    pipeline = TaskPipeline(
        names=TopicNames("t"), worker_id="w", runners={"toy": FakeRunner()},
        policies={"toy": FixedBatchPolicy(max_batch_size=4, max_wait_s=0.0)},
        produce=as_produce(send_never_acked), ack=lambda tp, position: acked.append(position), max_in_flight=100, on_fatal=fatal.append,
        delivery_timeout_s=0.05, clock=lambda: 100.0,
    )
    pipeline.start()
    await feed(pipeline, TOPIC, 0, 0, None, task_bytes("a", rows(1)), "tok0")
    await pipeline.stop(timeout_s=5)
    assert len(fatal) == 1 and isinstance(fatal[0], asyncio.TimeoutError)
    assert acked == []  # never committed
