"""The worker's models at run time: what ``ctl load`` / ``unload`` / ``reload`` change in its data path.

:class:`ServedModels` is the worker's half of hot models (the other half is
:class:`~autoglm.models.host.ModelHost`, which loads, swaps and closes runners,
driven by :class:`~autoglm.streams.hot_models.HotModels` from the control plane):

- **policies**: each model's batching policy starts from the worker's settings,
  then its ``model.yaml`` ``batching`` defaults (the path ``ctl configure``
  takes, so a later ``configure`` overrides them), capped by the in-flight cap;
- **the fetch predicate** of the task consumer: the control state's desired
  state, plus "no runner (yet)" counts as paused; a model being unloaded is
  fetched only up to the bounds its drain took;
- **changes** (``on_change`` of the host): a loaded model gets its policy,
  batcher and metrics window; a reload swaps the runner only; an unloaded
  model's are dropped;
- **fetch** after a load: subscribe to its task topic and wait for the
  rebalance that follows (so once every worker acknowledged, the group's
  assignment includes every worker's subscription);
- **drain** before an unload: serve what the model's topic held when the unload
  arrived (the end offsets of this worker's partitions then), wait for those
  results and commit, then unsubscribe;
- **figures** for heartbeats: the pipeline's per-model figures plus the
  ``version`` served (file hash and mtime, device, load seconds).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Mapping

from aiokafka import TopicPartition

from autoglm.models.host import ModelHost
from autoglm.models.repository import ModelRepository
from autoglm.processors.adaptive import AdaptiveBatchPolicy
from autoglm.processors.batching import BatchPolicy
from autoglm.processors.control import ControlState
from autoglm.processors.errors import ModelError
from autoglm.streams.consumer import TaskConsumer
from autoglm.streams.pipeline import TaskPipeline
from autoglm.streams.topics import TopicNames

if TYPE_CHECKING:
    from autoglm.streams.app import WorkerConfig
    from autoglm.streams.transactions import TransactionalSettler

log = logging.getLogger(__name__)


class ServedModels:
    """Policies, fetch predicate, fetch, drain and heartbeat figures of a worker's models (see the module).

    Built first (the pipeline needs its policies), then :meth:`attach` ed to the
    parts it reads once they exist.

    Args:
        config: the worker's configuration (batching settings, in-flight cap,
            ``drain_timeout_s``, ``stop_timeout_s``; fixed ``consumer.topics``
            leave the subscription alone).
        names: topic names.
        repository: where a model's ``batching`` defaults are read (None: the built-ins alone).
        steps: the pipeline steps served: stream name -> ``(model, batching parameters)``; a step's
            policy takes its model's ``batching`` defaults, then the step's parameters.
    """

    def __init__(self, config: "WorkerConfig", names: TopicNames, repository: ModelRepository | None = None,
                 steps: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None):
        self.config = config
        self.steps = dict(steps or {})
        self.names = names
        self.repository = repository if repository is not None else ModelRepository(None)
        self._fixed_topics = bool(config.consumer.topics)
        #: models being unloaded: fetched up to the bounds taken when the unload arrived
        self.unloading: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self.pipeline: TaskPipeline | None = None
        self.state: ControlState | None = None
        self.consumer: TaskConsumer | None = None
        self.host: ModelHost | None = None
        self.settler: "TransactionalSettler | None" = None

    def attach(self, *, pipeline: TaskPipeline, state: ControlState, consumer: TaskConsumer, host: ModelHost,
               settler: "TransactionalSettler | None" = None) -> None:
        """The parts read from now on (the worker's pipeline, control state, consumer, host, settler)."""
        self.pipeline, self.state, self.consumer, self.host, self.settler = pipeline, state, consumer, host, settler

    # -- policies --------------------------------------------------------------------

    def initial_policies(self, runners: Mapping[str, Any],
                         policies: Mapping[str, BatchPolicy] | None = None) -> dict[str, BatchPolicy]:
        """The start-up policies: the given ones (default: one per runner from the settings), each
        with its model's ``batching`` defaults applied and the in-flight cap set."""
        if policies is None:
            out = {name: self.new_policy(name) for name in runners}
        else:
            out = dict(policies)
            for name, policy in out.items():
                self._apply_batching_defaults(name, policy)
                self._cap(name, policy)
        return out

    def new_policy(self, name: str) -> BatchPolicy:
        """An adaptive policy from the worker's settings, then ``name``'s ``batching`` defaults, capped."""
        cfg = self.config
        policy = AdaptiveBatchPolicy(cfg.latency_target_s, cfg.max_batch_size, cfg.max_wait_s, mode=cfg.batching_mode)
        self._apply_batching_defaults(name, policy)
        self._cap(name, policy)
        return policy

    def _apply_batching_defaults(self, name: str, policy: BatchPolicy) -> None:
        model, step_params = self.steps.get(name, (name, {}))
        try:
            params = self.repository.batching_defaults([model]).get(model) or {}
        except Exception as exc:  # a spec edited since the model was loaded: the worker's settings stay
            log.warning("model %s: batching defaults of its model.yaml not applied: %s", name, exc)
            params = {}
        if step_params:
            params = {**params, **step_params}
            log.info("pipeline step %s: batching %s", name, params)
            policy.configure(**params)
            return
        if params:
            policy.configure(**params)
            log.info("model %s: batching defaults from its model.yaml: %s", name, params)

    def _cap(self, name: str, policy: BatchPolicy) -> None:
        cap = self.config.consumer.max_in_flight
        policy.set_in_flight_cap(cap)
        if cap < policy.max_batch_size:
            log.warning("model %s: MAX_IN_FLIGHT=%d (AUTOGLM_MAX_IN_FLIGHT) is below MAX_BATCH_SIZE=%d "
                        "(AUTOGLM_MAX_BATCH_SIZE): batches hold at most %d tasks", name, cap,
                        policy.max_batch_size, cap)

    # -- what the host, the consumer and the control plane call ----------------------

    def changed(self, name: str, runner: Any) -> None:
        """:class:`ModelHost`'s ``on_change``: set up a loaded model, swap a reloaded one, drop an unloaded one."""
        pipeline = self.pipeline
        assert pipeline is not None
        if runner is None:
            task = asyncio.ensure_future(pipeline.remove_model(name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif name in pipeline.policies:  # a reload: the runner is swapped, policy and queue stay
            pipeline.add_model(name, runner, pipeline.policies[name])
        else:
            pipeline.add_model(name, runner, self.new_policy(name))

    def held(self, model: str) -> bool:
        """Whether a pause, a drain or the start-up replay holds ``model`` (an unload then serves
        nothing more of its topic)."""
        state = self.state
        return not state.ready or state.draining or state.paused_by_command(model)

    def fetch_paused(self, tp: TopicPartition) -> bool:
        """The consumer's fetch predicate: the control state's, plus no runner (yet): paused; a model
        being unloaded is fetched only up to its bounds (unless a pause or a drain holds it)."""
        model = self.names.model_of(tp.topic)
        if model is not None and model in self.unloading:
            return not self.consumer.bounded(tp) or self.held(model)
        return self.state.is_paused(model) or model not in self.pipeline.runners

    def _served_topics(self) -> list[str]:
        return [self.names.tasks(m) for m in self.pipeline.runners]

    async def fetch(self, model: str) -> None:
        """After a load: subscribe to the model's task topic and wait for the rebalance that follows
        (at most ``rebalance_timeout_s``), so that the acknowledgement means "in the group for it"."""
        if self._fixed_topics:
            return
        timeout_s = self.config.consumer.rebalance_timeout_s
        if not await self.consumer.subscribe_and_join(self._served_topics(), timeout_s):
            log.warning("model %s: no rebalance within %.0f s of subscribing to its topic; acknowledging anyway",
                        model, timeout_s)

    async def drain(self, model: str, poll_s: float = 0.02) -> dict[str, Any]:
        """Before an unload: serve what was published to the model's topic when the unload arrived,
        then stop fetching it and wait until its results are acknowledged and offsets committed.

        A model held by a pause (or a drain) serves nothing more: only its tasks in flight finish.
        Bounded by ``drain_timeout_s``: past it, fetching stops where it is; what was fetched is
        still answered and committed, and the rest stays in Kafka (nothing is lost).

        Returns:
            ``{"bounds": {partition: end offset served up to}, "drain_ms": ...}``.

        Raises:
            ModelError: tasks of the model still in flight ``stop_timeout_s`` after
                ``drain_timeout_s`` (the unload fails; the model keeps serving).
        """
        pipeline, consumer, cfg = self.pipeline, self.consumer, self.config
        topic = self.names.tasks(model)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + cfg.drain_timeout_s
        self.unloading.add(model)
        bounds: dict[TopicPartition, int] = {}
        pipeline.set_flushing(True, model)
        try:
            try:
                bounds = await consumer.fetch_until(topic)
                while not self.held(model) and not await consumer.bounds_reached(topic):
                    if loop.time() >= deadline:
                        log.warning("model %s: unload stops fetching before the end of its topic "
                                    "(drain_timeout_s=%s); the rest stays in Kafka", model, cfg.drain_timeout_s)
                        break
                    await asyncio.sleep(poll_s)
            finally:
                self.unloading.discard(model)  # from here on it counts as paused (unloaded)
            quiet = 0
            while quiet < 2:
                tps = [(tp.topic, tp.partition) for tp in consumer.assignment() if tp.topic == topic]
                busy = pipeline.model_in_flight(model, tps) + len(pipeline.batchers.get(model, ()))
                if busy and loop.time() >= deadline + cfg.stop_timeout_s:
                    raise ModelError(f"unload of model {model!r}: {busy} tasks still in flight after "
                                     f"drain_timeout_s={cfg.drain_timeout_s} (+ stop_timeout_s); it keeps serving")
                quiet = quiet + 1 if not busy else 0
                await asyncio.sleep(poll_s)
            if self.settler is not None:
                await self.settler.flush(timeout_s=10.0)
            await consumer.commit_now()
        finally:
            pipeline.set_flushing(False, model)
            consumer.clear_bounds(topic)
        if not self._fixed_topics:
            consumer.subscribe([t for t in self._served_topics() if t != topic])
        figures = {"bounds": {str(tp.partition): end for tp, end in sorted(bounds.items())},
                   "drain_ms": round((loop.time() - started) * 1000.0, 1)}
        log.info("model %s: drained for unload: %s", model, figures)
        return figures

    def figures(self, window_s: float, *, reset: bool = True) -> dict[str, dict[str, Any]]:
        """The pipeline's per-model heartbeat figures plus ``version`` (file hash and mtime, device,
        load seconds; :meth:`ModelHost.versions`)."""
        figures = self.pipeline.figures(window_s, reset=reset)
        for name, version in self.host.versions().items():
            if name in figures:
                figures[name]["version"] = version
        return figures
