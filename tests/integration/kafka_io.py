"""Small aiokafka helpers for tests: produce raw records, read a topic from its start."""

from __future__ import annotations

import asyncio
import time
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
                     timeout_s: float, alive: Callable[[], bool] = lambda: True) -> list[ConsumerRecord]:
    """Read ``topic`` from its start until ``done(records)`` or the timeout; returns all records read."""
    tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
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
