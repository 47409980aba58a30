"""Unit tests of the pure batching policy (processors/batching.py)."""

from __future__ import annotations

import math

import pytest

from autoglm.processors.batching import BatchDecision, FixedBatchPolicy


def test_defaults() -> None:
    policy = FixedBatchPolicy()
    assert (policy.max_batch_size, policy.max_wait_s) == (32, 0.010)


@pytest.mark.parametrize("busy", [False, True])
@pytest.mark.parametrize(
    ("queued", "oldest", "expected"),
    [
        (0, None, BatchDecision(0, None)),            # empty queue
        (0, 99.0, BatchDecision(0, None)),            # inconsistent input: still nothing to do
        (3, None, BatchDecision(0, None)),
        (4, 99.0, BatchDecision(4, 100.0)),           # full: max size, now
        (9, 50.0, BatchDecision(4, 100.0)),           # over full: max size, now (not the deadline)
        (1, 99.5, BatchDecision(1, 99.75, full_at=4)),           # partial: oldest + max_wait
        (3, 99.875, BatchDecision(3, 100.125, full_at=4)),  # full once 4 are queued
        (2, 90.0, BatchDecision(2, 90.25, full_at=4)),           # overdue partial: the past deadline means "now"
    ],
)
def test_decide(queued: int, oldest: float | None, expected: BatchDecision, busy: bool) -> None:
    policy = FixedBatchPolicy(max_batch_size=4, max_wait_s=0.25)
    assert policy.decide(100.0, queued, oldest, busy) == expected


def test_zero_wait_flushes_at_the_oldest_time() -> None:
    policy = FixedBatchPolicy(max_batch_size=8, max_wait_s=0.0)
    decision = policy.decide(10.0, 2, 9.5, False)
    assert decision == BatchDecision(2, 9.5, full_at=8)
    assert decision.flush_at_s <= 10.0  # i.e. flush now


def test_observe_changes_nothing() -> None:
    policy = FixedBatchPolicy(max_batch_size=4, max_wait_s=0.25)
    before = policy.decide(1.0, 2, 0.5, False)
    assert policy.observe(1.0, 4, 0.3, [0.1, 0.9, 5.0, 7.0]) is None
    assert policy.decide(1.0, 2, 0.5, False) == before


def test_configure_changes_decisions() -> None:
    policy = FixedBatchPolicy(max_batch_size=4, max_wait_s=0.25)
    policy.configure(max_batch_size=2)
    assert (policy.max_batch_size, policy.max_wait_s) == (2, 0.25)
    assert policy.decide(5.0, 2, 4.0, False) == BatchDecision(2, 5.0)
    policy.configure(max_wait_s=1.5)
    assert (policy.max_batch_size, policy.max_wait_s) == (2, 1.5)
    assert policy.decide(5.0, 1, 4.0, False) == BatchDecision(1, 5.5, full_at=2)
    policy.configure()  # nothing given: nothing changes
    assert (policy.max_batch_size, policy.max_wait_s) == (2, 1.5)


def test_integer_wait_is_stored_as_float_seconds() -> None:
    policy = FixedBatchPolicy(max_batch_size=4, max_wait_s=0)
    assert type(policy.max_wait_s) is float and policy.max_wait_s == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_batch_size": -5},
        {"max_wait_s": -0.001},
        {"max_wait_s": math.nan},
        {"max_wait_s": -math.inf},
    ],
    ids=["size 0", "size negative", "wait negative", "wait NaN", "wait -inf"],
)
def test_invalid_bounds_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FixedBatchPolicy(**kwargs)
    policy = FixedBatchPolicy(max_batch_size=4, max_wait_s=0.25)
    with pytest.raises(ValueError):
        policy.configure(**kwargs)
    assert (policy.max_batch_size, policy.max_wait_s) == (4, 0.25)


def test_rejected_configure_changes_nothing() -> None:
    policy = FixedBatchPolicy(max_batch_size=4, max_wait_s=0.25)
    with pytest.raises(ValueError):
        policy.configure(max_batch_size=16, max_wait_s=-1.0)
    assert (policy.max_batch_size, policy.max_wait_s) == (4, 0.25)
