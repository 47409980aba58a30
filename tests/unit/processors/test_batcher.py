"""Unit tests of the async micro-batcher (processors/batcher.py) on fake time.

No real sleeps: the batcher takes ``clock`` and ``sleep`` as parameters. Two
fakes are used:

- :class:`JumpClock`: ``sleep(d)`` advances the fake clock by ``d`` at once and
  yields once. Nothing can happen "during" a sleep, which is enough when all
  arrivals are queued before the batcher runs.
- :class:`VirtualTime`: ``sleep(d)`` registers a timer; the test moves time
  with ``advance(dt)``, which fires due timers in deadline order (setting the
  clock to each deadline) and lets the loop run after each. Arrivals can then
  interrupt a wait, as they do on the real clock.

Times are multiples of 1/64 s, exact in binary floating point, so flush times
can be compared with ``==``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.processors.batcher import MicroBatcher, Queued
from autoglm.processors.batching import FixedBatchPolicy

from .fakes import JumpClock, settle

TICK = 1 / 64






class VirtualTime:
    """Fake time with timers; only :meth:`advance` moves the clock."""

    def __init__(self, start: float = 0.0):
        self.now = start
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + delay_s, next(self._seq), fut))
        await fut

    @property
    def sleeping(self) -> int:
        """Sleeps pending (not fired, not cancelled)."""
        return sum(1 for _, _, fut in self._timers if not fut.done())

    async def advance(self, dt: float) -> None:
        target = self.now + dt
        await settle()
        for _ in range(10_000):
            while self._timers and self._timers[0][2].done():  # cancelled: an arrival came first
                heapq.heappop(self._timers)
            if not self._timers or self._timers[0][0] > target:
                break
            deadline, _, fut = heapq.heappop(self._timers)
            self.now = max(self.now, deadline)
            fut.set_result(None)
            await settle()
        else:  # pragma: no cover - only if the batcher livelocks on timers
            raise AssertionError("timers keep firing without time passing")
        self.now = target
        await settle()


class Recorder:
    """A batch handler that records ``(fake time, [items], [enqueued_s])`` per batch."""

    def __init__(self, clock: Any, fail_on: set[int] | None = None):
        self.clock = clock
        self.fail_on = fail_on or set()
        self.batches: list[tuple[float, list[Any], list[float]]] = []

    async def __call__(self, batch: list[Queued[Any]]) -> None:
        self.batches.append((self.clock(), [q.item for q in batch], [q.enqueued_s for q in batch]))
        if len(self.batches) in self.fail_on:
            raise RuntimeError(f"handler failed on batch {len(self.batches)}")

    @property
    def items(self) -> list[list[Any]]:
        return [items for _, items, _ in self.batches]

    @property
    def times(self) -> list[float]:
        return [t for t, _, _ in self.batches]


def jump_batcher(max_batch_size: int, max_wait_s: float, start: float = 0.0, **kw: Any):
    clock = JumpClock(start)
    rec = Recorder(clock, **kw)
    batcher = MicroBatcher(rec, FixedBatchPolicy(max_batch_size, max_wait_s), clock=clock, sleep=clock.sleep)
    return batcher, rec, clock


def virtual_batcher(max_batch_size: int, max_wait_s: float, **kw: Any):
    vt = VirtualTime()
    rec = Recorder(vt.clock, **kw)
    batcher = MicroBatcher(rec, FixedBatchPolicy(max_batch_size, max_wait_s), clock=vt.clock, sleep=vt.sleep)
    return batcher, rec, vt


# -- examples ---------------------------------------------------------------------


async def test_full_batch_flushes_immediately_at_max_size() -> None:
    batcher, rec, clock = jump_batcher(3, 1.0, start=2.0)
    batcher.start()
    for i in range(7):
        batcher.put(i)
    await settle()
    assert rec.items == [[0, 1, 2], [3, 4, 5], [6]]
    # the two full batches at once, the partial rest at its deadline 2.0 + 1.0
    assert rec.times == [2.0, 2.0, 3.0]
    await batcher.stop()


async def test_partial_batch_flushes_at_first_enqueue_plus_max_wait() -> None:
    batcher, rec, clock = jump_batcher(8, 0.25, start=5.0)
    batcher.start()
    batcher.put("a")          # first enqueue at 5.0
    clock.now = 5.125
    batcher.put("b")          # a later one must not move the deadline
    await settle()
    assert rec.batches == [(5.25, ["a", "b"], [5.0, 5.125])]
    await batcher.stop()


async def test_arrivals_during_a_wait_keep_the_first_deadline() -> None:
    batcher, rec, vt = virtual_batcher(4, 16 * TICK)
    batcher.start()
    batcher.put("a")                      # t = 0: deadline 16 ticks
    await vt.advance(8 * TICK)
    assert rec.batches == [] and vt.sleeping == 1
    batcher.put("b")                      # t = 8 ticks: wakes the batcher, deadline unchanged
    await vt.advance(7 * TICK)
    batcher.put("c")                      # t = 15 ticks
    await vt.advance(TICK - TICK / 4)
    assert rec.batches == []              # t = 15.75 ticks: not yet
    await vt.advance(TICK / 4)
    assert rec.batches == [(16 * TICK, ["a", "b", "c"], [0.0, 8 * TICK, 15 * TICK])]
    await batcher.stop()


async def test_batch_flushes_the_moment_it_fills_during_a_wait() -> None:
    batcher, rec, vt = virtual_batcher(3, 1.0)
    batcher.start()
    for i in range(3):
        batcher.put(i)
        await vt.advance(TICK)
    # filled at t = 2 ticks (third put), long before the 1 s deadline
    assert rec.batches == [(2 * TICK, [0, 1, 2], [0.0, TICK, 2 * TICK])]
    assert vt.sleeping == 0
    await batcher.stop()


def gated_handler(vt: VirtualTime):
    """A handler recording (time, items) per batch whose first batch stays in the handler until
    ``gate`` is resolved."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[tuple[float, list[int]]] = []

    async def handler(batch: list[Queued[int]]) -> None:
        seen.append((vt.now, [q.item for q in batch]))
        if len(seen) == 1:
            await gate

    return handler, gate, seen


class CountingPolicy(FixedBatchPolicy):
    """A fixed policy that counts how often the batcher asks it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.asked = 0

    def decide(self, *args: Any, **kw: Any):
        self.asked += 1
        return super().decide(*args, **kw)


async def test_arrivals_that_cannot_start_a_batch_do_not_wake_the_loop() -> None:
    """While a partial batch waits for its flush time, or a batch is in the handler, arrivals
    that do not fill the batch are not worth a decision (each one used to cost the event loop a
    wake-up and a policy call); the arrival that fills it is, and a deadline always is."""
    vt = VirtualTime()
    handler, gate, seen = gated_handler(vt)

    policy = CountingPolicy(4, 1.0)
    batcher = MicroBatcher(handler, policy, clock=vt.clock, sleep=vt.sleep)
    batcher.start()
    batcher.put(0)
    await vt.advance(TICK)
    asked = policy.asked                  # the first arrival was decided on: wait for 3 more
    batcher.put(1)
    batcher.put(2)
    await vt.advance(TICK)
    assert policy.asked == asked and seen == []
    batcher.put(3)                        # fills the batch: decided on, flushed at once
    await vt.advance(0)
    assert seen == [(2 * TICK, [0, 1, 2, 3])] and batcher.busy
    asked = policy.asked
    for i in range(4, 10):                # the handler is busy: nothing to decide
        batcher.put(i)
    await vt.advance(TICK)
    assert policy.asked == asked
    batcher.put(10, deadline_s=vt.now + 0.5)   # a deadline: the loop must look (expiry timer)
    await vt.advance(0)
    assert policy.asked == asked          # looked, but busy: still no decision
    assert vt.sleeping == 1               # ... and a timer for the deadline is set
    gate.set_result(None)
    await vt.advance(0)
    assert seen[1] == (3 * TICK, [4, 5, 6, 7])   # the end of the batch wakes the loop
    await batcher.stop()


async def test_a_policy_that_raises_does_not_stop_serving(caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a policy (it once raised ZeroDivisionError under overload) used to end the
    batcher's loop silently: the worker stayed up and served nothing. Now the queue is flushed
    (up to max_batch_size) and the error logged."""

    class Broken(FixedBatchPolicy):
        def decide(self, *args: Any, **kw: Any):
            raise ZeroDivisionError("integer modulo by zero")

    clock = JumpClock(0.0)
    rec = Recorder(clock)
    batcher = MicroBatcher(rec, Broken(2, 1.0), clock=clock, sleep=clock.sleep)
    batcher.start()
    for i in range(5):
        batcher.put(i)
    await settle()
    assert rec.items == [[0, 1], [2, 3], [4]]
    assert "batching policy failed" in caplog.text
    await batcher.stop()


async def test_zero_wait_flushes_each_arrival_at_once() -> None:
    batcher, rec, vt = virtual_batcher(4, 0.0)
    batcher.start()
    batcher.put("a")
    await vt.advance(TICK)
    batcher.put("b")
    batcher.put("c")
    await vt.advance(0)
    assert rec.batches == [(0.0, ["a"], [0.0]), (TICK, ["b", "c"], [TICK, TICK])]
    await batcher.stop()


async def test_tasks_keep_fifo_order() -> None:
    batcher, rec, clock = jump_batcher(4, 0.5)
    batcher.start()
    for i in range(10):
        batcher.put(i)
    await settle()
    assert rec.items == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    await batcher.stop()


async def test_stop_flush_hands_every_queued_task_to_the_handler() -> None:
    batcher, rec, vt = virtual_batcher(2, 50.0)
    batcher.start()
    for i in range(5):
        batcher.put(i)
    await vt.advance(TICK)
    assert rec.items == [[0, 1], [2, 3]]  # full batches at once; 4 waits for its deadline
    assert len(batcher) == 1
    await batcher.stop(flush=True)
    assert rec.items == [[0, 1], [2, 3], [4]]
    assert rec.times[-1] == TICK          # flushed at stop, not at the 50 s deadline
    assert len(batcher) == 0
    # the loop is gone: nothing flushes any more
    batcher.put(5)
    await vt.advance(200.0)
    assert rec.items == [[0, 1], [2, 3], [4]]


async def test_stop_flush_without_start_splits_by_max_batch_size() -> None:
    batcher, rec, _ = jump_batcher(2, 50.0)
    for i in range(5):
        batcher.put(i)
    await batcher.stop(flush=True)
    assert rec.items == [[0, 1], [2, 3], [4]]


async def test_stop_without_flush_leaves_queued_tasks() -> None:
    batcher, rec, vt = virtual_batcher(4, 1.0)
    batcher.start()
    batcher.put("a")
    await vt.advance(TICK)
    await batcher.stop(flush=False)
    await vt.advance(2.0)
    assert rec.batches == []
    assert len(batcher) == 1


async def test_handler_that_raises_does_not_stop_the_batcher(caplog: pytest.LogCaptureFixture) -> None:
    batcher, rec, vt = virtual_batcher(2, 4 * TICK, fail_on={1})
    batcher.start()
    with caplog.at_level(logging.ERROR, logger="autoglm.processors.batcher"):
        for i in range(4):
            batcher.put(i)
        await vt.advance(TICK)
    assert rec.items == [[0, 1], [2, 3]]
    assert any("batch handler failed" in r.getMessage() for r in caplog.records)
    batcher.put(4)                        # later batches still flush, on time
    await vt.advance(4 * TICK)
    assert rec.batches[-1] == (5 * TICK, [4], [TICK])
    assert not batcher.busy
    await batcher.stop()


async def test_one_batch_in_the_handler_at_a_time() -> None:
    vt = VirtualTime()
    handler, gate, seen = gated_handler(vt)

    batcher = MicroBatcher(handler, FixedBatchPolicy(2, 1.0), clock=vt.clock, sleep=vt.sleep)
    batcher.start()
    batcher.put(0)
    batcher.put(1)
    await vt.advance(TICK)
    assert seen == [(0.0, [0, 1])] and batcher.busy
    for i in (2, 3, 4):                   # a full batch and more queue up meanwhile
        batcher.put(i)
    await vt.advance(TICK)
    assert seen == [(0.0, [0, 1])] and len(batcher) == 3
    gate.set_result(None)
    await vt.advance(0)
    assert seen == [(0.0, [0, 1]), (2 * TICK, [2, 3])]
    assert not batcher.busy
    await batcher.stop()
    assert seen[-1][1] == [4]


async def test_stats_and_len() -> None:
    batcher, rec, clock = jump_batcher(3, 0.5)
    for i in range(4):
        batcher.put(i)
    assert len(batcher) == 4
    batcher.start()
    await settle()
    assert len(batcher) == 0
    assert (batcher.stats.batches, batcher.stats.tasks, batcher.stats.last_batch_size) == (2, 4, 1)
    assert list(batcher.stats.batch_sizes) == [3, 1]
    await batcher.stop()


# -- property -----------------------------------------------------------------------


async def simulate(max_batch_size: int, max_wait_s: float, arrivals: list[tuple[int, int]]):
    """Bursts of ``size`` tasks, each ``gap`` ticks after the previous burst; instant handler."""
    batcher, rec, vt = virtual_batcher(max_batch_size, max_wait_s)
    batcher.start()
    put_at: list[float] = []
    for gap, size in arrivals:
        await vt.advance(gap * TICK)
        for _ in range(size):
            put_at.append(vt.now)
            batcher.put(len(put_at) - 1)
    await vt.advance(max_wait_s + TICK)  # past every deadline
    flushed_by_deadline = list(rec.batches)
    left = len(batcher)
    await batcher.stop(flush=True)
    return rec.batches, flushed_by_deadline, left, put_at


@settings(max_examples=150, deadline=None)
@given(
    max_batch_size=st.integers(1, 5),
    wait_ticks=st.integers(0, 6),
    arrivals=st.lists(st.tuples(st.integers(0, 8), st.integers(1, 4)), min_size=1, max_size=12),
)
def test_batching_property(max_batch_size: int, wait_ticks: int, arrivals: list[tuple[int, int]]) -> None:
    max_wait_s = wait_ticks * TICK
    batches, flushed_by_deadline, left, put_at = asyncio.run(simulate(max_batch_size, max_wait_s, arrivals))

    # every task lands in exactly one batch, in arrival order, before any stop
    assert [i for _, items, _ in batches for i in items] == list(range(len(put_at)))
    assert flushed_by_deadline == batches and left == 0
    for flushed_at, items, enqueued in batches:
        # no batch exceeds its size
        assert 1 <= len(items) <= max_batch_size
        # the batcher stamped each task with the fake time it was put
        assert enqueued == [put_at[i] for i in items]
        # no task waits past max_wait_s
        assert all(flushed_at - e <= max_wait_s + 1e-9 for e in enqueued)
        # and none is flushed early: a full batch the moment it filled, a partial one at its deadline
        expected = enqueued[0] + max_wait_s
        if len(items) == max_batch_size:
            expected = min(expected, enqueued[-1])
        assert flushed_at == expected


async def test_flushing_sends_a_partial_batch_at_once_instead_of_waiting_for_max_wait():
    """A drain sets flushing: three tasks of a fixed 64/50 s batcher go to the model now."""
    batcher, rec, vt = virtual_batcher(64, 50.0)
    batcher.start()
    for i in range(3):
        batcher.put(i)
    await vt.advance(1.0)
    assert rec.batches == [], "without flushing the batch waits for max_wait_s"
    batcher.set_flushing(True)
    await vt.advance(0.0)
    assert rec.items == [[0, 1, 2]] and rec.times == [1.0]
    batcher.set_flushing(False)
    batcher.put(3)
    await vt.advance(1.0)
    assert rec.items == [[0, 1, 2]], "back to normal batching after the drain"
    await batcher.stop(flush=False)
