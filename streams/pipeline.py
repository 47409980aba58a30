"""The data path of a worker, batch by batch: decode, validate, batch, infer, publish, commit.

::

    poll (per-partition record lists) ─► decode + validate ──bad──► dead-letter record (+ rejected result)
                                           │ good (finiteness checked once per poll)   │
                                           ▼                                            │ broker ack
                                     micro-batcher (per model)                          ▼
                                           │ batch                       offset tracker ─► commit position
                                           ▼                                            ▲   (in offset order)
                                     model runner thread ─► results, one record batch ──┘ broker ack
                                                            per destination partition

The batch is the unit of work: records arrive as the consumer's per-partition
lists; only parsing a task and splitting its output rows are per task. The
finiteness check of a poll's tensors, the result fields a batch shares,
producing (one record batch per destination partition), offset bookkeeping,
acknowledgements and metrics are per batch.

Commit after produce: the commit position of a partition advances past an
offset only when that task's result or dead-letter record has been
acknowledged by the broker, and only in offset order per partition.

The pipeline knows Kafka only through two callables: ``produce(records)``
(awaitable; resolves when the broker acknowledged every record) and
``ack(partition, next_offset)`` (the partition's commit position advanced).
:mod:`autoglm.streams.app` supplies both; tests supply their own. It never
blocks the consumer: :meth:`TaskPipeline.on_records` is synchronous, and the
consumer asks for at most :attr:`TaskPipeline.capacity` records (the in-flight
cap is the consumer's backpressure, see :mod:`autoglm.streams.consumer`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Hashable, Mapping, Protocol, Sequence

import numpy as np

from autoglm.processors.errors import (
    EventError,
    EventValidationError,
    ModelError,
    TaskTooLargeError,
    TensorError,
    UnknownModelError,
)
from autoglm.processors.batcher import MicroBatcher
from autoglm.processors.batching import BatchPolicy
from autoglm.processors.delivery import InFlightLimiter, OffsetTracker
from autoglm.processors.metrics import BatchMetrics, WindowStats
from autoglm.processors.queue import QueuedTask
from autoglm.streams.codec import loads
from autoglm.streams.hops import NOT_RUN
from autoglm.streams.events import (
    TOPIC_NAME_RE,
    ErrorInfo,
    Result,
    Task,
    decode_task,
    encode_result,
    now_ms,
    readable_field,
)
from autoglm.streams.results import BatchResultEncoder, PipelineResultEncoder, all_finite
from autoglm.streams.topics import TopicNames
from autoglm.streams.tracing import BatchTracing

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
Record = tuple[str, bytes | None, bytes | None, Headers]
TransactFn = Callable[[list[Record], dict[Any, int]], Awaitable[None]]
ProduceFn = Callable[[list[Record]], Awaitable[None]]
AckFn = Callable[[Hashable, int], None]

DLQ_HEADER_CODE = "autoglm.error.code"
DLQ_HEADER_MESSAGE = "autoglm.error.message"
DLQ_HEADER_TOPIC = "autoglm.source.topic"
DLQ_HEADER_PARTITION = "autoglm.source.partition"
DLQ_HEADER_OFFSET = "autoglm.source.offset"
DLQ_HEADER_WORKER = "autoglm.worker"


class ConsumedRecord(Protocol):
    """What the pipeline reads of a consumed record (aiokafka's ``ConsumerRecord`` has it)."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


class Runner(Protocol):
    """What the pipeline uses of a model runner (:class:`~autoglm.models.runner.ModelRunner`,
    :class:`~autoglm.models.fallback.FallbackRunner`)."""

    @property
    def model(self) -> Any:
        """The served :class:`~autoglm.models.base.InferenceModel` (its ``prepare`` runs per task)."""
        ...

    async def run_isolated(self, items: Sequence[Any], *, timeout_s: float | None) -> list[Any]:
        """One outcome per item (``ok``, ``output``, ``error``, ``served_by``), failing tasks isolated."""
        ...


class TopicChecker(Protocol):
    """Whether a ``reply_to`` topic exists (:class:`~autoglm.streams.topics.TopicCache`)."""

    def cached(self, topic: str) -> bool | None:
        """The known answer, without I/O; None when it must be asked."""
        ...

    async def exists(self, topic: str) -> bool:
        """Ask the broker (cached)."""
        ...


@dataclass(slots=True)
class Pending:
    """A valid task on its way through the model."""

    task: Task
    prepared: Any
    partition: Hashable
    offset: int
    received_s: float
    received_ms: int
    key: bytes | None = None
    value: bytes | None = None
    deadline_s: float | None = None
    headers: Sequence[tuple[str, bytes]] = ()
    hop: Any = None  # a pipeline step's task: its Hop (autoglm.streams.hops)


@dataclass(slots=True)
class PipelineCounters:
    """Totals since start (for status and tests)."""

    received: int = 0
    results_ok: int = 0
    results_error: int = 0
    results_expired: int = 0
    dead_letters: int = 0
    batches: int = 0
    isolated_failures: int = 0
    oversized_results: int = 0
    transactions: int = 0


class TaskPipeline:
    """Serves the task records of one worker.

    Args:
        names: topic names.
        worker_id: written into results and dead-letter headers.
        runners: model name -> a started runner (:class:`~autoglm.models.runner.ModelRunner`
            or a fallback pair): ``.model`` and ``async run_isolated(items, timeout_s=)``.
        policies: model name -> batching policy.
        produce: ``async produce(records)``: produce ``(topic, key, value, headers)``
            records and return once the broker acknowledged all of them.
        ack: ``ack(partition, next_offset)``: every offset of ``partition`` below
            ``next_offset`` is answered and acknowledged (the commit position).
        max_in_flight: tasks between receipt and acknowledgement (the memory bound);
            the consumer asks for at most :attr:`capacity` records.
        on_fatal: called with the exception when a result cannot be delivered
            (the worker must stop so that the task is consumed again).
        metrics: batching metrics (default: records nothing).
        topics: checks ``reply_to`` topics; a task whose ``reply_to`` names a missing
            topic is rejected. The record loop never waits for the broker: a task whose
            topic is not known yet waits beside the queue until it is (default: every
            topic exists).
        delivery_timeout_s: the longest the broker may take to acknowledge a
            batch's records; past it the delivery is fatal like a failed one.
        inference_timeout_s: per-batch forward timeout (None: no timeout); a
            batch past it gets ``inference_timeout`` error results.
        max_task_bytes: a task record's value larger than this is dead-lettered
            (``too_large``) without being parsed beyond its id.
        max_result_bytes: a result larger than this is replaced by an error
            result ``result_too_large`` (never dropped).
        transact: exactly-once mode: ``transact(records, offsets)`` produces the
            records and commits ``offsets`` (partition -> next offset to read)
            in one Kafka transaction (see
            :class:`~autoglm.streams.transactions.TransactionalSettler`).
        tracing: OpenTelemetry spans per batch (:mod:`autoglm.streams.tracing`; default off:
            nothing is done per task, one no-op call per batch).
        group_id: the consumer group, for the spans' ``messaging.consumer.group.name``.
        stages: pipeline steps served as streams: stream name -> its
            :class:`~autoglm.streams.hops.StepStage` (``runners`` and ``policies`` have an entry
            under the same name). Their records are tasks (a pipeline's input) or hops, and a
            finished task becomes a hop to its next step or its pipeline result.
        clock: monotonic seconds.

    Model failures: runners answer ``run_isolated(items, timeout_s=)`` with one
    outcome per task (a batch that raises is bisected to isolate the failing
    tasks, see :meth:`autoglm.models.runner.ModelRunner.run_isolated`). A task
    that fails alone (``inference``) gets an ``error`` result and a dead-letter
    record with its original bytes; a timeout or a model that failed to load
    gets an ``error`` result only (retriable, not the task's fault).
    """

    def __init__(
        self,
        *,
        names: TopicNames,
        worker_id: str,
        runners: Mapping[str, Runner],
        policies: Mapping[str, BatchPolicy],
        produce: ProduceFn,
        ack: AckFn,
        max_in_flight: int,
        on_fatal: Callable[[BaseException], None] | None = None,
        metrics: BatchMetrics | None = None,
        topics: TopicChecker | None = None,
        delivery_timeout_s: float = 120.0,
        inference_timeout_s: float | None = None,
        max_task_bytes: int | None = None,
        max_result_bytes: int | None = None,
        transact: TransactFn | None = None,
        tracing: BatchTracing | None = None,
        group_id: str = "",
        stages: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.names = names
        self.worker_id = worker_id
        self.runners = dict(runners)
        self.policies = dict(policies)
        self._produce = produce
        self._ack = ack
        self._on_fatal = on_fatal or (lambda exc: None)
        self.clock = clock
        self.metrics = metrics or BatchMetrics()
        self._topics = topics
        self.delivery_timeout_s = delivery_timeout_s
        self.inference_timeout_s = inference_timeout_s
        self.max_task_bytes = max_task_bytes
        self.max_result_bytes = max_result_bytes
        self._transact = transact
        self.tracing = tracing or BatchTracing()
        self.group_id = group_id
        self.stages = dict(stages or {})
        self._held: dict[tuple[Hashable, int], list[Record]] = {}
        self._released: set[Hashable] = set()
        self.limiter = InFlightLimiter(max_in_flight)
        self.tracker: OffsetTracker[int] = OffsetTracker()
        self.counters = PipelineCounters()
        self.batchers: dict[str, MicroBatcher[Pending]] = {
            name: MicroBatcher(self._batch_handler(name), self.policies[name], on_expired=self._on_expired,
                               clock=clock, name=f"batcher-{name}")
            for name in self.runners
        }
        self.windows: dict[str, WindowStats] = {name: WindowStats() for name in self.runners}
        self._started = False
        self._background: set[asyncio.Task] = set()
        # per model: (start_s, size, asked) of the last batch, when a backlog waited behind it
        self._saturated: dict[str, tuple[float, int, int] | None] = {}
        # reply_to topics being checked: topic -> tasks waiting for the answer
        self._awaiting_topic: dict[str, list[Pending]] = {}

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Start the batchers on the running loop."""
        self._started = True
        for batcher in self.batchers.values():
            batcher.start()

    def add_model(self, name: str, runner: Any, policy: BatchPolicy) -> None:
        """Serve one more model (``ctl load``): its runner, batching policy, batcher and metrics window.

        A model served already gets the new runner only (a reload swaps the
        runner; its policy, queue and window stay).
        """
        self.runners[name] = runner
        if name in self.batchers:
            return
        self.policies[name] = policy
        self.windows[name] = WindowStats()
        batcher = MicroBatcher(self._batch_handler(name), policy, on_expired=self._on_expired, clock=self.clock,
                               name=f"batcher-{name}")
        self.batchers[name] = batcher
        if self._started:
            batcher.start()

    async def remove_model(self, name: str) -> None:
        """Stop serving ``name`` (after its drain, ``ctl unload``): its queued tasks, if any, are
        served first (flush), then its batcher, policy and window are dropped."""
        batcher = self.batchers.get(name)
        if batcher is not None:
            await batcher.stop(flush=True)
        self.runners.pop(name, None)
        self.batchers.pop(name, None)
        self.policies.pop(name, None)
        self.windows.pop(name, None)
        self._saturated.pop(name, None)

    def model_in_flight(self, name: str, partitions: Sequence[Hashable]) -> int:
        """Tasks of ``name`` received on ``partitions`` and not yet acknowledged, plus those waiting
        for their ``reply_to`` topic."""
        waiting = sum(1 for tasks in self._awaiting_topic.values() for p in tasks
                      if self.names.model_of(p.partition[0]) == name)
        return sum(self.tracker.in_flight(tp) for tp in partitions) + waiting

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Flush queued tasks, wait for their results to be acknowledged (up to ``timeout_s``)."""
        try:
            await asyncio.wait_for(self._drain(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("stop: %d tasks still in flight after %.1f s", self.limiter.in_flight, timeout_s)

    async def _drain(self) -> None:
        await asyncio.gather(*(b.stop(flush=True) for b in self.batchers.values()))
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    @property
    def in_flight(self) -> int:
        """Tasks received and not yet acknowledged (their result or dead letter not yet on the broker)."""
        return self.limiter.in_flight

    @property
    def capacity(self) -> int:
        """How many more records the consumer may hand over now (``max_in_flight - in_flight``)."""
        return max(0, self.limiter.limit - self.limiter.in_flight)

    async def wait_capacity(self, at_least: int, timeout_s: float) -> None:
        """Return once ``at_least`` in-flight slots are free, or after ``timeout_s`` seconds."""
        await self.limiter.wait_free(at_least, timeout_s)

    async def wait_idle(self, poll_s: float = 0.01) -> None:
        """Return once nothing is in flight: every received task answered and acknowledged."""
        while self.limiter.in_flight or self._background:
            if self._background:
                await asyncio.gather(*list(self._background), return_exceptions=True)
            else:
                await asyncio.sleep(poll_s)

    def set_flushing(self, flushing: bool, model: str | None = None) -> None:
        """While set (a drain or a stop), partial batches go to the model at once (of ``model``, or all)."""
        for name, batcher in self.batchers.items():
            if model is None or name == model:
                batcher.set_flushing(flushing)

    def figures(self, window_s: float, *, reset: bool = True) -> dict[str, dict[str, Any]]:
        """Per-model figures since the previous call with ``reset``, for heartbeats and status reports.

        Args:
            window_s: seconds since the previous call with ``reset``.
            reset: start a new window.

        Returns:
            model -> ``results``, ``throughput_per_s``, ``p50_ms``, ``p99_ms``,
            ``mean_batch_size`` (see :class:`~autoglm.processors.metrics.WindowStats`),
            ``queue_depth`` (tasks waiting for a batch), and the batching policy's
            figures (:meth:`~autoglm.processors.batching.BatchPolicy.figures`: ``mode``,
            ``latency_target_s``, ``max_batch_size``, ``max_wait_s``, ``target_size``
            and the cost-model estimates ``service_fixed_ms``, ``service_per_task_ms``,
            ``service_spread_ms`` when it has them).
        """
        out: dict[str, dict[str, Any]] = {}
        for name, window in self.windows.items():
            fig: dict[str, Any] = window.take(window_s, reset=reset)
            fig["queue_depth"] = len(self.batchers[name])
            fig.update(self.policies[name].figures().report())
            out[name] = fig
        return out

    async def release_partitions(self, partitions: Sequence[Hashable], timeout_s: float) -> int:
        """Get ready to hand ``partitions`` to another worker (before a rebalance revokes them).

        Their tasks still queued for a batch are taken out (not served, not acknowledged: the
        new owner serves them from the last commit); records of theirs that arrive from now on
        are dropped the same way; their tasks already in a model batch or being delivered are
        awaited, up to ``timeout_s``, so that they are acknowledged and can be committed before
        the partitions go. Returns how many tasks were handed back.
        """
        tps = set(partitions)
        self._released |= tps
        handed_back: dict[Hashable, int] = {}

        def revoked(p: Pending) -> bool:
            return p.partition in tps

        taken = [p for batcher in self.batchers.values() for p in batcher.remove_if(revoked)]
        for topic, waiting in self._awaiting_topic.items():
            taken += [p for p in waiting if revoked(p)]
            waiting[:] = [p for p in waiting if not revoked(p)]
        for pending in taken:
            handed_back[pending.partition] = handed_back.get(pending.partition, 0) + 1
        deadline = self.clock() + timeout_s
        while any(self.tracker.unfinished(tp) > handed_back.get(tp, 0) for tp in tps):
            if self.clock() >= deadline:
                log.warning("rebalance: tasks of %s still in the model after %.1f s; they may be served twice",
                            sorted(map(str, tps)), timeout_s)
                break
            await asyncio.sleep(0.01)
        if handed_back:
            log.info("rebalance: %d queued tasks of revoked partitions handed back uncommitted",
                     sum(handed_back.values()))
        return sum(handed_back.values())

    def assigned(self, partitions: Sequence[Hashable]) -> None:
        """Partitions assigned (again) to this worker: their records are served."""
        self._released -= set(partitions)

    def revoke(self, partitions: Sequence[Hashable]) -> None:
        """Forget revoked partitions (their unfinished tasks may be served again by the new owner)."""
        for tp in partitions:
            lost = self.tracker.revoke(tp)
            held = [key for key in self._held if key[0] == tp]
            for key in held:  # finished but never committed (exactly-once): the new owner serves them again
                del self._held[key]
            # every unfinished task of the partition leaves the in-flight count now; its later settle
            # finds no tracked offset and releases nothing (see _settle)
            self.limiter.release(lost + len(held))
            if lost:
                log.info("partition %s revoked with %d tasks in flight", tp, lost)

    # -- records --------------------------------------------------------------

    def on_records(self, topic: str, partition: int, records: Sequence[ConsumedRecord]) -> None:
        """Take the records of one partition from one poll (in offset order). Never blocks.

        Each record is decoded and validated; valid tasks go to their model's batcher, invalid
        ones to the dead-letter topic. The caller hands over at most :attr:`capacity` records
        (more are accepted, over the cap).
        """
        tp = (topic, partition)
        if tp in self._released or not records:  # its partition is being handed over: the new owner serves it
            return
        model = self.names.model_of(topic)
        runner = self.runners.get(model) if model is not None else None
        stage = self.stages.get(model) if model is not None else None
        received_s, received_ms = self.clock(), now_ms()
        self.limiter.take(len(records))
        self.counters.received += len(records)
        tracker, max_task_bytes = self.tracker, self.max_task_bytes
        valid: list[Pending] = []
        rejected: list[tuple[int, bytes | None, bytes | None, EventError]] = []
        for record in records:
            offset, value = record.offset, record.value
            try:
                tracker.received(tp, offset, offset)
            except ValueError:  # already in flight here (redelivered without a revoke): serve it once
                self.limiter.release()
                log.warning("skipping %s offset %d: already in flight", tp, offset)
                continue
            try:
                if max_task_bytes is not None and value is not None and len(value) > max_task_bytes:
                    raise TaskTooLargeError(
                        f"task record is {len(value)} bytes, above max_task_bytes={max_task_bytes} "
                        "(AUTOGLM_MAX_TASK_BYTES)", task_id=readable_field(value, "id"),
                        model=readable_field(value, "model"),
                    )
                if stage is not None and runner is not None:
                    hop, task, prepared = stage.receive(value, received_ms, runner.model)
                else:
                    hop = None
                    task = decode_task(value, check_finite=False)
                    if task.model != model or runner is None:
                        raise self._wrong_model(task, topic, model)
                    try:
                        prepared = runner.model.prepare(task.inputs)
                    except EventError as exc:
                        exc.task_id, exc.model = task.id, task.model
                        raise
            except EventError as exc:
                rejected.append((offset, record.key, value, exc))
                continue
            valid.append(Pending(task, prepared, tp, offset, received_s, received_ms, record.key, value,
                                 None, record.headers, hop))
        # NaN/inf: one vectorised check of what the model would see (the prepared rows), per poll
        if valid and not all_finite([a for p in valid for a in _arrays(p.prepared)]):
            valid = self._reject_non_finite(valid, rejected)
        if rejected:
            self._spawn(self._dead_letters(tp, rejected))
        for pending in valid:
            self._admit(pending, model)

    def _wrong_model(self, task: Task, topic: str, model: str | None) -> UnknownModelError:
        if task.model != model:
            return UnknownModelError(
                f"task names model {task.model!r} but arrived on {topic!r}, the topic of model {model!r}; "
                f"publish it to {self.names.tasks(task.model)!r}",
                task_id=task.id, model=task.model,
            )
        return UnknownModelError(f"model {model!r} is not served by this worker (serves {sorted(self.runners)})",
                                 task_id=task.id, model=task.model)

    @staticmethod
    def _reject_non_finite(valid: list[Pending], rejected: list) -> list[Pending]:
        """The poll's vectorised check failed: find the tasks with NaN/inf, task by task."""
        keep = []
        for p in valid:
            if not all_finite(_arrays(p.prepared)):
                rejected.append((p.offset, p.key, p.value, TensorError(
                    "inputs.data", "finite numbers", "NaN or inf", task_id=p.task.id, model=p.task.model)))
            else:
                keep.append(p)
        return keep

    def _admit(self, pending: Pending, model: str | None) -> None:
        """Queue a valid task for its model, once its ``reply_to`` topic is known to exist."""
        task = pending.task
        if task.reply_to is not None and self._topics is not None:
            known = self._topics.cached(task.reply_to)
            if known is None:  # ask the broker in the background; the record loop goes on
                waiting = self._awaiting_topic.get(task.reply_to)
                if waiting is None:
                    self._awaiting_topic[task.reply_to] = [pending]
                    self._spawn(self._check_reply_to(task.reply_to))
                else:
                    waiting.append(pending)
                return
            if not known:
                self._reject_reply_to(pending)
                return
        if task.deadline_ms is not None:
            received_s = pending.received_s
            pending.deadline_s = received_s + (task.deadline_ms - pending.received_ms) / 1000.0
            if pending.deadline_s <= received_s:  # already past its deadline: never reaches the model
                self._on_expired([QueuedTask(pending, received_s, pending.deadline_s)])
                return
        if pending.prepared is NOT_RUN:  # a pipeline step that does not run for it: on to the next
            self._spawn(self._settle([self._forward(pending)]))
            return
        self.batchers[model].put(pending, priority=task.priority, deadline_s=pending.deadline_s)

    async def _check_reply_to(self, topic: str) -> None:
        assert self._topics is not None
        try:
            await self._topics.exists(topic)
        finally:
            for pending in self._awaiting_topic.pop(topic, []):
                if self._topics.cached(topic):  # the stream it arrived on (a model, or a pipeline step)
                    self._admit(pending, self.names.model_of(pending.partition[0]))
                else:
                    self._reject_reply_to(pending)

    def _reject_reply_to(self, pending: Pending) -> None:
        exc = EventValidationError("reply_to", "an existing topic", pending.task.reply_to,
                                   task_id=pending.task.id, model=pending.task.model)
        self._spawn(self._dead_letters(pending.partition, [(pending.offset, pending.key, pending.value, exc)]))

    def configure(self, model: str | None = None, **params: Any) -> list[str]:
        """Re-tune the batching of one model (or all): ``latency_target_s``, ``max_batch_size``,
        ``max_wait_s``, ``mode``. Returns the models changed.

        Raises:
            KeyError: ``model`` is not served here.
            ValueError: a value is out of range (nothing is changed).
        """
        names = [model] if model is not None else list(self.policies)
        for name in names:
            if name not in self.policies:
                raise KeyError(f"model {name!r} is not served by this worker")
        for name in names:
            self.policies[name].configure(**params)
        return names

    def _on_expired(self, expired: list[QueuedTask[Pending]]) -> None:
        """Answer tasks whose deadline passed before they reached the model: ``expired`` results."""
        now_wall = now_ms()
        batch = [q.item for q in expired]
        results = [
            Result(
                id=p.task.id, model=p.task.model, status="expired",
                error=ErrorInfo("deadline", f"deadline_ms {p.task.deadline_ms} passed before the task was served"),
                worker=self.worker_id, queue_ms=(self.clock() - p.received_s) * 1000.0,
                end_to_end_ms=float(max(0, now_wall - (p.task.created_ms or p.received_ms))),
                attributes=p.task.attributes,
            ) if p.hop is None else self._stage_of(p).result(
                p.hop, worker=self.worker_id, status="expired",
                error=ErrorInfo("deadline", f"deadline_ms {p.task.deadline_ms} passed before step "
                                            f"{p.hop.step!r} served the task"))
            for p in batch
        ]
        self._spawn(self._settle([self._records_of(p, r, encode_result(r)) for p, r in zip(batch, results)]))

    # -- batches --------------------------------------------------------------

    def _batch_handler(self, model: str) -> Callable[[list[QueuedTask[Pending]]], Awaitable[None]]:
        async def handle(batch: list[QueuedTask[Pending]]) -> None:
            await self._run_batch(model, [q.item for q in batch])

        return handle

    async def _run_batch(self, model: str, batch: list[Pending]) -> None:
        runner = self.runners.get(model)
        start_s = self.clock()
        previous = self._saturated.get(model)
        policy = self.policies[model]
        # a backlog: tasks left in the queue here, or (a stream-bound pipeline, whose queue stays
        # short) the last batch missed its target, so tasks are waiting upstream in Kafka
        backlog = len(self.batchers[model]) > 0 or policy.over_target
        if previous is not None and backlog:  # a backlog before and now: the cycle time is the cost
            policy.observe_cycle(previous[1], start_s - previous[0], previous[2])
        self._saturated[model] = (start_s, len(batch), policy.last_target_size) if backlog else None
        traced = [(p.partition[1], p.offset, p.headers) for p in batch] if self.tracing.enabled else ()
        with self.tracing.process(self.names.tasks(model), model=model, group=self.group_id, records=traced) as span:
            try:
                if runner is None:  # unloaded meanwhile (an unload drains first, so only a forced stop gets here)
                    raise ModelError(f"model {model!r} was unloaded from this worker")
                outcomes = await runner.run_isolated([p.prepared for p in batch], timeout_s=self.inference_timeout_s)
            except ModelError as exc:  # the runner itself is unusable (closed): every task gets the error
                log.error("model %s failed on a batch of %d: %s", model, len(batch), exc)
                outcomes = [_Failed(model, ErrorInfo(exc.code, str(exc)))] * len(batch)
            inference_s = self.clock() - start_s
            span.set_inference(inference_s)
            self.counters.batches += 1
            if model in self.stages:
                groups, latencies_s, failed = self._encode_steps(model, batch, outcomes, start_s, inference_s)
            else:
                groups, latencies_s, failed = self._encode_batch(model, batch, outcomes, start_s, inference_s)
            if failed:
                log.error("model %s: %d of %d tasks failed (%s)", model, len(failed), len(batch),
                          ", ".join(sorted(failed)))
            # the cost model learns from clean batches only: bisection, retries and timeouts inflate the time
            self._observe(model, batch, latencies_s, start_s, inference_s, learn=not failed)
            # spawned inside the span: its ``send`` span is a child of this batch's ``process`` span
            self._spawn(self._settle(groups, traced=self.tracing.enabled))

    def _encode_batch(self, model: str, batch: list[Pending], outcomes: Sequence[Any], start_s: float,
                      inference_s: float) -> tuple[list[tuple[Hashable, int, list[Record]]], list[float], set[str]]:
        """Results of one batch as records: the ``ok`` ones through one :class:`BatchResultEncoder`.

        Returns:
            ``(groups, latencies_s, failed_codes)``: one ``(partition, offset, records)``
            per task, each task's end-to-end latency, the error codes of failed tasks.
        """
        finished_ms = now_ms()
        inference_ms = inference_s * 1000.0
        served_by = outcomes[0].served_by if outcomes else model
        encoder = BatchResultEncoder(model, self.worker_id, len(batch), inference_ms, served_by)
        outputs_ok = all_finite([o.output for o in outcomes if o.ok and type(o.output) is np.ndarray])
        groups: list[tuple[Hashable, int, list[Record]]] = []
        latencies_s: list[float] = []
        failed: set[str] = set()
        ok = 0
        max_result_bytes = self.max_result_bytes
        for p, outcome in zip(batch, outcomes):
            task = p.task
            e2e_ms = float(max(0, finished_ms - (task.created_ms or p.received_ms)))
            latencies_s.append(e2e_ms / 1000.0)
            queue_ms = (start_s - p.received_s) * 1000.0
            value = None
            if outcome.ok and type(outcome.output) is np.ndarray and outcome.served_by == served_by and (
                    outputs_ok or all_finite([outcome.output])):
                try:
                    value = encoder.encode(task.id, outcome.output, queue_ms, e2e_ms, task.attributes)
                except TensorError:
                    value = None
            if value is not None and (max_result_bytes is None or len(value) <= max_result_bytes):
                ok += 1
                groups.append(self._records_of(p, None, value))
                continue
            # the rare paths: an error, an output that cannot be sent, a result too large, a mixed batch
            result = Result(
                id=task.id, model=model, status="ok" if outcome.ok else "error",
                outputs=outcome.output if outcome.ok else None,
                error=None if outcome.ok else ErrorInfo(outcome.error.code, outcome.error.message),
                batch_size=len(batch), worker=self.worker_id, queue_ms=queue_ms, inference_ms=inference_ms,
                end_to_end_ms=e2e_ms, attributes=task.attributes, served_by=outcome.served_by,
            )
            result, value = self._encode_checked(result)
            if result.status == "ok":
                ok += 1
            else:
                failed.add(result.error.code)
            groups.append(self._records_of(p, result, value))
        if ok:
            self.counters.results_ok += ok
            self.metrics.count_tasks(model, "ok", ok)
        return groups, latencies_s, failed

    def _encode_steps(self, name: str, batch: list[Pending], outcomes: Sequence[Any], start_s: float,
                      inference_s: float) -> tuple[list[tuple[Hashable, int, list[Record]]], list[float], set[str]]:
        """A pipeline step's batch: each task's outcome recorded in its hop, then the hop on to its
        next step (or its result). Latencies are the step's own, receipt to now (its target is the
        step's share of the pipeline's). Returns what :meth:`_encode_batch` does."""
        stage = self.stages[name]
        step_model = stage.step.model
        now_s = self.clock()
        inference_ms = round(inference_s * 1000.0, 3)
        # NaN/inf: one vectorised check of the batch's outputs; task by task only when it fails
        checked = all_finite([a for o in outcomes if o.ok for a in _arrays(o.output)])
        encoder = PipelineResultEncoder(stage.pipeline.name, self.worker_id, len(batch))
        groups: list[tuple[Hashable, int, list[Record]]] = []
        latencies_s: list[float] = []
        failed: set[str] = set()
        errors = 0
        for p, outcome in zip(batch, outcomes):
            timing = {"step": stage.step.name, "model": step_model, "worker": self.worker_id,
                      "batch_size": len(batch), "queue_ms": round((start_s - p.received_s) * 1000.0, 3),
                      "inference_ms": inference_ms}
            if outcome.served_by and outcome.served_by != step_model:
                timing["served_by"] = outcome.served_by
            error = stage.served(p.hop, outcome, timing, finite=checked)
            if error is not None:
                failed.add(error.code)
                errors += 1
            latencies_s.append(now_s - p.received_s)
            groups.append(self._forward(p, isolated=error is not None and error.code == "inference", encoder=encoder))
        if len(batch) - errors:
            self.metrics.count_tasks(name, "ok", len(batch) - errors)
        if errors:
            self.metrics.count_tasks(name, "error", errors)
        return groups, latencies_s, failed

    def _stage_of(self, pending: Pending) -> Any:
        return self.stages[self.names.model_of(pending.partition[0])]

    def _forward(self, pending: Pending, *, isolated: bool = False,
                 encoder: PipelineResultEncoder | None = None) -> tuple[Hashable, int, list[Record]]:
        """The records a pipeline step's task becomes: a hop to its next step or its result (plus a
        dead letter with its bytes when it made the step's model fail on its own). ``encoder``: the
        batch's, for an ``ok`` result."""
        hop = pending.hop
        headers = self.tracing.result_headers(pending.headers) if self.tracing.enabled else []
        out = self._stage_of(pending).forward(hop, worker=self.worker_id)
        if isinstance(out, tuple):
            records: list[Record] = [(out[0], hop.state.id.encode(), out[1], headers)]
        else:
            value = None
            if encoder is not None and out.status == "ok":
                try:
                    value = encoder.encode(out)
                except TensorError:
                    value = None
                if value is not None and self.max_result_bytes is not None and len(value) > self.max_result_bytes:
                    value = None
            if value is not None:
                result = out
            else:  # the rare paths: an error, a dtype the wire has not, a result too large
                result, value = self._encode_checked(out)
            if result.status == "ok":
                self.counters.results_ok += 1
            else:
                self.counters.results_error += 1
            records = [(pending.task.reply_to or self.names.results, hop.state.id.encode(), value, headers)]
        if isolated:
            error = hop.state.errors.get(hop.steps[-1]["step"]) if hop.steps else None
            self.counters.isolated_failures += 1
            self.counters.dead_letters += 1
            records.append((self.names.dlq, pending.key, pending.value, self._dlq_headers(
                pending.partition, pending.offset, "inference", error.message if error else "inference failed")))
        return pending.partition, pending.offset, records

    def _encode_checked(self, result: Result) -> tuple[Result, bytes]:
        """Encode one result; NaN/inf outputs and oversized results become error results."""
        try:
            value = encode_result(result)
        except TensorError as exc:  # NaN/inf from the model, or a dtype the wire has not: never emitted
            result = dataclasses.replace(result, status="error", outputs=None,
                                         error=ErrorInfo("invalid_output", str(exc)))
            value = encode_result(result)
        if self.max_result_bytes is not None and len(value) > self.max_result_bytes:
            self.counters.oversized_results += 1
            result = dataclasses.replace(result, status="error", outputs=None, error=ErrorInfo(
                "result_too_large", f"result is {len(value)} bytes, above max_result_bytes="
                                    f"{self.max_result_bytes} (AUTOGLM_MAX_RESULT_BYTES)"))
            value = encode_result(result)
        return result, value

    def _records_of(self, pending: Pending, result: Result | None, value: bytes) -> tuple[Hashable, int, list[Record]]:
        """The records answering one task: its result (``result`` None: an ``ok`` one, counted by
        the caller), and a dead letter with its bytes when the model failed on it alone."""
        task = pending.task
        headers = self.tracing.result_headers(pending.headers) if self.tracing.enabled else []
        records: list[Record] = [(task.reply_to or self.names.results, task.id.encode(), value, headers)]
        if result is not None:
            if result.status == "expired":
                self.counters.results_expired += 1
            elif result.status == "error":
                self.counters.results_error += 1
            if result.status != "ok":  # a pipeline task's model field is the client's text: its stream's name
                label = result.model if pending.hop is None else self.names.model_of(pending.partition[0])
                self.metrics.count_tasks(label, result.status)
            if result.status == "error" and result.error is not None and result.error.code == "inference":
                # this task made the model fail on its own (isolated by bisection): keep its bytes
                self.counters.isolated_failures += 1
                self.counters.dead_letters += 1
                records.append((self.names.dlq, pending.key, pending.value, self._dlq_headers(
                    pending.partition, pending.offset, result.error.code, result.error.message)))
        return pending.partition, pending.offset, records

    def _observe(self, model: str, batch: list[Pending], latencies_s: list[float], start_s: float,
                 inference_s: float, *, learn: bool) -> None:
        policy = self.policies[model]
        if learn:
            policy.observe(self.clock(), len(batch), inference_s, latencies_s)
        self.metrics.observe_batch(model, len(batch), inference_s, [start_s - p.received_s for p in batch])
        self.windows[model].observe_batch(len(batch), latencies_s)
        self.metrics.set_policy_figures(model, policy.figures())

    async def _dead_letters(self, tp: Hashable, rejected: list[tuple[int, bytes | None, bytes | None, EventError]]) -> None:
        """Dead-letter records (and ``rejected`` results when the id is readable) for invalid tasks."""
        topic_model = self.names.model_of(tp[0]) if isinstance(tp, tuple) else None
        groups: list[tuple[Hashable, int, list[Record]]] = []
        for offset, key, value, exc in rejected:
            self.counters.dead_letters += 1
            log.warning("dead-lettering %s offset %d: %s: %s", tp, offset, exc.code, exc)
            records: list[Record] = [(self.names.dlq, key, value, self._dlq_headers(tp, offset, exc.code, str(exc)))]
            if exc.task_id:
                bad_reply_to = isinstance(exc, EventValidationError) and exc.field == "reply_to"
                reply_to = None if bad_reply_to else _reply_to(value, exc)
                rejected_result = Result(id=exc.task_id, model=exc.model or "", status="rejected",
                                         error=ErrorInfo(exc.code, str(exc)), worker=self.worker_id)
                records.append((reply_to or self.names.results, exc.task_id.encode(),
                                encode_result(rejected_result), []))
            groups.append((tp, offset, records))
        self.metrics.count_tasks(topic_model or "unknown", "rejected", len(rejected))  # never a label from the payload
        await self._settle(groups)

    def _dlq_headers(self, tp: Hashable, offset: int, code: str, message: str) -> Headers:
        topic, partition = tp if isinstance(tp, tuple) else (str(tp), -1)
        return [
            (DLQ_HEADER_CODE, code.encode()),
            (DLQ_HEADER_MESSAGE, message[:1000].encode()),
            (DLQ_HEADER_TOPIC, str(topic).encode()),
            (DLQ_HEADER_PARTITION, str(partition).encode()),
            (DLQ_HEADER_OFFSET, str(offset).encode()),
            (DLQ_HEADER_WORKER, self.worker_id.encode()),
        ]

    async def _settle(self, groups: list[tuple[Hashable, int, list[Record]]], *, traced: bool = False) -> None:
        """Deliver the records of finished tasks (one group per consumed offset), then advance
        the commit positions of their partitions and free their in-flight slots.

        At-least-once: produce every record (one record batch per destination
        partition), wait for the broker's acks, then advance the commit
        positions. Exactly-once (a ``transact`` callable was given): a task's
        records wait until every earlier offset of its partition is finished
        too, then go out in one Kafka transaction together with the offsets
        they complete, so results and commits become visible together or not
        at all.

        A record that cannot be delivered is fatal: its task must not be
        committed, so the worker stops and the task is consumed again.
        """
        if self._transact is not None:
            await self._settle_transactional(groups)
            return
        records = [record for _, _, recs in groups for record in recs]
        try:
            if traced:
                with self.tracing.send(records[0][0] if records else self.names.results, count=len(records)):
                    await asyncio.wait_for(self._produce(records), self.delivery_timeout_s)
            else:
                await asyncio.wait_for(self._produce(records), self.delivery_timeout_s)
        except Exception as exc:
            log.critical("could not deliver %d records; stopping so they are consumed again: %r", len(records), exc)
            self._on_fatal(exc)
            return
        positions: dict[Hashable, int] = {}
        slots = 0
        tracker = self.tracker
        for tp, offset, _ in groups:
            if not tracker.tracks(tp, offset):
                continue  # its partition was revoked (its slot was freed then): nothing to commit here
            slots += 1
            released = tracker.done(tp, offset)
            if released:
                positions[tp] = released[-1] + 1
        for tp, position in positions.items():
            self._ack(tp, position)
        self.limiter.release(slots)

    async def _settle_transactional(self, groups: list[tuple[Hashable, int, list[Record]]]) -> None:
        assert self._transact is not None
        released: list[Record] = []
        offsets: dict[Hashable, int] = {}
        slots = 0
        for tp, offset, records in groups:
            if not self.tracker.tracks(tp, offset):
                continue  # its partition was revoked: nothing is committed here, the new owner serves it
            self._held[(tp, offset)] = records
            for done_offset in self.tracker.done(tp, offset):
                released.extend(self._held.pop((tp, done_offset)))
                offsets[tp] = done_offset + 1
                slots += 1
        if offsets:
            try:
                await asyncio.wait_for(self._transact(released, offsets), self.delivery_timeout_s)
            except Exception as exc:
                log.critical("transaction of %d records failed; stopping so that their tasks are consumed "
                             "again (nothing of it is visible to read_committed readers): %r", len(released), exc)
                self._on_fatal(exc)
                return
            self.counters.transactions += 1
        for tp, position in offsets.items():  # committed already; a later commit of the same offsets is a no-op
            self._ack(tp, position)
        self.limiter.release(slots)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


@dataclass(frozen=True, slots=True)
class _Failed:
    """The outcome of every task of a batch whose runner could not run at all."""

    served_by: str
    info: ErrorInfo
    ok: bool = False
    output: None = None

    @property
    def error(self) -> ErrorInfo:
        return self.info


def _arrays(prepared: Any) -> list[np.ndarray]:
    """The arrays of a prepared task: itself, or the values of named inputs (texts have none)."""
    if type(prepared) is np.ndarray:
        return [prepared]
    if isinstance(prepared, dict):
        return [a for a in prepared.values() if isinstance(a, np.ndarray)]
    return []


def _reply_to(value: bytes | None, exc: EventError) -> str | None:
    """The task's valid ``reply_to`` when the event was readable enough to have one."""
    if not exc.task_id or value is None:
        return None
    try:
        reply_to = loads(value).get("reply_to")
    except EventError:
        return None
    return reply_to if isinstance(reply_to, str) and TOPIC_NAME_RE.match(reply_to) else None
