"""The console's Kafka side: follow ``<prefix>.status`` and ``<prefix>.dlq`` (read-only), publish control.

- Status: one partition; at start the reader seeks to the first record of the
  last ``history_s`` seconds (``offsets_for_times``), so a restarted console
  shows the last 15 minutes at once, then follows the topic.
- Dead letters: the last ``dead_letters`` records of each partition, then follows.
- Control: published through :class:`~autoglm.streams.control.ControlClient`
  (the same event, key and signature as ``autoglm ctl``), opened on first use.

Neither consumer joins a group or commits: the console changes nothing it reads.
A topic that does not exist yet (no worker ever started with this prefix) is
looked for again every ``retry_s`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition

from autoglm.processors.errors import BrokerError, TopicMissingError
from autoglm.streams.control import ControlClient, decode_status
from autoglm.streams.events import ControlEvent
from autoglm.streams.topics import TopicNames, partitions_of

log = logging.getLogger(__name__)

class ConsoleFeed:
    """Reads the status and dead-letter topics and hands each record to ``on_status``/``on_dead_letter``.

    Args:
        bootstrap_servers: brokers.
        prefix: topic prefix.
        on_status: called with each decoded status event (dict; non-status records are skipped).
        on_dead_letter: called with ``{"topic", "partition", "offset", "timestamp_ms",
            "key", "size", "headers": {name: value}}`` per dead letter (values decoded as UTF-8).
        control_key: HMAC key for control events (None: unsigned); kept server-side.
        history_s: how far back the status topic is read at start, seconds.
        dead_letters: records read back per dead-letter partition at start.
        retry_s: seconds between looks for a topic that does not exist yet.
        client_kwargs: security arguments for every Kafka client.
    """

    def __init__(self, bootstrap_servers: list[str] | str, *, prefix: str,
                 on_status: Callable[[dict[str, Any]], None],
                 on_dead_letter: Callable[[dict[str, Any]], None],
                 control_key: bytes | None = None, history_s: float = 900.0, dead_letters: int = 50,
                 retry_s: float = 2.0, client_kwargs: dict[str, Any] | None = None):
        self.bootstrap_servers = bootstrap_servers
        self.names = TopicNames(prefix)
        self._on_status = on_status
        self._on_dead_letter = on_dead_letter
        self._control_key = control_key
        self.history_s = history_s
        self.dead_letters = dead_letters
        self.retry_s = retry_s
        self._kwargs = client_kwargs or {}
        self._tasks: list[asyncio.Task] = []
        self._client: ControlClient | None = None
        self._client_lock = asyncio.Lock()
        self.status_ready = asyncio.Event()

    async def start(self) -> None:
        """Start following both topics in the background."""
        self._tasks = [asyncio.ensure_future(self._supervise(self._follow_status)),
                       asyncio.ensure_future(self._supervise(self._follow_dlq))]

    async def _supervise(self, follow: Callable[[], Any]) -> None:
        """Run a reader; when the broker fails it, start it again after ``retry_s`` (from its start
        position: status events read twice change nothing, the state keeps the newest)."""
        while True:
            try:
                await follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("console: %s failed, restarting in %.0f s: %r", follow.__name__, self.retry_s, exc)
                await asyncio.sleep(self.retry_s)

    async def stop(self) -> None:
        """Stop the readers and the control client."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def send(self, command: str, target: Mapping[str, str], params: Mapping[str, Any]) -> ControlEvent:
        """Publish one control event as ``autoglm ctl`` does (validated, keyed, signed when a key is set).

        ``target`` holds any of ``model``, ``worker``, ``pipeline``, ``step`` (as ``ctl --model/--worker/
        --pipeline/--step``).

        Raises:
            ValueError: invalid parameters (nothing published).
            BrokerError: the broker or the control topic is unreachable.
        """
        async with self._client_lock:
            if self._client is None:
                client = ControlClient(self.bootstrap_servers, prefix=self.names.prefix, key=self._control_key,
                                       client_kwargs=self._kwargs)
                await client.__aenter__()
                self._client = client
        return await self._client.send(command, model=target.get("model"), worker=target.get("worker"),
                                       params=params, pipeline=target.get("pipeline"), step=target.get("step"))

    # -- readers ------------------------------------------------------------------

    async def _partitions(self, topic: str) -> list[int]:
        while True:
            try:
                return await partitions_of(self.bootstrap_servers, topic, timeout_s=1.0, client_kwargs=self._kwargs)
            except (TopicMissingError, BrokerError) as exc:
                log.info("console: waiting for topic %s (%s)", topic, exc)
                await asyncio.sleep(self.retry_s)

    def _consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=200, **self._kwargs)

    async def _follow_status(self) -> None:
        await self._partitions(self.names.status)
        consumer = self._consumer()
        await consumer.start()
        try:
            tp = TopicPartition(self.names.status, 0)
            consumer.assign([tp])
            since_ms = int(time.time() * 1000 - self.history_s * 1000)
            found = (await consumer.offsets_for_times({tp: since_ms})).get(tp)
            if found is None:
                await consumer.seek_to_end(tp)
            else:
                consumer.seek(tp, found.offset)
            end = (await consumer.end_offsets([tp]))[tp]
            if await consumer.position(tp) >= end:
                self.status_ready.set()
            while True:
                batch = await consumer.getmany(tp, timeout_ms=500)
                for record in batch.get(tp, []):
                    doc = decode_status(record.value)
                    if doc is not None:
                        self._on_status(doc)
                if not self.status_ready.is_set() and await consumer.position(tp) >= end:
                    self.status_ready.set()
        finally:
            await consumer.stop()

    async def _follow_dlq(self) -> None:
        partitions = await self._partitions(self.names.dlq)
        consumer = self._consumer()
        await consumer.start()
        try:
            tps = [TopicPartition(self.names.dlq, p) for p in partitions]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                consumer.seek(tp, max(0, ends[tp] - self.dead_letters))
            while True:
                batch = await consumer.getmany(*tps, timeout_ms=1000)
                records = sorted((r for rs in batch.values() for r in rs), key=lambda r: r.timestamp)
                for record in records:
                    self._on_dead_letter({
                        "topic": record.topic, "partition": record.partition, "offset": record.offset,
                        "timestamp_ms": record.timestamp,
                        "key": None if record.key is None else record.key.decode("utf-8", "replace")[:200],
                        "size": 0 if record.value is None else len(record.value),
                        "headers": {k: (v or b"").decode("utf-8", "replace") for k, v in record.headers},
                    })
        finally:
            await consumer.stop()

