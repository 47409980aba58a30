"""Batching policies: pure decisions of when to flush a micro-batch and how big.

A policy does no I/O and never reads a clock: the batcher tells it the time
(``now_s``, float seconds of a monotonic clock) and what is queued, and it
answers with a :class:`BatchDecision`. After each batch the batcher reports
what happened through :meth:`BatchPolicy.observe`, which is where a feedback
policy (EWMA latency control, the adaptive-batching issue) learns; the fixed
policy ignores it. This is the seam the adaptive controller plugs into
(bytewax's ``next_batch``/``next_awake`` split is the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from autoglm.processors import tunables


@dataclass(frozen=True, slots=True)
class BatchDecision:
    """What to do now.

    Attributes:
        size: how many queued tasks to take when flushing (0 when the queue is empty).
        flush_at_s: monotonic time at or after which to flush ``size`` tasks;
            ``None`` when there is nothing to flush. A value <= now means flush now.
        full_at: for a flush in the future, the queue length at which the policy would flush at
            once (the batch is full); the batcher then ignores arrivals until the queue reaches it.
            ``None``: unknown, every arrival asks the policy again.
    """

    size: int
    flush_at_s: float | None
    full_at: int | None = None


@dataclass(frozen=True, slots=True)
class PolicyFigures:
    """What a policy reports of itself (heartbeats, metrics).

    Attributes:
        mode: ``"adaptive"`` or ``"fixed"``.
        latency_target_s: the p99 target, seconds (None for a policy without one).
        max_batch_size: the configured bound, tasks.
        batch_ceiling: the largest batch that can form: the smaller of
            ``max_batch_size`` and the worker's in-flight cap.
        max_wait_s: seconds.
        target_size: the size the policy last asked for, tasks.
        service_fixed_s, service_per_task_s, service_spread_s: the EWMA cost model
            ``a + b*n`` and its spread, seconds (None without a cost model).
        correction: the latency feedback's multiplier on the target (None without one).
    """

    mode: str
    latency_target_s: float | None
    max_batch_size: int
    batch_ceiling: int
    max_wait_s: float
    target_size: int
    service_fixed_s: float | None = None
    service_per_task_s: float | None = None
    service_spread_s: float | None = None
    correction: float | None = None

    def report(self) -> dict[str, Any]:
        """The heartbeat form: times of the cost model in milliseconds (``service_*_ms``)."""
        out: dict[str, Any] = {
            "mode": self.mode, "latency_target_s": self.latency_target_s, "max_batch_size": self.max_batch_size,
            "batch_ceiling": self.batch_ceiling, "max_wait_s": self.max_wait_s, "target_size": self.target_size,
        }
        if self.service_fixed_s is not None:
            out.update(service_fixed_ms=self.service_fixed_s * 1000.0,
                       service_per_task_ms=(self.service_per_task_s or 0.0) * 1000.0,
                       service_spread_ms=(self.service_spread_s or 0.0) * 1000.0)
        return out


class BatchPolicy(Protocol):
    """The batching seam. Implementations are pure and cheap (called per event).

    Attributes:
        max_batch_size: the configured bound on tasks per batch.
        batch_ceiling: the largest batch that can form (``max_batch_size`` and the
            worker's in-flight cap, whichever is smaller); decisions never exceed it.
        over_target: whether the last batch's worst latency missed the target
            (always False for a policy without a target).
        last_target_size: the size the policy last asked for.
    """

    max_batch_size: int
    over_target: bool
    last_target_size: int

    @property
    def batch_ceiling(self) -> int: ...

    def set_in_flight_cap(self, cap: int | None) -> None:
        """The worker's in-flight cap (None: none): a batch can never hold more tasks than it."""
        ...

    def configure(self, **params: Any) -> None:
        """Re-tune (``max_batch_size``, ``max_wait_s``, ...); raises ValueError when out of range."""
        ...

    def figures(self) -> PolicyFigures:
        """The current settings and estimates."""
        ...

    def decide(
        self, now_s: float, queued: int, oldest_enqueued_s: float | None, busy: bool,
        next_deadline_s: float | None = None,
    ) -> BatchDecision:
        """Decide the next flush.

        Args:
            now_s: current monotonic time, seconds.
            queued: tasks waiting.
            oldest_enqueued_s: monotonic time the oldest waiting task was queued, or None.
            busy: whether the model is running a batch right now.
            next_deadline_s: the earliest task deadline in the queue (monotonic seconds), or None.
        """
        ...

    def observe(self, now_s: float, batch_size: int, inference_s: float, latencies_s: Sequence[float]) -> None:
        """Learn from a finished batch: its size, forward duration and per-task latencies (seconds)."""
        ...

    def observe_cycle(self, batch_size: int, cycle_s: float, target_size: int | None = None) -> None:
        """Learn the pipeline's cost per batch: seconds from a batch's start to the next one's, when
        a backlog made them back to back; ``target_size`` is the size the policy had asked for."""
        ...


def fixed_decision(
    now_s: float, queued: int, oldest_enqueued_s: float | None, max_batch_size: int, max_wait_s: float
) -> BatchDecision:
    """Size/wait batching: ``max_batch_size`` at once when that many are queued, else whatever is
    queued at ``oldest_enqueued_s + max_wait_s``; nothing when the queue is empty."""
    if queued <= 0 or oldest_enqueued_s is None:
        return BatchDecision(0, None)
    if queued >= max_batch_size:
        return BatchDecision(max_batch_size, now_s)
    return BatchDecision(queued, oldest_enqueued_s + max_wait_s, full_at=max_batch_size)


class FixedBatchPolicy:
    """Fixed size/wait micro-batching: flush at ``max_batch_size`` tasks, or ``max_wait_s``
    after the first task of the batch was queued, whichever comes first.

    This is the classic knob pair of Triton's dynamic batcher
    (``max_queue_delay_microseconds``), Ray Serve's ``@serve.batch``
    (``batch_wait_timeout_s``) and faust's ``stream.take(max_, within)``.

    Args:
        max_batch_size: >= 1 tasks.
        max_wait_s: >= 0 seconds; 0 flushes whatever is queued at once.

    Raises:
        ValueError: a bound is out of range.
    """

    over_target = False

    def __init__(self, max_batch_size: int = 32, max_wait_s: float = 0.010):
        self._cap: int | None = None
        self.configure(max_batch_size=max_batch_size, max_wait_s=max_wait_s)
        self.last_target_size = self.batch_ceiling

    def configure(self, *, max_batch_size: int | None = None, max_wait_s: float | None = None) -> None:
        """Change the bounds while running.

        Raises:
            ValueError: out of the ranges of :mod:`autoglm.processors.tunables`.
        """
        if max_batch_size is not None:
            tunables.MAX_BATCH_SIZE.check(max_batch_size)
        if max_wait_s is not None:
            tunables.MAX_WAIT_S.check(max_wait_s)
        if max_batch_size is not None:
            self.max_batch_size = int(max_batch_size)
        if max_wait_s is not None:
            self.max_wait_s = float(max_wait_s)

    @property
    def batch_ceiling(self) -> int:
        """``max_batch_size``, or the in-flight cap when that is smaller."""
        return self.max_batch_size if self._cap is None else min(self.max_batch_size, self._cap)

    def set_in_flight_cap(self, cap: int | None) -> None:
        self._cap = cap

    def figures(self) -> PolicyFigures:
        return PolicyFigures("fixed", None, self.max_batch_size, self.batch_ceiling, self.max_wait_s,
                             self.batch_ceiling)

    def decide(
        self, now_s: float, queued: int, oldest_enqueued_s: float | None, busy: bool,
        next_deadline_s: float | None = None,
    ) -> BatchDecision:
        return fixed_decision(now_s, queued, oldest_enqueued_s, self.batch_ceiling, self.max_wait_s)

    def observe(self, now_s: float, batch_size: int, inference_s: float, latencies_s: Sequence[float]) -> None:
        return None

    def observe_cycle(self, batch_size: int, cycle_s: float, target_size: int | None = None) -> None:
        return None
