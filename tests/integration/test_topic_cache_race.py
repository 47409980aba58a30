"""TopicCache.exists asked twice at once on a fresh cache (found by the new-user review).

`streams/topics.py` `TopicCache.exists` set ``self._admin`` before ``await self._admin.start()``;
a second call arriving meanwhile saw an admin client that was not started, its
``describe_topics`` failed with ``NodeNotReadyError`` and the topic was cached as missing for
``negative_ttl_s``. Fixed: every first check waits for the one start. Seen on a worker (log: "could not check topic 'nu.results':
NodeNotReadyError(...)"): a task with ``reply_to: nu.results`` that arrived beside one with a
missing ``reply_to`` was rejected and dead-lettered ("expected an existing topic, got
'nu.results'"), as would every task replying there for the next 5 s.
"""
from __future__ import annotations

import asyncio

import pytest

from autoglm.streams.topics import TopicCache

from .kafka_io import create_topics

pytestmark = pytest.mark.integration


async def test_concurrent_first_checks_see_an_existing_topic(kafka_bootstrap, prefix):
    await create_topics(kafka_bootstrap, prefix, partitions=1)
    cache = TopicCache(kafka_bootstrap)
    try:
        missing, present = await asyncio.gather(cache.exists(f"{prefix}.no-such-topic"),
                                                cache.exists(f"{prefix}.results"))
    finally:
        await cache.close()
    assert missing is False
    assert present is True
    assert cache.cached(f"{prefix}.results") is True
