"""The ``autoglm`` command: worker, publish, results, demo."""

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


def _need_broker(settings: Settings) -> list[str]:
    if settings.embedded:
        typer.echo("error: set --bootstrap-servers or AUTOGLM_BOOTSTRAP_SERVERS (the address of the broker "
                   "the worker uses)", err=True)
        raise typer.Exit(2)
    return settings.bootstrap_list


@app.command()
def worker(
    bootstrap_servers: Optional[str] = BootstrapOpt,
    prefix: Optional[str] = PrefixOpt,
    models: Optional[str] = typer.Option(None, "--models", "-m", help="comma-separated model names; env AUTOGLM_MODELS (default digits)"),
    partitions: Optional[int] = typer.Option(None, help="partitions of topics created at start; env AUTOGLM_PARTITIONS"),
    batching_mode: Optional[str] = typer.Option(None, help="adaptive or fixed; env AUTOGLM_BATCHING_MODE (default adaptive)"),
    latency_target_s: Optional[float] = typer.Option(None, help="p99 end-to-end target of the adaptive batcher, seconds; env AUTOGLM_LATENCY_TARGET_S (default 0.1)"),
    max_batch_size: Optional[int] = typer.Option(None, help="tasks per micro-batch at most; env AUTOGLM_MAX_BATCH_SIZE (default 64)"),
    max_wait_s: Optional[float] = typer.Option(None, help="fixed mode: seconds a batch waits for more tasks; env AUTOGLM_MAX_WAIT_S"),
    metrics_port: Optional[int] = typer.Option(None, help="serve Prometheus metrics on 127.0.0.1:PORT; env AUTOGLM_METRICS_PORT"),
    max_in_flight: Optional[int] = typer.Option(None, help="tasks in flight at most (backpressure); env AUTOGLM_MAX_IN_FLIGHT"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda; env AUTOGLM_DEVICE"),
    worker_id: Optional[str] = typer.Option(None, help="id written into results; env AUTOGLM_WORKER_ID"),
    log_level: Optional[str] = typer.Option(None, help="DEBUG, INFO, WARNING; env AUTOGLM_LOG_LEVEL"),
) -> None:
    """Serve models: consume task topics, micro-batch, infer, publish results.

    With no bootstrap servers configured, an embedded broker is started for the worker's lifetime.
    """
    settings = _settings(
        bootstrap_servers=bootstrap_servers, topic_prefix=prefix, models=models, partitions=partitions,
        batching_mode=batching_mode, latency_target_s=latency_target_s, metrics_port=metrics_port,
        max_batch_size=max_batch_size, max_wait_s=max_wait_s, max_in_flight=max_in_flight,
        device=device, worker_id=worker_id, log_level=log_level,
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
    bootstrap_servers: Optional[str] = BootstrapOpt,
    prefix: Optional[str] = PrefixOpt,
) -> None:
    """Publish task events (from a JSON-lines file, real digit images, or texts)."""
    from autoglm import tasks as task_sources

    settings = _settings(bootstrap_servers=bootstrap_servers, topic_prefix=prefix)
    servers = _need_broker(settings)
    if sum(x is not None for x in (file, digits, text_file)) != 1:
        typer.echo("error: give exactly one of --file, --digits, --text-file", err=True)
        raise typer.Exit(2)
    run_id = id_prefix or uuid.uuid4().hex[:8]
    try:
        if file is not None:
            records = task_sources.records_from_jsonl(file, settings.topic_prefix, validate=validate)
        elif digits is not None:
            records = task_sources.digit_records(digits, run_id, settings.topic_prefix)
        else:
            records = task_sources.text_records(text_file, run_id, settings.topic_prefix, model)
        count = asyncio.run(task_sources.send_records(servers, records))
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
        asyncio.run(follow_results(servers, settings.topic_prefix, from_beginning, count, timeout_s, as_json))
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


def main() -> None:
    """Console entry point."""
    app()
