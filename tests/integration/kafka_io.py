"""Small aiokafka helpers for tests: produce raw records, read a topic from its start."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from autoglm.streams.events import Result, decode_result
from autoglm.streams.topics import TopicNames, ensure_topics, partitions_of


async def create_topics(bootstrap: str, prefix: str, models=("digits",), partitions: int = 3) -> None:
    await ensure_topics(bootstrap, TopicNames(prefix), list(models), partitions=partitions,
                        max_message_bytes=4 * 1024 * 1024)


async def produce(bootstrap: str, records: list[tuple[str, bytes | None, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for topic, key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_until(bootstrap: str, topic: str, done: Callable[[list[ConsumerRecord]], bool],
                     timeout_s: float, alive: Callable[[], bool] = lambda: True,
                     isolation_level: str = "read_uncommitted") -> list[ConsumerRecord]:
    """Read ``topic`` from its start until ``done(records)`` or the timeout; returns all records read."""
    tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 * 1024 * 1024, isolation_level=isolation_level)
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        deadline = time.monotonic() + timeout_s
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while time.monotonic() < deadline and not done(records):
            assert alive(), "the worker died"
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
        return records
    finally:
        await consumer.stop()


async def results_for(bootstrap: str, prefix: str, ids: set[str], timeout_s: float,
                      alive: Callable[[], bool] = lambda: True) -> tuple[dict[str, Result], int]:
    """Read ``<prefix>.results`` until every id in ``ids`` has a result.

    Returns:
        (first result per id, number of duplicate results seen).
    """
    seen: dict[str, Result] = {}
    dupes = 0

    def done(records: list[ConsumerRecord]) -> bool:
        nonlocal dupes
        while len(done.consumed) < len(records):
            rec = records[len(done.consumed)]
            done.consumed.append(rec)
            result = decode_result(rec.value)
            if result.id in seen:
                dupes += 1
            else:
                seen[result.id] = result
        return ids <= set(seen)

    done.consumed = []  # type: ignore[attr-defined]
    await read_until(bootstrap, f"{prefix}.results", done, timeout_s, alive)
    return seen, dupes


# -- helpers of the fault, chaos and memory tests -----------------------------------------------


async def produce_tasks(bootstrap: str, topic: str, tasks: list) -> dict[str, tuple[int, int]]:
    """Publish task events keyed by their id (acks=all).

    Returns:
        task id -> (partition, offset) of its record.
    """
    from autoglm.streams.events import encode_task

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_batch_size=256 * 1024, max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, encode_task(t), key=t.id.encode()) for t in tasks]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return {t.id: (m.partition, m.offset) for t, m in zip(tasks, metas)}


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets on ``topic``: partition -> next offset to consume (absent: none)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}


async def group_members(bootstrap: str, group: str) -> tuple[str, int]:
    """(state, number of members) of a consumer group, as the coordinator describes it."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = (await admin.describe_consumer_groups([group]))[0]
    finally:
        await admin.close()
    described = response.to_object()["groups"][0]
    return described["state"], len(described["members"])


def committed_ids(positions: dict[str, tuple[int, int]], committed: dict[int, int]) -> set[str]:
    """Task ids whose record lies below its partition's committed offset."""
    return {tid for tid, (p, o) in positions.items() if o < committed.get(p, 0)}


class ResultFollower:
    """Reads ``<prefix>.results`` from its start, keeping every record's position.

    ``first``: task id -> first result; ``duplicates``: results for an id seen before;
    ``by_worker``: results per worker id, duplicates included; ``duplicate_pairs``: (worker of the
    first result, worker of the duplicate) -> count; ``timeline``: (record timestamp in ms, task id,
    worker) of every result;
    ``served_below(ends)``: ids with a result at an offset below ``ends`` (partition -> offset).
    Use as ``async with ResultFollower(bootstrap, prefix) as results``.
    """

    def __init__(self, bootstrap: str, prefix: str):
        self.bootstrap = bootstrap
        self.topic = f"{prefix}.results"
        self.first: dict[str, Result] = {}
        self.duplicates = 0
        self.positions: list[tuple[int, int, str]] = []  # (partition, offset, task id) of every result
        self.by_worker: Counter[str] = Counter()  # results (duplicates included) per worker id
        self.duplicate_pairs: Counter[tuple[str, str]] = Counter()  # (first answer's worker, duplicate's worker)
        self.timeline: list[tuple[int, str, str]] = []  # (record timestamp ms, task id, worker) of every result
        self._consumer: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []

    async def __aenter__(self) -> "ResultFollower":
        self._tps = [TopicPartition(self.topic, p) for p in await partitions_of(self.bootstrap, self.topic)]
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                          max_partition_fetch_bytes=8 * 1024 * 1024)
        await self._consumer.start()
        self._consumer.assign(self._tps)
        await self._consumer.seek_to_beginning(*self._tps)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._consumer.stop()

    async def poll(self, timeout_ms: int = 200) -> int:
        """Read what is available; returns the number of records read."""
        batch = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=5000)
        n = 0
        for recs in batch.values():
            for rec in recs:
                result = decode_result(rec.value)
                self.positions.append((rec.partition, rec.offset, result.id))
                self.by_worker[result.worker] += 1
                self.timeline.append((rec.timestamp, result.id, result.worker))
                if result.id in self.first:
                    self.duplicates += 1
                    self.duplicate_pairs[(self.first[result.id].worker, result.worker)] += 1
                else:
                    self.first[result.id] = result
                n += 1
        return n

    async def until(self, done: Callable[[], bool], timeout_s: float, alive: Callable[[], bool] = lambda: True,
                    what: str = "results") -> None:
        """Poll until ``done()``; fails after ``timeout_s`` or when ``alive()`` turns false."""
        deadline = time.monotonic() + timeout_s
        while not done():
            assert alive(), f"a worker died while waiting for {what}"
            assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
            await self.poll()

    async def end_offsets(self) -> dict[int, int]:
        ends = await self._consumer.end_offsets(self._tps)
        return {tp.partition: off for tp, off in ends.items()}

    async def catch_up(self, ends: dict[int, int] | None = None, timeout_s: float = 60.0) -> dict[int, int]:
        """Read up to ``ends`` (default: the current end offsets); returns the ends read to."""
        ends = ends if ends is not None else await self.end_offsets()
        deadline = time.monotonic() + timeout_s
        while True:
            positions = {p: await self._consumer.position(TopicPartition(self.topic, p)) for p in ends}
            if all(positions[p] >= end for p, end in ends.items()):
                return ends
            assert time.monotonic() < deadline, f"could not read {self.topic} up to {ends}"
            await self.poll()

    def served_below(self, ends: dict[int, int]) -> set[str]:
        """Ids with a result record at an offset below ``ends[partition]``."""
        return {tid for p, o, tid in self.positions if o < ends.get(p, 0)}


async def audit_commits(bootstrap: str, group: str, task_topic: str, positions: dict[str, tuple[int, int]],
                        results: ResultFollower) -> tuple[dict[int, int], set[str]]:
    """Commit after produce, checked from outside: take the group's committed offsets, *then* the
    results topic's end offsets, and read the results up to them. Every task below a committed
    offset must have a result below those ends (its result was acknowledged before its commit).

    Returns:
        (partition -> committed offset, committed task ids without a result: empty when the rule holds).
    """
    committed = await committed_offsets(bootstrap, group, task_topic)
    ends = await results.catch_up()
    return committed, committed_ids(positions, committed) - results.served_below(ends)
