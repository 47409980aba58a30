"""The worker's assembly (streams/app.py) without a broker: the in-flight cap as a batch ceiling."""

from __future__ import annotations

import logging

from autoglm.processors.adaptive import AdaptiveBatchPolicy
from autoglm.streams.app import Worker, WorkerConfig
from autoglm.streams.consumer import ConsumerConfig, fetch_limits


class Runner:
    model = None


def test_in_flight_cap_below_max_batch_size_is_the_ceiling_and_is_warned_about(caplog):
    """MAX_IN_FLIGHT=16 with MAX_BATCH_SIZE=64: the start-up warning names both settings, and the
    policy never asks for more than 16 tasks, whether idle, under its target or overloaded."""
    config = WorkerConfig(ConsumerConfig(["k:9092"], "g", (), max_in_flight=16), max_batch_size=64)
    with caplog.at_level(logging.WARNING, logger="autoglm.streams.app"):
        worker = Worker(config, {"digits": Runner()})
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "MAX_IN_FLIGHT=16" in warning and "MAX_BATCH_SIZE=64" in warning and "at most 16" in warning
    policy = worker.pipeline.policies["digits"]
    assert isinstance(policy, AdaptiveBatchPolicy)
    assert (policy.max_batch_size, policy.batch_ceiling, policy.figures().batch_ceiling) == (64, 16, 16)

    sizes, targets = [], []
    now = 0.0
    for i in range(400):  # a cheap model (a + b*n = 1 ms + 0.05 ms/task), then an overload of slow batches
        overloaded = i >= 200
        decision = policy.decide(now, queued=5000, oldest_enqueued_s=now - (2.0 if overloaded else 0.0),
                                 busy=False)
        n = decision.size
        sizes.append(n)
        service_s = 0.001 + 0.00005 * n
        policy.observe(now + service_s, n, service_s, [3.0 if overloaded else 0.01] * n)
        policy.observe_cycle(n, service_s * 1.5, policy.last_target_size)
        targets.append(policy.figures().target_size)
        now += service_s
    assert max(sizes) == 16 and max(targets) <= 16
    assert min(sizes) >= 1


def test_no_warning_when_the_cap_is_above_the_batch_size(caplog):
    config = WorkerConfig(ConsumerConfig(["k:9092"], "g", (), max_in_flight=1024), max_batch_size=64)
    with caplog.at_level(logging.WARNING, logger="autoglm.streams.app"):
        worker = Worker(config, {"digits": Runner()})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert worker.pipeline.policies["digits"].batch_ceiling == 64


def test_fetch_limits_follow_the_cap_and_the_record_limit():
    """The fetch buffer is about the in-flight window of records: cap x task limit, at least one
    largest record, at most Kafka's 50 MiB default."""
    mib = 1024 * 1024
    assert fetch_limits(20, mib, 4 * mib) == {"fetch_max_bytes": 20 * mib, "max_partition_fetch_bytes": 4 * mib}
    assert fetch_limits(2, mib, 4 * mib) == {"fetch_max_bytes": 4 * mib, "max_partition_fetch_bytes": 4 * mib}
    assert fetch_limits(100_000, mib, 4 * mib)["fetch_max_bytes"] == 50 * mib


def test_a_pipeline_worker_wires_its_steps_as_streams(tmp_path):
    """Stages from the shipped digits-routing file: topics read, control streams, and each step's policy
    from the worker settings, then the step's batching and its share of the pipeline's latency target."""
    from pathlib import Path

    from autoglm.pipelines import load_pipeline
    from autoglm.processors.control import Stream
    from autoglm.streams.hops import stages_of
    from autoglm.streams.topics import TopicNames

    example = Path(__file__).resolve().parents[3] / "examples" / "pipelines" / "digits-routing" / "pipeline.yaml"
    pipeline = load_pipeline(example)
    stages = {st.name: st for st in stages_of(pipeline, TopicNames("pfx"), {
        "digits": (("image",), ("probabilities",)), "digits-linear": (("image",), ("probabilities",))})}
    config = WorkerConfig(ConsumerConfig(["k:9092"], "g", (), max_in_flight=1024), prefix="pfx", latency_target_s=0.5,
                          max_batch_size=256, max_wait_s=0.05)
    worker = Worker(config, {"digits": Runner(), **{name: Runner() for name in stages}}, stages=stages)

    assert worker.consumer.config.topics == ("pfx.tasks.digits", "pfx.pipelines.digits-routing.in",
                                             "pfx.pipelines.digits-routing.second")
    assert worker.names.model_of("pfx.pipelines.digits-routing.second") == "digits-routing/second"
    assert worker.control_state.streams["digits-routing/first"] == Stream("digits", "digits-routing", "first")
    first, second = (worker.pipeline.policies[f"digits-routing/{s}"] for s in ("first", "second"))
    assert (first.max_batch_size, first.max_wait_s, first.latency_target_s) == (64, 0.01, 0.1)
    assert (second.max_batch_size, second.latency_target_s) == (16, 0.1)
    plain = worker.pipeline.policies["digits"]
    assert (plain.max_batch_size, plain.latency_target_s) == (256, 0.5)
