"""Deadlines, priorities and the adaptive policy in the micro-batcher (processors/batcher.py).

Fake time only. :class:`JumpClock` is a float the test controls, and its
``sleep(d)`` moves the clock forward by ``d`` at once and yields
(``await asyncio.sleep(0)``): whenever the batcher waits with a timeout, time
jumps to the end of that timeout. So a test can tell whether the batcher
waited at all (the clock moved) and when it woke up (the clock's value).
:class:`StillClock` never moves on its own: its ``sleep`` never returns, so
only arrivals and finished batches wake the batcher.

:class:`HeldHandler` keeps each batch "in the model" until the test calls
:meth:`HeldHandler.release`, so the test decides when the model is busy.

Times are multiples of 1/8 s (exact in binary), so deadlines compare with ``==``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.processors.adaptive import AdaptiveBatchPolicy, ServiceTimeModel
from autoglm.processors.batcher import MicroBatcher
from autoglm.processors.batching import FixedBatchPolicy
from autoglm.processors.queue import QueuedTask

from .fakes import JumpClock, settle






class StillClock(JumpClock):
    """Fake time that only the test moves: ``sleep`` never returns (it is cancelled)."""

    async def sleep(self, delay_s: float) -> None:
        await asyncio.get_running_loop().create_future()


class HeldHandler:
    """Batch handler: records ``(time, items)`` on entry, then holds until released."""

    def __init__(self, clock: JumpClock):
        self.clock = clock
        self.batches: list[tuple[float, list[Any]]] = []
        self.finished = 0
        self._gate = asyncio.Event()

    async def __call__(self, batch: list[QueuedTask[Any]]) -> None:
        self.batches.append((self.clock(), [q.item for q in batch]))
        gate = self._gate
        await gate.wait()
        self.finished += 1

    def release(self) -> None:
        """Let the batch in the handler finish; later batches hold again."""
        self._gate.set()
        self._gate = asyncio.Event()

    @property
    def items(self) -> list[list[Any]]:
        return [items for _, items in self.batches]


class ExpiryRecorder:
    """``on_expired`` callback: records ``(time, items, batcher busy?)`` per call."""

    def __init__(self, clock: JumpClock):
        self.clock = clock
        self.batcher: MicroBatcher | None = None
        self.calls: list[tuple[float, list[Any], bool]] = []

    def __call__(self, tasks: list[QueuedTask[Any]]) -> None:
        assert self.batcher is not None
        self.calls.append((self.clock(), [t.item for t in tasks], self.batcher.busy))

    @property
    def items(self) -> list[Any]:
        return [i for _, items, _ in self.calls for i in items]


def held_batcher(policy: Any, clock: JumpClock) -> tuple[MicroBatcher, HeldHandler, ExpiryRecorder]:
    handler, expired = HeldHandler(clock), ExpiryRecorder(clock)
    batcher = MicroBatcher(handler, policy, on_expired=expired, clock=clock, sleep=clock.sleep)
    expired.batcher = batcher
    return batcher, handler, expired


# -- deadlines --------------------------------------------------------------------------


async def test_deadline_passing_during_a_batch_expires_at_the_deadline_while_the_model_is_busy() -> None:
    clock = JumpClock(10.0)
    batcher, handler, expired = held_batcher(AdaptiveBatchPolicy(), clock)
    batcher.start()
    batcher.put("A")
    await settle()
    assert handler.batches == [(10.0, ["A"])] and batcher.busy
    batcher.put("B", deadline_s=10.5)
    batcher.put("C")                      # no deadline: waits for the model
    await settle()
    # B expired at exactly its deadline, with A still in the model
    assert expired.calls == [(10.5, ["B"], True)]
    assert handler.batches == [(10.0, ["A"])] and handler.finished == 0
    assert len(batcher) == 1 and batcher.stats.expired == 1
    handler.release()                     # A ends at 10.5: C goes in, B never does
    await settle()
    assert handler.items == [["A"], ["C"]]
    assert handler.batches[1][0] == 10.5
    assert expired.items == ["B"]
    handler.release()
    await settle()
    await batcher.stop()
    assert expired.items == ["B"] and handler.finished == 2


async def test_several_deadlines_during_one_batch_expire_each_at_its_own_time() -> None:
    clock = JumpClock(0.0)
    batcher, handler, expired = held_batcher(AdaptiveBatchPolicy(), clock)
    batcher.start()
    batcher.put("A")
    await settle()
    for name, deadline in [("d3", 3.0), ("d1", 1.0), ("d1b", 1.0), ("d2", 2.25)]:
        batcher.put(name, deadline_s=deadline)
    await settle()
    assert expired.calls == [(1.0, ["d1", "d1b"], True), (2.25, ["d2"], True), (3.0, ["d3"], True)]
    assert handler.items == [["A"]] and len(batcher) == 0
    handler.release()
    await settle()
    await batcher.stop()
    assert handler.items == [["A"]]


async def test_a_deadline_already_past_expires_without_reaching_the_handler() -> None:
    clock = JumpClock(20.0)
    batcher, handler, expired = held_batcher(AdaptiveBatchPolicy(), clock)
    batcher.put("before-start", deadline_s=19.0)   # queued before the loop runs
    batcher.start()
    await settle()
    assert expired.calls == [(20.0, ["before-start"], False)]
    batcher.put("past", deadline_s=19.875)
    batcher.put("due-now", deadline_s=20.0)        # a deadline equal to now has passed
    batcher.put("fine", deadline_s=20.125)
    await settle()
    assert expired.calls[1:] == [(20.0, ["past", "due-now"], False)]
    assert handler.batches == [(20.0, ["fine"])]   # the one with time left goes in at once
    handler.release()
    await settle()
    await batcher.stop()
    assert clock.now == 20.0


async def test_stop_with_flush_expires_what_is_due_before_flushing() -> None:
    clock = JumpClock(5.0)
    batcher, handler, expired = held_batcher(AdaptiveBatchPolicy(), clock)
    batcher.put("due", deadline_s=5.0)
    batcher.put("kept", deadline_s=9.0)
    stopping = asyncio.ensure_future(batcher.stop(flush=True))
    await settle()
    handler.release()
    await stopping
    assert expired.items == ["due"] and handler.items == [["kept"]]


class TimedHandler:
    """Instant bookkeeping, then ``service_s`` of fake time in the model."""

    def __init__(self, clock: JumpClock, service_s: float):
        self.clock, self.service_s = clock, service_s
        self.batches: list[tuple[float, list[QueuedTask[Any]]]] = []

    async def __call__(self, batch: list[QueuedTask[Any]]) -> None:
        self.batches.append((self.clock(), list(batch)))
        await self.clock.sleep(self.service_s)


async def test_stop_with_flush_runs_the_queue_in_batches_on_fake_time() -> None:
    """Control for the xfail below: with deadlines that do not pass during the
    flush, every queued task is flushed in order, one batch per second."""
    clock = JumpClock(0.0)
    handler = TimedHandler(clock, 1.0)
    batcher = MicroBatcher(handler, AdaptiveBatchPolicy(max_batch_size=1), clock=clock, sleep=clock.sleep)
    batcher.put("x", deadline_s=0.5)
    batcher.put("y", deadline_s=1.5)
    await batcher.stop(flush=True)
    assert [(t, [q.item for q in b]) for t, b in handler.batches] == [(0.0, ["x"]), (1.0, ["y"])]


async def test_stop_with_flush_expires_tasks_whose_deadline_passes_during_the_flush() -> None:
    clock = JumpClock(0.0)
    handler = TimedHandler(clock, 1.0)
    expired: list[Any] = []
    batcher = MicroBatcher(handler, AdaptiveBatchPolicy(max_batch_size=1),
                           on_expired=lambda ts: expired.extend(t.item for t in ts), clock=clock, sleep=clock.sleep)
    batcher.put("x", deadline_s=0.5)
    batcher.put("y", deadline_s=0.75)   # due while x runs (0.0 .. 1.0)
    await batcher.stop(flush=True)
    started = {q.item: t for t, b in handler.batches for q in b}
    assert all(q.deadline_s is None or q.deadline_s > t for t, b in handler.batches for q in b), started
    assert expired == ["y"]


# -- the adaptive policy in the batcher -------------------------------------------------


async def test_adaptive_policy_flushes_a_lone_task_at_once() -> None:
    clock = JumpClock(5.0)
    batcher, handler, _ = held_batcher(AdaptiveBatchPolicy(max_wait_s=0.25), clock)
    batcher.start()
    batcher.put("x")
    await settle()
    assert handler.batches == [(5.0, ["x"])]
    assert clock.now == 5.0               # the batcher never slept: no wait before the flush
    handler.release()
    await settle()
    clock.now = 7.5
    batcher.put("y")                      # a later lone task: also at once
    await settle()
    assert handler.batches[-1] == (7.5, ["y"]) and clock.now == 7.5
    handler.release()
    await settle()
    await batcher.stop()


async def test_fixed_policy_waits_for_its_max_wait_control() -> None:
    clock = JumpClock(5.0)
    batcher, handler, _ = held_batcher(FixedBatchPolicy(32, 0.25), clock)
    batcher.start()
    batcher.put("x")
    await settle()
    assert handler.batches == [(5.25, ["x"])]   # the fixed policy pays max_wait_s; the adaptive one does not
    handler.release()
    await settle()
    await batcher.stop()


async def test_tasks_queued_while_busy_form_the_next_batch_up_to_the_target() -> None:
    clock = StillClock(1.0)
    policy = AdaptiveBatchPolicy(latency_target_s=0.1, max_batch_size=128)
    policy.service = ServiceTimeModel(prior_a_s=0.005, prior_b_s=0.001)   # t(n) = 5 ms + n * 1 ms, sigma 0
    batcher, handler, expired = held_batcher(policy, clock)
    batcher.start()
    batcher.put("first")
    await settle()
    # while "first" runs: 40 tasks; the oldest has a deadline 30.5 ms away
    batcher.put(0, deadline_s=1.0305)
    for i in range(1, 40):
        batcher.put(i)
    await settle()
    handler.release()
    await settle()
    # the deadline caps the batch: 5 ms + 25 * 1 ms = 30 ms <= 30.5 ms, 26 would not fit
    assert handler.items[1] == list(range(25))
    handler.release()
    await settle()
    assert handler.items[2] == list(range(25, 40))   # no deadline left: target 95, 15 queued
    assert expired.calls == []
    handler.release()
    await settle()
    await batcher.stop()


# -- priorities --------------------------------------------------------------------------


async def test_higher_priority_tasks_queued_while_busy_go_first() -> None:
    clock = JumpClock(0.0)
    batcher, handler, _ = held_batcher(AdaptiveBatchPolicy(max_batch_size=2), clock)
    batcher.start()
    batcher.put("A")
    await settle()
    for name, prio in [("L1", 0), ("L2", 0), ("H1", 5), ("L3", 0), ("H2", 5), ("M1", 2)]:
        batcher.put(name, priority=prio)
    await settle()
    assert handler.items == [["A"]]
    for _ in range(4):
        handler.release()
        await settle()
    assert handler.items == [["A"], ["H1", "H2"], ["M1", "L1"], ["L2", "L3"]]
    await batcher.stop()


async def test_aging_lets_an_old_task_ahead_of_a_newer_higher_priority_one() -> None:
    clock = JumpClock(0.0)
    handler, expired = HeldHandler(clock), ExpiryRecorder(clock)
    batcher = MicroBatcher(handler, AdaptiveBatchPolicy(max_batch_size=1), on_expired=expired,
                           aging_per_s=1.0, clock=clock, sleep=clock.sleep)
    expired.batcher = batcher
    batcher.start()
    batcher.put("A")
    await settle()
    batcher.put("old-low", priority=0)      # queued at 0
    clock.now = 4.0
    batcher.put("p5-at-4", priority=5)      # 5 - 4 > 0: ahead of old-low
    clock.now = 6.0
    batcher.put("p5-at-6", priority=5)      # 5 - 6 < 0: behind old-low
    await settle()
    for _ in range(4):
        handler.release()
        await settle()
    assert handler.items == [["A"], ["p5-at-4"], ["old-low"], ["p5-at-6"]]
    await batcher.stop()


# -- property ------------------------------------------------------------------------------

EIGHTH = 0.125

script_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 3), st.one_of(st.none(), st.integers(-2, 16))),
        st.tuples(st.just("advance"), st.integers(0, 6), st.none()),
        st.tuples(st.just("settle"), st.integers(0, 3), st.none()),
    ),
    max_size=50,
)


class InstantHandler:
    """Records each batch with the time it reached the handler; optionally takes fake time."""

    def __init__(self, clock: JumpClock, per_task_s: float):
        self.clock, self.per_task_s = clock, per_task_s
        self.batches: list[tuple[float, list[QueuedTask[int]]]] = []

    async def __call__(self, batch: list[QueuedTask[int]]) -> None:
        self.batches.append((self.clock(), list(batch)))
        if self.per_task_s:
            await self.clock.sleep(self.per_task_s * len(batch))


async def _run_script(max_batch_size: int, per_task_s: float, script: list) -> tuple[InstantHandler, list]:
    clock = JumpClock(0.0)
    handler = InstantHandler(clock, per_task_s)
    expiries: list[tuple[float, list[QueuedTask[int]]]] = []
    batcher = MicroBatcher(handler, AdaptiveBatchPolicy(max_batch_size=max_batch_size),
                           on_expired=lambda ts: expiries.append((clock(), list(ts))),
                           clock=clock, sleep=clock.sleep)
    batcher.start()
    n = 0
    for op, a, b in script:
        if op == "put":
            batcher.put(n, priority=a, deadline_s=None if b is None else clock() + b * EIGHTH)
            n += 1
        elif op == "advance":   # time passes while the batcher waits, not between its steps
            await settle()
            clock.now += a * EIGHTH
        else:
            await settle(a)
    for _ in range(1000):   # let the loop drain the queue (batches or expiries) before stopping
        await settle()
        if not len(batcher) and not batcher.busy:
            break
    assert not len(batcher) and not batcher.busy, "the batcher did not drain its queue"
    await batcher.stop()
    return handler, expiries


@settings(max_examples=150, deadline=None)
@given(max_batch_size=st.integers(1, 5), per_task_s=st.sampled_from([0.0, EIGHTH / 2]), script=script_ops)
def test_every_task_lands_in_exactly_one_batch_or_one_expiry(max_batch_size: int, per_task_s: float, script: list) -> None:
    """Random puts (priority, deadline), clock steps and partial yields (puts
    land while the loop is half-way through a step); the handler is instant or
    takes 1/16 s per task of fake time. The test moves the clock only once the
    batcher is waiting: a step that pops a batch and the handler's start happen
    at one instant, as on a real clock up to scheduling delay. Every task comes out exactly once, in a
    batch or an expiry; no batch exceeds max_batch_size; no task reaches the
    handler at or after its deadline, and none expires before it."""
    handler, expiries = asyncio.run(_run_script(max_batch_size, per_task_s, script))
    batched = [q.item for _, b in handler.batches for q in b]
    expired = [q.item for _, ts in expiries for q in ts]
    puts = sum(1 for op, _, _ in script if op == "put")
    assert sorted(batched + expired) == list(range(puts))
    assert all(1 <= len(b) <= max_batch_size for _, b in handler.batches)
    assert all(q.deadline_s is None or q.deadline_s > t for t, b in handler.batches for q in b)
    assert all(q.deadline_s is not None and q.deadline_s <= t for t, ts in expiries for q in ts)
