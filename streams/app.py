"""Faust app wiring: the worker's consumer group, its agent, and the pipeline behind it.

Only this module (and the rest of ``streams/``) touches faust and aiokafka.
The agent reads the task topics of the served models with acks disabled
(``stream.noack()``): a record is acknowledged, and so becomes committable,
only when the pipeline has its result or dead letter acknowledged by the
broker, in offset order per partition. Every serializer is ``raw`` (bytes in,
bytes out): no pickle anywhere on the wire.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Mapping

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode import Service

from autoglm.config import Settings
from autoglm.processors.control import ControlState
from autoglm.processors.adaptive import AdaptiveBatchPolicy
from autoglm.processors.batching import BatchPolicy
from autoglm.processors.metrics import BatchMetrics, PrometheusMetrics
from autoglm.streams.control import ControlPlane
from autoglm.streams.pipeline import TaskPipeline
from autoglm.streams.security import client_kwargs, faust_credentials
from autoglm.streams.topics import TopicCache, TopicNames
from autoglm.streams.transactions import TransactionalSettler

log = logging.getLogger(__name__)


def faust_settings(settings: Settings) -> dict[str, Any]:
    """Faust/aiokafka settings derived from ours (faust's names; its units)."""
    return dict(
        broker=[f"kafka://{host}" for host in settings.bootstrap_list],
        value_serializer="raw",
        key_serializer="raw",
        # consumers
        consumer_auto_offset_reset="earliest",
        consumer_max_fetch_size=settings.max_message_bytes,
        broker_max_poll_records=max(64, min(2 * settings.max_batch_size, 1000)),
        broker_commit_interval=settings.commit_interval_s,
        broker_commit_every=10_000,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_request_timeout=max(90.0, settings.session_timeout_s + 5.0),
        broker_max_poll_interval=settings.max_poll_interval_s,
        stream_buffer_maxsize=max(256, settings.max_in_flight),
        # an exception or cancellation in the agent must never ack a record
        stream_ack_exceptions=False,
        stream_ack_cancelled_tasks=False,
        # the consumer's own hooks finish or hand back in-flight tasks, bounded (PausableConsumer)
        stream_wait_empty=False,
        # producer: wait for all in-sync replicas before a result counts as delivered
        producer_acks=-1,
        producer_max_request_size=settings.max_message_bytes,
        producer_linger=0.001,
        # no leader election topic, no web server, no table store, no topic creation
        topic_disable_leader=True,
        topic_allow_declare=False,
        web_enabled=False,
        store="memory://",
        datadir=str(settings_datadir(settings)),
        **faust_credentials(settings),
    )


def settings_datadir(settings: Settings) -> "Any":
    """faust's data directory: under the cache dir, never the working directory."""
    import os
    from pathlib import Path

    root = Path(os.environ.get("AUTOGLM_CACHE_DIR") or Path.home() / ".cache" / "autoglm")
    path = root / "faust"  # faust keeps nothing there for us (memory store), but wants the folder
    path.mkdir(parents=True, exist_ok=True)
    return path


#: A partition no worker is ever assigned: fetched from when every assigned
#: partition is paused, so that the client keeps polling (see PausableConsumer).
KEEPALIVE_TP = TP("__autoglm_keepalive__", 0)
#: Longest fetch wait while a partition is paused: how soon a resume reaches the fetcher.
RESUME_POLL_S = 0.05


class PausableConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer with pause as a desired state.

    faust's own ``pause_partitions`` is forgotten on every rebalance (its
    recovery resumes every assigned partition). Here the set of partitions
    fetched from is filtered by ``is_paused(tp)`` on every fetch, so a paused
    stream stays paused across rebalances and restarts with no re-application
    step that could be missed, and resumes on the next fetch after a resume.

    When every assigned partition is paused, faust would stop calling the
    client's fetch (it sleeps instead), the client would count the consumer
    idle, and after ``max.poll.interval.ms`` leave the group. Instead we fetch
    from :data:`KEEPALIVE_TP`, which is never assigned: the fetch returns no
    records but counts as a poll, so a paused worker stays in its group however
    long the pause. A fetch already waiting when the pause is applied may
    return records of the paused partitions: they are not delivered but handed
    back (the partition's position is set to the first of them), so the pause
    takes effect at once and they are fetched again, in order, after the resume.
    """

    is_paused: Callable[[TP], bool] = staticmethod(lambda tp: False)
    #: exactly-once: offsets are committed inside our transactions only; faust's own commits, which
    #: are asynchronous and could land after a newer transactional commit, are skipped.
    commits_in_transactions: bool = False

    #: awaited with the revoked partitions before faust forgets their acknowledgements
    before_revoke: Callable[[set], Awaitable[None]] | None = None
    #: awaited when the consumer stops, before its last commit
    before_stop: Callable[[], Awaitable[None]] | None = None

    async def _commit(self, offsets: Any) -> bool:
        if self.commits_in_transactions:
            return True
        return await super()._commit(offsets)

    async def _commit_now(self) -> None:
        """Commit every acknowledged offset now. faust's ``commit`` returns without committing when
        another commit (the periodic one) is in progress: it only waits for that one, whose
        snapshot of the acknowledgements may be older; so commit again after it."""
        await self.commit()
        await self.commit()

    async def on_partitions_revoked(self, revoked: Any) -> None:
        """Finish (or hand back) the revoked partitions' tasks and commit them, then let faust revoke.

        faust-streaming 0.15 drops the acknowledged, not yet committed offsets of revoked
        partitions before its own handlers run, so tasks served since the last periodic commit
        would be served again by the new owner; and its ``stream_wait_empty`` waits for every
        queued task with no bound, past the rebalance timeout, after which two workers serve one
        partition. Here: queued tasks of the revoked partitions are handed back uncommitted,
        those in the model are awaited (bounded), and what was served is committed first.
        """
        if self.before_revoke is not None:
            try:
                await self.before_revoke(set(revoked))
            except Exception:
                self.log.exception("before_revoke failed")
        try:
            await self._commit_now()
        except Exception as exc:  # a commit during a rebalance may be refused; at-least-once covers it
            self.log.warning("commit before revoke failed: %r", exc)
        await super().on_partitions_revoked(revoked)

    async def on_stop(self) -> None:
        """Graceful stop: flush the partial batches, deliver their results, commit, then stop."""
        if self.before_stop is not None:
            try:
                await self.before_stop()
            except Exception:
                self.log.exception("before_stop failed")
        try:
            await self._commit_now()
        except Exception as exc:
            self.log.warning("final commit failed: %r", exc)
        await super().on_stop()

    async def _getmany(self, active_partitions: Any, timeout: float) -> Any:
        if active_partitions:
            wanted = {tp for tp in active_partitions if not self.is_paused(tp)}
            if len(wanted) < len(active_partitions):
                # something is paused: wait briefly, so that a resume takes effect within ~50 ms
                timeout = min(timeout, RESUME_POLL_S)
            active_partitions = wanted or {KEEPALIVE_TP}
        records = await super()._getmany(active_partitions, timeout)
        for tp in [tp for tp, recs in records.items() if recs and self.is_paused(tp)]:
            # paused while this fetch was waiting: hand the records back to Kafka (seek to the first),
            # so that the pause takes effect at once instead of after the fetch timeout
            first = records.pop(tp)[0].offset
            await self._seek(tp, first)
        return records


class PausableTransport(faust_aiokafka.Transport):
    Consumer = PausableConsumer


class WorkerApp(faust.App):
    """faust app whose consumer keeps pause as desired state (:class:`PausableConsumer`).

    Set :attr:`fetch_paused` (``TP -> bool``) before the app starts.
    """

    fetch_paused: Callable[[TP], bool] = staticmethod(lambda tp: False)
    commits_in_transactions: bool = False

    def _new_transport(self) -> Any:
        return PausableTransport(self.conf.broker_consumer, self)

    before_revoke: Callable[[set], Awaitable[None]] | None = None
    before_stop: Callable[[], Awaitable[None]] | None = None

    def _new_consumer(self) -> Any:
        consumer = super()._new_consumer()
        consumer.is_paused = lambda tp: self.fetch_paused(tp)
        consumer.commits_in_transactions = self.commits_in_transactions
        consumer.before_revoke = self.before_revoke
        consumer.before_stop = self.before_stop
        return consumer


class PipelineService(Service):
    """Starts the pipeline's batchers with the app and drains it on stop."""

    def __init__(self, pipeline: TaskPipeline, topics: TopicCache, control: ControlPlane | None = None,
                 closing: list[Callable[[], Any]] | None = None, settler: TransactionalSettler | None = None,
                 **kwargs: Any):
        self.settler = settler
        self.pipeline = pipeline
        self.topics = topics
        self.control = control
        self.closing = closing or []
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        if self.settler is not None:
            await self.settler.start()
        self.pipeline.start()
        if self.control is not None:
            await self.control.start()

    async def on_stop(self) -> None:
        await self.pipeline.stop()
        if self.settler is not None:
            await self.settler.stop()
        if self.control is not None:
            await self.control.stop()
        await self.topics.close()
        for close in self.closing:
            await close()


def build_worker_app(
    settings: Settings,
    runners: Mapping[str, Any],
    policies: Mapping[str, BatchPolicy] | None = None,
) -> tuple[faust.App, TaskPipeline]:
    """Create the faust app of a worker serving ``runners`` (model name -> started ModelRunner).

    Returns:
        ``(app, pipeline)``; run the app with :func:`run_app`.
    """
    names = TopicNames(settings.topic_prefix)
    app = WorkerApp(settings.consumer_group, **faust_settings(settings))
    if policies is None:
        policies = {
            name: AdaptiveBatchPolicy(settings.latency_target_s, settings.max_batch_size, settings.max_wait_s,
                                      mode=settings.batching_mode)
            for name in runners
        }
    metrics: BatchMetrics = BatchMetrics()
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        prom = PrometheusMetrics()
        start_http_server(settings.metrics_port, addr="127.0.0.1", registry=prom.registry)
        log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", settings.metrics_port)
        metrics = prom

    async def send(topic: str, key: bytes | None, value: bytes | None, headers: list) -> Any:
        return await app.producer.send(topic, key, value, None, None, headers)

    def ack(event: faust.EventT) -> None:
        event.ack()

    def on_fatal(exc: BaseException) -> None:
        asyncio.ensure_future(app.crash(exc))

    kafka_kwargs = client_kwargs(settings)
    topics = TopicCache(settings.bootstrap_list, client_kwargs=kafka_kwargs)
    settler = None
    if settings.delivery == "exactly_once":
        settler = TransactionalSettler(
            settings.bootstrap_list, transactional_id=f"autoglm-{settings.consumer_group}-{settings.worker_id}",
            group_id=settings.consumer_group, transaction_timeout_s=settings.transaction_timeout_s,
            max_request_size=settings.max_message_bytes, client_kwargs=kafka_kwargs,
        )
    pipeline = TaskPipeline(
        names=names,
        worker_id=settings.worker_id,
        runners=runners,
        policies=policies,
        send=send,
        ack=ack,
        max_in_flight=settings.max_in_flight,
        on_fatal=on_fatal,
        metrics=metrics,
        topic_exists=topics.exists,
        inference_timeout_s=settings.inference_timeout_s,
        max_task_bytes=settings.max_task_bytes,
        max_result_bytes=settings.max_result_bytes,
        transact=settler,
    )
    task_topic = app.topic(
        *[names.tasks(m) for m in runners],
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        allow_empty=True,
    )

    state = ControlState(settings.worker_id, list(runners))
    app.fetch_paused = lambda tp: state.is_paused(names.model_of(tp.topic))
    app.commits_in_transactions = settler is not None
    lag = GroupLag(app, names, settings, kafka_kwargs)
    control = ControlPlane(
        bootstrap_servers=settings.bootstrap_list,
        names=names,
        state=state,
        produce=lambda topic, key, value: app.producer.send(topic, key, value, None, None, None),
        configure=lambda model, params: pipeline.configure(model, **params),
        drain=lambda: _drain(app, pipeline),
        figures=pipeline.figures,
        lag=lag.per_model,
        in_flight=lambda: pipeline.in_flight,
        key=settings.control_key_bytes,
        status_interval_s=settings.status_interval_s,
        drain_timeout_s=settings.drain_timeout_s,
        client_kwargs=kafka_kwargs,
    )

    @app.agent(task_topic, name="autoglm-tasks")
    async def serve_tasks(stream: faust.StreamT) -> None:
        async for event in stream.noack().events():
            msg = event.message
            await pipeline.on_record(msg.topic, msg.partition, msg.offset, msg.key, msg.value, event)

    async def before_revoke(revoked: set) -> None:
        tps = [(tp.topic, tp.partition) for tp in revoked]
        await pipeline.release_partitions(tps, timeout_s=settings.rebalance_timeout_s / 3)
        if settler is not None and not await settler.flush(timeout_s=settings.rebalance_timeout_s / 3):
            log.warning("transactions still in progress while partitions are revoked")

    async def before_stop() -> None:
        await pipeline.stop(timeout_s=settings.stop_timeout_s)
        if settler is not None:
            await settler.flush(timeout_s=10.0)

    app.before_revoke = before_revoke
    app.before_stop = before_stop

    @app.on_partitions_revoked.connect
    async def on_revoked(app_: faust.App, revoked: set, **kwargs: Any) -> None:
        pipeline.revoke([(tp.topic, tp.partition) for tp in revoked])

    @app.on_partitions_assigned.connect
    async def on_assigned(app_: faust.App, assigned: set, **kwargs: Any) -> None:
        pipeline.assigned([(tp.topic, tp.partition) for tp in assigned])

    app.service(PipelineService(pipeline, topics, control, closing=[lag.close], settler=settler))
    app.control = control  # type: ignore[attr-defined]
    return app, pipeline


async def _drain(app: faust.App, pipeline: TaskPipeline, poll_s: float = 0.05) -> dict[str, Any]:
    """Wait until every fetched record is answered, acknowledged and committed.

    The fetch predicate already excludes every partition (the state is
    ``draining``); partial batches go to the model at once (no ``max_wait_s``);
    records fetched just before the pause are still delivered, so this polls
    until nothing is in the pipeline and faust holds no unacknowledged record,
    twice in a row, then commits. Cancellable (the caller bounds it with
    ``drain_timeout_s``); the batchers return to normal batching either way.
    """
    consumer = app.consumer
    for batcher in pipeline.batchers.values():
        batcher.set_flushing(True)
    try:
        quiet = 0
        while quiet < 2:
            await asyncio.sleep(poll_s)
            consumer._clean_unacked_messages()
            quiet = quiet + 1 if not pipeline.in_flight and not consumer._unacked_messages else 0
        await consumer._commit_now()
    finally:
        for batcher in pipeline.batchers.values():
            batcher.set_flushing(False)
    return {"in_flight": pipeline.in_flight, "served": pipeline.counters.received}


class GroupLag:
    """Consumer lag per model over this worker's partitions: log end offset minus committed offset
    (the LAG column of ``kafka-consumer-groups.sh``)."""

    def __init__(self, app: faust.App, names: TopicNames, settings: Settings, kafka_kwargs: dict):
        self.app, self.names, self.settings, self.kafka_kwargs = app, names, settings, kafka_kwargs
        self._admin: Any = None

    async def per_model(self) -> dict[str, int | None]:
        from aiokafka.admin import AIOKafkaAdminClient

        assigned = [tp for tp in self.app.consumer.assignment() if self.names.model_of(tp.topic)]
        if not assigned:
            return {}
        if self._admin is None:
            self._admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.bootstrap_list, **self.kafka_kwargs)
            await self._admin.start()
        ends = await self.app.consumer.highwaters(*assigned)
        committed = await self._admin.list_consumer_group_offsets(self.settings.consumer_group, partitions=assigned)
        lags: dict[str, int | None] = {}
        for tp in assigned:
            model = self.names.model_of(tp.topic)
            meta = committed.get(tp)
            done = meta.offset if meta is not None and meta.offset >= 0 else 0
            lags[model] = (lags.get(model) or 0) + max(0, ends.get(tp, done) - done)
        return lags

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.close()
            self._admin = None


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
