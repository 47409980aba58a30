"""The client side users import: publish tasks, read results, or ask and wait (:class:`Client`).

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

import numpy as np

from autoglm.processors.errors import (
    BrokerError,
    EventError,
    ReplyTimeoutError,
    TaskErrorResult,
    TaskExpiredError,
    TaskRejectedError,
    TopicMissingError,
)
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


# -- request / reply -------------------------------------------------------------------------

#: How long a reply topic keeps results (``retention.ms``): one hour; a reply is read within seconds.
REPLY_RETENTION_S = 3600.0


class Client:
    """Request/reply inference over Kafka: ``await client.infer(model, inputs)`` returns the outputs.

    Each client owns a reply topic ``<prefix>.replies.<client id>`` (one
    partition, ``cleanup.policy=delete``, ``retention.ms`` =
    ``reply_retention_s``), created on first use. Tasks carry it as
    ``reply_to``, so workers publish their results there instead of
    ``<prefix>.results``. One consumer reads it outside any consumer group
    (nothing to rebalance, no group left behind) and hands each result to
    the call waiting for its task id; many concurrent calls share it.
    :meth:`close` deletes the reply topic unless ``keep_reply_topic``.

    Example::

        async with Client("127.0.0.1:9092") as client:
            probs = await client.infer("digits", image)          # float32 (1, 10)
            many = await client.infer_many("digits", [a, b, c])   # list of arrays

    Args:
        bootstrap_servers: ``host:port[,host:port]``.
        prefix: topic prefix of the workers.
        client_id: names the reply topic; a random 12-hex id by default.
        reply_retention_s: ``retention.ms`` of the reply topic, seconds (default 1 h).
        keep_reply_topic: leave the reply topic at :meth:`close` (for a client
            that reconnects with the same ``client_id``).
        max_message_bytes: producer and fetch limits, bytes.
        client_kwargs: security settings for every Kafka client (``autoglm.streams.security``).

    Raises:
        BrokerError: the broker is unreachable or refuses to create the topic.
    """

    def __init__(self, bootstrap_servers: str | list[str], *, prefix: str = "autoglm", client_id: str | None = None,
                 reply_retention_s: float = REPLY_RETENTION_S, keep_reply_topic: bool = False,
                 max_message_bytes: int = 4 * 1024 * 1024, client_kwargs: dict[str, Any] | None = None):
        self.names = TopicNames(prefix)
        self.client_id = client_id or uuid.uuid4().hex[:12]
        self.reply_topic = f"{prefix}.replies.{self.client_id}"
        self.reply_retention_s = reply_retention_s
        self.keep_reply_topic = keep_reply_topic
        self._bootstrap = bootstrap_servers
        self._max_bytes = max_message_bytes
        self._kwargs = dict(client_kwargs or {})
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task | None = None
        self._waiting: dict[str, asyncio.Future] = {}
        self._known_topics: set[str] = set()  # task topics seen to exist
        self._started = False
        self._start_lock: asyncio.Lock | None = None  # made on the running loop

    async def __aenter__(self) -> "Client":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Create the reply topic, connect, start reading replies (idempotent; ``infer`` calls it)."""
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:  # concurrent first calls set up one consumer, not one each
            if not self._started:
                await self._start()

    async def _check_task_topic(self, topic: str, what: str) -> None:
        """Fail at once, with the reason, when no worker created the task topic of ``what`` (a model or
        a pipeline; a producer would wait for its metadata until its request timeout, logging every retry).

        Raises:
            TopicMissingError: the topic does not exist (checked once per topic and client).
        """
        if topic in self._known_topics:
            return
        try:
            await partitions_of(self._bootstrap, topic, timeout_s=3.0, client_kwargs=self._kwargs)
        except TopicMissingError:
            raise TopicMissingError(
                f"topic {topic!r} does not exist: is a worker serving {what} with prefix "
                f"{self.names.prefix!r}? (workers create the topics they read at start)") from None
        self._known_topics.add(topic)

    async def _start(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, **self._kwargs)
        try:
            await admin.start()
            if self.reply_topic not in set(await admin.list_topics()):
                await admin.create_topics([NewTopic(
                    name=self.reply_topic, num_partitions=1, replication_factor=1,
                    topic_configs={"cleanup.policy": "delete",
                                   "retention.ms": str(int(self.reply_retention_s * 1000)),
                                   "max.message.bytes": str(self._max_bytes)})])
            self._producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, acks="all", linger_ms=2,
                                              max_request_size=self._max_bytes, **self._kwargs)
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=self._bootstrap, group_id=None, enable_auto_commit=False,
                auto_offset_reset="earliest", fetch_max_wait_ms=20, max_partition_fetch_bytes=self._max_bytes,
                isolation_level="read_committed", client_id=f"autoglm-client-{self.client_id}", **self._kwargs)
            await self._producer.start()
            await self._consumer.start()
            tp = TopicPartition(self.reply_topic, 0)
            await partitions_of(self._bootstrap, self.reply_topic, timeout_s=10.0, client_kwargs=self._kwargs)
            self._consumer.assign([tp])
            await self._consumer.seek_to_end(tp)
            await self._consumer.position(tp)  # resolved now: no reply published after this is missed
        except KafkaError as exc:
            await self._stop_clients()
            raise BrokerError(f"client {self.client_id}: cannot set up reply topic {self.reply_topic!r}: "
                              f"{exc!r}") from exc
        finally:
            await admin.close()
        self._reader = asyncio.ensure_future(self._read_replies())
        self._started = True

    async def close(self) -> None:
        """Stop reading, fail the calls still waiting, close the clients, delete the reply topic."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(BrokerError(f"client {self.client_id} closed before the result arrived"))
        self._waiting.clear()
        await self._stop_clients()
        if self._started and not self.keep_reply_topic:
            from aiokafka.admin import AIOKafkaAdminClient

            admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, **self._kwargs)
            try:
                await admin.start()
                await admin.delete_topics([self.reply_topic])
            except KafkaError as exc:
                log.warning("client %s: reply topic %s not deleted: %r", self.client_id, self.reply_topic, exc)
            finally:
                await admin.close()
        self._started = False

    async def _stop_clients(self) -> None:
        for part in (self._producer, self._consumer):
            if part is not None:
                await part.stop()
        self._producer = self._consumer = None

    async def _read_replies(self) -> None:
        try:
            await self._read_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the calls waiting would otherwise wait for their timeout
            log.error("client %s: reading %s failed: %r", self.client_id, self.reply_topic, exc)
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(BrokerError(f"client {self.client_id}: reading replies failed: {exc!r}"))

    async def _read_loop(self) -> None:
        assert self._consumer is not None
        while True:
            fetched = await self._consumer.getmany(timeout_ms=200)
            for records in fetched.values():
                for rec in records:
                    try:
                        result = decode_result(rec.value)
                    except EventError as exc:
                        log.warning("client %s: skipping a record at offset %d of %s: %s",
                                    self.client_id, rec.offset, self.reply_topic, exc)
                        continue
                    fut = self._waiting.pop(result.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(result)

    async def infer(self, model: str, inputs: Any, *, priority: int | None = None, deadline_s: float | None = None,
                    timeout_s: float = 30.0, attributes: dict[str, str] | None = None) -> Any:
        """Run one task and return its outputs.

        Args:
            model: the model's name.
            inputs: a numpy array (rows along axis 0), a text or list of texts,
                or ``{name: array}`` for a model with several inputs.
            priority: higher is served first.
            deadline_s: seconds from now after which the task is ``expired``
                (sent as ``deadline_ms``, epoch ms).
            timeout_s: seconds to wait for the result.
            attributes: strings passed through to the result.

        Returns:
            The outputs: one numpy array ``(rows, ...)``, or ``{name: array}``.

        Raises:
            TaskExpiredError, TaskRejectedError, TaskErrorResult: the result's
                status was ``expired``, ``rejected`` or ``error``; ``.code``
                carries its error code and ``.result`` the whole result.
            ReplyTimeoutError: no result within ``timeout_s``.
            BrokerError: the task could not be published.
        """
        return (await self.infer_many(model, [inputs], priority=priority, deadline_s=deadline_s,
                                      timeout_s=timeout_s, attributes=attributes))[0]

    async def infer_many(self, model: str, inputs: Iterable[Any], *, priority: int | None = None,
                         deadline_s: float | None = None, timeout_s: float = 30.0,
                         attributes: dict[str, str] | None = None) -> list[Any]:
        """Run one task per entry of ``inputs`` (published pipelined) and return their outputs in order.

        Raises:
            as :meth:`infer`, for the first task that failed (in order).
        """
        results = await self.results(model, inputs, priority=priority, deadline_s=deadline_s, timeout_s=timeout_s,
                                     attributes=attributes)
        return [_outputs_of(r) for r in results]

    async def results(self, model: str, inputs: Iterable[Any], *, priority: int | None = None,
                      deadline_s: float | None = None, timeout_s: float = 30.0,
                      attributes: dict[str, str] | None = None) -> list[Result]:
        """As :meth:`infer_many`, but the whole :class:`Result` of each task, whatever its status.

        Raises:
            ReplyTimeoutError: some result did not arrive within ``timeout_s``.
            BrokerError: a task could not be published.
        """
        return await self._submit(self.names.tasks(model), model, inputs, priority=priority, deadline_s=deadline_s,
                                  timeout_s=timeout_s, attributes=attributes, what=f"model {model!r}")

    async def infer_pipeline(self, pipeline: str, inputs: Any, *, topic: str | None = None, **kwargs: Any) -> Any:
        """Run one task through a pipeline served on Kafka (``autoglm pipeline run``) and return its outputs.

        Args:
            pipeline: the pipeline's name.
            inputs: as :meth:`infer`.
            topic: the pipeline's input topic when its file names one (default
                ``<prefix>.pipelines.<name>.in``).
            kwargs: ``priority``, ``deadline_s``, ``timeout_s``, ``attributes``, as :meth:`infer`.

        Returns:
            ``{result name: array}``: the outputs the pipeline's ``output`` names, of the steps that ran
            (the whole result, with ``skipped`` and per-step ``steps``, from :meth:`pipeline_results`).

        Raises:
            as :meth:`infer`.
        """
        (result,) = await self.pipeline_results(pipeline, [inputs], topic=topic, **kwargs)
        outputs = _outputs_of(result)
        return {} if outputs is None else outputs

    async def pipeline_results(self, pipeline: str, inputs: Iterable[Any], *, topic: str | None = None,
                               priority: int | None = None, deadline_s: float | None = None,
                               timeout_s: float = 30.0, attributes: dict[str, str] | None = None) -> list[Result]:
        """As :meth:`results`, through a pipeline: one task per entry of ``inputs`` (its ``model`` field is
        ``pipeline:<name>``), the whole :class:`Result` of each, in order."""
        return await self._submit(topic or self.names.pipeline_input(pipeline), f"pipeline:{pipeline}", inputs,
                                  priority=priority, deadline_s=deadline_s, timeout_s=timeout_s,
                                  attributes=attributes, what=f"pipeline {pipeline!r}")

    async def _submit(self, topic: str, model: str, inputs: Iterable[Any], *, priority: int | None,
                      deadline_s: float | None, timeout_s: float, attributes: dict[str, str] | None,
                      what: str) -> list[Result]:
        await self.start()
        assert self._producer is not None
        await self._check_task_topic(topic, what)
        loop = asyncio.get_running_loop()
        created = now_ms()
        deadline_ms = None if deadline_s is None else created + int(deadline_s * 1000)
        tasks = [Task(id=f"{self.client_id}-{uuid.uuid4().hex[:16]}", model=model, inputs=_as_inputs(x),
                      priority=priority or 0, deadline_ms=deadline_ms, created_ms=created,
                      reply_to=self.reply_topic, attributes=dict(attributes or {})) for x in inputs]
        encoded = [encode_task(t) for t in tasks]  # first: a task that cannot be encoded leaves nothing waiting
        futures = []
        for task in tasks:
            fut = loop.create_future()
            self._waiting[task.id] = fut
            futures.append(fut)
        try:
            sends = [await self._producer.send(topic, value, key=t.id.encode()) for t, value in zip(tasks, encoded)]
            await asyncio.gather(*sends)
        except KafkaError as exc:
            self._forget(tasks)
            raise BrokerError(f"publish to {topic!r} failed: {exc!r}") from exc
        try:
            _, missing = await asyncio.wait(futures, timeout=timeout_s)
            if missing:
                raise ReplyTimeoutError(f"{len(missing)} of {len(tasks)} results of {what} did not arrive within "
                                        f"{timeout_s} s (is a worker serving {topic!r}?)")
            return [f.result() for f in futures]
        finally:
            for fut in futures:
                fut.cancel()  # a no-op on the done ones
            self._forget(tasks)

    def _forget(self, tasks: list[Task]) -> None:
        for task in tasks:
            self._waiting.pop(task.id, None)


def _as_inputs(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, dict):
        return {k: np.asarray(v) for k, v in value.items()}
    return np.asarray(value)


def _outputs_of(result: Result) -> Any:
    if result.status == "ok":
        return result.outputs
    raise {"expired": TaskExpiredError, "rejected": TaskRejectedError}.get(result.status, TaskErrorResult)(result)


class SyncClient:
    """A blocking :class:`Client` for code without an event loop: a loop runs on a private thread.

    Example::

        with SyncClient("127.0.0.1:9092") as client:
            probs = client.infer("digits", image)

    Arguments are :class:`Client`'s; methods are :meth:`Client.infer` and :meth:`Client.infer_many`.
    """

    def __init__(self, bootstrap_servers: str | list[str], **kwargs: Any):
        import threading

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="autoglm-client", daemon=True)
        self._thread.start()
        self._client = Client(bootstrap_servers, **kwargs)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> "SyncClient":
        self._call(self._client.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def reply_topic(self) -> str:
        """The client's reply topic."""
        return self._client.reply_topic

    def infer(self, model: str, inputs: Any, **kwargs: Any) -> Any:
        """:meth:`Client.infer`, blocking."""
        return self._call(self._client.infer(model, inputs, **kwargs))

    def infer_pipeline(self, pipeline: str, inputs: Any, **kwargs: Any) -> Any:
        """:meth:`Client.infer_pipeline`, blocking."""
        return self._call(self._client.infer_pipeline(pipeline, inputs, **kwargs))

    def pipeline_results(self, pipeline: str, inputs: Iterable[Any], **kwargs: Any) -> list[Any]:
        """:meth:`Client.pipeline_results`, blocking."""
        return self._call(self._client.pipeline_results(pipeline, list(inputs), **kwargs))

    def infer_many(self, model: str, inputs: Iterable[Any], **kwargs: Any) -> list[Any]:
        """:meth:`Client.infer_many`, blocking."""
        return self._call(self._client.infer_many(model, list(inputs), **kwargs))

    def close(self) -> None:
        """Close the client and stop its loop thread."""
        if self._loop.is_closed():
            return
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
