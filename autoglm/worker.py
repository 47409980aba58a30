"""Assembly of a worker process: broker, topics, models, faust app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from autoglm.config import Settings
from autoglm.errors import AutoGLMError, ConfigError
from autoglm.models import ModelRunner
from autoglm.processors.metrics import BatchMetrics, PrometheusMetrics
from autoglm.streams.embedded import EmbeddedBroker
from autoglm.streams.security import client_kwargs
from autoglm.streams.topics import TopicNames, ensure_topics

if TYPE_CHECKING:
    from autoglm.streams.app import WorkerConfig
    from autoglm.streams.hops import StepStage
    from autoglm.streams.tracing import BatchTracing

log = logging.getLogger(__name__)

#: Group timeouts for the embedded broker, whose group join waits about half of them.
EMBEDDED_GROUP_TIMEOUTS = {"rebalance_timeout_s": 6.0, "session_timeout_s": 6.0, "heartbeat_interval_s": 1.0}


@contextlib.contextmanager
def broker_for(settings: Settings) -> Iterator[Settings]:
    """Yield settings that point at a broker: the configured one, or an embedded one started here.

    The embedded broker is stopped on exit. With it, the group rebalance
    timeout is lowered to 6 s (its group join waits about half of it).
    """
    if not settings.embedded:
        yield settings
        return
    with EmbeddedBroker() as broker:
        log.info("no bootstrap servers configured: embedded broker on %s", broker.bootstrap_servers)
        yield settings.model_copy(
            update={"bootstrap_servers": broker.bootstrap_servers, **EMBEDDED_GROUP_TIMEOUTS}
        )


def prepare_topics(settings: Settings, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Create the topics of ``settings.models`` (and ``extra``: a pipeline's) when absent; returns the
    created names."""
    return asyncio.run(
        ensure_topics(
            settings.bootstrap_list,
            TopicNames(settings.topic_prefix),
            settings.models,
            partitions=settings.partitions,
            replication_factor=settings.replication_factor,
            max_message_bytes=settings.max_message_bytes,
            client_kwargs=client_kwargs(settings),
            extra=extra,
        )
    )


async def check_transactions(settings: Settings, timeout_s: float = 15.0) -> None:
    """Fail fast when the broker cannot run transactions (exactly_once needs them).

    Raises:
        BrokerError: the transactional producer could not be initialised.
    """
    from autoglm.streams.transactions import TransactionalSettler

    probe = TransactionalSettler(
        settings.bootstrap_list, transactional_id=f"autoglm-{settings.consumer_group}-{settings.worker_id}",
        group_id=settings.consumer_group, client_kwargs=client_kwargs(settings),
    )
    await probe.start(timeout_s=timeout_s)
    await probe.stop()


def worker_torch_threads(settings: Settings) -> int | None:
    """Torch intra-op threads of a worker's models: ``TORCH_THREADS`` when set; otherwise, for a
    worker that may run on the CPU, the usable cores less one (at least 1), so that the event loop
    keeps a core; None (torch's default) when the device is CUDA.

    Why: with torch's default (one thread per core) the model's OpenMP threads spin against the
    event loop for the same cores. On this project's 2-core machine a `digits` worker drained a
    backlog 4-5x faster with one intra-op thread than with two, at a quarter of the CPU per task
    (README "Inside a worker").
    """
    if settings.torch_threads is not None:
        return settings.torch_threads
    if settings.device.startswith("cuda"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cores - 1)


def load_runners(settings: Settings) -> dict[str, ModelRunner]:
    """Construct, load and warm up one runner per served model (blocking).

    Models come from ``settings.model_repo`` (every spec checked before any
    model is built) and the built-ins. All or nothing: when one model fails,
    the runners already started are closed before the error propagates.

    Raises:
        UnknownModelError: a name (or a fallback's) is neither in the repository nor built in.
        ModelSpecError: a ``model.yaml`` is invalid, or its model contradicts it at warm-up.
        ConfigError: a fallback cannot stand in for its model.
        ModelLoadError: a model failed to load (and its fallback too, when it has one).
    """
    return _start_runners(settings, settings.models, "model")


def _start_runners(settings: Settings, models: tuple[str, ...] | list[str], what: str) -> dict[str, ModelRunner]:
    """One started runner per name of ``models`` (all or nothing; see :func:`load_runners`)."""
    from autoglm.models.repository import ModelRepository

    if not models:
        return {}
    registry = ModelRepository(settings.model_repo).registry(models)
    device = None if settings.device == "auto" else settings.device
    for name, fallback in settings.fallbacks.items():
        registry.set_fallback(name, fallback)
    runners: dict[str, ModelRunner] = {}
    try:
        for name in models:
            runner = registry.create_runner(name, device=device, torch_threads=worker_torch_threads(settings),
                                            max_failures=settings.fallback_max_failures,
                                            probe_every=settings.fallback_probe_every)
            runners[name] = runner
            runner.start_sync()
            log.info("%s %s loaded on %s in %.2f s", what, name, runner.device, runner.load_s or 0.0)
    except BaseException:
        for runner in runners.values():
            runner.close(wait=True)
        raise
    return runners


def load_pipeline_stages(settings: Settings) -> dict[str, "StepStage"]:
    """The steps of ``settings.pipelines`` as worker streams (``<pipeline>/<step>`` -> StepStage).

    Raises:
        PipelineInvalidError: a pipeline file has problems (every one, with file and line).
        ConfigError: two pipelines share a name, or their topics collide.
    """
    from autoglm.pipelines import load_pipeline, signature_lookup
    from autoglm.models.repository import ModelRepository
    from autoglm.streams.hops import stages_of

    names = TopicNames(settings.topic_prefix)
    lookup = signature_lookup(ModelRepository(settings.model_repo))
    stages: dict[str, StepStage] = {}
    seen: dict[str, str] = {}
    for path in settings.pipelines:
        pipeline = load_pipeline(path, settings.model_repo)
        if pipeline.name in seen:
            raise ConfigError(f"pipelines (AUTOGLM_PIPELINES): {path} and {seen[pipeline.name]} are both named "
                              f"{pipeline.name!r}; a name must be unique (its topics carry it)")
        seen[pipeline.name] = str(path)
        specs = {s.model: lookup(s.model) for s in pipeline.steps}
        signatures = {m: ([p.name for p in spec.inputs], [p.name for p in spec.outputs]) for m, spec in specs.items()}
        for stage in stages_of(pipeline, names, signatures, max_hop_bytes=settings.max_result_bytes):
            stages[stage.name] = stage
    topics = [st.topic for st in stages.values()]
    clash = {t for t in topics if topics.count(t) > 1}
    if clash:
        raise ConfigError(f"pipelines (AUTOGLM_PIPELINES): topic(s) {sorted(clash)} read by two pipelines; give "
                          "each pipeline its own input topic")
    for stage in stages.values():
        if stage.index == 0 and (why := _not_an_input_topic(stage.topic, stage.pipeline.name, names)):
            raise ConfigError(f"{stage.pipeline.source}: key 'input.topic': {stage.topic!r} is {why}; expected a "
                              f"topic of this pipeline's own (default {names.pipeline_input(stage.pipeline.name)!r})")
    return stages


def _not_an_input_topic(topic: str, pipeline: str, names: TopicNames) -> str:
    """Why ``topic`` cannot be a pipeline's input topic ("" when it can): the engine's own topics
    would feed results, dead letters, control events or another pipeline's hops back in as tasks
    (reading ``<prefix>.results`` loops: each result is rejected with a new result)."""
    prefix = names.prefix
    own = {names.results: "the results topic", names.dlq: "the dead-letter topic",
           names.control: "the control topic", names.status: "the status topic"}
    if topic in own:
        return own[topic]
    if topic.startswith(f"{prefix}.tasks."):
        return "a model's task topic"
    if topic.startswith(f"{prefix}.replies."):
        return "a client's reply topic"
    if topic.startswith(f"{prefix}.pipelines.") and topic != names.pipeline_input(pipeline):
        return "another pipeline's topic (an input or intermediate topic)"
    return ""


def load_step_runners(settings: Settings, stages: dict[str, "StepStage"]) -> dict[str, ModelRunner]:
    """One started runner per model the pipeline steps run (shared by the steps running it; apart from
    the runners of the models served on their own topics, so that ``ctl unload``/``reload`` of a model
    leaves the pipelines alone). Returns stream name -> runner. All or nothing, as :func:`load_runners`.
    """
    by_model = _start_runners(settings, sorted({st.step.model for st in stages.values()}), "pipeline model")
    return {stream: by_model[st.step.model] for stream, st in stages.items()}


def worker_config(settings: Settings) -> "WorkerConfig":
    """The Kafka side's view of the settings (:class:`~autoglm.streams.app.WorkerConfig`)."""
    from autoglm.streams.app import WorkerConfig
    from autoglm.streams.consumer import ConsumerConfig

    consumer = ConsumerConfig(
        bootstrap_servers=settings.bootstrap_list, group_id=settings.consumer_group, topics=(),
        max_in_flight=settings.max_in_flight, max_task_bytes=settings.max_task_bytes,
        max_message_bytes=settings.max_message_bytes, session_timeout_s=settings.session_timeout_s,
        heartbeat_interval_s=settings.heartbeat_interval_s, rebalance_timeout_s=settings.rebalance_timeout_s,
        max_poll_interval_s=settings.max_poll_interval_s, commit_interval_s=settings.commit_interval_s,
        client_kwargs=client_kwargs(settings),
    )
    return WorkerConfig(
        consumer=consumer, prefix=settings.topic_prefix, worker_id=settings.worker_id,
        latency_target_s=settings.latency_target_s, max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_s, batching_mode=settings.batching_mode,
        exactly_once=settings.delivery == "exactly_once", transaction_timeout_s=settings.transaction_timeout_s,
        inference_timeout_s=settings.inference_timeout_s, max_task_bytes=settings.max_task_bytes,
        max_result_bytes=settings.max_result_bytes, status_interval_s=settings.status_interval_s,
        drain_timeout_s=settings.drain_timeout_s, control_key=settings.control_key_bytes,
        stop_timeout_s=settings.stop_timeout_s, partitions=settings.partitions,
        replication_factor=settings.replication_factor,
    )


def runner_options(settings: Settings) -> dict:
    """What a runner of a model loaded at run time (``ctl load``) is built with, as at start."""
    return {"device": None if settings.device == "auto" else settings.device,
            "torch_threads": settings.torch_threads, "max_failures": settings.fallback_max_failures,
            "probe_every": settings.fallback_probe_every}


def worker_metrics(settings: Settings) -> BatchMetrics | None:
    """Prometheus metrics on ``METRICS_HOST:METRICS_PORT`` when the port is set, else None."""
    if settings.metrics_port is None:
        return None
    from prometheus_client import start_http_server

    prom = PrometheusMetrics()
    start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=prom.registry)
    log.info("Prometheus metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    return prom


def worker_tracing(settings: Settings) -> "BatchTracing":
    """OpenTelemetry spans per batch exported with OTLP when ``AUTOGLM_OTEL=1``, else off."""
    from autoglm.streams.tracing import BatchTracing, setup_otlp

    if not settings.otel:
        return BatchTracing()
    log.info("tracing batches with OpenTelemetry (OTLP exporter; OTEL_EXPORTER_OTLP_ENDPOINT)")
    return setup_otlp("autoglm-worker", settings.worker_id)


def faust_datadir(settings: Settings) -> str:
    """faust's data directory: under the cache dir, never the working directory."""
    root = Path(os.environ.get("AUTOGLM_CACHE_DIR") or Path.home() / ".cache" / "autoglm")
    path = root / "faust"  # faust keeps nothing there for us (memory store), but wants the folder
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def run_worker(settings: Settings) -> int:
    """Run a worker until SIGTERM/SIGINT. Returns the process exit code."""
    from autoglm.streams.app import build_worker_app, run_app

    with broker_for(settings) as live:
        runners: dict[str, ModelRunner] = {}
        try:
            stages = load_pipeline_stages(live)  # first: an invalid pipeline loads no model
            runners = load_runners(live)  # then: an unknown model or device creates no topics
            runners.update(load_step_runners(live, stages))
            prepare_topics(live, extra=sorted({st.topic for st in stages.values()}))
            if live.delivery == "exactly_once":
                asyncio.run(check_transactions(live))
        except AutoGLMError as exc:
            log.error("%s", exc)
            for runner in runners.values():
                runner.close(wait=True)
            return 2
        from autoglm.models.repository import ModelRepository

        app, worker = build_worker_app(worker_config(live), runners, metrics=worker_metrics(live),
                                       datadir=faust_datadir(live), repository=ModelRepository(live.model_repo),
                                       runner_options=runner_options(live), tracing=worker_tracing(live),
                                       stages=stages)
        log.info(
            "worker %s serving %s from %s (group %s)",
            live.worker_id, ", ".join([*live.models, *(f"{n} ({st.topic})" for n, st in stages.items())]),
            live.bootstrap_servers, live.consumer_group,
        )
        try:
            return run_app(app, log_level=live.log_level)
        finally:
            # join the model threads (those loaded at run time too): a torch thread alive at exit aborts
            # the process; closing a runner twice is a no-op
            for runner in [*runners.values(), *worker.pipeline.runners.values()]:
                runner.close(wait=True)
