"""The worker's task consumer: an aiokafka poll loop the project owns, through public API only.

::

    ┌─► reconcile pause/resume with the desired state (control plane, in-flight cap)
    │   getmany(max_records = free in-flight slots)  ──► per-partition record lists ──► pipeline
    │   records of a partition paused meanwhile: seek back to the first, not delivered
    └── commit the answered offsets every commit_interval_s (at-least-once)

- **Pause is a desired state.** Before every poll, and when partitions are
  assigned, the set of paused partitions is made equal to what the control
  state and the in-flight cap want (``pause()``/``resume()``). A rebalance or a
  restart cannot forget it. A worker with everything paused keeps calling
  ``getmany`` (which returns nothing), so it stays in its group however long
  the pause. Records a fetch already brought in for a partition that was paused
  meanwhile are not delivered: the partition's position is set back to the first
  of them (``seek``), so they are fetched again, in order, after the resume.
- **Backpressure.** A poll asks for at most the free in-flight slots, and the
  fetch buffers are sized from the cap and the record-size limit
  (:func:`fetch_limits`), so the cap bounds memory. At the cap the loop asks for
  nothing and waits for free slots, still reconciling the control state; the
  fetcher holds what it fetched ahead and fetches nothing more for those
  partitions. Held at the cap for ``BACKPRESSURE_PAUSE_AFTER_S``, every
  partition is paused (and polled, so the worker stays in its group) until a
  quarter of the slots are free again. Pausing at once on every brush with the
  cap dropped the fetched-ahead records each time (aiokafka discards a paused
  partition's buffer), and reading them again cost a fifth of the worker's CPU.
- **Subscription follows the served models.** :meth:`TaskConsumer.subscribe`
  changes the task topics at run time (``ctl load``/``unload``); a rebalance
  follows, through the same listener.
- **Bounded fetching** (an unload's drain): :meth:`TaskConsumer.fetch_until`
  records the end offsets of a topic's assigned partitions; records at or past
  a partition's bound are not delivered (its position is set back to the
  bound), and the partition counts as having reached it from then on
  (:meth:`TaskConsumer.bounded` turns false), so the desired state can pause it.
- **Revocation** (aiokafka's ``ConsumerRebalanceListener``): the revoked
  partitions' queued tasks are handed back, those in the model awaited
  (bounded by the rebalance timeout), what was answered is committed, then the
  partitions are forgotten. **Stop**: partial batches are flushed, their
  results delivered and committed within the stop timeout, then the consumer
  leaves the group.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable, Protocol, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from autoglm.processors.errors import BrokerError

log = logging.getLogger(__name__)

#: Longest poll wait while something is paused or backpressured: how soon a resume takes effect.
PAUSED_POLL_S = 0.05
#: Longest poll wait otherwise (new records end the wait at once).
IDLE_POLL_S = 0.5
#: At the in-flight cap the loop first only waits for free slots (what the fetcher already holds is
#: kept; it fetches nothing more for those partitions meanwhile); held this long, every partition is
#: paused (the fetched-ahead records are dropped, fetched again after the resume).
BACKPRESSURE_PAUSE_AFTER_S = 1.0
#: Kafka's default ``fetch.max.bytes``: the most one fetch response carries.
KAFKA_FETCH_MAX_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """What the task consumer needs to know (a narrow view of the worker settings).

    Attributes:
        bootstrap_servers: ``host:port`` list.
        group_id: the consumer group of the workers.
        topics: the task topics to subscribe to.
        max_in_flight: the in-flight cap (tasks between receipt and commit).
        max_task_bytes: the largest task record served (larger ones are dead-lettered).
        max_message_bytes: the largest record on the topics (a fetch must fit one).
        session_timeout_s, heartbeat_interval_s, rebalance_timeout_s, max_poll_interval_s:
            Kafka's group timeouts, seconds.
        commit_interval_s: how often answered offsets are committed (at-least-once).
        commit: False in exactly-once mode (offsets go into the transactions).
        client_kwargs: security arguments for the Kafka client.
    """

    bootstrap_servers: list[str]
    group_id: str
    topics: tuple[str, ...]
    max_in_flight: int
    max_task_bytes: int = 1024 * 1024
    max_message_bytes: int = 4 * 1024 * 1024
    session_timeout_s: float = 45.0
    heartbeat_interval_s: float = 3.0
    rebalance_timeout_s: float = 60.0
    max_poll_interval_s: float = 300.0
    commit_interval_s: float = 1.0
    commit: bool = True
    client_kwargs: dict[str, Any] = field(default_factory=dict)


def fetch_limits(max_in_flight: int, max_task_bytes: int, max_message_bytes: int) -> dict[str, int]:
    """aiokafka fetch sizes that keep the fetch buffer within about the in-flight bound.

    ``fetch_max_bytes`` (one fetch response) is ``max_in_flight * max_task_bytes``,
    at least one record of ``max_message_bytes`` and at most Kafka's default
    50 MiB; ``max_partition_fetch_bytes`` is one such record (Kafka returns at
    least one record per partition even when it is larger, KIP-74). So the
    worker holds at most about ``2 * max_in_flight * max_task_bytes`` of task
    bytes: the in-flight tasks and one fetch response.
    """
    fetch_max = max(max_message_bytes, min(KAFKA_FETCH_MAX_BYTES, max_in_flight * max_task_bytes))
    return {"fetch_max_bytes": fetch_max, "max_partition_fetch_bytes": min(max_message_bytes, fetch_max)}


class RecordSink(Protocol):
    """What the consumer feeds (:class:`~autoglm.streams.pipeline.TaskPipeline`)."""

    @property
    def capacity(self) -> int:
        """Records it takes now (free in-flight slots)."""
        ...

    def on_records(self, topic: str, partition: int, records: Sequence[Any]) -> None:
        """One partition's records from one poll, in offset order; never blocks."""
        ...

    async def wait_capacity(self, at_least: int, timeout_s: float) -> None:
        """Return once ``at_least`` slots are free, or after ``timeout_s``."""
        ...


class TaskConsumer:
    """Polls the task topics and feeds the pipeline; commits what it answered.

    Args:
        config: see :class:`ConsumerConfig`.
        sink: the pipeline.
        is_paused: ``is_paused(tp)``, the control plane's desired state of a task partition.
        before_revoke: awaited with the partitions about to be revoked, before their offsets are
            committed (the pipeline hands back queued tasks and awaits those in the model).
        after_revoke: called with the revoked partitions once committed (the pipeline forgets them).
        on_assigned: called with newly assigned partitions.
        before_stop: awaited when stopping, before the last commit (flush and deliver).
    """

    def __init__(
        self,
        config: ConsumerConfig,
        sink: RecordSink,
        *,
        is_paused: Callable[[TopicPartition], bool] = lambda tp: False,
        before_revoke: Callable[[list[TopicPartition]], Awaitable[None]] | None = None,
        after_revoke: Callable[[list[TopicPartition]], None] | None = None,
        on_assigned: Callable[[list[TopicPartition]], None] | None = None,
        before_stop: Callable[[], Awaitable[None]] | None = None,
    ):
        self.config = config
        self._sink = sink
        self._is_paused = is_paused
        self._before_revoke = before_revoke
        self._after_revoke = after_revoke
        self._on_assigned = on_assigned
        self._before_stop = before_stop
        self._consumer: AIOKafkaConsumer | None = None
        self._positions: dict[TopicPartition, int] = {}  # answered: next offset to commit
        self._committed: dict[TopicPartition, int] = {}
        self._backpressured = False
        self._at_cap_since: float | None = None
        self._resume_at = max(1, config.max_in_flight // 4)
        self._loop_task: asyncio.Task | None = None
        self._commit_task: asyncio.Task | None = None
        self._stopping = False
        self._topics: tuple[str, ...] = tuple(config.topics)
        self._bounds: dict[TopicPartition, int] = {}  # fetch_until: records at or past these are not delivered
        self._reached: set[TopicPartition] = set()
        self.polls = 0
        self.assignments = 0

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Connect, subscribe (joining the group) and start polling in the background.

        Raises:
            BrokerError: the broker cannot be reached.
        """
        cfg = self.config
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers,
            group_id=cfg.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=int(cfg.session_timeout_s * 1000),
            heartbeat_interval_ms=int(cfg.heartbeat_interval_s * 1000),
            rebalance_timeout_ms=int(cfg.rebalance_timeout_s * 1000),
            max_poll_interval_ms=int(cfg.max_poll_interval_s * 1000),
            request_timeout_ms=int(max(40.0, cfg.session_timeout_s + 5.0) * 1000),
            **fetch_limits(cfg.max_in_flight, cfg.max_task_bytes, cfg.max_message_bytes),
            **cfg.client_kwargs,
        )
        try:
            await self._consumer.start()
        except KafkaError as exc:
            await self._consumer.stop()
            raise BrokerError(f"task consumer: cannot connect to {cfg.bootstrap_servers}: {exc!r}") from exc
        self._subscribe()
        self._loop_task = asyncio.ensure_future(self._poll_loop())
        if cfg.commit:
            self._commit_task = asyncio.ensure_future(self._commit_loop())

    async def stop(self) -> None:
        """Stop polling, flush and deliver (``before_stop``), commit, leave the group."""
        self._stopping = True
        for task in (self._loop_task, self._commit_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._before_stop is not None:
            try:
                await self._before_stop()
            except Exception:
                log.exception("flush before stop failed")
        await self.commit_now()
        if self._consumer is not None:
            await self._consumer.stop()

    @property
    def topics(self) -> tuple[str, ...]:
        """The task topics subscribed to now."""
        return self._topics

    def subscribe(self, topics: Sequence[str]) -> bool:
        """Change the task topics (a model loaded or unloaded); a rebalance follows.

        Safe before :meth:`start` (the topics are kept for it). With no topic
        left the consumer unsubscribes and its poll returns nothing.

        Returns:
            Whether the subscription changed.
        """
        topics = tuple(dict.fromkeys(topics))
        if topics == self._topics:
            return False
        self._topics = topics
        if self._consumer is not None and not self._stopping:
            self._subscribe()
        return True

    async def subscribe_and_join(self, topics: Sequence[str], timeout_s: float, poll_s: float = 0.02) -> bool:
        """:meth:`subscribe`, then wait until the group has assigned partitions under the new
        subscription (a rebalance completed after it), at most ``timeout_s`` seconds.

        Returns:
            True once assigned (or when nothing had to change, or the consumer is not started);
            False after the timeout.
        """
        before = self.assignments
        if not self.subscribe(topics) or self._consumer is None or self._stopping:
            return True
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.assignments == before:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    def _subscribe(self) -> None:
        assert self._consumer is not None
        if self._topics:
            self._consumer.subscribe(list(self._topics), listener=_Listener(self))
        else:
            self._consumer.unsubscribe()
        log.info("task topics: %s", ", ".join(self._topics) or "(none)")

    async def fetch_until(self, topic: str) -> dict[TopicPartition, int]:
        """Bound the assigned partitions of ``topic`` at their end offsets as of now.

        Records at or past a partition's bound are not delivered; once a
        partition's position reaches its bound, :meth:`bounded` is false for
        it. The bounds hold until :meth:`clear_bounds`.

        Returns:
            partition -> bound (the end offset read now; records below it are served).

        Raises:
            KafkaError: the end offsets could not be read.
        """
        consumer = self._consumer
        if consumer is None:
            return {}
        tps = [tp for tp in consumer.assignment() if tp.topic == topic]
        if not tps:
            return {}
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            self._bounds[tp] = ends[tp]
            if await consumer.position(tp) >= ends[tp]:
                self._reached.add(tp)
        return {tp: ends[tp] for tp in tps}

    def bounded(self, tp: TopicPartition) -> bool:
        """Whether ``tp`` has a bound (:meth:`fetch_until`) that its position has not reached yet."""
        return tp in self._bounds and tp not in self._reached

    async def bounds_reached(self, topic: str) -> bool:
        """Whether every bounded partition of ``topic`` assigned here has reached its bound (its
        position is at or past it; a partition assigned again after a rebalance is read from its
        committed offset, so its position is asked again)."""
        consumer = self._consumer
        if consumer is None:
            return True
        assigned = consumer.assignment()
        for tp, bound in list(self._bounds.items()):
            if tp.topic != topic or tp not in assigned or tp in self._reached:
                continue
            if await consumer.position(tp) >= bound:
                self._reached.add(tp)
            else:
                return False
        return True

    def clear_bounds(self, topic: str) -> None:
        """Forget the bounds of ``topic``'s partitions."""
        for tp in [tp for tp in self._bounds if tp.topic == topic]:
            del self._bounds[tp]
            self._reached.discard(tp)

    @property
    def done(self) -> asyncio.Task | None:
        """The poll loop's task (it ends only on stop or a fatal error)."""
        return self._loop_task

    # -- what the pipeline and the control plane call ------------------------

    def answered(self, tp: Hashable, next_offset: int) -> None:
        """Every offset of ``tp`` below ``next_offset`` is answered: commit up to it next time."""
        key = tp if isinstance(tp, TopicPartition) else TopicPartition(*tp)
        if next_offset > self._positions.get(key, -1):
            self._positions[key] = next_offset

    async def commit_now(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Commit the answered offsets (of ``partitions``, or all) not committed yet."""
        if not self.config.commit or self._consumer is None:
            return
        offsets = {tp: pos for tp, pos in self._positions.items()
                   if (partitions is None or tp in partitions) and self._committed.get(tp) != pos}
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:  # a rebalance may refuse it; at-least-once covers it (served again)
            log.warning("commit of %d partitions failed: %r", len(offsets), exc)
            return
        self._committed.update(offsets)

    def assignment(self) -> set[TopicPartition]:
        """The task partitions this worker holds now."""
        return set(self._consumer.assignment()) if self._consumer is not None else set()

    async def lag(self) -> dict[TopicPartition, int]:
        """Consumer lag per assigned partition: log end offset minus the committed (or answered)
        offset, the LAG column of ``kafka-consumer-groups.sh``."""
        consumer = self._consumer
        if consumer is None:
            return {}
        assigned = list(consumer.assignment())
        if not assigned:
            return {}
        ends = await consumer.end_offsets(assigned)
        out = {}
        for tp in assigned:
            done = self._positions.get(tp)
            if done is None:
                done = await consumer.committed(tp)
            out[tp] = max(0, ends.get(tp, 0) - (done or 0))
        return out

    # -- the loop --------------------------------------------------------------

    async def _poll_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        sink = self._sink
        loop = asyncio.get_running_loop()
        while not self._stopping:
            free = sink.capacity
            if self._backpressured:
                if free >= self._resume_at:
                    self._backpressured = False
                    self._at_cap_since = None
            elif free <= 0:
                now = loop.time()
                if self._at_cap_since is None:
                    self._at_cap_since = now
                if now - self._at_cap_since >= BACKPRESSURE_PAUSE_AFTER_S:
                    self._backpressured = True
                else:  # a short wait at the cap: ask for nothing, keep what the fetcher holds
                    self._reconcile()
                    await sink.wait_capacity(1, timeout_s=BACKPRESSURE_PAUSE_AFTER_S - (now - self._at_cap_since))
                    continue
            else:
                self._at_cap_since = None
            any_paused = self._reconcile()
            if self._backpressured:
                # stay in the group (a poll of paused partitions returns nothing), then wait for slots
                await consumer.getmany(timeout_ms=0)
                await sink.wait_capacity(self._resume_at, timeout_s=1.0)
                continue
            timeout_s = PAUSED_POLL_S if any_paused else IDLE_POLL_S
            try:
                batch = await consumer.getmany(timeout_ms=int(timeout_s * 1000), max_records=max(1, free))
            except KafkaError as exc:
                log.warning("poll failed: %r; retrying", exc)
                await asyncio.sleep(0.5)
                continue
            self.polls += 1
            for tp, records in batch.items():
                if not records:
                    continue
                if self._is_paused(tp):
                    # paused while this fetch was waiting: hand the records back to Kafka, so the pause
                    # takes effect at once (nothing delivered after the acknowledgement)
                    consumer.seek(tp, records[0].offset)
                    continue
                bound = self._bounds.get(tp)
                if bound is not None:
                    records = self._within_bound(tp, records, bound)
                    if not records:
                        continue
                sink.on_records(tp.topic, tp.partition, records)

    def _within_bound(self, tp: TopicPartition, records: Sequence[Any], bound: int) -> Sequence[Any]:
        """The records of ``tp`` below its bound; the rest go back to Kafka (``seek``)."""
        if tp in self._reached:
            self._consumer.seek(tp, records[0].offset)
            return ()
        if records[-1].offset + 1 >= bound:
            self._reached.add(tp)
            if records[-1].offset >= bound:
                records = [r for r in records if r.offset < bound]
                self._consumer.seek(tp, bound)
        return records

    def _reconcile(self) -> bool:
        """Make the paused partitions what the desired state says; returns whether any is paused."""
        consumer = self._consumer
        assert consumer is not None
        assigned = consumer.assignment()
        if not assigned:
            return False
        if self._backpressured:
            want = set(assigned)
        else:
            want = {tp for tp in assigned if self._is_paused(tp)}
        have = consumer.paused()
        if want != have:
            pause = want - have
            resume = (have - want) & assigned
            if pause:
                consumer.pause(*pause)
            if resume:
                consumer.resume(*resume)
        return bool(want)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.commit_interval_s)
            await self.commit_now()

    # -- rebalances ------------------------------------------------------------

    async def handle_revoked(self, revoked: set[TopicPartition]) -> None:
        """Rebalance hook: finish or hand back the revoked partitions' tasks, commit, forget them."""
        tps = sorted(revoked)
        if not tps:
            return
        if self._before_revoke is not None:
            try:
                await self._before_revoke(tps)
            except Exception:
                log.exception("before_revoke failed")
        await self.commit_now(tps)
        if self._after_revoke is not None:
            self._after_revoke(tps)
        for tp in tps:
            self._positions.pop(tp, None)
            self._committed.pop(tp, None)
            self._reached.discard(tp)  # assigned again, it is read from its committed offset up to its bound

    def handle_assigned(self, assigned: set[TopicPartition]) -> None:
        """Rebalance hook: new partitions; the desired pause state applies before their first fetch."""
        self.assignments += 1
        if self._on_assigned is not None:
            self._on_assigned(sorted(assigned))
        if self._consumer is not None and not self._stopping:
            self._reconcile()  # the desired state applies before the first fetch of a new assignment


class _Listener(ConsumerRebalanceListener):
    """aiokafka's rebalance hooks, forwarded to the owning :class:`TaskConsumer`."""

    def __init__(self, owner: TaskConsumer):
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.owner.handle_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.owner.handle_assigned(set(assigned))
