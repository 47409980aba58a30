"""A worker serving a model repository through Apache Kafka, called with ``autoglm.Client``.

One repository holds a TorchScript model, an ONNX model exported from the same
torch module, and a Python-factory model with two named outputs of different
dtypes; results equal the same models run offline, for tasks of 1 and several
rows that fell into shared batches.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from aiokafka.admin import AIOKafkaAdminClient

from autoglm import Client, SyncClient
from autoglm.errors import TaskExpiredError, TaskRejectedError, TopicMissingError
from tests.unit.models import repo_fixtures as rf

from .kafka_io import create_topics

pytestmark = pytest.mark.integration

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10.0  # the python model's weights (repo_fixtures.TWO_HEADS)


def offline(net, x):
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


async def _first_result(client: Client, model: str, x: np.ndarray, timeout_s: float = 120.0):
    """The first call waits for the worker to load and join its group."""
    return await client.infer(model, x, timeout_s=timeout_s)


async def test_a_repository_served_end_to_end_equals_the_models_offline(kafka_bootstrap, prefix, workers, tmp_path):
    repo = tmp_path / "repo"
    net = rf.torchscript_model(repo, "tiny")
    models = ["tiny", "two-heads"]
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        onet = rf.onnx_model(repo, "tiny-onnx")
        models.append("tiny-onnx")
    except ImportError:
        onet = None
    rf.python_model(repo, "two-heads", module="two_heads_it")
    await create_topics(kafka_bootstrap, prefix, models)
    proc = workers.start(kafka_bootstrap, prefix, ",".join(models), model_repo=str(repo), max_wait_s="0.05",
                         max_batch_size="32", batching_mode="fixed")
    rng = np.random.default_rng(3)
    async with Client(kafka_bootstrap, prefix=prefix) as client:
        await _first_result(client, "tiny", rng.random((1, 4), dtype=np.float32))
        assert proc.poll() is None, workers.log(proc)
        inputs = [rng.random((1 + i % 3, 4), dtype=np.float32) for i in range(40)]
        for name, reference in (("tiny", net), ("tiny-onnx", onet)):
            if reference is None:
                continue
            results = await client.results(name, inputs, timeout_s=60)
            assert all(r.status == "ok" for r in results), [r.error for r in results if r.status != "ok"]
            assert max(r.batch_size for r in results) > 1, "no task shared a batch"
            for x, r in zip(inputs, results):
                assert r.outputs.shape == (len(x), 3) and r.outputs.dtype == np.float32
                assert np.abs(r.outputs - offline(reference, x)).max() <= 1e-5
        outs = await client.infer_many("two-heads", inputs, timeout_s=60)
        for x, out in zip(inputs, outs):
            logits = x @ W
            assert sorted(out) == ["label", "logits"] and out["label"].dtype == np.int64
            assert np.abs(out["logits"] - logits).max() <= 1e-5
            assert out["label"].tolist() == logits.argmax(axis=1).tolist()
        with pytest.raises(TaskRejectedError) as info:  # max_rows: 8 in tiny's model.yaml
            await client.infer("tiny", np.zeros((9, 4), np.float32), timeout_s=30)
        assert info.value.code == "input_signature" and "at most 8 rows per task" in str(info.value)


async def test_the_client_matches_1000_concurrent_calls_raises_expired_and_leaves_nothing_behind(
        kafka_bootstrap, prefix, workers, tmp_path):
    repo = tmp_path / "repo"
    net = rf.torchscript_model(repo, "tiny")
    await create_topics(kafka_bootstrap, prefix, ["tiny"])
    workers.start(kafka_bootstrap, prefix, "tiny", model_repo=str(repo))
    x = np.random.default_rng(5).random((1000, 4), dtype=np.float32)
    expected = offline(net, x)
    client = Client(kafka_bootstrap, prefix=prefix)
    await _first_result(client, "tiny", x[:1])
    outs = await asyncio.gather(*(client.infer("tiny", x[i : i + 1], timeout_s=120) for i in range(1000)))
    assert np.abs(np.concatenate(outs) - expected).max() <= 1e-5  # every call got its own task's result
    with pytest.raises(TaskExpiredError) as info:
        await client.infer("tiny", x[:1], deadline_s=-1.0, timeout_s=30)
    assert info.value.code == "deadline" and info.value.status == "expired"
    started = time.monotonic()
    with pytest.raises(TopicMissingError, match="is a worker serving model 'tinny'"):
        await client.infer("tinny", x[:1], timeout_s=60)  # a mistyped model: told at once, not after 40 s
    assert time.monotonic() - started < 15
    topic = client.reply_topic
    await client.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        groups = [g[0] if isinstance(g, tuple) else g for g in await admin.list_consumer_groups()]
        assert not [g for g in groups if client.client_id in str(g)]
        for _ in range(50):  # topic deletion is asynchronous on the broker
            if topic not in await admin.list_topics():
                break
            await asyncio.sleep(0.1)
        assert topic not in await admin.list_topics()
    finally:
        await admin.close()
    with SyncClient(kafka_bootstrap, prefix=prefix) as sync:  # the blocking wrapper, same worker
        assert np.abs(sync.infer("tiny", x[:2], timeout_s=60) - expected[:2]).max() <= 1e-5


async def test_a_worker_with_an_invalid_repository_exits_2_before_creating_topics(kafka_bootstrap, prefix, workers,
                                                                                 tmp_path):
    repo = tmp_path / "repo"
    rf.torchscript_model(repo, "good")
    rf.torchscript_model(repo, "bad", out_shape="[4]")  # the model returns 3 per row
    proc = workers.start(kafka_bootstrap, prefix, "", model_repo=str(repo))
    assert proc.wait(timeout=120) == 2
    log = workers.log(proc)
    assert f"{repo / 'bad' / 'model.yaml'}: key 'outputs[0].shape': expected float32 (1, 4)" in log
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert not [t for t in await admin.list_topics() if t.startswith(prefix)]
    finally:
        await admin.close()


async def test_concurrent_first_calls_share_one_reply_consumer(kafka_bootstrap, prefix, workers, tmp_path):
    repo = tmp_path / "repo"
    net = rf.torchscript_model(repo, "tiny")
    await create_topics(kafka_bootstrap, prefix, ["tiny"])
    workers.start(kafka_bootstrap, prefix, "tiny", model_repo=str(repo))
    x = np.random.default_rng(9).random((20, 4), dtype=np.float32)
    async with Client(kafka_bootstrap, prefix=prefix) as warm:  # wait until the worker serves
        await _first_result(warm, "tiny", x[:1])
    client = Client(kafka_bootstrap, prefix=prefix)  # not started: the 20 calls below start it together
    try:
        outs = await asyncio.gather(*(client.infer("tiny", x[i : i + 1], timeout_s=60) for i in range(20)))
        assert np.abs(np.concatenate(outs) - offline(net, x)).max() <= 1e-5
    finally:
        await client.close()
