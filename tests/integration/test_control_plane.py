"""The control plane against a real Apache Kafka broker with several worker processes.

Each test starts its workers with ``status_interval_s=1`` so that they count
as live within a second of being ready, and talks to them through
:class:`~autoglm.streams.control.ControlClient`, the library ``autoglm ctl`` uses.
"""

from __future__ import annotations

import asyncio
import signal
import time

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from autoglm.streams.control import ControlClient, sign_control
from autoglm.streams.events import ControlEvent, Task, encode_task, now_ms
from autoglm.tasks import holdout_digits

from .conftest import wait_for
from .kafka_io import create_topics, produce, read_until, results_for

pytestmark = pytest.mark.integration

FAST = {"status_interval_s": "1"}
KEY = "integration-test-control-key"


async def live_workers(client: ControlClient, n: int, timeout_s: float = 90.0,
                       predicate=lambda hb: True) -> dict[str, dict]:
    """Wait until ``n`` live workers are ready and their latest heartbeat satisfies ``predicate``."""
    deadline = time.monotonic() + timeout_s
    live: dict[str, dict] = {}
    while time.monotonic() < deadline:
        live = {w: hb for w, hb in (await client.live_workers()).items()
                if hb.get("state", {}).get("ready") and predicate(hb)}
        if len(live) >= n:
            return live
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {n} live workers; have {sorted(live)}")


def digit_tasks(prefix: str, n: int, tag: str) -> tuple[list[Task], list[tuple[str, bytes, bytes]]]:
    x, _ = holdout_digits(n)
    tasks = [Task(id=f"{tag}{i}", model="digits", inputs=x[i : i + 1]) for i in range(n)]
    return tasks, [(f"{prefix}.tasks.digits", t.id.encode(), encode_task(t)) for t in tasks]


async def result_ids(bootstrap: str, prefix: str, settle_s: float) -> set[str]:
    """Ids of every result on the results topic after reading it for ``settle_s``."""
    records = await read_until(bootstrap, f"{prefix}.results", lambda r: False, settle_s)
    return {orjson.loads(r.value)["id"] for r in records}


async def committed_total(bootstrap: str, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return sum(meta.offset for meta in offsets.values() if meta.offset > 0)
    finally:
        await admin.close()


def paused(hb: dict) -> bool:
    return not hb["state"]["models"]["digits"]["fetching"]


async def test_pause_holds_every_worker_through_rebalances_and_late_starts_then_resume_serves_all(
        kafka_bootstrap, prefix, workers):
    await create_topics(kafka_bootstrap, prefix, partitions=4)
    w0 = workers.start(kafka_bootstrap, prefix, **FAST)
    w1 = workers.start(kafka_bootstrap, prefix, **FAST)
    async with ControlClient(kafka_bootstrap, prefix=prefix) as client:
        await live_workers(client, 2)
        outcome = await client.command("pause", wait=True, timeout_s=20)
        assert outcome.ok, outcome
        assert outcome.expected == {"w0", "w1"} == set(outcome.acks)
        assert all(not a["state"]["models"]["digits"]["fetching"] for a in outcome.acks.values())

        # a worker started after the pause rebuilds it from the control topic; its join rebalances w0, w1
        w2 = workers.start(kafka_bootstrap, prefix, **FAST)
        await live_workers(client, 3, predicate=paused)
        tasks, records = digit_tasks(prefix, 300, "p")
        await produce(kafka_bootstrap, records)
        # another rebalance while paused: one worker leaves
        w1.send_signal(signal.SIGTERM)
        wait_for(lambda: w1.poll() is not None, 30, "w1 to stop")
        # the backlog is assigned and visible as lag, and nobody serves it
        lagging = await live_workers(client, 2, timeout_s=60,
                                     predicate=lambda hb: paused(hb) and hb["models"]["digits"].get("lag"))
        assert set(lagging) == {"w0", "w2"}
        assert await result_ids(kafka_bootstrap, prefix, settle_s=3.0) == set()

        outcome = await client.command("resume", wait=True, timeout_s=20)
        assert outcome.ok and set(outcome.acks) == {"w0", "w2"}, outcome
        results, _ = await results_for(kafka_bootstrap, prefix, {t.id for t in tasks}, 90,
                                       lambda: w0.poll() is None and w2.poll() is None)
    assert {t.id for t in tasks} <= set(results)
    assert all(r.status == "ok" for r in results.values())
    assert {r.worker for r in results.values()} <= {"w0", "w2"}


async def test_drain_finishes_and_commits_everything_in_flight(kafka_bootstrap, prefix, workers):
    await create_topics(kafka_bootstrap, prefix, partitions=2)
    tasks, records = digit_tasks(prefix, 3000, "d")
    await produce(kafka_bootstrap, records)
    # small batches so that the drain lands mid-stream
    w0 = workers.start(kafka_bootstrap, prefix, max_batch_size="4", max_wait_s="0", **FAST)
    async with ControlClient(kafka_bootstrap, prefix=prefix) as client:
        await live_workers(client, 1)
        await read_until(kafka_bootstrap, f"{prefix}.results", lambda r: len(r) >= 200, 60, lambda: w0.poll() is None)
        outcome = await client.command("drain", wait=True, timeout_s=60)
        assert outcome.ok, outcome
        ack = outcome.acks["w0"]
        assert ack["drain"]["in_flight"] == 0 and ack["state"]["drained"] is True

        served = await result_ids(kafka_bootstrap, prefix, settle_s=1.0)
        assert 200 <= len(served) < len(tasks), "the drain did not land mid-stream"
        # drained: nothing more is served, and every served task is committed (one partition offset per task)
        assert await result_ids(kafka_bootstrap, prefix, settle_s=2.0) == served
        assert await committed_total(kafka_bootstrap, f"{prefix}-workers") == len(served)

        outcome = await client.command("resume", wait=True, timeout_s=20)
        assert outcome.ok
        results, duplicates = await results_for(kafka_bootstrap, prefix, {t.id for t in tasks}, 120,
                                                lambda: w0.poll() is None)
    assert len(results) == len(tasks) and duplicates == 0


async def test_a_worker_paused_for_twice_max_poll_interval_stays_in_its_group(kafka_bootstrap, prefix, workers):
    await create_topics(kafka_bootstrap, prefix, partitions=2)
    w0 = workers.start(kafka_bootstrap, prefix, max_poll_interval_s="4", **FAST)
    async with ControlClient(kafka_bootstrap, prefix=prefix) as client:
        await live_workers(client, 1, predicate=lambda hb: hb["models"]["digits"].get("lag") is not None)
        assert (await client.command("pause", wait=True, timeout_s=20)).ok
        tasks, records = digit_tasks(prefix, 100, "l")
        await produce(kafka_bootstrap, records)
        await asyncio.sleep(10.0)  # 2.5 x max.poll.interval.ms
        assert w0.poll() is None
        assert await result_ids(kafka_bootstrap, prefix, settle_s=1.0) == set()
        assert (await client.command("resume", wait=True, timeout_s=20)).ok
        results, duplicates = await results_for(kafka_bootstrap, prefix, {t.id for t in tasks}, 60,
                                                lambda: w0.poll() is None)
    assert len(results) == 100 and duplicates == 0
    log = workers.log(w0)
    # a member that left its group (poll interval exceeded) is assigned partitions again when it rejoins
    assert log.count("Setting newly assigned partitions") == 1, log


async def test_forged_or_replayed_control_events_change_nothing(kafka_bootstrap, prefix, workers):
    await create_topics(kafka_bootstrap, prefix, partitions=2)
    w0 = workers.start(kafka_bootstrap, prefix, control_key=KEY, **FAST)
    w1 = workers.start(kafka_bootstrap, prefix, control_key=KEY, **FAST)
    control = f"{prefix}.control"
    async with ControlClient(kafka_bootstrap, prefix=prefix, key=KEY.encode()) as client:
        await live_workers(client, 2)
        unsigned = ControlEvent(id="forged-1", command="pause", issued_ms=now_ms())
        wrong = ControlEvent(id="forged-2", command="pause", issued_ms=now_ms())
        await produce(kafka_bootstrap, [(control, b"run/*/*", sign_control(unsigned, None)),
                                        (control, b"run/*/*", sign_control(wrong, b"not-the-key-but-long-enough"))])
        acks = await read_until(kafka_bootstrap, f"{prefix}.status",
                                lambda r: sum(b'"kind":"ack"' in x.value for x in r) >= 4, 30)
        rejected = [orjson.loads(r.value) for r in acks if b'"kind":"ack"' in r.value]
        assert {(a["worker"], a["event_id"], a["status"]) for a in rejected} == {
            (w, e, "rejected") for w in ("w0", "w1") for e in ("forged-1", "forged-2")}
        assert all("signature" in a["reason"] or "signed" in a["reason"] for a in rejected)

        tasks, records = digit_tasks(prefix, 50, "f")
        await produce(kafka_bootstrap, records)
        results, _ = await results_for(kafka_bootstrap, prefix, {t.id for t in tasks}, 60)
        assert {t.id for t in tasks} <= set(results), "a forged pause stopped the workers"

        # a genuine pause, a resume, then the pause's exact bytes published again: ignored
        pause = ControlEvent(id="genuine-pause", command="pause", issued_ms=now_ms())
        pause_bytes = sign_control(pause, KEY.encode())
        await produce(kafka_bootstrap, [(control, b"run/*/*", pause_bytes)])
        await live_workers(client, 2, predicate=paused)
        assert (await client.command("resume", wait=True, timeout_s=20)).ok
        await produce(kafka_bootstrap, [(control, b"run/*/*", pause_bytes)])
        await asyncio.sleep(2.0)
        more, more_records = digit_tasks(prefix, 50, "g")
        await produce(kafka_bootstrap, more_records)
        results, _ = await results_for(kafka_bootstrap, prefix, {t.id for t in more}, 60,
                                       lambda: w0.poll() is None and w1.poll() is None)
    assert {t.id for t in more} <= set(results), "a replayed pause stopped the workers"
    status = await read_until(kafka_bootstrap, f"{prefix}.status", lambda r: False, 2.0)
    replay_acks = [orjson.loads(r.value) for r in status if b'"kind":"ack"' in r.value
                   and orjson.loads(r.value).get("event_id") == "genuine-pause"]
    assert sorted(a["status"] for a in replay_acks) == ["ignored", "ignored", "ok", "ok"]


async def test_configure_retunes_every_worker_and_bad_values_are_rejected(kafka_bootstrap, prefix, workers):
    await create_topics(kafka_bootstrap, prefix, partitions=2)
    workers.start(kafka_bootstrap, prefix, **FAST)
    workers.start(kafka_bootstrap, prefix, **FAST)
    async with ControlClient(kafka_bootstrap, prefix=prefix) as client:
        await live_workers(client, 2)
        outcome = await client.command("configure", model="digits", params={"max_batch_size": 3},
                                       wait=True, timeout_s=20)
        assert outcome.ok and set(outcome.acks) == {"w0", "w1"}
        assert all(a["state"]["models"]["digits"]["params"] == {"max_batch_size": 3} for a in outcome.acks.values())
        tasks, records = digit_tasks(prefix, 300, "c")
        await produce(kafka_bootstrap, records)
        results, _ = await results_for(kafka_bootstrap, prefix, {t.id for t in tasks}, 60)
        assert max(r.batch_size for r in results.values()) == 3
        with pytest.raises(ValueError, match="latency_target_s"):  # the client refuses to publish it
            await client.command("configure", params={"latency_target_s": -1.0}, wait=True, timeout_s=20)
        # published by another client anyway: every worker rejects it and keeps its setting
        bad = ControlEvent(id="bad-configure", command="configure", params={"latency_target_s": -1.0},
                           issued_ms=now_ms())
        await produce(kafka_bootstrap, [(f"{prefix}.control", b"configure/*/*/latency_target_s",
                                         sign_control(bad, None))])
        acks = await read_until(kafka_bootstrap, f"{prefix}.status",
                                lambda r: sum(b'"bad-configure"' in x.value for x in r) >= 2, 30)
        rejected = [orjson.loads(r.value) for r in acks if b'"bad-configure"' in r.value]
        assert {(a["worker"], a["status"]) for a in rejected} == {("w0", "rejected"), ("w1", "rejected")}
        assert all("latency_target_s" in a["reason"] for a in rejected)
        report = await client.command("status", wait=True, timeout_s=20)
        assert report.ok and all(a["report"]["models"]["digits"]["max_batch_size"] == 3
                                 for a in report.acks.values())
