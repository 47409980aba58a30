"""A client call whose inputs cannot be encoded (found by the new-user review).

`streams/client.py` `Client._submit` registers a future per task in ``_waiting`` before
``encode_task``; a ``TensorError`` there (NaN, a dict of strings) is not a ``KafkaError``, so the
futures stay registered: one leaked entry per failed call, and at close each gets a
``BrokerError`` nobody reads ("Future exception was never retrieved ... client closed before the
result arrived" on stderr). The error also names ``outputs.data`` for an input (``encode_tensor``
in `streams/codec.py` labels every tensor as an output).
Suggested fix: encode the tasks before creating futures (or ``_forget`` on any exception), and
let ``encode_tensor`` take the field name.
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
