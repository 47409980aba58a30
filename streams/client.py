"""The client side users import: publish tasks, read results.

Example::

    async with Publisher("127.0.0.1:9092") as pub:
        await pub.publish(Task(id="t1", model="digits", inputs=image))   # image: float32 (1, 64)
    async with ResultReader("127.0.0.1:9092") as results:
        async for result in results:
            print(result.id, result.outputs.argmax())
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, AsyncIterator, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from autoglm.processors.errors import BrokerError, EventError, TopicMissingError
from autoglm.streams.events import Result, Task, decode_result, encode_task, now_ms
from autoglm.streams.topics import TopicNames, partitions_of

log = logging.getLogger(__name__)


class Publisher:
    """Publishes task events to ``<prefix>.tasks.<model>``, keyed by task id.

    Args:
        bootstrap_servers: ``host:port[,host:port]``.
        prefix: topic prefix.
        max_message_bytes: producer request limit, bytes.

    Raises:
        BrokerError: on start when the broker is unreachable, on publish when
            the broker refuses the record (unknown topic, too large).
    """

    def __init__(self, bootstrap_servers: str | list[str], *, prefix: str = "autoglm",
                 max_message_bytes: int = 4 * 1024 * 1024, **producer_kwargs):
        self.names = TopicNames(prefix)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers, acks="all", linger_ms=2,
            max_request_size=max_message_bytes, **producer_kwargs,
        )

    async def __aenter__(self) -> "Publisher":
        try:
            await self._producer.start()
        except KafkaError as exc:
            raise BrokerError(f"cannot connect the publisher: {exc!r}") from exc
        return self

    async def __aexit__(self, *exc) -> None:
        await self._producer.stop()

    async def publish(self, task: Task, *, wait: bool = True) -> asyncio.Future | None:
        """Publish one task (``created_ms`` is stamped when absent).

        Args:
            wait: await the broker's acknowledgement; else return its future.
        """
        if task.created_ms is None:
            task = _with_created(task)
        try:
            fut = await self._producer.send(
                self.names.tasks(task.model), encode_task(task), key=task.id.encode()
            )
            if wait:
                await fut
                return None
            return fut
        except KafkaError as exc:
            raise BrokerError(f"publish of task {task.id!r} to {self.names.tasks(task.model)!r} failed: {exc!r}") from exc

    async def publish_many(self, tasks: Iterable[Task]) -> int:
        """Publish tasks pipelined, then wait for every acknowledgement; returns the count."""
        futures = [await self.publish(t, wait=False) for t in tasks]
        try:
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise BrokerError(f"publish failed: {exc!r}") from exc
        return len(futures)

    async def publish_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Publish bytes as they are (for tests and tools that bring their own JSON)."""
        try:
            await self._producer.send_and_wait(topic, value, key=key)
        except KafkaError as exc:
            raise BrokerError(f"publish to {topic!r} failed: {exc!r}") from exc


def _with_created(task: Task) -> Task:
    import dataclasses

    return dataclasses.replace(task, created_ms=now_ms())


class ResultReader:
    """Reads result events from ``<prefix>.results`` (or another topic), outside any group.

    Args:
        from_beginning: read the topic from its start, else only new results.
        topic: defaults to ``<prefix>.results``.
        isolation_level: ``read_committed`` (default): results of an aborted
            exactly-once transaction are never seen; the same as
            ``read_uncommitted`` for results written without transactions.

    Iterating yields :class:`Result`; records that are not valid results are
    logged and skipped.
    """

    def __init__(self, bootstrap_servers: str | list[str], *, prefix: str = "autoglm",
                 topic: str | None = None, from_beginning: bool = True,
                 max_message_bytes: int = 4 * 1024 * 1024, isolation_level: str = "read_committed",
                 **consumer_kwargs):
        self.topic = topic or TopicNames(prefix).results
        self._bootstrap = bootstrap_servers
        self.from_beginning = from_beginning
        self._security = {k: v for k, v in consumer_kwargs.items()
                          if k == "security_protocol" or k == "ssl_context" or k.startswith("sasl_")}
        self._consumer_kwargs = dict(
            bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest" if from_beginning else "latest",
            max_partition_fetch_bytes=max_message_bytes, fetch_max_bytes=max(max_message_bytes, 52428800),
            client_id=f"autoglm-results-{uuid.uuid4().hex[:8]}", isolation_level=isolation_level,
            **consumer_kwargs,
        )
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> "ResultReader":
        try:
            try:
                parts = await partitions_of(self._bootstrap, self.topic, timeout_s=3.0, client_kwargs=self._security)
            except TopicMissingError:
                raise BrokerError(
                    f"topic {self.topic!r} does not exist on {self._bootstrap}: is a worker running with this "
                    "prefix? (workers create their topics at start)"
                ) from None
            self._consumer = AIOKafkaConsumer(**self._consumer_kwargs)  # after the check: nothing to leak
            await self._consumer.start()
            tps = [TopicPartition(self.topic, p) for p in parts]
            self._consumer.assign(tps)
            if self.from_beginning:
                await self._consumer.seek_to_beginning(*tps)
            else:
                await self._consumer.seek_to_end(*tps)
                for tp in tps:  # resolve the end offsets now, before anything is published
                    await self._consumer.position(tp)
        except KafkaError as exc:
            raise BrokerError(f"cannot read {self.topic!r}: {exc!r}") from exc
        return self

    async def __aexit__(self, *exc) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def records(self, timeout_s: float = 0.5) -> list[Any]:
        """The raw records (aiokafka ``ConsumerRecord``, ``value`` in bytes) fetched within
        ``timeout_s``, undecoded: for tools that read a few fields of many results (benchmarks)."""
        fetched = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000))
        return [rec for recs in fetched.values() for rec in recs]

    async def batches(self, timeout_s: float = 0.5) -> list[Result]:
        """Results fetched within ``timeout_s`` (possibly none)."""
        records = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000))
        out: list[Result] = []
        for recs in records.values():
            for rec in recs:
                try:
                    out.append(decode_result(rec.value))
                except EventError as exc:
                    log.warning("skipping a record on %s offset %d: %s", self.topic, rec.offset, exc)
        return out

    async def __aiter__(self) -> AsyncIterator[Result]:
        while True:
            for result in await self.batches():
                yield result
