"""The per-record path of a worker: decode, validate, batch, infer, publish, acknowledge.

::

    record ─► in-flight cap ─► decode + validate ──bad──► dead-letter record (+ rejected result)
                                   │ good                         │
                                   ▼                              │ broker ack
                             micro-batcher (per model)            ▼
                                   │ batch               offset tracker ─► ack in offset order
                                   ▼                              ▲            (then faust commits)
                             model runner thread ─► results ──────┘ broker ack

Commit after produce: a record is acknowledged to the consumer (which then
commits it) only when its result or dead-letter record has been acknowledged
by the broker, and only in offset order per partition.

The pipeline knows Kafka only through two callables given to it: ``send``
(produce one record, return an awaitable of the broker's acknowledgement) and
``ack`` (mark a consumed record done). The faust wiring in
:mod:`autoglm.streams.app` supplies both; tests can supply their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Hashable, Mapping

from autoglm.errors import (
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
from autoglm.streams.topics import TopicNames

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
Record = tuple[str, bytes | None, bytes | None, Headers]
TransactFn = Callable[[list[Record], dict[Any, int]], Awaitable[None]]
SendFn = Callable[[str, bytes | None, bytes | None, Headers], Awaitable[Awaitable[Any]]]
AckFn = Callable[[Any], None]

DLQ_HEADER_CODE = "autoglm.error.code"
DLQ_HEADER_MESSAGE = "autoglm.error.message"
DLQ_HEADER_TOPIC = "autoglm.source.topic"
DLQ_HEADER_PARTITION = "autoglm.source.partition"
DLQ_HEADER_OFFSET = "autoglm.source.offset"
DLQ_HEADER_WORKER = "autoglm.worker"


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
        runners: model name -> a started ``ModelRunner`` (``.model``, ``async run(items)``).
        policies: model name -> batching policy.
        send: produce one record ``(topic, key, value, headers)``; awaiting it
            returns an awaitable that resolves when the broker acknowledged.
        ack: acknowledge a consumed record given its token.
        max_in_flight: tasks between receipt and acknowledgement (memory bound).
        on_fatal: called with the exception when a result cannot be delivered
            (the worker must stop so that the task is consumed again).
        metrics: batching metrics (default: records nothing).
        topic_exists: ``async topic_exists(name) -> bool``; a task whose ``reply_to``
            names a missing topic is rejected (default: every topic exists).
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
        runners: Mapping[str, Any],
        policies: Mapping[str, BatchPolicy],
        send: SendFn,
        ack: AckFn,
        max_in_flight: int,
        on_fatal: Callable[[BaseException], None] | None = None,
        metrics: BatchMetrics | None = None,
        topic_exists: Callable[[str], Awaitable[bool]] | None = None,
        delivery_timeout_s: float = 120.0,
        inference_timeout_s: float | None = None,
        max_task_bytes: int | None = None,
        max_result_bytes: int | None = None,
        transact: TransactFn | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.names = names
        self.worker_id = worker_id
        self.runners = dict(runners)
        self.policies = dict(policies)
        self._send = send
        self._ack = ack
        self._on_fatal = on_fatal or (lambda exc: None)
        self.clock = clock
        self.metrics = metrics or BatchMetrics()
        self._topic_exists = topic_exists
        self.delivery_timeout_s = delivery_timeout_s
        self.inference_timeout_s = inference_timeout_s
        self.max_task_bytes = max_task_bytes
        self.max_result_bytes = max_result_bytes
        self._transact = transact
        self._held: dict[tuple[Hashable, int], list[Record]] = {}
        self._released: set[Hashable] = set()
        self.limiter = InFlightLimiter(max_in_flight)
        self.tracker: OffsetTracker[Any] = OffsetTracker()
        self.counters = PipelineCounters()
        self.batchers: dict[str, MicroBatcher[Pending]] = {
            name: MicroBatcher(self._batch_handler(name), self.policies[name], on_expired=self._on_expired,
                               clock=clock, name=f"batcher-{name}")
            for name in self.runners
        }
        self.windows: dict[str, WindowStats] = {name: WindowStats() for name in self.runners}
        self._background: set[asyncio.Task] = set()
        # per model: (start_s, size) of the last batch, when a backlog waited behind it
        self._saturated: dict[str, tuple[float, int, int] | None] = {}

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Start the batchers on the running loop."""
        for batcher in self.batchers.values():
            batcher.start()

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

    async def wait_idle(self, poll_s: float = 0.01) -> None:
        """Return once nothing is in flight: every received task answered and acknowledged."""
        while self.limiter.in_flight or self._background:
            if self._background:
                await asyncio.gather(*list(self._background), return_exceptions=True)
            else:
                await asyncio.sleep(poll_s)

    def figures(self, window_s: float, *, reset: bool = True) -> dict[str, dict[str, Any]]:
        """Per-model figures since the previous call with ``reset``, for heartbeats and status reports.

        Args:
            window_s: seconds since the previous call with ``reset``.
            reset: start a new window.

        Returns:
            model -> ``results``, ``throughput_per_s``, ``p50_ms``, ``p99_ms``,
            ``mean_batch_size`` (see :class:`~autoglm.processors.metrics.WindowStats`),
            ``queue_depth`` (tasks waiting for a batch), and the batching policy's
            ``mode``, ``latency_target_s``, ``max_batch_size``, ``max_wait_s``,
            ``target_size`` and cost-model estimates ``service_fixed_ms``,
            ``service_per_task_ms``, ``service_spread_ms`` when it has them.
        """
        out: dict[str, dict[str, Any]] = {}
        for name, window in self.windows.items():
            fig: dict[str, Any] = window.take(window_s, reset=reset)
            fig["queue_depth"] = len(self.batchers[name])
            policy = self.policies[name]
            for attr in ("mode", "latency_target_s", "max_batch_size", "max_wait_s"):
                if hasattr(policy, attr):
                    fig[attr] = getattr(policy, attr)
            service = getattr(policy, "service", None)
            if service is not None:
                est = service.estimate
                fig.update(target_size=policy.last_target_size, service_fixed_ms=est.a_s * 1000.0,
                           service_per_task_ms=est.b_s * 1000.0, service_spread_ms=est.sigma_s * 1000.0)
            out[name] = fig
        return out

    async def release_partitions(self, partitions: list[Hashable], timeout_s: float) -> int:
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
        for batcher in self.batchers.values():
            for pending in batcher.remove_if(lambda p: p.partition in tps):
                handed_back[pending.partition] = handed_back.get(pending.partition, 0) + 1
        self.limiter.release(sum(handed_back.values()))
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

    def assigned(self, partitions: list[Hashable]) -> None:
        """Partitions assigned (again) to this worker: their records are served."""
        self._released -= set(partitions)

    def revoke(self, partitions: list[Hashable]) -> None:
        """Forget revoked partitions (their unfinished tasks may be served again by the new owner)."""
        for tp in partitions:
            lost = self.tracker.revoke(tp)
            held = [key for key in self._held if key[0] == tp]
            for key in held:  # finished but never committed (exactly-once): the new owner serves them again
                del self._held[key]
            self.limiter.release(len(held))
            if lost:
                log.info("partition %s revoked with %d tasks in flight", tp, lost)

    # -- records --------------------------------------------------------------

    async def on_record(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, token: Any
    ) -> None:
        """Take one consumed task record. Waits while the in-flight cap is reached (backpressure)."""
        tp = (topic, partition)
        if tp in self._released:  # its partition is being handed over: the new owner serves it
            return
        await self.limiter.acquire()
        if tp in self._released:
            self.limiter.release()
            return
        try:
            self.tracker.received(tp, offset, (offset, token))
        except ValueError:  # already in flight here (redelivered without a revoke): serve it once
            self.limiter.release()
            log.warning("skipping %s offset %d: already in flight", tp, offset)
            return
        self.counters.received += 1
        received_s, received_ms = self.clock(), now_ms()
        try:
            if self.max_task_bytes is not None and value is not None and len(value) > self.max_task_bytes:
                raise TaskTooLargeError(
                    f"task record is {len(value)} bytes, above max_task_bytes={self.max_task_bytes} "
                    "(AUTOGLM_MAX_TASK_BYTES)", task_id=readable_field(value, "id"),
                    model=readable_field(value, "model"),
                )
            task = decode_task(value)
            model = self.names.model_of(topic)
            if task.model != model:
                raise UnknownModelError(
                    f"task names model {task.model!r} but arrived on {topic!r}, the topic of model {model!r}; "
                    f"publish it to {self.names.tasks(task.model)!r}",
                    task_id=task.id, model=task.model,
                )
            runner = self.runners.get(model)
            if runner is None:
                raise UnknownModelError(
                    f"model {model!r} is not served by this worker (serves {sorted(self.runners)})",
                    task_id=task.id, model=task.model,
                )
            try:
                prepared = runner.model.prepare(task.inputs)
            except EventError as exc:
                exc.task_id, exc.model = task.id, task.model
                raise
            if task.reply_to is not None and self._topic_exists is not None:
                if not await self._topic_exists(task.reply_to):
                    raise EventValidationError("reply_to", "an existing topic", task.reply_to,
                                               task_id=task.id, model=task.model)
        except EventError as exc:
            bad_reply_to = getattr(exc, "field", None) == "reply_to"
            reply_to = None if bad_reply_to else _reply_to(value, exc)
            self._spawn(self._dead_letter(tp, offset, key, value, exc, reply_to=reply_to))
            return
        pending = Pending(task, prepared, tp, offset, received_s, received_ms, key, value)
        deadline_s = None
        if task.deadline_ms is not None:
            deadline_s = received_s + (task.deadline_ms - received_ms) / 1000.0
            if deadline_s <= received_s:  # already past its deadline: never reaches the model
                self._on_expired([QueuedTask(pending, received_s, deadline_s)])
                return
        self.batchers[model].put(pending, priority=task.priority, deadline_s=deadline_s)

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
            )
            for p in batch
        ]
        self._spawn(self._deliver(batch, results))

    # -- batches --------------------------------------------------------------

    def _batch_handler(self, model: str) -> Callable[[list[QueuedTask[Pending]]], Awaitable[None]]:
        async def handle(batch: list[QueuedTask[Pending]]) -> None:
            await self._run_batch(model, [q.item for q in batch])

        return handle

    async def _run_batch(self, model: str, batch: list[Pending]) -> None:
        runner = self.runners[model]
        start_s = self.clock()
        previous = self._saturated.get(model)
        policy = self.policies[model]
        # a backlog: tasks left in the queue here, or (a stream-bound pipeline, whose queue stays
        # short) the last batch missed its target, so tasks are waiting upstream in Kafka
        backlog = len(self.batchers[model]) > 0 or getattr(policy, "over_target", False)
        if previous is not None and backlog:  # a backlog before and now: the cycle time is the cost
            policy.observe_cycle(previous[1], start_s - previous[0], previous[2])
        asked = getattr(policy, "last_target_size", len(batch))
        self._saturated[model] = (start_s, len(batch), asked) if backlog else None
        try:
            outcomes = await runner.run_isolated([p.prepared for p in batch], timeout_s=self.inference_timeout_s)
        except ModelError as exc:  # the runner itself is unusable (closed): every task gets the error
            log.error("model %s failed on a batch of %d: %s", model, len(batch), exc)
            outcomes = [_Failed(model, ErrorInfo(exc.code, str(exc)))] * len(batch)
        inference_s = self.clock() - start_s
        self.counters.batches += 1
        finished_ms = now_ms()
        results = []
        for p, outcome in zip(batch, outcomes):
            error = None if outcome.ok else ErrorInfo(outcome.error.code, outcome.error.message)
            results.append(
                Result(
                    id=p.task.id,
                    model=model,
                    status="ok" if outcome.ok else "error",
                    outputs=outcome.output if outcome.ok else None,
                    error=error,
                    batch_size=len(batch),
                    worker=self.worker_id,
                    queue_ms=(start_s - p.received_s) * 1000.0,
                    inference_ms=inference_s * 1000.0,
                    end_to_end_ms=float(max(0, finished_ms - (p.task.created_ms or p.received_ms))),
                    attributes=p.task.attributes,
                    served_by=outcome.served_by,
                )
            )
        failed = [(p, r) for p, r in zip(batch, results) if r.status == "error"]
        if failed:
            log.error("model %s: %d of %d tasks failed (%s)", model, len(failed), len(batch),
                      ", ".join(sorted({r.error.code for _, r in failed})))
        # the cost model learns from clean batches only: bisection, retries and timeouts inflate the time
        self._observe(model, batch, results, start_s, inference_s, learn=not failed)
        self._spawn(self._deliver(batch, results))

    def _observe(self, model: str, batch: list[Pending], results: list[Result], start_s: float,
                 inference_s: float, *, learn: bool) -> None:
        policy = self.policies[model]
        if learn:
            policy.observe(self.clock(), len(batch), inference_s, [r.end_to_end_ms / 1000.0 for r in results])
        self.metrics.observe_batch(model, len(batch), inference_s, [start_s - p.received_s for p in batch])
        self.windows[model].observe_batch(len(batch), [r.end_to_end_ms / 1000.0 for r in results])
        service = getattr(policy, "service", None)
        if service is not None:
            est = service.estimate
            self.metrics.set_policy_state(model, a_s=est.a_s, b_s=est.b_s, sigma_s=est.sigma_s,
                                          target_size=policy.last_target_size, correction=policy.correction)

    async def _deliver(self, batch: list[Pending], results: list[Result]) -> None:
        groups: list[tuple[Hashable, int, list[Record]]] = []
        for pending, result in zip(batch, results):
            records: list[Record] = []
            groups.append((pending.partition, pending.offset, records))
            try:
                value = encode_result(result)
            except TensorError as exc:  # NaN/inf from the model: never emitted
                result = dataclasses.replace(result, status="error", outputs=None, error=ErrorInfo("invalid_output", str(exc)))
                value = encode_result(result)
            if self.max_result_bytes is not None and len(value) > self.max_result_bytes:
                self.counters.oversized_results += 1
                result = dataclasses.replace(result, status="error", outputs=None, error=ErrorInfo(
                    "result_too_large", f"result is {len(value)} bytes, above max_result_bytes="
                                        f"{self.max_result_bytes} (AUTOGLM_MAX_RESULT_BYTES)"))
                value = encode_result(result)
            if result.status == "ok":
                self.counters.results_ok += 1
            elif result.status == "expired":
                self.counters.results_expired += 1
            else:
                self.counters.results_error += 1
            self.metrics.count_tasks(result.model, result.status)
            topic = pending.task.reply_to or self.names.results
            records.append((topic, result.id.encode(), value, []))
            if result.status == "error" and result.error is not None and result.error.code == "inference":
                # this task made the model fail on its own (isolated by bisection): keep its bytes
                self.counters.isolated_failures += 1
                self.counters.dead_letters += 1
                records.append((self.names.dlq, pending.key, pending.value, self._dlq_headers(
                    pending.partition, pending.offset, result.error.code, result.error.message)))
        await self._settle(groups)

    async def _dead_letter(
        self, tp: Hashable, offset: int, key: bytes | None, value: bytes | None, exc: EventError, reply_to: str | None
    ) -> None:
        self.counters.dead_letters += 1
        topic_model = self.names.model_of(tp[0]) if isinstance(tp, tuple) else None
        self.metrics.count_tasks(topic_model or "unknown", "rejected")  # never a label from the payload
        log.warning("dead-lettering %s offset %d: %s: %s", tp, offset, exc.code, exc)
        headers = self._dlq_headers(tp, offset, exc.code, str(exc))
        records: list[Record] = [(self.names.dlq, key, value, headers)]
        if exc.task_id:
            rejected = Result(
                id=exc.task_id,
                model=exc.model or "",
                status="rejected",
                error=ErrorInfo(exc.code, str(exc)),
                worker=self.worker_id,
            )
            records.append((reply_to or self.names.results, exc.task_id.encode(), encode_result(rejected), []))
        await self._settle([(tp, offset, records)])

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

    async def _settle(self, groups: list[tuple[Hashable, int, list[Record]]]) -> None:
        """Deliver the records of finished tasks (one group per consumed offset), then release
        their offsets in order and free their in-flight slots.

        At-least-once: produce every record, wait for the broker's acks, then
        acknowledge the offsets (faust commits them). Exactly-once (a
        ``transact`` callable was given): a task's records wait until every
        earlier offset of its partition is finished too, then go out in one
        Kafka transaction together with the offsets they complete, so results
        and commits become visible together or not at all.

        A record that cannot be delivered is fatal: its task must not be
        committed, so the worker stops and the task is consumed again.
        """
        if self._transact is not None:
            await self._settle_transactional(groups)
            return
        records = [record for _, _, recs in groups for record in recs]
        try:
            async def produce_all() -> None:
                acks = [await self._send(topic, key, value, headers) for topic, key, value, headers in records]
                await asyncio.gather(*acks)

            await asyncio.wait_for(produce_all(), self.delivery_timeout_s)
        except Exception as exc:
            log.critical("could not deliver %d records; stopping so they are consumed again: %r", len(records), exc)
            self._on_fatal(exc)
            return
        for tp, offset, _ in groups:
            for _, token in self.tracker.done(tp, offset):
                self._ack(token)
        self.limiter.release(len(groups))

    async def _settle_transactional(self, groups: list[tuple[Hashable, int, list[Record]]]) -> None:
        assert self._transact is not None
        released: list[Record] = []
        offsets: dict[Hashable, int] = {}
        tokens: list[Any] = []
        slots = 0
        for tp, offset, records in groups:
            if not self.tracker.tracks(tp, offset):
                slots += 1  # its partition was revoked: nothing is committed here, the new owner serves it
                continue
            self._held[(tp, offset)] = records
            for done_offset, token in self.tracker.done(tp, offset):
                released.extend(self._held.pop((tp, done_offset)))
                offsets[tp] = done_offset + 1
                tokens.append(token)
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
        for token in tokens:  # committed already; faust's own later commit of the same offsets is a no-op
            self._ack(token)
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


def _reply_to(value: bytes | None, exc: EventError) -> str | None:
    """The task's valid ``reply_to`` when the event was readable enough to have one."""
    if not exc.task_id or value is None:
        return None
    try:
        reply_to = loads(value).get("reply_to")
    except EventError:
        return None
    return reply_to if isinstance(reply_to, str) and TOPIC_NAME_RE.match(reply_to) else None
