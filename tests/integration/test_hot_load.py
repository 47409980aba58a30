"""``ctl load`` / ``unload`` / ``reload`` with worker processes on Apache Kafka (issue 11 item 4).

- a load of a model no worker served makes every live worker serve it (both ack
  ``ok`` with the version, both answer its tasks); a worker started later
  applies it (desired state) and serves it too;
- an unload while tasks flow: every task published before the command has a
  result, none published after the last ack is served, and nothing is lost
  (a later load serves exactly the rest, no task twice);
- a reload with a broken file is acknowledged with the error, the old version
  keeps serving and the heartbeats show the old version; a reload with a good
  new file swaps it in (new hash, new outputs) while tasks flow, every one of
  them answered ``ok`` by the old or the new version.
"""

from __future__ import annotations

import asyncio
import time
import warnings

import numpy as np
import orjson
import pytest
import torch
from aiokafka import AIOKafkaProducer

from autoglm.models.repository import ModelRepository, model_version
from autoglm.streams.control import ControlClient
from autoglm.streams.events import Task, decode_result, encode_task
from tests.unit.models import repo_fixtures as rf

from .kafka_io import create_topics, read_until, results_for
from .test_control_plane import live_workers

pytestmark = pytest.mark.integration

FAST = {"status_interval_s": "1"}


def offline(net, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def sha_of(repo, name: str) -> str:
    return model_version(ModelRepository(repo).spec(name))["sha256"]


def tasks_for(model: str, n: int, tag: str, seed: int = 0) -> list[Task]:
    rng = np.random.default_rng(seed)
    return [Task(id=f"{tag}{i}", model=model, inputs=rng.random((1 + i % 2, 4), dtype=np.float32)) for i in range(n)]


async def publish(bootstrap: str, prefix: str, tasks: list[Task]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(f"{prefix}.tasks.{t.model}", encode_task(t), key=t.id.encode()) for t in tasks]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def served_ids(bootstrap: str, prefix: str, settle_s: float) -> list[str]:
    records = await read_until(bootstrap, f"{prefix}.results", lambda r: False, settle_s)
    return [orjson.loads(r.value)["id"] for r in records]


def version_is(model: str, sha: str):
    return lambda hb: (hb.get("models", {}).get(model, {}).get("version") or {}).get("sha256") == sha


async def test_load_serves_on_every_worker_a_late_worker_applies_it_and_unload_loses_no_task(
        kafka_bootstrap, prefix, workers, tmp_path):
    repo = tmp_path / "repo"
    rf.torchscript_model(repo, "tiny")
    extra = rf.torchscript_model(repo, "extra", extra="batching: {max_batch_size: 4, max_wait_s: 0.01}")
    extra_sha = sha_of(repo, "extra")
    await create_topics(kafka_bootstrap, prefix, ["tiny"])
    alive = []
    for _ in range(2):
        alive.append(workers.start(kafka_bootstrap, prefix, "tiny", model_repo=str(repo), **FAST))
    async with ControlClient(kafka_bootstrap, prefix=prefix) as client:
        before = await live_workers(client, 2)
        assert all("extra" not in hb["models"] for hb in before.values())

        # -- load: both workers ack with the version, both serve it ------------------------------
        outcome = await client.command("load", model="extra", timeout_s=90)
        assert outcome.ok and set(outcome.acks) == {"w0", "w1"}, outcome
        for ack in outcome.acks.values():
            assert ack["models"]["extra"]["sha256"] == extra_sha and ack["models"]["extra"]["device"] == "cpu"
            assert ack["state"]["models"]["extra"]["loaded"] is True
        tasks = tasks_for("extra", 60, "a")
        await publish(kafka_bootstrap, prefix, tasks)
        results, _ = await results_for(kafka_bootstrap, prefix, {t.id for t in tasks}, 60,
                                       lambda: all(p.poll() is None for p in alive))
        assert {r.worker for r in results.values()} == {"w0", "w1"}
        for t in tasks:
            r = results[t.id]
            assert r.status == "ok" and np.abs(r.outputs - offline(extra, t.inputs)).max() <= 1e-5
        # the heartbeats show the version served; the model.yaml's batching defaults were applied
        hbs = await live_workers(client, 2, predicate=version_is("extra", extra_sha))
        assert all(hb["models"]["extra"]["max_batch_size"] == 4 for hb in hbs.values())

        # -- a worker started after the load applies it ------------------------------------------
        alive.append(workers.start(kafka_bootstrap, prefix, "tiny", model_repo=str(repo), **FAST))
        hbs = await live_workers(client, 3, predicate=version_is("extra", extra_sha))
        assert set(hbs) == {"w0", "w1", "w2"}
        # it serves its share once the group has rebalanced (3 partitions, 3 members)
        deadline = time.monotonic() + 60
        workers_seen: set[str] = set()
        n = 0
        while "w2" not in workers_seen:
            assert time.monotonic() < deadline, f"w2 served no task of extra; served by {workers_seen}"
            more = tasks_for("extra", 30, f"late{n}-", seed=n)
            n += 1
            await publish(kafka_bootstrap, prefix, more)
            got, _ = await results_for(kafka_bootstrap, prefix, {t.id for t in more}, 60,
                                       lambda: all(p.poll() is None for p in alive))
            workers_seen |= {got[t.id].worker for t in more}

        # -- unload while tasks flow --------------------------------------------------------------
        sent: list[tuple[str, float, float]] = []  # (id, before send, acked), monotonic seconds
        stop = asyncio.Event()

        async def flow() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=0)
            await producer.start()
            try:
                i = 0
                while not stop.is_set():
                    t = Task(id=f"u{i}", model="extra", inputs=np.full((1, 4), i % 7, np.float32))
                    t0 = time.monotonic()
                    await producer.send_and_wait(f"{prefix}.tasks.extra", encode_task(t), key=t.id.encode())
                    sent.append((t.id, t0, time.monotonic()))
                    i += 1
                    await asyncio.sleep(0.005)
            finally:
                await producer.stop()

        flowing = asyncio.ensure_future(flow())
        await asyncio.sleep(2.0)
        command_s = time.monotonic()
        outcome = await client.command("unload", model="extra", timeout_s=90)
        acked_s = time.monotonic()
        await asyncio.sleep(1.5)
        stop.set()
        await flowing
        assert outcome.ok and set(outcome.acks) == {"w0", "w1", "w2"}, outcome
        for ack in outcome.acks.values():
            assert ack["models"]["extra"] == {"unloaded": True}
            assert ack["state"]["models"]["extra"]["loaded"] is False
        before_ids = {i for i, _, acked in sent if acked < command_s}
        after_ids = {i for i, t0, _ in sent if t0 > acked_s}
        assert len(before_ids) > 50 and len(after_ids) > 20, (len(before_ids), len(after_ids))
        served = set(await served_ids(kafka_bootstrap, prefix, settle_s=3.0))
        assert before_ids <= served, f"{len(before_ids - served)} tasks published before the unload lost"
        assert not (after_ids & served), f"{len(after_ids & served)} tasks served after the unload's ack"
        hbs = await live_workers(client, 3, predicate=lambda hb: "extra" not in hb["models"])
        assert all(not hb["state"]["models"]["extra"]["loaded"] for hb in hbs.values())

        # -- nothing lost: a new load serves exactly the rest, none twice --------------------------
        outcome = await client.command("load", model="extra", timeout_s=90)
        assert outcome.ok, outcome
        ids = {i for i, _, _ in sent}
        results, duplicates = await results_for(kafka_bootstrap, prefix, ids, 90,
                                                lambda: all(p.poll() is None for p in alive))
        assert ids <= set(results) and duplicates == 0
    assert all(p.poll() is None for p in alive), [workers.log(p) for p in alive]


def write_scaled_tiny(repo, scale: float) -> torch.nn.Module:
    """A new version of ``tiny``'s model.pt: TinyNet with its weights scaled."""
    net = rf.TinyNet().eval()
    with torch.no_grad():
        net.linear.weight.mul_(scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(net).save(str(repo / "tiny" / "model.pt"))
    return net


async def test_a_broken_reload_keeps_the_old_version_serving_and_a_good_one_swaps_it(
        kafka_bootstrap, prefix, workers, tmp_path):
    repo = tmp_path / "repo"
    old = rf.torchscript_model(repo, "tiny")
    old_sha = sha_of(repo, "tiny")
    await create_topics(kafka_bootstrap, prefix, ["tiny"])
    alive = [workers.start(kafka_bootstrap, prefix, "tiny", model_repo=str(repo), **FAST) for _ in range(2)]
    is_alive = lambda: all(p.poll() is None for p in alive)  # noqa: E731
    async with ControlClient(kafka_bootstrap, prefix=prefix) as client:
        await live_workers(client, 2, predicate=version_is("tiny", old_sha))

        good_file = (repo / "tiny" / "model.pt").read_bytes()
        (repo / "tiny" / "model.pt").write_bytes(b"this is not a TorchScript archive")
        outcome = await client.command("reload", model="tiny", timeout_s=90)
        assert not outcome.ok and set(outcome.acks) == {"w0", "w1"}, outcome
        for ack in outcome.acks.values():
            assert ack["status"] == "error" and ack["reason"].startswith("reload tiny:"), ack
            assert ack["state"]["models"]["tiny"]["loaded"] is True
        # the old version keeps serving, and the heartbeats still show it
        tasks = tasks_for("tiny", 40, "b")
        await publish(kafka_bootstrap, prefix, tasks)
        results, _ = await results_for(kafka_bootstrap, prefix, {t.id for t in tasks}, 60, is_alive)
        for t in tasks:
            assert results[t.id].status == "ok"
            assert np.abs(results[t.id].outputs - offline(old, t.inputs)).max() <= 1e-5
        hbs = await live_workers(client, 2)
        assert {hb["models"]["tiny"]["version"]["sha256"] for hb in hbs.values()} == {old_sha}

        # a good new file: the reload swaps it in on both workers
        (repo / "tiny" / "model.pt").write_bytes(good_file)
        new = write_scaled_tiny(repo, 3.0)
        new_sha = sha_of(repo, "tiny")
        assert new_sha != old_sha
        # tasks flow during the swap: every one is answered ok, by the old or the new version
        flowing: list[Task] = []
        stop = asyncio.Event()

        async def flow() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=0)
            await producer.start()
            try:
                while not stop.is_set():
                    t = tasks_for("tiny", 1, f"f{len(flowing)}-", seed=len(flowing))[0]
                    await producer.send_and_wait(f"{prefix}.tasks.tiny", encode_task(t), key=t.id.encode())
                    flowing.append(t)
                    await asyncio.sleep(0.01)
            finally:
                await producer.stop()

        flow_task = asyncio.ensure_future(flow())
        await asyncio.sleep(1.0)
        outcome = await client.command("reload", model="tiny", timeout_s=90)
        await asyncio.sleep(1.0)
        stop.set()
        await flow_task
        assert outcome.ok and set(outcome.acks) == {"w0", "w1"}, outcome
        assert {a["models"]["tiny"]["sha256"] for a in outcome.acks.values()} == {new_sha}
        results, _ = await results_for(kafka_bootstrap, prefix, {t.id for t in flowing}, 60, is_alive)
        versions = {"old": 0, "new": 0}
        for t in flowing:
            r = results[t.id]
            assert r.status == "ok", r.error
            which = "new" if np.abs(r.outputs - offline(new, t.inputs)).max() <= 1e-5 else "old"
            assert which == "new" or np.abs(r.outputs - offline(old, t.inputs)).max() <= 1e-5
            versions[which] += 1
        assert versions["old"] > 0 and versions["new"] > 0, versions
        tasks = tasks_for("tiny", 40, "c", seed=1)
        await publish(kafka_bootstrap, prefix, tasks)
        results, _ = await results_for(kafka_bootstrap, prefix, {t.id for t in tasks}, 60, is_alive)
        for t in tasks:
            assert np.abs(results[t.id].outputs - offline(new, t.inputs)).max() <= 1e-5
            assert np.abs(results[t.id].outputs - offline(old, t.inputs)).max() > 1e-3
        await live_workers(client, 2, predicate=version_is("tiny", new_sha))
    assert is_alive(), [workers.log(p) for p in alive]
