"""The control plane on Kafka: control events in, acknowledgements and heartbeats out.

::

    ops (autoglm ctl, console) ─► <prefix>.control (1 partition, compacted, keyed by control_key)
                                        │ every worker reads all of it, outside the task group
                                        ▼
                                  ControlPlane ─► ControlState (processors/control.py) ─► pause/resume
                                        │                                               (streams/consumer.py)
                                        ▼
                                  <prefix>.status: one ack per event and worker, heartbeats, "stopped"

Wire formats (``autoglm.status/v1``, keyed by worker id)::

    {"schema": "autoglm.status/v1", "kind": "ack", "worker": "...", "event_id": "...",
     "command": "pause", "status": "ok" | "rejected" | "ignored", "reason": "...",
     "streams": ["<model or pipeline/step it applied to>", ...], "state": {...}, "time_ms": ..., "report": {...}?}
    {"schema": "autoglm.status/v1", "kind": "heartbeat", "worker": "...", "time_ms": ...,
     "interval_s": 5.0, "window_s": 5.0, "started_ms": ..., "uptime_s": ..., "state": {...},
     "models": {"<model>": {figures}}, "in_flight": n, "max_in_flight": n?, "totals": {...}?}

Which figure covers which window (README "Status events"): per model, ``results``,
``throughput_per_s``, ``p50_ms``, ``p99_ms`` and ``mean_batch_size`` cover the last
``window_s`` seconds (since the previous heartbeat); ``served_total``, ``batches_total``
and ``totals`` (per status) count since the worker started; the worker's ``totals``
(received, results by status, dead letters, ...) count since start; ``queue_depth``,
``lag``, ``in_flight``, ``target_size`` and the EWMA estimates are read when the
heartbeat is built.
    {"schema": "autoglm.status/v1", "kind": "stopped", "worker": "...", "time_ms": ...}

Signatures: with a shared key configured, a control event carries
``"signature": "<hex HMAC-SHA256>"`` computed over its canonical form: the
event object without ``signature``, serialized by orjson with sorted keys and
no whitespace. The signature covers ``id`` and ``issued_ms``, which the
replay protection of :class:`~autoglm.processors.control.ControlState` relies on.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any, Awaitable, Callable, Mapping

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from autoglm.processors.errors import BrokerError, ControlSignatureError, EventDecodeError, EventError, TopicMissingError
from autoglm.processors.control import MODEL_COMMANDS, ControlState, Decision, check_configure_params, control_key
from autoglm.processors.metrics import BatchMetrics
from autoglm.streams.codec import dumps, loads
from autoglm.streams.events import (
    CONTROL_COMMANDS,
    ControlEvent,
    decode_control,
    encode_control,
    now_ms,
    readable_field,
)
from autoglm.streams.topics import TopicNames

log = logging.getLogger(__name__)

STATUS_SCHEMA = "autoglm.status/v1"
#: A worker silent for this many of its heartbeat intervals counts as gone.
LIVE_INTERVALS = 3.0


# -- signatures -----------------------------------------------------------------


def canonical_control(doc: Mapping[str, Any]) -> bytes:
    """The bytes a control event's signature covers: the object without ``signature``, keys sorted."""
    return orjson.dumps({k: v for k, v in doc.items() if k != "signature"}, option=orjson.OPT_SORT_KEYS)


def sign_control(event: ControlEvent, key: bytes | None) -> bytes:
    """Serialize ``event``, with its HMAC-SHA256 signature when ``key`` is given."""
    raw = encode_control(event)
    if key is None:
        return raw
    doc = orjson.loads(raw)
    doc["signature"] = hmac.new(key, canonical_control(doc), sha256).hexdigest()
    return dumps(doc)


def verify_control(raw: bytes | None, key: bytes | None) -> ControlEvent:
    """Decode a control event; with a ``key``, require a valid signature first.

    Raises:
        ControlSignatureError: a key is configured and the event is unsigned or
            its signature does not match (``task_id`` holds the event id when readable).
        EventDecodeError, SchemaVersionError, EventValidationError: malformed event.
    """
    if key is not None:
        doc = loads(raw) if raw is not None else None
        if not isinstance(doc, dict):
            raise EventDecodeError("a control event must be a JSON object")
        event_id = doc.get("id") if isinstance(doc.get("id"), str) else None
        signature = doc.get("signature")
        if not isinstance(signature, str):
            raise ControlSignatureError("control event is not signed (a control key is configured)",
                                        task_id=event_id)
        expected = hmac.new(key, canonical_control(doc), sha256).hexdigest()
        if not hmac.compare_digest(signature, expected):
            raise ControlSignatureError("control event signature does not match", task_id=event_id)
    return decode_control(raw)


# -- status events ----------------------------------------------------------------


def encode_status(kind: str, worker: str, **fields: Any) -> bytes:
    """Serialize a status event (``ack``, ``heartbeat`` or ``stopped``) of ``worker``."""
    return dumps({"schema": STATUS_SCHEMA, "kind": kind, "worker": worker, "time_ms": now_ms(), **fields})


def decode_status(raw: bytes | None) -> dict[str, Any] | None:
    """Parse a status event; None for anything that is not one (status readers skip it)."""
    try:
        doc = loads(raw) if raw is not None else None
    except EventError:
        return None
    if not isinstance(doc, dict) or doc.get("schema") != STATUS_SCHEMA or not isinstance(doc.get("worker"), str):
        return None
    return doc


def lag_figures(lag: int | Mapping[Any, int] | None) -> dict[str, Any]:
    """A model's heartbeat lag figures from what the ``lag`` callable gave for it.

    >>> lag_figures({0: 3, 1: 4})
    {'lag': 7, 'lag_by_partition': {'0': 3, '1': 4}}
    >>> lag_figures(5)
    {'lag': 5}
    """
    if isinstance(lag, Mapping):
        return {"lag": sum(lag.values()), "lag_by_partition": {str(p): v for p, v in sorted(lag.items())}}
    return {"lag": lag}


# -- the worker side ---------------------------------------------------------------


class ControlPlane:
    """Reads the control topic in a worker, applies it, and reports on the status topic.

    At start it replays the control topic from the beginning to its end
    (state commands only), then marks the state ready (until then every
    stream counts as paused) and follows the topic. It sends a heartbeat every
    ``status_interval_s`` and a ``stopped`` event on stop.

    Args:
        bootstrap_servers: brokers.
        names: topic names.
        state: the worker's control state (its ``is_paused`` is the fetch predicate).
        produce: ``produce(topic, key, value)`` returning an awaitable of the
            broker's ack (the worker's producer).
        configure: ``configure(model, params)`` re-tunes a model's batching;
            raises ValueError/KeyError on bad values.
        drain: coroutine that waits until nothing is in flight and everything
            is committed; returns figures for the ack.
        figures: ``figures(window_s, reset=bool)`` -> model -> heartbeat figures.
        lag: coroutine -> model -> consumer lag (records) of this worker's partitions, either
            one int per model or ``{partition: lag}`` per model (then the heartbeat shows the
            sum, plus ``lag_by_partition``, and the per-partition gauge is set).
        in_flight: tasks in flight now.
        max_in_flight: the in-flight cap (shown in heartbeats and exported), None when unknown.
        counters: ``counters()`` -> worker-wide totals since start (e.g. the pipeline's
            counters: ``received``, ``results_ok``, ``results_error``, ``results_expired``,
            ``dead_letters``, ...), sent as the heartbeat's ``totals``.
        totals: ``totals()`` -> model -> results per status since start
            (:meth:`~autoglm.processors.metrics.TaskTotals.snapshot`), sent as each model's ``totals``.
        metrics: gauges set at every heartbeat (in flight and cap, queue depth, consumer lag);
            see :class:`~autoglm.processors.metrics.BatchMetrics`.
        key: HMAC key, or None when control events are not signed.
        model_command: ``await model_command(command, model)`` carries out a
            ``load``, ``unload`` or ``reload`` (e.g. through
            :class:`~autoglm.models.host.ModelHost` plus the worker's fetching
            and draining) and returns figures for the ack (the version
            served); an exception becomes an ``error`` ack with its message.
            ``None``: such commands are acknowledged as ``rejected``.
        status_interval_s: heartbeat period, seconds.
        drain_timeout_s: the longest a drain may take before it is acked as failed.
        client_kwargs: security arguments for the control consumer.
    """

    def __init__(
        self,
        *,
        bootstrap_servers: list[str] | str,
        names: TopicNames,
        state: ControlState,
        produce: Callable[[str, bytes, bytes], Awaitable[Awaitable[Any]]],
        configure: Callable[[str, Mapping[str, Any]], None],
        drain: Callable[[], Awaitable[dict[str, Any]]],
        figures: Callable[..., dict[str, dict[str, Any]]],
        lag: Callable[[], Awaitable[dict[str, int | None]]] | None = None,
        in_flight: Callable[[], int] = lambda: 0,
        max_in_flight: int | None = None,
        counters: Callable[[], Mapping[str, int]] | None = None,
        totals: Callable[[], Mapping[str, Mapping[str, int]]] | None = None,
        metrics: BatchMetrics | None = None,
        key: bytes | None = None,
        status_interval_s: float = 5.0,
        drain_timeout_s: float = 120.0,
        client_kwargs: dict[str, Any] | None = None,
        model_command: Callable[[str, str], Awaitable[dict[str, Any]]] | None = None,
    ):
        self.bootstrap_servers = bootstrap_servers
        self.names = names
        self.state = state
        self._produce = produce
        self._configure = configure
        self._drain = drain
        self._figures = figures
        self._lag = lag
        self._in_flight = in_flight
        self.max_in_flight = max_in_flight
        self._counters = counters
        self._totals = totals
        self._metrics = metrics or BatchMetrics()
        self._key = key
        self._model_command = model_command
        self.status_interval_s = status_interval_s
        self.drain_timeout_s = drain_timeout_s
        self._client_kwargs = client_kwargs or {}
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._consumer: AIOKafkaConsumer | None = None
        self.ready = asyncio.Event()
        self.replayed = 0
        self._last_heartbeat_s = time.monotonic()
        self._started_s = self._last_heartbeat_s
        self.started_ms = now_ms()

    async def start(self) -> None:
        """Connect, then replay and follow the control topic in the background."""
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
            **self._client_kwargs,
        )
        try:
            await self._consumer.start()
        except KafkaError as exc:
            raise BrokerError(f"control plane: cannot connect to {self.bootstrap_servers}: {exc!r}") from exc
        self._tasks = [asyncio.ensure_future(self._follow()), asyncio.ensure_future(self._heartbeats())]

    async def stop(self) -> None:
        """Announce ``stopped`` on the status topic, stop the loops, close the consumer."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self._send_status(encode_status("stopped", self.state.worker_id)), 5.0)
        except Exception as exc:  # the broker may be gone already; workers time out of the live set anyway
            log.info("control plane: could not announce stop: %r", exc)
        if self._background:
            await asyncio.wait(list(self._background), timeout=5.0)
        if self._consumer is not None:
            await self._consumer.stop()

    # -- control topic ------------------------------------------------------------

    async def _follow(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        tp = TopicPartition(self.names.control, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        await consumer.seek_to_beginning(tp)
        if end == 0:
            self._mark_ready()
        while True:
            batch = await consumer.getmany(tp, timeout_ms=200)
            for record in batch.get(tp, []):
                replay = record.offset < end
                try:
                    self.handle(record.value, replay=replay)
                except Exception:  # never let one event stop the control plane
                    log.exception("control plane: event at offset %d failed", record.offset)
                if replay:
                    self.replayed += 1
            if not self.state.ready and await consumer.position(tp) >= end:
                self._mark_ready()

    def _mark_ready(self) -> None:
        self.state.ready = True
        self.ready.set()
        log.info("control state rebuilt from %d events: %s", self.replayed, self.state.snapshot()["models"])
        self._spawn(self._heartbeat_once())

    def handle(self, raw: bytes | None, *, replay: bool) -> Decision | None:
        """Apply one control record; acknowledgements and drains run in the background."""
        try:
            event = verify_control(raw, self._key)
        except ControlSignatureError as exc:
            log.warning("control plane: rejected control event %r: %s", exc.task_id, exc)
            if exc.task_id and not replay:
                self._spawn(self._ack_raw(exc.task_id, "?", "rejected", str(exc)))
            return None
        except EventError as exc:
            log.warning("control plane: malformed control event: %s", exc)
            event_id = readable_field(raw, "id")
            if event_id and not replay:
                self._spawn(self._ack_raw(event_id, "?", "rejected", f"{exc.code}: {exc}"))
            return None
        decision = self.state.apply(event, replay=replay)
        if decision.status == "ok" and decision.configure:
            try:
                for model, params in decision.configure.items():
                    self._configure(model, params)
                    self.state.configured(model, params)
            except (ValueError, KeyError) as exc:
                decision = Decision("rejected", ack=decision.ack, reason=str(exc))
        log.log(logging.DEBUG if replay else logging.INFO, "control %s %s %s -> %s %s",
                event.command, event.target or "all", event.params or "", decision.status, decision.reason)
        if decision.drain:
            self._spawn(self._drain_then_ack(event))
        elif decision.deferred_ack:
            self._spawn(self._models_then_ack(event, decision, replay=replay))
        elif decision.ack:
            self._spawn(self._ack(event, decision))
        return decision

    # -- status topic -------------------------------------------------------------

    async def _send_status(self, value: bytes) -> None:
        ack = await self._produce(self.names.status, self.state.worker_id.encode(), value)
        await ack

    async def _ack(self, event: ControlEvent, decision: Decision, extra: dict[str, Any] | None = None) -> None:
        fields: dict[str, Any] = {
            "event_id": event.id, "command": event.command, "status": decision.status,
            "reason": decision.reason, "issued_ms": event.issued_ms, "state": self.state.snapshot(),
            "streams": list(decision.models),  # the served streams (models, pipeline steps) it applied to
        }
        if decision.report:
            fields["report"] = self._report(window=False)
        if extra:
            fields.update(extra)
        await self._send_status(encode_status("ack", self.state.worker_id, **fields))

    async def _ack_raw(self, event_id: str, command: str, status: str, reason: str) -> None:
        await self._send_status(encode_status(
            "ack", self.state.worker_id, event_id=event_id, command=command, status=status, reason=reason,
            state=self.state.snapshot(),
        ))

    async def _drain_then_ack(self, event: ControlEvent) -> None:
        started = time.monotonic()
        try:
            figures = await asyncio.wait_for(self._drain(), self.drain_timeout_s)
        except asyncio.TimeoutError:
            reason = f"{self._in_flight()} tasks still in flight after drain_timeout_s={self.drain_timeout_s}"
            await self._ack(event, Decision("error", ack=True, reason=reason))
            return
        if self.state.draining:  # a resume may have come in meanwhile
            self.state.drained = True
        figures = dict(figures, drain_ms=(time.monotonic() - started) * 1000.0)
        log.info("drained: %s", figures)
        await self._ack(event, Decision("ok", ack=True), extra={"drain": figures})

    async def _models_then_ack(self, event: ControlEvent, decision: Decision, *, replay: bool) -> None:
        """Run the load/unload/reload a decision asks for, then acknowledge (not on replay)."""
        jobs = [("load", m) for m in decision.load] + [("unload", m) for m in decision.unload] + \
               [("reload", m) for m in decision.reload]
        status, reason, figures = "ok", decision.reason, {}
        for command, model in jobs:
            if self._model_command is None:
                status, reason = "rejected", "this worker cannot load or unload models at run time"
                for undo, name in jobs:
                    self.state.model_command_failed(undo, name)
                break
            try:
                figures[model] = await self._model_command(command, model)
            except Exception as exc:
                log.error("control plane: %s of model %s failed: %s", command, model, exc)
                status, reason = "error", f"{command} {model}: {exc}"
                self.state.model_command_failed(command, model)
        if decision.ack and not replay:
            await self._ack(event, Decision(status, ack=True, reason=reason, models=decision.models),
                            extra={"models": figures})

    def _report(self, *, window: bool) -> dict[str, Any]:
        now = time.monotonic()
        window_s = now - self._last_heartbeat_s
        if window:
            self._last_heartbeat_s = now
        models = self._figures(window_s, reset=window)
        if self._totals is not None:
            by_model = self._totals()
            for model, fig in models.items():
                fig["totals"] = dict(by_model.get(model, {}))
        report: dict[str, Any] = {
            "models": models, "in_flight": self._in_flight(), "state": self.state.snapshot(),
            "window_s": round(window_s, 3), "started_ms": self.started_ms,
            "uptime_s": round(now - self._started_s, 3),
        }
        if self.max_in_flight is not None:
            report["max_in_flight"] = self.max_in_flight
        if self._counters is not None:
            report["totals"] = dict(self._counters())
        return report

    async def _heartbeat_once(self) -> None:
        report = self._report(window=True)
        lags: Mapping[str, Any] = {}
        if self._lag is not None:
            try:
                lags = await asyncio.wait_for(self._lag(), max(1.0, self.status_interval_s))
            except Exception as exc:
                log.debug("consumer lag unavailable: %r", exc)
            for model, fig in report["models"].items():
                fig.update(lag_figures(lags.get(model)))
            # the state as of the heartbeat's time_ms: an event applied (and acked) while the lag was
            # being read must not be shown undone by a heartbeat stamped after its ack
            report["state"] = self.state.snapshot()
        self._export(report, lags)
        await self._send_status(encode_status(
            "heartbeat", self.state.worker_id, interval_s=self.status_interval_s, **report
        ))

    def _export(self, report: Mapping[str, Any], lags: Mapping[str, Any]) -> None:
        """Set the gauges from the heartbeat's figures (never lets a metrics error stop a heartbeat)."""
        try:
            self._metrics.set_in_flight(report["in_flight"], self.max_in_flight)
            for model, fig in report["models"].items():
                if fig.get("queue_depth") is not None:
                    self._metrics.set_queue_depth(model, fig["queue_depth"])
                by_partition = lags.get(model)
                if isinstance(by_partition, Mapping):
                    for partition, lag in by_partition.items():
                        self._metrics.set_consumer_lag(model, int(partition), int(lag))
        except Exception as exc:
            log.warning("metrics not exported: %r", exc)

    async def _heartbeats(self) -> None:
        await self.ready.wait()
        while True:
            await asyncio.sleep(self.status_interval_s)
            try:
                await self._heartbeat_once()
            except Exception as exc:
                log.warning("heartbeat not sent: %r", exc)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                log.warning("control plane: status event not sent: %r", exc)

        task = asyncio.ensure_future(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


# -- the operator side ----------------------------------------------------------------


@dataclass
class CommandOutcome:
    """What came back for one control event.

    Attributes:
        event: the event sent.
        expected: ids of the live workers it was expected from.
        live: ids of every live worker when it was sent.
        acks: worker id -> its ack (status event dict), including workers not expected.
        missing: expected workers that did not acknowledge in time.
        elapsed_s: seconds from send to the last ack (or the timeout).
    """

    event: ControlEvent
    expected: set[str] = field(default_factory=set)
    live: set[str] = field(default_factory=set)
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Every expected worker acknowledged, none rejected or failed."""
        return not self.missing and all(a.get("status") in ("ok", "ignored") for a in self.acks.values())


class ControlClient:
    """Sends control events and reads the status topic (what ``autoglm ctl`` and consoles use).

    Use as ``async with ControlClient(...) as ctl: outcome = await ctl.command("pause", wait=True)``.

    Args:
        bootstrap_servers: brokers.
        prefix: topic prefix.
        key: HMAC key to sign with (None: unsigned).
        lookback_records: how far back the status topic is read for live workers.
        client_kwargs: security arguments for the producer and consumer.

    Raises:
        BrokerError: the broker cannot be reached.
    """

    def __init__(self, bootstrap_servers: list[str] | str, *, prefix: str = "autoglm", key: bytes | None = None,
                 lookback_records: int = 5000, client_kwargs: dict[str, Any] | None = None):
        self.names = TopicNames(prefix)
        self._key = key
        self._lookback = lookback_records
        kwargs = client_kwargs or {}
        self._bootstrap = bootstrap_servers
        self._security = kwargs
        self._producer: AIOKafkaProducer | None = None  # made in __aenter__ (aiokafka wants the running loop)
        self._consumer: AIOKafkaConsumer | None = None
        self._tp = TopicPartition(self.names.status, 0)
        self._seen: list[dict[str, Any]] = []

    async def __aenter__(self) -> "ControlClient":
        from autoglm.streams.topics import partitions_of

        for topic in (self.names.control, self.names.status):
            try:
                await partitions_of(self._bootstrap, topic, timeout_s=3.0, client_kwargs=self._security)
            except TopicMissingError:
                raise BrokerError(
                    f"topic {topic!r} does not exist on {self._bootstrap}: is a worker running with prefix "
                    f"{self.names.prefix!r}? (workers create the control and status topics at start)"
                ) from None
        self._producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, acks="all", linger_ms=0,
                                          **self._security)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, group_id=None,
                                          enable_auto_commit=False, auto_offset_reset="earliest",
                                          fetch_max_wait_ms=50, **self._security)
        try:
            await self._producer.start()
            await self._consumer.start()
        except KafkaError as exc:
            await self._close()
            raise BrokerError(f"cannot connect the control client: {exc!r}") from exc
        self._consumer.assign([self._tp])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def close(self) -> None:
        """Stop the producer and the status reader (what leaving ``async with`` does)."""
        await self._close()

    async def _close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
        if self._consumer is not None:
            await self._consumer.stop()

    async def _read_until_end(self) -> list[dict[str, Any]]:
        end = (await self._consumer.end_offsets([self._tp]))[self._tp]
        out: list[dict[str, Any]] = []
        while await self._consumer.position(self._tp) < end:
            batch = await self._consumer.getmany(self._tp, timeout_ms=500)
            for record in batch.get(self._tp, []):
                doc = decode_status(record.value)
                if doc is not None:
                    out.append(doc)
        return out

    async def live_workers(self) -> dict[str, dict[str, Any]]:
        """Workers that sent a heartbeat within three of their intervals and no ``stopped`` after it.

        Returns:
            worker id -> its latest heartbeat. Leaves the status reader at the
            topic's end, so acks to a command sent next are not missed.
        """
        end = (await self._consumer.end_offsets([self._tp]))[self._tp]
        self._consumer.seek(self._tp, max(0, end - self._lookback))
        latest: dict[str, dict[str, Any]] = {}
        for doc in await self._read_until_end():
            if doc.get("kind") in ("heartbeat", "stopped"):
                latest[doc["worker"]] = doc
        now = now_ms()
        return {
            worker: doc for worker, doc in latest.items()
            if doc.get("kind") == "heartbeat"
            and now - int(doc.get("time_ms", 0)) <= LIVE_INTERVALS * float(doc.get("interval_s", 5.0)) * 1000.0
        }

    async def send(self, command: str, *, model: str | None = None, worker: str | None = None,
                   params: Mapping[str, Any] | None = None, pipeline: str | None = None,
                   step: str | None = None) -> ControlEvent:
        """Publish one control event (keyed by :func:`~autoglm.processors.control.control_key`).

        ``model``, ``pipeline`` and ``step`` select the streams it applies to (README "Control plane"):
        a model's (its own topic and every pipeline step running it), a pipeline's steps, one step.

        Raises:
            ValueError: unknown command or invalid ``configure`` parameters.
            BrokerError: the broker refused it.
        """
        if command not in CONTROL_COMMANDS:
            raise ValueError(f"unknown command {command!r}; expected one of {CONTROL_COMMANDS}")
        if command in MODEL_COMMANDS and not model:
            raise ValueError(f"{command} needs a model (--model NAME)")
        if step and not pipeline:
            raise ValueError("a step is named within its pipeline: give --pipeline too")
        if command == "drain" and (model or pipeline or step):
            raise ValueError("drain applies to whole workers (optionally one, --worker), not to a model or pipeline")
        if command in MODEL_COMMANDS and pipeline:
            raise ValueError(f"{command} applies to a model served on its own topic, not to a pipeline")
        params = dict(params or {})
        if command == "configure":
            check_configure_params(params)
            # ranges too, before the event reaches the compacted topic (where an invalid value would
            # supersede a valid one under the same key)
            from autoglm.processors.adaptive import AdaptiveBatchPolicy

            AdaptiveBatchPolicy().configure(**params)
        target = {k: v for k, v in (("model", model), ("worker", worker), ("pipeline", pipeline), ("step", step)) if v}
        event = ControlEvent(id=uuid.uuid4().hex, command=command, target=target, params=params,
                             issued_ms=now_ms())
        try:
            await self._producer.send_and_wait(self.names.control, sign_control(event, self._key),
                                               key=control_key(command, target, params).encode())
        except KafkaError as exc:
            raise BrokerError(f"control event not published to {self.names.control!r}: {exc!r}") from exc
        return event

    async def command(self, command: str, *, model: str | None = None, worker: str | None = None,
                      params: Mapping[str, Any] | None = None, wait: bool = True,
                      timeout_s: float = 30.0, pipeline: str | None = None, step: str | None = None) -> CommandOutcome:
        """Send a command; with ``wait``, collect the acks of every live worker it targets.

        Returns:
            The outcome; ``missing`` names the live workers that did not
            acknowledge within ``timeout_s``.
        """
        live = await self.live_workers() if wait else {}
        expected = {w for w in live if worker is None or w == worker}
        started = time.monotonic()
        event = await self.send(command, model=model, worker=worker, params=params, pipeline=pipeline, step=step)
        outcome = CommandOutcome(event=event, expected=expected, live=set(live))
        if not wait:
            return outcome
        deadline = started + timeout_s
        while time.monotonic() < deadline and not expected <= set(outcome.acks):
            batch = await self._consumer.getmany(self._tp, timeout_ms=100)
            for record in batch.get(self._tp, []):
                doc = decode_status(record.value)
                if doc is not None and doc.get("kind") == "ack" and doc.get("event_id") == event.id:
                    outcome.acks[doc["worker"]] = dict(doc, latency_ms=(time.monotonic() - started) * 1000.0)
        outcome.elapsed_s = time.monotonic() - started
        outcome.missing = expected - set(outcome.acks)
        return outcome
