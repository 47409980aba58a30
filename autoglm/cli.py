"""The ``autoglm`` command: worker, publish, results, demo, ctl, status, console, models, pipeline."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from pathlib import Path
from typing import Optional

import typer

from autoglm.config import Settings, load_settings
from autoglm.errors import AutoGLMError

app = typer.Typer(
    help="Kafka-native real-time inference: adaptive micro-batches, commit-after-result delivery.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

BootstrapOpt = typer.Option(None, "--bootstrap-servers", "-b", help="host:port[,...]; env AUTOGLM_BOOTSTRAP_SERVERS")
PrefixOpt = typer.Option(None, "--prefix", help="topic prefix; env AUTOGLM_TOPIC_PREFIX (default autoglm)")


def _settings(**overrides) -> Settings:
    try:
        return load_settings(**overrides)
    except AutoGLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _quiet_clients() -> None:
    """Client commands print their own outcome; keep aiokafka's per-connection warnings out of it
    (e.g. "Sending username and password in the clear" on every SASL_PLAINTEXT connection)."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)


def _need_broker(settings: Settings) -> list[str]:
    _quiet_clients()
    if settings.embedded:
        typer.echo("error: set --bootstrap-servers or AUTOGLM_BOOTSTRAP_SERVERS (the address of the broker "
                   "the worker uses)", err=True)
        raise typer.Exit(2)
    return settings.bootstrap_list


def _kafka_kwargs(settings: Settings) -> dict:
    from autoglm.streams.security import client_kwargs

    try:
        return client_kwargs(settings)
    except AutoGLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def worker(
    bootstrap_servers: Optional[str] = BootstrapOpt,
    prefix: Optional[str] = PrefixOpt,
    models: Optional[str] = typer.Option(None, "--models", "-m", help="comma-separated model names; env AUTOGLM_MODELS (default: every model of --model-repo, else digits)"),
    model_repo: Optional[str] = typer.Option(None, "--model-repo", help="model repository folder (DIR/<name>/model.yaml); env AUTOGLM_MODEL_REPO"),
    partitions: Optional[int] = typer.Option(None, help="partitions of topics created at start; env AUTOGLM_PARTITIONS"),
    batching_mode: Optional[str] = typer.Option(None, help="adaptive or fixed; env AUTOGLM_BATCHING_MODE (default adaptive)"),
    latency_target_s: Optional[float] = typer.Option(None, help="p99 end-to-end target of the adaptive batcher, seconds; env AUTOGLM_LATENCY_TARGET_S (default 0.1)"),
    max_batch_size: Optional[int] = typer.Option(None, help="tasks per micro-batch at most; env AUTOGLM_MAX_BATCH_SIZE (default 256 adaptive, 32 fixed)"),
    max_wait_s: Optional[float] = typer.Option(None, help="seconds a batch may wait for more tasks (fixed mode always, adaptive only while over its target); env AUTOGLM_MAX_WAIT_S (default 0.05 adaptive, 0.01 fixed)"),
    metrics_port: Optional[int] = typer.Option(None, help="serve Prometheus metrics on 127.0.0.1:PORT; env AUTOGLM_METRICS_PORT"),
    max_in_flight: Optional[int] = typer.Option(None, help="tasks in flight at most (backpressure); env AUTOGLM_MAX_IN_FLIGHT"),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N; env AUTOGLM_DEVICE"),
    worker_id: Optional[str] = typer.Option(None, help="id written into results; env AUTOGLM_WORKER_ID"),
    log_level: Optional[str] = typer.Option(None, help="DEBUG, INFO, WARNING or ERROR; env AUTOGLM_LOG_LEVEL"),
    pipeline: Optional[list[Path]] = typer.Option(None, "--pipeline", help="also serve the steps of this "
                                                  "pipeline.yaml (repeatable); env AUTOGLM_PIPELINES (comma-separated). "
                                                  "With pipelines and no --models, only the pipelines are served"),
) -> None:
    """Serve models: consume task topics, micro-batch, infer, publish results.

    With no bootstrap servers configured, an embedded broker is started for the worker's lifetime.
    """
    settings = _settings(
        bootstrap_servers=bootstrap_servers, topic_prefix=prefix, models=models, model_repo=model_repo,
        partitions=partitions, batching_mode=batching_mode, latency_target_s=latency_target_s, metrics_port=metrics_port,
        max_batch_size=max_batch_size, max_wait_s=max_wait_s, max_in_flight=max_in_flight,
        device=device, worker_id=worker_id, log_level=log_level,
        pipelines=tuple(str(p) for p in pipeline) if pipeline else None,
    )
    _logging(settings.log_level)
    from autoglm.worker import run_worker

    raise typer.Exit(run_worker(settings))


@app.command()
def publish(
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="JSON lines, one task event per line ('-' for stdin)"),
    digits: Optional[int] = typer.Option(None, "--digits", help="publish N real digit images from the held-out split"),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="one text per line, for the minilm model"),
    model: str = typer.Option("minilm", help="model for --text-file"),
    id_prefix: Optional[str] = typer.Option(None, help="task ids are <id-prefix>-<n> (default: a random run id)"),
    validate: bool = typer.Option(True, help="check each --file line against the task contract before sending"),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help="publish to this pipeline's input topic "
                                           "(<prefix>.pipelines.NAME.in); --file lines then need only 'inputs', "
                                           "as dry-run samples"),
    topic: Optional[str] = typer.Option(None, "--topic", help="with --pipeline: its input topic when the pipeline "
                                        "file names its own"),
    bootstrap_servers: Optional[str] = BootstrapOpt,
    prefix: Optional[str] = PrefixOpt,
) -> None:
    """Publish task events (from a JSON-lines file, real digit images, or texts) to the models' topics
    or, with --pipeline, to a pipeline's input topic."""
    from autoglm import tasks as task_sources

    settings = _settings(bootstrap_servers=bootstrap_servers, topic_prefix=prefix)
    servers = _need_broker(settings)
    if sum(x is not None for x in (file, digits, text_file)) != 1:
        typer.echo("error: give exactly one of --file, --digits, --text-file", err=True)
        raise typer.Exit(2)
    run_id = id_prefix or uuid.uuid4().hex[:8]
    if topic is not None and pipeline is None:
        typer.echo("error: --topic goes with --pipeline (a model's tasks go to its own topic)", err=True)
        raise typer.Exit(2)
    into = (topic or f"{settings.topic_prefix}.pipelines.{pipeline}.in") if pipeline else None
    as_model = f"pipeline:{pipeline}" if pipeline else None
    try:
        if file is not None:
            records = task_sources.records_from_jsonl(file, settings.topic_prefix, validate=validate, topic=into,
                                                      model=as_model)
        elif digits is not None:
            records = task_sources.digit_records(digits, run_id, settings.topic_prefix, topic=into,
                                                 model=as_model or "digits")
        else:
            records = task_sources.text_records(text_file, run_id, settings.topic_prefix, as_model or model)
            if into is not None:
                records = [(into, key, value) for _, key, value in records]
        count = asyncio.run(task_sources.send_records(servers, records, _kafka_kwargs(settings)))
    except AutoGLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"published {count} tasks")


@app.command()
def results(
    from_beginning: bool = typer.Option(False, help="read the results topic from its start"),
    count: Optional[int] = typer.Option(None, help="stop after N results"),
    timeout_s: Optional[float] = typer.Option(None, help="stop after this many seconds without a result"),
    as_json: bool = typer.Option(False, "--json", help="print each result as a JSON line"),
    bootstrap_servers: Optional[str] = BootstrapOpt,
    prefix: Optional[str] = PrefixOpt,
) -> None:
    """Follow the results topic and print results as they arrive."""
    from autoglm.tasks import follow_results

    settings = _settings(bootstrap_servers=bootstrap_servers, topic_prefix=prefix)
    servers = _need_broker(settings)
    try:
        asyncio.run(follow_results(servers, settings.topic_prefix, from_beginning, count, timeout_s, as_json,
                                   _kafka_kwargs(settings)))
    except AutoGLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass


@app.command()
def demo(
    tasks: int = typer.Option(500, "--tasks", "-n", min=1, help="digit images to publish"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with the summary"),
    timeout_s: float = typer.Option(180.0, help="give up after this many seconds"),
    bootstrap_servers: Optional[str] = BootstrapOpt,
) -> None:
    """Run the whole loop: embedded broker, a worker, N real digit images, their results, a summary.

    Exits 1 when any task got no result.
    """
    from autoglm.demo import run_demo

    settings = _settings(bootstrap_servers=bootstrap_servers)
    try:
        summary = run_demo(settings, tasks=tasks, timeout_s=timeout_s, as_json=as_json)
    except AutoGLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(0 if summary["results"] == summary["tasks"] else 1)


ctl = typer.Typer(
    help="Steer running workers through the control topic: pause, resume, drain, configure, status.",
    no_args_is_help=True,
)
app.add_typer(ctl, name="ctl")

ModelOpt = typer.Option(None, "--model", "-m", help="only this model's streams: its own topic and every pipeline "
                                                    "step running it, or one step as PIPELINE/STEP (default: all)")
PipelineOpt = typer.Option(None, "--pipeline", "-p", help="only the steps of this pipeline (with --model: those "
                                                          "running that model)")
StepOpt = typer.Option(None, "--step", help="only this step of --pipeline")
WorkerOpt = typer.Option(None, "--worker", "-w", help="only this worker id (default: every worker)")
WaitOpt = typer.Option(False, "--wait", help="return when every live worker has acknowledged; exit 1 naming "
                                              "the workers that did not within --timeout-s")
TimeoutOpt = typer.Option(30.0, "--timeout-s", help="seconds --wait waits for acknowledgements")
JsonOpt = typer.Option(False, "--json", help="print the outcome as one JSON object")


def _control(command: str, *, model: Optional[str], worker_id: Optional[str], wait: bool, timeout_s: float,
             as_json: bool, bootstrap_servers: Optional[str], prefix: Optional[str],
             params: Optional[dict] = None, pipeline: Optional[str] = None, step: Optional[str] = None) -> None:
    from autoglm.streams.control import ControlClient

    if step and not pipeline:
        typer.echo("error: --step names a step within its pipeline: give --pipeline too", err=True)
        raise typer.Exit(2)
    settings = _settings(bootstrap_servers=bootstrap_servers, topic_prefix=prefix)
    servers = _need_broker(settings)

    async def go():
        async with ControlClient(servers, prefix=settings.topic_prefix, key=settings.control_key_bytes,
                                 client_kwargs=_kafka_kwargs(settings)) as client:
            return await client.command(command, model=model, worker=worker_id, params=params, wait=wait,
                                        timeout_s=timeout_s, pipeline=pipeline, step=step)

    try:
        outcome = asyncio.run(go())
    except (AutoGLMError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2 if isinstance(exc, ValueError) else 1) from None
    _print_outcome(outcome, wait=wait, as_json=as_json)
    targeted = {k: v for k, v in (("model", model), ("pipeline", pipeline), ("step", step)) if v}
    if wait and targeted and command in ("pause", "resume", "configure") and outcome.acks and all(
            a.get("streams") == [] for a in outcome.acks.values()):
        typer.echo(f"error: no live worker serves {' and '.join(f'{k} {v!r}' for k, v in targeted.items())} "
                   "(a typo?); the event stays in the control topic and applies to workers that serve it later",
                   err=True)
        raise typer.Exit(1)
    reports = {w: a["report"] for w, a in outcome.acks.items() if isinstance(a.get("report"), dict)}
    if reports and not as_json:
        _print_figures(reports, title=f"status reports of {len(reports)} worker(s)")
    if wait and (not outcome.ok or (worker_id is not None and outcome.live and worker_id not in outcome.live)):
        raise typer.Exit(1)


def _print_outcome(outcome, *, wait: bool, as_json: bool) -> None:
    import orjson

    ev = outcome.event
    if as_json:
        typer.echo(orjson.dumps({
            "event_id": ev.id, "command": ev.command, "target": ev.target, "params": ev.params,
            "expected": sorted(outcome.expected), "missing": sorted(outcome.missing),
            "elapsed_ms": round(outcome.elapsed_s * 1000.0, 1), "ok": outcome.ok, "acks": outcome.acks,
        }).decode())
        return
    what = f"{ev.command} {ev.target or 'all'}" + (f" {ev.params}" if ev.params else "")
    typer.echo(f"sent {what} (event {ev.id})")
    if not wait:
        return
    if not outcome.expected and not outcome.acks and outcome.live and ev.target.get("worker"):
        typer.echo(f"no live worker has id {ev.target['worker']!r} (live: {', '.join(sorted(outcome.live))}); "
                   "the event is kept in the control topic and applies if that worker starts", err=True)
        return
    if not outcome.expected and not outcome.acks:
        typer.echo("no live worker (none sent a heartbeat recently); the state is kept in the control topic "
                   "and applies to workers when they start")
        return
    for worker_id, ack in sorted(outcome.acks.items()):
        extra = f" {ack['reason']}" if ack.get("reason") else ""
        typer.echo(f"  {worker_id}: {ack.get('status')} in {ack['latency_ms']:.0f} ms{extra}")
    if outcome.missing:
        typer.echo(f"error: no acknowledgement within the timeout from: {', '.join(sorted(outcome.missing))}",
                   err=True)
    rejected = sorted(w for w, a in outcome.acks.items() if a.get("status") not in ("ok", "ignored"))
    if rejected:
        typer.echo(f"error: not applied by: {', '.join(rejected)}", err=True)


@ctl.command("pause")
def ctl_pause(model: Optional[str] = ModelOpt, pipeline: Optional[str] = PipelineOpt, step: Optional[str] = StepOpt,
              worker_id: Optional[str] = WorkerOpt, wait: bool = WaitOpt,
              timeout_s: float = TimeoutOpt, as_json: bool = JsonOpt,
              bootstrap_servers: Optional[str] = BootstrapOpt, prefix: Optional[str] = PrefixOpt) -> None:
    """Stop fetching tasks (in-flight tasks finish and commit). Survives rebalances and restarts."""
    _control("pause", model=model, worker_id=worker_id, wait=wait, timeout_s=timeout_s, as_json=as_json,
             bootstrap_servers=bootstrap_servers, prefix=prefix, pipeline=pipeline, step=step)


@ctl.command("resume")
def ctl_resume(model: Optional[str] = ModelOpt, pipeline: Optional[str] = PipelineOpt, step: Optional[str] = StepOpt,
              worker_id: Optional[str] = WorkerOpt, wait: bool = WaitOpt,
               timeout_s: float = TimeoutOpt, as_json: bool = JsonOpt,
               bootstrap_servers: Optional[str] = BootstrapOpt, prefix: Optional[str] = PrefixOpt) -> None:
    """Fetch again; without --model/--pipeline it also ends a drain."""
    _control("resume", model=model, worker_id=worker_id, wait=wait, timeout_s=timeout_s, as_json=as_json,
             bootstrap_servers=bootstrap_servers, prefix=prefix, pipeline=pipeline, step=step)


@ctl.command("drain")
def ctl_drain(worker_id: Optional[str] = WorkerOpt, wait: bool = WaitOpt, timeout_s: float = TimeoutOpt,
              as_json: bool = JsonOpt, bootstrap_servers: Optional[str] = BootstrapOpt,
              prefix: Optional[str] = PrefixOpt) -> None:
    """Stop fetching, finish and commit everything in flight, then acknowledge (before a deploy)."""
    _control("drain", model=None, worker_id=worker_id, wait=wait, timeout_s=timeout_s, as_json=as_json,
             bootstrap_servers=bootstrap_servers, prefix=prefix)


@ctl.command("configure")
def ctl_configure(
    model: Optional[str] = ModelOpt,
    pipeline: Optional[str] = PipelineOpt,
    step: Optional[str] = StepOpt,
    worker_id: Optional[str] = WorkerOpt,
    latency_target_s: Optional[float] = typer.Option(None, help="p99 end-to-end target of the adaptive batcher, s"),
    max_batch_size: Optional[int] = typer.Option(None, help="tasks per micro-batch at most"),
    max_wait_s: Optional[float] = typer.Option(None, help="seconds a fixed-mode batch waits for more tasks"),
    mode: Optional[str] = typer.Option(None, help="adaptive or fixed"),
    wait: bool = WaitOpt, timeout_s: float = TimeoutOpt, as_json: bool = JsonOpt,
    bootstrap_servers: Optional[str] = BootstrapOpt, prefix: Optional[str] = PrefixOpt,
) -> None:
    """Re-tune batching while running (kept in the control topic, so restarted workers get it too)."""
    params = {k: v for k, v in (("latency_target_s", latency_target_s), ("max_batch_size", max_batch_size),
                                ("max_wait_s", max_wait_s), ("mode", mode)) if v is not None}
    _control("configure", model=model, worker_id=worker_id, wait=wait, timeout_s=timeout_s, as_json=as_json,
             bootstrap_servers=bootstrap_servers, prefix=prefix, params=params, pipeline=pipeline, step=step)


@ctl.command("status")
def ctl_status(worker_id: Optional[str] = WorkerOpt, timeout_s: float = TimeoutOpt, as_json: bool = JsonOpt,
               bootstrap_servers: Optional[str] = BootstrapOpt, prefix: Optional[str] = PrefixOpt) -> None:
    """Ask every live worker for its state and wait for the answers."""
    _control("status", model=None, worker_id=worker_id, wait=True, timeout_s=timeout_s, as_json=as_json,
             bootstrap_servers=bootstrap_servers, prefix=prefix)


def _model_command(command: str, model: str, worker_id: Optional[str], wait: bool, timeout_s: float,
                   as_json: bool, bootstrap_servers: Optional[str], prefix: Optional[str]) -> None:
    _control(command, model=model, worker_id=worker_id, wait=wait, timeout_s=timeout_s, as_json=as_json,
             bootstrap_servers=bootstrap_servers, prefix=prefix)


RequiredModelOpt = typer.Option(..., "--model", "-m", help="the model's name (a repository folder or a built-in)")


@ctl.command("load")
def ctl_load(model: str = RequiredModelOpt, worker_id: Optional[str] = WorkerOpt, wait: bool = WaitOpt,
             timeout_s: float = TimeoutOpt, as_json: bool = JsonOpt,
             bootstrap_servers: Optional[str] = BootstrapOpt, prefix: Optional[str] = PrefixOpt) -> None:
    """Load and warm up a model on the workers, then serve it (kept in the control topic: later workers load it too)."""
    _model_command("load", model, worker_id, wait, timeout_s, as_json, bootstrap_servers, prefix)


@ctl.command("unload")
def ctl_unload(model: str = RequiredModelOpt, worker_id: Optional[str] = WorkerOpt, wait: bool = WaitOpt,
               timeout_s: float = TimeoutOpt, as_json: bool = JsonOpt,
               bootstrap_servers: Optional[str] = BootstrapOpt, prefix: Optional[str] = PrefixOpt) -> None:
    """Stop serving a model: its tasks in flight finish and commit, then its memory is released."""
    _model_command("unload", model, worker_id, wait, timeout_s, as_json, bootstrap_servers, prefix)


@ctl.command("reload")
def ctl_reload(model: str = RequiredModelOpt, worker_id: Optional[str] = WorkerOpt, wait: bool = WaitOpt,
               timeout_s: float = TimeoutOpt, as_json: bool = JsonOpt,
               bootstrap_servers: Optional[str] = BootstrapOpt, prefix: Optional[str] = PrefixOpt) -> None:
    """Re-read a model from the repository and swap it in; a failed reload keeps the old version serving."""
    _model_command("reload", model, worker_id, wait, timeout_s, as_json, bootstrap_servers, prefix)


models_app = typer.Typer(help="Model repositories: validate a repository before deploying it, list what is served.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("validate")
def models_validate(
    repo: Path = typer.Argument(..., help="the repository folder (DIR/<name>/model.yaml)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="only this model"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per model, as a list"),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N for models whose device is auto"),
    repeats: int = typer.Option(5, min=1, help="timed runs per batch (the median is shown)"),
) -> None:
    """Load each model, run its warm-up, check its outputs against model.yaml, time batch-1 and max-batch.

    Exits 0 when every model passes, 2 otherwise (each error names the file, the key and the expected value).
    """
    _logging("WARNING")
    from autoglm.models.validate import validate_repository

    try:
        rows = validate_repository(repo, [model] if model else None,
                                   device=None if device in (None, "auto") else device, repeats=repeats)
    except AutoGLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not rows:
        typer.echo(f"error: {repo} holds no <name>/model.yaml", err=True)
        raise typer.Exit(2)
    if as_json:
        import orjson

        typer.echo(orjson.dumps([r.as_dict() for r in rows]).decode())
    else:
        _print_validation(rows)
    raise typer.Exit(0 if all(r.ok for r in rows) else 2)


def _print_validation(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    passed = sum(r.ok for r in rows)
    table = Table(title=f"{passed} of {len(rows)} model(s) pass")
    for col in ("model", "format", "device", "inputs", "outputs", "batch-1 ms", "max-batch ms", "result"):
        table.add_column(col, justify="right" if col.endswith("ms") else "left")
    for r in rows:
        fmt = "-" if r.batch1_ms is None else f"{r.batch1_ms:.2f}"
        big = "-" if r.max_batch_ms is None else f"{r.max_batch_ms:.2f} ({r.max_batch})"
        table.add_row(r.model, r.format, r.device, r.inputs, r.outputs, fmt, big, "ok" if r.ok else "FAILED")
    Console(width=None if sys.stdout.isatty() else 250, soft_wrap=not sys.stdout.isatty()).print(table)
    for r in rows:
        if not r.ok:
            typer.echo(f"error: {r.model}: {r.error}", err=True)


@models_app.command("list")
def models_list(
    model_repo: Optional[str] = typer.Option(None, "--model-repo", help="repository folder; env AUTOGLM_MODEL_REPO"),
    as_json: bool = typer.Option(False, "--json", help="print the list as JSON"),
) -> None:
    """List the models a worker can serve: the repository's (with their version) and the built-ins."""
    from autoglm.models.repository import ModelRepository

    root = model_repo or _env_model_repo()
    try:
        rows = ModelRepository(root).describe()
    except AutoGLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        import orjson

        typer.echo(orjson.dumps(rows).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} model(s)" + (f" (repository {root})" if root else ""))
    for col in ("model", "source", "format", "inputs", "outputs", "max rows", "fallback", "version"):
        table.add_column(col)
    for r in rows:
        version = r.get("version") or {}
        shown = "built-in" if version.get("builtin") else f"{version.get('sha256')} @ {version.get('mtime_ms')}"
        if r.get("error"):
            table.add_row(r["name"], r["source"], "-", "-", "-", "-", "-", "INVALID: " + r["error"])
            continue
        table.add_row(r["name"], r["source"], r["format"], r["inputs"] or "see description",
                      r["outputs"] or r["description"], str(r["max_rows"] or "-"), r["fallback"] or "-", shown)
    Console(width=None if sys.stdout.isatty() else 250, soft_wrap=not sys.stdout.isatty()).print(table)


@app.command()
def infer(
    model: str = typer.Option(..., "--model", "-m", help="the model to run"),
    input_file: Path = typer.Option(..., "--input", "-i", help="JSON file holding the task's inputs: a tensor "
                                    "{dtype, shape, data}, a nested list of numbers, a text, a list of texts, or "
                                    "{name: tensor} ('-' for stdin)"),
    deadline_s: Optional[float] = typer.Option(None, help="seconds from now after which the task expires"),
    priority: Optional[int] = typer.Option(None, help="higher is served first"),
    timeout_s: float = typer.Option(30.0, help="seconds to wait for the result"),
    bootstrap_servers: Optional[str] = BootstrapOpt,
    prefix: Optional[str] = PrefixOpt,
) -> None:
    """Run one task through the workers (request/reply on a private reply topic) and print its result as JSON.

    Exits 1 when the result is not ok (expired, rejected, error) or none arrives within --timeout-s.
    """
    import orjson

    from autoglm.streams.client import Client
    from autoglm.streams.codec import loads
    from autoglm.streams.events import TASK_SCHEMA, decode_task

    settings = _settings(bootstrap_servers=bootstrap_servers, topic_prefix=prefix)
    servers = _need_broker(settings)
    try:
        raw = sys.stdin.buffer.read() if str(input_file) == "-" else input_file.read_bytes()
        task = decode_task(orjson.dumps({"schema": TASK_SCHEMA, "id": "cli", "model": model, "inputs": loads(raw)}))
    except OSError as exc:
        typer.echo(f"error: cannot read --input {input_file}: {exc}", err=True)
        raise typer.Exit(2) from None
    except AutoGLMError as exc:
        typer.echo(f"error: --input {input_file}: {exc}", err=True)
        raise typer.Exit(2) from None

    async def go():
        async with Client(servers, prefix=settings.topic_prefix, client_kwargs=_kafka_kwargs(settings)) as client:
            return (await client.results(model, [task.inputs], priority=priority, deadline_s=deadline_s,
                                         timeout_s=timeout_s))[0]

    try:
        result = asyncio.run(go())
    except AutoGLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    outputs = result.outputs
    shown = (outputs.tolist() if hasattr(outputs, "tolist")
             else {k: v.tolist() for k, v in outputs.items()} if outputs is not None else None)
    typer.echo(orjson.dumps({
        "id": result.id, "model": result.model, "status": result.status, "outputs": shown,
        "error": None if result.error is None else {"code": result.error.code, "message": result.error.message},
        "batch_size": result.batch_size, "worker": result.worker, "end_to_end_ms": result.end_to_end_ms,
    }).decode())
    raise typer.Exit(0 if result.status == "ok" else 1)


def _env_model_repo() -> Optional[str]:
    import os

    return os.environ.get("AUTOGLM_MODEL_REPO") or None


@app.command()
def status(
    as_json: bool = JsonOpt,
    bootstrap_servers: Optional[str] = BootstrapOpt,
    prefix: Optional[str] = PrefixOpt,
) -> None:
    """Print a table of the live workers and their models, from their latest heartbeats."""
    from autoglm.streams.control import ControlClient

    settings = _settings(bootstrap_servers=bootstrap_servers, topic_prefix=prefix)
    servers = _need_broker(settings)

    async def go():
        async with ControlClient(servers, prefix=settings.topic_prefix,
                                 client_kwargs=_kafka_kwargs(settings)) as client:
            return await client.live_workers()

    try:
        live = asyncio.run(go())
    except AutoGLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        import orjson

        typer.echo(orjson.dumps(live).decode())
        return
    _print_figures(live, title=f"{len(live)} live worker(s)")


#: What each column of the status tables covers (README "Status events").
FIGURE_WINDOWS = ("tasks/s, p50, p99, batch: the last heartbeat interval (window s); served, errors: since the "
                  "worker started; target, queue, lag, in flight: when the report was built")


def _print_figures(reports: dict, *, title: str) -> None:
    """One row per worker and model from status reports (heartbeats or ``ctl status`` acks)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=FIGURE_WINDOWS)
    for col in ("worker", "model", "state", "tasks/s", "p50 ms", "p99 ms", "batch", "window s", "served", "errors",
                "target", "queue", "lag", "in flight"):
        table.add_column(col, justify="left" if col in ("worker", "model", "state") else "right")

    def num(value, fmt="{:.1f}") -> str:
        return "-" if value is None else fmt.format(value)

    for worker_id, hb in sorted(reports.items()):
        state = hb.get("state", {})
        cap = hb.get("max_in_flight")
        in_flight = num(hb.get("in_flight"), "{}") + (f"/{cap}" if cap else "")
        for model, fig in sorted(hb.get("models", {}).items()):
            mstate = state.get("models", {}).get(model, {})
            label = ("drained" if state.get("drained") else "draining" if state.get("draining")
                     else "paused" if mstate.get("paused") else "running")
            totals = fig.get("totals") or {}
            errors = sum(v for k, v in totals.items() if k != "ok") if totals else None
            table.add_row(worker_id, model, label, num(fig.get("throughput_per_s")), num(fig.get("p50_ms")),
                          num(fig.get("p99_ms")), num(fig.get("mean_batch_size")), num(hb.get("window_s")),
                          num(fig.get("served_total"), "{}"), num(errors, "{}"),
                          num(fig.get("target_size"), "{}"), num(fig.get("queue_depth"), "{}"),
                          num(fig.get("lag"), "{}"), in_flight)
    # not a terminal (a pipe, grep): never wrap or cut the cells
    Console(width=None if sys.stdout.isatty() else 250, soft_wrap=not sys.stdout.isatty()).print(table)
    for worker_id, hb in sorted(reports.items()):
        worker_totals = hb.get("totals")
        if worker_totals:
            shown = ", ".join(f"{k} {v}" for k, v in worker_totals.items())
            typer.echo(f"{worker_id} since start ({num(hb.get('uptime_s'), '{:.0f}')} s): {shown}")


@app.command()
def console(
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: this machine only)"),
    port: int = typer.Option(8321, "--port", min=0, max=65535, help="port to bind"),
    ack_timeout_s: float = typer.Option(30.0, "--ack-timeout-s", min=0.1,
                                        help="seconds before a targeted worker without an ack shows as missing"),
    bootstrap_servers: Optional[str] = BootstrapOpt,
    prefix: Optional[str] = PrefixOpt,
) -> None:
    """Serve the ops page: live workers and models over Server-Sent Events, pause/resume/drain/configure.

    Every request needs the token (AUTOGLM_CONSOLE_TOKEN, or a random one printed at start);
    control events are signed with AUTOGLM_CONTROL_KEY when it is set.
    """
    settings = _settings(bootstrap_servers=bootstrap_servers, topic_prefix=prefix)
    servers = _need_broker(settings)
    logging.getLogger("autoglm").setLevel(settings.log_level)
    logging.getLogger("aiohttp.access").setLevel(logging.INFO)
    from aiohttp import web

    from autoglm.streams.console.feed import ConsoleFeed
    from autoglm.streams.console.guard import new_token
    from autoglm.streams.console.web import Console, PathOnlyAccessLogger

    given = settings.console_token.get_secret_value() if settings.console_token is not None else None
    token = given or new_token()
    kwargs = _kafka_kwargs(settings)
    server = Console(
        lambda on_status, on_dead_letter: ConsoleFeed(
            servers, prefix=settings.topic_prefix, on_status=on_status, on_dead_letter=on_dead_letter,
            control_key=settings.control_key_bytes, client_kwargs=kwargs),
        token=token, ack_timeout_s=ack_timeout_s,
    )
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    if given:
        typer.echo(f"ops console on http://{shown}:{port}/ (token from AUTOGLM_CONSOLE_TOKEN)")
    else:  # like Jupyter: the URL with a fresh token, on the terminal only (never in a log)
        typer.echo(f"ops console on http://{shown}:{port}/login?token={token}")
    signing = "signed with AUTOGLM_CONTROL_KEY" if settings.control_key is not None else "unsigned"
    typer.echo(f"topics {settings.topic_prefix}.status / .dlq on {','.join(servers)}; control events {signing}")
    # shutdown_timeout: open event streams (browsers) would otherwise hold a stop for aiohttp's 60 s
    web.run_app(server.app(), host=host, port=port, print=None, access_log_class=PathOnlyAccessLogger,
                handle_signals=True, shutdown_timeout=3.0)


pipeline_app = typer.Typer(help="Pipelines of models (a DAG declared in YAML): validate and dry-run with no broker, "
                                "run on Kafka.",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
PipelineRepoOpt = typer.Option(None, "--model-repo", help="model repository folder the steps' models come from "
                               "(beside the built-ins); env AUTOGLM_MODEL_REPO")


def _load_pipeline(file: Path, model_repo: Optional[str], as_json: bool):
    """The validated pipeline, or every error on stderr (a JSON object on stdout with --json) and exit 2."""
    from autoglm.pipelines import validate_file

    try:
        pipeline, errors = validate_file(file, model_repo or _env_model_repo())
    except AutoGLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if errors:
        if as_json:
            import orjson

            typer.echo(orjson.dumps({"ok": False, "errors": [e.as_dict() for e in errors]}).decode())
        for e in errors:
            typer.echo(f"error: {e}", err=True)
        typer.echo(f"{len(errors)} error(s) in {file}", err=True)
        raise typer.Exit(2)
    return pipeline


@pipeline_app.command("validate")
def pipeline_validate(
    file: Path = typer.Argument(..., help="the pipeline.yaml"),
    model_repo: Optional[str] = PipelineRepoOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object: ok, errors or the DAG"),
) -> None:
    """Check a pipeline: YAML, keys, references, cycles, names, models and their signatures.

    Exits 2 with every error found (file:line: key: reason); a valid file exits 0 and prints the DAG in
    topological order with each step's inputs, condition and latency target.
    """
    from autoglm.pipelines import describe

    pipeline = _load_pipeline(file, model_repo, as_json)
    dag = describe(pipeline)
    if as_json:
        import orjson

        typer.echo(orjson.dumps({"ok": True, "errors": [], "pipeline": dag}).decode())
        return
    target = f"{pipeline.latency_target_s:g} s" if pipeline.latency_target_s is not None else "none"
    typer.echo(f"pipeline {pipeline.name}: {len(pipeline.steps)} step(s), input topic "
               f"{pipeline.input_topic or '<prefix>.pipelines.' + pipeline.name + '.in'}, latency target {target}")
    for i, s in enumerate(dag["steps"], 1):
        step_target = "-" if s["latency_target_s"] is None else f"{s['latency_target_s']:.4g} s"
        typer.echo(f"  {i}. {s['name']} ({s['model']}) <- {', '.join(s['inputs'])}"
                   + (f" when {' and '.join(s['when'])}" if s["when"] else "")
                   + (f" [join {s['join_window_ms']} ms]" if s["join_window_ms"] else "")
                   + f"; latency target {step_target}")
    typer.echo(f"  output: {', '.join(f'{k} = {v}' for k, v in dag['output'].items())}")


@pipeline_app.command("dry-run")
def pipeline_dry_run(
    file: Path = typer.Argument(..., help="the pipeline.yaml"),
    inputs: Path = typer.Option(..., "--inputs", "-i", help="JSON lines, one task per line: inputs (and "
                                "attributes, id) as in the task event format"),
    model_repo: Optional[str] = PipelineRepoOpt,
    device: str = typer.Option("cpu", help="auto, cpu, cuda or cuda:N"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object: per task its result and "
                                 "intermediate shapes, per step its batches"),
) -> None:
    """Run sample tasks through the pipeline in this process with the real models, no broker.

    Prints per task the intermediate outputs' shapes and the final result, per step the batch sizes and
    service times. Exits 2 on an invalid pipeline or samples file, 1 when a task's result is an error.
    """
    _logging("WARNING")
    from autoglm.pipelines import dry_run, read_samples

    pipeline = _load_pipeline(file, model_repo, as_json)
    try:
        tasks = read_samples(inputs, pipeline)
        run = dry_run(pipeline, tasks, model_repo=model_repo or _env_model_repo(), device=device)
    except AutoGLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        import orjson

        typer.echo(orjson.dumps(run.as_dict()).decode())
    else:
        _print_dry_run(run)
    raise typer.Exit(1 if any(r.status != "ok" for r in run.results) else 0)


@pipeline_app.command("run")
def pipeline_run(
    file: Path = typer.Argument(..., help="the pipeline.yaml"),
    model_repo: Optional[str] = PipelineRepoOpt,
    bootstrap_servers: Optional[str] = BootstrapOpt,
    prefix: Optional[str] = PrefixOpt,
    partitions: Optional[int] = typer.Option(None, help="partitions of topics created at start; env AUTOGLM_PARTITIONS"),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N; env AUTOGLM_DEVICE"),
    worker_id: Optional[str] = typer.Option(None, help="id written into results; env AUTOGLM_WORKER_ID"),
    metrics_port: Optional[int] = typer.Option(None, help="serve Prometheus metrics on 127.0.0.1:PORT"),
    log_level: Optional[str] = typer.Option(None, help="DEBUG, INFO, WARNING or ERROR; env AUTOGLM_LOG_LEVEL"),
) -> None:
    """Run a pipeline on Kafka: a worker serving its steps (the same as `autoglm worker --pipeline FILE`).

    Validates the file first (exit 2 with every error), creates the input topic
    (<prefix>.pipelines.<name>.in unless the file names one) and the intermediate topics
    (<prefix>.pipelines.<name>.<step>), and serves every step with adaptive batching, dead letters and
    the control plane (`autoglm ctl pause --pipeline NAME`). Start it on as many machines as you like:
    workers share the steps' partitions through the consumer group. Results go to the task's reply_to or
    <prefix>.results, with the pipeline's name and per-step timings.
    """
    _load_pipeline(file, model_repo, False)  # every error, with file and line, before any broker or model
    settings = _settings(
        bootstrap_servers=bootstrap_servers, topic_prefix=prefix, model_repo=model_repo, partitions=partitions,
        device=device, worker_id=worker_id, metrics_port=metrics_port, log_level=log_level, pipelines=(str(file),),
    )
    _logging(settings.log_level)
    from autoglm.worker import run_worker

    raise typer.Exit(run_worker(settings))


def _print_dry_run(run) -> None:
    import numpy as np

    def shape(v) -> str:
        a = np.asarray(v)
        return f"{a.dtype} {tuple(a.shape)}"

    for result, state in zip(run.results, run.states):
        typer.echo(f"task {result.id}: {result.status}"
                   + (f" ({result.error['code']}: {result.error['message']})" if result.error else "")
                   + (f"  attributes {dict(result.attributes)}" if result.attributes else ""))
        for step in run.pipeline.steps:
            if step.name in state.outputs:
                shown = ", ".join(f"{k} {shape(v)}" for k, v in state.outputs[step.name].items())
            else:
                shown = state.skipped.get(step.name) or f"failed: {state.errors[step.name].message}"
            typer.echo(f"  {step.name}: {shown}")
        for name, value in result.outputs.items():
            text = np.array2string(np.asarray(value), precision=4, threshold=40, max_line_width=200)
            typer.echo(f"  => {name} = {' '.join(text.split())}")
    typer.echo("steps:")
    measured = run.measured_targets()
    for s in run.steps:
        ms = ", ".join(f"{t * 1e3:.2f}" for t in s.service_s) or "-"
        target = "" if s.latency_target_s is None else (
            f"; latency target {s.latency_target_s:.4g} s (split by measured service: {measured[s.name]:.4g} s)")
        typer.echo(f"  {s.name} ({s.model}): {s.ran} ran, {s.skipped} skipped, {s.failed} failed; batch sizes "
                   f"{s.batch_sizes or '-'}; service ms {ms}{target}")


def main() -> None:
    """Console entry point."""
    app()
