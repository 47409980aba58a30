"""Event contracts, version 1: task, result, control (see ARCHITECTURE.md).

Each event is a UTF-8 JSON object with a ``schema`` field of the form
``autoglm.<kind>/v<major>[.<minor>]``. A decoder accepts major version 1 of
its own kind and any minor version; anything else raises
:class:`~autoglm.processors.errors.SchemaVersionError` and the event goes to the
dead-letter topic. Unknown fields are ignored (forward compatibility).

Times on the wire are epoch milliseconds (``*_ms``); inside the code
durations are float seconds.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np

from autoglm.processors.control import TARGET_KEYS
from autoglm.processors.dag import StepError
from autoglm.processors.routing import TaskState
from autoglm.processors.errors import EventDecodeError, EventValidationError, SchemaVersionError, TensorError
from autoglm.streams.codec import decode_tensor, dumps, encode_tensor, loads, preview

TASK_SCHEMA = "autoglm.task/v1"
HOP_SCHEMA = "autoglm.hop/v1"
RESULT_SCHEMA = "autoglm.result/v1"
CONTROL_SCHEMA = "autoglm.control/v1"

RESULT_STATUSES = ("ok", "error", "expired", "rejected")
CONTROL_COMMANDS = ("pause", "resume", "drain", "configure", "status", "load", "unload", "reload")

#: Kafka's legal topic-name characters and length (kafka.common.internals.Topic).
TOPIC_NAME_RE = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
MAX_ID_CHARS = 256

_SCHEMA_RE = re.compile(r"^autoglm\.(?P<kind>[a-z]+)/v(?P<major>\d+)(?:\.\d+)?$")

Inputs = Union[np.ndarray, list[str], dict[str, np.ndarray]]
#: A result's outputs: one tensor, or named tensors (a multi-output model).
Outputs = Union[np.ndarray, dict[str, np.ndarray]]
#: The keys of a wire tensor object; an object of named tensors has other keys.
_TENSOR_KEYS = frozenset({"dtype", "shape", "data"})


def now_ms() -> int:
    """Wall-clock time as integer epoch milliseconds (the wire's unit)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Task:
    """One inference request.

    Attributes:
        id: unique per task; results are keyed by it.
        model: registry name of the model to run.
        inputs: a numpy array (rows along axis 0 where the model batches),
            a list of strings for text models, or ``{name: array}`` for a
            model with several named inputs.
        priority: higher is served first (used by the adaptive batcher).
        deadline_ms: epoch ms after which the result is ``expired``; or None.
        created_ms: epoch ms when the producer created the task; or None.
        reply_to: topic for the result instead of ``<prefix>.results``; or None.
        attributes: string map passed through to the result unchanged.
    """

    id: str
    model: str
    inputs: Inputs
    priority: int = 0
    deadline_ms: int | None = None
    created_ms: int | None = None
    reply_to: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a task got no outputs: ``code`` as in :mod:`autoglm.processors.errors`, and a message."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Result:
    """The answer to one task; key on the wire is the task id.

    Attributes:
        outputs: when ``status == "ok"``, one array ``(rows, ...)`` of any
            wire dtype, or ``{name: array}`` for a multi-output model; else None.
        error: set when ``status != "ok"``.
        batch_size: number of tasks in the micro-batch that served this one.
        worker: id of the worker that produced it.
        queue_ms: time from receipt by the worker to the start of the forward.
        inference_ms: duration of the batched forward.
        end_to_end_ms: from ``created_ms`` (or receipt when absent) to
            publication of the result.
        served_by: model that actually served the task (equals ``model``
            unless a fallback served it).
        pipeline: the pipeline that served the task, for the result of a pipeline (else None).
        steps: a pipeline result's per-step record, in the order served: ``step``, ``model``,
            ``worker``, ``batch_size``, ``queue_ms``, ``inference_ms`` (and ``served_by`` when a
            fallback served it).
        skipped: a pipeline result's steps that did not run, with why.
    """

    id: str
    model: str
    status: Literal["ok", "error", "expired", "rejected"]
    outputs: Outputs | None = None
    error: ErrorInfo | None = None
    batch_size: int = 0
    worker: str = ""
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    end_to_end_ms: float = 0.0
    attributes: dict[str, str] = field(default_factory=dict)
    served_by: str | None = None
    pipeline: str | None = None
    steps: tuple[dict[str, Any], ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ControlEvent:
    """A command to every worker: ``pause``, ``resume``, ``drain``, ``configure``, ``status``,
    ``load``, ``unload``, ``reload`` (the last three name a model in ``target.model``)."""

    id: str
    command: str
    target: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    issued_ms: int = 0


# -- tasks -------------------------------------------------------------------


def encode_task(task: Task) -> bytes:
    """Serialize a task; array inputs become base64 wire tensors, named inputs an object of them."""
    inputs: Any = task.inputs if isinstance(task.inputs, list) else encode_outputs(task.inputs, field="inputs")
    doc: dict[str, Any] = {"schema": TASK_SCHEMA, "id": task.id, "model": task.model, "inputs": inputs}
    if task.priority:
        doc["priority"] = task.priority
    for name in ("deadline_ms", "created_ms", "reply_to"):
        value = getattr(task, name)
        if value is not None:
            doc[name] = value
    if task.attributes:
        doc["attributes"] = task.attributes
    return dumps(doc)


def decode_task(raw: bytes | bytearray | memoryview | str | None, *, check_finite: bool = True) -> Task:
    """Parse and validate a task event.

    Inputs that are a JSON string or list of strings become ``list[str]``;
    anything else must be a tensor (see :func:`~autoglm.streams.codec.decode_tensor`).
    Whether the inputs fit the model is the model's check, not this one's.
    With ``check_finite=False`` a base64 tensor's values are not checked for
    NaN/inf here (the worker checks a whole micro-batch at once).

    Raises:
        EventDecodeError, SchemaVersionError, EventValidationError, TensorError:
            each carries ``task_id`` and ``model`` when those could be read.
    """
    doc = _load_object(raw)
    task_id = _readable(doc.get("id"))
    model = _readable(doc.get("model"))
    try:
        schema = doc.get("schema")
        if type(schema) is not str or schema not in _VALID_TASK_SCHEMAS:  # a list is unhashable
            _check_schema(doc, "task")
            if len(_VALID_TASK_SCHEMAS) < 64:  # remember a few valid spellings (v1, v1.1, ...)
                _VALID_TASK_SCHEMAS.add(doc["schema"])
        if task_id is None:
            _req_str(doc, "id", max_len=MAX_ID_CHARS)  # raises with the reason
        if model is None:
            _req_str(doc, "model", max_len=MAX_ID_CHARS)
        get = doc.get
        priority, deadline, created, reply_to, attributes = (
            get("priority"), get("deadline_ms"), get("created_ms"), get("reply_to"), get("attributes"))
        return Task(
            id=task_id,
            model=model,
            inputs=_decode_inputs(get("inputs", _MISSING), check_finite),
            priority=0 if priority is None else _opt_int(doc, "priority", default=0),
            deadline_ms=None if deadline is None else _opt_epoch_ms(doc, "deadline_ms"),
            created_ms=None if created is None else _opt_epoch_ms(doc, "created_ms"),
            reply_to=None if reply_to is None else _opt_topic(doc, "reply_to"),
            attributes={} if attributes is None else _opt_str_map(doc, "attributes"),
        )
    except (SchemaVersionError, EventValidationError) as exc:
        exc.task_id, exc.model = task_id, model
        raise


#: schema strings already checked valid for tasks (a set lookup instead of a regex per task)
_VALID_TASK_SCHEMAS: set[str] = {TASK_SCHEMA}


def _decode_inputs(value: Any, check_finite: bool = True) -> Inputs:
    if type(value) is dict and "dtype" in value:  # the common case: one base64 tensor
        return decode_tensor(value, field="inputs", check_finite=check_finite)
    if value is _MISSING:
        raise EventValidationError("inputs", "a tensor, a text or a list of texts", "missing")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, list) and any(isinstance(v, str) for v in value):
        raise EventValidationError("inputs", "a list of texts only", "a list mixing texts and other values")
    return decode_outputs(value, field="inputs", check_finite=check_finite)


def encode_outputs(outputs: Outputs, *, field: str = "outputs") -> dict[str, Any]:
    """One array as a wire tensor; ``{name: array}`` as an object of wire tensors (names kept in order).

    Raises:
        TensorError: unsupported dtype or non-finite values (``field.name`` named).
    """
    if not isinstance(outputs, dict):
        return encode_tensor(outputs, field=field)
    if not outputs or _TENSOR_KEYS & set(outputs):
        raise TensorError(field, "named tensors with names other than dtype, shape, data", sorted(outputs))
    encoded = {}
    for name, array in outputs.items():
        try:
            encoded[name] = encode_tensor(array)
        except TensorError as exc:
            raise TensorError(f"{field}.{name}", exc.expected, exc.actual) from None
    return encoded


def decode_outputs(value: Any, *, field: str = "outputs", check_finite: bool = True) -> Outputs:
    """A wire tensor (or nested list) as one array; an object of named wire tensors as ``{name: array}``.

    An object that has any of the keys ``dtype``, ``shape``, ``data`` is one tensor.

    Raises:
        TensorError: a tensor is malformed (the field path names it, e.g. ``outputs.label.dtype``).
    """
    if isinstance(value, dict) and value and not (_TENSOR_KEYS & set(value)):
        return {str(name): decode_tensor(t, field=f"{field}.{name}", check_finite=check_finite)
                for name, t in value.items()}
    return decode_tensor(value, field=field, check_finite=check_finite)


# -- results -----------------------------------------------------------------


def encode_result(result: Result) -> bytes:
    """Serialize a result; outputs become a base64 wire tensor, or an object of them when named.

    Raises:
        TensorError: outputs hold NaN/inf (never emitted; callers turn this
            into an ``error`` result).
    """
    doc: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "id": result.id,
        "model": result.model,
        "status": result.status,
        "batch_size": result.batch_size,
        "worker": result.worker,
        "queue_ms": round(result.queue_ms, 3),
        "inference_ms": round(result.inference_ms, 3),
        "end_to_end_ms": round(result.end_to_end_ms, 3),
        "attributes": result.attributes,
    }
    if result.outputs is not None:
        doc["outputs"] = encode_outputs(result.outputs)
    if result.error is not None:
        doc["error"] = {"code": result.error.code, "message": result.error.message}
    if result.served_by is not None and result.served_by != result.model:
        doc["served_by"] = result.served_by
    if result.pipeline is not None:
        doc["pipeline"] = result.pipeline
        doc["steps"] = list(result.steps)
        if result.skipped:
            doc["skipped"] = result.skipped
    return dumps(doc)


def decode_result(raw: bytes | bytearray | memoryview | str | None) -> Result:
    """Parse a result event (for clients reading ``<prefix>.results``).

    ``model`` may be empty in a ``rejected`` result: the task named no
    readable model.

    Raises:
        EventDecodeError, SchemaVersionError, EventValidationError, TensorError.
    """
    doc = _load_object(raw)
    _check_schema(doc, "result")
    status = doc.get("status")
    if not isinstance(status, str) or status not in RESULT_STATUSES:
        raise EventValidationError("status", f"one of {RESULT_STATUSES}", _shown(status))
    outputs = doc.get("outputs")
    err = doc.get("error")
    rejected_without_model = status == "rejected" and doc.get("model") == ""
    model = "" if rejected_without_model else _req_str(doc, "model", max_len=MAX_ID_CHARS)
    served_by = doc.get("served_by")
    pipeline, steps = doc.get("pipeline"), doc.get("steps")
    return Result(
        id=_req_str(doc, "id", max_len=MAX_ID_CHARS),
        model=model,
        status=status,
        outputs=None if outputs is None else decode_outputs(outputs, field="outputs"),
        error=None if not isinstance(err, dict) else ErrorInfo(_text(err.get("code")), _text(err.get("message"))),
        batch_size=_opt_int(doc, "batch_size", default=0),
        worker=_text(doc.get("worker", "")),
        queue_ms=_opt_float(doc, "queue_ms"),
        inference_ms=_opt_float(doc, "inference_ms"),
        end_to_end_ms=_opt_float(doc, "end_to_end_ms"),
        attributes=_opt_str_map(doc, "attributes"),
        served_by=served_by if isinstance(served_by, str) and served_by else model,
        pipeline=pipeline if isinstance(pipeline, str) else None,
        steps=tuple(s for s in steps if isinstance(s, dict)) if isinstance(steps, list) else (),
        skipped=_opt_str_map(doc, "skipped"),
    )


# -- pipeline hops -------------------------------------------------------------


@dataclass(slots=True)
class Hop:
    """A task on its way through a pipeline of models: what one step hands the next on the
    intermediate topic ``<prefix>.pipelines.<pipeline>.<step>`` (README "Pipelines").

    Attributes:
        state: the task's id, attributes, inputs (when a later step reads them), the outputs of the
            steps it ran that a later step or the result reads, and the steps skipped or failed
            (:class:`~autoglm.processors.routing.TaskState`).
        model: the task's ``model`` field, echoed into the result.
        pipeline: the pipeline's name.
        step: the step this hop is for.
        priority, deadline_ms, reply_to: the task's.
        created_ms: the task's ``created_ms``, else when the pipeline's first worker received it (epoch ms).
        steps: the steps served so far, in order (see :attr:`Result.steps`).
    """

    state: Any
    model: str
    pipeline: str
    step: str
    priority: int = 0
    deadline_ms: int | None = None
    created_ms: int = 0
    reply_to: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)


def encode_hop(hop: Hop, *, inputs: bool = True, outputs: Any = None) -> bytes:
    """Serialize a hop: tensors as base64 wire tensors, like tasks and results.

    Args:
        inputs: whether the task's inputs travel (a later step or the result reads them).
        outputs: the steps whose outputs travel (``None``: all of them).

    Raises:
        TensorError: an output holds NaN/inf or a dtype the wire has not (``outputs.<step>.<name>`` named).
    """
    state = hop.state
    doc: dict[str, Any] = {"schema": HOP_SCHEMA, "id": state.id, "model": hop.model, "pipeline": hop.pipeline,
                           "step": hop.step, "created_ms": hop.created_ms, "steps": hop.steps}
    if inputs and state.inputs is not None:
        doc["inputs"] = state.inputs if isinstance(state.inputs, list) else encode_outputs(state.inputs, field="inputs")
    doc["outputs"] = {name: encode_outputs(named, field=f"outputs.{name}") for name, named in state.outputs.items()
                      if outputs is None or name in outputs}
    if state.skipped:
        doc["skipped"] = dict(state.skipped)
    if state.errors:
        doc["errors"] = {name: {"code": e.code, "message": e.message} for name, e in state.errors.items()}
    if hop.priority:
        doc["priority"] = hop.priority
    if hop.deadline_ms is not None:
        doc["deadline_ms"] = hop.deadline_ms
    if hop.reply_to is not None:
        doc["reply_to"] = hop.reply_to
    if state.attributes:
        doc["attributes"] = dict(state.attributes)
    return dumps(doc)


def decode_hop(raw: bytes | bytearray | memoryview | str | None) -> Hop:
    """Parse a hop event (:func:`encode_hop`).

    Raises:
        EventDecodeError, SchemaVersionError, EventValidationError, TensorError: each carries ``task_id``
            and ``model`` when those could be read.
    """
    doc = _load_object(raw)
    task_id, model = _readable(doc.get("id")), _readable(doc.get("model"))
    try:
        _check_schema(doc, "hop")
        task_id = _req_str(doc, "id", max_len=MAX_ID_CHARS)
        model = _req_str(doc, "model", max_len=MAX_ID_CHARS)
        outputs, errors, steps = doc.get("outputs") or {}, doc.get("errors") or {}, doc.get("steps") or []
        if not isinstance(outputs, dict) or not all(isinstance(v, dict) for v in outputs.values()):
            raise EventValidationError("outputs", "an object of step -> named tensors", _shown(outputs))
        if not isinstance(errors, dict) or not all(isinstance(v, dict) for v in errors.values()):
            raise EventValidationError("errors", "an object of step -> {code, message}", _shown(errors))
        if not isinstance(steps, list) or not all(isinstance(v, dict) for v in steps):
            raise EventValidationError("steps", "a list of objects", _shown(steps))
        state = TaskState(
            task_id,
            None if "inputs" not in doc else _decode_inputs(doc["inputs"], check_finite=False),
            _opt_str_map(doc, "attributes"),
            outputs={str(step): dict(decode_outputs(named, field=f"outputs.{step}", check_finite=False))
                     for step, named in outputs.items()},
            skipped=_opt_str_map(doc, "skipped"),
            errors={str(step): StepError(_text(e.get("code")), _text(e.get("message"))) for step, e in errors.items()},
        )
        return Hop(state=state, model=model, pipeline=_req_str(doc, "pipeline", max_len=MAX_ID_CHARS),
                   step=_req_str(doc, "step", max_len=MAX_ID_CHARS), priority=_opt_int(doc, "priority", default=0),
                   deadline_ms=_opt_epoch_ms(doc, "deadline_ms"), created_ms=_opt_epoch_ms(doc, "created_ms") or 0,
                   reply_to=_opt_topic(doc, "reply_to"), steps=list(steps))
    except (SchemaVersionError, EventValidationError, TensorError) as exc:
        exc.task_id, exc.model = task_id, model
        raise


# -- control -----------------------------------------------------------------


def encode_control(event: ControlEvent) -> bytes:
    """Serialize a control event."""
    return dumps(
        {
            "schema": CONTROL_SCHEMA,
            "id": event.id,
            "command": event.command,
            "target": event.target,
            "params": event.params,
            "issued_ms": event.issued_ms,
        }
    )


def decode_control(raw: bytes | bytearray | memoryview | str | None) -> ControlEvent:
    """Parse and validate a control event.

    Raises:
        EventDecodeError, SchemaVersionError, EventValidationError.
    """
    doc = _load_object(raw)
    _check_schema(doc, "control")
    command = doc.get("command")
    if command not in CONTROL_COMMANDS:
        raise EventValidationError("command", f"one of {CONTROL_COMMANDS}", _shown(command))
    target = doc.get("target") or {}
    if not isinstance(target, dict) or not all(
        k in TARGET_KEYS and isinstance(v, str) for k, v in target.items()
    ):
        raise EventValidationError("target", "an object with optional string 'model', 'worker', 'pipeline' and 'step'",
                                   _shown(target))
    params = doc.get("params") or {}
    if not isinstance(params, dict):
        raise EventValidationError("params", "an object", _shown(params))
    return ControlEvent(
        id=_req_str(doc, "id", max_len=MAX_ID_CHARS),
        command=command,
        target=dict(target),
        params=params,
        issued_ms=_opt_epoch_ms(doc, "issued_ms") or 0,
    )


# -- helpers -----------------------------------------------------------------

_MISSING = object()


def _load_object(raw: Any) -> dict[str, Any]:
    if raw is None:
        raise EventDecodeError("empty record value (tombstone)")
    doc = loads(raw)
    if not isinstance(doc, dict):
        raise EventDecodeError(f"expected a JSON object, got {type(doc).__name__}")
    return doc


def _check_schema(doc: dict[str, Any], kind: str) -> None:
    schema = doc.get("schema")
    match = _SCHEMA_RE.match(schema) if isinstance(schema, str) else None
    if match is None or match["kind"] != kind:
        raise SchemaVersionError(f"field 'schema': expected 'autoglm.{kind}/v1', got {_shown(schema)!r}")
    if match["major"] != "1":
        raise SchemaVersionError(
            f"field 'schema': major version v{match['major']} is not supported (this worker reads v1)"
        )


def _req_str(doc: dict[str, Any], name: str, *, max_len: int) -> str:
    value = doc.get(name, _MISSING)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise EventValidationError(name, f"a non-empty string of at most {max_len} chars", _shown(value))
    return value


def _opt_int(doc: dict[str, Any], name: str, *, default: int) -> int:
    value = doc.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventValidationError(name, "an integer", _shown(value))
    return value


def _opt_float(doc: dict[str, Any], name: str) -> float:
    value = doc.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EventValidationError(name, "a number", _shown(value))
    return float(value)


def _opt_epoch_ms(doc: dict[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 2**53):
        raise EventValidationError(name, "epoch milliseconds, a number >= 0", _shown(value))
    return int(value)


def _opt_topic(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not TOPIC_NAME_RE.match(value):
        raise EventValidationError(name, "a Kafka topic name ([a-zA-Z0-9._-], 1-249 chars)", _shown(value))
    return value


def _opt_str_map(doc: dict[str, Any], name: str) -> dict[str, str]:
    value = doc.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise EventValidationError(name, "an object of string values", _shown(value))
    return value


def _readable(value: Any) -> str | None:
    """A field usable as a result key even when the event is rejected, else None."""
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS else None


def _text(value: Any) -> str:
    """A string field of a result as text; another JSON value as its bounded preview."""
    return value if isinstance(value, str) else str(preview(value))


def _shown(value: Any) -> Any:
    """``value`` as an error may show it: bounded in depth and length (see ``codec.preview``)."""
    return "missing" if value is _MISSING else preview(value)


def readable_field(raw: bytes | bytearray | memoryview | str | None, name: str) -> str | None:
    """A top-level string field of a record that may be invalid (see ``_readable``), or None.

    For error paths: the id of a record that failed validation, to address a rejection to it.
    """
    try:
        doc = loads(raw) if raw is not None else None
    except EventDecodeError:
        return None
    return _readable(doc.get(name)) if isinstance(doc, dict) else None
