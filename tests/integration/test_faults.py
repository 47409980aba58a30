"""Faults against a real Apache Kafka and real worker processes (issue 5, "Faults").

- SIGTERM mid-stream: the worker exits 0 within a grace period, having flushed its partial batch,
  produced the results, committed exactly the served tasks and left the group; a later worker
  serves the rest with zero duplicates.
- Broker restart: the worker stays up, reconnects and serves every task.
- Rebalance mid-batch: a second worker joins while the first is serving a backlog: no task is
  lost and no task is committed before its result was acknowledged.
- Graceful churn: a third worker joins and stops with SIGTERM three times; no task is served
  twice and every stop exits 0.
- Two rebalance regressions found by these tests (fixed in streams/app.py and pipeline.py): with
  faust-streaming 0.15.3 the acks since the last periodic commit were dropped at a rebalance (the
  tasks were served again), and a revocation that drained a long in-flight queue outlasted the
  rebalance timeout, so that two workers served one partition at once.

Each test checks commit-after-produce from outside: it takes the group's committed offsets and
then reads the results topic up to its end; every task below a committed offset must have a
result there (:func:`~tests.integration.kafka_io.audit_commits`).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest

from autoglm.streams.events import Task
from autoglm.tasks import holdout_digits

from .kafka_io import (ResultFollower, audit_commits, committed_ids, committed_offsets, create_topics,
                       group_members, produce_tasks)

pytestmark = pytest.mark.integration

#: seconds a worker may take to stop after SIGTERM (flush, produce, commit, leave the group)
GRACE_S = 30.0
#: slow batches (4 tasks, no wait) so that a signal or a fault lands mid-stream
SLOW = {"batching_mode": "fixed", "max_batch_size": "4", "max_wait_s": "0"}


def digit_tasks(n: int, tag: str) -> list[Task]:
    x, _ = holdout_digits(n)
    return [Task(id=f"{tag}{i}", model="digits", inputs=x[i : i + 1]) for i in range(n)]


def alive(*procs: subprocess.Popen):
    return lambda: all(p.poll() is None for p in procs)


async def test_sigterm_mid_stream_is_graceful(kafka_bootstrap, prefix, workers, model_cache):
    """SIGTERM: exit code 0 within GRACE_S; the committed tasks are exactly the tasks with a result
    (each served task committed, none committed unserved); the group has no member left; a second
    worker serves the rest and no task is ever answered twice."""
    n = 3000
    await create_topics(kafka_bootstrap, prefix)
    tasks = digit_tasks(n, "g")
    positions = await produce_tasks(kafka_bootstrap, f"{prefix}.tasks.digits", tasks)
    group, task_topic = f"{prefix}-workers", f"{prefix}.tasks.digits"

    first = workers.start(kafka_bootstrap, prefix, "digits", **SLOW)
    async with ResultFollower(kafka_bootstrap, prefix) as results:
        await results.until(lambda: len(results.first) >= 300, 180, alive(first), "300 results")
        t0 = time.monotonic()
        first.send_signal(signal.SIGTERM)
        try:
            rc = await asyncio.to_thread(first.wait, GRACE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not stop within {GRACE_S} s of SIGTERM:\n{workers.log(first)}")
        stop_s = time.monotonic() - t0
        assert rc == 0, f"exit code {rc} after SIGTERM:\n{workers.log(first)}"

        committed = await committed_offsets(kafka_bootstrap, group, task_topic)
        await results.catch_up()
        served = set(results.first)
        done = committed_ids(positions, committed)
        state, members = await group_members(kafka_bootstrap, group)
        print(f"\nSIGTERM: exit 0 after {stop_s:.2f} s; {len(served)} tasks served, {sum(committed.values())} "
              f"committed ({committed}); group {state} with {members} members")
        assert results.duplicates == 0
        assert sum(committed.values()) == len(served)
        assert done == served, (f"served, not committed: {len(served - done)}; "
                                f"committed, not served: {len(done - served)}")
        assert 300 <= len(served) < n, "SIGTERM did not land mid-stream"
        assert members == 0, f"the stopped worker is still a member of {group} ({state})"

        second = workers.start(kafka_bootstrap, prefix, "digits")
        await results.until(lambda: len(results.first) == n, 240, alive(second), f"all {n} results")
        await asyncio.sleep(1.0)  # a duplicate would follow its first result closely
        await results.catch_up()
    print(f"second worker: {n - len(served)} more tasks, {results.duplicates} duplicates")
    assert results.duplicates == 0
    assert set(results.first) == {t.id for t in tasks}
    assert all(r.status == "ok" for r in results.first.values())
    assert {r.worker for r in results.first.values()} == {"w0", "w1"}


async def test_broker_restart_worker_reconnects(restartable_kafka, prefix, workers, model_cache):
    """The broker stops mid-stream (clean shutdown), stays down ~5 s and starts again from its data:
    the worker is still running after the outage and every task gets an ok result (duplicates
    allowed by at-least-once: counted and printed); no task is committed without a result."""
    kafka = restartable_kafka
    n = 3000
    await create_topics(kafka.bootstrap, prefix)
    tasks = digit_tasks(n, "b")
    positions = await produce_tasks(kafka.bootstrap, f"{prefix}.tasks.digits", tasks)
    worker = workers.start(kafka.bootstrap, prefix, "digits", **SLOW)
    async with ResultFollower(kafka.bootstrap, prefix) as results:
        await results.until(lambda: len(results.first) >= 300, 180, alive(worker), "300 results")
        before = len(results.first)
    t0 = time.monotonic()
    await asyncio.to_thread(kafka.stop)
    await asyncio.sleep(5.0)
    assert worker.poll() is None, f"the worker died while the broker was down:\n{workers.log(worker)}"
    up_s = await asyncio.to_thread(kafka.restart)
    print(f"\nbroker stopped after {before} results, down {time.monotonic() - t0 - up_s:.1f} s, "
          f"answered {up_s:.1f} s after the restart")

    async with ResultFollower(kafka.bootstrap, prefix) as results:
        try:
            await results.until(lambda: len(results.first) == n, 240, alive(worker), f"all {n} results")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; worker exit code {worker.poll()}:\n{workers.log(worker)}") from None
        committed, unserved = await audit_commits(kafka.bootstrap, f"{prefix}-workers",
                                                  f"{prefix}.tasks.digits", positions, results)
    print(f"after the restart: {len(results.first)}/{n} tasks answered, {results.duplicates} duplicates, "
          f"{sum(committed.values())} committed")
    assert worker.poll() is None
    assert set(results.first) == {t.id for t in tasks}
    assert all(r.status == "ok" for r in results.first.values())
    assert not unserved, f"{len(unserved)} tasks committed without a result"


async def wait_stable(bootstrap: str, group: str, members: int, timeout_s: float) -> None:
    """Wait until ``group`` is Stable with ``members`` members."""
    deadline = time.monotonic() + timeout_s
    while (await group_members(bootstrap, group)) != ("Stable", members):
        assert time.monotonic() < deadline, f"{group} not Stable with {members} members after {timeout_s} s"
        await asyncio.sleep(0.25)


async def wait_about_to_join(workers, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Wait until a starting worker has loaded its model and starts its consumer (its next step is
    the group join, about a second later): the worker's log line ``worker <id> serving <models>``."""
    deadline = time.monotonic() + timeout_s
    while " serving digits from " not in Path(proc.log_path).read_text(errors="replace"):
        assert proc.poll() is None, f"the worker exited:\n{workers.log(proc)}"
        assert time.monotonic() < deadline, f"the worker did not start within {timeout_s} s:\n{workers.log(proc)}"
        await asyncio.sleep(0.1)


def switches_per_partition(results: ResultFollower, positions: dict[str, tuple[int, int]]) -> dict[int, int]:
    """Task partition -> how often the worker answering its tasks changed, in result timestamp order."""
    by_partition: dict[int, list[tuple[int, str]]] = {}
    for ts, tid, worker in results.timeline:
        by_partition.setdefault(positions[tid][0], []).append((ts, worker))
    out = {}
    for p, seq in by_partition.items():
        seq.sort()
        out[p] = sum(1 for (_, a), (_, b) in zip(seq, seq[1:]) if a != b)
    return out


async def test_rebalance_mid_batch_loses_nothing(kafka_bootstrap, prefix, workers, model_cache):
    """A second worker joins while the first serves a backlog in small batches (a batch in the
    model and a full in-flight queue at the rebalance): every task gets an ok result, both workers
    serve, at the end every task is committed, and at every sampled moment (a) no task was
    committed before its result was on the results topic and (b) no committed offset had gone
    backwards (a stale commit from the previous owner of a partition). Duplicates are counted.

    The backlog is published as the second worker is about to join, so that every partition still
    has a backlog when it is handed over (a lone worker drains the partitions one after another)."""
    n = 10_000
    await create_topics(kafka_bootstrap, prefix)
    tasks = digit_tasks(n, "r")
    group, task_topic = f"{prefix}-workers", f"{prefix}.tasks.digits"
    first = workers.start(kafka_bootstrap, prefix, "digits", **SLOW)
    await wait_stable(kafka_bootstrap, group, 1, 120)
    second = workers.start(kafka_bootstrap, prefix, "digits", **SLOW)
    await wait_about_to_join(workers, second)
    positions = await produce_tasks(kafka_bootstrap, task_topic, tasks)
    unserved_counts: list[int] = []
    backwards: list[tuple[int, int, int]] = []  # (partition, earlier commit, later commit)
    highest: dict[int, int] = {}

    async def audit() -> dict[int, int]:
        committed, unserved = await audit_commits(kafka_bootstrap, group, task_topic, positions, results)
        unserved_counts.append(len(unserved))
        for p, off in committed.items():
            if off < highest.get(p, 0):
                backwards.append((p, highest[p], off))
            highest[p] = max(off, highest.get(p, 0))
        return committed

    async with ResultFollower(kafka_bootstrap, prefix) as results:
        deadline = time.monotonic() + 240
        two_members_at = None  # results when the group was first seen with both workers
        while len(results.first) < n:
            assert time.monotonic() < deadline, f"only {len(results.first)}/{n} results after 240 s"
            assert first.poll() is None and second.poll() is None, "a worker died"
            await audit()
            if two_members_at is None and (await group_members(kafka_bootstrap, group))[1] == 2:
                two_members_at = len(results.first)
            for _ in range(5):
                await results.poll()
        # every served task is committed within a few commit intervals
        deadline = time.monotonic() + 30
        while (n_committed := sum((await audit()).values())) < n:
            assert time.monotonic() < deadline, f"only {n_committed}/{n} tasks committed"
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)  # late duplicates from the previous owner
        await results.catch_up()
    first_by = {w: sum(1 for r in results.first.values() if r.worker == w) for w in ("w0", "w1")}
    print(f"\nrebalance: both workers in the group after {two_members_at} results; first results by worker "
          f"{first_by}, all results by worker {dict(results.by_worker)}; {results.duplicates} duplicates "
          f"(first answer's worker, duplicate's worker): {dict(results.duplicate_pairs)}; "
          f"worker switches per partition {switches_per_partition(results, positions)}; "
          f"{len(unserved_counts)} commit audits")
    assert set(results.first) == {t.id for t in tasks}
    assert all(r.status == "ok" for r in results.first.values())
    assert two_members_at is not None and two_members_at < n, "the second worker joined after the backlog"
    assert first_by["w1"] > 0, f"the joining worker served nothing:\n{workers.log(second)}"
    assert not any(unserved_counts), f"tasks committed before their result, per audit: {unserved_counts}"
    assert not backwards, f"committed offsets went backwards: {backwards}"
    assert n_committed == n


async def test_rebalance_commits_what_was_served(kafka_bootstrap, prefix, workers, model_cache):
    """A graceful rebalance commits the tasks served before it: a worker serves 300 tasks, with no
    periodic commit in the test window (COMMIT_INTERVAL_S=60); a second worker joins. Afterwards the
    300 tasks are committed and none is served a second time (duplicates only after a crash).

    Regression: faust-streaming 0.15.3's ``Consumer.on_partitions_revoked`` drops the acked, not yet
    committed offsets of revoked partitions before any revoke handler commits; all 300 tasks were
    served again and none was committed."""
    n = 300
    settings = {"commit_interval_s": "60"}
    group, task_topic = f"{prefix}-workers", f"{prefix}.tasks.digits"
    await create_topics(kafka_bootstrap, prefix)
    tasks = digit_tasks(n, "c")
    first = workers.start(kafka_bootstrap, prefix, "digits", **settings)
    await produce_tasks(kafka_bootstrap, task_topic, tasks)
    async with ResultFollower(kafka_bootstrap, prefix) as results:
        await results.until(lambda: len(results.first) == n, 180, alive(first), f"{n} results")
        before = sum((await committed_offsets(kafka_bootstrap, group, task_topic)).values())
        second = workers.start(kafka_bootstrap, prefix, "digits", **settings)
        await wait_stable(kafka_bootstrap, group, 2, 120)
        deadline = time.monotonic() + 5.0  # time for tasks served again to show up
        while time.monotonic() < deadline:
            await results.poll()
        committed = await committed_offsets(kafka_bootstrap, group, task_topic)
    print(f"\nserved {n} tasks, {before} committed before the rebalance, {sum(committed.values())} after "
          f"({committed}); {results.duplicates} tasks served again {dict(results.duplicate_pairs)}")
    assert first.poll() is None and second.poll() is None
    assert before == 0, "a periodic commit ran before the rebalance: the test does not test the revoke commit"
    assert results.duplicates == 0
    assert sum(committed.values()) == n


async def test_rebalance_hands_each_partition_over_once(kafka_bootstrap, prefix, workers, model_cache):
    """With a long in-flight queue (MAX_IN_FLIGHT=8192, one task per batch, REBALANCE_TIMEOUT_S=3)
    a rebalance still hands each partition over once: the old owner finishes its batch in the model
    and gives up the rest uncommitted before the new owner starts, so on every task partition the
    results come from one worker and then from the other, never interleaved. The backlog is
    published in small rounds while the first worker runs (so that its queue mixes all partitions;
    a backlog published at once is fetched, and served, one partition after another), and the
    second worker starts once the first has served tasks of every partition: at least one
    partition changes hands mid-stream.

    Regression: the revocation used to wait for every queued task (faust ``stream_wait_empty``);
    past the rebalance timeout the coordinator evicted the worker and gave its partitions to the
    other one while it kept serving them (105 worker switches on one partition, 128 duplicates).
    Duplicates are printed, not asserted: a rare one remains (see the report of issue 5)."""
    n = 40_000  # the batch-native worker serves one-task batches at thousands per second: a backlog of
    # 12,000 was gone before the second worker joined
    # draining 8192 queued tasks one per batch takes well over 3 s on any machine (>= 0.3 ms per batch)
    settings = {**SLOW, "max_batch_size": "1", "max_in_flight": "8192", "rebalance_timeout_s": "3"}
    task_topic = f"{prefix}.tasks.digits"
    await create_topics(kafka_bootstrap, prefix)
    tasks = digit_tasks(n, "h")
    first = workers.start(kafka_bootstrap, prefix, "digits", **settings)
    await wait_stable(kafka_bootstrap, f"{prefix}-workers", 1, 120)
    positions: dict[str, tuple[int, int]] = {}
    for i in range(0, n, 2000):  # published faster than one-task batches are served: a backlog builds
        positions.update(await produce_tasks(kafka_bootstrap, task_topic, tasks[i : i + 2000]))
        await asyncio.sleep(0.1)
    async with ResultFollower(kafka_bootstrap, prefix) as results:
        partitions = {p for p, _ in positions.values()}
        await results.until(lambda: {positions[t][0] for t in results.first} == partitions, 180, alive(first),
                            "results from every partition")
        second = workers.start(kafka_bootstrap, prefix, "digits", **settings)
        await results.until(lambda: results.by_worker["w1"] >= 300, 180, alive(first, second),
                            "300 results from the joining worker")
        await asyncio.sleep(3.0)
        await results.catch_up()
    switches = switches_per_partition(results, positions)
    print(f"\nresults by worker {dict(results.by_worker)}; {results.duplicates} duplicates "
          f"{dict(results.duplicate_pairs)}; worker switches per task partition {switches}")
    assert len(results.first) < n, "the backlog was gone before the rebalance"
    assert all(s <= 1 for s in switches.values()), "two workers served one partition at the same time"
    assert any(s == 1 for s in switches.values()), "no partition changed hands mid-stream"


async def test_graceful_rebalances_serve_no_task_twice(kafka_bootstrap, prefix, workers, model_cache):
    """Graceful membership changes only: while two workers serve a backlog, a third joins and later
    stops with SIGTERM, three times (six rebalances, no crash). No task is served twice
    (duplicates only after a crash) and none is lost.

    COMMIT_INTERVAL_S=0.05 keeps a periodic commit in flight much of the time: the commit a worker
    makes before it gives up its partitions must still cover every task acknowledged so far."""
    n = 60_000  # one task per batch: the batch-native worker serves thousands a second, so a backlog
    # that outlasts three joins and stops needs tens of thousands of tasks
    settings = {**SLOW, "max_batch_size": "1", "commit_interval_s": "0.05"}
    group, task_topic = f"{prefix}-workers", f"{prefix}.tasks.digits"
    await create_topics(kafka_bootstrap, prefix)
    tasks = digit_tasks(n, "q")
    steady = [workers.start(kafka_bootstrap, prefix, "digits", **settings) for _ in range(2)]
    await wait_stable(kafka_bootstrap, group, 2, 120)
    await produce_tasks(kafka_bootstrap, task_topic, tasks)
    stops: list[float] = []
    exit_codes: list[int] = []
    async with ResultFollower(kafka_bootstrap, prefix) as results:
        for _ in range(3):
            extra = workers.start(kafka_bootstrap, prefix, "digits", **settings)
            await wait_stable(kafka_bootstrap, group, 3, 120)
            for _ in range(10):  # ~2 s of serving with three members
                await results.poll()
            t0 = time.monotonic()
            extra.send_signal(signal.SIGTERM)
            try:
                exit_codes.append(await asyncio.to_thread(extra.wait, GRACE_S))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the worker did not stop within {GRACE_S} s of SIGTERM:\n{workers.log(extra)}")
            stops.append(time.monotonic() - t0)
            await wait_stable(kafka_bootstrap, group, 2, 60)
        during_churn = len(results.first)
        await results.until(lambda: len(results.first) == n, 300, alive(*steady), f"all {n} results")
        await asyncio.sleep(1.0)
        await results.catch_up()
    print(f"\ngraceful churn: {during_churn} tasks answered during 3 joins and 3 SIGTERM stops "
          f"(stops took {[round(s, 1) for s in stops]} s, exit codes {exit_codes}); "
          f"{results.duplicates} duplicates "
          f"{dict(results.duplicate_pairs)}; results by worker {dict(results.by_worker)}")
    assert during_churn < n, "the backlog was gone before the churn ended"
    assert set(results.first) == {t.id for t in tasks}
    assert all(r.status == "ok" for r in results.first.values())
    assert results.duplicates == 0, "a graceful rebalance or stop served tasks twice"
    assert exit_codes == [0, 0, 0], "a worker stopped with SIGTERM did not exit 0"
