"""A client call whose inputs cannot be encoded (found by the new-user review).

`streams/client.py` `Client._submit` registered a future per task before ``encode_task``; a
``TensorError`` there (NaN, a dict of strings) is not a ``KafkaError``, so the futures stayed
registered (one leaked entry per failed call, and a ``BrokerError`` nobody read at close), and the
error named ``outputs.data`` for an input. Fixed: the tasks are encoded before any future is made,
and ``encode_tensor`` takes the field name.
"""
from __future__ import annotations

import numpy as np
import pytest

from autoglm.errors import AutoGLMError
from autoglm.streams.client import Client

from .kafka_io import create_topics

pytestmark = pytest.mark.integration


async def _nan_call(client: Client) -> AutoGLMError:
    with pytest.raises(AutoGLMError) as info:
        await client.infer("digits", np.full((1, 64), np.nan, np.float32), timeout_s=5)
    return info.value


async def test_unencodable_input_leaves_no_future(kafka_bootstrap, prefix):
    await create_topics(kafka_bootstrap, prefix, partitions=1)
    async with Client(kafka_bootstrap, prefix=prefix) as client:
        await _nan_call(client)
        assert client._waiting == {}


async def test_unencodable_input_error_names_the_inputs(kafka_bootstrap, prefix):
    await create_topics(kafka_bootstrap, prefix, partitions=1)
    async with Client(kafka_bootstrap, prefix=prefix) as client:
        assert "inputs" in str(await _nan_call(client))
