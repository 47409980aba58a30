"""``autoglm demo``: the whole loop on one machine with real data and a real model.

Starts the embedded broker (unless bootstrap servers are configured, then a
fresh topic prefix is used there), starts ``autoglm worker`` as a child
process, publishes N images of the held-out digits split, collects every
result, checks each prediction against its label and prints a summary.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from autoglm.config import Settings
from autoglm.errors import AutoGLMError
from autoglm.streams.codec import dumps
from autoglm.worker import broker_for, prepare_topics


def run_demo(settings: Settings, *, tasks: int, timeout_s: float, as_json: bool) -> dict[str, Any]:
    """Run the demo; returns (and prints) the summary.

    Summary keys: ``tasks``, ``results`` (distinct task ids answered),
    ``dlq`` (dead-letter records), ``accuracy`` (correct / tasks),
    ``p50_ms``/``p99_ms`` (end-to-end latency from ``created_ms`` to the
    result's receipt by the demo), ``mean_batch_size`` (mean over tasks of the
    size of the micro-batch that served them), ``throughput_per_s`` (results
    per second from the first publish to the last result), ``duplicates``.

    Raises:
        AutoGLMError: the broker or the worker could not be started.
    """
    if not settings.embedded:
        settings = settings.model_copy(update={"topic_prefix": f"autoglm-demo-{uuid.uuid4().hex[:8]}"})
    settings = settings.model_copy(update={"models": ("digits",)})
    with broker_for(settings) as live:
        prepare_topics(live)
        log_path = Path(tempfile.gettempdir()) / f"autoglm-demo-worker-{os.getpid()}.log"
        proc = _start_worker(live, log_path)
        try:
            summary = asyncio.run(_publish_and_collect(live, tasks, timeout_s, proc, as_json))
        finally:
            _stop_worker(proc)
        summary["worker_log"] = str(log_path)
    _print(summary, as_json)
    return summary


def _start_worker(settings: Settings, log_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "AUTOGLM_BOOTSTRAP_SERVERS": settings.bootstrap_servers or "",
        "AUTOGLM_TOPIC_PREFIX": settings.topic_prefix,
        "AUTOGLM_MODELS": "digits",
        "AUTOGLM_REBALANCE_TIMEOUT_S": str(settings.rebalance_timeout_s),
        "AUTOGLM_SESSION_TIMEOUT_S": str(settings.session_timeout_s),
        "AUTOGLM_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
        "AUTOGLM_WORKER_ID": f"demo-worker-{os.getpid()}",
    }
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "autoglm", "worker"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _publish_and_collect(settings: Settings, n: int, timeout_s: float, proc: subprocess.Popen,
                               quiet: bool) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from autoglm.streams.client import Publisher, ResultReader
    from autoglm.tasks import digit_tasks

    run_id = uuid.uuid4().hex[:8]
    servers = settings.bootstrap_list
    received: dict[str, Any] = {}
    latencies_ms: list[float] = []
    duplicates = 0
    console = Console(stderr=True, quiet=quiet)
    from autoglm.streams.security import client_kwargs

    kafka_kwargs = client_kwargs(settings)
    async with ResultReader(servers, prefix=settings.topic_prefix, from_beginning=False, **kafka_kwargs) as reader:
        async with Publisher(servers, prefix=settings.topic_prefix, **kafka_kwargs) as pub:
            startup_s = await _warm_up(pub, reader, run_id, proc, timeout_s, console)
            tasks = digit_tasks(n, run_id)  # stamped created_ms now, after the warm-up
            labels = {t.id: int(t.attributes["label"]) for t in tasks}
            created_ms = {t.id: t.created_ms or 0 for t in tasks}
            start = time.monotonic()
            await pub.publish_many(tasks)
        deadline = start + timeout_s
        last_result = start
        with Progress(TextColumn("results"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            bar = progress.add_task("results", total=n)
            while len(received) < n and time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise AutoGLMError(f"the worker exited with code {proc.returncode}; see its log")
                for r in await reader.batches(0.2):
                    if r.id not in labels:
                        continue
                    if r.id in received:
                        duplicates += 1
                        continue
                    received[r.id] = r
                    latencies_ms.append(time.time() * 1000.0 - created_ms[r.id])
                    last_result = time.monotonic()
                    progress.advance(bar)
    dlq = await _count_records(servers, f"{settings.topic_prefix}.dlq", kafka_kwargs)
    correct = sum(
        1 for tid, r in received.items()
        if r.status == "ok" and r.outputs is not None and int(np.argmax(r.outputs[0])) == labels[tid]
    )
    elapsed = max(last_result - start, 1e-9)
    return {
        "tasks": n,
        "results": len(received),
        "dlq": dlq,
        "accuracy": round(correct / n, 4),
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 2) if latencies_ms else None,
        "p99_ms": round(float(np.percentile(latencies_ms, 99)), 2) if latencies_ms else None,
        "mean_batch_size": round(float(np.mean([r.batch_size for r in received.values()])), 2) if received else 0.0,
        "throughput_per_s": round(len(received) / elapsed, 1),
        "duplicates": duplicates,
        "startup_s": round(startup_s, 2),
        "worker_p50_ms": _pct([r.end_to_end_ms for r in received.values()], 50),
        "worker_p99_ms": _pct([r.end_to_end_ms for r in received.values()], 99),
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


async def _warm_up(pub, reader, run_id: str, proc: subprocess.Popen, timeout_s: float, console) -> float:
    """Publish one warm-up task and wait for its result: the worker has joined its group and
    loaded its model, so the measured run sees a warm pipeline. Returns the seconds it took."""
    from autoglm.tasks import digit_tasks

    warm = digit_tasks(1, f"{run_id}-warmup")[0]
    begin = time.monotonic()
    await pub.publish(warm)
    with console.status("waiting for the worker (model load, group join)"):
        while time.monotonic() - begin < timeout_s:
            if proc.poll() is not None:
                raise AutoGLMError(f"the worker exited with code {proc.returncode}; see its log")
            if any(r.id == warm.id for r in await reader.batches(0.2)):
                return time.monotonic() - begin
    raise AutoGLMError(f"the worker did not answer a warm-up task within {timeout_s} s")


async def _count_records(servers: list[str], topic: str, kafka_kwargs: dict | None = None) -> int:
    """Records in ``topic`` (sum over partitions of end - beginning offsets)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from autoglm.streams.topics import partitions_of

    tps = [TopicPartition(topic, p) for p in await partitions_of(servers, topic, client_kwargs=kafka_kwargs)]
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, group_id=None, **(kafka_kwargs or {}))
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        return int(sum(ends[tp] - begins[tp] for tp in tps))
    finally:
        await consumer.stop()


def _print(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        keys = ("tasks", "results", "dlq", "accuracy", "p50_ms", "p99_ms", "mean_batch_size", "throughput_per_s")
        print(dumps({k: summary[k] for k in keys} | {"duplicates": summary["duplicates"]}).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="autoglm demo: digits through Kafka")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, str(value))
    Console().print(table)
