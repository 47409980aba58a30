"""HotModels on Apache Kafka: a load creates the model's topic and serves it; an unload drains first."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm.errors import ModelSpecError
from autoglm.models.host import ModelHost
from autoglm.models.repository import ModelRepository
from autoglm.streams.hot_models import HotModels
from autoglm.streams.topics import TopicNames, partitions_of
from tests.unit.models import repo_fixtures as rf

pytestmark = pytest.mark.integration


async def test_load_reload_unload_through_the_hook(kafka_bootstrap, prefix, tmp_path):
    rf.torchscript_model(tmp_path, "tiny")
    rf.torchscript_model(tmp_path, "broken", out_shape="[7]")
    calls = []

    async def fetch(model):
        calls.append(("fetch", model))

    async def drain(model):
        calls.append(("drain", model))

    host = ModelHost(ModelRepository(tmp_path), device="cpu")
    hot = HotModels(host, bootstrap_servers=kafka_bootstrap, names=TopicNames(prefix), partitions=2,
                    fetch=fetch, drain=drain)
    figures = await hot("load", "tiny")
    assert figures["device"] == "cpu" and len(figures["sha256"]) == 16
    assert await partitions_of(kafka_bootstrap, f"{prefix}.tasks.tiny") == [0, 1]
    runner = host.runners["tiny"]
    out = await runner.run([runner.model.prepare(np.ones((1, 4), np.float32))])
    assert out[0].shape == (1, 3)
    with pytest.raises(ModelSpecError):
        await hot("load", "broken")  # fails before any topic is made for it
    from autoglm.errors import TopicMissingError

    with pytest.raises(TopicMissingError):
        await partitions_of(kafka_bootstrap, f"{prefix}.tasks.broken", timeout_s=0.5)
    assert (await hot("reload", "tiny"))["sha256"] == figures["sha256"]  # same files, same version
    assert host.runners["tiny"] is not runner
    assert await hot("unload", "tiny") == {"unloaded": True}
    assert calls == [("fetch", "tiny"), ("drain", "tiny")] and host.runners == {}
    with pytest.raises(ValueError):
        await hot("pause", "tiny")
