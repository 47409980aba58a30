"""The async micro-batcher: queues tasks of one model and flushes batches as its policy says.

One batcher per model. ``put`` queues a task (never blocks: the in-flight cap
upstream bounds the queue); a single flush loop asks the policy what to do,
sleeps until the flush deadline or the next arrival, and hands each batch to
``handler``. The handler is awaited before the next batch is formed, so one
batch per model is in the model at a time and the next one fills meanwhile.

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

from autoglm.processors.batching import BatchPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class Queued(Generic[T]):
    """A queued task and the monotonic time (seconds) it was queued."""

    item: T
    enqueued_s: float


@dataclass(slots=True)
class BatchStats:
    """Counters of one batcher (read by status and metrics)."""

    batches: int = 0
    tasks: int = 0
    last_batch_size: int = 0
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=1024))


class MicroBatcher(Generic[T]):
    """Forms micro-batches for one model.

    Args:
        handler: ``async handler(batch: list[Queued[T]])`` that runs the batch
            (inference, then hands the results on). Exceptions are logged and
            do not stop the batcher; the handler must settle its own tasks.
        policy: the batching policy (see :mod:`autoglm.processors.batching`).
        clock: monotonic seconds.
        sleep: ``async sleep(seconds)``.
        name: for logs.
    """

    def __init__(
        self,
        handler: Callable[[list[Queued[T]]], Awaitable[Any]],
        policy: BatchPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        name: str = "batcher",
    ):
        self.handler = handler
        self.policy = policy
        self.clock = clock
        self.sleep = sleep
        self.name = name
        self.stats = BatchStats()
        self._queue: deque[Queued[T]] = deque()
        self._arrival: asyncio.Event | None = None
        self._busy = False
        self._task: asyncio.Task | None = None
        self._stopping = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """True while a batch is in the handler."""
        return self._busy

    def put(self, item: T) -> None:
        """Queue one task now."""
        self._queue.append(Queued(item, self.clock()))
        if self._arrival is not None:
            self._arrival.set()

    def start(self) -> None:
        """Start the flush loop on the running event loop."""
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
        if flush:
            while self._queue:
                await self._flush(min(len(self._queue), self.policy.max_batch_size))

    async def _run(self) -> None:
        assert self._arrival is not None
        while not self._stopping:
            now = self.clock()
            oldest = self._queue[0].enqueued_s if self._queue else None
            decision = self.policy.decide(now, len(self._queue), oldest, self._busy)
            if decision.flush_at_s is None or decision.size <= 0:
                self._arrival.clear()
                if not self._queue:
                    await self._arrival.wait()
                continue
            if decision.flush_at_s > now:
                await self._wait(decision.flush_at_s - now)
                continue
            await self._flush(min(decision.size, len(self._queue)))

    async def _wait(self, delay_s: float) -> None:
        """Sleep ``delay_s`` or until the next arrival, whichever is first."""
        assert self._arrival is not None
        self._arrival.clear()
        sleeper = asyncio.ensure_future(self.sleep(delay_s))
        waker = asyncio.ensure_future(self._arrival.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (sleeper, waker):
                if not fut.done():
                    fut.cancel()

    async def _flush(self, size: int) -> None:
        batch = [self._queue.popleft() for _ in range(size)]
        self.stats.batches += 1
        self.stats.tasks += size
        self.stats.last_batch_size = size
        self.stats.batch_sizes.append(size)
        self._busy = True
        try:
            await self.handler(batch)
        except asyncio.CancelledError:
            raise
        except Exception:  # the handler settles its own tasks; a bug must not stop the loop
            log.exception("%s: batch handler failed", self.name)
        finally:
            self._busy = False
