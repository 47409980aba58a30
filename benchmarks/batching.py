"""Figure A: adaptive vs fixed micro-batching on a bursty trace, through Kafka, real models.

Usage (from the repository root, with the project installed)::

    .venv/bin/python -m benchmarks.batching                 # digits and minilm, full run (~20 min)
    .venv/bin/python -m benchmarks.batching --quick         # a smoke run (~2 min)
    .venv/bin/python -m benchmarks.batching --bootstrap-servers host:9092

Without ``--bootstrap-servers`` it starts Apache Kafka with ``docker/kafka/kafka.sh``
(Java 17 + Maven), or the embedded broker with ``--embedded``.

For each model it measures the pipeline capacity T (a saturating backlog through
a worker with the fixed default 32/10 ms, a setting-neutral reference), builds a bursty open-loop Poisson trace relative to it
(quiet 10 %, burst 200 %, medium 60 %, quiet 10 %, repeated), replays the same
trace against a fresh worker per batching setting, and records per-task
end-to-end latency (task ``created_ms`` stamped at send -> result received),
throughput (over the whole trace, and while a backlog waits: the drain rate)
and per-second latency jitter (std / mean of the per-second mean
latency). Results go to ``benchmarks/results/<stamp>-batching.json`` and PNG
plots next to it; ``--update-readme`` rewrites the table in benchmarks/README.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import typer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@dataclass(frozen=True)
class BatchSetting:
    name: str
    env: dict[str, str]


def settings_for(model: str, target_s: float) -> list[BatchSetting]:
    """Adaptive with its default bounds (only the latency target set), and a grid of fixed
    size/wait settings: batch 1, small, the typical default 32/10 ms, larger, and the adaptive
    mode's own bounds (256/50 ms) used as a fixed setting."""
    fixed = [(1, 0.0), (8, 0.002), (16, 0.005), (32, 0.010), (64, 0.020), (256, 0.050)]
    out = [BatchSetting("adaptive", {"AUTOGLM_BATCHING_MODE": "adaptive", "AUTOGLM_LATENCY_TARGET_S": str(target_s)})]
    for size, wait in fixed:
        out.append(BatchSetting(f"fixed {size}/{wait * 1000:g}ms",
                                {"AUTOGLM_BATCHING_MODE": "fixed", "AUTOGLM_MAX_BATCH_SIZE": str(size),
                                 "AUTOGLM_MAX_WAIT_S": str(wait)}))
    return out


DEFAULT_FIXED = "fixed 32/10ms"
PHASES = [("quiet", 0.10), ("burst", 2.00), ("medium", 0.60), ("quiet", 0.10)]


@dataclass
class Run:
    setting: str
    sent: dict[str, float] = field(default_factory=dict)       # id -> send time (s, relative)
    phase: dict[str, str] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # id -> created -> received
    received_at: dict[str, float] = field(default_factory=dict)
    batch_size: dict[str, int] = field(default_factory=dict)


# -- processes -------------------------------------------------------------------------------


def start_kafka(port: int) -> str:
    out = subprocess.run(["bash", str(ROOT / "docker/kafka/kafka.sh"), "start", "--port", str(port)],
                         capture_output=True, text=True, check=True)
    return f"127.0.0.1:{port}"


def stop_kafka(port: int) -> None:
    subprocess.run(["bash", str(ROOT / "docker/kafka/kafka.sh"), "stop", "--port", str(port), "--wipe"], capture_output=True)


def start_worker(bootstrap: str, prefix: str, model: str, env: dict[str, str], log: Path,
                 embedded: bool) -> subprocess.Popen:
    full = {**os.environ, "AUTOGLM_BOOTSTRAP_SERVERS": bootstrap, "AUTOGLM_TOPIC_PREFIX": prefix,
            "AUTOGLM_MODELS": model, "AUTOGLM_TORCH_THREADS": "1", "AUTOGLM_LOG_LEVEL": "WARNING",
            "AUTOGLM_MAX_IN_FLIGHT": "4096", **env}
    if embedded:
        full.update({"AUTOGLM_REBALANCE_TIMEOUT_S": "6", "AUTOGLM_SESSION_TIMEOUT_S": "6",
                     "AUTOGLM_HEARTBEAT_INTERVAL_S": "1"})
    return subprocess.Popen([sys.executable, "-m", "autoglm", "worker"], env=full, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- inputs ------------------------------------------------------------------------------------


class Inputs:
    """Task inputs for one model: digits images, or sentences for minilm."""

    def __init__(self, model: str):
        self.model = model
        if model == "digits":
            from autoglm.tasks import holdout_digits

            self.x, _ = holdout_digits(360)
        else:
            words = ("stream model kafka batch latency partition offset worker result task control pause "
                     "resume adaptive throughput queue deadline priority commit broker").split()
            rng = np.random.default_rng(0)
            self.texts = [" ".join(rng.choice(words, size=int(rng.integers(8, 24)))) for _ in range(200)]

    def task(self, i: int, task_id: str):
        from autoglm.streams.events import Task, now_ms

        if self.model == "digits":
            return Task(id=task_id, model="digits", inputs=self.x[i % 360 : i % 360 + 1], created_ms=now_ms())
        return Task(id=task_id, model=self.model, inputs=[self.texts[i % len(self.texts)]], created_ms=now_ms())


def phases_with_peak(peak: float) -> list[tuple[str, float]]:
    """The trace's phases with the burst at ``peak`` times capacity (2.0: above it, the default;
    about 0.9: peaks below capacity, where the batch size the policy picks matters more than the queue)."""
    return [(name, peak if name == "burst" else level) for name, level in PHASES]


def poisson_trace(capacity_per_s: float, phase_s: float, repeats: int, seed: int = 7,
                  phases: list[tuple[str, float]] | None = None) -> list[tuple[float, str]]:
    """(send time in s, phase name) of an open-loop Poisson trace over the phases, repeated."""
    rng = np.random.default_rng(seed)
    out, t0 = [], 0.0
    for _ in range(repeats):
        for name, level in phases or PHASES:
            rate = level * capacity_per_s
            t = t0 + rng.exponential(1 / rate)
            while t < t0 + phase_s:
                out.append((t, name))
                t += rng.exponential(1 / rate)
            t0 += phase_s
    return out


# -- one run -----------------------------------------------------------------------------------


async def replay(bootstrap: str, prefix: str, inputs: Inputs, trace: list[tuple[float, str]], run: Run,
                 proc: subprocess.Popen, progress, drain_timeout_s: float) -> None:
    from aiokafka import AIOKafkaProducer

    from autoglm.streams.client import ResultReader
    from autoglm.streams.events import encode_task, now_ms

    topic = f"{prefix}.tasks.{inputs.model}"
    async with ResultReader(bootstrap, prefix=prefix, from_beginning=False) as reader:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0, max_batch_size=512 * 1024)
        await producer.start()
        try:
            # warm-up: one task through the whole path (model load, group join)
            warm = inputs.task(0, f"warm-{uuid.uuid4().hex[:6]}")
            await producer.send_and_wait(topic, encode_task(warm), key=warm.id.encode())
            deadline = time.monotonic() + 120
            while not any(r.id == warm.id for r in await reader.batches(0.2)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not warm up (exit {proc.returncode})")

            async def collect() -> None:
                # raw records, two fields read: decoding every result in full cost this process
                # (which also generates the load) a share of the cores the worker needs
                while len(run.latency_ms) < len(trace):
                    for rec in await reader.records(0.05):
                        doc = orjson.loads(rec.value)
                        rid = doc.get("id")
                        if rid in run.sent and rid not in run.latency_ms:
                            now = time.time() * 1000.0
                            run.received_at[rid] = time.monotonic() - start
                            run.latency_ms[rid] = now - created[rid]
                            run.batch_size[rid] = int(doc.get("batch_size") or 0)
                            progress.update(1)

            created: dict[str, float] = {}
            start = time.monotonic()
            collector = asyncio.ensure_future(collect())
            i = 0
            while i < len(trace):  # open loop: every task due by now goes out in one record batch
                delay = trace[i][0] - (time.monotonic() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                batch = producer.create_batch()
                now_s = time.monotonic() - start
                while i < len(trace) and trace[i][0] <= now_s:
                    tid = f"{run.setting.replace(' ', '_')}-{i}"
                    task = inputs.task(i, tid)
                    if batch.append(key=tid.encode(), value=encode_task(task), timestamp=None) is None:
                        if batch.record_count() == 0:
                            raise RuntimeError(f"task {tid} does not fit in a record batch")
                        break  # the record batch is full: send it, the rest goes in the next one
                    created[tid] = float(task.created_ms)
                    run.sent[tid], run.phase[tid] = now_s, trace[i][1]
                    i += 1
                await producer.send_batch(batch, topic, partition=0)
            try:
                await asyncio.wait_for(collector, drain_timeout_s)
            except asyncio.TimeoutError:
                pass
        finally:
            await producer.stop()


def drain_throughput(sent_s: list[float], received_s: list[float], backlog_tasks: float,
                     bin_s: float = 0.25) -> float | None:
    """Results per second over the ``bin_s`` bins that start with at least ``backlog_tasks`` tasks
    sent and not yet answered: the worker's service rate while it has work waiting (its capacity
    under the trace), unlike the whole-trace rate, which the offered load sets.

    None when no bin had such a backlog."""
    if not received_s:
        return None
    sent, recv = np.sort(np.asarray(sent_s)), np.sort(np.asarray(received_s))
    edges = np.arange(0.0, recv[-1] + bin_s, bin_s)
    outstanding = np.searchsorted(sent, edges, side="right") - np.searchsorted(recv, edges, side="right")
    served = np.diff(np.searchsorted(recv, edges, side="right"), append=len(recv))
    busy = outstanding >= backlog_tasks
    return float(served[busy].sum() / (busy.sum() * bin_s)) if busy.any() else None


def summarize(run: Run, trace_len: int, backlog_tasks: float = 200.0) -> dict[str, Any]:
    ids = [i for i in run.sent if i in run.latency_ms]
    lat = np.array([run.latency_ms[i] for i in ids])
    recv = np.array([run.received_at[i] for i in ids])
    first_send = min(run.sent.values())
    span = max(recv.max() - first_send, 1e-9) if len(recv) else 1e-9
    per_sec: dict[int, list[float]] = {}
    for i in ids:
        per_sec.setdefault(int(run.received_at[i]), []).append(run.latency_ms[i])
    means = np.array([np.mean(v) for v in per_sec.values()])
    out: dict[str, Any] = {
        "tasks": trace_len,
        "completed": len(ids),
        "mean_ms": float(lat.mean()) if len(lat) else None,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "throughput_per_s": len(ids) / span,
        "drain_per_s": drain_throughput(list(run.sent.values()), [run.received_at[i] for i in ids], backlog_tasks),
        "jitter": float(means.std() / means.mean()) if len(means) > 1 else None,
        "mean_batch_size": float(np.mean([run.batch_size[i] for i in ids])) if ids else None,
        "phases": {},
    }
    for phase in dict.fromkeys(p for p, _ in PHASES):
        pid = [i for i in ids if run.phase[i] == phase]
        if not pid:
            continue
        pl = np.array([run.latency_ms[i] for i in pid])
        sends = [run.sent[i] for i in run.sent if run.phase[i] == phase]
        out["phases"][phase] = {"tasks": len(sends), "completed": len(pid), "mean_ms": float(pl.mean()),
                                "p99_ms": float(np.percentile(pl, 99))}
    out["timeline"] = binned_timeline([run.received_at[i] for i in ids], [run.latency_ms[i] for i in ids],
                                      [run.batch_size[i] for i in ids])
    return out


def median_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over rounds of every figure (and of each phase's), with ``spread`` = (min, max).

    The timeline (for the plots) is the one of the round whose mean latency is the median.
    """
    keys = ("mean_ms", "p50_ms", "p99_ms", "throughput_per_s", "drain_per_s", "jitter", "mean_batch_size")

    def med(values: list[Any]) -> float | None:
        vals = [v for v in values if v is not None]
        return float(np.median(vals)) if vals else None

    out: dict[str, Any] = {k: med([s[k] for s in summaries]) for k in keys}
    out["tasks"] = summaries[0]["tasks"]
    out["completed"] = int(min(s["completed"] for s in summaries))
    out["rounds"] = len(summaries)
    out["spread"] = {k: [min(s[k] for s in summaries if s[k] is not None),
                         max(s[k] for s in summaries if s[k] is not None)]
                     for k in keys if any(s[k] is not None for s in summaries)}
    out["phases"] = {}
    for phase in summaries[0]["phases"]:
        ph = [s["phases"][phase] for s in summaries if phase in s["phases"]]
        out["phases"][phase] = {"tasks": ph[0]["tasks"], "completed": int(min(p["completed"] for p in ph)),
                                "mean_ms": med([p["mean_ms"] for p in ph]), "p99_ms": med([p["p99_ms"] for p in ph]),
                                "spread_mean_ms": [min(p["mean_ms"] for p in ph), max(p["mean_ms"] for p in ph)]}
    order = sorted(range(len(summaries)), key=lambda i: summaries[i]["mean_ms"] or 0.0)
    out["timeline"] = summaries[order[len(order) // 2]]["timeline"]
    out["per_round"] = [{k: s[k] for k in keys} for s in summaries]
    return out


def binned_timeline(t_s: list[float], latency_ms: list[float], batch_size: list[int],
                    bin_s: float = 0.25) -> dict[str, list[float]]:
    """Per ``bin_s`` of receipt time: mean latency, max latency, mean batch size, results."""
    t = np.asarray(t_s)
    if not len(t):
        return {"t_s": [], "latency_ms": [], "latency_max_ms": [], "batch_size": [], "results": []}
    lat, bs = np.asarray(latency_ms), np.asarray(batch_size)
    idx = (t // bin_s).astype(int)
    keys = np.unique(idx)
    return {
        "t_s": [round(float(k * bin_s + bin_s / 2), 3) for k in keys],
        "latency_ms": [round(float(lat[idx == k].mean()), 2) for k in keys],
        "latency_max_ms": [round(float(lat[idx == k].max()), 2) for k in keys],
        "batch_size": [round(float(bs[idx == k].mean()), 2) for k in keys],
        "results": [int((idx == k).sum()) for k in keys],
    }


async def measure_capacity(bootstrap: str, prefix: str, inputs: Inputs, n: int, proc) -> float:
    """Tasks/s of an adaptive worker draining a backlog of ``n`` tasks (after warm-up)."""
    from aiokafka import AIOKafkaProducer

    from autoglm.streams.client import ResultReader
    from autoglm.streams.events import encode_task

    topic = f"{prefix}.tasks.{inputs.model}"
    async with ResultReader(bootstrap, prefix=prefix, from_beginning=False) as reader:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5)
        await producer.start()
        try:
            warm = inputs.task(0, "cap-warm")
            await producer.send_and_wait(topic, encode_task(warm), key=b"cap-warm")
            deadline = time.monotonic() + 120
            while not any(r.id == "cap-warm" for r in await reader.batches(0.2)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("capacity worker did not warm up")
            payloads = [encode_task(inputs.task(i, f"cap-{i}")) for i in range(n)]
            start = time.monotonic()
            futures = [await producer.send(topic, v, key=f"cap-{i}".encode()) for i, v in enumerate(payloads)]
            await asyncio.gather(*futures)
            seen: set[str] = set()
            last = start
            while len(seen) < n and time.monotonic() < deadline + 300:
                for r in await reader.batches(0.1):
                    if r.id.startswith("cap-") and r.id != "cap-warm":
                        last = time.monotonic()
                        seen.add(r.id)
        finally:
            await producer.stop()
    # completed tasks over the time from the start of the backlog's publication to the last result
    return len(seen) / max(last - start, 1e-3)


def offline_limit(model: str, inputs: Inputs) -> dict[str, float]:
    """Figure L: the model alone, in-process, at batch sizes 1..64 (items/s)."""
    import torch

    from autoglm.models import ModelRunner, default_registry

    torch.set_num_threads(1)
    runner = ModelRunner(default_registry().create(model), device=None, torch_threads=1)
    runner.start_sync()
    out = {}
    try:
        for size in (1, 8, 32, 64):
            items = [runner.model.prepare(inputs.task(i, "x").inputs) for i in range(size)]
            runner.run_sync(items)
            reps = max(3, int(200 / size))
            t = time.perf_counter()
            for _ in range(reps):
                runner.run_sync(items)
            out[str(size)] = size * reps / (time.perf_counter() - t)
    finally:
        runner.close()
    return out


# -- main --------------------------------------------------------------------------------------


@app.command()
def main(
    models: str = typer.Option("digits,minilm", help="models to benchmark"),
    quick: bool = typer.Option(False, help="smoke run: short phases, fewer settings"),
    phase_s: float = typer.Option(5.0, help="seconds per trace phase"),
    repeats: int = typer.Option(2, help="repetitions of the phase cycle"),
    rounds: int = typer.Option(3, help="replays of the trace per setting, interleaved across settings; "
                                        "figures are the median over rounds, with min-max spread"),
    bootstrap_servers: str = typer.Option(None, help="use this Kafka instead of starting one"),
    embedded: bool = typer.Option(False, help="use the embedded broker instead of Apache Kafka"),
    update_readme: bool = typer.Option(False, help="rewrite the table in benchmarks/README.md"),
    peak: float = typer.Option(2.0, help="the burst phase's load, times capacity (0.9: peaks below capacity)"),
    only: str = typer.Option("", help="comma-separated setting names to run (default: all), e.g. "
                                      "'adaptive,fixed 32/10ms,fixed 256/50ms'"),
) -> None:
    """Run figure A (and L, T) and write JSON + PNG into benchmarks/results/."""
    from rich.console import Console
    from rich.progress import Progress

    from autoglm.streams.embedded import EmbeddedBroker, free_port
    from autoglm.streams.topics import TopicNames, ensure_topics

    console = Console(stderr=True)
    if quick:
        phase_s, repeats, rounds = 2.0, 1, 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    broker_ctx = None
    kafka_port = None
    if bootstrap_servers:
        bootstrap, broker_name = bootstrap_servers, "given"
    elif embedded:
        broker_ctx = EmbeddedBroker().start()
        bootstrap, broker_name = broker_ctx.bootstrap_servers, "embedded (Tansu)"
    else:
        kafka_port = free_port()
        console.print("starting Apache Kafka ...")
        bootstrap, broker_name = start_kafka(kafka_port), "Apache Kafka 4.1.1 (KRaft, single node)"
    report: dict[str, Any] = {"stamp": stamp, "machine": machine(), "broker": broker_name, "models": {},
                              "phases": phases_with_peak(peak)}
    try:
        for model in models.split(","):
            inputs = Inputs(model)
            target_s = 0.1 if model == "digits" else 0.5
            settings = settings_for(model, target_s)
            if quick:
                settings = [s for s in settings if s.name in ("adaptive", "fixed 1/0ms", DEFAULT_FIXED)]
            if only:
                settings = [s for s in settings if s.name in {n.strip() for n in only.split(",")}]
            console.print(f"[bold]{model}[/]: offline limit (figure L) ...")
            limit = offline_limit(model, inputs)
            # the trace's reference capacity T: the fixed default's, a setting-neutral reference
            # (the mean of two backlog drains, each a fresh worker)
            reference = next(s for s in settings if s.name == DEFAULT_FIXED)
            n_cap = 300 if quick else (6000 if model == "digits" else 600)
            console.print(f"[bold]{model}[/]: pipeline capacity (figure T, {DEFAULT_FIXED}) with {n_cap} tasks ...")
            capacities = []
            for _ in range(1 if quick else 2):
                prefix = f"bench-{uuid.uuid4().hex[:6]}"
                asyncio.run(ensure_topics(bootstrap, TopicNames(prefix), [model], partitions=1))
                log = RESULTS / f"{stamp}-{model}-capacity.log"
                proc = start_worker(bootstrap, prefix, model, reference.env, log, embedded)
                try:
                    capacities.append(asyncio.run(measure_capacity(bootstrap, prefix, inputs, n_cap, proc)))
                finally:
                    stop_worker(proc)
                    log.unlink(missing_ok=True)
            capacity = float(np.mean(capacities))
            trace = poisson_trace(capacity, phase_s, repeats, phases=phases_with_peak(peak))
            console.print(f"[bold]{model}[/]: capacity {capacity:.0f}/s; trace of {len(trace)} tasks over "
                          f"{phase_s * len(PHASES) * repeats:.0f} s")
            per_round: dict[str, list[dict[str, Any]]] = {s.name: [] for s in settings}
            for round_ in range(rounds):
                # interleaved: each round runs every setting once, in a rotated order, so that slow
                # drifts of the machine (other load, thermal) spread over all settings alike
                order = settings[round_ % len(settings):] + settings[:round_ % len(settings)]
                for setting in order:
                    prefix = f"bench-{uuid.uuid4().hex[:6]}"
                    asyncio.run(ensure_topics(bootstrap, TopicNames(prefix), [model], partitions=1))
                    log = RESULTS / f"{stamp}-{model}-worker.log"
                    proc = start_worker(bootstrap, prefix, model, setting.env, log, embedded)
                    run = Run(setting.name)
                    try:
                        with Progress(console=console, transient=True) as progress:
                            bar = progress.add_task(f"{model} {setting.name} (round {round_ + 1}/{rounds})",
                                                    total=len(trace))
                            asyncio.run(replay(bootstrap, prefix, inputs, trace, run, proc,
                                               _Bar(progress, bar), drain_timeout_s=60))
                    finally:
                        stop_worker(proc)
                    # "a backlog": a quarter second of work at T waiting (at least 10 tasks)
                    per_round[setting.name].append(summarize(run, len(trace), max(10.0, 0.25 * capacity)))
                    s = per_round[setting.name][-1]
                    console.print(f"  r{round_ + 1} {setting.name:>16}: mean {s['mean_ms']:.1f} ms  "
                                  f"p99 {s['p99_ms']:.1f} ms  {s['throughput_per_s']:.0f}/s  "
                                  f"drain {s['drain_per_s'] or 0:.0f}/s  "
                                  f"jitter {s['jitter']:.2f}  batch {s['mean_batch_size']:.1f}  "
                                  f"({s['completed']}/{s['tasks']})")
            runs = {name: median_summary(summaries) for name, summaries in per_round.items()}
            log.unlink(missing_ok=True)
            report["models"][model] = {"latency_target_s": target_s, "offline_limit_per_s": limit,
                                       "capacity_per_s": capacity, "capacity_runs_per_s": capacities,
                                       "capacity_setting": DEFAULT_FIXED, "trace_tasks": len(trace),
                                       "phase_s": phase_s, "repeats": repeats, "rounds": rounds, "runs": runs,
                                       "verdict": verdict(runs)}
    finally:
        if broker_ctx:
            broker_ctx.stop()
        if kafka_port:
            stop_kafka(kafka_port)
    out = RESULTS / f"{stamp}-batching.json"
    out.write_text(json.dumps(report, indent=1))
    from benchmarks.report import plot, table

    for model in report["models"]:
        plot(report, model, RESULTS / f"{stamp}-{model}-trace.png")
    console.print(table(report))
    console.print(f"wrote {out}")
    if update_readme:
        from benchmarks.report import update_readme as rewrite

        rewrite(report, stamp)


class _Bar:
    def __init__(self, progress, bar):
        self.progress, self.bar = progress, bar

    def update(self, n: int) -> None:
        self.progress.advance(self.bar, n)


def verdict(runs: dict[str, Any]) -> dict[str, Any]:
    """Adaptive against the fixed default, every single fixed setting, and the best fixed per level."""
    a = runs["adaptive"]
    out: dict[str, Any] = {}
    if DEFAULT_FIXED in runs:
        d = runs[DEFAULT_FIXED]
        out["vs_default"] = {
            "mean_latency_change": a["mean_ms"] / d["mean_ms"] - 1,
            "p99_change": a["p99_ms"] / d["p99_ms"] - 1,
            "throughput_change": a["throughput_per_s"] / d["throughput_per_s"] - 1,
            "drain_throughput_change": (a["drain_per_s"] / d["drain_per_s"] - 1)
            if a.get("drain_per_s") and d.get("drain_per_s") else None,
            "jitter_ratio": (d["jitter"] / a["jitter"]) if a["jitter"] else None,
        }
    fixed = {k: v for k, v in runs.items() if k != "adaptive"}
    out["beats_every_fixed"] = {
        k: {"mean": bool(a["mean_ms"] <= v["mean_ms"]), "p99": bool(a["p99_ms"] <= v["p99_ms"]),
            "throughput": bool(a["throughput_per_s"] >= 0.99 * v["throughput_per_s"]),
            "drain_throughput": bool((a.get("drain_per_s") or 0) >= (v.get("drain_per_s") or 0))}
        for k, v in fixed.items()
    }
    per_level = {}
    for phase in a["phases"]:
        best_name, best = min(((k, v["phases"][phase]) for k, v in fixed.items() if phase in v["phases"]),
                              key=lambda kv: kv[1]["mean_ms"])
        per_level[phase] = {"best_fixed": best_name, "best_mean_ms": best["mean_ms"],
                            "adaptive_mean_ms": a["phases"][phase]["mean_ms"],
                            "within_10pct": bool(a["phases"][phase]["mean_ms"] <= 1.10 * best["mean_ms"])}
    out["per_level"] = per_level
    return out


def machine() -> dict[str, Any]:
    import aiokafka
    import faust
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads_worker": 1,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "aiokafka": aiokafka.__version__, "faust": faust.__version__}


if __name__ == "__main__":
    app()
