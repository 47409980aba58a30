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
from typing import Any, Mapping

import faust
from mode import Service

from autoglm.config import Settings
from autoglm.processors.adaptive import AdaptiveBatchPolicy
from autoglm.processors.batching import BatchPolicy
from autoglm.processors.metrics import BatchMetrics, PrometheusMetrics
from autoglm.streams.pipeline import TaskPipeline
from autoglm.streams.topics import TopicCache, TopicNames

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
        stream_buffer_maxsize=max(256, settings.max_in_flight),
        # an exception or cancellation in the agent must never ack a record
        stream_ack_exceptions=False,
        stream_ack_cancelled_tasks=False,
        stream_wait_empty=True,
        # producer: wait for all in-sync replicas before a result counts as delivered
        producer_acks=-1,
        producer_max_request_size=settings.max_message_bytes,
        producer_linger=0.001,
        # no leader election topic, no web server, no table store, no topic creation
        topic_disable_leader=True,
        topic_allow_declare=False,
        web_enabled=False,
        store="memory://",
    )


class PipelineService(Service):
    """Starts the pipeline's batchers with the app and drains it on stop."""

    def __init__(self, pipeline: TaskPipeline, topics: TopicCache, **kwargs: Any):
        self.pipeline = pipeline
        self.topics = topics
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        self.pipeline.start()

    async def on_stop(self) -> None:
        await self.pipeline.stop()
        await self.topics.close()


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
    app = faust.App(settings.consumer_group, **faust_settings(settings))
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

    topics = TopicCache(settings.bootstrap_list)
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
    )
    task_topic = app.topic(
        *[names.tasks(m) for m in runners],
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        allow_empty=True,
    )

    @app.agent(task_topic, name="autoglm-tasks")
    async def serve_tasks(stream: faust.StreamT) -> None:
        async for event in stream.noack().events():
            msg = event.message
            await pipeline.on_record(msg.topic, msg.partition, msg.offset, msg.key, msg.value, event)

    @app.on_partitions_revoked.connect
    async def on_revoked(app_: faust.App, revoked: set, **kwargs: Any) -> None:
        pipeline.revoke([(tp.topic, tp.partition) for tp in revoked])

    app.service(PipelineService(pipeline, topics))
    return app, pipeline


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
