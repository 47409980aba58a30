"""The control-state machine: a worker's desired state, rebuilt from control events.

Pure logic: no Kafka, no clock, no asyncio. The Kafka side
(:mod:`autoglm.streams.control`) reads the control topic in order, checks
signatures and feeds every decoded event to :meth:`ControlState.apply`; the
answer says what changed and whether to acknowledge.

Semantics (the README's "Control plane" section says the same to users):

- ``pause`` / ``resume`` and ``configure`` are **state**: they are kept in the
  compacted control topic (one record per :func:`control_key`) and replayed by
  every worker at start, so a worker that starts after a pause starts paused.
  For every (worker, model) the latest matching event wins; a command for all
  models overrides earlier per-model ones because it comes later in the topic.
- ``load`` / ``unload`` / ``reload`` (each naming ``target.model``) are
  **state** too, sharing one slot per (worker, model): the latest wins, and a
  worker that starts later loads what was loaded and leaves out what was
  unloaded. ``reload`` means "loaded, at the repository's newest version";
  each one applied bumps the model's ``generation``, so a worker that already
  serves it swaps to a fresh load. An unloaded model counts as paused (its
  tasks wait in Kafka). Loading and unloading themselves (files, memory,
  draining that model's tasks) are the worker's: :class:`Decision` says which
  models to load, unload or reload, and the worker acknowledges when done.
- ``drain`` and ``status`` are **live**: they apply to the workers running when
  they are issued and are skipped on replay (a freshly deployed worker is not
  drained by a drain meant for its predecessor).
- A worker applies every event whose target matches it (``target.worker``
  unset or equal to its id); a ``target.model`` it does not serve changes
  nothing but is still acknowledged, so ``ctl --wait`` hears from every live
  worker.
- A worker serves **streams** (:class:`Stream`): a model's task topic, or one
  step of a pipeline (its input topic or intermediate topic). ``target.model``
  selects the streams of that model (the model's own and every pipeline step
  that runs it, or a step by its stream name ``<pipeline>/<step>``);
  ``target.pipeline`` every step of that pipeline; ``target.step`` (with
  ``target.pipeline``) one step. Targets combine with "and".
- Replay protection: an event id already applied is ignored; a state event
  issued (``issued_ms``) before the last one applied for the same key is
  ignored as stale. Together with the signature (which covers ``id`` and
  ``issued_ms``) a re-published old event changes nothing, even after
  compaction removed the original.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol

from autoglm.processors import tunables

STATE_COMMANDS = ("pause", "resume", "configure", "load", "unload", "reload")
LIVE_COMMANDS = ("drain", "status")
#: Commands about one model's presence on a worker; each needs ``target.model``.
MODEL_COMMANDS = ("load", "unload", "reload")

#: ``configure`` parameters and their ranges: defined once, in :mod:`autoglm.processors.tunables`.
CONFIGURE_PARAMS = tunables.CONFIGURE_PARAMS
CONFIGURE_MODES = tunables.BATCHING_MODES

#: How many applied event ids a worker remembers for replay protection.
SEEN_IDS_MAX = 100_000


class ControlEventLike(Protocol):
    """What the state machine reads of a control event (``autoglm.control/v1``)."""

    id: str
    command: str
    target: Mapping[str, str]
    params: Mapping[str, Any]
    issued_ms: int


#: the keys a control event's ``target`` may have
TARGET_KEYS = ("model", "worker", "pipeline", "step")


@dataclass(frozen=True, slots=True)
class Stream:
    """What one served stream is: the model it runs and, for a pipeline step, the pipeline and step.

    A model served on its own task topic is ``Stream(model)``; step ``s`` of pipeline ``p`` running model
    ``m`` is ``Stream(m, p, s)``, served under the name ``p/s`` (:func:`stream_name`).
    """

    model: str
    pipeline: str | None = None
    step: str | None = None

    def matches(self, name: str, target: Mapping[str, str]) -> bool:
        """Whether a control ``target`` selects this stream (served as ``name``); see the module."""
        model, pipeline, step = target.get("model"), target.get("pipeline"), target.get("step")
        if model is not None and model != name and model != self.model:
            return False
        if pipeline is not None and pipeline != self.pipeline:
            return False
        return step is None or step == self.step


def stream_name(pipeline: str, step: str) -> str:
    """The name a worker serves step ``step`` of pipeline ``pipeline`` under (status, metrics, control)."""
    return f"{pipeline}/{step}"


def control_key(command: str, target: Mapping[str, str], params: Mapping[str, Any] | None = None) -> str:
    """The record key of a control event: the compaction slot it supersedes.

    ``pause``/``resume`` share one slot per (worker, model) target, so the
    latest wins; ``configure`` has one slot per target and parameter set, so
    that setting ``max_batch_size`` does not erase an earlier
    ``latency_target_s``; ``drain``/``status`` keep only their latest per
    worker target (they are never replayed).

    >>> control_key("pause", {"model": "digits"})
    'run/*/digits'
    """
    worker = target.get("worker") or "*"
    model = target.get("model") or "*"
    if target.get("pipeline"):  # a pipeline's (or one step's) slot, beside the model's
        model += f"@{target['pipeline']}" + (f".{target['step']}" if target.get("step") else "")
    if command in ("pause", "resume"):
        return f"run/{worker}/{model}"
    if command in MODEL_COMMANDS:
        return f"model/{worker}/{model}"
    if command == "configure":
        return f"configure/{worker}/{model}/{','.join(sorted(params or {}))}"
    return f"{command}/{worker}"


def check_configure_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``configure`` parameters: names, types and ranges (:mod:`autoglm.processors.tunables`,
    the same ranges as the worker settings of the same names and the policies' ``configure``).

    Returns:
        The parameters as a plain dict.

    Raises:
        ValueError: empty, an unknown name, a wrong type, a non-finite number or a value out of range.
    """
    if not params:
        raise ValueError(f"configure needs at least one of {sorted(CONFIGURE_PARAMS)}")
    return tunables.check_tunables(params)


@dataclass(frozen=True, slots=True)
class Decision:
    """What :meth:`ControlState.apply` decided about one event.

    Attributes:
        status: ``ok`` (applied), ``ignored`` (duplicate id, stale, or a live
            command on replay) or ``rejected`` (invalid parameters).
        ack: whether this worker acknowledges it on the status topic (false
            for events aimed at another worker and for replayed ones).
        reason: why it was ignored or rejected ("" when applied).
        models: the served models it changed.
        configure: model -> parameters to apply to that model's batching policy.
        drain: the caller must drain now and acknowledge when drained.
        report: the caller must include a full status report in the ack.
        load: models the caller must load (create their topics, load and warm
            up off the event loop), then fetch; acknowledge when done or failed.
        unload: models the caller must drain (finish, publish, commit their
            tasks in flight) and then release; acknowledge when done.
        reload: models the caller must load afresh and swap in, keeping the
            old version serving when the new one fails; acknowledge either way.
    """

    status: str
    ack: bool
    reason: str = ""
    models: tuple[str, ...] = ()
    configure: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    drain: bool = False
    report: bool = False
    load: tuple[str, ...] = ()
    unload: tuple[str, ...] = ()
    reload: tuple[str, ...] = ()

    @property
    def deferred_ack(self) -> bool:
        """Whether the caller acknowledges only after it has loaded, unloaded or reloaded."""
        return bool(self.load or self.unload or self.reload)


class ControlState:
    """The desired state of one worker's model streams.

    Args:
        worker_id: this worker's id (matched against ``target.worker``).
        models: the streams this worker serves, by name (a model's name, or ``<pipeline>/<step>``).
        streams: name -> :class:`Stream` for the pipeline steps among ``models`` (a name not in it is
            a model served on its own topic).
        seen_ids_max: applied event ids remembered for replay protection
            (oldest forgotten first).

    Attributes:
        ready: False until the control topic has been replayed up to its end
            at start; every stream counts as paused until then, so no task is
            fetched before the worker knows whether it is paused.
        draining: a drain was applied; nothing is fetched until a ``resume``
            for all models.
        drained: the drain finished (nothing in flight, all committed).
        params: model -> the batching parameters last configured by control.
        generation: model -> how many ``load``/``reload`` commands applied to it
            (the version a worker should serve; 0 for a model served from start).
    """

    def __init__(self, worker_id: str, models: Iterable[str], *, streams: Mapping[str, Stream] | None = None,
                 seen_ids_max: int = SEEN_IDS_MAX):
        self.worker_id = worker_id
        self.models = tuple(models)
        self.streams: dict[str, Stream] = {m: (streams or {}).get(m) or Stream(m) for m in self.models}
        self.ready = False
        self.draining = False
        self.drained = False
        self.params: dict[str, dict[str, Any]] = {m: {} for m in self.models}
        self._paused: dict[str, bool] = {m: False for m in self.models}
        self._loaded: dict[str, bool] = {m: True for m in self.models}
        self.generation: dict[str, int] = {m: 0 for m in self.models}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_max = seen_ids_max
        self._last_issued_ms: dict[str, int] = {}
        self.applied = 0

    # -- queries ----------------------------------------------------------------

    def is_paused(self, model: str | None) -> bool:
        """Whether the stream of ``model`` must not be fetched now (unknown models: paused)."""
        if model is None or model not in self._paused:
            return True
        return not self.ready or self.draining or self._paused[model] or not self._loaded[model]

    def is_loaded(self, model: str) -> bool:
        """Whether ``model`` should be loaded on this worker (served from start, or loaded by control)."""
        return self._loaded.get(model, False)

    def paused_by_command(self, model: str) -> bool:
        """Whether a ``pause`` command (not a drain or the start-up replay) holds ``model``."""
        return self._paused.get(model, False)

    def snapshot(self) -> dict[str, Any]:
        """The state as a JSON-ready dict (for acks and heartbeats)."""
        return {
            "ready": self.ready,
            "draining": self.draining,
            "drained": self.drained,
            "models": {
                m: {"paused": self._paused[m], "loaded": self._loaded[m], "fetching": not self.is_paused(m),
                    "params": dict(self.params[m]), "generation": self.generation[m],
                    **({"pipeline": self.streams[m].pipeline, "step": self.streams[m].step,
                        "runs": self.streams[m].model} if self.streams[m].pipeline else {})}
                for m in self.models
            },
        }

    # -- transitions ------------------------------------------------------------

    def apply(self, event: ControlEventLike, *, replay: bool = False) -> Decision:
        """Apply one control event read from the control topic, in topic order.

        Args:
            event: a decoded (and, when a key is configured, verified) event.
            replay: True while catching up with the topic at start: live
                commands are skipped and nothing is acknowledged.

        Returns:
            The decision; see :class:`Decision`.
        """
        target_worker = event.target.get("worker")
        if target_worker and target_worker != self.worker_id:
            return Decision("ignored", ack=False, reason=f"aimed at worker {target_worker!r}")
        if event.id in self._seen:
            return Decision("ignored", ack=not replay, reason=f"event id {event.id!r} was already applied (replay)")
        self._remember(event.id)
        if event.command in LIVE_COMMANDS and replay:
            return Decision("ignored", ack=False, reason="live command issued before this worker started")
        key = control_key(event.command, event.target, event.params)
        if event.command in STATE_COMMANDS:
            last = self._last_issued_ms.get(key)
            if last is not None and event.issued_ms < last:
                return Decision("ignored", ack=not replay,
                                reason=f"stale: issued at {event.issued_ms} ms, before the last {key!r} at {last} ms")
        model = event.target.get("model")
        streams = self.streams
        served = [m for m in self.models if streams[m].matches(m, event.target)]
        note = "" if served else f"{_described(event.target)} is not served by this worker"
        if event.command in ("pause", "resume"):
            self._last_issued_ms[key] = event.issued_ms
            paused = event.command == "pause"
            for m in served:
                self._paused[m] = paused
            if not paused and not any(event.target.get(k) for k in ("model", "pipeline", "step")):
                self.draining = self.drained = False
            self.applied += 1
            return Decision("ok", ack=not replay, reason=note, models=tuple(served))
        if event.command == "configure":
            try:
                params = check_configure_params(event.params)
            except ValueError as exc:
                return Decision("rejected", ack=not replay, reason=str(exc))
            self._last_issued_ms[key] = event.issued_ms
            self.applied += 1
            return Decision("ok", ack=not replay, reason=note, models=tuple(served),
                            configure={m: params for m in served})
        if event.command in MODEL_COMMANDS:
            return self._apply_model_command(event, key, model, replay)
        if event.command == "drain":
            self.draining, self.drained = True, False
            self.applied += 1
            return Decision("ok", ack=True, models=self.models, drain=True)
        if event.command == "status":
            return Decision("ok", ack=True, report=True)
        return Decision("rejected", ack=not replay, reason=f"unknown command {event.command!r}")

    def _apply_model_command(self, event: ControlEventLike, key: str, model: str | None, replay: bool) -> Decision:
        if not model:
            return Decision("rejected", ack=not replay, reason=f"{event.command} needs target.model (the model to "
                                                                f"{event.command})")
        if event.target.get("pipeline") or event.target.get("step") or self.streams.get(model, Stream(model)).pipeline:
            return Decision("rejected", ack=not replay, reason=f"{event.command} applies to a model served on its "
                                                                "own topic, not to a pipeline step")
        self._last_issued_ms[key] = event.issued_ms
        self.applied += 1
        if event.command == "unload":
            if not self._loaded.get(model, False):
                return Decision("ok", ack=not replay, reason=f"model {model!r} is not loaded on this worker",
                                models=(model,) if model in self._loaded else ())
            self._loaded[model] = False
            return Decision("ok", ack=not replay, models=(model,), unload=(model,))
        was_loaded = self._loaded.get(model, False)
        if was_loaded and (event.command == "load" or replay):
            # already served (a started worker has just loaded the newest version)
            return Decision("ok", ack=not replay, reason=f"model {model!r} is already loaded", models=(model,))
        if model not in self._paused:
            self.models = (*self.models, model)
            self.streams[model] = Stream(model)
            self._paused[model] = False
            self.params[model] = {}
            self.generation[model] = 0
        self._loaded[model] = True
        self.generation[model] += 1
        if event.command == "reload" and was_loaded:
            return Decision("ok", ack=not replay, models=(model,), reload=(model,))
        return Decision("ok", ack=not replay, models=(model,), load=(model,))

    def model_command_failed(self, command: str, model: str) -> None:
        """The caller could not carry out ``command`` for ``model``: undo its desired state.

        A failed ``load`` leaves the model unloaded (not fetched); a failed
        ``unload`` leaves it loaded (it keeps serving); a failed ``reload``
        changes nothing (the old version serves on).
        """
        if model not in self._loaded:
            return
        if command == "load":
            self._loaded[model] = False
        elif command == "unload":
            self._loaded[model] = True

    def configured(self, model: str, params: Mapping[str, Any]) -> None:
        """Record that ``params`` were applied to ``model``'s policy (shown in status)."""
        self.params[model].update(params)

    def _remember(self, event_id: str) -> None:
        self._seen[event_id] = None
        while len(self._seen) > self._seen_max:
            self._seen.popitem(last=False)


def _described(target: Mapping[str, str]) -> str:
    parts = [f"{key} {target[key]!r}" for key in ("model", "pipeline", "step") if target.get(key)]
    return " and ".join(parts) or "nothing"
