"""A worker's assembly on Kafka: the owned task consumer, the pipeline, the producer, the control plane.

faust-streaming is the worker's shell, through its public API only: a
``faust.App`` whose boot strategy starts none of faust's Kafka clients, web
server or tables (:class:`WorkerBoot`), run by ``faust.Worker`` for signal
handling, logging and an orderly stop, with the worker itself added as a mode
service (``app.service``). The data path does not go through faust's stream
machinery: :class:`~autoglm.streams.consumer.TaskConsumer` owns an aiokafka
consumer (``getmany`` per-partition lists, a ``ConsumerRebalanceListener``,
pause as desired state), and results are produced as one record batch per
destination partition (:mod:`autoglm.streams.producer`). Measured: faust's
per-event stream machinery cost several times the model per task
(benchmarks/README.md, figure O/T).

Nothing here reads the composition package's settings: :class:`WorkerConfig`
is what this layer needs, built by :mod:`autoglm.worker`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import faust
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from faust.app.base import BootStrategy
from mode import Service

from autoglm.processors.errors import BrokerError
from autoglm.processors.batching import BatchPolicy
from autoglm.processors.control import ControlState
from autoglm.processors.metrics import BatchMetrics, MetricsGroup, TaskTotals
from autoglm.models.host import ModelHost
from autoglm.models.repository import ModelRepository
from autoglm.streams.consumer import ConsumerConfig, TaskConsumer  # noqa: F401  (ConsumerConfig: re-exported)
from autoglm.streams.control import ControlPlane
from autoglm.streams.hot_models import HotModels
from autoglm.streams.pipeline import TaskPipeline
from autoglm.streams.served_models import ServedModels
from autoglm.streams.producer import BatchProducer
from autoglm.streams.topics import TopicCache, TopicNames
from autoglm.streams.tracing import BatchTracing
from autoglm.streams.transactions import TransactionalSettler

log = logging.getLogger(__name__)

#: Producer batch size (bytes): a micro-batch's results for one partition fit in one or a few batches.
PRODUCER_BATCH_BYTES = 1024 * 1024


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker's Kafka side needs (a narrow view of the settings; units in the names).

    Attributes:
        consumer: the task consumer's configuration (its ``topics`` are filled in
            from the served models when empty).
        prefix: topic prefix.
        worker_id: written into results, dead letters and heartbeats.
        latency_target_s, max_batch_size, max_wait_s, batching_mode: the batching policy's
            start values (re-tunable through the control plane).
        exactly_once: results and offsets in Kafka transactions.
        transaction_timeout_s: see :class:`~autoglm.streams.transactions.TransactionalSettler`.
        inference_timeout_s, max_task_bytes, max_result_bytes: see
            :class:`~autoglm.streams.pipeline.TaskPipeline`.
        status_interval_s, drain_timeout_s, control_key: see
            :class:`~autoglm.streams.control.ControlPlane`.
        stop_timeout_s: the longest a stop waits for partial batches to be served and delivered.
        delivery_timeout_s: the longest the broker may take to acknowledge a batch's records.
        partitions, replication_factor: for the task topic of a model loaded at run time (``ctl load``).
    """

    consumer: ConsumerConfig
    prefix: str = "autoglm"
    worker_id: str = "worker"
    latency_target_s: float = 0.100
    max_batch_size: int = 256
    max_wait_s: float = 0.050
    batching_mode: str = "adaptive"
    exactly_once: bool = False
    transaction_timeout_s: float = 30.0
    inference_timeout_s: float | None = 30.0
    max_task_bytes: int = 1024 * 1024
    max_result_bytes: int = 1024 * 1024
    status_interval_s: float = 5.0
    drain_timeout_s: float = 120.0
    control_key: bytes | None = field(default=None, repr=False)
    stop_timeout_s: float = 30.0
    delivery_timeout_s: float = 120.0
    partitions: int = 3
    replication_factor: int = 1


class WorkerBoot(BootStrategy):
    """faust's boot strategy with none of its Kafka clients, web server or sensors: the worker
    owns its consumer and producer (a public extension point of faust, ``App.BootStrategy``)."""

    enable_kafka = False
    enable_kafka_consumer = False
    enable_kafka_producer = False
    enable_web = False
    enable_sensors = False


class WorkerApp(faust.App):
    """The faust shell of a worker (see the module docstring)."""

    BootStrategy = WorkerBoot


class Worker(Service):
    """One worker: producer, control plane, pipeline and task consumer, started and stopped in order.

    Start: producer -> (exactly-once settler) -> control plane (replays the control topic;
    until then every stream counts as paused) -> pipeline -> consumer (joins the group).
    Stop: consumer (stops polling, flushes partial batches, delivers, commits, leaves the group)
    -> settler -> control plane (``stopped`` on the status topic) -> producer.

    Args:
        config: see :class:`WorkerConfig`.
        runners: model name -> a started runner.
        policies: model name -> batching policy (default: one :class:`AdaptiveBatchPolicy`
            per model from ``config``).
        metrics: batching metrics (default: none).
        tracing: OpenTelemetry spans per batch (default: off).
        repository: where ``ctl load``/``reload`` read models from (the built-ins alone when
            None); each served model's ``batching`` defaults from it are applied to its policy.
        runner_options: ``device``, ``torch_threads``, ``max_failures``, ``probe_every`` for the
            runners of models loaded at run time (see :class:`~autoglm.models.host.ModelHost`).
        stages: the pipeline steps served (README "Pipelines"): stream name (``<pipeline>/<step>``)
            -> its :class:`~autoglm.streams.hops.StepStage`; ``runners`` has the step model's runner
            under the same name. Each step's batching starts from the worker's settings, then its
            model's ``batching`` defaults, then the step's ``batching`` and latency target.

    Hot models (``ctl load``/``unload``/``reload``, README "Control plane"): the
    :class:`~autoglm.models.host.ModelHost` changes :attr:`TaskPipeline.runners` in place;
    a load adds the model's policy, batcher and window and subscribes to its task topic; an
    unload first serves the tasks already published to that topic when it arrived (bounded
    fetching, :meth:`TaskConsumer.fetch_until`), commits, then drops them and unsubscribes
    (:class:`~autoglm.streams.served_models.ServedModels`).
    """

    def __init__(self, config: WorkerConfig, runners: Mapping[str, Any],
                 policies: Mapping[str, BatchPolicy] | None = None, metrics: BatchMetrics | None = None,
                 tracing: BatchTracing | None = None, *, repository: ModelRepository | None = None,
                 runner_options: Mapping[str, Any] | None = None, stages: Mapping[str, Any] | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        stages = dict(stages or {})
        #: the pipeline steps served: stream name -> StepStage
        self.stages = stages
        #: results per model and status since start (heartbeat totals), beside the given metrics
        self.totals = TaskTotals()
        self.metrics: BatchMetrics = self.totals if metrics is None else MetricsGroup(metrics, self.totals)
        metrics = self.metrics
        self.names = names = TopicNames(config.prefix, streams={name: st.topic for name, st in stages.items()})
        cc = config.consumer
        #: the models at run time: policies, the fetch predicate, a load's fetch and an unload's drain
        self.models = ServedModels(config, names, repository, steps={name: (st.step.model, _step_params(st.step))
                                                                       for name, st in stages.items()})
        policies = self.models.initial_policies(runners, policies)
        self._producer: AIOKafkaProducer | None = None
        self._batches: BatchProducer | None = None
        self.topics = TopicCache(cc.bootstrap_servers, client_kwargs=cc.client_kwargs)
        self.settler: TransactionalSettler | None = None
        if config.exactly_once:
            self.settler = TransactionalSettler(
                cc.bootstrap_servers, transactional_id=f"autoglm-{cc.group_id}-{config.worker_id}",
                group_id=cc.group_id, transaction_timeout_s=config.transaction_timeout_s,
                max_request_size=cc.max_message_bytes, client_kwargs=cc.client_kwargs,
            )
        self.pipeline = TaskPipeline(
            names=names, worker_id=config.worker_id, runners=runners, policies=policies,
            produce=self._produce, ack=self._answered, max_in_flight=cc.max_in_flight,
            on_fatal=self._fatal, metrics=metrics, topics=self.topics,
            delivery_timeout_s=config.delivery_timeout_s, inference_timeout_s=config.inference_timeout_s,
            max_task_bytes=config.max_task_bytes, max_result_bytes=config.max_result_bytes,
            transact=self.settler, tracing=tracing, group_id=cc.group_id, stages=stages,
        )
        self.control_state = ControlState(config.worker_id, list(runners),
                                          streams={name: st.stream for name, st in stages.items()})
        topics = cc.topics or tuple(names.tasks(m) for m in runners)
        self.host = ModelHost(self.models.repository, self.pipeline.runners, on_change=self.models.changed,
                              **dict(runner_options or {}))
        self.consumer = TaskConsumer(
            dataclasses.replace(cc, topics=topics, commit=self.settler is None),
            self.pipeline,
            is_paused=self.models.fetch_paused,
            before_revoke=self._before_revoke,
            after_revoke=self._after_revoke,
            on_assigned=self.pipeline.assigned,
            before_stop=self._before_stop,
        )
        self.control = ControlPlane(
            bootstrap_servers=cc.bootstrap_servers, names=names, state=self.control_state,
            produce=self._send_status, configure=lambda model, params: self.pipeline.configure(model, **params),
            drain=self.drain, figures=self.models.figures, lag=self.lag_per_model,
            in_flight=lambda: self.pipeline.in_flight, max_in_flight=cc.max_in_flight,
            counters=lambda: dataclasses.asdict(self.pipeline.counters), totals=self.totals.snapshot,
            metrics=self.metrics, key=config.control_key,
            status_interval_s=config.status_interval_s, drain_timeout_s=config.drain_timeout_s,
            client_kwargs=cc.client_kwargs,
            model_command=HotModels(
                self.host, bootstrap_servers=cc.bootstrap_servers, names=names, partitions=config.partitions,
                replication_factor=config.replication_factor, max_message_bytes=cc.max_message_bytes,
                client_kwargs=cc.client_kwargs, fetch=self.models.fetch, drain=self.models.drain,
            ),
        )
        self.models.attach(pipeline=self.pipeline, state=self.control_state, consumer=self.consumer,
                           host=self.host, settler=self.settler)

    # -- lifecycle ------------------------------------------------------------

    async def on_start(self) -> None:
        cc = self.config.consumer
        self._producer = AIOKafkaProducer(
            bootstrap_servers=cc.bootstrap_servers, acks="all", linger_ms=1,
            max_request_size=cc.max_message_bytes, max_batch_size=min(PRODUCER_BATCH_BYTES, cc.max_message_bytes),
            request_timeout_ms=int(max(40.0, cc.session_timeout_s + 5.0) * 1000), **cc.client_kwargs,
        )
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            raise BrokerError(f"producer: cannot connect to {cc.bootstrap_servers}: {exc!r}") from exc
        self._batches = BatchProducer(self._producer)
        if self.settler is not None:
            await self.settler.start()
        await self.control.start()
        self.pipeline.start()
        await self.consumer.start()
        loop_task = self.consumer.done
        if loop_task is not None:
            loop_task.add_done_callback(self._poll_loop_ended)

    async def on_stop(self) -> None:
        await self.consumer.stop()
        if self.settler is not None:
            await self.settler.stop()
        await self.control.stop()
        await self.topics.close()
        if self._producer is not None:
            await self._producer.stop()

    def _poll_loop_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.critical("the task consumer's poll loop failed; stopping so that its tasks are consumed again",
                         exc_info=exc)
            self._fatal(exc)

    def _fatal(self, exc: BaseException) -> None:
        """A result could not be delivered (or the poll loop died): stop, so the tasks are consumed again."""
        asyncio.ensure_future(self.crash(exc))

    # -- what the pipeline and the control plane call ------------------------

    async def _produce(self, records: list) -> None:
        assert self._batches is not None
        await self._batches.deliver(records)

    async def _send_status(self, topic: str, key: bytes, value: bytes) -> Any:
        assert self._producer is not None
        return await self._producer.send(topic, value, key=key)

    def _answered(self, tp: Any, next_offset: int) -> None:
        self.consumer.answered(tp, next_offset)

    async def _before_revoke(self, tps: list[TopicPartition]) -> None:
        rebalance_s = self.config.consumer.rebalance_timeout_s
        await self.pipeline.release_partitions(tps, timeout_s=rebalance_s / 3)
        if self.settler is not None and not await self.settler.flush(timeout_s=rebalance_s / 3):
            log.warning("transactions still in progress while partitions are revoked")

    def _after_revoke(self, tps: list[TopicPartition]) -> None:
        self.pipeline.revoke(tps)
        for tp in tps:
            model = self.names.model_of(tp.topic)
            if model is not None:
                self.metrics.forget_partition(model, tp.partition)  # its new owner reports its lag

    async def _before_stop(self) -> None:
        self.pipeline.set_flushing(True)
        await self.pipeline.stop(timeout_s=self.config.stop_timeout_s)
        if self.settler is not None:
            await self.settler.flush(timeout_s=10.0)

    async def drain(self, poll_s: float = 0.05) -> dict[str, Any]:
        """Wait until every fetched task is answered, acknowledged and committed.

        The control state is ``draining``, so the consumer pauses every partition; partial
        batches go to the model at once (no ``max_wait_s``). Polls until nothing is in flight
        twice in a row, then commits. Cancellable (the control plane bounds it with
        ``drain_timeout_s``); the batchers return to normal batching either way.
        """
        self.pipeline.set_flushing(True)
        try:
            quiet = 0
            while quiet < 2:
                await asyncio.sleep(poll_s)
                quiet = quiet + 1 if not self.pipeline.in_flight else 0
            if self.settler is not None:
                await self.settler.flush(timeout_s=10.0)
            await self.consumer.commit_now()
        finally:
            self.pipeline.set_flushing(False)
        return {"in_flight": self.pipeline.in_flight, "served": self.pipeline.counters.received}

    async def lag_per_model(self) -> dict[str, dict[int, int]]:
        """Consumer lag (records) per model and partition, over this worker's partitions."""
        lags: dict[str, dict[int, int]] = {}
        for tp, lag in (await self.consumer.lag()).items():
            model = self.names.model_of(tp.topic)
            if model is not None:
                lags.setdefault(model, {})[tp.partition] = lag
        return lags


def _step_params(step: Any) -> dict[str, Any]:
    """A pipeline step's batching parameters: its ``batching``, and its latency target (its share of the
    pipeline's, or its own)."""
    params = {k: v for k, v in dict(step.batching).items() if v is not None}
    if step.latency_target_s is not None:
        params["latency_target_s"] = step.latency_target_s
    return params


def build_worker_app(config: WorkerConfig, runners: Mapping[str, Any],
                     policies: Mapping[str, BatchPolicy] | None = None,
                     metrics: BatchMetrics | None = None, *, datadir: str | None = None,
                     repository: ModelRepository | None = None,
                     runner_options: Mapping[str, Any] | None = None,
                     tracing: BatchTracing | None = None,
                     stages: Mapping[str, Any] | None = None) -> tuple[faust.App, Worker]:
    """Create the faust shell of a worker serving ``runners`` (model name -> started runner).

    Args:
        repository, runner_options: see :class:`Worker` (models loaded at run time).
        stages: see :class:`Worker` (pipeline steps).
        datadir: faust's data directory (it keeps nothing there for us, but creates it; default
            ``<id>-data`` in the working directory, as faust does).

    Returns:
        ``(app, worker)``; run the app with :func:`run_app`.
    """
    options: dict[str, Any] = {"datadir": datadir} if datadir else {}
    app = WorkerApp(f"autoglm-{config.worker_id}", web_enabled=False, store="memory://",
                    value_serializer="raw", key_serializer="raw", **options)
    worker = Worker(config, runners, policies, metrics, tracing, repository=repository,
                    runner_options=runner_options, stages=stages)
    app.service(worker)
    return app, worker


def run_app(app: faust.App, *, log_level: str = "INFO") -> int:
    """Run a faust app in this process until SIGTERM/SIGINT; returns the exit code."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        pass
    worker = faust.Worker(app, loglevel=log_level, quiet=True, redirect_stdouts=False, override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
