"""Unit tests of the v1 event contracts (streams/events.py): task, result, control."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from autoglm.errors import (
    EventDecodeError,
    EventError,
    EventValidationError,
    SchemaVersionError,
    TensorError,
)
from autoglm.streams.codec import encode_tensor
from autoglm.streams.events import (
    CONTROL_COMMANDS,
    MAX_ID_CHARS,
    ControlEvent,
    ErrorInfo,
    Result,
    Task,
    decode_control,
    decode_result,
    decode_task,
    encode_control,
    encode_result,
    encode_task,
)


def raw(doc: Any) -> bytes:
    return orjson.dumps(doc)


def task_doc(**changes: Any) -> dict[str, Any]:
    """A valid task document; ``changes`` set fields, a value of ``...`` removes one."""
    doc: dict[str, Any] = {
        "schema": "autoglm.task/v1",
        "id": "task-1",
        "model": "toy",
        "inputs": [[1.0, 2.0, 3.0, 4.0]],
    }
    for name, value in changes.items():
        if value is ...:
            doc.pop(name, None)
        else:
            doc[name] = value
    return doc


def assert_same_task(got: Task, want: Task) -> None:
    for name in ("id", "model", "priority", "deadline_ms", "created_ms", "reply_to", "attributes"):
        assert getattr(got, name) == getattr(want, name), name
    if isinstance(want.inputs, list):
        assert got.inputs == want.inputs
    else:
        assert isinstance(got.inputs, np.ndarray)
        assert got.inputs.dtype == want.inputs.dtype and got.inputs.shape == want.inputs.shape
        assert np.array_equal(got.inputs, want.inputs)


# -- task round trip ---------------------------------------------------------------


def test_task_round_trip_tensor_inputs_minimal() -> None:
    task = Task(id="a", model="toy", inputs=np.arange(8, dtype=np.float32).reshape(2, 4))
    doc = orjson.loads(encode_task(task))
    assert doc == {"schema": "autoglm.task/v1", "id": "a", "model": "toy", "inputs": encode_tensor(task.inputs)}
    back = decode_task(encode_task(task))
    assert_same_task(back, task)
    assert back.priority == 0 and back.deadline_ms is None and back.reply_to is None and back.attributes == {}


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "uint8"])
def test_task_round_trip_keeps_tensor_dtype(dtype: str) -> None:
    task = Task(id="a", model="toy", inputs=np.array([[1, 0], [2, 3]], dtype=dtype))
    assert_same_task(decode_task(encode_task(task)), task)


def test_task_round_trip_all_optional_fields() -> None:
    task = Task(
        id="t-42",
        model="minilm",
        inputs=["hello", "wörld ✓"],
        priority=-3,
        deadline_ms=1_700_000_000_123,
        created_ms=1_700_000_000_000,
        reply_to="client-7.replies",
        attributes={"user": "u1", "trace": ""},
    )
    assert_same_task(decode_task(encode_task(task)), task)


def test_task_text_inputs_single_string_becomes_list_of_one() -> None:
    task = decode_task(raw(task_doc(inputs="just one text")))
    assert task.inputs == ["just one text"]


def test_task_priority_zero_is_omitted_and_reads_back_as_zero() -> None:
    encoded = encode_task(Task(id="a", model="toy", inputs=["x"], priority=0))
    assert "priority" not in orjson.loads(encoded)
    assert decode_task(encoded).priority == 0


def test_task_minor_version_accepted() -> None:
    task = decode_task(raw(task_doc(schema="autoglm.task/v1.3")))
    assert task.id == "task-1"


def test_task_unknown_fields_ignored() -> None:
    task = decode_task(raw(task_doc(future_field={"x": [1, 2]}, tracing="abc")))
    assert task.id == "task-1" and task.model == "toy"
    assert task.inputs.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_task_accepts_str_bytearray_memoryview() -> None:
    encoded = raw(task_doc())
    for value in (encoded.decode(), bytearray(encoded), memoryview(encoded)):
        assert decode_task(value).id == "task-1"


def test_task_epoch_float_is_truncated_to_int_ms() -> None:
    task = decode_task(raw(task_doc(deadline_ms=1234.9)))
    assert task.deadline_ms == 1234 and isinstance(task.deadline_ms, int)


def test_task_id_of_max_length_accepted() -> None:
    assert decode_task(raw(task_doc(id="x" * MAX_ID_CHARS))).id == "x" * MAX_ID_CHARS


# -- task rejections ---------------------------------------------------------------

VE, TE, SE, DE = EventValidationError, TensorError, SchemaVersionError, EventDecodeError

ANY = object()  # not checked

# (id, document changes, error class, field or None, task_id carried, model carried)
TASK_REJECTIONS = [
    ("missing id", {"id": ...}, VE, "id", None, "toy"),
    ("id not a string", {"id": 5}, VE, "id", None, "toy"),
    ("id too long", {"id": "x" * (MAX_ID_CHARS + 1)}, VE, "id", ANY, "toy"),
    ("missing model", {"model": ...}, VE, "model", "task-1", None),
    ("empty model", {"model": ""}, VE, "model", "task-1", None),
    ("model not a string", {"model": ["toy"]}, VE, "model", "task-1", None),
    ("missing inputs", {"inputs": ...}, VE, "inputs", "task-1", "toy"),
    ("null inputs", {"inputs": None}, TE, "inputs", "task-1", "toy"),
    ("texts mixed with numbers", {"inputs": ["a", 1]}, VE, "inputs", "task-1", "toy"),
    ("bad tensor shape", {"inputs": {"dtype": "float32", "shape": [-1], "data": ""}}, TE, "inputs.shape", "task-1", "toy"),
    ("ragged inputs", {"inputs": [[1, 2], [3]]}, TE, "inputs", "task-1", "toy"),
    ("overflowing inputs", {"inputs": [1e39]}, TE, "inputs.data", "task-1", "toy"),
    ("priority bool", {"priority": True}, VE, "priority", "task-1", "toy"),
    ("priority str", {"priority": "5"}, VE, "priority", "task-1", "toy"),
    ("priority float", {"priority": 1.5}, VE, "priority", "task-1", "toy"),
    ("deadline negative", {"deadline_ms": -1}, VE, "deadline_ms", "task-1", "toy"),
    ("deadline str", {"deadline_ms": "soon"}, VE, "deadline_ms", "task-1", "toy"),
    ("deadline bool", {"deadline_ms": True}, VE, "deadline_ms", "task-1", "toy"),
    ("deadline beyond 2**53", {"deadline_ms": 2**53}, VE, "deadline_ms", "task-1", "toy"),
    ("created negative", {"created_ms": -5}, VE, "created_ms", "task-1", "toy"),
    ("reply_to with space", {"reply_to": "my topic"}, VE, "reply_to", "task-1", "toy"),
    ("reply_to with slash", {"reply_to": "a/b"}, VE, "reply_to", "task-1", "toy"),
    ("reply_to empty", {"reply_to": ""}, VE, "reply_to", "task-1", "toy"),
    ("reply_to too long", {"reply_to": "r" * 250}, VE, "reply_to", "task-1", "toy"),
    ("reply_to not a string", {"reply_to": 7}, VE, "reply_to", "task-1", "toy"),
    ("attributes int value", {"attributes": {"a": "ok", "b": 1}}, VE, "attributes", "task-1", "toy"),
    ("attributes null value", {"attributes": {"a": None}}, VE, "attributes", "task-1", "toy"),
    ("attributes a list", {"attributes": ["a"]}, VE, "attributes", "task-1", "toy"),
    ("schema missing", {"schema": ...}, SE, None, "task-1", "toy"),
    ("schema not a string", {"schema": 1}, SE, None, "task-1", "toy"),
    ("schema of a result", {"schema": "autoglm.result/v1"}, SE, None, "task-1", "toy"),
    ("schema of another project", {"schema": "other.task/v1"}, SE, None, "task-1", "toy"),
    ("schema v2", {"schema": "autoglm.task/v2"}, SE, None, "task-1", "toy"),
    ("schema v10", {"schema": "autoglm.task/v10"}, SE, None, "task-1", "toy"),
    ("schema v0.9", {"schema": "autoglm.task/v0.9"}, SE, None, "task-1", "toy"),
    ("schema bad minor", {"schema": "autoglm.task/v1.x"}, SE, None, "task-1", "toy"),
    ("schema with suffix", {"schema": "autoglm.task/v1 "}, SE, None, "task-1", "toy"),
]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize(
    ("changes", "cls", "field", "task_id", "model"),
    [r[1:] for r in TASK_REJECTIONS],
    ids=[r[0] for r in TASK_REJECTIONS],
)
def test_task_rejected(changes: dict, cls: type, field: str | None, task_id: str | None, model: str | None) -> None:
    with pytest.raises(EventError) as info:
        decode_task(raw(task_doc(**changes)))
    err = info.value
    assert type(err) is cls
    assert err.code == {VE: "invalid_field", TE: "invalid_tensor", SE: "schema"}[cls]
    if field is not None:
        assert err.field == field
    if task_id is not ANY:
        assert err.task_id == task_id
    assert err.model == model


def test_task_empty_id_carries_no_usable_id() -> None:
    with pytest.raises(EventValidationError) as info:
        decode_task(raw(task_doc(id="")))
    assert info.value.field == "id"
    assert not info.value.task_id  # no result can be keyed by it


def test_schema_v2_message_names_the_version() -> None:
    with pytest.raises(SchemaVersionError) as info:
        decode_task(raw(task_doc(schema="autoglm.task/v2")))
    assert "v2" in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"not json",
        b'{"schema": "autoglm.task/v1", "id": "a"',
        b"\xff\xfe{}",
        b'{"id": "\xff"}',
        b'{"schema": "autoglm.task/v1", "id": "a", "model": "toy", "inputs": [NaN]}',
        b"[1, 2]",
        b'"a string"',
        b"42",
        b"null",
    ],
    ids=["None", "empty", "not json", "truncated", "bad utf8", "bad utf8 in string", "NaN literal",
         "array", "string", "number", "json null"],
)
def test_task_undecodable(value: bytes | None) -> None:
    with pytest.raises(EventDecodeError) as info:
        decode_task(value)
    assert type(info.value) is EventDecodeError
    assert info.value.code == "decode"
    assert info.value.task_id is None and info.value.model is None


# -- results -----------------------------------------------------------------------


def test_result_round_trip_ok() -> None:
    result = Result(
        id="t-1",
        model="toy",
        status="ok",
        outputs=np.array([[0.5, -1.0, 2.0]], dtype=np.float32),
        batch_size=3,
        worker="w-1",
        queue_ms=1.25,
        inference_ms=0.5,
        end_to_end_ms=12.0,
        attributes={"user": "u"},
        served_by="toy-fallback",
    )
    back = decode_result(encode_result(result))
    assert (back.id, back.model, back.status) == ("t-1", "toy", "ok")
    assert back.outputs.dtype == np.float32 and back.outputs.tolist() == [[0.5, -1.0, 2.0]]
    assert back.error is None
    assert (back.batch_size, back.worker) == (3, "w-1")
    assert (back.queue_ms, back.inference_ms, back.end_to_end_ms) == (1.25, 0.5, 12.0)
    assert back.attributes == {"user": "u"}
    assert back.served_by == "toy-fallback"


def test_result_timings_rounded_to_microseconds() -> None:
    result = Result(id="a", model="m", status="ok", outputs=np.zeros((1, 1), np.float32), queue_ms=1.23456789)
    assert orjson.loads(encode_result(result))["queue_ms"] == 1.235


def test_result_served_by_defaults_to_model() -> None:
    encoded = encode_result(Result(id="a", model="toy", status="ok", outputs=np.zeros((1, 2), np.float32)))
    assert "served_by" not in orjson.loads(encoded)
    assert decode_result(encoded).served_by == "toy"


@pytest.mark.parametrize("status", ["error", "expired", "rejected"])
def test_result_round_trip_without_outputs(status: str) -> None:
    result = Result(id="t-9", model="toy", status=status, error=ErrorInfo("input_signature", "expected (B, 4)"))
    doc = orjson.loads(encode_result(result))
    assert "outputs" not in doc
    assert doc["error"] == {"code": "input_signature", "message": "expected (B, 4)"}
    back = decode_result(encode_result(result))
    assert back.status == status
    assert back.outputs is None
    assert back.error == ErrorInfo("input_signature", "expected (B, 4)")


def test_result_with_non_finite_outputs_is_never_encoded() -> None:
    result = Result(id="a", model="m", status="ok", outputs=np.array([[np.inf]], dtype=np.float32))
    with pytest.raises(TensorError) as info:
        encode_result(result)
    assert info.value.field == "outputs.data"


def result_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema": "autoglm.result/v1", "id": "a", "model": "m", "status": "error"}
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not ...}


@pytest.mark.parametrize(
    ("changes", "cls", "field"),
    [
        ({"status": "done"}, EventValidationError, "status"),
        ({"status": ...}, EventValidationError, "status"),
        ({"id": ...}, EventValidationError, "id"),
        ({"model": 3}, EventValidationError, "model"),
        ({"attributes": {"k": 1}}, EventValidationError, "attributes"),
        ({"outputs": {"dtype": "float32", "shape": [1], "data": "AAAA"}, "status": "ok"}, TensorError, "outputs.data"),
        ({"outputs": [1e39], "status": "ok"}, TensorError, "outputs.data"),
        ({"schema": "autoglm.task/v1"}, SchemaVersionError, None),
        ({"schema": "autoglm.result/v2"}, SchemaVersionError, None),
    ],
    ids=["unknown status", "no status", "no id", "model int", "attributes int", "short outputs",
         "inf outputs", "task schema", "v2"],
)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_result_rejected(changes: dict, cls: type, field: str | None) -> None:
    with pytest.raises(EventError) as info:
        decode_result(raw(result_doc(**changes)))
    assert type(info.value) is cls
    if field is not None:
        assert info.value.field == field


@pytest.mark.parametrize("value", [None, "fast", [1]], ids=["null", "str", "list"])
def test_result_rejects_non_numeric_timing(value: Any) -> None:
    with pytest.raises(EventValidationError) as info:
        decode_result(raw(result_doc(queue_ms=value)))
    assert info.value.field == "queue_ms"


# -- control -----------------------------------------------------------------------


@pytest.mark.parametrize("command", CONTROL_COMMANDS)
def test_control_round_trip(command: str) -> None:
    event = ControlEvent(
        id="c-1",
        command=command,
        target={"model": "digits", "worker": "w-2"},
        params={"max_batch_size": 8, "max_wait_s": 0.005, "nested": {"a": [1, 2]}},
        issued_ms=1_700_000_000_000,
    )
    assert decode_control(encode_control(event)) == event


def test_control_defaults() -> None:
    event = decode_control(raw({"schema": "autoglm.control/v1.2", "id": "c", "command": "pause"}))
    assert event == ControlEvent(id="c", command="pause", target={}, params={}, issued_ms=0)


def control_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema": "autoglm.control/v1", "id": "c-1", "command": "pause"}
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not ...}


@pytest.mark.parametrize(
    ("changes", "cls", "field"),
    [
        ({"command": "restart"}, EventValidationError, "command"),
        ({"command": "PAUSE"}, EventValidationError, "command"),
        ({"command": ...}, EventValidationError, "command"),
        ({"target": {"partition": "3"}}, EventValidationError, "target"),
        ({"target": {"model": "a", "topic": "b"}}, EventValidationError, "target"),
        ({"target": ["model"]}, EventValidationError, "target"),
        ({"target": "digits"}, EventValidationError, "target"),
        ({"params": [1, 2]}, EventValidationError, "params"),
        ({"id": ...}, EventValidationError, "id"),
        ({"id": ""}, EventValidationError, "id"),
        ({"issued_ms": -1}, EventValidationError, "issued_ms"),
        ({"schema": "autoglm.control/v2"}, SchemaVersionError, None),
        ({"schema": "autoglm.task/v1"}, SchemaVersionError, None),
        ({"schema": ...}, SchemaVersionError, None),
    ],
    ids=["unknown command", "upper-case command", "no command", "target partition key", "target extra key",
         "target list", "target string", "params list", "no id", "empty id", "issued negative", "v2",
         "task schema", "no schema"],
)
def test_control_rejected(changes: dict, cls: type, field: str | None) -> None:
    with pytest.raises(EventError) as info:
        decode_control(raw(control_doc(**changes)))
    assert type(info.value) is cls
    if field is not None:
        assert info.value.field == field


@pytest.mark.parametrize("value", [None, b"[]", b"{", b"\xff"], ids=["None", "array", "truncated", "bad utf8"])
def test_control_undecodable(value: bytes | None) -> None:
    with pytest.raises(EventDecodeError):
        decode_control(value)


def test_control_null_target_value_is_not_the_string_none() -> None:
    try:
        event = decode_control(raw(control_doc(target={"model": None})))
    except EventValidationError as exc:
        assert exc.field == "target"
    else:
        assert "model" not in event.target
