"""Figure C: control latency, pause/resume issued -> every worker acknowledged, under load.

Usage (from the repository root, with the project installed)::

    .venv/bin/python -m benchmarks.control                      # Apache Kafka, then the embedded broker
    .venv/bin/python -m benchmarks.control --quick              # a smoke run (8 cycles per broker)
    .venv/bin/python -m benchmarks.control --bootstrap host:9092 --brokers kafka
    .venv/bin/python -m benchmarks.control --embedded           # the embedded broker only

Without ``--bootstrap`` it starts Apache Kafka with ``docker/kafka/kafka.sh``
(Java 17 + Maven) on free ports. Per broker: three ``autoglm worker``
processes (digits, heartbeats every second) serve a steady open-loop load of
digit tasks (``--rate`` tasks/s) while :class:`~autoglm.streams.control.ControlClient`
(what ``autoglm ctl --wait`` uses) issues ``--cycles`` rounds of
``pause --wait``, a hold, ``resume --wait``, a run. Per command it records:

- **acknowledged**: issued (just before the send) -> every worker's ack read
  back by the operator; the maximum over workers, and each worker's own;
- **applied**: the event's ``issued_ms`` -> the ack's ``time_ms`` (stamped by
  the worker when the new state is in force, so when fetching stopped or may
  start again); same machine, same clock, 1 ms resolution;
- an **echo**: one record produced (acks=all) and read back by the operator
  under the same load; a control round trip is two such hops;

and per pause: results produced (record timestamp) more than 1 s after the
pause was acknowledged, and results of tasks created after the pause was
acknowledged but produced before the resume was issued. Both must be 0. After
the cycles every task sent must have a result (nothing lost).

Results go to ``benchmarks/results/<stamp>-control.json`` and ``-control.png``;
``--update-readme`` rewrites the figure C table in benchmarks/README.md.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import typer

from benchmarks.batching import RESULTS, ROOT, machine, start_worker, stop_worker
from benchmarks.control_report import LATE_S, TARGET_P99_MS, plot, table, update_readme

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
KAFKA_SH = ROOT / "docker" / "kafka" / "kafka.sh"
KAFKA_NAME = "Apache Kafka 4.1.1 (KRaft, single node)"


def wall_ms() -> float:
    return time.time() * 1000.0


@dataclass
class Load:
    """An open-loop digit-task producer and a result reader, in the benchmark's event loop."""

    bootstrap: str
    prefix: str
    rate_per_s: float
    created_ms: dict[str, float] = field(default_factory=dict)      # task id -> created (epoch ms)
    results: dict[str, tuple[float, str]] = field(default_factory=dict)  # id -> (produced epoch ms, worker)
    duplicates: int = 0

    async def run_producer(self, stop: asyncio.Event) -> None:
        from aiokafka import AIOKafkaProducer

        from autoglm.streams.events import Task, encode_task, now_ms
        from autoglm.tasks import holdout_digits

        x, _ = holdout_digits(360)
        topic = f"{self.prefix}.tasks.digits"
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks=1, linger_ms=2)
        await producer.start()
        try:
            start, sent, tick_s = time.monotonic(), 0, 0.01
            while not stop.is_set():
                due = int((time.monotonic() - start) * self.rate_per_s)
                for i in range(sent, due):
                    task = Task(id=f"c{i}", model="digits", inputs=x[i % 360: i % 360 + 1], created_ms=now_ms())
                    self.created_ms[task.id] = float(task.created_ms)
                    await producer.send(topic, encode_task(task), key=task.id.encode())
                sent = max(sent, due)
                await asyncio.sleep(tick_s)
            await producer.flush()
        finally:
            await producer.stop()

    async def run_reader(self, stop: asyncio.Event) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from autoglm.streams.events import decode_result
        from autoglm.streams.topics import partitions_of

        topic = f"{self.prefix}.results"
        tps = [TopicPartition(topic, p) for p in await partitions_of(self.bootstrap, topic)]
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            while not stop.is_set():
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    for rec in records:
                        result = decode_result(rec.value)
                        produced = float(rec.timestamp) if rec.timestamp and rec.timestamp > 0 else wall_ms()
                        if result.id in self.results:
                            self.duplicates += 1
                        else:
                            self.results[result.id] = (produced, result.worker)
        finally:
            await consumer.stop()

    def produced_between(self, lo_ms: float, hi_ms: float) -> list[str]:
        return [i for i, (t, _) in list(self.results.items()) if lo_ms < t < hi_ms]


class Echo:
    """One record produced (acks=all) to a scratch topic and read back: a broker hop under the same load."""

    def __init__(self, bootstrap: str, topic: str):
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

        self.topic, self.tp = topic, TopicPartition(topic, 0)
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                         fetch_max_wait_ms=50)

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        self.consumer.assign([self.tp])
        await self.consumer.seek_to_end(self.tp)
        await self.consumer.position(self.tp)

    async def stop(self) -> None:
        await self.producer.stop()
        await self.consumer.stop()

    async def once(self) -> float:
        """Milliseconds from send to the record read back."""
        token = uuid.uuid4().hex.encode()
        started = time.monotonic()
        await self.producer.send_and_wait(self.topic, token)
        while True:
            for rec in (await self.consumer.getmany(self.tp, timeout_ms=1000)).get(self.tp, []):
                if rec.value == token:
                    return (time.monotonic() - started) * 1000.0


def command_figures(outcome) -> dict[str, Any]:
    """Per command: ok, missing workers, per-worker and max acknowledged/applied latency (ms)."""
    acked = {w: round(a["latency_ms"], 2) for w, a in outcome.acks.items()}
    applied = {w: float(a["time_ms"] - outcome.event.issued_ms) for w, a in outcome.acks.items()}
    return {"ok": outcome.ok, "missing": sorted(outcome.missing), "acked_ms": acked, "applied_ms": applied,
            "acked_max_ms": max(acked.values(), default=None), "applied_max_ms": max(applied.values(), default=None)}


async def wait_live(client, n: int, procs, timeout_s: float = 180.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a worker exited during start-up; see its log under benchmarks/results/")
        live = [w for w, hb in (await client.live_workers()).items() if hb.get("state", {}).get("ready")]
        if len(live) >= n:
            return sorted(live)
        await asyncio.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {n} live workers")


async def measure(bootstrap: str, prefix: str, procs, *, cycles: int, rate: float, hold_s: float, run_s: float,
                  progress, bar) -> dict[str, Any]:
    """Warm up, then ``cycles`` pause/hold/resume/run rounds under load; the raw figures."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from autoglm.streams.control import ControlClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"{prefix}.echo", 1, 1)])
    finally:
        await admin.close()
    load, stop, stop_producer = Load(bootstrap, prefix, rate), asyncio.Event(), asyncio.Event()
    echo = Echo(bootstrap, f"{prefix}.echo")
    async with ControlClient(bootstrap, prefix=prefix) as client:
        progress.update(bar, description="waiting for 3 live workers")
        workers = await wait_live(client, len(procs), procs)
        await echo.start()
        t0_ms = wall_ms()
        loops = [asyncio.ensure_future(load.run_reader(stop)),
                 asyncio.ensure_future(load.run_producer(stop_producer))]
        try:
            progress.update(bar, description="warm-up: every worker serving")
            deadline = time.monotonic() + 120
            while {w for _, w in list(load.results.values())} < set(workers):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError("workers did not all serve within 120 s")
                await asyncio.sleep(0.2)
            await asyncio.sleep(2.0)
            for command in ("pause", "resume"):  # one unmeasured round: first-use costs on every path
                await client.command(command, wait=True, timeout_s=10)
            await asyncio.sleep(run_s)
            rows = []
            for c in range(cycles):
                row: dict[str, Any] = {"cycle": c}
                pause = await client.command("pause", wait=True, timeout_s=10)
                paused_ms = wall_ms()
                row["pause"] = command_figures(pause)
                row["echo_ms"] = await echo.once()
                await asyncio.sleep(hold_s - (wall_ms() - paused_ms) / 1000.0)
                resume = await client.command("resume", wait=True, timeout_s=10)
                resume_issued_ms = float(resume.event.issued_ms)
                row["resume"] = command_figures(resume)
                row["pause_issued_ms"], row["paused_ms"] = pause.event.issued_ms - t0_ms, paused_ms - t0_ms
                row["resume_issued_ms"] = resume_issued_ms - t0_ms
                await asyncio.sleep(run_s)  # the reader catches up with every result produced while paused
                while_paused = load.produced_between(paused_ms, resume_issued_ms)
                row["in_flight_results_after_pause"] = len(while_paused)
                row["late_results"] = len(load.produced_between(paused_ms + LATE_S * 1000.0, resume_issued_ms))
                row["served_while_paused"] = sum(1 for i in while_paused if load.created_ms.get(i, 0.0) > paused_ms)
                # resume issued -> each worker's first result of a task created during the pause
                # (fetching again + inference + publication): when every worker is serving again
                first: dict[str, float] = {}
                for i, t in list(load.created_ms.items()):
                    if paused_ms < t < resume_issued_ms and i in load.results:
                        produced, worker = load.results[i]
                        first[worker] = min(first.get(worker, produced), produced)
                row["serving_again_ms"] = {w: t - resume_issued_ms for w, t in first.items()}
                row["serving_again_all_ms"] = (max(row["serving_again_ms"].values())
                                               if set(first) >= set(workers) else None)
                rows.append(row)
                progress.update(bar, advance=1, description=(
                    f"pause {row['pause']['acked_max_ms']:.0f} ms, resume {row['resume']['acked_max_ms']:.0f} ms, "
                    f"late {row['late_results']}"))
            progress.update(bar, description="draining: every task must get its result")
            stop_producer.set()
            await loops[1]
            stop_at = time.monotonic() + 60
            while set(load.created_ms) - set(load.results) and time.monotonic() < stop_at:
                await asyncio.sleep(0.2)
        finally:
            stop_producer.set()
            stop.set()
            await asyncio.gather(*loops, return_exceptions=True)
            await echo.stop()
    produced_s = np.asarray([t - t0_ms for t, _ in load.results.values()]) / 1000.0
    timeline = np.bincount((produced_s[produced_s >= 0] / 0.1).astype(int)) if len(produced_s) else np.zeros(0)
    return {"workers": workers, "rate_per_s": rate, "hold_s": hold_s, "run_s": run_s, "cycles": rows,
            "tasks_sent": len(load.created_ms), "results": len(load.results), "duplicates": load.duplicates,
            "lost": len(set(load.created_ms) - set(load.results)),
            "results_per_100ms": timeline.tolist()}


def percentiles(values: list[float]) -> dict[str, float | None]:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return {"p50": None, "p99": None, "max": None, "n": 0}
    return {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)), "max": float(v.max()),
            "n": int(len(v))}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """p50/p99/max of every figure over the cycles, and the checks that must hold."""
    rows = raw["cycles"]
    out: dict[str, Any] = {}
    for cmd in ("pause", "resume"):
        out[cmd] = {
            "acked_all": percentiles([r[cmd]["acked_max_ms"] for r in rows]),
            "acked_per_worker": percentiles([v for r in rows for v in r[cmd]["acked_ms"].values()]),
            "applied_all": percentiles([r[cmd]["applied_max_ms"] for r in rows]),
            "failed": sum(not r[cmd]["ok"] for r in rows),
        }
    echo = percentiles([r["echo_ms"] for r in rows])
    out["echo"] = echo
    out["pause"]["acked_over_two_echo_p50"] = out["pause"]["acked_all"]["p50"] / (2 * echo["p50"])
    out["resume"]["serving_again_all"] = percentiles([r["serving_again_all_ms"] for r in rows])
    out["resume"]["serving_again_per_worker"] = percentiles([v for r in rows for v in r["serving_again_ms"].values()])
    out["resume"]["serving_again_missing"] = sum(r["serving_again_all_ms"] is None for r in rows)
    out["late_results"] = sum(r["late_results"] for r in rows)
    out["served_while_paused"] = sum(r["served_while_paused"] for r in rows)
    out["in_flight_results_after_pause"] = percentiles([r["in_flight_results_after_pause"] for r in rows])
    for figure in ("acked_all", "applied_all"):
        out[f"meets_target_{figure.split('_')[0]}"] = bool(
            max(out["pause"][figure]["p99"], out["resume"][figure]["p99"]) < TARGET_P99_MS)
    return out


# -- processes ----------------------------------------------------------------------------------


def start_kafka(data_dir: Path) -> tuple[str, int]:
    from autoglm.streams.embedded import free_port

    port = free_port()
    subprocess.run(["bash", str(KAFKA_SH), "start", "--port", str(port), "--controller-port", str(free_port()),
                    "--data-dir", str(data_dir)], capture_output=True, text=True, check=True, timeout=600)
    return f"127.0.0.1:{port}", port


def stop_kafka(port: int, data_dir: Path) -> None:
    subprocess.run(["bash", str(KAFKA_SH), "stop", "--port", str(port), "--data-dir", str(data_dir), "--wipe"],
                   capture_output=True, timeout=120)


def run_broker(kind: str, broker_name: str, bootstrap: str, *, workers: int, cycles: int, rate: float,
               hold_s: float, run_s: float, stamp: str, console) -> dict[str, Any]:
    """Start the workers on ``bootstrap``, measure, stop them; the broker's raw figures and summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from autoglm.streams.topics import TopicNames, ensure_topics

    prefix = f"bench-ctl-{uuid.uuid4().hex[:6]}"
    asyncio.run(ensure_topics(bootstrap, TopicNames(prefix), ["digits"], partitions=workers))
    procs, logs = [], []
    for i in range(workers):
        logs.append(RESULTS / f"{stamp}-control-{kind}-w{i}.log")
        procs.append(start_worker(bootstrap, prefix, "digits", {
            "AUTOGLM_STATUS_INTERVAL_S": "1", "AUTOGLM_WORKER_ID": f"{kind}-w{i}"}, logs[-1], kind == "embedded"))
    try:
        with Progress(TextColumn(f"[bold]{kind}[/]"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                      transient=True) as progress:
            bar = progress.add_task("starting", total=cycles)
            raw = asyncio.run(measure(bootstrap, prefix, procs, cycles=cycles, rate=rate, hold_s=hold_s,
                                      run_s=run_s, progress=progress, bar=bar))
    finally:
        for proc in procs:
            stop_worker(proc)
    for log in logs:
        log.unlink(missing_ok=True)
    return {"broker": broker_name, "prefix": prefix, **raw,
            "summary": summarize(raw)}


# -- main ---------------------------------------------------------------------------------------


@app.command()
def main(
    quick: bool = typer.Option(False, help="smoke run: 8 cycles per broker"),
    cycles: int = typer.Option(40, help="pause/resume cycles per broker"),
    workers: int = typer.Option(3, help="worker processes"),
    rate: float = typer.Option(300.0, help="offered load, digit tasks/s"),
    hold_s: float = typer.Option(1.5, help="seconds each pause is held"),
    run_s: float = typer.Option(2.0, help="seconds of running between a resume and the next pause"),
    brokers: str = typer.Option("kafka,embedded", help="which brokers: kafka, embedded, or both"),
    embedded: bool = typer.Option(False, help="the embedded broker only (same as --brokers embedded)"),
    bootstrap: str = typer.Option(None, help="use this running Kafka (host:port) instead of starting one"),
    update_readme_table: bool = typer.Option(False, "--update-readme", help="rewrite benchmarks/README.md"),
    report_json: Path = typer.Option(None, "--report", help="no run: re-summarize and redraw this results JSON"),
) -> None:
    """Run figure C and write JSON + PNG into benchmarks/results/."""
    from rich.console import Console

    from autoglm.streams.embedded import EmbeddedBroker

    console = Console(stderr=True)
    if report_json is not None:
        report = json.loads(report_json.read_text())
        for r in report["brokers"].values():
            r["summary"] = summarize(r)
        report_json.write_text(json.dumps(report, indent=1))
        plot(report, report_json.with_suffix(".png"))
        console.print(table(report))
        if update_readme_table:
            update_readme(report, report["stamp"])
        return
    if quick:
        cycles = 8
    kinds = ["embedded"] if embedded else [k.strip() for k in brokers.split(",") if k.strip()]
    if hold_s <= LATE_S:
        raise typer.BadParameter(f"--hold-s must exceed {LATE_S} s (the late-result window)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict[str, Any] = {"stamp": stamp, "figure": "C", "machine": machine(), "brokers": {}}
    for kind in kinds:
        common = dict(workers=workers, cycles=cycles, rate=rate, hold_s=hold_s, run_s=run_s, stamp=stamp,
                      console=console)
        if kind == "embedded":
            with EmbeddedBroker() as broker:
                report["brokers"][kind] = run_broker(kind, "embedded (Tansu)", broker.bootstrap_servers, **common)
        elif bootstrap:
            report["brokers"][kind] = run_broker(kind, f"Apache Kafka at {bootstrap}", bootstrap, **common)
        else:
            with tempfile.TemporaryDirectory(prefix="autoglm-kafka-") as tmp:
                console.print("starting Apache Kafka ...")
                address, port = start_kafka(Path(tmp) / "data")
                try:
                    report["brokers"][kind] = run_broker(kind, KAFKA_NAME, address, **common)
                finally:
                    stop_kafka(port, Path(tmp) / "data")
        s = report["brokers"][kind]["summary"]
        console.print(f"{kind}: pause p50/p99/max {s['pause']['acked_all']['p50']:.1f}/"
                      f"{s['pause']['acked_all']['p99']:.1f}/{s['pause']['acked_all']['max']:.1f} ms, resume "
                      f"{s['resume']['acked_all']['p50']:.1f}/{s['resume']['acked_all']['p99']:.1f}/"
                      f"{s['resume']['acked_all']['max']:.1f} ms, late {s['late_results']}, "
                      f"served while paused {s['served_while_paused']}, lost {report['brokers'][kind]['lost']}")
    out = RESULTS / f"{stamp}-control.json"
    out.write_text(json.dumps(report, indent=1))
    plot(report, RESULTS / f"{stamp}-control.png")
    console.print(table(report))
    console.print(f"wrote {out}")
    if update_readme_table:
        update_readme(report, stamp)


if __name__ == "__main__":
    app()
