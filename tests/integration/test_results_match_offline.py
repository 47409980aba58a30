"""Results through Kafka equal the offline model's outputs, whatever batch a task fell into."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm.models import ModelRunner, default_registry
from autoglm.streams.events import Task, encode_task, now_ms
from autoglm.tasks import holdout_digits

from .kafka_io import create_topics, produce, results_for

pytestmark = pytest.mark.integration


def _digit_tasks(n: int) -> list[Task]:
    """Tasks of 1, 2 or 3 rows, in the three accepted layouts, so batches mix row counts."""
    x, _ = holdout_digits(2 * n)
    tasks, row = [], 0
    for i in range(n):
        rows = 1 + i % 3
        img = x[row : row + rows]
        row += rows
        layout = (img, img.reshape(rows, 64), img.reshape(rows, 8, 8))[i % 3]
        tasks.append(Task(id=f"d{i}", model="digits", inputs=layout, created_ms=now_ms()))
    return tasks


def _offline(name: str, tasks: list[Task]) -> dict[str, np.ndarray]:
    runner = ModelRunner(default_registry().create(name), device="cpu")
    runner.start_sync()
    try:
        return {t.id: runner.run_sync([runner.model.prepare(t.inputs)])[0] for t in tasks}
    finally:
        runner.close()


async def _serve(bootstrap, prefix, workers, tasks, models, embedded=False, **settings):
    await create_topics(bootstrap, prefix, models.split(","))
    proc = workers.start(bootstrap, prefix, models, embedded=embedded, **settings)
    await produce(bootstrap, [(f"{prefix}.tasks.{t.model}", t.id.encode(), encode_task(t)) for t in tasks])
    results, dupes = await results_for(bootstrap, prefix, {t.id for t in tasks}, 180, lambda: proc.poll() is None)
    assert dupes == 0
    return results


async def test_digits_and_minilm_on_apache_kafka(kafka_bootstrap, prefix, workers, model_cache):
    digit_tasks = _digit_tasks(60)
    texts = ["A cat sits on the mat.", "Kafka stores streams of records.", "", "naïve café ☕",
             "The quick brown fox jumps over the lazy dog " * 20]
    text_tasks = [Task(id=f"t{i}", model="minilm", inputs=[texts[i % len(texts)]] * (1 + i % 2))
                  for i in range(20)]
    results = await _serve(kafka_bootstrap, prefix, workers, digit_tasks + text_tasks, "digits,minilm",
                           max_wait_s="0.05", max_batch_size="16")

    expected_digits = _offline("digits", digit_tasks)
    batch_sizes = set()
    for t in digit_tasks:
        r = results[t.id]
        assert r.status == "ok", r.error
        assert r.outputs.shape == expected_digits[t.id].shape == (len(t.inputs), 10)
        assert np.abs(r.outputs - expected_digits[t.id]).max() <= 1e-5
        batch_sizes.add(r.batch_size)
    assert max(batch_sizes) > 1, "the worker never formed a micro-batch"

    expected_text = _offline("minilm", text_tasks)
    for t in text_tasks:
        r = results[t.id]
        assert r.status == "ok", r.error
        assert r.outputs.shape == (len(t.inputs), 384)
        ref = expected_text[t.id]
        cosine = (r.outputs * ref).sum(axis=1) / (np.linalg.norm(r.outputs, axis=1) * np.linalg.norm(ref, axis=1))
        assert cosine.min() >= 0.9999


async def test_digits_on_embedded_broker(embedded_bootstrap, prefix, workers, model_cache):
    tasks = _digit_tasks(30)
    results = await _serve(embedded_bootstrap, prefix, workers, tasks, "digits", embedded=True)
    expected = _offline("digits", tasks)
    for t in tasks:
        assert results[t.id].status == "ok"
        assert np.abs(results[t.id].outputs - expected[t.id]).max() <= 1e-5
