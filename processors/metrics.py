"""Batching metrics behind one small interface, with a no-op implementation (faust's sensor pattern).

Prometheus names (per model label):

- ``autoglm_batch_size`` histogram: tasks per micro-batch (Triton has no batch size histogram);
- ``autoglm_queue_wait_seconds`` histogram: time from receipt to the start of the forward;
- ``autoglm_inference_seconds`` histogram: duration of the batched forward;
- ``autoglm_tasks_total{status}`` counter: results by status (ok, error, expired, rejected);
- ``autoglm_service_fixed_seconds``, ``autoglm_service_per_task_seconds``,
  ``autoglm_service_spread_seconds`` gauges: the EWMA cost model ``a + b*n`` and its spread;
- ``autoglm_batch_target_size`` gauge: the adaptive policy's current target size;
- ``autoglm_latency_correction`` gauge: the feedback correction on the latency target;
- ``autoglm_in_flight_tasks`` and ``autoglm_in_flight_cap_tasks`` gauges (no label): tasks
  received and not yet acknowledged, and the cap at which the worker stops fetching
  (backpressure; ``MAX_IN_FLIGHT``);
- ``autoglm_queue_depth_tasks`` gauge: tasks waiting for a micro-batch;
- ``autoglm_consumer_lag_records{model, partition}`` gauge: log end offset minus committed
  offset of each partition this worker owns (the LAG column of ``kafka-consumer-groups.sh``);
  ``sum by (model)`` gives a model's lag.

Who calls what: the pipeline calls ``observe_batch``, ``count_tasks`` and
``set_policy_state`` per batch; the gauges are set by whoever knows the figure
(:class:`~autoglm.streams.control.ControlPlane` sets them at every heartbeat from
the same callables the heartbeat reads; a data path may set them more often).

Registries are per instance (no module globals), so two workers in one
process, or tests, never collide.
"""

from __future__ import annotations

from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from autoglm.processors.batching import PolicyFigures

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BatchMetrics:
    """The interface; this base class records nothing."""

    def observe_batch(self, model: str, size: int, inference_s: float, queue_waits_s: Sequence[float]) -> None:
        """One batch: its size, forward seconds, and each task's queue wait in seconds."""

    def count_tasks(self, model: str, status: str, n: int = 1) -> None:
        """``n`` results of ``status`` for ``model``."""

    def set_policy_state(self, model: str, *, a_s: float, b_s: float, sigma_s: float, target_size: int,
                         correction: float) -> None:
        """The policy's current estimates (seconds) and target size."""

    def set_policy_figures(self, model: str, figures: PolicyFigures) -> None:
        """The policy's figures (:meth:`~autoglm.processors.batching.BatchPolicy.figures`)."""
        if figures.service_fixed_s is None:
            return
        self.set_policy_state(model, a_s=figures.service_fixed_s, b_s=figures.service_per_task_s or 0.0,
                              sigma_s=figures.service_spread_s or 0.0, target_size=figures.target_size,
                              correction=1.0 if figures.correction is None else figures.correction)

    def set_in_flight(self, in_flight: int, cap: int | None = None) -> None:
        """Tasks in flight now (received, not yet acknowledged), and the backpressure cap when known."""

    def set_queue_depth(self, model: str, depth: int) -> None:
        """Tasks of ``model`` waiting for a micro-batch now."""

    def set_consumer_lag(self, model: str, partition: int, lag: int) -> None:
        """Records behind (log end offset minus committed offset) on one owned partition of ``model``."""

    def forget_partition(self, model: str, partition: int) -> None:
        """The partition was revoked: stop exporting its lag (another worker reports it now)."""


NoopMetrics = BatchMetrics


class TaskTotals(BatchMetrics):
    """Results per model and status since start, for heartbeats (records nothing else).

    ``snapshot()`` -> ``{model: {"ok": n, "error": n, "expired": n, "rejected": n}}``, only the
    statuses seen. ``rejected`` counts tasks dead-lettered on receipt (the pipeline's
    ``count_tasks(model, "rejected")``).
    """

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}

    def count_tasks(self, model: str, status: str, n: int = 1) -> None:
        by_status = self._counts.setdefault(model, {})
        by_status[status] = by_status.get(status, 0) + n

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Copies of the counts (JSON-ready)."""
        return {model: dict(counts) for model, counts in self._counts.items()}


class MetricsGroup(BatchMetrics):
    """Forwards every call to each of ``members`` (e.g. Prometheus and :class:`TaskTotals`)."""

    def __init__(self, *members: BatchMetrics):
        self.members = members

    def observe_batch(self, model: str, size: int, inference_s: float, queue_waits_s: Sequence[float]) -> None:
        for m in self.members:
            m.observe_batch(model, size, inference_s, queue_waits_s)

    def count_tasks(self, model: str, status: str, n: int = 1) -> None:
        for m in self.members:
            m.count_tasks(model, status, n)

    def set_policy_state(self, model: str, **state: float) -> None:  # type: ignore[override]
        for m in self.members:
            m.set_policy_state(model, **state)

    def set_in_flight(self, in_flight: int, cap: int | None = None) -> None:
        for m in self.members:
            m.set_in_flight(in_flight, cap)

    def set_queue_depth(self, model: str, depth: int) -> None:
        for m in self.members:
            m.set_queue_depth(model, depth)

    def set_consumer_lag(self, model: str, partition: int, lag: int) -> None:
        for m in self.members:
            m.set_consumer_lag(model, partition, lag)

    def forget_partition(self, model: str, partition: int) -> None:
        for m in self.members:
            m.forget_partition(model, partition)


class PrometheusMetrics(BatchMetrics):
    """Records into its own ``prometheus_client.CollectorRegistry`` (``self.registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.batch_size = Histogram("autoglm_batch_size", "Tasks per micro-batch", ["model"],
                                    buckets=_SIZE_BUCKETS, registry=r)
        self.queue_wait = Histogram("autoglm_queue_wait_seconds", "Receipt to forward start", ["model"],
                                    buckets=_TIME_BUCKETS, registry=r)
        self.inference = Histogram("autoglm_inference_seconds", "Batched forward duration", ["model"],
                                   buckets=_TIME_BUCKETS, registry=r)
        self.tasks = Counter("autoglm_tasks", "Results by status", ["model", "status"], registry=r)
        self.fixed = Gauge("autoglm_service_fixed_seconds", "EWMA fixed cost per batch", ["model"], registry=r)
        self.per_task = Gauge("autoglm_service_per_task_seconds", "EWMA cost per task", ["model"], registry=r)
        self.spread = Gauge("autoglm_service_spread_seconds", "EWMA residual spread", ["model"], registry=r)
        self.target = Gauge("autoglm_batch_target_size", "Adaptive target batch size", ["model"], registry=r)
        self.correction = Gauge("autoglm_latency_correction", "Feedback correction on the target", ["model"],
                                registry=r)
        self.in_flight = Gauge("autoglm_in_flight_tasks", "Tasks received and not yet acknowledged", registry=r)
        self.in_flight_cap = Gauge("autoglm_in_flight_cap_tasks", "In-flight cap (backpressure above it)",
                                   registry=r)
        self.queue_depth = Gauge("autoglm_queue_depth_tasks", "Tasks waiting for a micro-batch", ["model"],
                                 registry=r)
        self.lag = Gauge("autoglm_consumer_lag_records", "Log end offset minus committed offset",
                         ["model", "partition"], registry=r)

    def observe_batch(self, model: str, size: int, inference_s: float, queue_waits_s: Sequence[float]) -> None:
        self.batch_size.labels(model).observe(size)
        self.inference.labels(model).observe(inference_s)
        wait = self.queue_wait.labels(model)
        for w in queue_waits_s:
            wait.observe(w)

    def count_tasks(self, model: str, status: str, n: int = 1) -> None:
        self.tasks.labels(model, status).inc(n)

    def set_policy_state(self, model: str, *, a_s: float, b_s: float, sigma_s: float, target_size: int,
                         correction: float) -> None:
        self.fixed.labels(model).set(a_s)
        self.per_task.labels(model).set(b_s)
        self.spread.labels(model).set(sigma_s)
        self.target.labels(model).set(target_size)
        self.correction.labels(model).set(correction)

    def set_in_flight(self, in_flight: int, cap: int | None = None) -> None:
        self.in_flight.set(in_flight)
        if cap is not None:
            self.in_flight_cap.set(cap)

    def set_queue_depth(self, model: str, depth: int) -> None:
        self.queue_depth.labels(model).set(depth)

    def set_consumer_lag(self, model: str, partition: int, lag: int) -> None:
        self.lag.labels(model, str(partition)).set(lag)

    def forget_partition(self, model: str, partition: int) -> None:
        try:
            self.lag.remove(model, str(partition))
        except KeyError:
            pass


class WindowStats:
    """Per-model figures over one heartbeat window (reset by :meth:`take`), plus totals since start.

    Keeps at most ``max_samples`` latencies per window (the most recent ones),
    so memory is bounded however fast results flow; percentiles are then over
    those samples (nearest-rank, as ``numpy.percentile(method="inverted_cdf")``).

    Args:
        max_samples: latencies kept per window.
    """

    def __init__(self, max_samples: int = 10_000):
        from collections import deque

        self._latencies_s: "deque[float]" = deque(maxlen=max_samples)
        self.results = 0
        self.batches = 0
        self.batched_tasks = 0
        self.results_total = 0
        self.batches_total = 0

    def observe_batch(self, size: int, end_to_end_s: Sequence[float]) -> None:
        """One served batch of ``size`` tasks and their end-to-end latencies in seconds."""
        self.batches += 1
        self.batched_tasks += size
        self.results += len(end_to_end_s)
        self.results_total += len(end_to_end_s)
        self.batches_total += 1
        self._latencies_s.extend(end_to_end_s)

    def take(self, window_s: float, *, reset: bool = True) -> dict[str, float | int | None]:
        """The window's figures, then (with ``reset``) start a new window.

        Args:
            window_s: the window's length in seconds (for the throughput).
            reset: start a new window (heartbeats do; an on-demand status report does not).

        Returns:
            Over the window: ``results``, ``throughput_per_s``, ``p50_ms``, ``p99_ms``
            (None when no result), ``mean_batch_size`` (None when no batch). Since
            start (never reset): ``served_total`` (results of served batches, any
            status) and ``batches_total``.
        """
        lat = sorted(self._latencies_s)

        def rank(q: float) -> float | None:
            if not lat:
                return None
            return lat[max(0, min(len(lat) - 1, int(-(-q * len(lat) // 1)) - 1))] * 1000.0

        out = {
            "results": self.results,
            "throughput_per_s": self.results / window_s if window_s > 0 else None,
            "p50_ms": rank(0.50),
            "p99_ms": rank(0.99),
            "mean_batch_size": self.batched_tasks / self.batches if self.batches else None,
            "served_total": self.results_total,
            "batches_total": self.batches_total,
        }
        if reset:
            self._latencies_s.clear()
            self.results = self.batches = self.batched_tasks = 0
        return out
