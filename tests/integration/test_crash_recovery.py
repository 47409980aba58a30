"""A worker killed with SIGKILL mid-stream and started again loses no task."""

from __future__ import annotations

import signal

import pytest

from autoglm.streams.events import Task, encode_task
from autoglm.tasks import holdout_digits

from .conftest import wait_for
from .kafka_io import create_topics, produce, read_until, results_for

pytestmark = pytest.mark.integration

N_TASKS = 3000


async def test_sigkill_mid_stream_loses_no_task(kafka_bootstrap, prefix, workers, model_cache):
    await create_topics(kafka_bootstrap, prefix)
    x, _ = holdout_digits(N_TASKS)
    tasks = [Task(id=f"k{i}", model="digits", inputs=x[i : i + 1]) for i in range(N_TASKS)]
    await produce(kafka_bootstrap, [(f"{prefix}.tasks.digits", t.id.encode(), encode_task(t)) for t in tasks])

    # a slow-ish first worker (batches of 4) so that the kill lands mid-stream
    first = workers.start(kafka_bootstrap, prefix, "digits", max_batch_size="4", max_wait_s="0")
    some = await read_until(kafka_bootstrap, f"{prefix}.results", lambda r: len(r) >= 300, 120,
                            lambda: first.poll() is None)
    assert len(some) >= 300
    first.send_signal(signal.SIGKILL)
    wait_for(lambda: first.poll() is not None, 10, "the killed worker to exit")
    served_before_kill = len(some)

    second = workers.start(kafka_bootstrap, prefix, "digits")
    results, duplicates = await results_for(kafka_bootstrap, prefix, {t.id for t in tasks}, 240,
                                            lambda: second.poll() is None)
    missing = {t.id for t in tasks} - set(results)
    print(f"\nSIGKILL after >= {served_before_kill} results: {len(results)}/{N_TASKS} tasks answered, "
          f"{duplicates} duplicate results (at-least-once redelivery)")
    assert not missing
    assert all(r.status == "ok" for r in results.values())
    assert served_before_kill < N_TASKS, "the kill did not land mid-stream"
