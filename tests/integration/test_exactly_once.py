"""Exactly-once delivery: results and offsets in one Kafka transaction, read with read_committed."""

from __future__ import annotations

import signal

import pytest

from autoglm.streams.events import Task, decode_result, encode_task
from autoglm.tasks import holdout_digits

from .conftest import wait_for
from .kafka_io import create_topics, produce, read_until

pytestmark = pytest.mark.integration

N_TASKS = 4000
EOS = {"delivery": "exactly_once", "transaction_timeout_s": "10"}


async def committed_results(bootstrap: str, prefix: str, ids: set[str], timeout_s: float, alive) -> dict[str, int]:
    """Result count per task id, as a read_committed reader sees them."""
    counts: dict[str, int] = {}

    def done(records) -> bool:
        while len(done.seen) < len(records):
            rec = records[len(done.seen)]
            done.seen.append(rec)
            counts[decode_result(rec.value).id] = counts.get(decode_result(rec.value).id, 0) + 1
        return ids <= set(counts)

    done.seen = []  # type: ignore[attr-defined]
    await read_until(bootstrap, f"{prefix}.results", done, timeout_s, alive, isolation_level="read_committed")
    return counts


async def test_sigkill_in_exactly_once_mode_leaves_exactly_one_committed_result_per_task(
        kafka_bootstrap, prefix, workers):
    await create_topics(kafka_bootstrap, prefix, partitions=4)
    x, _ = holdout_digits(N_TASKS)
    tasks = [Task(id=f"x{i}", model="digits", inputs=x[i : i + 1]) for i in range(N_TASKS)]
    await produce(kafka_bootstrap, [(f"{prefix}.tasks.digits", t.id.encode(), encode_task(t)) for t in tasks])

    slow = {"max_batch_size": "4", "max_wait_s": "0"}
    w0 = workers.start(kafka_bootstrap, prefix, worker_id="w0", **EOS, **slow)
    w1 = workers.start(kafka_bootstrap, prefix, worker_id="w1", **EOS, **slow)
    kills = 0
    for round_, victim_id in enumerate(("w0", "w1", "w0"), start=1):
        # once more results are out, kill a worker mid-stream and restart it under the same id
        await read_until(kafka_bootstrap, f"{prefix}.results", lambda r: len(r) >= 600 * round_, 120,
                         lambda: w0.poll() is None and w1.poll() is None)
        victim = w0 if victim_id == "w0" else w1
        victim.send_signal(signal.SIGKILL)
        wait_for(lambda: victim.poll() is not None, 10, f"{victim_id} to die")
        kills += 1
        restarted = workers.start(kafka_bootstrap, prefix, worker_id=victim_id, **EOS, **slow)
        if victim_id == "w0":
            w0 = restarted
        else:
            w1 = restarted

    counts = await committed_results(kafka_bootstrap, prefix, {t.id for t in tasks}, 300,
                                     lambda: w0.poll() is None and w1.poll() is None)
    uncommitted = await read_until(kafka_bootstrap, f"{prefix}.results", lambda r: False, 2.0,
                                   isolation_level="read_uncommitted")
    duplicates = {tid: n for tid, n in counts.items() if n > 1}
    print(f"\nexactly-once: {kills} SIGKILLs, {len(counts)}/{N_TASKS} tasks with a committed result, "
          f"{sum(n - 1 for n in duplicates.values())} committed duplicates; "
          f"{len(uncommitted) - sum(counts.values())} result records of aborted transactions (invisible)")
    assert set(counts) == {t.id for t in tasks}
    assert duplicates == {}


async def test_exactly_once_is_refused_on_the_embedded_broker(embedded_bootstrap, prefix, workers):
    proc = workers.start(embedded_bootstrap, prefix, embedded=True, delivery="exactly_once")
    wait_for(lambda: proc.poll() is not None, 60, "the worker to refuse and exit")
    log = workers.log(proc)
    assert proc.returncode == 2, log
    assert "exactly_once delivery needs a broker with transactions" in log
