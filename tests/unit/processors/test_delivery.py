"""Unit tests of delivery bookkeeping (processors/delivery.py): in-order release and the in-flight cap."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.processors.delivery import InFlightLimiter, OffsetTracker


async def yield_to_loop(times: int = 5) -> None:
    """Let ready tasks run; ``asyncio.sleep(0)`` yields, it does not sleep."""
    for _ in range(times):
        await asyncio.sleep(0)


# -- OffsetTracker -------------------------------------------------------------------


def test_release_only_contiguous_done_prefix_in_offset_order() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in (10, 11, 12, 15):
        tracker.received("p", offset, f"t{offset}")

    assert tracker.done("p", 12) == []          # 10 and 11 still open
    assert tracker.done("p", 15) == []
    assert tracker.in_flight("p") == 4
    assert tracker.done("p", 11) == []          # 10 still open
    assert tracker.done("p", 10) == ["t10", "t11", "t12", "t15"]
    assert tracker.in_flight("p") == 0


def test_release_stops_at_first_unfinished() -> None:
    tracker: OffsetTracker[int] = OffsetTracker()
    for offset in range(5):
        tracker.received("p", offset, offset)
    assert tracker.done("p", 0) == [0]
    assert tracker.done("p", 2) == []
    assert tracker.done("p", 1) == [1, 2]
    assert tracker.in_flight("p") == 2
    assert tracker.done("p", 4) == []
    assert tracker.done("p", 3) == [3, 4]


def test_partitions_are_independent() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.received(("t", 0), 5, "a5")
    tracker.received(("t", 1), 5, "b5")       # same offset, other partition
    tracker.received(("t", 0), 6, "a6")
    assert tracker.done(("t", 0), 6) == []
    assert tracker.done(("t", 1), 5) == ["b5"]
    assert tracker.in_flight() == 2 and tracker.in_flight(("t", 0)) == 2 and tracker.in_flight(("t", 1)) == 0
    assert tracker.done(("t", 0), 5) == ["a5", "a6"]
    assert tracker.in_flight() == 0


def test_unknown_or_repeated_done_is_ignored() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.received("p", 1, "t1")
    tracker.received("p", 2, "t2")
    assert tracker.done("p", 99) == []
    assert tracker.done("other", 1) == []
    assert tracker.done("p", 1) == ["t1"]
    assert tracker.done("p", 1) == []
    assert tracker.done("p", 2) == ["t2"]


@pytest.mark.parametrize("second", [5, 4, 0])
def test_received_non_increasing_offset_raises(second: int) -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.received("p", 5, "t5")
    with pytest.raises(ValueError):
        tracker.received("p", second, "again")
    # the tracker is unchanged: 5 still releases alone
    assert tracker.in_flight("p") == 1
    assert tracker.done("p", 5) == ["t5"]


def test_received_after_release_still_must_increase() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.received("p", 5, "t5")
    assert tracker.done("p", 5) == ["t5"]
    tracker.received("p", 6, "t6")  # above the last one: fine
    assert tracker.done("p", 6) == ["t6"]


def test_revoke_forgets_partition() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in (0, 1, 2):
        tracker.received("p", offset, f"p{offset}")
    tracker.received("q", 0, "q0")
    assert tracker.done("p", 1) == []

    assert tracker.revoke("p") == 2              # 0 and 2 unfinished; 1 was done
    assert tracker.in_flight("p") == 0 and tracker.in_flight() == 1
    assert tracker.done("p", 0) == []            # results of revoked tasks release nothing
    assert tracker.done("p", 2) == []
    assert tracker.done("q", 0) == ["q0"]        # the other partition is untouched
    assert tracker.revoke("never-assigned") == 0


def test_reassigned_partition_starts_fresh() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.received("p", 7, "old7")
    tracker.received("p", 8, "old8")
    tracker.revoke("p")
    tracker.received("p", 3, "new3")   # re-read from the last commit: lower offset allowed
    assert tracker.done("p", 8) == []  # a late result of the old assignment
    assert tracker.done("p", 3) == ["new3"]


@st.composite
def tracker_runs(draw: st.DrawFn) -> tuple[dict[int, list[int]], list[tuple[str, int, int]]]:
    """Random partitions and offsets, and an interleaving of receipts and completions.

    Receipts per partition are in increasing offset order; each offset is
    completed after it was received, in a random order.
    """
    n_parts = draw(st.integers(2, 3))
    offsets = {
        p: sorted(draw(st.sets(st.integers(0, 1000), min_size=0, max_size=12))) for p in range(n_parts)
    }
    to_receive = {p: list(offs) for p, offs in offsets.items()}
    open_: list[tuple[int, int]] = []
    ops: list[tuple[str, int, int]] = []
    while any(to_receive.values()) or open_:
        can_receive = [p for p, offs in to_receive.items() if offs]
        if can_receive and (not open_ or draw(st.booleans())):
            p = draw(st.sampled_from(can_receive))
            offset = to_receive[p].pop(0)
            ops.append(("received", p, offset))
            open_.append((p, offset))
        else:
            p, offset = open_.pop(draw(st.integers(0, len(open_) - 1)))
            ops.append(("done", p, offset))
    return offsets, ops


@settings(max_examples=200, deadline=None)
@given(tracker_runs())
def test_release_property(run: tuple[dict[int, list[int]], list[tuple[str, int, int]]]) -> None:
    offsets, ops = run
    tracker: OffsetTracker[tuple[int, int]] = OffsetTracker()
    received: dict[int, list[int]] = {p: [] for p in offsets}
    finished: dict[int, set[int]] = {p: set() for p in offsets}
    released: dict[int, list[int]] = {p: [] for p in offsets}

    for op, p, offset in ops:
        if op == "received":
            tracker.received(p, offset, (p, offset))
            received[p].append(offset)
            continue
        finished[p].add(offset)
        for token_p, token_offset in tracker.done(p, offset):
            assert token_p == p
            released[p].append(token_offset)
        # Invariants after every completion, on every partition:
        for q in offsets:
            # released = a prefix of what was received, in receipt (= offset) order ...
            assert released[q] == received[q][: len(released[q])]
            # ... every released offset is finished ...
            assert set(released[q]) <= finished[q]
            # ... nothing released sits above an unfinished offset ...
            unfinished = [o for o in received[q] if o not in finished[q]]
            if unfinished and released[q]:
                assert max(released[q]) < min(unfinished)
            # ... and the prefix is maximal: the next offset is still unfinished.
            rest = received[q][len(released[q]):]
            assert not rest or rest[0] not in finished[q]
            assert tracker.in_flight(q) == len(rest)

    for p, offs in offsets.items():
        assert released[p] == offs
    assert tracker.in_flight() == 0


# -- InFlightLimiter -----------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_raises(limit: int) -> None:
    with pytest.raises(ValueError):
        InFlightLimiter(limit)


async def test_acquire_blocks_at_the_cap() -> None:
    limiter = InFlightLimiter(2)
    await limiter.acquire()
    await limiter.acquire()
    assert limiter.in_flight == 2

    third = asyncio.create_task(limiter.acquire())
    await yield_to_loop()
    assert not third.done()
    assert limiter.in_flight == 2

    limiter.release()
    await yield_to_loop()
    assert third.done()
    assert limiter.in_flight == 2


async def test_release_wakes_waiters_fifo() -> None:
    limiter = InFlightLimiter(1)
    await limiter.acquire()
    order: list[str] = []

    async def waiter(name: str) -> None:
        await limiter.acquire()
        order.append(name)

    tasks = []
    for name in ("a", "b", "c"):
        tasks.append(asyncio.create_task(waiter(name)))
        await yield_to_loop(1)  # each one starts waiting before the next is created
    await yield_to_loop()
    assert order == []

    for expected in (["a"], ["a", "b"], ["a", "b", "c"]):
        limiter.release()
        await yield_to_loop()
        assert order == expected
        assert limiter.in_flight == 1
    await asyncio.gather(*tasks)


async def test_release_of_several_slots_wakes_as_many_waiters() -> None:
    limiter = InFlightLimiter(3)
    for _ in range(3):
        await limiter.acquire()
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(3)]
    await yield_to_loop()
    limiter.release(2)
    await yield_to_loop()
    assert [w.done() for w in waiters] == [True, True, False]
    assert limiter.in_flight == 3
    limiter.release(3)
    await yield_to_loop()
    assert waiters[2].done() and limiter.in_flight == 1


async def test_cancelled_waiter_gives_its_turn_to_the_next() -> None:
    limiter = InFlightLimiter(1)
    await limiter.acquire()
    first = asyncio.create_task(limiter.acquire())
    await yield_to_loop(1)
    second = asyncio.create_task(limiter.acquire())
    await yield_to_loop()
    first.cancel()
    await yield_to_loop()
    limiter.release()
    await yield_to_loop()
    assert first.cancelled()
    assert second.done() and not second.cancelled()
    assert limiter.in_flight == 1


async def test_waiter_cancelled_after_wake_passes_the_slot_on() -> None:
    limiter = InFlightLimiter(1)
    await limiter.acquire()
    first = asyncio.create_task(limiter.acquire())
    await yield_to_loop(1)
    second = asyncio.create_task(limiter.acquire())
    await yield_to_loop()
    limiter.release()   # wakes `first` ...
    first.cancel()      # ... which is cancelled before it runs
    await yield_to_loop()
    assert first.cancelled()
    assert second.done()
    assert limiter.in_flight == 1


async def test_newcomer_does_not_overtake_a_woken_waiter() -> None:
    limiter = InFlightLimiter(1)
    await limiter.acquire()
    order: list[str] = []

    async def early_waiter() -> None:
        await limiter.acquire()
        order.append("early")
        limiter.release()

    early = asyncio.create_task(early_waiter())
    await yield_to_loop()          # `early` waits for the slot
    limiter.release()              # the slot is handed to `early` ...
    await limiter.acquire()        # ... so a newcomer acquiring right now queues behind it
    order.append("late")
    limiter.release()
    await early
    assert order == ["early", "late"]


async def test_wait_idle() -> None:
    limiter = InFlightLimiter(4)
    await limiter.wait_idle()  # nothing in flight: returns at once

    await limiter.acquire()
    await limiter.acquire()
    idle = asyncio.create_task(limiter.wait_idle())
    await yield_to_loop()
    assert not idle.done()
    limiter.release()
    await yield_to_loop()
    assert not idle.done() and limiter.in_flight == 1
    limiter.release()
    await yield_to_loop()
    assert idle.done() and limiter.in_flight == 0
