"""Unit tests of the task queue (processors/queue.py): priority, aging, deadlines.

Times are plain floats passed in (the queue reads no clock). The values used
are integers or multiples of 1/4 with aging rates that are powers of two, so
every rank ``priority - aging_per_s * enqueued_s`` is exact in binary floating
point and ties are real ties, not rounding accidents.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.processors.queue import DEFAULT_AGING_PER_S, QueuedTask, TaskQueue


def items(tasks: list[QueuedTask[str]]) -> list[str]:
    return [t.item for t in tasks]


# -- priority ----------------------------------------------------------------------


def test_higher_priority_first_fifo_among_equals() -> None:
    q: TaskQueue[str] = TaskQueue(aging_per_s=0.0)
    for name, prio in [("a0", 0), ("b5", 5), ("c0", 0), ("d9", 9), ("e5", 5), ("f0", 0)]:
        q.push(name, now_s=0.0, priority=prio)
    assert items(q.pop(100)) == ["d9", "b5", "e5", "a0", "c0", "f0"]


def test_pop_takes_at_most_n_and_keeps_the_rest_in_order() -> None:
    q: TaskQueue[int] = TaskQueue(aging_per_s=0.0)
    for i in range(5):
        q.push(i, now_s=float(i))
    assert [t.item for t in q.pop(2)] == [0, 1]
    assert len(q) == 3
    assert [t.item for t in q.pop(0)] == []
    assert [t.item for t in q.pop(10)] == [2, 3, 4]
    assert len(q) == 0 and q.pop(3) == []


def test_popped_task_carries_its_enqueue_time_and_deadline() -> None:
    q: TaskQueue[str] = TaskQueue()
    q.push("x", now_s=12.5, priority=3, deadline_s=20.0)
    q.push("y", now_s=13.0)
    assert q.pop(2) == [QueuedTask("x", 12.5, 20.0), QueuedTask("y", 13.0, None)]


def test_default_aging_is_one_level_per_second() -> None:
    assert DEFAULT_AGING_PER_S == 1.0
    assert TaskQueue().aging_per_s == 1.0


def test_negative_aging_is_rejected() -> None:
    with pytest.raises(ValueError, match="aging_per_s"):
        TaskQueue(aging_per_s=-0.5)


# -- aging -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("high_enqueued_s", "expected"),
    [
        (6.0, ["low", "high"]),   # waited 6 s: 0 + 6 > 5 -> the old low-priority task first
        (4.0, ["high", "low"]),   # waited only 4 s: 0 + 4 < 5
        (5.0, ["low", "high"]),   # exact tie (0 + 5 == 5): arrival order decides
    ],
)
def test_aging_lets_an_old_low_priority_task_overtake(high_enqueued_s: float, expected: list[str]) -> None:
    q: TaskQueue[str] = TaskQueue(aging_per_s=1.0)
    q.push("low", now_s=0.0, priority=0)
    q.push("high", now_s=high_enqueued_s, priority=5)
    assert items(q.pop(2)) == expected


def test_aging_rate_scales_the_overtake_time() -> None:
    # with 0.5 levels/s the priority gap of 5 takes 10 s to close
    q: TaskQueue[str] = TaskQueue(aging_per_s=0.5)
    q.push("low", now_s=0.0, priority=0)
    q.push("high9", now_s=9.0, priority=5)
    q.push("high11", now_s=11.0, priority=5)
    assert items(q.pop(3)) == ["high9", "low", "high11"]


def test_zero_aging_is_strict_priority() -> None:
    q: TaskQueue[str] = TaskQueue(aging_per_s=0.0)
    q.push("old-low", now_s=0.0, priority=0)
    q.push("new-high", now_s=1e6, priority=1)
    assert items(q.pop(2)) == ["new-high", "old-low"]


# -- deadlines ---------------------------------------------------------------------


def test_expire_returns_exactly_the_tasks_due_at_or_before_now() -> None:
    q: TaskQueue[str] = TaskQueue()
    q.push("d3", now_s=0.0, deadline_s=3.0)
    q.push("none", now_s=0.0)
    q.push("d1", now_s=0.0, deadline_s=1.0)
    q.push("d2", now_s=0.0, deadline_s=2.0)
    q.push("d2b", now_s=0.5, deadline_s=2.0)
    assert q.expire(0.999) == []
    assert items(q.expire(2.0)) == ["d1", "d2", "d2b"]   # deadline == now expires
    assert len(q) == 2
    assert items(q.pop(10)) == ["d3", "none"]            # the expired ones never pop
    assert q.expire(100.0) == []                          # nor expire twice (d3 was popped)


def test_expired_tasks_never_pop_and_popped_tasks_never_expire() -> None:
    q: TaskQueue[str] = TaskQueue(aging_per_s=0.0)
    q.push("a", now_s=0.0, priority=1, deadline_s=5.0)
    q.push("b", now_s=0.0, priority=0, deadline_s=1.0)
    assert items(q.pop(1)) == ["a"]
    assert items(q.expire(10.0)) == ["b"]   # "a" is gone: not returned although its deadline passed
    assert q.pop(5) == [] and len(q) == 0


def test_oldest_and_next_deadline_skip_removed_entries() -> None:
    q: TaskQueue[str] = TaskQueue(aging_per_s=0.0)
    assert q.oldest_enqueued_s() is None and q.next_deadline_s() is None
    q.push("old", now_s=1.0, priority=0, deadline_s=50.0)
    q.push("mid", now_s=2.0, priority=9, deadline_s=10.0)
    q.push("new", now_s=3.0, priority=0, deadline_s=30.0)
    q.push("free", now_s=4.0, priority=0)
    assert (q.oldest_enqueued_s(), q.next_deadline_s()) == (1.0, 10.0)
    assert items(q.pop(1)) == ["mid"]           # removes the earliest deadline
    assert (q.oldest_enqueued_s(), q.next_deadline_s()) == (1.0, 30.0)
    assert items(q.pop(1)) == ["old"]           # removes the oldest
    assert (q.oldest_enqueued_s(), q.next_deadline_s()) == (3.0, 30.0)
    assert items(q.expire(30.0)) == ["new"]
    assert (q.oldest_enqueued_s(), q.next_deadline_s()) == (4.0, None)
    assert len(q) == 1 and list(q) == ["free"]
    assert items(q.pop(1)) == ["free"]
    assert (q.oldest_enqueued_s(), q.next_deadline_s(), len(q)) == (None, None, 0)


def test_iteration_yields_only_queued_items() -> None:
    q: TaskQueue[int] = TaskQueue()
    for i in range(6):
        q.push(i, now_s=0.0, deadline_s=float(i) if i % 2 else None)
    q.expire(3.0)                 # 1 and 3
    q.pop(1)                      # 0
    assert sorted(q) == [2, 4, 5]
    assert len(q) == 3


# -- property: the queue against a reference model --------------------------------

QUARTER = 0.25

ops = st.lists(
    st.one_of(
        # push: priority, deadline offset in quarters from now (None: no deadline)
        st.tuples(st.just("push"), st.integers(-3, 3), st.one_of(st.none(), st.integers(-2, 12))),
        # advance the clock by some quarters
        st.tuples(st.just("tick"), st.integers(0, 8), st.none()),
        # the batcher's step: expire at now, then pop up to n
        st.tuples(st.just("take"), st.integers(0, 4), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(aging=st.sampled_from([0.0, 0.5, 1.0, 2.0]), script=ops)
def test_every_task_leaves_exactly_once_in_reference_order(aging: float, script: list) -> None:
    """Random pushes, clock steps and batcher steps (expire at ``now`` then pop).

    Checked against a reference: a plain list, sorted by effective priority at
    pop time (``priority + aging * waited``, ties by arrival); every task leaves
    exactly once (popped or expired); an expired task's deadline is <= the
    expiry time; a popped task's deadline is > the pop time; ``len``,
    ``oldest_enqueued_s`` and ``next_deadline_s`` match the reference.
    """
    q: TaskQueue[int] = TaskQueue(aging_per_s=aging)
    now = 0.0
    ref: list[tuple[int, int, float, float | None]] = []  # (id, priority, enqueued_s, deadline_s)
    pushed: set[int] = set()
    left: list[int] = []
    next_id = 0
    for op, a, b in script:
        if op == "push":
            deadline = None if b is None else now + b * QUARTER
            q.push(next_id, now_s=now, priority=a, deadline_s=deadline)
            ref.append((next_id, a, now, deadline))
            pushed.add(next_id)
            next_id += 1
        elif op == "tick":
            now += a * QUARTER
        else:
            expired = q.expire(now)
            due = [r for r in ref if r[3] is not None and r[3] <= now]
            assert sorted(t.item for t in expired) == sorted(r[0] for r in due)
            assert all(t.deadline_s is not None and t.deadline_s <= now for t in expired)
            ref = [r for r in ref if r not in due]
            popped = q.pop(a)
            order = sorted(ref, key=lambda r: (-(r[1] + aging * (now - r[2])), r[0]))
            assert [t.item for t in popped] == [r[0] for r in order[:a]]
            assert all(t.deadline_s is None or t.deadline_s > now for t in popped)
            ref = order[a:]
            left += [t.item for t in expired] + [t.item for t in popped]
        assert len(q) == len(ref)
        assert q.oldest_enqueued_s() == (min(r[2] for r in ref) if ref else None)
        deadlines = [r[3] for r in ref if r[3] is not None]
        assert q.next_deadline_s() == (min(deadlines) if deadlines else None)
    # drain: whatever is still queued leaves through one last expire + pop
    final = q.expire(now) + q.pop(len(ref) + 1)
    left += [t.item for t in final]
    assert sorted(left) == sorted(pushed)          # exactly once: no loss, no duplicate
    assert len(left) == len(set(left))
    assert len(q) == 0


def test_remove_if_takes_matching_tasks_out_of_every_order():
    from autoglm.processors.queue import TaskQueue

    q: TaskQueue[tuple[str, int]] = TaskQueue()
    for i in range(6):
        q.push(("p0" if i % 2 else "p1", i), now_s=float(i), priority=i % 3, deadline_s=100.0 + i)
    removed = q.remove_if(lambda item: item[0] == "p0")
    assert sorted(r.item[1] for r in removed) == [1, 3, 5]
    assert len(q) == 3
    assert sorted(x.item[1] for x in q.pop(10)) == [0, 2, 4]
    assert q.expire(1000.0) == [] and q.oldest_enqueued_s() is None


@given(st.lists(st.tuples(st.sampled_from([0, 0, 0, 1, -2, 5]), st.floats(-1.0, 3.0), st.booleans()),
                max_size=60),
       st.lists(st.integers(1, 7), max_size=20))
def test_pop_order_is_rank_then_arrival_whatever_mix_of_fifo_and_heap(pushes, takes):
    """Priority-0 tasks pushed in time order take the queue's deque, the rest its heap: pops still
    come out by effective priority (rank), ties by arrival, and each task exactly once."""
    q: TaskQueue[int] = TaskQueue(aging_per_s=1.0)
    now = 0.0
    expected = []
    for i, (priority, step, back_in_time) in enumerate(pushes):
        now = now - abs(step) if back_in_time else now + abs(step)
        q.push(i, now_s=now, priority=priority)
        expected.append((-(priority - 1.0 * now), i))
    expected.sort()
    got = []
    for n in takes + [len(pushes) + 1]:
        got += [t.item for t in q.pop(n)]
    assert got == [i for _, i in expected]
    assert len(q) == 0 and q.oldest_enqueued_s() is None
