"""Batched producing (streams/producer.py) against a fake producer with aiokafka's batch API."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.partitioner import DefaultPartitioner

from autoglm.streams.producer import BatchProducer, partition_for


class FakeBatch:
    def __init__(self, capacity: int):
        self.records: list[tuple] = []
        self.capacity, self.closed = capacity, False

    def append(self, *, key, value, timestamp, headers):
        if self.closed or len(self.records) >= self.capacity:
            return None
        self.records.append((key, value, headers))
        return object()

    def close(self):
        self.closed = True

    def record_count(self):
        return len(self.records)


class FakeProducer:
    """``send_batch`` waits while another batch of the same partition is open (as aiokafka does) and
    records how many callers wait at once per partition; the test acknowledges batches."""

    def __init__(self, partitions: int = 3, capacity: int = 5, fail: bool = False):
        self.partitions, self.capacity, self.fail = partitions, capacity, fail
        self.sent: list[tuple[str, int, list]] = []
        self.acks: list[asyncio.Future] = []
        self.waiting: dict[tuple[str, int], int] = {}
        self.most_waiting = 0

    async def partitions_for(self, topic):
        return set(range(self.partitions))

    def create_batch(self):
        return FakeBatch(self.capacity)

    async def send_batch(self, batch, topic, *, partition):
        tp = (topic, partition)
        self.waiting[tp] = self.waiting.get(tp, 0) + 1
        self.most_waiting = max(self.most_waiting, self.waiting[tp])
        await asyncio.sleep(0)
        self.waiting[tp] -= 1
        if self.fail:
            raise RuntimeError("refused")
        self.sent.append((topic, partition, batch.records))
        fut = asyncio.get_running_loop().create_future()
        self.acks.append(fut)
        return fut


def test_partition_for_is_kafkas_default_partitioner():
    default = DefaultPartitioner()
    for i in range(200):
        key = f"task-{i}".encode()
        assert partition_for(key, 7) == default(key, list(range(7)), list(range(7)))


async def test_concurrent_deliveries_share_one_sender_per_partition_and_wait_for_acks():
    producer = FakeProducer(partitions=1, capacity=5)
    batches = BatchProducer(producer)
    calls = [asyncio.ensure_future(batches.deliver([("r", f"k{i}-{j}".encode(), b"v", []) for j in range(3)]))
             for i in range(20)]
    for _ in range(20):
        await asyncio.sleep(0)
    assert producer.most_waiting == 1, "one caller per partition waits in send_batch"
    assert not any(c.done() for c in calls), "nothing returns before the broker acknowledged"
    for fut in producer.acks:
        fut.set_result(None)
    await asyncio.sleep(0)
    while not all(c.done() for c in calls):
        for fut in producer.acks:
            if not fut.done():
                fut.set_result(None)
        await asyncio.sleep(0)
    keys = [k for _, _, recs in producer.sent for k, _, _ in recs]
    assert keys == [f"k{i}-{j}".encode() for i in range(20) for j in range(3)], "order kept, nothing lost"
    assert all(len(recs) <= 5 for _, _, recs in producer.sent)
    assert len(producer.sent) < 20, "settlements queued meanwhile share batches"


async def test_a_refused_batch_fails_every_caller_waiting_on_it():
    producer = FakeProducer(partitions=1, fail=True)
    batches = BatchProducer(producer)
    with pytest.raises(RuntimeError, match="refused"):
        await batches.deliver([("r", b"k", b"v", [])])
