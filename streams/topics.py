"""Topic names and their creation.

Layout (``<prefix>`` defaults to ``autoglm``):

================================  ===========  =========================================
topic                             partitions   carries
================================  ===========  =========================================
``<prefix>.tasks.<model>``        configured   task events for one model
``<prefix>.results``              configured   result events, keyed by task id
``<prefix>.dlq``                  configured   dead letters: original bytes + reason headers
``<prefix>.control``              1            control events (ordered, compacted, read by all)
``<prefix>.status``               1            worker acks and heartbeats
``<prefix>.pipelines.<p>.in``     configured   task events for pipeline ``p`` (unless it names its own)
``<prefix>.pipelines.<p>.<step>`` configured   hop events: tasks of ``p`` on their way to ``step``
================================  ===========  =========================================

One task topic per model: a model's stream can be paused (Kafka's per-partition
pause) without touching another's, each model's backlog and consumer lag is
visible on its own, and a model can get its own partition count.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from autoglm.processors.errors import BrokerError, TopicMissingError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TopicNames:
    """Topic names derived from one prefix.

    Attributes:
        prefix: the topic prefix.
        streams: the pipeline steps a worker serves: stream name (``<pipeline>/<step>``) -> the topic
            it reads (the pipeline's input topic for its first step, else the step's intermediate topic).
    """

    prefix: str = "autoglm"
    streams: Mapping[str, str] = field(default_factory=dict, compare=False)
    _by_topic: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_topic", {topic: name for name, topic in self.streams.items()})

    def tasks(self, model: str) -> str:
        """The task topic of ``model`` (or the topic a pipeline step of :attr:`streams` reads)."""
        return self.streams.get(model) or f"{self.prefix}.tasks.{model}"

    def model_of(self, topic: str) -> str | None:
        """The model (or pipeline step of :attr:`streams`) whose task topic ``topic`` is, or None."""
        stream = self._by_topic.get(topic)
        if stream is not None:
            return stream
        head = f"{self.prefix}.tasks."
        return topic[len(head):] if topic.startswith(head) else None

    def pipeline_input(self, pipeline: str) -> str:
        """The default input topic of a pipeline (``input.topic`` in its file overrides it)."""
        return f"{self.prefix}.pipelines.{pipeline}.in"

    def pipeline_step(self, pipeline: str, step: str) -> str:
        """The intermediate topic of a pipeline's step: hop events on their way to it."""
        return f"{self.prefix}.pipelines.{pipeline}.{step}"

    @property
    def results(self) -> str:
        return f"{self.prefix}.results"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    @property
    def control(self) -> str:
        return f"{self.prefix}.control"

    @property
    def status(self) -> str:
        return f"{self.prefix}.status"


async def ensure_topics(
    bootstrap_servers: list[str] | str,
    names: TopicNames,
    models: list[str] | tuple[str, ...],
    *,
    partitions: int,
    replication_factor: int = 1,
    max_message_bytes: int | None = None,
    client_kwargs: dict | None = None,
    extra: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """Create the project's topics that do not exist yet; existing ones are left alone.

    ``extra``: more topics of ``partitions`` partitions (a pipeline's input and intermediate topics).

    Returns:
        The names of the topics that were created.

    Raises:
        BrokerError: the broker could not be reached or refused the creation.
    """
    wanted: dict[str, int] = {names.tasks(m): partitions for m in models}
    wanted.update({t: partitions for t in extra})
    wanted[names.results] = partitions
    wanted[names.dlq] = partitions
    wanted[names.control] = 1
    wanted[names.status] = 1
    configs = {"max.message.bytes": str(max_message_bytes)} if max_message_bytes else {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **(client_kwargs or {}))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        special = {
            # compacted: the latest event per control key survives, so a late worker rebuilds the state
            names.control: {"cleanup.policy": "compact"},
            # heartbeats and acks are only read recently: keep a day
            names.status: {"retention.ms": str(24 * 3600 * 1000)},
        }
        missing = [
            NewTopic(name=t, num_partitions=n, replication_factor=replication_factor,
                     topic_configs={**configs, **special.get(t, {})})
            for t, n in wanted.items()
            if t not in existing
        ]
        if names.control in existing or names.status in existing:
            for info in await admin.describe_topics([t for t in (names.control, names.status) if t in existing]):
                count = len(info.get("partitions", []))
                if count != 1:
                    raise BrokerError(
                        f"topic {info.get('topic')!r} has {count} partitions; the control and status topics "
                        "need exactly 1 (events are ordered and every worker reads all of them). Delete it, "
                        "or use another AUTOGLM_TOPIC_PREFIX"
                    )
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:  # another worker won the race
                pass
            log.info("created topics %s", [t.name for t in missing])
        return [t.name for t in missing]
    except KafkaError as exc:
        raise BrokerError(f"could not create topics on {bootstrap_servers}: {exc!r}") from exc
    finally:
        await admin.close()


async def partitions_of(
    bootstrap_servers: list[str] | str, topic: str, *, timeout_s: float = 10.0, client_kwargs: dict | None = None
) -> list[int]:
    """Partition ids of ``topic``, waiting up to ``timeout_s`` for a just-created topic to appear.

    Raises:
        TopicMissingError: the topic does not exist after ``timeout_s``.
        BrokerError: the broker is unreachable or refused (authentication, authorization).
    """
    import asyncio
    import time

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **(client_kwargs or {}))
    deadline = time.monotonic() + timeout_s
    try:
        await admin.start()
        while True:
            # ask list_topics first: a metadata request for one topic may auto-create it on brokers
            # that allow that (the embedded one does), with the wrong partition count
            if topic not in set(await admin.list_topics()):
                if time.monotonic() >= deadline:
                    raise TopicMissingError(f"topic {topic!r} does not exist on {bootstrap_servers}")
                await asyncio.sleep(0.1)
                continue
            described = await admin.describe_topics([topic])
            info = described[0] if described else {}
            parts = sorted(p["partition"] for p in info.get("partitions", []))
            if info.get("error_code", 0) == 0 and parts:
                return parts
            if time.monotonic() >= deadline:
                raise TopicMissingError(f"topic {topic!r} does not exist on {bootstrap_servers}")
            await asyncio.sleep(0.1)
    except KafkaError as exc:
        raise BrokerError(f"could not describe {topic!r} on {bootstrap_servers}: {exc!r}") from exc
    finally:
        await admin.close()


class TopicCache:
    """Whether topics exist, asked of the broker (admin client) and cached.

    A topic seen to exist is remembered; a missing one is asked again after
    ``negative_ttl_s``. Used to refuse a task whose ``reply_to`` names a topic
    that does not exist, instead of a producer waiting on its metadata forever.

    Args:
        bootstrap_servers: ``host:port`` list.
        negative_ttl_s: seconds a "missing" answer is trusted.
        timeout_s: the longest one broker question may take; no answer counts as missing.
    """

    def __init__(self, bootstrap_servers: list[str] | str, *, negative_ttl_s: float = 5.0,
                 timeout_s: float = 5.0, client_kwargs: dict | None = None):
        import time

        self._bootstrap = bootstrap_servers
        self._kwargs = client_kwargs or {}
        self._negative_ttl_s = negative_ttl_s
        self._timeout_s = timeout_s
        self._clock = time.monotonic
        self._present: set[str] = set()
        self._missing: dict[str, float] = {}
        self._admin: AIOKafkaAdminClient | None = None
        self._admin_start: asyncio.Future | None = None

    def cached(self, topic: str) -> bool | None:
        """The known answer for ``topic`` without asking the broker: True (exists), False (missing,
        asked less than ``negative_ttl_s`` ago), or None (ask with :meth:`exists`)."""
        if topic in self._present:
            return True
        checked = self._missing.get(topic)
        if checked is not None and self._clock() - checked < self._negative_ttl_s:
            return False
        return None

    async def exists(self, topic: str) -> bool:
        import asyncio

        if topic in self._present:
            return True
        checked = self._missing.get(topic)
        if checked is not None and self._clock() - checked < self._negative_ttl_s:
            return False
        try:
            admin = await self._started_admin()
            described = await asyncio.wait_for(admin.describe_topics([topic]), self._timeout_s)
            info = described[0] if described else {}
            found = info.get("error_code", 0) == 0 and bool(info.get("partitions"))
        except (KafkaError, asyncio.TimeoutError) as exc:
            log.warning("could not check topic %r: %r", topic, exc)
            found = False
        if found:
            self._present.add(topic)
            self._missing.pop(topic, None)
        else:
            self._missing[topic] = self._clock()
        return found

    async def _started_admin(self) -> AIOKafkaAdminClient:
        """The admin client, started once: concurrent first checks wait for the one start (a client used
        before its start finished answers ``NodeNotReadyError``, and the topic would be cached as missing)."""
        import asyncio

        start = self._admin_start
        if start is None:
            start = self._admin_start = asyncio.ensure_future(self._start_admin())
        try:
            return await asyncio.shield(start)
        except BaseException:
            if start.done() and self._admin_start is start:  # a failed start is tried again by the next check
                self._admin_start = None
            raise

    async def _start_admin(self) -> AIOKafkaAdminClient:
        admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, **self._kwargs)
        try:
            await admin.start()
        except BaseException:
            await admin.close()
            raise
        self._admin = admin
        return admin

    async def close(self) -> None:
        if self._admin_start is not None and not self._admin_start.done():
            self._admin_start.cancel()
        self._admin_start = None
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
