"""The async micro-batcher: queues tasks of one model and flushes batches as its policy says.

One batcher per model. ``put`` queues a task (never blocks: the in-flight cap
upstream bounds the queue). A single loop asks the policy what to do, waits
until the flush time, the next arrival, the next task deadline or the end of
the running batch, and starts each batch as a task running ``handler``. One
batch per model is in the model at a time; the next one fills meanwhile.
While a batch runs, the loop keeps expiring tasks whose deadline passes
(``on_expired``): an expired task gets its answer at once and never reaches
the model.

The clock and the sleep are parameters (``clock=time.monotonic``,
``sleep=asyncio.sleep``), so tests drive a fake clock and never sleep.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, TypeVar

from autoglm.processors.batching import BatchDecision, BatchPolicy
from autoglm.processors.queue import DEFAULT_AGING_PER_S, QueuedTask, TaskQueue

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Kept for callers that name the batch element type.
Queued = QueuedTask


@dataclass(slots=True)
class BatchStats:
    """Counters of one batcher (read by status and metrics)."""

    batches: int = 0
    tasks: int = 0
    expired: int = 0
    last_batch_size: int = 0
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=1024))


class MicroBatcher(Generic[T]):
    """Forms micro-batches for one model.

    Args:
        handler: ``async handler(batch: list[QueuedTask[T]])`` that runs the
            batch. Exceptions are logged and do not stop the batcher; the
            handler must settle its own tasks.
        policy: the batching policy (see :mod:`autoglm.processors.batching`).
        on_expired: called with the tasks whose deadline passed, in the loop,
            at once (also while a batch runs). Default: log and drop them.
        aging_per_s: priority aging of the queue (see :mod:`autoglm.processors.queue`).
        clock: monotonic seconds.
        sleep: ``async sleep(seconds)``.
        name: for logs.
    """

    def __init__(
        self,
        handler: Callable[[list[QueuedTask[T]]], Awaitable[Any]],
        policy: BatchPolicy,
        *,
        on_expired: Callable[[list[QueuedTask[T]]], None] | None = None,
        aging_per_s: float = DEFAULT_AGING_PER_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        name: str = "batcher",
    ):
        self.handler = handler
        self.policy = policy
        self.on_expired = on_expired or (lambda tasks: log.warning("%d tasks expired", len(tasks)))
        self.clock = clock
        self.sleep = sleep
        self.name = name
        self.stats = BatchStats()
        self._queue: TaskQueue[T] = TaskQueue(aging_per_s)
        self._arrival: asyncio.Event | None = None
        self._running: asyncio.Task | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.flushing = False
        #: queue length at which an arrival wakes the loop (None: only a deadline, the end of the
        #: running batch or the flush time does). Waking on every arrival while a batch cannot start
        #: cost the event loop about as much as decoding the task.
        self._wake_len: int | None = 1

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """True while a batch is in the handler."""
        return self._running is not None and not self._running.done()

    def set_flushing(self, flushing: bool) -> None:
        """While set, queued tasks go to the model at once (sized by the policy, never waiting):
        a drain must not wait ``max_wait_s`` for batches that will never fill."""
        self.flushing = flushing
        if self._arrival is not None:
            self._arrival.set()

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take queued tasks (not yet in a batch) that satisfy ``predicate`` out; they reach no batch."""
        return [q.item for q in self._queue.remove_if(predicate)]

    def put(self, item: T, *, priority: int = 0, deadline_s: float | None = None) -> None:
        """Queue one task now (``deadline_s`` on this batcher's clock, or None)."""
        self._queue.push(item, now_s=self.clock(), priority=priority, deadline_s=deadline_s)
        if self._arrival is not None and (
            deadline_s is not None or (self._wake_len is not None and len(self._queue) >= self._wake_len)
        ):
            self._arrival.set()

    def start(self) -> None:
        """Start the loop on the running event loop (idempotent)."""
        if self._task is None:
            self._arrival = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"autoglm-{self.name}")

    async def stop(self, *, flush: bool = True) -> None:
        """Stop the loop; with ``flush`` the queued tasks are handed to the handler first."""
        self._stopping = True
        if self._arrival is not None:
            self._arrival.set()
        task, self._task = self._task, None
        if task is not None:
            if not flush:
                task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._running is not None:
            if flush:
                await asyncio.gather(self._running, return_exceptions=True)
            else:
                self._running.cancel()
        if flush:
            while True:
                self._expire(self.clock())  # before every batch: a deadline may pass during the flush
                if not len(self._queue):
                    break
                await self._call(self._queue.pop(self.policy.max_batch_size))

    async def _run(self) -> None:
        assert self._arrival is not None
        while not self._stopping:
            self._arrival.clear()  # before looking: an arrival from here on wakes the wait below
            now = self.clock()
            self._expire(now)
            next_deadline = self._queue.next_deadline_s()
            wake_at: float | None = next_deadline
            # while a batch runs, arrivals change nothing until it ends (which wakes the loop)
            self._wake_len = None if self.busy else 1
            if not self.busy and len(self._queue):
                try:
                    decision = self.policy.decide(
                        now, len(self._queue), self._queue.oldest_enqueued_s(), False, next_deadline
                    )
                except Exception:  # a policy bug must not stop serving: flush what is queued
                    log.exception("%s: batching policy failed; flushing up to max_batch_size now", self.name)
                    decision = BatchDecision(min(len(self._queue), max(1, self.policy.max_batch_size)), now)
                if self.flushing:  # a drain: no task waits for a fuller batch
                    decision = BatchDecision(min(len(self._queue), max(1, decision.size)), now)
                if decision.flush_at_s is not None and decision.size > 0:
                    if decision.flush_at_s <= now:
                        self._start_batch(self._queue.pop(decision.size))
                        continue
                    wake_at = decision.flush_at_s if wake_at is None else min(wake_at, decision.flush_at_s)
                    # an arrival matters only once it fills the batch (the policy says when; unknown: every one)
                    self._wake_len = decision.full_at or 1
            await self._wait(None if wake_at is None else max(0.0, wake_at - now))

    def _expire(self, now: float) -> None:
        expired = self._queue.expire(now)
        if expired:
            self.stats.expired += len(expired)
            try:
                self.on_expired(expired)
            except Exception:
                log.exception("%s: on_expired failed", self.name)

    def _start_batch(self, batch: list[QueuedTask[T]]) -> None:
        self._running = asyncio.get_running_loop().create_task(self._call(batch))

    async def _call(self, batch: list[QueuedTask[T]]) -> None:
        size = len(batch)
        self.stats.batches += 1
        self.stats.tasks += size
        self.stats.last_batch_size = size
        self.stats.batch_sizes.append(size)
        try:
            await self.handler(batch)
        except asyncio.CancelledError:
            raise
        except Exception:  # the handler settles its own tasks; a bug must not stop the loop
            log.exception("%s: batch handler failed", self.name)
        finally:
            if self._arrival is not None:
                self._arrival.set()  # the model is free: decide again

    async def _wait(self, delay_s: float | None) -> None:
        """Wait for an arrival, the end of the running batch, or ``delay_s`` (None: no timeout)."""
        assert self._arrival is not None
        waiters: list[asyncio.Future] = [asyncio.ensure_future(self._arrival.wait())]
        if delay_s is not None:
            waiters.append(asyncio.ensure_future(self.sleep(delay_s)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in waiters:
                if not fut.done():
                    fut.cancel()
