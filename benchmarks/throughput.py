"""Figures O and T: backlog drains through Kafka, the worker against its peers, the same model objects.

Usage (from the repository root, with the project installed, ``.[all]``)::

    .venv/bin/python -m benchmarks.throughput                     # digits-linear, digits, minilm; 3 rounds
    .venv/bin/python -m benchmarks.throughput --models digits-linear,digits --rounds 3 --update-readme
    .venv/bin/python -m benchmarks.throughput --smoke             # seconds: 500 tasks, worker + lean, 1 round
    .venv/bin/python -m benchmarks.throughput --bootstrap host:9092 --no-embedded
    .venv/bin/python -m benchmarks.throughput --report results/<stamp>-throughput.json --update-readme

Without ``--bootstrap`` it starts a throw-away Apache Kafka with
``docker/kafka/kafka.sh`` (Java 17 + Maven) on free ports and wipes it at the end.

One **drain**: a fresh topic prefix and consumer group; a backlog of ``--tasks``
single-row tasks (the project's codec, ``created_ms`` stamped, spread
round-robin over ``--partitions`` partitions) is published first; then the
candidate's process starts and the benchmark watches the end offsets of
``<prefix>.results`` every 50 ms until every task has a result (on the
embedded broker, whose end offsets lag, it reads the results back instead).
Figures:

- **tasks/s**: in steady state: the results ranked between 5 % and 95 % of the backlog
  (in time order) over the span between their record timestamps (stamped by the candidate's
  producer), so start-up (imports, model load, group join) and the first and last batches, whose
  size each candidate chooses, bias no one (:func:`benchmarks.drain_io.interior`);
- **CPU us/task**: user + system CPU of the candidate's process (and its children; psutil)
  between the polls that first saw 5 % and 95 % of the results, over the results in between;
- checks: every task has a result (``complete``), duplicates, error results,
  and the group's committed offsets after the process stopped (SIGTERM).

Candidates (:data:`CANDIDATES`; a new one is one line): ``autoglm worker`` as
a subprocess with its defaults (adaptive batching), and the peers of
:mod:`benchmarks.peers`. Per round, per model: figure L (the model alone, a
subprocess, best batch size), then one drain per candidate, in an order
rotated each round. The summary is the median over rounds with min-max, T/L
per round (L of the same round), and ratios to the lean aiokafka loop. With
``--embedded`` (default on in a full run) the worker and the lean loop also
drain ``digits-linear`` once on the embedded broker (Tansu), as ``autoglm
demo`` runs. Output: ``benchmarks/results/<stamp>-throughput.json`` and
``-throughput.png`` (while it runs, ``-throughput.partial.json`` after every drain:
``--report`` summarizes one of a run that was stopped); ``--update-readme``
rewrites the figure O/T section of ``benchmarks/README.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer

from benchmarks.drain_io import (
    POLL_S,
    committed,
    delete_topics,
    interior,
    publish_backlog,
    read_results,
    stop_process,
    watch,
)
from benchmarks.throughput_report import plot, summarize, table, update_readme

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KAFKA_NAME = "Apache Kafka 4.1.1 (KRaft, single node)"
EMBEDDED_NAME = "embedded (Tansu)"
#: the worker's group timeouts on the embedded broker (README, settings; tests/integration/conftest.py)
EMBEDDED_WORKER_ENV = {"AUTOGLM_REBALANCE_TIMEOUT_S": "6", "AUTOGLM_SESSION_TIMEOUT_S": "6",
                       "AUTOGLM_HEARTBEAT_INTERVAL_S": "1"}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@dataclass(frozen=True)
class Candidate:
    """A consumer under test: ``argv`` after ``python -m``, extra environment, its share of the backlog.

    ``{model}``, ``{bootstrap}``, ``{prefix}``, ``{group}`` in ``argv`` are filled in per drain.
    ``task_share`` < 1 drains fewer tasks (the naive consumer serves ~100/s).
    """

    name: str
    label: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    task_share: float = 1.0


def _peer(kind: str) -> tuple[str, ...]:
    return ("benchmarks.peers", kind, "--model", "{model}", "--bootstrap", "{bootstrap}", "--prefix", "{prefix}",
            "--group", "{group}", "--torch-threads", "{torch_threads}")


CANDIDATES: dict[str, Candidate] = {c.name: c for c in (
    Candidate("worker", "`autoglm worker` (adaptive default)", ("autoglm", "worker")),
    Candidate("naive", "naive aiokafka, per message, commit per result", _peer("naive"), task_share=1 / 15),
    Candidate("faust", "faust `stream.take(256, within=0.01)` agent", _peer("faust")),
    Candidate("lean", "lean aiokafka `getmany` loop", _peer("lean")),
    Candidate("confluent", "the same loop on confluent-kafka", _peer("confluent")),
    # one line per further candidate, e.g. the worker with fixed batching:
    Candidate("worker-fixed", "`autoglm worker`, fixed 32/10 ms", ("autoglm", "worker"),
              {"AUTOGLM_BATCHING_MODE": "fixed", "AUTOGLM_MAX_BATCH_SIZE": "32", "AUTOGLM_MAX_WAIT_S": "0.01"}),
)}
DEFAULT_CANDIDATES = "worker,naive,faust,lean,confluent"


# -- one drain --------------------------------------------------------------------------------------


def start_candidate(c: Candidate, *, model: str, bootstrap: str, prefix: str, group: str, torch_threads: int,
                    embedded: bool, log: Path) -> subprocess.Popen:
    fill = {"model": model, "bootstrap": bootstrap, "prefix": prefix, "group": group,
            "torch_threads": str(torch_threads)}
    env = {**os.environ, "AUTOGLM_BOOTSTRAP_SERVERS": bootstrap, "AUTOGLM_TOPIC_PREFIX": prefix,
           "AUTOGLM_MODELS": model, "AUTOGLM_GROUP_ID": group, "AUTOGLM_TORCH_THREADS": str(torch_threads),
           "AUTOGLM_DEVICE": "cpu", "AUTOGLM_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT),
           **(EMBEDDED_WORKER_ENV if embedded else {}), **c.env}
    argv = [sys.executable, "-m", *(a.format(**fill) for a in c.argv)]
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def drain(c: Candidate, *, model: str, n: int, bootstrap: str, broker: str, partitions: int, torch_threads: int,
          round_: int, logs: Path, bar_factory) -> dict[str, Any]:
    """One drain of ``n`` tasks by candidate ``c``: the raw figures (see the module docstring)."""
    from autoglm.streams.topics import TopicNames, ensure_topics, partitions_of

    from benchmarks.inputs import encoded_tasks

    prefix = f"tput-{uuid.uuid4().hex[:8]}"
    group, names = f"{prefix}-group", TopicNames(prefix)
    asyncio.run(ensure_topics(bootstrap, names, [model], partitions=partitions))
    asyncio.run(partitions_of(bootstrap, names.tasks(model)))
    publish_s = asyncio.run(publish_backlog(bootstrap, names.tasks(model), partitions,
                                            encoded_tasks(model, n, prefix)))
    log = logs / f"{prefix}-{c.name}.log"
    embedded = broker == EMBEDDED_NAME
    proc = start_candidate(c, model=model, bootstrap=bootstrap, prefix=prefix, group=group,
                           torch_threads=torch_threads, embedded=embedded, log=log)
    raw: dict[str, Any] = {"candidate": c.name, "model": model, "broker": broker, "round": round_, "tasks": n,
                           "partitions": partitions, "publish_s": publish_s,
                           "load_avg_1m_before": os.getloadavg()[0]}  # the machine is shared: how busy it was
    try:
        with bar_factory(f"r{round_ + 1} {model} {c.name}" + (" (embedded)" if embedded else ""), n) as bar:
            raw.update(asyncio.run(watch(bootstrap, names.results, n, proc, 90 + n / 50, bar, read_back=embedded)))
    finally:
        raw["exit_code"] = stop_process(proc)
        raw["load_avg_1m_after"] = os.getloadavg()[0]
    records = asyncio.run(read_results(bootstrap, names.results))
    ids = [r[1] for r in records]
    raw.update({"results": len(records), "unique": len(set(ids)), "duplicates": len(ids) - len(set(ids)),
                "not_ok": sum(1 for r in records if r[2] != "ok"),
                "first_ts_ms": min((r[0] for r in records), default=None),
                "last_ts_ms": max((r[0] for r in records), default=None),
                "interior_ts": interior_timestamps([r[0] for r in records], n),
                "committed": asyncio.run(committed(bootstrap, group, names.tasks(model)))})
    raw["complete"] = raw["unique"] == n and raw["window"] is not None
    if not raw["complete"]:
        raw["log_tail"] = log.read_text(errors="replace")[-3000:]
    log.unlink(missing_ok=True)
    asyncio.run(delete_topics(bootstrap, prefix))
    return raw


def interior_timestamps(timestamps_ms: list[int], n: int) -> dict[str, int] | None:
    """The record timestamps of the results ranked :func:`~benchmarks.drain_io.interior` (in time order)."""
    if len(timestamps_ms) < n:
        return None
    opens, closes = interior(n)
    ts = sorted(timestamps_ms)
    return {"opens": opens, "closes": closes, "opens_ms": ts[opens - 1], "closes_ms": ts[closes - 1]}


def offline_limit(model: str, torch_threads: int, sizes: str) -> dict[str, dict[str, float]]:
    """Figure L in a subprocess (``python -m benchmarks.peers limit``): per batch size, items/s and CPU us/item."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.peers", "limit", "--model", model, "--torch-threads",
                          str(torch_threads), "--sizes", sizes], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the run ---------------------------------------------------------------------------------------


def machine(torch_threads: int) -> dict[str, Any]:
    """Cores, CPU model, platform and the versions of everything measured."""
    import platform

    import aiokafka
    import confluent_kafka
    import faust
    import psutil
    import torch

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
            "cpu": cpu_model, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_at_start": os.getloadavg(), "torch": torch.__version__, "torch_threads": torch_threads,
            "device": "cpu", "aiokafka": aiokafka.__version__, "faust": faust.__version__,
            "confluent_kafka": confluent_kafka.__version__, "librdkafka": confluent_kafka.libversion()[0]}


def tasks_for(model: str, c: Candidate, tasks: int, minilm_tasks: int) -> int:
    """Backlog size of a drain: ``--tasks`` (``--minilm-tasks`` for minilm) times the candidate's share."""
    base = minilm_tasks if model == "minilm" else tasks
    return max(50, int(base * c.task_share))


def run_all(*, bootstrap: str, broker: str, models: list[str], candidates: list[Candidate], rounds: int,
            tasks: int, minilm_tasks: int, partitions: int, torch_threads: int, sizes: str, logs: Path,
            bar_factory, say, drains: list[dict[str, Any]], limits: dict[str, list[dict[str, Any]]],
            checkpoint) -> None:
    """Every round: per model, figure L, then one drain per candidate in a rotated order; appended
    to ``drains`` and ``limits``, ``checkpoint()`` called after each (a long run keeps what it did)."""
    for r in range(rounds):
        for model in models:
            limit = offline_limit(model, torch_threads, sizes)
            limits.setdefault(model, []).append(limit)
            best = max(limit.items(), key=lambda kv: kv[1]["items_per_s"])
            say(f"r{r + 1} {model}: L = {best[1]['items_per_s']:.0f}/s at batch {best[0]}")
            order = candidates[r % len(candidates):] + candidates[:r % len(candidates)]
            for c in order:
                drains.append(drain(c, model=model, n=tasks_for(model, c, tasks, minilm_tasks), bootstrap=bootstrap,
                                    broker=broker, partitions=partitions, torch_threads=torch_threads, round_=r,
                                    logs=logs, bar_factory=bar_factory))
                say(describe(drains[-1]))
                checkpoint()


def describe(d: dict[str, Any]) -> str:
    from benchmarks.throughput_report import drain_figures

    f = drain_figures(d)
    if not d["complete"]:
        return (f"  {d['candidate']:>10} {d['model']}: INCOMPLETE {d['unique']}/{d['tasks']} "
                f"(exit {d['exit_code']}): {d.get('log_tail', '')[-400:]}")
    return (f"  {d['candidate']:>10} {d['model']}: {_figure(f['tasks_per_s'], 8)} tasks/s  "
            f"{_figure(f['cpu_us_per_task'], 6)} us/task  ({d['tasks']} tasks, {d['duplicates']} dup, "
            f"committed {d['committed']})")


def _figure(value: float | None, width: int) -> str:
    """A figure right-aligned in ``width``; ``-`` when the drain was too short to give one (a smoke
    drain of the batch-native worker can finish between two 10 ms CPU clock ticks)."""
    return f"{value:{width}.0f}" if value is not None else "-".rjust(width)


@app.command()
def main(
    models: str = typer.Option("digits-linear,digits,minilm", help="models, comma-separated"),
    candidates: str = typer.Option(DEFAULT_CANDIDATES, help=f"of {', '.join(CANDIDATES)}"),
    rounds: int = typer.Option(3, help="rounds; candidates interleaved (rotated order) in each"),
    tasks: int = typer.Option(30_000, help="backlog per drain (the naive consumer drains 1/15 of it)"),
    minilm_tasks: int = typer.Option(3_000, help="backlog per drain for minilm"),
    partitions: int = typer.Option(3, help="partitions of each drain's topics (the worker's default)"),
    torch_threads: int = typer.Option(1, help="torch intra-op threads, every candidate and figure L"),
    sizes: str = typer.Option("1,8,32,64,128,256", help="figure L batch sizes"),
    embedded: bool = typer.Option(True, help="also drain digits-linear on the embedded broker (worker, lean)"),
    smoke: bool = typer.Option(False, help="seconds: 500 digits-linear tasks, worker + lean, one round"),
    bootstrap: str = typer.Option(None, help="a running Apache Kafka (host:port) instead of a throw-away one"),
    out_dir: Path = typer.Option(RESULTS, help="where the JSON and PNG go"),
    update_readme_section: bool = typer.Option(False, "--update-readme", help="rewrite benchmarks/README.md"),
    report_json: Path = typer.Option(None, "--report", help="no run: re-summarize and redraw this JSON"),
) -> None:
    """Run figures O/T (and L) and write JSON + PNG."""
    from tqdm import tqdm

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)  # leader-election retries of a just-created topic
    if report_json is not None:
        report = json.loads(report_json.read_text())
        report["summary"] = summarize(report["drains"], report["limits"])
        report_json.write_text(json.dumps(report, indent=1))
        plot(report, report_json.with_suffix(".png"))
        print(table(report))
        if update_readme_section:
            update_readme(report, report["stamp"])
        return
    if smoke:
        models, candidates, rounds, tasks, minilm_tasks, embedded = "digits-linear", "worker,lean", 1, 500, 100, False
        sizes = "1,64"
    chosen = [CANDIDATES[c.strip()] for c in candidates.split(",") if c.strip()]
    model_list = [m.strip() for m in models.split(",") if m.strip()]
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def bar_factory(desc: str, total: int):
        return tqdm(total=total, desc=desc, unit="task", leave=False, file=sys.stderr, dynamic_ncols=True,
                    mininterval=0.5)

    report: dict[str, Any] = {
        "stamp": stamp, "figure": "O/T", "smoke": smoke,
        "command": " ".join(["python -m benchmarks.throughput", *sys.argv[1:]]),
        "machine": machine(torch_threads),
        "settings": {"models": model_list, "candidates": {c.name: asdict(c) for c in chosen}, "rounds": rounds,
                     "tasks": tasks, "minilm_tasks": minilm_tasks, "partitions": partitions,
                     "poll_s": POLL_S},
    }
    name = f"{stamp}-throughput" + ("-smoke" if smoke else "")
    partial = out_dir / f"{name}.partial.json"
    report["drains"], report["limits"] = [], {}

    def checkpoint() -> None:
        partial.write_text(json.dumps(report, indent=1))

    common = dict(candidates=chosen, rounds=rounds, tasks=tasks, minilm_tasks=minilm_tasks, partitions=partitions,
                  torch_threads=torch_threads, sizes=sizes, bar_factory=bar_factory, say=tqdm.write,
                  drains=report["drains"], limits=report["limits"], checkpoint=checkpoint)
    with tempfile.TemporaryDirectory(prefix="autoglm-tput-") as tmp:
        logs = Path(tmp)
        if bootstrap:
            report["broker"] = f"Apache Kafka at {bootstrap}"
            run_all(bootstrap=bootstrap, broker=KAFKA_NAME, models=model_list, logs=logs, **common)
        else:
            from benchmarks.control import start_kafka, stop_kafka

            tqdm.write("starting Apache Kafka ...")
            address, port = start_kafka(logs / "kafka")
            try:
                report["broker"] = KAFKA_NAME
                run_all(bootstrap=address, broker=KAFKA_NAME, models=model_list, logs=logs, **common)
            finally:
                stop_kafka(port, logs / "kafka")
        if embedded:
            from autoglm.streams.embedded import EmbeddedBroker

            with EmbeddedBroker() as tansu:  # its own figure L is not kept: T/L pairs with Apache Kafka's
                run_all(bootstrap=tansu.bootstrap_servers, broker=EMBEDDED_NAME, models=["digits-linear"],
                        logs=logs, **{**common, "rounds": 1, "limits": {},
                                      "candidates": [CANDIDATES["worker"], CANDIDATES["lean"]]})
    drains, limits = report["drains"], report["limits"]
    report["summary"] = summarize(drains, limits)
    out = out_dir / f"{name}.json"
    out.write_text(json.dumps(report, indent=1))
    partial.unlink(missing_ok=True)
    plot(report, out_dir / f"{name}.png")
    print(table(report))
    tqdm.write(f"wrote {out}")
    if update_readme_section and not smoke:
        update_readme(report, stamp)


if __name__ == "__main__":
    app()
