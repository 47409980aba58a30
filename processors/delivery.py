"""Delivery bookkeeping: which consumed offsets may be acknowledged, and the in-flight cap.

Commit after produce: a task's offset may be committed only after its result
(or dead-letter record) is acknowledged by the broker. Tasks finish out of
order (a malformed task is dead-lettered at once while its predecessors sit in
a micro-batch; priorities reorder), but a Kafka commit is a single position
per partition that covers every offset below it. So completions are released
in offset order: an offset is released only once it and every offset received
before it on the same partition are done. Committing the released prefix can
never skip an unfinished task.

Nothing here does I/O; the stream side calls it and performs the acks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, Hashable, TypeVar

Token = TypeVar("Token")


class _Entry(Generic[Token]):
    __slots__ = ("offset", "token", "done")

    def __init__(self, offset: int, token: Token):
        self.offset = offset
        self.token = token
        self.done = False


class OffsetTracker(Generic[Token]):
    """Per-partition in-order release of finished offsets.

    ``partition`` is any hashable key (a ``(topic, partition)`` pair in the
    worker). ``token`` is whatever the caller needs to acknowledge the offset
    later (a faust event), handed back on release.
    """

    def __init__(self) -> None:
        self._pending: dict[Hashable, deque[_Entry[Token]]] = {}
        self._index: dict[tuple[Hashable, int], _Entry[Token]] = {}

    def received(self, partition: Hashable, offset: int, token: Token) -> None:
        """Record a consumed offset as in flight.

        Raises:
            ValueError: ``offset`` is not above the last one received on
                ``partition`` (Kafka delivers a partition in offset order),
                unless the partition was revoked and re-assigned in between.
        """
        queue = self._pending.setdefault(partition, deque())
        if queue and offset <= queue[-1].offset:
            raise ValueError(
                f"offset {offset} on {partition!r} is not above the last received {queue[-1].offset}"
            )
        entry = _Entry(offset, token)
        queue.append(entry)
        self._index[(partition, offset)] = entry

    def done(self, partition: Hashable, offset: int) -> list[Token]:
        """Mark an offset finished; return the tokens now safe to acknowledge, in offset order.

        An offset that is unknown (its partition was revoked meanwhile) is ignored.
        """
        entry = self._index.pop((partition, offset), None)
        if entry is None:
            return []
        entry.done = True
        queue = self._pending[partition]
        released: list[Token] = []
        while queue and queue[0].done:
            released.append(queue.popleft().token)
        return released

    def unfinished(self, partition: Hashable) -> int:
        """Offsets received on ``partition`` and not yet marked done."""
        return sum(1 for e in self._pending.get(partition, ()) if not e.done)

    def tracks(self, partition: Hashable, offset: int) -> bool:
        """Whether ``offset`` is in flight on ``partition`` (false once its partition was revoked)."""
        return (partition, offset) in self._index

    def revoke(self, partition: Hashable) -> int:
        """Forget a partition (revoked in a rebalance); returns how many offsets were unfinished.

        Their results may still be produced; the new owner re-reads from the
        last commit, so they may be served twice (at-least-once), never lost.
        """
        queue = self._pending.pop(partition, deque())
        for entry in queue:
            self._index.pop((partition, entry.offset), None)
        return sum(1 for e in queue if not e.done)

    def in_flight(self, partition: Hashable | None = None) -> int:
        """Offsets received and not yet released (on one partition, or on all)."""
        if partition is not None:
            return len(self._pending.get(partition, ()))
        return sum(len(q) for q in self._pending.values())


class InFlightLimiter:
    """An asyncio counting cap on tasks between receipt and commit-ready (the memory bound).

    ``acquire`` waits while ``limit`` tasks are in flight: the consumer stops
    pulling records, the stream's buffer fills, and the Kafka client pauses
    fetching (backpressure) instead of buffering without bound. Waiters are
    served first come, first served.

    Args:
        limit: the cap, >= 1.

    Raises:
        ValueError: ``limit`` < 1.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._count = 0
        self._reserved = 0  # slots promised to woken waiters that have not resumed yet
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._idle: list[asyncio.Future[None]] = []
        self._free_waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def in_flight(self) -> int:
        return self._count

    def take(self, n: int) -> None:
        """Take ``n`` slots now, without waiting (a consumer that asked for at most the free slots
        hands over what it got; more than the free slots go over the cap)."""
        self._count += n

    @property
    def free(self) -> int:
        """Slots free now (0 at or over the cap)."""
        return max(0, self.limit - self._count - self._reserved)

    async def acquire(self) -> None:
        """Wait for a free slot and take it (first come, first served)."""
        if not self._waiters and self._count + self._reserved < self.limit:
            self._count += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut in self._waiters:
                self._waiters.remove(fut)
            elif fut.done() and not fut.cancelled():
                self._reserved -= 1  # woken, then cancelled: hand the slot on
                self._wake()
            raise
        self._reserved -= 1
        self._count += 1

    def release(self, n: int = 1) -> None:
        """Free ``n`` slots (tasks whose result or dead letter was acknowledged)."""
        self._count = max(0, self._count - n)
        self._wake()
        if self._count == 0 and self._reserved == 0:
            idle, self._idle = self._idle, []
            for fut in idle:
                if not fut.done():
                    fut.set_result(None)

    async def wait_free(self, at_least: int, timeout_s: float) -> None:
        """Return once at least ``at_least`` slots are free, or after ``timeout_s`` seconds."""
        if self.free >= at_least:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (at_least, fut)
        self._free_waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            if entry in self._free_waiters:
                self._free_waiters.remove(entry)

    def _wake(self) -> None:
        if self._free_waiters:
            free = self.free
            for n, fut in self._free_waiters:
                if free >= n and not fut.done():
                    fut.set_result(None)
        while self._waiters and self._count + self._reserved < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._reserved += 1
                fut.set_result(None)

    async def wait_idle(self) -> None:
        """Wait until nothing is in flight."""
        if self._count == 0 and self._reserved == 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append(fut)
        await fut
