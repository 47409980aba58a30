"""Hot models in the worker's data path, without a broker (streams/app.py, pipeline.py, consumer.py).

- the pipeline serves a model added at run time and forgets one removed;
- the consumer's bounded fetching (an unload's drain) delivers records below a
  partition's bound only and hands the rest back;
- the fetch predicate (streams/served_models.py): a model without a runner is paused, a model
  being unloaded is fetched only while it has a bound to reach; a loaded model
  gets a policy with its ``model.yaml`` batching defaults.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka import TopicPartition

from autoglm.models.repository import ModelRepository
from autoglm.processors.batching import FixedBatchPolicy
from autoglm.streams.app import Worker, WorkerConfig
from autoglm.streams.consumer import ConsumerConfig, TaskConsumer
from autoglm.streams.events import ControlEvent, Task, encode_task
from tests.unit.models import repo_fixtures as rf

from .test_pipeline import FakeBroker, FakeRunner, make_pipeline, rows, settle

# -- the pipeline ----------------------------------------------------------------------------


async def test_a_model_added_at_run_time_is_served_and_one_removed_is_forgotten():
    broker = FakeBroker()
    pipeline, _ = make_pipeline(broker)
    task = Task(id="n0", model="new", inputs=rows(1))
    pipeline.on_records("t.tasks.new", 0, [Rec(0, b"n0", encode_task(task))])
    await settle()
    assert broker.results_by_id()["n0"].status == "rejected"  # not served yet: unknown model

    runner = FakeRunner()
    pipeline.add_model("new", runner, FixedBatchPolicy(max_batch_size=4, max_wait_s=0.0))
    assert set(pipeline.batchers) == set(pipeline.windows) == set(pipeline.policies) == {"toy", "new"}
    tasks = [Task(id=f"n{i}", model="new", inputs=rows(i)) for i in range(1, 4)]
    pipeline.on_records("t.tasks.new", 0, [Rec(i, t.id.encode(), encode_task(t)) for i, t in enumerate(tasks, 1)])
    assert pipeline.model_in_flight("new", [("t.tasks.new", 0)]) == 3
    assert pipeline.model_in_flight("toy", [("t.tasks.toy", 0)]) == 0
    await settle()
    results = broker.results_by_id()
    for i, t in enumerate(tasks, 1):
        assert results[t.id].status == "ok" and (results[t.id].outputs == rows(i) * 2).all()
    assert pipeline.model_in_flight("new", [("t.tasks.new", 0)]) == 0
    assert "new" in pipeline.figures(1.0)

    pipeline.runners.pop("new")  # what ModelHost.unload does before its on_change
    await pipeline.remove_model("new")
    assert set(pipeline.batchers) == set(pipeline.windows) == set(pipeline.policies) == {"toy"}
    late = Task(id="n9", model="new", inputs=rows(9))
    pipeline.on_records("t.tasks.new", 0, [Rec(9, b"n9", encode_task(late))])
    await settle()
    assert broker.results_by_id()["n9"].status == "rejected"


@dataclass
class Rec:
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple = ()


# -- the consumer's bounds -------------------------------------------------------------------


class FakeKafka:
    """The part of AIOKafkaConsumer that bounded fetching uses: assignment, end offsets, positions, seek."""

    def __init__(self, assigned, ends, positions):
        self.assigned, self.ends, self.positions = set(assigned), dict(ends), dict(positions)
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self):
        return set(self.assigned)

    async def end_offsets(self, tps):
        return {tp: self.ends[tp] for tp in tps}

    async def position(self, tp):
        return self.positions[tp]

    def seek(self, tp, offset):
        self.seeks.append((tp, offset))
        self.positions[tp] = offset

    async def commit(self, offsets):
        self.committed = dict(offsets)

    def subscribe(self, topics, listener=None):
        self.subscribed = list(topics)


def bounded_consumer(kafka: FakeKafka) -> TaskConsumer:
    consumer = TaskConsumer(ConsumerConfig(["k:9092"], "g", ("p.tasks.m",), max_in_flight=10), sink=None)
    consumer._consumer = kafka  # a stand-in for the aiokafka consumer it owns
    return consumer


async def test_fetch_until_delivers_records_below_the_bound_and_hands_back_the_rest():
    a, b, other = TopicPartition("p.tasks.m", 0), TopicPartition("p.tasks.m", 1), TopicPartition("p.tasks.x", 0)
    kafka = FakeKafka([a, b, other], {a: 10, b: 4, other: 99}, {a: 6, b: 4, other: 0})
    consumer = bounded_consumer(kafka)
    assert await consumer.fetch_until("p.tasks.m") == {a: 10, b: 4}
    assert consumer.bounded(a) and not consumer.bounded(b)  # b is at its end already
    assert not consumer.bounded(other)
    assert not await consumer.bounds_reached("p.tasks.m")

    recs = [Rec(o, None, None) for o in range(6, 9)]
    assert consumer._within_bound(a, recs, 10) == recs and consumer.bounded(a) and kafka.seeks == []
    recs = [Rec(o, None, None) for o in range(9, 13)]  # 9 is the last one below the bound
    assert [r.offset for r in consumer._within_bound(a, recs, 10)] == [9]
    assert kafka.seeks == [(a, 10)] and not consumer.bounded(a)
    assert await consumer.bounds_reached("p.tasks.m")
    # reached: a later fetch of the partition is handed back whole
    assert consumer._within_bound(a, [Rec(10, None, None)], 10) == () and kafka.seeks[-1] == (a, 10)

    # revoked and assigned again: read from its committed offset up to the same bound
    await consumer.handle_revoked({a})
    assert consumer.bounded(a)
    kafka.positions[a] = 8
    assert not await consumer.bounds_reached("p.tasks.m")
    kafka.positions[a] = 10
    assert await consumer.bounds_reached("p.tasks.m") and not consumer.bounded(a)
    consumer.clear_bounds("p.tasks.m")
    kafka.positions[a] = 3
    assert not consumer.bounded(a) and await consumer.bounds_reached("p.tasks.m")  # no bound left


def test_subscribe_before_start_keeps_the_topics():
    consumer = TaskConsumer(ConsumerConfig(["k:9092"], "g", ("p.tasks.a",), max_in_flight=10), sink=None)
    assert consumer.subscribe(["p.tasks.a", "p.tasks.b", "p.tasks.a"]) is True
    assert consumer.topics == ("p.tasks.a", "p.tasks.b")
    assert consumer.subscribe(["p.tasks.a", "p.tasks.b"]) is False  # unchanged: no rebalance to wait for


# -- the worker ------------------------------------------------------------------------------


def event(command: str, model: str, n: int) -> ControlEvent:
    return ControlEvent(id=f"e{n}", command=command, target={"model": model}, params={}, issued_ms=1000 + n)


def test_the_fetch_predicate_pauses_models_without_a_runner_and_bounds_an_unload(tmp_path):
    rf.torchscript_model(tmp_path, "tiny", extra="batching: {max_batch_size: 4, max_wait_s: 0.01}")
    config = WorkerConfig(ConsumerConfig(["k:9092"], "g", (), max_in_flight=64), prefix="p", max_batch_size=32)
    worker = Worker(config, {"toy": FakeRunner()}, repository=ModelRepository(tmp_path))
    toy, tiny = TopicPartition("p.tasks.toy", 0), TopicPartition("p.tasks.tiny", 0)
    assert worker.pipeline.policies["toy"].max_batch_size == 32  # no model.yaml: the worker's setting
    assert worker.models.fetch_paused(toy)  # the control topic is not replayed yet
    worker.control_state.ready = True
    assert not worker.models.fetch_paused(toy)

    decision = worker.control_state.apply(event("load", "tiny", 1))
    assert decision.load == ("tiny",)
    assert worker.models.fetch_paused(tiny)  # loaded by command, no runner yet: nothing fetched
    runner = FakeRunner()
    worker.host.runners["tiny"] = runner  # what ModelHost does, then calls on_change
    worker.models.changed("tiny", runner)
    assert not worker.models.fetch_paused(tiny)
    policy = worker.pipeline.policies["tiny"]
    assert (policy.max_batch_size, policy.max_wait_s) == (4, 0.01)  # from tiny's model.yaml
    assert policy.batch_ceiling == 4

    # a reload swaps the runner only: same policy, same batcher
    batcher = worker.pipeline.batchers["tiny"]
    swapped = FakeRunner()
    worker.host.runners["tiny"] = swapped
    worker.models.changed("tiny", swapped)
    assert worker.pipeline.policies["tiny"] is policy and worker.pipeline.batchers["tiny"] is batcher

    worker.control_state.apply(event("unload", "tiny", 2))
    assert worker.models.fetch_paused(tiny)  # unloaded: paused
    worker.models.unloading.add("tiny")  # its drain: fetched only while a bound is left to reach
    assert worker.models.fetch_paused(tiny)  # no bound on this partition
    worker.consumer._bounds[tiny] = 5
    assert not worker.models.fetch_paused(tiny)
    worker.control_state.apply(event("pause", "tiny", 3))
    assert worker.models.fetch_paused(tiny)  # a pause holds even a drain


async def test_an_unload_drain_serves_up_to_the_bound_then_unsubscribes_and_a_paused_model_stops_at_once():
    config = WorkerConfig(ConsumerConfig(["k:9092"], "g", (), max_in_flight=64), prefix="p", drain_timeout_s=30.0)
    worker = Worker(config, {"toy": FakeRunner(), "keep": FakeRunner()})
    toy, keep = TopicPartition("p.tasks.toy", 0), TopicPartition("p.tasks.keep", 0)
    kafka = FakeKafka([toy, keep], {toy: 7, keep: 3}, {toy: 2, keep: 0})
    worker.consumer._consumer = kafka  # a stand-in for the aiokafka consumer it owns
    worker.control_state.ready = True
    worker.control_state.apply(event("unload", "toy", 1))

    drain = asyncio.ensure_future(worker.models.drain("toy", poll_s=0.001))
    await asyncio.sleep(0.05)
    assert not drain.done() and not worker.models.fetch_paused(toy)  # still serving up to offset 7
    assert worker.models.fetch_paused(TopicPartition("p.tasks.toy", 1))  # a partition without a bound: not fetched
    kafka.positions[toy] = 7  # the poll loop reached the bound
    figures = await asyncio.wait_for(drain, 5.0)
    assert figures["bounds"] == {"0": 7}
    assert kafka.subscribed == ["p.tasks.keep"]  # the unloaded model's topic is left
    assert worker.models.fetch_paused(toy) and not worker.models.fetch_paused(keep)

    # a paused model: its unload serves nothing more of its topic, it does not wait for the bound
    worker.control_state.apply(event("pause", "keep", 2))
    worker.control_state.apply(event("unload", "keep", 3))
    figures = await asyncio.wait_for(worker.models.drain("keep", poll_s=0.001), 5.0)
    assert figures["bounds"] == {"0": 3} and kafka.positions[keep] == 0
