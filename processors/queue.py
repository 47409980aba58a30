"""The task queue of one model: priorities with aging, per-task deadlines.

Order: a task's effective priority is ``priority + aging_per_s * waited_s``;
higher goes first, ties in arrival order. Because every waiting task gains
priority at the same rate, a low-priority task overtakes a newer
high-priority one after ``(p_high - p_low) / aging_per_s`` seconds: no
priority class starves. Since the aging term grows equally for all queued
tasks, the order between two queued tasks is fixed at arrival
(``priority - aging_per_s * enqueued_s``), which makes it a plain heap.

Deadlines: a task whose deadline passes is removed by :meth:`expire` and
never reaches the model (Triton's REJECT timeout action).

No clock is read here: times are passed in (monotonic seconds).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

#: Default aging: one priority level per second of waiting. A task of
#: priority 0 overtakes a newer priority-5 task after 5 s.
DEFAULT_AGING_PER_S = 1.0


@dataclass(order=True, slots=True)
class _Entry(Generic[T]):
    rank: float
    seq: int
    enqueued_s: float = field(compare=False)
    deadline_s: float | None = field(compare=False)
    item: T = field(compare=False)
    removed: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class QueuedTask(Generic[T]):
    """A task taken from the queue with the monotonic time it was queued (seconds)."""

    item: T
    enqueued_s: float
    deadline_s: float | None


class TaskQueue(Generic[T]):
    """Priority queue with aging and deadlines.

    Args:
        aging_per_s: priority levels gained per second of waiting (>= 0).

    Raises:
        ValueError: ``aging_per_s`` < 0.
    """

    def __init__(self, aging_per_s: float = DEFAULT_AGING_PER_S):
        if aging_per_s < 0:
            raise ValueError(f"aging_per_s must be >= 0, got {aging_per_s}")
        self.aging_per_s = aging_per_s
        self._heap: list[_Entry[T]] = []
        self._deadlines: list[tuple[float, int, _Entry[T]]] = []
        self._seq = itertools.count()
        self._size = 0
        self._oldest: list[tuple[float, int, _Entry[T]]] = []  # queue times of the heap's entries
        # Priority-0 tasks queued in time order: their ranks (aging_per_s * enqueued_s) only grow,
        # so a deque holds them in rank order with no heap work (the common case: most tasks carry
        # no priority). Others, and any pushed out of time order, go to the heap.
        self._fifo: deque[_Entry[T]] = deque()
        self._fifo_last_s = float("-inf")

    def __len__(self) -> int:
        return self._size

    def push(self, item: T, *, now_s: float, priority: int = 0, deadline_s: float | None = None) -> None:
        """Queue ``item`` at ``now_s`` with ``priority`` (higher first) and an optional deadline."""
        seq = next(self._seq)
        entry = _Entry(-(priority - self.aging_per_s * now_s), seq, now_s, deadline_s, item)
        if priority == 0 and now_s >= self._fifo_last_s:
            self._fifo.append(entry)
            self._fifo_last_s = now_s
        else:
            heapq.heappush(self._heap, entry)
            heapq.heappush(self._oldest, (now_s, seq, entry))
        if deadline_s is not None:
            heapq.heappush(self._deadlines, (deadline_s, seq, entry))
        self._size += 1

    def pop(self, n: int) -> list[QueuedTask[T]]:
        """Take up to ``n`` tasks in priority order."""
        out: list[QueuedTask[T]] = []
        heap, fifo = self._heap, self._fifo
        while len(out) < n:
            while fifo and fifo[0].removed:
                fifo.popleft()
            while heap and heap[0].removed:
                heapq.heappop(heap)
            if fifo and (not heap or fifo[0] < heap[0]):
                out.append(self._take(fifo.popleft()))
            elif heap:
                out.append(self._take(heapq.heappop(heap)))
            else:
                break
        return out

    def expire(self, now_s: float) -> list[QueuedTask[T]]:
        """Remove and return every task whose deadline is at or before ``now_s``."""
        out: list[QueuedTask[T]] = []
        while self._deadlines and self._deadlines[0][0] <= now_s:
            _, _, entry = heapq.heappop(self._deadlines)
            if not entry.removed:
                out.append(self._take(entry))
        return out

    def remove_if(self, predicate: Callable[[T], bool]) -> list[QueuedTask[T]]:
        """Remove and return every queued task whose item satisfies ``predicate`` (e.g. the tasks of
        partitions revoked in a rebalance), in no particular order."""
        return [self._take(e) for e in [*self._fifo, *self._heap] if not e.removed and predicate(e.item)]

    def _take(self, entry: _Entry[T]) -> QueuedTask[T]:
        """Mark ``entry`` removed (its copies in the other heaps are skipped lazily) and hand it out."""
        entry.removed = True
        self._size -= 1
        return QueuedTask(entry.item, entry.enqueued_s, entry.deadline_s)

    def oldest_enqueued_s(self) -> float | None:
        """Queue time of the longest-waiting task, or None when empty."""
        while self._oldest and self._oldest[0][2].removed:
            heapq.heappop(self._oldest)
        while self._fifo and self._fifo[0].removed:
            self._fifo.popleft()
        oldest = self._oldest[0][0] if self._oldest else None
        if self._fifo and (oldest is None or self._fifo[0].enqueued_s < oldest):
            oldest = self._fifo[0].enqueued_s
        return oldest

    def next_deadline_s(self) -> float | None:
        """The earliest deadline among queued tasks, or None."""
        while self._deadlines and self._deadlines[0][2].removed:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def __iter__(self) -> Iterator[T]:
        return (e.item for e in [*self._fifo, *self._heap] if not e.removed)
