"""Deadlines through Kafka: a task whose deadline has passed gets an `expired` result and never
reaches the model; its neighbours are served."""

from __future__ import annotations

import pytest

from autoglm.streams.events import Task, encode_task, now_ms
from autoglm.tasks import holdout_digits

from .kafka_io import create_topics, produce, results_for

pytestmark = pytest.mark.integration


async def test_expired_and_live_tasks(kafka_bootstrap, prefix, workers, model_cache):
    await create_topics(kafka_bootstrap, prefix, partitions=1)
    x, _ = holdout_digits(10)
    stamp = now_ms()
    tasks = []
    for i in range(10):
        deadline = stamp - 1000 if i % 2 else stamp + 600_000   # odd ones are already late
        tasks.append(Task(id=f"dl-{i}", model="digits", inputs=x[i : i + 1], deadline_ms=deadline,
                          created_ms=stamp, priority=i % 3, attributes={"i": str(i)}))
    proc = workers.start(kafka_bootstrap, prefix, "digits")
    await produce(kafka_bootstrap, [(f"{prefix}.tasks.digits", t.id.encode(), encode_task(t)) for t in tasks])
    results, dupes = await results_for(kafka_bootstrap, prefix, {t.id for t in tasks}, 120,
                                       lambda: proc.poll() is None)
    assert dupes == 0
    for i, t in enumerate(tasks):
        r = results[t.id]
        assert r.attributes == {"i": str(i)}
        if i % 2:
            assert r.status == "expired" and r.error.code == "deadline" and r.outputs is None
            assert r.batch_size == 0  # never reached the model
        else:
            assert r.status == "ok" and r.outputs.shape == (1, 10)


async def test_reply_to_existing_and_missing_topics(kafka_bootstrap, prefix, workers, model_cache):
    """reply_to an existing topic delivers there; reply_to a missing topic is rejected (dead letter +
    rejected result on <prefix>.results) instead of stalling the worker."""
    from autoglm.streams.topics import TopicNames, ensure_topics

    from .kafka_io import read_until

    await create_topics(kafka_bootstrap, prefix, partitions=1)
    replies = f"{prefix}.replies"
    await ensure_topics(kafka_bootstrap, TopicNames(replies), [], partitions=1)  # creates <replies>.results
    x, _ = holdout_digits(3)
    tasks = [
        Task(id="to-replies", model="digits", inputs=x[:1], reply_to=f"{replies}.results"),
        Task(id="to-nowhere", model="digits", inputs=x[1:2], reply_to=f"{prefix}.no-such-topic"),
        Task(id="plain", model="digits", inputs=x[2:3]),
    ]
    proc = workers.start(kafka_bootstrap, prefix, "digits")
    await produce(kafka_bootstrap, [(f"{prefix}.tasks.digits", t.id.encode(), encode_task(t)) for t in tasks])
    alive = lambda: proc.poll() is None  # noqa: E731
    results, _ = await results_for(kafka_bootstrap, prefix, {"to-nowhere", "plain"}, 120, alive)
    assert results["plain"].status == "ok"
    assert results["to-nowhere"].status == "rejected" and "reply_to" in results["to-nowhere"].error.message
    delivered, _ = await results_for(kafka_bootstrap, replies, {"to-replies"}, 60, alive)
    assert delivered["to-replies"].status == "ok"
    dlq = await read_until(kafka_bootstrap, f"{prefix}.dlq", lambda r: len(r) >= 1, 30, alive)
    assert [dict(r.headers)["autoglm.error.code"] for r in dlq] == [b"invalid_field"]
    assert alive()
