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

from autoglm.processors.errors import BrokerError, ModelError
from autoglm.processors.adaptive import AdaptiveBatchPolicy
from autoglm.processors.batching import BatchPolicy
from autoglm.processors.control import ControlState
from autoglm.processors.metrics import BatchMetrics, MetricsGroup, TaskTotals
from autoglm.models.host import ModelHost
from autoglm.models.repository import ModelRepository
from autoglm.streams.consumer import ConsumerConfig, TaskConsumer  # noqa: F401  (ConsumerConfig: re-exported)
from autoglm.streams.control import ControlPlane
from autoglm.streams.hot_models import HotModels
from autoglm.streams.pipeline import TaskPipeline
from autoglm.streams.producer import BatchProducer
from autoglm.streams.topics import TopicCache, TopicNames
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
        repository: where ``ctl load``/``reload`` read models from (the built-ins alone when
            None); each served model's ``batching`` defaults from it are applied to its policy.
        runner_options: ``device``, ``torch_threads``, ``max_failures``, ``probe_every`` for the
            runners of models loaded at run time (see :class:`~autoglm.models.host.ModelHost`).

    Hot models (``ctl load``/``unload``/``reload``, README "Control plane"): the
    :class:`~autoglm.models.host.ModelHost` changes :attr:`TaskPipeline.runners` in place;
    a load adds the model's policy, batcher and window and subscribes to its task topic; an
    unload first serves the tasks already published to that topic when it arrived (bounded
    fetching, :meth:`TaskConsumer.fetch_until`), commits, then drops them and unsubscribes.
    """

    def __init__(self, config: WorkerConfig, runners: Mapping[str, Any],
                 policies: Mapping[str, BatchPolicy] | None = None, metrics: BatchMetrics | None = None,
                 *, repository: ModelRepository | None = None, runner_options: Mapping[str, Any] | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        #: results per model and status since start (heartbeat totals), beside the given metrics
        self.totals = TaskTotals()
        self.metrics: BatchMetrics = self.totals if metrics is None else MetricsGroup(metrics, self.totals)
        metrics = self.metrics
        self.names = names = TopicNames(config.prefix)
        cc = config.consumer
        self.repository = repository if repository is not None else ModelRepository(None)
        if policies is None:
            policies = {name: self._new_policy(name) for name in runners}
        else:
            for name, policy in policies.items():
                self._apply_batching_defaults(name, policy)
        for name, policy in policies.items():
            self._cap_policy(name, policy)
        self._hot_tasks: set[asyncio.Task] = set()
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
            transact=self.settler,
        )
        self.control_state = ControlState(config.worker_id, list(runners))
        self._fixed_topics = bool(cc.topics)
        topics = cc.topics or tuple(names.tasks(m) for m in runners)
        #: models being unloaded: served up to the bounds taken when the unload arrived
        self._unloading: set[str] = set()
        self.host = ModelHost(self.repository, self.pipeline.runners, on_change=self._model_changed,
                              **dict(runner_options or {}))
        self.consumer = TaskConsumer(
            dataclasses.replace(cc, topics=topics, commit=self.settler is None),
            self.pipeline,
            is_paused=self._fetch_paused,
            before_revoke=self._before_revoke,
            after_revoke=self._after_revoke,
            on_assigned=self.pipeline.assigned,
            before_stop=self._before_stop,
        )
        self.control = ControlPlane(
            bootstrap_servers=cc.bootstrap_servers, names=names, state=self.control_state,
            produce=self._send_status, configure=lambda model, params: self.pipeline.configure(model, **params),
            drain=self.drain, figures=self._figures, lag=self.lag_per_model,
            in_flight=lambda: self.pipeline.in_flight, max_in_flight=cc.max_in_flight,
            counters=lambda: dataclasses.asdict(self.pipeline.counters), totals=self.totals.snapshot,
            metrics=self.metrics, key=config.control_key,
            status_interval_s=config.status_interval_s, drain_timeout_s=config.drain_timeout_s,
            client_kwargs=cc.client_kwargs,
            model_command=HotModels(
                self.host, bootstrap_servers=cc.bootstrap_servers, names=names, partitions=config.partitions,
                replication_factor=config.replication_factor, max_message_bytes=cc.max_message_bytes,
                client_kwargs=cc.client_kwargs, fetch=self._fetch_model, drain=self._drain_model,
            ),
        )

    # -- models loaded, reloaded and unloaded at run time ------------------------

    def _new_policy(self, name: str) -> BatchPolicy:
        cfg = self.config
        policy = AdaptiveBatchPolicy(cfg.latency_target_s, cfg.max_batch_size, cfg.max_wait_s, mode=cfg.batching_mode)
        self._apply_batching_defaults(name, policy)
        return policy

    def _apply_batching_defaults(self, name: str, policy: BatchPolicy) -> None:
        """The model's ``batching`` from its ``model.yaml`` (the path ``ctl configure`` takes, so a
        later ``configure`` overrides it)."""
        try:
            params = self.repository.batching_defaults([name]).get(name) or {}
        except Exception as exc:  # a spec edited since the model was loaded: the worker's settings stay
            log.warning("model %s: batching defaults of its model.yaml not applied: %s", name, exc)
            return
        if params:
            policy.configure(**params)
            log.info("model %s: batching defaults from its model.yaml: %s", name, params)

    def _cap_policy(self, name: str, policy: BatchPolicy) -> None:
        cap = self.config.consumer.max_in_flight
        policy.set_in_flight_cap(cap)
        if cap < policy.max_batch_size:
            log.warning("model %s: MAX_IN_FLIGHT=%d (AUTOGLM_MAX_IN_FLIGHT) is below MAX_BATCH_SIZE=%d "
                        "(AUTOGLM_MAX_BATCH_SIZE): batches hold at most %d tasks", name, cap,
                        policy.max_batch_size, cap)

    def _model_changed(self, name: str, runner: Any) -> None:
        """:class:`ModelHost`'s ``on_change``: set up a loaded model, or drop an unloaded one."""
        if runner is None:
            self._spawn(self.pipeline.remove_model(name))
            return
        if name in self.pipeline.policies:  # a reload: the runner is swapped, policy and queue stay
            self.pipeline.add_model(name, runner, self.pipeline.policies[name])
            return
        policy = self._new_policy(name)
        self._cap_policy(name, policy)
        self.pipeline.add_model(name, runner, policy)

    def _fetch_paused(self, tp: TopicPartition) -> bool:
        """The consumer's fetch predicate: the control state's, plus no runner (yet): paused; a model
        being unloaded is fetched only up to its bounds (unless a pause or a drain holds it)."""
        model = self.names.model_of(tp.topic)
        state = self.control_state
        if model is not None and model in self._unloading:
            return (not self.consumer.bounded(tp) or not state.ready or state.draining
                    or state.paused_by_command(model))
        return state.is_paused(model) or model not in self.pipeline.runners

    def _served_topics(self) -> tuple[str, ...]:
        return tuple(self.names.tasks(m) for m in self.pipeline.runners)

    async def _fetch_model(self, model: str) -> None:
        """After a load: subscribe to the model's task topic (a rebalance follows)."""
        if not self._fixed_topics:
            self.consumer.subscribe(self._served_topics())

    def _held(self, model: str) -> bool:
        """Whether a pause, a drain or the start-up replay holds ``model`` (an unload then serves
        nothing more of its topic)."""
        state = self.control_state
        return not state.ready or state.draining or state.paused_by_command(model)

    async def _drain_model(self, model: str, poll_s: float = 0.02) -> dict[str, Any]:
        """Before an unload: serve what was published to the model's topic when the unload arrived,
        then stop fetching it and wait until its results are acknowledged and offsets committed.

        A model held by a pause (or a drain) serves nothing more: only its tasks in flight finish.
        Bounded by ``drain_timeout_s``: past it, fetching stops where it is; what was fetched is
        still answered and committed, and the rest stays in Kafka (nothing is lost).

        Returns:
            ``{"bounds": {partition: end offset served up to}, "drain_ms": ...}``.

        Raises:
            ModelError: tasks of the model still in flight after ``drain_timeout_s`` (the unload
                fails; the model keeps serving).
        """
        topic = self.names.tasks(model)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.config.drain_timeout_s
        self._unloading.add(model)
        bounds: dict[TopicPartition, int] = {}
        self.pipeline.set_flushing(True, model)
        try:
            try:
                bounds = await self.consumer.fetch_until(topic)
                while not self._held(model) and not await self.consumer.bounds_reached(topic):
                    if loop.time() >= deadline:
                        log.warning("model %s: unload stops fetching before the end of its topic "
                                    "(drain_timeout_s=%s); the rest stays in Kafka", model,
                                    self.config.drain_timeout_s)
                        break
                    await asyncio.sleep(poll_s)
            finally:
                self._unloading.discard(model)  # from here on it counts as paused (unloaded)
            quiet = 0
            while quiet < 2:
                tps = [(tp.topic, tp.partition) for tp in self.consumer.assignment() if tp.topic == topic]
                busy = self.pipeline.model_in_flight(model, tps) + len(self.pipeline.batchers.get(model, ()))
                if busy and loop.time() >= deadline + self.config.stop_timeout_s:
                    raise ModelError(f"unload of model {model!r}: {busy} tasks still in flight after "
                                     f"drain_timeout_s={self.config.drain_timeout_s} (+ stop_timeout_s); "
                                     "it keeps serving")
                quiet = quiet + 1 if not busy else 0
                await asyncio.sleep(poll_s)
            if self.settler is not None:
                await self.settler.flush(timeout_s=10.0)
            await self.consumer.commit_now()
        finally:
            self.pipeline.set_flushing(False, model)
            self.consumer.clear_bounds(topic)
        if not self._fixed_topics:
            self.consumer.subscribe([t for t in self._served_topics() if t != topic])
        figures = {"bounds": {str(tp.partition): end for tp, end in sorted(bounds.items())},
                   "drain_ms": round((loop.time() - started) * 1000.0, 1)}
        log.info("model %s: drained for unload: %s", model, figures)
        return figures

    def _figures(self, window_s: float, *, reset: bool = True) -> dict[str, dict[str, Any]]:
        """The pipeline's per-model heartbeat figures plus ``version`` (file hash and mtime, device,
        load seconds; :meth:`ModelHost.versions`)."""
        figures = self.pipeline.figures(window_s, reset=reset)
        for name, version in self.host.versions().items():
            if name in figures:
                figures[name]["version"] = version
        return figures

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._hot_tasks.add(task)
        task.add_done_callback(self._hot_tasks.discard)

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


def build_worker_app(config: WorkerConfig, runners: Mapping[str, Any],
                     policies: Mapping[str, BatchPolicy] | None = None,
                     metrics: BatchMetrics | None = None, *, datadir: str | None = None,
                     repository: ModelRepository | None = None,
                     runner_options: Mapping[str, Any] | None = None) -> tuple[faust.App, Worker]:
    """Create the faust shell of a worker serving ``runners`` (model name -> started runner).

    Args:
        repository, runner_options: see :class:`Worker` (models loaded at run time).
        datadir: faust's data directory (it keeps nothing there for us, but creates it; default
            ``<id>-data`` in the working directory, as faust does).

    Returns:
        ``(app, worker)``; run the app with :func:`run_app`.
    """
    options: dict[str, Any] = {"datadir": datadir} if datadir else {}
    app = WorkerApp(f"autoglm-{config.worker_id}", web_enabled=False, store="memory://",
                    value_serializer="raw", key_serializer="raw", **options)
    worker = Worker(config, runners, policies, metrics, repository=repository, runner_options=runner_options)
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
