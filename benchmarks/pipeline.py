"""Issue 13: a pipeline on Kafka against the same models called one after the other in one process.

Usage (from the repository root, with the project installed, ``.[all]``)::

    .venv/bin/python -m benchmarks.pipeline --update-readme   # digits-routing (3 rounds), text-sentiment (2): ~5 min
    .venv/bin/python -m benchmarks.pipeline --pipelines digits-routing --rounds 1 --bootstrap 127.0.0.1:9092
    .venv/bin/python -m benchmarks.pipeline --smoke                # digits-routing, 1 small round: ~20 s + the broker
    .venv/bin/python -m benchmarks.pipeline --report results/<stamp>-pipeline.json --update-readme

Without ``--bootstrap`` it starts a throw-away Apache Kafka with ``docker/kafka/kafka.sh``
(Java 17 + Maven) on free ports and wipes it at the end.

Per pipeline (:data:`CASES`: the shipped examples ``digits-routing`` and ``text-sentiment``),
per round, on a fresh topic prefix:

1. **The pipeline on Kafka**, served by one worker process started as a user starts it
   (``python -m autoglm pipeline run FILE``, its defaults: adaptive batching per step with the
   file's ``batching`` and its share of the pipeline's latency target; ``AUTOGLM_TORCH_THREADS=1``).
   (b) **Drain**: a backlog of ``drain_tasks`` single-row tasks is published to the pipeline's
   input topic before the worker starts; tasks/s over the results ranked 5 %..95 % (record
   timestamps, :func:`~benchmarks.pipeline_report.drain_rate`) and the worker's CPU per task
   over the same stretch (:func:`benchmarks.drain_io.watch`). (a) **Latency**: then, on the same
   warm worker, an open-loop Poisson stream at ``rate_per_s`` for ``latency_s`` seconds, every
   task stamped ``created_ms`` as it is sent; per task the latency to the reader's receipt, the
   result's ``end_to_end_ms`` and its ``steps`` (:mod:`benchmarks.pipeline_report` has the terms).
   Checks: every task answered, duplicates, error results.
2. **The in-process chain** (:mod:`benchmarks.pipeline_chains`): the same models, loaded in
   this process with the same torch thread setting (1), called one after the other as a user
   writes it without Kafka (each model's ``prepare``, ``collate``, ``forward`` under
   ``torch.inference_mode()``, the routing condition in numpy). Latency: the latency run's tasks
   at the same arrival times (open loop, :func:`~benchmarks.pipeline_chains.replay_in_process`),
   and beside it the same tasks back to back, called directly and through
   ``ModelRunner.run_sync`` (the worker's model thread, no Kafka). Throughput: the drain's tasks
   in micro-batches of the sizes the pipeline's steps used in this round's drain (the mean per
   batch, per step). The per-task route (which steps ran) is compared with the pipeline's for
   the same tasks: both must do the same work.
3. **Ratios** pipeline / in-process, the overhead (pipeline p50 - in-process p50, per route and
   per Kafka topic a route crosses), and the per-step figures of the results.

Rounds repeat 1 and 2 on a fresh prefix and worker; the summary is the median over rounds with
the min-max. Output: ``benchmarks/results/<stamp>-pipeline.json`` (machine, settings, every
round's figures and raw latencies) and ``-pipeline.png`` (latency CDFs, where the time goes);
``--update-readme`` rewrites the pipeline section of ``benchmarks/README.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import orjson
import typer

from benchmarks.drain_io import committed, delete_topics, publish_backlog, stop_process, watch
from benchmarks.pipeline_chains import CHAINS, TORCH_THREADS, in_process
from benchmarks.pipeline_report import (
    compare,
    drain_rate,
    latency_figures,
    median_rounds,
    plot,
    ratio,
    step_batch_means,
    table,
    task_times,
    update_readme,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLES = ROOT / "examples" / "pipelines"
KAFKA_NAME = "Apache Kafka 4.1.1 (KRaft, single node)"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One pipeline under test.

    Attributes:
        name: the pipeline's name (its file's ``name``).
        file: its ``pipeline.yaml``, relative to the repository root.
        model_repo: the model repository it needs (relative), or None (built-in models only).
        drain_tasks: backlog size of the throughput drain.
        rate_per_s: the open-loop rate of the latency run (tasks/s; modest: a few % of capacity).
        latency_s: seconds of the latency run.
        rounds: default rounds.
    """

    name: str
    file: str
    model_repo: str | None
    drain_tasks: int
    rate_per_s: float
    latency_s: float
    rounds: int


CASES: dict[str, Case] = {c.name: c for c in (
    Case("digits-routing", "examples/pipelines/digits-routing/pipeline.yaml", None, 6000, 50.0, 15.0, 3),
    Case("text-sentiment", "examples/pipelines/text-sentiment/pipeline.yaml",
         "examples/pipelines/text-sentiment/repo", 600, 8.0, 15.0, 2),
)}


# -- the in-process chains (benchmarks/pipeline_chains.py) ----------------------------------------


def task_inputs(case: Case) -> Callable[[int], Any]:
    """``inputs(i)``: task ``i``'s single row as the pipeline's input signature has it: float32
    ``(1, 64)`` held-out digit images (cycling over 360), or ``[sentence]`` (cycling over 200)."""
    from benchmarks.inputs import task_inputs as single_rows

    if case.name == "digits-routing":
        rows = single_rows("digits")
        return lambda i: np.ascontiguousarray(rows(i).reshape(1, 64))
    return single_rows("minilm")



# -- the pipeline on Kafka --------------------------------------------------------------------


def start_worker(case: Case, *, bootstrap: str, prefix: str, partitions: int, log_path: Path) -> subprocess.Popen:
    """``python -m autoglm pipeline run FILE`` (as a user runs it), its defaults but the torch threads.

    It logs at INFO (``PBENCH_WORKER_LOG_LEVEL`` to change; a few lines at start and stop, none
    per batch) into ``log_path``, so that a worker that stops early says why (faust logs the
    signal it got at INFO); the benchmark keeps that log when it does."""
    argv = [sys.executable, "-m", "autoglm", "pipeline", "run", str(ROOT / case.file)]
    if case.model_repo:
        argv += ["--model-repo", str(ROOT / case.model_repo)]
    env = {**os.environ, "AUTOGLM_BOOTSTRAP_SERVERS": bootstrap, "AUTOGLM_TOPIC_PREFIX": prefix,
           "AUTOGLM_GROUP_ID": f"{prefix}-group", "AUTOGLM_TORCH_THREADS": str(TORCH_THREADS),
           "AUTOGLM_DEVICE": "cpu", "AUTOGLM_LOG_LEVEL": os.environ.get("PBENCH_WORKER_LOG_LEVEL", "INFO"),
           "AUTOGLM_PARTITIONS": str(partitions),
           "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def encode(case: Case, tid: str, inputs: Any) -> tuple[bytes, bytes, int]:
    """``(key, task event, created_ms)`` of one task to the pipeline, ``created_ms`` stamped now."""
    from autoglm.streams.events import Task, encode_task, now_ms

    task = Task(id=tid, model=f"pipeline:{case.name}", inputs=inputs, created_ms=now_ms())
    return tid.encode(), encode_task(task), task.created_ms


async def open_loop(bootstrap: str, prefix: str, topic: str, case: Case, inputs: Callable[[int], Any],
                    arrivals_s: list[float], proc: subprocess.Popen, bar, timeout_s: float) -> dict[str, Any]:
    """Send task ``l<i>`` at ``arrivals_s[i]`` (open loop: a slow answer delays no send); per task
    the decoded result and the wall-clock ms the reader got it."""
    from aiokafka import AIOKafkaProducer

    from autoglm.streams.client import ResultReader

    created: dict[str, int] = {}
    got: dict[str, tuple[float, dict[str, Any]]] = {}
    duplicates = 0
    reader_errors: list[str] = []
    start = time.monotonic()
    async with ResultReader(bootstrap, prefix=prefix, from_beginning=False) as reader:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
        await producer.start()

        async def collect() -> None:
            nonlocal duplicates
            while len(got) < len(arrivals_s):
                try:
                    records = await reader.records(0.05)
                except Exception as exc:  # noqa: BLE001 - kept and shown; the reader reads on
                    reader_errors.append(f"{time.monotonic() - start:.2f} s: {exc!r}")
                    await asyncio.sleep(0.1)
                    continue
                for rec in records:
                    now = time.time() * 1000.0
                    try:
                        doc = orjson.loads(rec.value)
                    except orjson.JSONDecodeError as exc:
                        reader_errors.append(f"offset {rec.offset}: {exc!r}")
                        continue
                    rid = doc.get("id")
                    if rid in got:
                        duplicates += 1
                    elif rid in created:
                        got[rid] = (now, doc)
                        bar.update(1)

        try:
            collector = asyncio.ensure_future(collect())
            start = time.monotonic()
            for i, at in enumerate(arrivals_s):
                delay = at - (time.monotonic() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                key, value, stamp = encode(case, f"{prefix}-l{i}", inputs(i))
                created[key.decode()] = stamp
                await producer.send(topic, value, key=key)
            await producer.flush()
            sent_s = time.monotonic() - start
            deadline = time.monotonic() + timeout_s
            while not collector.done() and time.monotonic() < deadline and proc.poll() is None:
                await asyncio.sleep(0.1)
            if collector.done() and collector.exception() is not None:
                reader_errors.append(f"the reader stopped: {collector.exception()!r}")
            collector.cancel()
        finally:
            await producer.stop()
    return {"created": created, "got": got, "duplicates": duplicates, "sent_s": sent_s, "reader_errors": reader_errors}


async def read_docs(bootstrap: str, topic: str) -> list[tuple[int, dict[str, Any]]]:
    """Every record of ``topic`` to its end offsets: (record timestamp ms, decoded result)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from autoglm.streams.topics import partitions_of

    tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    out: list[tuple[int, dict[str, Any]]] = []
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for recs in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                out.extend((rec.timestamp, orjson.loads(rec.value)) for rec in recs)
    finally:
        await consumer.stop()
    return out


def on_kafka(case: Case, *, bootstrap: str, partitions: int, inputs: Callable[[int], Any], arrivals_s: list[float],
             logs: Path, bar_factory, say) -> dict[str, Any]:
    """One round of the pipeline on Kafka: the drain, then the latency run, on one worker."""
    from autoglm.pipelines import load_pipeline
    from autoglm.streams.topics import TopicNames, ensure_topics

    pipeline = load_pipeline(ROOT / case.file, ROOT / case.model_repo if case.model_repo else None)
    prefix = f"pbench-{uuid.uuid4().hex[:8]}"
    names = TopicNames(prefix)
    topic = pipeline.topic(prefix)
    hops = [names.pipeline_step(pipeline.name, s.name) for s in pipeline.steps[1:]]
    asyncio.run(ensure_topics(bootstrap, names, [], partitions=partitions, extra=[topic, *hops]))
    n = case.drain_tasks
    backlog, drain_created = [], {}
    for i in range(n):
        key, value, stamp = encode(case, f"{prefix}-d{i}", inputs(i))
        backlog.append((key, value))
        drain_created[key.decode()] = stamp
    publish_s = asyncio.run(publish_backlog(bootstrap, topic, partitions, backlog))
    log_path = logs / f"{prefix}.log"
    proc = start_worker(case, bootstrap=bootstrap, prefix=prefix, partitions=partitions, log_path=log_path)
    out: dict[str, Any] = {"prefix": prefix, "publish_s": publish_s, "load_avg_1m_before": os.getloadavg()[0]}
    try:
        with bar_factory(f"{case.name} drain", n) as bar:
            out["watch"] = asyncio.run(watch(bootstrap, names.results, n, proc, 120 + n / 20, bar))
        if out["watch"]["window"] is None:
            raise WorkerFailed(f"the drain of {n} tasks did not complete (worker exit {proc.poll()}, "
                               f"watch {out['watch']})", log_path.read_text(errors="replace"))
        with bar_factory(f"{case.name} latency at {case.rate_per_s:g}/s", len(arrivals_s)) as bar:
            run = asyncio.run(open_loop(bootstrap, prefix, topic, case, inputs, arrivals_s, proc, bar, 60.0))
    finally:
        out["exited_before_stop"] = proc.poll()  # None: it was serving until we stopped it
        out["exit_code"] = stop_process(proc)
        out["load_avg_1m_after"] = os.getloadavg()[0]
    if out["exited_before_stop"] is not None:
        log_text = log_path.read_text(errors="replace")
        asyncio.run(delete_topics(bootstrap, prefix))
        raise WorkerFailed(f"the worker exited (code {out['exited_before_stop']}) during the latency run, "
                           f"{len(run['got'])}/{len(arrivals_s)} answered", log_text)
    records = asyncio.run(read_docs(bootstrap, names.results))
    # after the worker stopped: what it committed on the input topic, what reached the results topic
    out["committed_in"] = asyncio.run(committed(bootstrap, f"{prefix}-group", topic))
    drain_docs = [(ts, d) for ts, d in records if d.get("id") in drain_created]
    ids = [d["id"] for _, d in drain_docs]
    out["drain"] = {"tasks": n, "results": len(ids), "unique": len(set(ids)), "duplicates": len(ids) - len(set(ids)),
                    "not_ok": sum(1 for _, d in drain_docs if d.get("status") != "ok")}
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    for ts, d in drain_docs:
        first.setdefault(d["id"], (ts, d))
    out["drain_per_s"] = drain_rate([ts for ts, _ in first.values()], n)
    w = out["watch"]["window"]
    out["cpu_us_per_task"] = w["cpu_s"] * 1e6 / w["results"] if w["results"] else None
    out["drain_figures"] = latency_figures([task_times(d, ts, drain_created[i]) for i, (ts, d) in first.items()])
    out["batch_means"] = step_batch_means(d for _, d in first.values())
    got, created = run["got"], run["created"]
    out["latency_run"] = {"tasks": len(arrivals_s), "answered": len(got), "duplicates": run["duplicates"],
                          "not_ok": sum(1 for _, d in got.values() if d.get("status") != "ok"),
                          "sent_s": run["sent_s"], "published": n + len(arrivals_s),
                          "reader_errors": run["reader_errors"],
                          "committed_in": out["committed_in"],
                          "in_results_topic": len({d.get("id") for _, d in records if d.get("id") in created})}
    order = sorted(got, key=lambda tid: int(tid.rsplit("-l", 1)[1]))
    out["latency_times"] = [task_times(got[t][1], got[t][0], created[t]) for t in order]
    out["latency_index"] = [int(t.rsplit("-l", 1)[1]) for t in order]
    if out["latency_run"]["answered"] < len(arrivals_s) or out["drain"]["unique"] < n:
        out["log_tail"] = log_path.read_text(errors="replace")[-3000:]
        say(f"  INCOMPLETE: drain {out['drain']['unique']}/{n}, latency {len(got)}/{len(arrivals_s)} read live, "
            f"{out['latency_run']['in_results_topic']} in the results topic after the stop, input offsets "
            f"committed {out['committed_in']}/{n + len(arrivals_s)}: "
            f"{out['log_tail'][-600:]}")
    log_path.unlink(missing_ok=True)
    asyncio.run(delete_topics(bootstrap, prefix))
    return out


class WorkerFailed(RuntimeError):
    """The worker exited or stalled before the drain completed; ``log`` is its output."""

    def __init__(self, message: str, log_text: str):
        super().__init__(message)
        self.log = log_text


# -- one round, the run -----------------------------------------------------------------------


def one_round(case: Case, r: int, chain, *, bootstrap: str, partitions: int, logs: Path, bar_factory,
              say) -> dict[str, Any]:
    """Pipeline on Kafka, then the in-process chain with the drain's batch sizes; the round's figures."""
    from benchmarks.batching import poisson_trace

    inputs = task_inputs(case)
    arrivals = [t for t, _ in poisson_trace(case.rate_per_s, case.latency_s, 1, seed=11 + r,
                                            phases=[("steady", 1.0)])]
    pipe = on_kafka(case, bootstrap=bootstrap, partitions=partitions, inputs=inputs, arrivals_s=arrivals, logs=logs,
                    bar_factory=bar_factory, say=say)
    sizes = {step: max(1, int(round(pipe["batch_means"].get(step) or 1))) for step in chain.steps}
    say(f"  {case.name} r{r + 1}: in-process chain, the latency run's {len(arrivals)} tasks at their arrival times, "
        f"{case.drain_tasks} in batches {sizes} ...")
    base = in_process(chain, inputs, arrivals, case.drain_tasks, sizes)
    pipe_lat = latency_figures(pipe["latency_times"])
    pipe_routes = dict(zip(pipe["latency_index"], (t["route"] for t in pipe["latency_times"])))
    mismatched = [i for i, route in pipe_routes.items() if base["routes_per_task"][i] != route]
    figures = {
        "pipe": {"latency": pipe_lat, "drain": {"steps": pipe["drain_figures"]["steps"]},
                 "drain_per_s": pipe["drain_per_s"], "cpu_us_per_task": pipe["cpu_us_per_task"]},
        "base": {"latency": base["latency"], "b2b_latency": base["b2b_latency"],
                 "runner_latency": base["runner_latency"],
                 "tasks_per_s": base["tasks_per_s"],
                 "cpu_us_per_task": base["cpu_us_per_task"], "batch_sizes": sizes},
        "cmp": compare(pipe_lat, base["latency"], pipe["drain_per_s"], base["tasks_per_s"],
                       pipe["cpu_us_per_task"], base["cpu_us_per_task"]),
    }
    figures["cmp"]["b2b_p50_ratio"] = ratio(pipe_lat["latency_p50_ms"], base["b2b_latency"]["latency_p50_ms"])
    checks = {"drain": pipe["drain"], "latency_run": pipe["latency_run"], "exit_code": pipe["exit_code"],
              "routes_mismatched": len(mismatched), "in_process_passes": base["passes"],
              "load_avg_1m": [pipe["load_avg_1m_before"], pipe["load_avg_1m_after"], os.getloadavg()[0]],
              "publish_s": pipe["publish_s"], "startup_s": pipe["watch"].get("startup_s")}
    c = figures["cmp"]
    say(f"  {case.name} r{r + 1}: pipeline p50 {pipe_lat['latency_p50_ms']:.1f} ms "
        f"p99 {pipe_lat['latency_p99_ms']:.1f} "
        f"ms, drain {pipe['drain_per_s'] or 0:.0f}/s; in-process p50 {base['latency']['latency_p50_ms']:.2f} ms "
        f"p99 {base['latency']['latency_p99_ms']:.2f} ms, {base['tasks_per_s']:.0f}/s; ratios p50 "
        f"{c['p50_ratio'] or 0:.1f}x, throughput {c['throughput_ratio'] or 0:.2f}x; routes mismatched "
        f"{len(mismatched)}; drain {pipe['drain']['unique']}/{pipe['drain']['tasks']} "
        f"({pipe['drain']['duplicates']} dup), latency run {pipe['latency_run']['answered']}/{len(arrivals)}")
    return {"round": r, **figures, "checks": checks,
            "raw": {"pipe_latency_ms": [round(t["latency_ms"], 3) for t in pipe["latency_times"]],
                    "pipe_e2e_ms": [round(t["e2e_ms"], 3) for t in pipe["latency_times"]],
                    "base_latency_ms": [round(v, 4) for v in base["latency_ms"]],
                    "log_tail": pipe.get("log_tail")}}


def ensure_head(case: Case, say) -> None:
    """text-sentiment needs its head: train it with the example's make_head.py when absent (~20 s)."""
    if case.model_repo and not (ROOT / case.model_repo / "sentiment-head" / "model.pt").exists():
        say(f"training the sentiment head into {case.model_repo} (make_head.py) ...")
        subprocess.run([sys.executable, str(EXAMPLES / "text-sentiment" / "make_head.py"), str(ROOT / case.model_repo)],
                       cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def machine() -> dict[str, Any]:
    """Cores, CPU model, platform, load and the versions of what is measured."""
    import aiokafka
    import torch

    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
            "cpu": cpu or platform.processor(), "load_avg_at_start": os.getloadavg(), "torch": torch.__version__,
            "torch_threads": TORCH_THREADS, "device": "cpu", "aiokafka": aiokafka.__version__}


def summarize_case(case: Case, chain_steps: Sequence[str], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The case's report entry: settings, rounds, the median-over-rounds summary, routes and steps seen."""
    summary = median_rounds([{k: r[k] for k in ("pipe", "base", "cmp")} for r in rounds])
    routes = sorted({rt for r in rounds for rt in r["pipe"]["latency"]["routes"]}, key=lambda x: (x.count("+"), x))
    return {"settings": asdict(case),
            "steps": list(chain_steps), "routes": routes, "rounds": rounds, "summary": summary}


@app.command()
def main(
    pipelines: str = typer.Option(",".join(CASES), help=f"of {', '.join(CASES)}, comma-separated"),
    rounds: int = typer.Option(None, help="rounds per pipeline (default: digits-routing 3, text-sentiment 2)"),
    partitions: int = typer.Option(3, help="partitions of the pipeline's topics (the worker's default)"),
    smoke: bool = typer.Option(False, help="digits-routing, 1 round, a 1,000-task drain, 4 s of latency run (~20 s + the broker)"),
    bootstrap: str = typer.Option(None, help="a running Apache Kafka (host:port) instead of a throw-away one"),
    out_dir: Path = typer.Option(RESULTS, help="where the JSON and PNG go"),
    update_readme_section: bool = typer.Option(False, "--update-readme", help="rewrite benchmarks/README.md"),
    report_json: Path = typer.Option(None, "--report", help="no run: re-summarize and redraw this JSON"),
) -> None:
    """Run the pipeline benchmark and write JSON + PNG."""
    from tqdm import tqdm

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    if report_json is not None:
        report = json.loads(report_json.read_text())
        for name, case in report["pipelines"].items():
            report["pipelines"][name] = {**case, **summarize_case(CASES[name], case["steps"], case["rounds"])}
            report["pipelines"][name]["settings"] = case["settings"]
        report_json.write_text(json.dumps(report, indent=1))
        plot(report, report_json.with_suffix(".png"))
        print(table(report))
        if update_readme_section:
            update_readme(report)
        return
    chosen = [CASES[p.strip()] for p in pipelines.split(",") if p.strip()]
    if smoke:
        chosen = [replace(CASES["digits-routing"], drain_tasks=1000, latency_s=4.0, rounds=1)]
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-pipeline" + ("-smoke" if smoke else "")

    def bar_factory(desc: str, total: int):
        return tqdm(total=total, desc=desc, unit="task", leave=False, file=sys.stderr, dynamic_ncols=True,
                    mininterval=0.5)

    say = tqdm.write
    report: dict[str, Any] = {"stamp": stamp, "smoke": smoke,
                              "command": " ".join(["python -m benchmarks.pipeline", *sys.argv[1:]]),
                              "machine": machine(), "partitions": partitions, "pipelines": {}}
    import torch

    torch.set_num_threads(TORCH_THREADS)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="autoglm-pbench-") as tmp:
        logs = Path(tmp)
        port = None
        if bootstrap:
            address, report["broker"] = bootstrap, f"the broker at {bootstrap} (--bootstrap)"
        else:
            from benchmarks.control import start_kafka

            say("starting Apache Kafka ...")
            address, port = start_kafka(logs / "kafka")
            report["broker"] = KAFKA_NAME
        try:
            for case in chosen:
                ensure_head(case, say)
                chain = CHAINS[case.name](ROOT / case.model_repo if case.model_repo else None)
                done = []
                failures = report.setdefault("worker_failures", [])
                for r in range(rounds or case.rounds):
                    say(f"{case.name} round {r + 1}/{rounds or case.rounds} (load average {os.getloadavg()[0]:.1f})")
                    # a worker that dies before the round ends: its log kept, the round retried once
                    for attempt in range(2):
                        try:
                            done.append(one_round(case, r, chain, bootstrap=address, partitions=partitions,
                                                  logs=logs, bar_factory=bar_factory, say=say))
                            break
                        except WorkerFailed as exc:
                            saved = out_dir / f"{name}-{case.name}-r{r + 1}-worker{attempt + 1}.log"
                            saved.write_text(exc.log)
                            failures.append({"pipeline": case.name, "round": r, "attempt": attempt, "error": str(exc),
                                             "log_tail": exc.log[-3000:],
                                             "log": str(saved)})
                            say(f"  WORKER FAILED: {exc}; its log: {saved}")
                            if attempt:
                                raise
                    report["pipelines"][case.name] = summarize_case(case, chain.steps, done)
                    (out_dir / f"{name}.partial.json").write_text(json.dumps(report, indent=1))
                chain.close()
        finally:
            if port is not None:
                from benchmarks.control import stop_kafka

                stop_kafka(port, logs / "kafka")
    report["elapsed_s"] = time.monotonic() - started
    out = out_dir / f"{name}.json"
    out.write_text(json.dumps(report, indent=1))
    (out_dir / f"{name}.partial.json").unlink(missing_ok=True)
    plot(report, out_dir / f"{name}.png")
    print(table(report))
    say(f"wrote {out} ({report['elapsed_s']:.0f} s)")
    if update_readme_section and not smoke:
        update_readme(report)


if __name__ == "__main__":
    app()
