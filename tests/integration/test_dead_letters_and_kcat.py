"""Bad input goes to the dead-letter topic with a reason; its batch-mates are served; the worker
stays up. A task published with the real kcat binary gets a correct result."""

from __future__ import annotations

import base64
import shutil
import subprocess

import numpy as np
import orjson
import pytest

from autoglm.models import ModelRunner, default_registry
from autoglm.streams.events import Task, encode_task
from autoglm.tasks import holdout_digits

from .kafka_io import create_topics, produce, read_until, results_for

pytestmark = pytest.mark.integration


def _valid(i: int, x: np.ndarray) -> bytes:
    return encode_task(Task(id=f"ok-{i}", model="digits", inputs=x[i : i + 1]))


def _nan_tensor() -> dict:
    data = np.full((1, 64), np.nan, dtype="<f4").tobytes()
    return {"dtype": "float32", "shape": [1, 64], "data": base64.b64encode(data).decode()}


MALFORMED = {
    # task id (None when unreadable) -> (raw value, expected error code)
    None: (b"this is not JSON {", "decode"),
    "bad-schema": (orjson.dumps({"schema": "autoglm.task/v2", "id": "bad-schema", "model": "digits",
                                 "inputs": [[0.0] * 64]}), "schema"),
    "bad-model": (orjson.dumps({"schema": "autoglm.task/v1", "id": "bad-model", "model": "nope",
                                "inputs": [[0.0] * 64]}), "unknown_model"),
    "bad-shape": (orjson.dumps({"schema": "autoglm.task/v1", "id": "bad-shape", "model": "digits",
                                "inputs": [[0.0] * 63]}), "input_signature"),
    "bad-nan": (orjson.dumps({"schema": "autoglm.task/v1", "id": "bad-nan", "model": "digits",
                              "inputs": _nan_tensor()}), "invalid_tensor"),
}


async def test_malformed_tasks_are_dead_lettered_and_batch_mates_served(kafka_bootstrap, prefix, workers,
                                                                         model_cache):
    await create_topics(kafka_bootstrap, prefix, partitions=1)  # one partition: bad and good interleave
    x, _ = holdout_digits(20)
    topic = f"{prefix}.tasks.digits"
    records, valid_ids = [], set()
    bad = list(MALFORMED.items())
    for i in range(20):
        records.append((topic, f"ok-{i}".encode(), _valid(i, x)))
        valid_ids.add(f"ok-{i}")
        if i % 4 == 1 and bad:
            tid, (raw, _code) = bad.pop()
            records.append((topic, (tid or "none").encode(), raw))
    assert not bad
    proc = workers.start(kafka_bootstrap, prefix, "digits", max_wait_s="0.2", max_batch_size="64")
    await produce(kafka_bootstrap, records)

    alive = lambda: proc.poll() is None  # noqa: E731
    dlq = await read_until(kafka_bootstrap, f"{prefix}.dlq", lambda r: len(r) >= len(MALFORMED), 120, alive)
    assert len(dlq) == len(MALFORMED)
    by_value = {rec.value: dict(rec.headers) for rec in dlq}
    for tid, (raw, code) in MALFORMED.items():
        headers = by_value[raw]  # the original bytes, unchanged
        assert headers["autoglm.error.code"].decode() == code
        assert headers["autoglm.error.message"]
        assert headers["autoglm.source.topic"].decode() == topic
        assert int(headers["autoglm.source.partition"]) == 0
        assert 0 <= int(headers["autoglm.source.offset"]) < len(records)

    rejected_ids = {tid for tid in MALFORMED if tid}
    results, _ = await results_for(kafka_bootstrap, prefix, valid_ids | rejected_ids, 120, alive)
    for tid in valid_ids:
        assert results[tid].status == "ok" and results[tid].outputs.shape == (1, 10)
    for tid in rejected_ids:
        assert results[tid].status == "rejected"
        assert results[tid].error.code == MALFORMED[tid][1]
    assert max(results[t].batch_size for t in valid_ids) > 1  # bad tasks did not break their batches

    # the worker is still up and still serving
    await produce(kafka_bootstrap, [(topic, b"after", encode_task(Task(id="after", model="digits",
                                                                          inputs=x[:1])))])
    after, _ = await results_for(kafka_bootstrap, prefix, {"after"}, 60, alive)
    assert after["after"].status == "ok"
    assert proc.poll() is None


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed (apt-get install kcat)")
async def test_task_published_with_kcat_gets_a_correct_result(kafka_bootstrap, prefix, workers, model_cache):
    await create_topics(kafka_bootstrap, prefix)
    x, y = holdout_digits(1)
    line = orjson.dumps({"schema": "autoglm.task/v1", "id": "kcat-1", "model": "digits",
                         "inputs": x[0].reshape(1, 64).tolist()})
    assert b"\n" not in line
    proc = workers.start(kafka_bootstrap, prefix, "digits")
    subprocess.run(["kcat", "-P", "-b", kafka_bootstrap, "-t", f"{prefix}.tasks.digits", "-k", "kcat-1"],
                   input=line + b"\n", check=True, timeout=30)
    results, _ = await results_for(kafka_bootstrap, prefix, {"kcat-1"}, 120, lambda: proc.poll() is None)
    result = results["kcat-1"]
    assert result.status == "ok"
    runner = ModelRunner(default_registry().create("digits"), device="cpu")
    runner.start_sync()
    try:
        expected = runner.run_sync([runner.model.prepare(np.asarray(x[0].reshape(1, 64).tolist(), np.float32))])[0]
    finally:
        runner.close()
    assert np.abs(result.outputs - expected).max() <= 1e-5
    assert int(result.outputs.argmax()) == int(y[0])
