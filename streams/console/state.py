"""What the ops console knows: workers, 15 minutes of per-model history, acks, dead letters.

A worker serves streams: models on their own task topics, and pipeline steps, named
``<pipeline>/<step>`` (README "Pipelines"). Each stream has its history and figures;
the views group the steps under their pipeline (:meth:`ConsoleState.pipelines_view`),
telling them from models by the ``pipeline``/``step``/``runs`` keys of the heartbeat's
``state.models`` entry (:func:`step_of`).

Pure logic: no Kafka, no HTTP, no clock (every method is told the time in epoch
ms). The Kafka feed (:mod:`autoglm.streams.console.feed`) hands it every status
event (``autoglm.status/v1``, see :mod:`autoglm.streams.control`) and dead
letter it reads; the web server (:mod:`autoglm.streams.console.web`) renders
:meth:`ConsoleState.snapshot` and pushes the update dicts that the ``observe_*``
methods return to browsers over Server-Sent Events.

Windows of the figures shown (the same as the heartbeat's, README "Status events"):

- ``throughput_per_s``, ``p50_ms``, ``p99_ms``, ``mean_batch_size``: the worker's
  last heartbeat interval (``window_s``, about ``STATUS_INTERVAL_S``);
- ``served_total`` and the ``totals`` counts: since the worker started;
- ``queue_depth``, ``lag``, ``in_flight``, ``target_size`` and the EWMA
  estimates: the instant the heartbeat was built.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

#: History kept per (worker, model), seconds (the issue's "last 15 minutes").
HISTORY_S = 900.0
#: A worker silent for this many of its heartbeat intervals is ``stale`` (the CLI's live rule).
LIVE_INTERVALS = 3.0
#: Figures copied from a heartbeat into the history, per model.
HISTORY_FIELDS = ("throughput_per_s", "p50_ms", "p99_ms", "mean_batch_size", "target_size", "queue_depth", "lag")


#: What :func:`pipeline_state` says when some steps of a pipeline are paused on a worker and others are not.
PARTLY_PAUSED = "partly paused"


def model_state(worker_state: Mapping[str, Any], model: str) -> str:
    """``running``, ``paused``, ``draining``, ``drained`` or ``starting`` for one model of a worker.

    Args:
        worker_state: a status event's ``state`` object (``ready``, ``draining``, ``drained``,
            ``models.<m>.paused``).
    """
    if worker_state.get("drained"):
        return "drained"
    if worker_state.get("draining"):
        return "draining"
    if not worker_state.get("ready", True):
        return "starting"
    if (worker_state.get("models") or {}).get(model, {}).get("paused"):
        return "paused"
    return "running"


def step_of(worker_state: Mapping[str, Any], stream: str) -> dict[str, str] | None:
    """``{"pipeline", "step", "runs"}`` when ``stream`` is a pipeline step on that worker, else None.

    Args:
        worker_state: a status event's ``state`` object; a pipeline step's entry in ``models``
            carries ``pipeline``, ``step`` and ``runs`` (the model it runs), see
            :meth:`~autoglm.processors.control.ControlState.snapshot`. A stream named ``p/s`` without
            them is shown as a model: the name alone does not make a step.
    """
    entry = (worker_state.get("models") or {}).get(stream) or {}
    if not isinstance(entry.get("pipeline"), str) or not isinstance(entry.get("step"), str):
        return None
    return {"pipeline": entry["pipeline"], "step": entry["step"], "runs": str(entry.get("runs") or "")}


def pipeline_state(step_states: Iterable[str]) -> str:
    """One pipeline's state on one worker from the :func:`model_state` of its steps there.

    Also combines the pipeline's states on several workers into one.

    Returns:
        The common state when they all agree (``paused`` means every step is paused);
        :data:`PARTLY_PAUSED` when they differ and some are paused (only pausing acts per
        stream: a drain, a start-up replay and ``ready`` are worker-wide); ``mixed`` for any
        other disagreement (workers in different states); ``running`` for no step at all.
    """
    states = set(step_states)
    if not states:
        return "running"
    if len(states) == 1:
        return states.pop()
    return PARTLY_PAUSED if states & {"paused", PARTLY_PAUSED} else "mixed"


class History:
    """Time series of figures per key, pruned to the last ``horizon_s`` seconds.

    Args:
        horizon_s: seconds kept, counted back from the newest point of each series.
        max_points: points kept per series at most (bounds memory whatever the heartbeat rate).
    """

    def __init__(self, horizon_s: float = HISTORY_S, max_points: int = 2000):
        self.horizon_ms = int(horizon_s * 1000)
        self.max_points = max_points
        self._series: dict[tuple[str, str], deque[dict[str, Any]]] = {}

    def add(self, key: tuple[str, str], time_ms: int, figures: Mapping[str, Any]) -> dict[str, Any]:
        """Append one point (``t`` = ``time_ms`` plus :data:`HISTORY_FIELDS`); returns it.

        Points older than the horizon before ``time_ms`` are dropped; an
        out-of-order point (older than the newest) is dropped too and None is returned.
        """
        series = self._series.setdefault(key, deque(maxlen=self.max_points))
        if series and time_ms < series[-1]["t"]:
            return None  # type: ignore[return-value]
        point = {"t": int(time_ms), **{f: figures.get(f) for f in HISTORY_FIELDS}}
        series.append(point)
        while series and series[0]["t"] < time_ms - self.horizon_ms:
            series.popleft()
        return point

    def series(self, key: tuple[str, str]) -> list[dict[str, Any]]:
        """The points of ``key``, oldest first (empty when unknown)."""
        return list(self._series.get(key, ()))

    def keys(self) -> list[tuple[str, str]]:
        """Every (worker, model) with points."""
        return sorted(self._series)

    def drop_worker(self, worker: str) -> None:
        """Forget every series of ``worker``."""
        for key in [k for k in self._series if k[0] == worker]:
            del self._series[key]

    def prune(self, now_ms: int) -> None:
        """Drop points older than the horizon before ``now_ms``, and series left empty."""
        for key in list(self._series):
            series = self._series[key]
            while series and series[0]["t"] < now_ms - self.horizon_ms:
                series.popleft()
            if not series:
                del self._series[key]


def aggregate_model(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One model's figures over the live workers that serve it.

    Args:
        rows: the model's heartbeat figures of each live worker.

    Returns:
        ``throughput_per_s`` (sum), ``p99_ms`` (the worst worker's: a p99 of
        pooled samples cannot be rebuilt from per-worker p99s), ``mean_batch_size``
        (mean weighted by each worker's results), ``queue_depth`` and ``lag`` (sums),
        ``served_total`` (sum), ``workers`` (count). A figure no worker reported is None.
    """
    rows = list(rows)

    def total(name: str) -> float | None:
        values = [r.get(name) for r in rows if r.get(name) is not None]
        return sum(values) if values else None

    p99s = [r["p99_ms"] for r in rows if r.get("p99_ms") is not None]
    weighted = [(r["mean_batch_size"], r.get("results") or 0) for r in rows if r.get("mean_batch_size") is not None]
    weight = sum(w for _, w in weighted)
    if weighted and weight > 0:
        batch = sum(b * w for b, w in weighted) / weight
    elif weighted:
        batch = sum(b for b, _ in weighted) / len(weighted)
    else:
        batch = None
    return {
        "workers": len(rows),
        "throughput_per_s": total("throughput_per_s"),
        "p99_ms": max(p99s) if p99s else None,
        "mean_batch_size": batch,
        "queue_depth": total("queue_depth"),
        "lag": total("lag"),
        "served_total": total("served_total"),
    }


@dataclass
class PendingCommand:
    """A control event the console published, and the acks seen for it so far.

    Attributes:
        event_id, command, target, params: the event.
        issued_ms: when it was published (epoch ms).
        expected: live workers targeted when it was published.
        acks: worker id -> ``{"status", "reason", "latency_ms"}``.
        timeout_ms: after ``issued_ms + timeout_ms`` expected workers without an ack are ``missing``.
    """

    event_id: str
    command: str
    target: dict[str, str]
    params: dict[str, Any]
    issued_ms: int
    expected: list[str]
    timeout_ms: int
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record_ack(self, worker: str, ack: Mapping[str, Any]) -> None:
        """Keep ``worker``'s ack (``status``, ``reason``, ``time_ms``: when the worker sent it)."""
        self.acks[worker] = {"status": ack.get("status"), "reason": ack.get("reason") or "",
                             "latency_ms": max(0, int(ack.get("time_ms") or 0) - self.issued_ms)}

    def expired(self, now_ms: int) -> bool:
        """Whether the ack timeout has passed."""
        return now_ms >= self.issued_ms + self.timeout_ms

    def view(self, now_ms: int) -> dict[str, Any]:
        """JSON-ready: the event, each worker's ack or ``waiting``/``missing``, and ``done``."""
        expired = self.expired(now_ms)
        rows = dict(self.acks)
        for worker in self.expected:
            if worker not in rows:
                rows[worker] = {"status": "missing" if expired else "waiting", "reason": "", "latency_ms": None}
        done = expired or all(w in self.acks for w in self.expected)
        return {"event_id": self.event_id, "command": self.command, "target": self.target, "params": self.params,
                "issued_ms": self.issued_ms, "expected": list(self.expected), "acks": rows, "done": done}


class ConsoleState:
    """The console's memory: latest status per worker, history, recent commands and dead letters.

    Args:
        horizon_s: history kept (default 15 minutes).
        dead_letters_max: the last N dead letters kept.
        commands_max: the last N commands kept with their acks.
        forget_after_s: a worker not heard from for this long leaves the table.
    """

    def __init__(self, *, horizon_s: float = HISTORY_S, dead_letters_max: int = 50, commands_max: int = 20,
                 forget_after_s: float = HISTORY_S):
        self.history = History(horizon_s)
        self.workers: dict[str, dict[str, Any]] = {}  # worker -> latest heartbeat / stopped / ack state
        self.dead_letters: deque[dict[str, Any]] = deque(maxlen=dead_letters_max)
        self.commands: dict[str, PendingCommand] = {}
        self._commands_max = commands_max
        # acks read before the console registered the command they answer (the feed may see a
        # fast worker's ack before the producer's own acknowledgement returns)
        self._early_acks: dict[str, dict[str, dict[str, Any]]] = {}
        self._forget_ms = int(forget_after_s * 1000)

    # -- inputs -------------------------------------------------------------------

    def observe_status(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Take one decoded status event; returns the updates to push (``{"type": ..., ...}``).

        Heartbeats update the worker and append history points; ``stopped``
        marks the worker stopped; an ack updates the worker's state and, when
        it answers a command this console sent, that command's ack table. The
        worker's control state (paused, ...) is that of its newest heartbeat or ack
        by ``time_ms``, whichever order the status topic holds them in.
        """
        worker = doc.get("worker")
        kind = doc.get("kind")
        time_ms = int(doc.get("time_ms") or 0)
        if not isinstance(worker, str):
            return []
        entry = self.workers.setdefault(worker, {"worker": worker, "heartbeat": None, "stopped_ms": None,
                                                 "state": {}, "state_ms": -1, "last_ms": 0})
        entry["last_ms"] = max(entry["last_ms"], time_ms)
        updates: list[dict[str, Any]] = []
        if kind == "heartbeat":
            if entry["heartbeat"] is None or time_ms >= int(entry["heartbeat"].get("time_ms") or 0):
                entry["heartbeat"] = dict(doc)
                if time_ms >= entry["state_ms"]:  # not over the state of a newer ack
                    entry["state"], entry["state_ms"] = doc.get("state") or {}, time_ms
                if entry["stopped_ms"] is not None and time_ms > entry["stopped_ms"]:
                    entry["stopped_ms"] = None  # restarted with the same id
            points = {}
            for model, figures in (doc.get("models") or {}).items():
                point = self.history.add((worker, model), time_ms, figures)
                if point is not None:
                    points[model] = point
            updates.append({"type": "points", "worker": worker, "points": points})
        elif kind == "stopped":
            entry["stopped_ms"] = time_ms
        elif kind == "ack":
            if isinstance(doc.get("state"), dict) and time_ms >= entry["state_ms"]:
                entry["state"], entry["state_ms"] = doc["state"], time_ms
            event_id = str(doc.get("event_id"))
            ack = {"status": doc.get("status"), "reason": doc.get("reason") or "", "time_ms": time_ms}
            pending = self.commands.get(event_id)
            if pending is not None:
                pending.record_ack(worker, ack)
                updates.append({"type": "command", "command": pending.view(time_ms)})
            else:
                self._early_acks.setdefault(event_id, {})[worker] = ack
                while len(self._early_acks) > 200:
                    del self._early_acks[next(iter(self._early_acks))]
        else:
            return []
        updates.insert(0, {"type": "worker", "worker": self.worker_view(worker, time_ms)})
        return updates

    def observe_dead_letter(self, record: Mapping[str, Any]) -> dict[str, Any] | None:
        """Keep one dead letter (``topic``, ``partition``, ``offset``, ``timestamp_ms``, ``headers``
        as a str -> str map, ``key``, ``size``); returns the update to push, or None for a record
        already kept (a reader restarted after a broker error reads the last ones again)."""
        if any(r["dlq_partition"] == record.get("partition") and r["dlq_offset"] == record.get("offset")
               for r in self.dead_letters):
            return None
        headers = record.get("headers") or {}
        row = {
            "dlq_partition": record.get("partition"), "dlq_offset": record.get("offset"),
            "time_ms": record.get("timestamp_ms"),
            "code": headers.get("autoglm.error.code", ""), "message": headers.get("autoglm.error.message", ""),
            "source_topic": headers.get("autoglm.source.topic", ""),
            "source_partition": headers.get("autoglm.source.partition", ""),
            "source_offset": headers.get("autoglm.source.offset", ""),
            "worker": headers.get("autoglm.worker", ""),
            "key": record.get("key"), "size": record.get("size"),
        }
        self.dead_letters.append(row)
        return {"type": "dead_letter", "dead_letter": row}

    def command_sent(self, *, event_id: str, command: str, target: Mapping[str, str], params: Mapping[str, Any],
                     issued_ms: int, now_ms: int, timeout_s: float) -> PendingCommand:
        """Record a published command; the workers live at ``now_ms`` (and targeted) are expected to ack."""
        wanted = target.get("worker")
        expected = [w for w in self.live_workers(now_ms) if wanted is None or w == wanted]
        pending = PendingCommand(event_id=event_id, command=command, target=dict(target), params=dict(params),
                                 issued_ms=issued_ms, expected=expected, timeout_ms=int(timeout_s * 1000))
        for worker, ack in self._early_acks.pop(event_id, {}).items():
            pending.record_ack(worker, ack)
        self.commands[event_id] = pending
        while len(self.commands) > self._commands_max:
            del self.commands[next(iter(self.commands))]
        return pending

    # -- views --------------------------------------------------------------------

    def liveness(self, worker: str, now_ms: int) -> str:
        """``live`` (a heartbeat within three intervals), ``stopped`` (said so) or ``stale``."""
        entry = self.workers[worker]
        hb = entry["heartbeat"]
        if entry["stopped_ms"] is not None and (hb is None or entry["stopped_ms"] >= int(hb.get("time_ms") or 0)):
            return "stopped"
        if hb is None:
            return "stale"
        interval_ms = float(hb.get("interval_s") or 5.0) * 1000.0
        return "live" if now_ms - int(hb.get("time_ms") or 0) <= LIVE_INTERVALS * interval_ms else "stale"

    def live_workers(self, now_ms: int) -> list[str]:
        """Ids of the live workers, sorted."""
        return sorted(w for w in self.workers if self.liveness(w, now_ms) == "live")

    def worker_view(self, worker: str, now_ms: int) -> dict[str, Any]:
        """One row of the workers table, with its per-model figures (JSON-ready)."""
        entry = self.workers[worker]
        hb = entry["heartbeat"] or {}
        state = entry["state"] or {}
        models = {}
        pipelines: dict[str, dict[str, Any]] = {}
        for model, figures in (hb.get("models") or {}).items():
            own = (state.get("models") or {}).get(model) or {}
            row = dict(figures, state=model_state(state, model), params=own.get("params") or {},
                       fetching=own.get("fetching"))
            step = step_of(state, model)
            if step is not None:
                row.update(step)
                pipelines.setdefault(step["pipeline"], {"steps": {}})["steps"][step["step"]] = row["state"]
            models[model] = row
        for entry in pipelines.values():
            entry["state"] = pipeline_state(entry["steps"].values())
        hb_ms = int(hb["time_ms"]) if hb.get("time_ms") is not None else None
        return {
            "worker": worker,
            "liveness": self.liveness(worker, now_ms),
            "heartbeat_ms": hb_ms,
            "age_s": None if hb_ms is None else max(0.0, (now_ms - hb_ms) / 1000.0),
            "interval_s": hb.get("interval_s"),
            "window_s": hb.get("window_s"),
            "in_flight": hb.get("in_flight"),
            "max_in_flight": hb.get("max_in_flight"),
            "totals": hb.get("totals"),
            "state": ("drained" if state.get("drained") else "draining" if state.get("draining")
                      else "starting" if state and not state.get("ready", True) else "running"),
            "models": models,
            "pipelines": pipelines,
        }

    def models_view(self, now_ms: int) -> dict[str, dict[str, Any]]:
        """Model -> :func:`aggregate_model` over the live workers serving it on its own topic
        (pipeline steps are in :meth:`pipelines_view`)."""
        rows: dict[str, list[Mapping[str, Any]]] = {}
        for worker in self.live_workers(now_ms):
            state = self.workers[worker]["state"] or {}
            for model, figures in ((self.workers[worker]["heartbeat"] or {}).get("models") or {}).items():
                if step_of(state, model) is None:
                    rows.setdefault(model, []).append(figures)
        return {model: aggregate_model(r) for model, r in sorted(rows.items())}

    def pipelines_view(self, now_ms: int) -> dict[str, dict[str, Any]]:
        """Pipeline -> its steps and its state on each live worker serving it (JSON-ready).

        Returns:
            ``{pipeline: {"steps": [{"step", "stream", "runs", **aggregate_model(...)}],
            "workers": {worker: state}, "state": str}}``: steps in the order the workers list them
            (the pipeline's), each aggregated over the live workers serving it like a model
            (:func:`aggregate_model`); ``workers`` holds :func:`pipeline_state` per worker (``paused``:
            every step paused there); ``state`` is that of all those workers together.
        """
        found: dict[str, dict[str, Any]] = {}
        for worker in self.live_workers(now_ms):
            state = self.workers[worker]["state"] or {}
            step_states: dict[str, list[str]] = {}
            for stream, figures in ((self.workers[worker]["heartbeat"] or {}).get("models") or {}).items():
                step = step_of(state, stream)
                if step is None:
                    continue
                entry = found.setdefault(step["pipeline"], {"steps": {}, "workers": {}})
                row = entry["steps"].setdefault(step["step"], {"step": step["step"], "stream": stream,
                                                               "runs": step["runs"], "rows": []})
                row["rows"].append(figures)
                step_states.setdefault(step["pipeline"], []).append(model_state(state, stream))
            for pipeline, states in step_states.items():
                found[pipeline]["workers"][worker] = pipeline_state(states)
        view = {}
        for pipeline, entry in sorted(found.items()):
            steps = [dict(aggregate_model(row.pop("rows")), **row) for row in entry["steps"].values()]
            view[pipeline] = {"steps": steps, "workers": entry["workers"],
                              "state": pipeline_state(entry["workers"].values())}
        return view

    def snapshot(self, now_ms: int) -> dict[str, Any]:
        """Everything a freshly opened page needs (JSON-ready)."""
        self.forget(now_ms)
        return {
            "now_ms": now_ms,
            "workers": [self.worker_view(w, now_ms) for w in sorted(self.workers)],
            "models": self.models_view(now_ms),
            "pipelines": self.pipelines_view(now_ms),
            "history": [{"worker": w, "model": m, "points": self.history.series((w, m))}
                        for w, m in self.history.keys()],
            "commands": [c.view(now_ms) for c in self.commands.values()],
            "dead_letters": list(self.dead_letters),
        }

    def forget(self, now_ms: int) -> None:
        """Drop history older than the horizon and workers not heard from for ``forget_after_s``."""
        self.history.prune(now_ms)
        for worker in [w for w, e in self.workers.items() if now_ms - e["last_ms"] > self._forget_ms]:
            del self.workers[worker]
            self.history.drop_worker(worker)
