"""Batch spans and trace-context forwarding with the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator  # noqa: E402

from autoglm.streams.tracing import BatchTracing, OtelTracing  # noqa: E402


@pytest.fixture
def traced():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OtelTracing(provider), provider, exporter


def producer_headers(provider, n: int) -> tuple[list, list]:
    """n task records' headers, each with the traceparent of its own creation span."""
    tracer = provider.get_tracer("client")
    headers, contexts = [], []
    for i in range(n):
        with tracer.start_as_current_span(f"create {i}") as span:
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
            headers.append([(k, v.encode()) for k, v in carrier.items()])
            contexts.append(span.get_span_context())
    return headers, contexts


def test_one_batch_gives_a_process_span_linked_to_each_task_and_a_send_child(traced):
    tracing, provider, exporter = traced
    headers, contexts = producer_headers(provider, 3)
    headers.append([("other", b"x")])  # a task without trace context: no link, still counted
    records = [(1, 40 + i, h) for i, h in enumerate(headers)]
    exporter.clear()
    with tracing.process("p.tasks.digits", model="digits", group="p-workers", records=records) as span:
        span.set_inference(0.0125)
        with tracing.send("p.results", count=4):
            pass
    send, process = exporter.get_finished_spans()
    assert process.name == "process p.tasks.digits" and process.kind == SpanKind.CONSUMER
    attrs = dict(process.attributes)
    assert attrs["messaging.system"] == "kafka"
    assert attrs["messaging.operation.type"] == "process"
    assert attrs["messaging.destination.name"] == "p.tasks.digits"
    assert attrs["messaging.consumer.group.name"] == "p-workers"
    assert attrs["messaging.batch.message_count"] == 4 and attrs["autoglm.batch_size"] == 4
    assert attrs["messaging.destination.partition.id"] == "1"
    assert attrs["autoglm.model"] == "digits" and attrs["autoglm.inference_ms"] == pytest.approx(12.5)
    # each link is the task's creation context (read back from its header: remote)
    assert [(link.context.trace_id, link.context.span_id) for link in process.links] == [
        (c.trace_id, c.span_id) for c in contexts]
    assert all(link.context.is_remote for link in process.links)
    assert [link.attributes["messaging.kafka.offset"] for link in process.links] == [40, 41, 42]
    assert send.name == "send p.results" and send.kind == SpanKind.PRODUCER
    assert send.parent.span_id == process.context.span_id
    assert dict(send.attributes)["messaging.batch.message_count"] == 4


def test_results_carry_the_tasks_trace_context(traced):
    tracing, provider, _ = traced
    (headers,), _ = producer_headers(provider, 1)
    forwarded = tracing.result_headers(headers + [("autoglm.other", b"1")])
    assert [k for k, _ in forwarded] == ["traceparent"]
    assert forwarded[0][1] == dict(headers)["traceparent"]


def test_an_invalid_traceparent_gives_no_link(traced):
    tracing, _, exporter = traced
    with tracing.process("t", model="m", group="g", records=[(0, 1, [("traceparent", b"00-zz-zz-01")])]):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.links == () or list(span.links) == []
    assert dict(span.attributes)["messaging.batch.message_count"] == 1


def test_tracing_off_records_and_forwards_nothing():
    off = BatchTracing()
    with off.process("t", model="m", group="g", records=[(0, 1, [("traceparent", b"00-...")])]) as span:
        span.set_inference(1.0)
        with off.send("r", count=1):
            pass
    assert off.result_headers([("traceparent", b"00-...")]) == [] and not off.enabled


async def test_the_pipeline_traces_each_batch_and_forwards_trace_context_to_results(traced):
    """Through the worker's data path (streams/pipeline.py, fakes for Kafka): one ``process`` span
    per batch linked to each traced task, a ``send`` child for its results, and each result record
    carrying its task's ``traceparent``."""
    from autoglm.processors.batching import FixedBatchPolicy
    from autoglm.streams.pipeline import TaskPipeline
    from autoglm.streams.topics import TopicNames

    from .test_pipeline import TOPIC, FakeBroker, FakeRunner, Rec, rows, task_bytes

    tracing, provider, exporter = traced
    headers, contexts = producer_headers(provider, 3)
    exporter.clear()
    broker = FakeBroker()
    pipeline = TaskPipeline(
        names=TopicNames("t"), worker_id="w", runners={"toy": FakeRunner()},
        policies={"toy": FixedBatchPolicy(max_batch_size=8, max_wait_s=0.0)}, produce=broker.produce,
        ack=lambda tp, position: None, max_in_flight=100, tracing=tracing, group_id="t-workers",
    )
    pipeline.on_records(TOPIC, 0, [Rec(i, f"k{i}".encode(), task_bytes(f"k{i}", rows(i)), headers[i])
                                   for i in range(3)])
    pipeline.start()
    await pipeline.stop()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    process, send = spans["process t.tasks.toy"], spans["send t.results"]
    assert process.kind == SpanKind.CONSUMER and send.kind == SpanKind.PRODUCER
    assert [link.context.span_id for link in process.links] == [c.span_id for c in contexts]
    assert [link.attributes["messaging.kafka.offset"] for link in process.links] == [0, 1, 2]
    assert process.attributes["messaging.consumer.group.name"] == "t-workers"
    assert process.attributes["messaging.batch.message_count"] == 3
    assert send.parent.span_id == process.context.span_id
    assert send.attributes["messaging.batch.message_count"] == 3
    for i, sent in enumerate(broker.sent):
        assert dict(sent.headers)["traceparent"] == dict(headers[i])["traceparent"]


async def test_tracing_off_writes_no_headers_and_makes_no_spans():
    from autoglm.processors.batching import FixedBatchPolicy
    from autoglm.streams.pipeline import TaskPipeline
    from autoglm.streams.topics import TopicNames

    from .test_pipeline import TOPIC, FakeBroker, FakeRunner, Rec, rows, task_bytes

    broker = FakeBroker()
    pipeline = TaskPipeline(
        names=TopicNames("t"), worker_id="w", runners={"toy": FakeRunner()},
        policies={"toy": FixedBatchPolicy(max_batch_size=8, max_wait_s=0.0)}, produce=broker.produce,
        ack=lambda tp, position: None, max_in_flight=100,
    )
    assert not pipeline.tracing.enabled
    pipeline.on_records(TOPIC, 0, [Rec(0, b"k", task_bytes("k", rows(0)), [("traceparent", b"00-x-y-01")])])
    pipeline.start()
    await pipeline.stop()
    assert [s.headers for s in broker.sent] == [[]]
