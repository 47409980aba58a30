"""Batched producing: one record batch per destination partition, not one coroutine per record.

aiokafka's ``send`` is a coroutine per record (metadata wait, serialisation,
partitioner, accumulator). For a micro-batch of results that is most of the
stream's cost. :func:`produce_records` groups a batch's records by destination
topic and partition (Kafka's default partitioner for keyed records: murmur2 of
the key, as the Java client and ``aiokafka.partitioner.DefaultPartitioner``
compute it, so results keep their key-to-partition mapping), fills one
``BatchBuilder`` per partition through the producer's public
``create_batch``/``send_batch`` API, and awaits every broker acknowledgement.

Works with a transactional producer too (inside ``producer.transaction()``).

:class:`BatchProducer` serves concurrent callers (the worker settles every
micro-batch, dead letter and expired task on its own): it queues records per
destination partition and runs one sender per partition, which puts everything
queued meanwhile into the next record batch. aiokafka's ``send_batch`` keeps
one open batch per partition and makes other callers wait for it to drain, with
a timeout that shrinks by the total time waited on every round (aiokafka 0.14,
``MessageAccumulator.add_batch``): many concurrent callers on one partition
timed out (``KafkaTimeoutError``) in a rebalance test. One waiter per partition
avoids that, and merges small settlements into larger batches.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from typing import Any, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
Record = tuple[str, bytes | None, bytes | None, Headers]


class PartitionCounts:
    """Partition counts of destination topics, asked of the producer once per topic.

    A topic's partition count is read through the producer's public
    ``partitions_for`` (which waits for its metadata) and cached; Kafka
    partitions can only be added, and a record keyed to an old count still
    lands in a valid partition.
    """

    def __init__(self, producer: AIOKafkaProducer):
        self._producer = producer
        self._counts: dict[str, int] = {}

    def cached(self, topic: str) -> int | None:
        """The partition count of ``topic`` when already known, else None (no I/O)."""
        return self._counts.get(topic)

    async def count(self, topic: str) -> int:
        """Number of partitions of ``topic``.

        Raises:
            KafkaError: the producer could not get the topic's metadata.
        """
        n = self._counts.get(topic)
        if n is None:  # first record for this topic: one metadata round trip
            n = len(await self._producer.partitions_for(topic))
            self._counts[topic] = n
        return n


def partition_for(key: bytes | None, partitions: int) -> int:
    """Kafka's default partition of a record: ``toPositive(murmur2(key)) % partitions``; a record
    without a key goes to a random partition (the Java client's sticky choice, simplified)."""
    if key is None:
        return random.randrange(partitions)
    return (murmur2(key) & 0x7FFFFFFF) % partitions


async def produce_records(producer: AIOKafkaProducer, counts: PartitionCounts,
                          records: Sequence[Record]) -> list[asyncio.Future]:
    """Hand ``records`` to the producer, one batch (or more, when one fills) per topic-partition.

    Args:
        producer: a started producer (a transactional one inside a transaction).
        counts: the partition counts cache of that producer.
        records: ``(topic, key, value, headers)`` tuples.

    Returns:
        The futures of the broker acknowledgements, one per record batch sent;
        await them all (``asyncio.gather``) before committing what they answer.

    Raises:
        KafkaError: a destination topic's metadata could not be fetched, or the
            producer refused a batch.
    """
    groups: dict[tuple[str, int], list[Record]] = {}
    for record in records:
        topic = record[0]
        n = counts.cached(topic) or await counts.count(topic)
        groups.setdefault((topic, partition_for(record[1], n)), []).append(record)
    futures: list[asyncio.Future] = []
    for (topic, partition), group in groups.items():
        futures += await send_batches(producer, topic, partition, group)
    return futures


async def send_batches(producer: AIOKafkaProducer, topic: str, partition: int,
                       records: Sequence[Record]) -> list[asyncio.Future]:
    """Hand ``records`` of one destination partition to the producer as few record batches as fit.

    Returns:
        The futures of the broker acknowledgements, one per batch.

    Raises:
        ValueError: a record does not fit in an empty batch (larger than the producer's ``max_batch_size``).
        KafkaError: the producer refused a batch.
    """
    futures: list[asyncio.Future] = []
    batch = producer.create_batch()
    for _, key, value, headers in records:
        if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
            batch.close()
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            batch = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                raise ValueError(f"a record of {len(value or b'')} bytes does not fit in an empty batch "
                                 f"for {topic!r}; raise max_batch_size of the producer")
    if batch.record_count():
        batch.close()  # nothing else (a plain send) may join it
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures


async def deliver(producer: AIOKafkaProducer, counts: PartitionCounts, records: Sequence[Record]) -> Any:
    """Produce ``records`` (see :func:`produce_records`) and wait until the broker acknowledged all."""
    futures = await produce_records(producer, counts, records)
    if futures:
        await asyncio.gather(*futures)


class BatchProducer:
    """Produces records for concurrent callers: one sender per destination partition.

    Args:
        producer: a started (non-transactional) producer.

    :meth:`deliver` returns once the broker acknowledged every record given
    (``acks`` as configured on the producer), and raises what the producer
    raised for any of them.
    """

    def __init__(self, producer: AIOKafkaProducer):
        self._producer = producer
        self._counts = PartitionCounts(producer)
        self._queued: dict[tuple[str, int], deque[tuple[list[Record], asyncio.Future]]] = {}
        self._senders: dict[tuple[str, int], asyncio.Task] = {}
        self._acks: set[asyncio.Task] = set()

    async def deliver(self, records: Sequence[Record]) -> None:
        """Produce ``records`` and wait for the broker's acknowledgement of all of them.

        Raises:
            KafkaError: a record batch was refused or not acknowledged in time.
        """
        groups: dict[tuple[str, int], list[Record]] = {}
        for record in records:
            topic = record[0]
            n = self._counts.cached(topic) or await self._counts.count(topic)
            groups.setdefault((topic, partition_for(record[1], n)), []).append(record)
        loop = asyncio.get_running_loop()
        waits = []
        for tp, group in groups.items():
            fut = loop.create_future()
            self._queued.setdefault(tp, deque()).append((group, fut))
            waits.append(fut)
            sender = self._senders.get(tp)
            if sender is None or sender.done():
                self._senders[tp] = asyncio.ensure_future(self._send(tp))
        if waits:
            await asyncio.gather(*waits)

    async def _send(self, tp: tuple[str, int]) -> None:
        """Send what is queued for ``tp``, in order, until its queue is empty."""
        queue = self._queued[tp]
        topic, partition = tp
        while queue:
            entries = list(queue)
            queue.clear()
            try:
                futures = await send_batches(self._producer, topic, partition,
                                             [record for group, _ in entries for record in group])
            except Exception as exc:  # refused: every caller waiting on these entries gets the error
                for _, fut in entries:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            task = asyncio.ensure_future(self._settle(entries, futures))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    @staticmethod
    async def _settle(entries: list[tuple[list[Record], asyncio.Future]], futures: list[asyncio.Future]) -> None:
        try:
            await asyncio.gather(*futures)
        except Exception as exc:
            for _, fut in entries:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for _, fut in entries:
            if not fut.done():
                fut.set_result(None)
