"""The Prometheus metrics record what the pipeline reports, in their own registry."""

from __future__ import annotations

import pytest

from autoglm.processors.metrics import PrometheusMetrics


def sample(metrics: PrometheusMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_batch_histograms_counters_and_policy_gauges() -> None:
    m = PrometheusMetrics()
    m.observe_batch("digits", 3, 0.004, [0.001, 0.002, 0.030])
    m.observe_batch("digits", 40, 0.020, [0.005] * 40)
    m.count_tasks("digits", "ok", 43)
    m.count_tasks("digits", "expired")
    m.set_policy_state("digits", a_s=0.002, b_s=0.0005, sigma_s=0.0001, target_size=48, correction=0.8)

    assert sample(m, "autoglm_batch_size_count", model="digits") == 2
    assert sample(m, "autoglm_batch_size_sum", model="digits") == 43
    assert sample(m, "autoglm_batch_size_bucket", model="digits", le="4.0") == 1   # the batch of 3
    assert sample(m, "autoglm_batch_size_bucket", model="digits", le="32.0") == 1  # 40 is above 32
    assert sample(m, "autoglm_queue_wait_seconds_count", model="digits") == 43
    assert sample(m, "autoglm_inference_seconds_sum", model="digits") == pytest.approx(0.024)
    assert sample(m, "autoglm_tasks_total", model="digits", status="ok") == 43
    assert sample(m, "autoglm_tasks_total", model="digits", status="expired") == 1
    assert sample(m, "autoglm_batch_target_size", model="digits") == 48
    assert sample(m, "autoglm_service_per_task_seconds", model="digits") == pytest.approx(0.0005)
    assert sample(m, "autoglm_latency_correction", model="digits") == pytest.approx(0.8)


def test_registries_are_per_instance() -> None:
    a, b = PrometheusMetrics(), PrometheusMetrics()
    a.count_tasks("digits", "ok", 5)
    assert sample(a, "autoglm_tasks_total", model="digits", status="ok") == 5
    assert sample(b, "autoglm_tasks_total", model="digits", status="ok") is None
