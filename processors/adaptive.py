"""Adaptive micro-batching: batch size from EWMA latency feedback against a latency target.

The policy keeps two pieces of state, both updated after every batch:

1. **A service-time model** ``t(n) = a + b*n`` (a fixed cost per batch plus a
   cost per task), fitted by exponentially weighted least squares over the
   recent batches (``alpha = 0.2``), and an EWMA of the squared residual, its
   spread ``sigma``. Planning uses the pessimistic ``t(n) + k*sigma`` with
   ``k = 2`` (about the 98th percentile of a normal residual).
2. **A feedback correction** ``c`` in [0.25, 1] on the latency target: each
   batch's worst end-to-end latency is compared with ``latency_target_s``, and
   ``c`` is multiplied by ``(target / observed) ** 0.5``, clamped to a change of
   at most 20 % per batch (the EWMA of that latency, ``latency_ewma_s``, is
   reported but not fed back: integrating a lagging signal made the loop
   overshoot). This absorbs what the service-time model cannot see (time in Kafka
   before the task reached the worker, result publication).

Decision (when the model is idle; the batcher never forms a batch while it is busy):

- ``budget = c * latency_target_s - age(oldest queued) - k*sigma``, further
  limited by the earliest queued deadline (when that deadline can still be met);
- the target size is the largest ``n`` with ``a + b*n <= budget`` (at least 1,
  at most ``max_batch_size``): the largest batch whose expected completion
  keeps the oldest task inside its target;
- when even one task cannot make it (``budget < t(1)``: overload), it takes the
  most efficient batch size seen, to drain the backlog at the highest
  throughput: an EWMA (``EFFICIENCY_ALPHA = 0.1``) of the *cycle time* per task
  (batch start to the next batch start while a backlog waits, here or upstream,
  so it includes the stream work around the model: decoding, publishing
  results) is kept per power-of-two bucket of the size *asked for*
  (:meth:`AdaptiveBatchPolicy.observe_cycle`). A hill climb: it starts at
  :meth:`AdaptiveBatchPolicy.start_size` (32, or larger when the fitted fixed
  cost ``a`` is large against ``b``), moves to a bucket with at least
  ``MIN_SAMPLES`` samples that is ``SWITCH_MARGIN`` (5 %) cheaper per task, and
  probes a neighbour (half or double) every ``PROBE_EVERY``-th overload batch,
  every 2nd while a neighbour is unexplored (the larger first), never above the
  largest batch whose service time alone fits the target. Real costs are
  not linear either way: on a CPU a text model's padding makes 64-text batches
  slower per text than 8-text ones, while a small model inside a Python stream
  processor pays a per-batch cost of the event loop that makes 256 cheaper per
  task than 32 (figure A, benchmarks/README.md);
- when more than twice the target size is queued (the load outruns batches
  sized to the budget), the size is at least that overload size: a
  budget-fitted batch shrinks as the oldest task ages, so it would lower the
  throughput just as a backlog builds (a text model at 7 ms per text made
  batches of 5-15 at the start of each burst);
- it flushes **at once** with ``min(queued, target)`` tasks: with an idle model
  a lone task never waits (no fixed delay penalty at low load); under load the
  queue fills while the model runs, so batches grow with the arrival rate;
- except after a batch whose worst latency missed the target (``over_target``:
  a backlog upstream, in Kafka, that the queue here does not show): then a
  short batch waits up to ``max_wait_s`` to fill the target size, because in a
  backlog throughput is what shortens latency, and a stream-bound pipeline
  hands the batcher only the few tasks decoded since the last batch.

Why ``alpha = 0.2``: its effective span is ``2/alpha - 1 = 9`` batches, short
enough to follow a change of load or input mix within about ten batches, long
enough that one outlier batch (a GC pause, a page fault) moves the estimate by
only a fifth of its error. ``k = 2`` makes the plan miss its target on about
2 % of batches when residuals are normal, inside a p99 target once the
correction has absorbed the rest.

Convergence and damping: with ``alpha = 0.2`` the weight of observations older
than ``k`` batches is ``0.8**k``: after a step change in the service time the
estimates are typically within 11 % of the new regime after 10 batches and
within 2 % after 25 (exactly ``0.8**k`` when batch sizes alternate; random
sizes spread it). The
correction moves by at most 20 % per batch and by the square root of the error
ratio (a damped, under-relaxed multiplicative controller), so it approaches the
target from one side instead of oscillating around it. These choices follow the
AIMD/feedback batching of Clipper (Crankshaw et al., NSDI 2017, section 4.3),
replacing its additive probing with a fitted cost model.

Pure: no I/O, no clock; ``now_s`` is passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from autoglm.processors import tunables
from autoglm.processors.batching import BatchDecision, PolicyFigures, fixed_decision

#: EWMA smoothing of the cost model and of the latency feedback (effective span ~ 9 batches).
DEFAULT_ALPHA = 0.2
#: Residual spread multiplier used when planning (about p98 of a normal residual).
SIGMA_K = 2.0
#: Exponent of the multiplicative correction (under-relaxation).
FEEDBACK_GAIN = 0.5
#: Largest relative change of the correction per batch.
FEEDBACK_MAX_STEP = 0.2
CORRECTION_MIN = 0.25
#: EWMA smoothing of the cycle time per task of each size bucket (effective span ~ 19 batches of
#: that bucket): slower than the cost model, since how efficient a size is changes little, and
#: the overload climb must not follow noise (a flat cost with 30 % noise: ~11 size changes in
#: 300 batches at 0.1, ~25 at 0.2).
EFFICIENCY_ALPHA = 0.1
#: Under overload, one batch in this many probes a neighbouring size bucket ...
PROBE_EVERY = 4
#: ... and one in this many while a neighbour of the current size has too few samples (a climb
#: then takes ~6 batches per step instead of ~12: the first burst is where it counts).
PROBE_EVERY_EXPLORING = 2
#: A size bucket needs this many cycle-time samples before it can replace the current best:
#: one sample is too noisy on a shared machine (a single lucky probe made the size oscillate).
MIN_SAMPLES = 3
#: The best bucket changes only to one at least this much cheaper per task (hysteresis).
SWITCH_MARGIN = 0.05
#: The overload hill climb starts at the power of two nearest to the size whose fixed cost ``a``
#: is this share of the batch's service time (``n = a/b * (1 - share)/share``, 9 a/b for 10 %).
START_FIXED_SHARE = 0.10
#: ... and never below this size (nor while the cost model has seen one batch size only).
START_SIZE = 32
#: Bounds of the adaptive mode when none are given: generous, because the adaptive mode only
#: fills a batch (up to ``max_wait_s``) while it is over its target, never at low load.
ADAPTIVE_MAX_BATCH_SIZE = 256
ADAPTIVE_MAX_WAIT_S = 0.050


@dataclass(frozen=True, slots=True)
class ServiceEstimate:
    """The fitted service time ``a_s + b_s * n`` (seconds) and its residual spread ``sigma_s``."""

    a_s: float
    b_s: float
    sigma_s: float

    def predict_s(self, n: int) -> float:
        return self.a_s + self.b_s * n


class ServiceTimeModel:
    """Exponentially weighted least squares of batch service time on batch size.

    Args:
        alpha: weight of the newest batch, in (0, 1].
        prior_a_s: fixed cost assumed before any observation (seconds).
        prior_b_s: per-task cost assumed before any observation (seconds).
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA, prior_a_s: float = 0.002, prior_b_s: float = 0.001):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._w = 0.0
        self._sn = self._st = self._snn = self._snt = 0.0
        self._a, self._b = prior_a_s, prior_b_s
        self._var = 0.0
        self.observations = 0
        #: whether the per-task cost was ever fitted (batch sizes varied); before that it is the prior
        self.identified = False

    @property
    def estimate(self) -> ServiceEstimate:
        return ServiceEstimate(self._a, self._b, math.sqrt(self._var))

    def observe(self, n: int, t_s: float) -> None:
        """Add one batch of ``n`` tasks that took ``t_s`` seconds."""
        if n <= 0 or not math.isfinite(t_s) or t_s < 0:
            return
        residual = t_s - (self._a + self._b * n)
        keep = 1.0 - self.alpha
        self._var = residual * residual if self.observations == 0 else keep * self._var + self.alpha * residual**2
        self._w = keep * self._w + self.alpha
        self._sn = keep * self._sn + self.alpha * n
        self._st = keep * self._st + self.alpha * t_s
        self._snn = keep * self._snn + self.alpha * n * n
        self._snt = keep * self._snt + self.alpha * n * t_s
        self.observations += 1
        mean_n, mean_t = self._sn / self._w, self._st / self._w
        var_n = self._snn / self._w - mean_n**2
        if var_n > 0.25:  # sizes vary enough to separate the fixed and per-task cost
            b = (self._snt / self._w - mean_n * mean_t) / var_n
            self._b = max(b, 1e-7)
            self.identified = True
        # otherwise keep the per-task cost, re-fit the fixed cost to the mean
        self._a = max(mean_t - self._b * mean_n, 0.0)


class SizeEfficiency:
    """EWMA of the service time per task for each power-of-two batch-size bucket.

    Bucket ``k`` holds batches of ``2**k <= n < 2**(k+1)`` tasks.

    Args:
        alpha: EWMA weight of the newest batch of a bucket.
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA):
        self.alpha = alpha
        self.per_task_s: dict[int, float] = {}
        self.samples: dict[int, int] = {}
        self.observations = 0
        self.current: int | None = None

    @staticmethod
    def bucket(n: int) -> int:
        return max(1, n).bit_length() - 1

    def observe(self, n: int, t_s: float, target_size: int | None = None) -> None:
        """A batch of ``n`` tasks cost ``t_s`` seconds; it counts for the bucket of ``target_size``
        (default ``n``)."""
        if n <= 0 or not math.isfinite(t_s) or t_s < 0:
            return
        self.observations += 1
        k, v = self.bucket(target_size or n), t_s / n
        self.samples[k] = self.samples.get(k, 0) + 1
        old = self.per_task_s.get(k)
        self.per_task_s[k] = v if old is None else (1 - self.alpha) * old + self.alpha * v

    def exploring(self, max_batch_size: int) -> bool:
        """Whether a neighbour of the current bucket (or the climb's start) lacks ``MIN_SAMPLES``."""
        if self.current is None:
            return True
        top = self.bucket(max_batch_size)
        home = min(self.current, top)
        return any(self.samples.get(k, 0) < MIN_SAMPLES for k in (home - 1, home + 1) if 0 <= k <= top)

    def best_size(self, max_batch_size: int, probe_round: int | None = None, start_size: int = 32) -> int:
        """The size of the most efficient bucket seen; with ``probe_round`` set, a neighbour
        instead: an unexplored one first (the larger first), else half or double by the round's
        parity.

        The climb starts at ``start_size`` (clamped to ``max_batch_size``); it changes to another
        bucket once that one has ``MIN_SAMPLES`` samples and is ``SWITCH_MARGIN`` cheaper per task.
        """
        top = self.bucket(max_batch_size)

        def size_of(k: int) -> int:
            return max_batch_size if k == top else 2**k

        if self.current is None:
            self.current = self.bucket(min(max(1, start_size), max_batch_size))
        home = min(self.current, top)
        trusted = {k: v for k, v in self.per_task_s.items()
                   if k <= top and (k == home or self.samples.get(k, 0) >= MIN_SAMPLES)}
        best = home
        if trusted:
            cheapest = min(trusted, key=lambda k: (trusted[k], -k))
            if home not in trusted or trusted[cheapest] <= (1 - SWITCH_MARGIN) * trusted[home]:
                best = cheapest  # clearly better (hysteresis against noise)
        self.current = best
        if probe_round is None:
            return size_of(best)
        neighbours = [k for k in (best + 1, best - 1) if 0 <= k <= top]
        if not neighbours:  # max_batch_size 1: nothing to climb
            return size_of(best)
        unexplored = [k for k in neighbours if self.samples.get(k, 0) < MIN_SAMPLES]
        if unexplored:  # an unexplored neighbour first (the larger one first)
            return size_of(unexplored[0])
        return size_of(neighbours[probe_round % len(neighbours)])


class AdaptiveBatchPolicy:
    """Batch size from latency feedback against ``latency_target_s`` (p99 end-to-end).

    Args:
        latency_target_s: the latency SLO per task, seconds (> 0).
        max_batch_size: upper bound on tasks per batch (>= 1).
        max_wait_s: upper bound on how long a batch may wait for more tasks
            after its first; the adaptive mode waits only while over its target
            (a backlog), never with an idle model at low load.
        mode: ``"adaptive"`` or ``"fixed"`` (``max_batch_size``/``max_wait_s``
            as in :class:`~autoglm.processors.batching.FixedBatchPolicy`).
        alpha: EWMA smoothing (see the module docstring).

    Raises:
        ValueError: a parameter is out of range.
    """

    def __init__(
        self,
        latency_target_s: float = 0.100,
        max_batch_size: int = ADAPTIVE_MAX_BATCH_SIZE,
        max_wait_s: float = ADAPTIVE_MAX_WAIT_S,
        *,
        mode: str = "adaptive",
        alpha: float = DEFAULT_ALPHA,
    ):
        self.service = ServiceTimeModel(alpha)
        self.efficiency = SizeEfficiency(EFFICIENCY_ALPHA)
        self.alpha = alpha
        self.correction = 1.0
        self.over_target = False
        self.latency_ewma_s: float | None = None
        self.last_target_size = 1
        self._cap: int | None = None
        self._configured = False
        self.configure(latency_target_s=latency_target_s, max_batch_size=max_batch_size,
                       max_wait_s=max_wait_s, mode=mode)

    def configure(
        self,
        *,
        latency_target_s: float | None = None,
        max_batch_size: int | None = None,
        max_wait_s: float | None = None,
        mode: str | None = None,
    ) -> None:
        """Re-tune while running; unchanged parameters are left alone.

        Raises:
            ValueError: a value is out of range; nothing is changed then.
        """
        given = {k: v for k, v in (("latency_target_s", latency_target_s), ("max_batch_size", max_batch_size),
                                   ("max_wait_s", max_wait_s), ("mode", mode)) if v is not None}
        tunables.check_tunables(given)  # the ranges of the settings and of the control plane
        target = self.latency_target_s if latency_target_s is None else float(latency_target_s)
        size = self.max_batch_size if max_batch_size is None else int(max_batch_size)
        wait = self.max_wait_s if max_wait_s is None else float(max_wait_s)
        new_mode = self.mode if mode is None else mode
        if latency_target_s is not None and self._configured and target != self.latency_target_s:
            self.correction = 1.0  # a new target: start the feedback afresh
            self.latency_ewma_s = None
        self.latency_target_s, self.max_batch_size, self.max_wait_s, self.mode = target, size, wait, new_mode
        self._configured = True

    # -- the BatchPolicy seam ---------------------------------------------------

    @property
    def batch_ceiling(self) -> int:
        """The largest batch that can form: ``max_batch_size``, or the worker's in-flight cap when
        smaller (tasks beyond the cap are never fetched, so a larger target could never fill)."""
        return self.max_batch_size if self._cap is None else min(self.max_batch_size, self._cap)

    def set_in_flight_cap(self, cap: int | None) -> None:
        """The worker's in-flight cap (``MAX_IN_FLIGHT``), or None; see :attr:`batch_ceiling`."""
        self._cap = cap

    def figures(self) -> PolicyFigures:
        """Settings, the last target size and the cost model's estimates (seconds)."""
        est = self.service.estimate
        return PolicyFigures(self.mode, self.latency_target_s, self.max_batch_size, self.batch_ceiling,
                             self.max_wait_s, self.last_target_size, est.a_s, est.b_s, est.sigma_s, self.correction)

    def target_size(self, now_s: float, oldest_enqueued_s: float, next_deadline_s: float | None = None) -> int:
        """Largest batch whose expected completion keeps the oldest task inside its target."""
        est = self.service.estimate
        slack = SIGMA_K * est.sigma_s
        budget = self.correction * self.latency_target_s - (now_s - oldest_enqueued_s) - slack
        if budget < est.predict_s(1):  # overloaded: the most efficient size, to drain the backlog
            size = self._efficient_size(est)
        else:
            size = self._fit(budget, est)
        if next_deadline_s is not None:
            deadline_budget = next_deadline_s - now_s - slack
            if deadline_budget >= est.predict_s(1):  # else that task expires whatever the batch size
                size = min(size, self._fit(deadline_budget, est))
        self.last_target_size = size
        return size

    def _efficient_size(self, est: ServiceEstimate) -> int:
        """The overload climb's size for this batch (a probe on every ``PROBE_EVERY``-th).

        Above ``START_SIZE`` the climb stays at or below the largest batch whose service time
        alone fits the latency target (``a + b*n <= latency_target_s``, once the cost model is
        fitted): a batch that misses the target even with no queueing is never worth its latency
        (a 64-text batch of a CPU text model takes longer than its 500 ms target, with no more
        throughput than 32)."""
        bound = self.batch_ceiling
        if self.service.identified:  # never below START_SIZE: one noisy fit must not pin the climb low
            bound = min(bound, max(START_SIZE, self._fit(self.latency_target_s, est)))
        seen = self.efficiency.observations  # probe on a batch count, so repeated calls agree
        every = PROBE_EVERY_EXPLORING if self.efficiency.exploring(bound) else PROBE_EVERY
        probe = seen // every if seen % every == every - 1 else None
        return self.efficiency.best_size(bound, probe, self.start_size(est))

    def start_size(self, est: ServiceEstimate | None = None) -> int:
        """Where the overload climb starts: ``START_SIZE``, or larger, the power of two nearest to
        the batch size whose fixed cost is ``START_FIXED_SHARE`` of its service time (from the
        fitted ``a + b*n``); at most ``max_batch_size``. A model with a large per-batch cost (a GPU)
        starts large. Never below ``START_SIZE``: a/b fitted from the small batches of a quiet
        period is mostly noise, and a climb up from a few tasks took seconds of a first burst
        (the stream work around a model, which ``a`` does not see, favours larger batches too)."""
        if not self.service.identified:  # only one batch size seen so far: a/b is the prior's
            return min(START_SIZE, self.batch_ceiling)
        est = est or self.service.estimate
        if est.b_s <= 0:
            return self.batch_ceiling
        n = est.a_s / est.b_s * (1 - START_FIXED_SHARE) / START_FIXED_SHARE
        return max(1, min(max(START_SIZE, 2 ** round(math.log2(max(n, 1.0)))), self.batch_ceiling))

    def _fit(self, budget_s: float, est: ServiceEstimate) -> int:
        """Largest n in [1, max_batch_size] with a + b*n <= budget_s."""
        if est.b_s <= 0:
            return self.batch_ceiling
        return max(1, min(int((budget_s - est.a_s) / est.b_s), self.batch_ceiling))

    def decide(
        self, now_s: float, queued: int, oldest_enqueued_s: float | None, busy: bool,
        next_deadline_s: float | None = None,
    ) -> BatchDecision:
        if self.mode == "fixed" or queued <= 0 or oldest_enqueued_s is None:
            return fixed_decision(now_s, queued, oldest_enqueued_s, self.batch_ceiling, self.max_wait_s)
        size = self.target_size(now_s, oldest_enqueued_s, next_deadline_s)
        if queued > 2 * size and next_deadline_s is None:  # falling behind: throughput first (module docstring)
            efficient = self._efficient_size(self.service.estimate)
            if efficient > size:
                size = self.last_target_size = efficient
        if queued >= size:
            return BatchDecision(size, now_s)
        if self.over_target:
            # a backlog upstream (the last batch missed the target): fill the efficient size for
            # up to max_wait_s, since a batch of the few tasks decoded so far wastes throughput
            return BatchDecision(queued, oldest_enqueued_s + self.max_wait_s, full_at=size)
        return BatchDecision(queued, now_s)

    def observe_cycle(self, batch_size: int, cycle_s: float, target_size: int | None = None) -> None:
        """A batch of ``batch_size`` tasks was followed at once by the next one (a backlog):
        ``cycle_s`` seconds from its start to the next start measure the pipeline's cost per task.

        ``target_size`` is the size the policy asked for (the batch may be smaller when the stream
        did not fill it within ``max_wait_s``); the cost per task counts for the size asked, since
        asking is what the climb can choose."""
        self.efficiency.observe(batch_size, cycle_s, target_size)

    def observe(self, now_s: float, batch_size: int, inference_s: float, latencies_s: Sequence[float]) -> None:
        """Update the cost model with the batch's service time and the feedback with its latencies."""
        self.service.observe(batch_size, inference_s)
        finite = [x for x in latencies_s if math.isfinite(x)]
        if not finite:
            return
        worst = max(finite)
        self.over_target = worst > self.latency_target_s
        if self.latency_ewma_s is None:
            self.latency_ewma_s = worst
        else:  # reported, not fed back: an integrated lagging signal would make the loop overshoot
            self.latency_ewma_s = (1 - self.alpha) * self.latency_ewma_s + self.alpha * worst
        if worst <= 0:
            return
        ratio = (self.latency_target_s / worst) ** FEEDBACK_GAIN
        ratio = min(max(ratio, 1 - FEEDBACK_MAX_STEP), 1 + FEEDBACK_MAX_STEP)
        self.correction = min(1.0, max(CORRECTION_MIN, self.correction * ratio))
