"""Exactly-once delivery: results and consumed offsets in one Kafka transaction.

Consume-transform-produce as Kafka defines it (KIP-98): a transactional
producer writes a worker's result and dead-letter records and adds the
consumed offsets to the same transaction (``send_offsets_to_transaction``);
the transaction commits both or neither. Readers of the results topic use
``isolation_level="read_committed"`` and so never see the results of a batch
whose transaction was aborted (a crash, a fenced producer), and the task is
consumed again from the last committed offset: each task has exactly one
committed result.

Group commit: settlements that arrive while a transaction is in progress are
queued and go out together in the next one, so the per-transaction cost (two
round trips to the transaction coordinator) is shared by every batch that
finished meanwhile.

Fencing: the transactional id is ``autoglm-<group>-<worker id>``. A worker
restarted with the same id fences its predecessor and aborts its open
transaction at start; with a new id, a crashed worker's open transaction is
aborted by the broker after ``transaction_timeout_s`` (until then
read_committed readers wait behind it on the partitions it wrote to). aiokafka
sends ``TxnOffsetCommit`` without the group generation (KIP-447), so a worker
that is stalled (not dead) past its session timeout and then resumes could
still commit; run workers with stable ids (``AUTOGLM_WORKER_ID``) so that its
replacement fences it.

The embedded broker has no transactions: the worker refuses exactly-once there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Hashable

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from autoglm.processors.errors import BrokerError
from autoglm.streams.producer import PartitionCounts, deliver

log = logging.getLogger(__name__)

Record = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]


class TransactionalSettler:
    """Commits records and consumed offsets atomically, one transaction at a time, batching waiters.

    Args:
        bootstrap_servers: brokers.
        transactional_id: stable id of this worker's producer (see the module docstring).
        group_id: the consumer group whose offsets are committed.
        transaction_timeout_s: the broker aborts a transaction open longer than this.
        max_request_size: producer request limit, bytes.
        client_kwargs: security arguments.

    Raises:
        BrokerError: on :meth:`start`, when the broker does not support
            transactions or cannot be reached.
    """

    def __init__(self, bootstrap_servers: list[str] | str, *, transactional_id: str, group_id: str,
                 transaction_timeout_s: float = 30.0, max_request_size: int = 4 * 1024 * 1024,
                 client_kwargs: dict[str, Any] | None = None):
        self.group_id = group_id
        self.transactional_id = transactional_id
        self._producer_kwargs = dict(
            bootstrap_servers=bootstrap_servers, transactional_id=transactional_id, enable_idempotence=True,
            acks="all", linger_ms=1, max_request_size=max_request_size,
            max_batch_size=min(1024 * 1024, max_request_size),
            transaction_timeout_ms=int(transaction_timeout_s * 1000), **(client_kwargs or {}),
        )
        self._producer: AIOKafkaProducer | None = None  # made on start: aiokafka needs the running loop
        self._counts: PartitionCounts | None = None
        self._queue: list[tuple[list[Record], dict[Hashable, int], asyncio.Future]] = []
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.transactions = 0
        self.records = 0
        self._busy = False

    async def start(self, timeout_s: float = 60.0) -> None:
        """Connect and initialise the transactional id (fencing any predecessor with the same id)."""
        self._producer = AIOKafkaProducer(**self._producer_kwargs)
        try:
            await asyncio.wait_for(self._producer.start(), timeout_s)
        except (KafkaError, asyncio.TimeoutError) as exc:
            await self._producer.stop()
            raise BrokerError(
                f"exactly_once delivery needs a broker with transactions (Apache Kafka); initialising "
                f"transactional id {self.transactional_id!r} failed: {exc!r}"
            ) from exc
        self._counts = PartitionCounts(self._producer)
        self._loop_task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Finish queued transactions, then close the producer."""
        if self._loop_task is not None:
            while self._queue:
                await asyncio.sleep(0.01)
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._producer is not None:
            await self._producer.stop()

    async def __call__(self, records: list[Record], offsets: dict[Hashable, int]) -> None:
        """Produce ``records`` and commit ``offsets`` ((topic, partition) -> next offset) atomically.

        Raises:
            KafkaError: the transaction was aborted; nothing of it is visible.
        """
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((records, offsets, fut))
        self._wakeup.set()
        await fut

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                self._busy = True
                batch, self._queue = self._queue, []
                records = [r for recs, _, _ in batch for r in recs]
                offsets: dict[TopicPartition, int] = {}
                for _, offs, _ in batch:
                    for (topic, partition), next_offset in offs.items():
                        tp = TopicPartition(topic, partition)
                        offsets[tp] = max(next_offset, offsets.get(tp, 0))
                try:
                    await self._commit(records, offsets)
                except Exception as exc:
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self.transactions += 1
                self.records += len(records)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
            self._busy = False

    async def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until no transaction is queued or in progress; False after ``timeout_s``.

        Called before partitions are released in a rebalance, so that the new
        owner reads offsets that include every transaction this worker made.
        """
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._queue or self._busy:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def _commit(self, records: list[Record], offsets: dict[TopicPartition, int]) -> None:
        assert self._producer is not None
        async with self._producer.transaction():
            await deliver(self._producer, self._counts, records)  # one record batch per partition
            await self._producer.send_offsets_to_transaction(offsets, self.group_id)
