"""The shipped routing pipeline (``examples/pipelines/digits-routing``) on a real Apache Kafka.

Workers are ``autoglm pipeline run FILE`` / ``autoglm worker --pipeline FILE`` processes in one
consumer group. Every Kafka result is checked against :func:`autoglm.pipelines.dry_run` of the
same tasks in this process (status, output names, skipped steps, outputs to 1e-5, the steps that
ran); the tasks are real held-out digit images, about 6 % of which the CNN (step ``first``) is
unsure of, so that they also take step ``second`` (``digits-linear``) through the intermediate
topic ``<prefix>.pipelines.digits-routing.second``, while the others skip it.

- Two workers: every task answered once, as the dry run; both workers serve steps; one hop per
  routed task; ``ctl configure --pipeline P --step S`` re-tunes that step only.
- SIGKILL of one of two workers mid-stream: none lost, every result record (duplicates included)
  equals the dry run, duplicates counted; commit-after-produce audited at both hops at the kill.
- SIGTERM of one of two workers mid-stream: exit 0, the other serves the rest, no duplicate.
- ``ctl pause --pipeline P --step second``: routed tasks park as hops, the others complete;
  ``ctl pause --pipeline P``: every step of every worker stops (acks, heartbeats, lag, no result or
  hop); resuming ``second`` serves the parked hops (those past their deadline: ``expired``), resuming
  the pipeline the rest; ``ctl pause --model digits-linear`` selects step ``second``.
- Bad records on the input and intermediate topics: dead letters with reasons, ``rejected`` results,
  the worker serves the next tasks.
- Results go to a task's ``reply_to``, also for the tasks that arrive while that topic is being checked.
- Exactly-once mode with a SIGKILL: one committed result per task, one committed hop per routed task.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import orjson
import pytest

from autoglm.pipelines import dry_run, load_pipeline
from autoglm.processors.errors import TopicMissingError
from autoglm.processors.routing import PipelineResult, TaskState
from autoglm.streams.control import ControlClient
from autoglm.streams.events import Hop, Result, Task, decode_hop, decode_result, decode_task, encode_hop, encode_task
from autoglm.streams.topics import TopicNames, ensure_topics, partitions_of
from autoglm.tasks import holdout_digits

from .conftest import ROOT, wait_for
from .kafka_io import ResultFollower, committed_ids, committed_offsets, produce, produce_tasks, read_until

pytestmark = pytest.mark.integration

PIPELINE_FILE = ROOT / "examples" / "pipelines" / "digits-routing" / "pipeline.yaml"
NAME = "digits-routing"
STEP_MODELS = {"first": "digits", "second": "digits-linear"}
#: the reference pool: 360 one-image tasks (the whole held-out split) and 12 two-image tasks
N_SINGLE, N_PAIRS = 360, 12
#: workers report state every second, and a killed member's partitions move within seconds
FAST = {"status_interval_s": "1"}


def in_topic(prefix: str) -> str:
    return f"{prefix}.pipelines.{NAME}.in"


def second_topic(prefix: str) -> str:
    return f"{prefix}.pipelines.{NAME}.second"


@dataclass
class Reference:
    """Tasks of the pool and their dry-run results (the same bytes the workers decode)."""

    tasks: dict[str, Task]
    results: dict[str, PipelineResult]

    @property
    def routed(self) -> set[str]:
        """Ids of the tasks that take step ``second``."""
        return {tid for tid, r in self.results.items() if "second" not in r.skipped}

    def pick(self, n_routed: int, n_direct: int, tag: str = "") -> list[Task]:
        """``n_routed`` tasks that take ``second`` and ``n_direct`` that skip it, interleaved; ids prefixed
        by ``tag``."""
        routed = sorted(self.routed, key=_order)[:n_routed]
        direct = sorted(set(self.tasks) - self.routed, key=_order)[:n_direct]
        assert len(routed) == n_routed and len(direct) == n_direct, "the pool is too small"
        every = max(1, (n_routed + n_direct) // max(1, n_routed))
        order: list[str] = []
        for tid in direct:
            if routed and len(order) % every == 0:
                order.append(routed.pop(0))
            order.append(tid)
        order.extend(routed)
        return [self.renamed(tid, tag) for tid in order]

    def renamed(self, tid: str, tag: str) -> Task:
        t = self.tasks[tid]
        return Task(id=tag + tid, model=t.model, inputs=t.inputs, attributes=dict(t.attributes))

    def expected(self, task_id: str, tag: str = "") -> PipelineResult:
        return self.results[task_id[len(tag):]]


def _order(tid: str) -> tuple[str, int]:
    return tid[0], int(tid[1:])


@pytest.fixture(scope="module")
def reference() -> Reference:
    """Dry run of the pool in this process, with the real models (about a second)."""
    x, y = holdout_digits(N_SINGLE)
    pipeline = load_pipeline(PIPELINE_FILE)

    def task(tid: str, rows: list[int]) -> Task:
        return Task(id=tid, model=f"pipeline:{NAME}", inputs=x[rows].reshape(len(rows), 64),
                    attributes={"label": ",".join(str(int(y[i])) for i in rows)})

    singles = [task(f"s{i}", [i]) for i in range(N_SINGLE)]
    first = dry_run(pipeline, [TaskState(t.id, t.inputs, {}) for t in singles]).results
    unsure = [i for i, r in enumerate(first) if "second" not in r.skipped]
    sure = [i for i, r in enumerate(first) if "second" in r.skipped]
    # two-image tasks: half of them with one image the CNN is unsure of
    pairs = [task(f"p{j}", [unsure[j % len(unsure)] if j % 2 else sure[2 * j], sure[2 * j + 1]])
             for j in range(N_PAIRS)]
    # what a worker reads: the task decoded from its wire bytes
    decoded = {t.id: decode_task(encode_task(t)) for t in singles + pairs}
    states = [TaskState(t.id, t.inputs, dict(t.attributes)) for t in decoded.values()]
    run = dry_run(pipeline, states)
    ref = Reference(decoded, {r.id: r for r in run.results})
    routed = ref.routed
    # both routes are taken, by one-image and by two-image tasks
    assert 10 <= len(routed) <= len(decoded) - 100, len(routed)
    assert any(t.startswith("p") for t in routed) and any(t.startswith("s") for t in routed)
    assert all(r.status == "ok" for r in ref.results.values())
    return ref


def check_against_dry_run(results: dict[str, Result], ref: Reference, tasks: list[Task], workers: set[str],
                          tag: str = "") -> Counter:
    """Every task's Kafka result equals its dry run; returns steps served per worker id."""
    served: Counter = Counter()
    for task in tasks:
        got, want = results[task.id], ref.expected(task.id, tag)
        assert got.status == want.status == "ok", (task.id, got.error)
        assert got.pipeline == NAME and got.model == f"pipeline:{NAME}"
        assert isinstance(got.outputs, dict), got.outputs
        assert set(got.outputs) == set(want.outputs), (task.id, set(got.outputs), set(want.outputs))
        for name, value in want.outputs.items():
            assert got.outputs[name].shape == np.asarray(value).shape
            np.testing.assert_allclose(got.outputs[name], value, rtol=0, atol=1e-5, err_msg=f"{task.id} {name}")
        assert got.skipped == want.skipped, task.id
        ran = [s["step"] for s in got.steps]
        assert ran == [s for s in ("first", "second") if s not in want.skipped], (task.id, ran)
        for s in got.steps:
            assert s["model"] == STEP_MODELS[s["step"]]
            assert s["worker"] in workers, s
            assert s["batch_size"] >= 1 and s["inference_ms"] >= 0 and s["queue_ms"] >= 0
            served[s["worker"]] += 1
        assert got.attributes == dict(task.attributes)
        assert got.worker == got.steps[-1]["worker"]  # the worker of the last step published the result
    return served


@contextlib.asynccontextmanager
async def control(bootstrap: str, prefix: str, alive=lambda: True, timeout_s: float = 60.0):
    """A :class:`ControlClient` once the starting workers have created the control and status topics."""
    deadline = time.monotonic() + timeout_s
    for topic in (f"{prefix}.control", f"{prefix}.status"):
        while True:
            try:
                await partitions_of(bootstrap, topic, timeout_s=1.0)
                break
            except TopicMissingError:
                assert alive(), "a worker died while starting"
                assert time.monotonic() < deadline, f"the workers did not create {topic}"
    async with ControlClient(bootstrap, prefix=prefix) as client:
        yield client


async def live_workers(client: ControlClient, ids: set[str], timeout_s: float = 90.0,
                       predicate=lambda hb: True, alive=lambda: True) -> dict[str, dict]:
    """The latest heartbeats of ``ids`` once each is ready and satisfies ``predicate``."""
    deadline = time.monotonic() + timeout_s
    live: dict[str, dict] = {}
    while time.monotonic() < deadline:
        assert alive(), "a worker died while starting"
        live = {w: hb for w, hb in (await client.live_workers()).items()
                if w in ids and hb.get("state", {}).get("ready") and predicate(hb)}
        if set(live) == ids:
            return live
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for workers {sorted(ids)}; have {sorted(live)}")


def assigned(hb: dict) -> set[tuple[str, str]]:
    """The (stream, partition) pairs a heartbeat's worker consumes (its lag figures name them)."""
    return {(name, p) for name, fig in hb["models"].items() for p in fig.get("lag_by_partition") or {}}


async def settled(client: ControlClient, ids: set[str], alive, partitions: int = 6, timeout_s: float = 90.0) -> None:
    """Wait until every worker of ``ids`` is ready and the group's rebalance is over: each worker consumes
    some partitions, none twice, ``partitions`` in all (3 of the input topic and 3 of ``second``'s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        beats = await live_workers(client, ids, timeout_s=timeout_s, alive=alive)
        parts = [assigned(hb) for hb in beats.values()]
        if all(parts) and sum(map(len, parts)) == len(set().union(*parts)) == partitions:
            return
        assert time.monotonic() < deadline, f"the group did not settle: {parts}"
        await asyncio.sleep(0.5)


async def wait_lag(client: ControlClient, ids: set[str], want: tuple[int, int], timeout_s: float) -> tuple[int, int]:
    """(lag of ``first``, lag of ``second``) summed over the latest heartbeats of ``ids``, once equal to ``want``
    or after ``timeout_s`` (the last seen)."""
    deadline = time.monotonic() + timeout_s
    while True:
        beats = {w: hb for w, hb in (await client.live_workers()).items() if w in ids}
        lag = tuple(sum(hb["models"].get(f"{NAME}/{step}", {}).get("lag") or 0 for hb in beats.values())
                    for step in ("first", "second"))
        if lag == want or time.monotonic() > deadline:
            return lag
        await asyncio.sleep(0.5)


def fetching(hb: dict) -> dict[str, bool]:
    """``<pipeline>/<step>`` -> whether the worker fetches that step's topic."""
    return {name: m["fetching"] for name, m in hb["state"]["models"].items() if m.get("pipeline") == NAME}


def ctl(bootstrap: str, prefix: str, *args: str) -> dict:
    """``autoglm ctl ARGS --wait --json`` as a process; its JSON outcome (exit 0 required)."""
    env = {**os.environ, "AUTOGLM_BOOTSTRAP_SERVERS": bootstrap, "AUTOGLM_TOPIC_PREFIX": prefix}
    proc = subprocess.run([sys.executable, "-m", "autoglm", "ctl", *args, "--wait", "--timeout-s", "20", "--json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return orjson.loads(proc.stdout.strip().splitlines()[-1])


async def hop_records(bootstrap: str, prefix: str, settle_s: float, expect: int = 0) -> list[tuple[int, int, Hop]]:
    """(partition, offset, hop) of the records on the ``second`` step's topic (read for ``settle_s``, or
    until ``expect`` hops)."""
    records = await read_until(bootstrap, second_topic(prefix), lambda r: expect and len(r) >= expect, settle_s)
    hops = [(r.partition, r.offset, decode_hop(r.value)) for r in records]
    assert all(h.pipeline == NAME and h.step == "second" for _, _, h in hops)
    return hops


async def hop_ids(bootstrap: str, prefix: str, settle_s: float, expect: int = 0) -> Counter:
    """Task id -> hop records on the ``second`` step's topic (see :func:`hop_records`)."""
    return Counter(h.state.id for _, _, h in await hop_records(bootstrap, prefix, settle_s, expect))


async def committed_results(bootstrap: str, prefix: str, n: int, timeout_s: float,
                            alive=lambda: True) -> tuple[Counter, dict[str, Result]]:
    """Read ``<prefix>.results`` from its start with ``read_committed`` until ``n`` tasks have a result (or the
    timeout); returns (result records per task id, first result per task id)."""
    counts: Counter = Counter()
    firsts: dict[str, Result] = {}

    def done(records) -> bool:
        for rec in records[sum(counts.values()):]:
            result = decode_result(rec.value)
            counts[result.id] += 1
            firsts.setdefault(result.id, result)
        return len(counts) >= n

    await read_until(bootstrap, f"{prefix}.results", done, timeout_s, alive, isolation_level="read_committed")
    return counts, firsts


def start_pair(workers, bootstrap: str, prefix: str, **settings: str):
    """Two workers of one group: ``w0`` by ``autoglm pipeline run``, ``w1`` by ``autoglm worker --pipeline``."""
    w0 = workers.start(bootstrap, prefix, None, command=("pipeline", "run", str(PIPELINE_FILE)),
                       worker_id="w0", **FAST, **settings)
    w1 = workers.start(bootstrap, prefix, None, command=("worker", "--pipeline", str(PIPELINE_FILE)),
                       worker_id="w1", **FAST, **settings)
    return w0, w1


# -- 1. two workers, every task answered, results equal the dry run ----------------------------


async def test_two_workers_answer_every_task_as_the_dry_run(kafka_bootstrap, prefix, workers, model_cache,
                                                            reference):
    w0, w1 = start_pair(workers, kafka_bootstrap, prefix)
    alive = lambda: w0.poll() is None and w1.poll() is None  # noqa: E731
    tasks = [reference.tasks[t] for t in sorted(reference.tasks, key=_order)]  # the whole pool
    async with control(kafka_bootstrap, prefix) as client:
        await settled(client, {"w0", "w1"}, alive)
        beats = await live_workers(client, {"w0", "w1"}, alive=alive)
    # the workers created the pipeline's topics and serve both steps
    assert all(fetching(hb) == {f"{NAME}/first": True, f"{NAME}/second": True} for hb in beats.values()), beats
    # batching is per step: one-task batches for `second` only
    out = ctl(kafka_bootstrap, prefix, "configure", "--pipeline", NAME, "--step", "second", "--max-batch-size", "1")
    assert out["ok"] and set(out["acks"]) == {"w0", "w1"}, out
    for ack in out["acks"].values():
        streams = ack["state"]["models"]
        assert streams[f"{NAME}/second"]["params"] == {"max_batch_size": 1} and streams[f"{NAME}/first"]["params"] == {}
    t0 = time.monotonic()
    await produce_tasks(kafka_bootstrap, in_topic(prefix), tasks)
    async with ResultFollower(kafka_bootstrap, prefix) as results:
        await results.until(lambda: len(results.first) >= len(tasks), 120, alive)
        took_s = time.monotonic() - t0
        await asyncio.sleep(1.0)
        await results.catch_up()
    ids = {t.id for t in tasks}
    assert set(results.first) == ids
    served = check_against_dry_run(results.first, reference, tasks, {"w0", "w1"})
    # both workers served steps; each routed task made exactly one trip through the intermediate topic
    assert served["w0"] > 0 and served["w1"] > 0, served
    hops = await hop_ids(kafka_bootstrap, prefix, 10.0, expect=len(reference.routed))
    assert set(hops) == reference.routed
    print(f"\npipeline on Kafka, 2 workers: {len(tasks)} tasks ({len(reference.routed)} through 'second') in "
          f"{took_s:.1f} s; steps served {dict(served)}; {results.duplicates} duplicate results, "
          f"{sum(hops.values()) - len(hops)} duplicate hops")
    assert results.duplicates == 0 and sum(hops.values()) == len(hops)  # no crash, no rebalance: no redelivery
    sizes = {step: [s["batch_size"] for r in results.first.values() for s in r.steps if s["step"] == step]
             for step in ("first", "second")}
    assert set(sizes["second"]) == {1} and max(sizes["first"]) > 1, sizes


# -- 2. SIGKILL mid-stream ----------------------------------------------------------------------


async def test_sigkill_of_one_worker_mid_stream_loses_no_task(kafka_bootstrap, prefix, workers, model_cache,
                                                              reference):
    w0, w1 = start_pair(workers, kafka_bootstrap, prefix)
    async with control(kafka_bootstrap, prefix) as client:
        await settled(client, {"w0", "w1"}, lambda: w0.poll() is None and w1.poll() is None)
        # one-task batches at every step, so that the backlog lasts long enough to be cut
        outcome = await client.command("configure", pipeline=NAME, params={"max_batch_size": 1}, wait=True,
                                       timeout_s=20)
        assert outcome.ok and set(outcome.acks) == {"w0", "w1"}, outcome
    tasks = [reference.renamed(t, "k0-") for t in sorted(reference.tasks, key=_order)]
    positions = await produce_tasks(kafka_bootstrap, in_topic(prefix), tasks)
    group = f"{prefix}-workers"
    async with ResultFollower(kafka_bootstrap, prefix) as results:
        await results.until(lambda: len(results.first) >= len(tasks) // 4, 90,
                            lambda: w0.poll() is None and w1.poll() is None)
        w1.send_signal(signal.SIGKILL)
        wait_for(lambda: w1.poll() is not None, 10, "the killed worker to exit")
        # commit after produce at both hops, checked from outside: the group's committed offsets first, then
        # what was produced; a task below a committed offset of the input topic has a hop or a result, a hop
        # below a committed offset of `second`'s topic has a result
        committed_in = await committed_offsets(kafka_bootstrap, group, in_topic(prefix))
        committed_hops = await committed_offsets(kafka_bootstrap, group, second_topic(prefix))
        ends = await results.catch_up()
        hops_now = await hop_records(kafka_bootstrap, prefix, 1.0)
        answered = results.served_below(ends)
        assert committed_ids(positions, committed_in) - answered - {h.state.id for _, _, h in hops_now} == set()
        assert {h.state.id for p, o, h in hops_now if o < committed_hops.get(p, 0)} - answered == set()
        answered_at_kill = len(results.first)
        await results.until(lambda: len(results.first) >= len(tasks), 120, lambda: w0.poll() is None)
        await asyncio.sleep(1.0)
        await results.catch_up()
    assert answered_at_kill < len(tasks), "the kill did not land mid-stream"
    assert set(results.first) == {t.id for t in tasks}  # none lost
    # every result record, duplicates included, equals the dry run
    records = await read_until(kafka_bootstrap, f"{prefix}.results",
                               lambda r: len(r) >= len(tasks) + results.duplicates, 10.0)
    assert len(records) == len(tasks) + results.duplicates
    by_id = {t.id: t for t in tasks}
    for rec in records:
        result = decode_result(rec.value)
        check_against_dry_run({result.id: result}, reference, [by_id[result.id]], {"w0", "w1"},
                              tag=result.id[:3])
    routed = {t.id for t in tasks if t.id[3:] in reference.routed}
    hops = await hop_ids(kafka_bootstrap, prefix, 1.5)
    assert set(hops) == routed
    handed = [r for r in results.first.values() if r.worker == "w0" and any(s["worker"] == "w1" for s in r.steps)]
    print(f"\nSIGKILL of w1 after {answered_at_kill}/{len(tasks)} results: every task answered, "
          f"{results.duplicates} duplicate results and {sum(hops.values()) - len(hops)} duplicate hops "
          f"(at-least-once redelivery); {len(handed)} tasks whose first step w1 served and w0 finished; "
          f"results per worker {dict(results.by_worker)}")
    assert {s["batch_size"] for r in results.first.values() for s in r.steps} == {1}  # the configure applied
    assert sum(committed_in.values()) > 0 and sum(committed_hops.values()) > 0  # the audit had commits to check


async def test_sigterm_of_one_worker_mid_stream_hands_over_without_duplicates(kafka_bootstrap, prefix, workers,
                                                                              model_cache, reference):
    """A graceful stop mid-stream: the worker finishes its steps' in-flight tasks, produces their hops and
    results, commits and leaves the group (exit 0); the other worker serves the rest; no task runs twice."""
    # a small in-flight cap: what the stopping worker still holds to finish is a few tasks, not its backlog
    w0, w1 = start_pair(workers, kafka_bootstrap, prefix, max_in_flight="8")
    async with control(kafka_bootstrap, prefix) as client:
        await settled(client, {"w0", "w1"}, lambda: w0.poll() is None and w1.poll() is None)
        outcome = await client.command("configure", pipeline=NAME, params={"max_batch_size": 1}, wait=True,
                                       timeout_s=20)
        assert outcome.ok and set(outcome.acks) == {"w0", "w1"}, outcome
    tasks = [reference.renamed(t, "g0-") for t in sorted(reference.tasks, key=_order)]
    await produce_tasks(kafka_bootstrap, in_topic(prefix), tasks)
    async with ResultFollower(kafka_bootstrap, prefix) as results:
        await results.until(lambda: len(results.first) >= len(tasks) // 4, 90,
                            lambda: w0.poll() is None and w1.poll() is None)
        await results.catch_up()
        answered_at_signal = len(results.first)
        w1.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = await asyncio.to_thread(w1.wait, 30)
        stop_s = time.monotonic() - t0
        assert rc == 0, workers.log(w1)
        await results.catch_up()
        answered_at_stop = len(results.first)
        await results.until(lambda: len(results.first) >= len(tasks), 120, lambda: w0.poll() is None)
        await asyncio.sleep(1.0)
        await results.catch_up()
    assert answered_at_signal < len(tasks) // 2, "the stop did not land mid-stream"
    assert set(results.first) == {t.id for t in tasks}
    check_against_dry_run(results.first, reference, tasks, {"w0", "w1"}, tag="g0-")
    hops = await hop_ids(kafka_bootstrap, prefix, 1.5)
    handed = [r for r in results.first.values() if r.worker == "w0" and any(s["worker"] == "w1" for s in r.steps)]
    print(f"\nSIGTERM of w1 at {answered_at_signal}/{len(tasks)} results: exit 0 after {stop_s:.1f} s "
          f"({answered_at_stop} results by then); {results.duplicates} duplicate results, "
          f"{sum(hops.values()) - len(hops)} duplicate hops; {len(handed)} tasks whose first step w1 served and w0 "
          f"finished; results per worker {dict(results.by_worker)}")
    assert results.duplicates == 0 and sum(hops.values()) == len(hops)
    assert results.by_worker["w1"] > 0


# -- 3. pause a step, pause the pipeline --------------------------------------------------------


async def test_pause_one_step_then_the_whole_pipeline_then_resume(kafka_bootstrap, prefix, workers, model_cache,
                                                                  reference):
    w0, w1 = start_pair(workers, kafka_bootstrap, prefix)
    alive = lambda: w0.poll() is None and w1.poll() is None  # noqa: E731
    first, second = f"{NAME}/first", f"{NAME}/second"
    phases = [("start", time.monotonic())]
    async with control(kafka_bootstrap, prefix) as client:
        await settled(client, {"w0", "w1"}, alive)

    phases.append(("a", time.monotonic()))
    # (a) pause step `second` only: routed tasks wait as hops on its topic, the others complete
    out = ctl(kafka_bootstrap, prefix, "pause", "--pipeline", NAME, "--step", "second")
    assert out["ok"] and set(out["acks"]) == {"w0", "w1"}, out
    for ack in out["acks"].values():
        assert fetching(ack) == {first: True, second: False}, ack
    batch_a = reference.pick(8, 30, "a-")
    # two routed tasks must be answered within 4 s: they expire while parked before `second`
    expiring = [t for t in batch_a if t.id[2:] in reference.routed][:2]
    deadline_ms = time.time_ns() // 1_000_000 + 4000
    batch_a = [Task(id=t.id, model=t.model, inputs=t.inputs, deadline_ms=deadline_ms, attributes=t.attributes)
               if t in expiring else t for t in batch_a]
    expiring_ids = {t.id for t in expiring}
    routed_a = {t.id for t in batch_a if t.id[2:] in reference.routed}
    direct_a = {t.id for t in batch_a} - routed_a
    await produce_tasks(kafka_bootstrap, in_topic(prefix), batch_a)
    async with ResultFollower(kafka_bootstrap, prefix) as results:
        await results.until(lambda: direct_a <= set(results.first), 60, alive, "the tasks that skip `second`")
        hops = await hop_ids(kafka_bootstrap, prefix, 10.0, expect=len(routed_a))
        assert set(hops) == routed_a  # every routed task is parked before `second`
        await asyncio.sleep(1.0)
        await results.catch_up()
        assert set(results.first) == direct_a  # ... and none of them is answered

        phases.append(("b", time.monotonic()))
        # (b) pause the whole pipeline: every step of every worker stops fetching
        out = ctl(kafka_bootstrap, prefix, "pause", "--pipeline", NAME)
        assert out["ok"] and set(out["acks"]) == {"w0", "w1"}, out
        for ack in out["acks"].values():
            assert fetching(ack) == {first: False, second: False}, ack
        batch_b = reference.pick(4, 16, "b-")
        await produce_tasks(kafka_bootstrap, in_topic(prefix), batch_b)
        published_ms = time.time_ns() // 1_000_000
        async with control(kafka_bootstrap, prefix) as client:
            # heartbeats after the tasks were published: both steps paused on both workers
            await live_workers(client, {"w0", "w1"}, timeout_s=20, alive=alive,
                               predicate=lambda hb: hb["time_ms"] > published_ms + 1500
                               and not any(fetching(hb).values()))
            # ... and what waits is visible as the group's lag: batch B before `first`, A's routed tasks
            # before `second` (end offset minus committed offset, summed over the two workers' partitions)
            waiting = (len(batch_b), len(routed_a))
            lag = await wait_lag(client, {"w0", "w1"}, waiting, timeout_s=20)
            assert lag == waiting, lag
        await results.catch_up()
        assert set(results.first) == direct_a, "a task was served while the pipeline was paused"
        assert set(await hop_ids(kafka_bootstrap, prefix, 1.0)) == routed_a  # no new hop either

        phases.append(("c", time.monotonic()))
        # (c) resume step `second` only: the parked hops are served, the new tasks still wait at `first`
        out = ctl(kafka_bootstrap, prefix, "resume", "--pipeline", NAME, "--step", "second")
        assert out["ok"] and all(fetching(a) == {first: False, second: True} for a in out["acks"].values()), out
        assert time.time_ns() // 1_000_000 > deadline_ms
        await results.until(lambda: routed_a <= set(results.first), 60, alive, "the parked tasks")
        await asyncio.sleep(1.0)
        await results.catch_up()
        assert set(results.first) == direct_a | routed_a
        for tid in expiring_ids:  # an expired task: no outputs, the steps it ran, the pipeline's name
            late = results.first[tid]
            assert late.status == "expired" and late.outputs is None and late.pipeline == NAME, late
            assert [s["step"] for s in late.steps] == ["first"], late

        phases.append(("d", time.monotonic()))
        # (d) resume the pipeline: the rest completes
        out = ctl(kafka_bootstrap, prefix, "resume", "--pipeline", NAME)
        assert out["ok"] and all(fetching(a) == {first: True, second: True} for a in out["acks"].values()), out
        everything = {t.id for t in batch_a + batch_b}
        await results.until(lambda: everything <= set(results.first), 60, alive, "every task")
        await asyncio.sleep(0.5)
        await results.catch_up()
    assert set(results.first) == everything
    check_against_dry_run(results.first, reference, [t for t in batch_a if t.id not in expiring_ids], {"w0", "w1"},
                          tag="a-")
    check_against_dry_run(results.first, reference, batch_b, {"w0", "w1"}, tag="b-")
    assert results.duplicates == 0

    phases.append(("e", time.monotonic()))
    # (e) `ctl pause --model M` selects the steps that run M: here `second` only
    out = ctl(kafka_bootstrap, prefix, "pause", "--model", "digits-linear")
    assert out["ok"] and all(fetching(a) == {first: True, second: False} for a in out["acks"].values()), out
    phases.append(("end", time.monotonic()))
    print("\npause test phases (s): " + ", ".join(f"{a}->{b} {t1 - t0:.1f}" for (a, t0), (b, t1)
                                                  in zip(phases, phases[1:])))


# -- 4. bad records ------------------------------------------------------------------------------


async def test_malformed_records_are_dead_lettered_and_the_worker_keeps_serving(kafka_bootstrap, prefix, workers,
                                                                                 model_cache, reference):
    # one partition per topic: the bad records sit between good tasks in one log
    w0 = workers.start(kafka_bootstrap, prefix, None, command=("pipeline", "run", str(PIPELINE_FILE)),
                       worker_id="w0", partitions="1", **FAST)
    alive = lambda: w0.poll() is None  # noqa: E731
    async with control(kafka_bootstrap, prefix) as client:
        await live_workers(client, {"w0"}, alive=alive)
    src, hops_topic = in_topic(prefix), second_topic(prefix)
    stray = Hop(TaskState("bad-step", reference.tasks["s0"].inputs, {}), f"pipeline:{NAME}", NAME, "first")
    bad = [  # (topic, raw value, task id of its `rejected` result or None, dead-letter error code)
        (src, b"this is not JSON {", None, "decode"),
        (src, orjson.dumps({"schema": "autoglm.task/v1", "id": "bad-shape", "model": f"pipeline:{NAME}",
                            "inputs": [[0.0] * 63]}), "bad-shape", "input_signature"),
        (hops_topic, b'{"schema": "autoglm.hop/v1", "id": "bad-hop"}', "bad-hop", "invalid_field"),
        (hops_topic, encode_hop(stray), "bad-step", "invalid_field"),  # a hop for step `first` on `second`'s topic
    ]
    before, after = reference.pick(2, 4, "x-"), reference.pick(2, 4, "y-")
    late = Task(id="late", model=f"pipeline:{NAME}", inputs=reference.tasks["s1"].inputs,
                deadline_ms=time.time_ns() // 1_000_000 - 1000)
    await produce_tasks(kafka_bootstrap, src, before)
    await produce(kafka_bootstrap, [(topic, b"bad", raw) for topic, raw, _, _ in bad])
    await produce_tasks(kafka_bootstrap, src, [late, *after])

    wanted = {t.id for t in before + after} | {tid for _, _, tid, _ in bad if tid} | {"late"}
    async with ResultFollower(kafka_bootstrap, prefix) as results:
        await results.until(lambda: wanted <= set(results.first), 60, alive)
        dlq = await read_until(kafka_bootstrap, f"{prefix}.dlq", lambda r: len(r) >= len(bad), 30, alive)
        await asyncio.sleep(1.0)
        await results.catch_up()
    dlq = await read_until(kafka_bootstrap, f"{prefix}.dlq", lambda r: False, 1.0, alive)
    # every bad record dead-lettered once, its original bytes and why
    assert sorted(r.value for r in dlq) == sorted(raw for _, raw, _, _ in bad)
    for rec in dlq:
        topic, raw, tid, code = next(b for b in bad if b[1] == rec.value)
        headers = {k: v.decode() for k, v in rec.headers}
        assert headers["autoglm.error.code"] == code, headers
        assert headers["autoglm.source.topic"] == topic and headers["autoglm.error.message"], headers
        assert headers["autoglm.source.partition"] == "0"
        if tid:
            assert results.first[tid].status == "rejected" and results.first[tid].error.code == code
    assert set(results.first) == wanted and results.duplicates == 0
    expired = results.first["late"]
    assert expired.status == "expired" and expired.pipeline == NAME and expired.outputs is None, expired
    check_against_dry_run(results.first, reference, before, {"w0"}, tag="x-")
    check_against_dry_run(results.first, reference, after, {"w0"}, tag="y-")  # served after the bad records
    assert w0.poll() is None


async def test_results_go_to_the_tasks_reply_to_topic(kafka_bootstrap, prefix, workers, model_cache, reference):
    w0 = workers.start(kafka_bootstrap, prefix, None, command=("pipeline", "run", str(PIPELINE_FILE)),
                       worker_id="w0", **FAST)
    alive = lambda: w0.poll() is None  # noqa: E731
    async with control(kafka_bootstrap, prefix) as client:
        await live_workers(client, {"w0"}, alive=alive)
    replies = f"{prefix}.replies"
    await ensure_topics(kafka_bootstrap, TopicNames(prefix), [], partitions=2, extra=[replies])
    tasks = [Task(id=t.id, model=t.model, inputs=t.inputs, reply_to=replies, attributes=dict(t.attributes))
             for t in reference.pick(3, 3, "r-")]
    plain = reference.pick(1, 1, "n-")
    await produce_tasks(kafka_bootstrap, in_topic(prefix), tasks + plain)
    records = await read_until(kafka_bootstrap, replies, lambda r: len(r) >= len(tasks), 8, alive)
    got = {decode_result(r.value).id: decode_result(r.value) for r in records}
    assert set(got) == {t.id for t in tasks}
    check_against_dry_run(got, reference, tasks, {"w0"}, tag="r-")
    async with ResultFollower(kafka_bootstrap, prefix) as results:
        await results.until(lambda: {t.id for t in plain} <= set(results.first), 30, alive)
        await asyncio.sleep(0.5)
        await results.catch_up()
    assert set(results.first) == {t.id for t in plain}  # a reply_to result is not also on the results topic


# -- 5. exactly once -------------------------------------------------------------------------------


async def test_exactly_once_pipeline_commits_one_result_per_task_through_a_sigkill(
        kafka_bootstrap, prefix, workers, model_cache, reference):
    eos = {"delivery": "exactly_once", "transaction_timeout_s": "10"}
    w0, w1 = start_pair(workers, kafka_bootstrap, prefix, **eos)
    async with control(kafka_bootstrap, prefix) as client:
        await settled(client, {"w0", "w1"}, lambda: w0.poll() is None and w1.poll() is None)
        outcome = await client.command("configure", pipeline=NAME, params={"max_batch_size": 1}, wait=True,
                                       timeout_s=20)
        assert outcome.ok, outcome
    tasks = [reference.renamed(t, "e0-") for t in sorted(reference.tasks, key=_order)]
    ids = {t.id for t in tasks}
    await produce_tasks(kafka_bootstrap, in_topic(prefix), tasks)
    both = lambda: w0.poll() is None and w1.poll() is None  # noqa: E731
    before = await committed_results(kafka_bootstrap, prefix, len(tasks) // 4, 90, both)
    w1.send_signal(signal.SIGKILL)
    wait_for(lambda: w1.poll() is not None, 10, "the killed worker to exit")
    await committed_results(kafka_bootstrap, prefix, len(tasks), 150, lambda: w0.poll() is None)
    await asyncio.sleep(1.0)
    counts, firsts = await committed_results(kafka_bootstrap, prefix, len(tasks) + 1, 2.0)  # everything committed
    everything = await read_until(kafka_bootstrap, f"{prefix}.results", lambda r: False, 2.0)
    hops_committed = await read_until(kafka_bootstrap, second_topic(prefix), lambda r: False, 2.0,
                                      isolation_level="read_committed")
    hops_all = await read_until(kafka_bootstrap, second_topic(prefix), lambda r: False, 2.0)
    duplicates = {tid: n for tid, n in counts.items() if n > 1}
    hop_counts = Counter(decode_hop(r.value).state.id for r in hops_committed)
    print(f"\nexactly-once pipeline: SIGKILL of w1 after {len(before[0])}/{len(tasks)} committed results "
          f"({Counter(r.worker for r in before[1].values())} by then); {len(counts)} tasks with a committed result, "
          f"{sum(n - 1 for n in duplicates.values())} committed duplicates, "
          f"{len(everything) - sum(counts.values())} result records of aborted transactions; "
          f"{len(hops_committed)} committed hops for {len(hop_counts)} routed tasks, "
          f"{len(hops_all) - len(hops_committed)} hop records of aborted transactions")
    assert len(before[0]) < len(tasks), "the kill did not land mid-stream"
    assert {r.worker for r in before[1].values()} == {"w0", "w1"}  # w1 was serving when it was killed
    assert set(counts) == ids and duplicates == {}
    assert set(hop_counts) == {t.id for t in tasks if t.id[3:] in reference.routed}
    assert max(hop_counts.values()) == 1  # each hop is transactional too: one committed hop per routed task
    check_against_dry_run(firsts, reference, tasks, {"w0", "w1"}, tag="e0-")
