"""Model failures and size limits through the pipeline, with a real ModelRunner (bisection, timeouts)."""

from __future__ import annotations

import numpy as np

from autoglm.models.runner import ModelRunner
from autoglm.processors.batching import FixedBatchPolicy
from autoglm.streams.events import decode_result
from autoglm.streams.pipeline import DLQ_HEADER_CODE, DLQ_HEADER_OFFSET, TaskPipeline
from autoglm.streams.topics import TopicNames

from .test_pipeline import DLQ, RESULTS, TOKENS, TOPIC, FakeBroker, ToyModel, _fresh_tokens, feed, rows, task_bytes  # noqa: F401

POISON = -999.0


class PoisonModel(ToyModel):
    """Doubles its input; raises when any row of the batch starts with ``POISON``."""

    def forward(self, batch: np.ndarray) -> np.ndarray:
        if (batch[:, 0] == POISON).any():
            raise ValueError("poisoned row")
        return super().forward(batch)


async def run_tasks(records: list[tuple[str, bytes]], **pipeline_kwargs) -> tuple[FakeBroker, TaskPipeline]:
    broker = FakeBroker()
    runner = ModelRunner(PoisonModel(), device="cpu")
    await runner.start()
    pipeline = TaskPipeline(
        names=TopicNames("t"), worker_id="w", runners={"toy": runner},
        policies={"toy": FixedBatchPolicy(max_batch_size=8, max_wait_s=0.0)},
        produce=broker.produce, ack=broker.ack, max_in_flight=100, **pipeline_kwargs,
    )
    for offset, (task_id, value) in enumerate(records):
        await feed(pipeline, TOPIC, 0, offset, task_id.encode(), value, f"tok{offset}")
    pipeline.start()
    await pipeline.stop()
    runner.close()
    return broker, pipeline


async def test_a_poisoned_task_gets_an_error_and_a_dead_letter_and_the_rest_of_its_batch_is_served():
    records = [(f"t{i}", task_bytes(f"t{i}", rows(i))) for i in range(8)]
    poisoned = rows(0)
    poisoned[0, 0] = POISON
    records[5] = ("t5", task_bytes("t5", poisoned))
    broker, pipeline = await run_tasks(records)

    results = broker.results_by_id()
    assert sorted(results) == sorted(f"t{i}" for i in range(8))
    bad = results["t5"]
    assert bad.status == "error" and bad.error.code == "inference" and "poisoned row" in bad.error.message
    for i in (0, 1, 2, 3, 4, 6, 7):
        assert results[f"t{i}"].status == "ok"
        assert np.array_equal(results[f"t{i}"].outputs, rows(i) * 2)
    (dead,) = broker.on(DLQ)
    assert dead.value == records[5][1] and dead.key == b"t5"
    assert dead.header_map[DLQ_HEADER_CODE] == b"inference" and dead.header_map[DLQ_HEADER_OFFSET] == b"5"
    assert broker.acked == [f"tok{i}" for i in range(8)]
    assert pipeline.counters.isolated_failures == 1 and pipeline.counters.results_ok == 7


async def test_a_task_above_max_task_bytes_is_dead_lettered_with_a_rejected_result():
    small = task_bytes("small", rows(1))
    big = task_bytes("big", rows(2, n=200))
    broker, _ = await run_tasks([("small", small), ("big", big)], max_task_bytes=len(small) + 10)
    results = broker.results_by_id()
    assert results["small"].status == "ok"
    assert results["big"].status == "rejected" and results["big"].error.code == "too_large"
    assert f"{len(big)} bytes" in results["big"].error.message
    (dead,) = broker.on(DLQ)
    assert dead.value == big and dead.header_map[DLQ_HEADER_CODE] == b"too_large"


async def test_a_result_above_max_result_bytes_becomes_an_error_result_not_a_drop():
    broker, pipeline = await run_tasks([("one", task_bytes("one", rows(1))), ("many", task_bytes("many", rows(2, 300)))],
                                       max_result_bytes=2000)
    results = broker.results_by_id()
    assert results["one"].status == "ok"
    assert results["many"].status == "error" and results["many"].error.code == "result_too_large"
    assert len([s for s in broker.on(RESULTS) if s.key == b"many"][0].value) <= 2000
    assert pipeline.counters.oversized_results == 1
    assert decode_result([s for s in broker.on(RESULTS) if s.key == b"many"][0].value).outputs is None


# -- exactly-once settling ----------------------------------------------------------------


def transactional_pipeline(n_received: int) -> tuple[TaskPipeline, FakeBroker, list]:
    """A pipeline in exactly-once mode whose ``transact`` records each transaction, with offsets
    ``0..n_received-1`` of one partition received (in-flight slots taken)."""
    from .test_pipeline import FakeRunner

    transactions: list[tuple[list, dict]] = []

    async def transact(records, offsets):
        transactions.append(([r[1] for r in records], dict(offsets)))

    broker = FakeBroker()
    pipeline = TaskPipeline(
        names=TopicNames("t"), worker_id="w", runners={"toy": FakeRunner()},
        policies={"toy": FixedBatchPolicy(max_batch_size=8, max_wait_s=0.0)},
        produce=broker.produce, ack=broker.ack, max_in_flight=100, transact=transact,
    )
    for offset in range(n_received):
        pipeline.limiter.take(1)  # as on_records would
        pipeline.tracker.received((TOPIC, 0), offset, offset)
        TOKENS[(TOPIC, 0, offset)] = f"tok{offset}"
    return pipeline, broker, transactions


def rec(name: str) -> list:
    return [(RESULTS, name.encode(), b"{}", [])]


async def test_transactional_mode_commits_results_only_with_the_contiguous_offsets_they_complete():
    """A later offset finishing first waits for the earlier one: results and offsets go out together."""
    pipeline, broker, transactions = transactional_pipeline(3)
    tp = (TOPIC, 0)
    await pipeline._settle([(tp, 2, rec("c"))])
    await pipeline._settle([(tp, 1, rec("b"))])
    assert transactions == [] and broker.acked == [], "nothing may commit before offset 0 is done"
    await pipeline._settle([(tp, 0, rec("a"))])
    assert transactions == [([b"a", b"b", b"c"], {tp: 3})]
    assert broker.acked == ["tok0", "tok1", "tok2"]
    assert broker.sent == [], "exactly-once records go through the transaction only"
    assert pipeline.limiter.in_flight == 0


async def test_transactional_mode_drops_finished_results_of_a_revoked_partition():
    pipeline, broker, transactions = transactional_pipeline(2)
    tp = (TOPIC, 0)
    await pipeline._settle([(tp, 1, rec("b"))])  # held behind offset 0
    pipeline.revoke([tp])
    await pipeline._settle([(tp, 0, rec("a"))])  # finishes after the revoke
    assert transactions == [] and broker.acked == []
    assert pipeline.limiter.in_flight == 0


async def test_a_model_that_fails_to_load_is_served_by_its_fallback_and_results_say_so():
    from autoglm.models.fallback import FallbackRunner

    class Broken(ToyModel):
        name = "toy"

        def load(self, device: str) -> None:
            raise RuntimeError("weights missing")

    class Backup(ToyModel):
        name = "toy-backup"

    runner = FallbackRunner(ModelRunner(Broken(), device="cpu"), ModelRunner(Backup(), device="cpu"))
    await runner.start()
    broker = FakeBroker()
    pipeline = TaskPipeline(
        names=TopicNames("t"), worker_id="w", runners={"toy": runner},
        policies={"toy": FixedBatchPolicy(max_batch_size=8, max_wait_s=0.0)},
        produce=broker.produce, ack=broker.ack, max_in_flight=100,
    )
    for offset in range(3):
        await feed(pipeline, TOPIC, 0, offset, f"k{offset}".encode(), task_bytes(f"k{offset}", rows(offset)),
                                 f"tok{offset}")
    pipeline.start()
    await pipeline.stop()
    runner.close(wait=False)
    results = broker.results_by_id()
    assert {r.status for r in results.values()} == {"ok"}
    assert {r.model for r in results.values()} == {"toy"} and {r.served_by for r in results.values()} == {"toy-backup"}
    assert np.array_equal(results["k2"].outputs, rows(2) * 2)
