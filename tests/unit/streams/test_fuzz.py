"""Fuzz the task decoder and the models' input validation with hypothesis.

Property (issue #5, "Fuzz"): whatever bytes arrive on a task topic,
``decode_task`` either returns a valid :class:`Task` or raises an
:class:`~autoglm.errors.EventError` (the dead-letter path), never any other
exception; a decoded task's inputs either pass a model's ``prepare`` (and come
out in the model's row form) or are refused with an ``EventError``
(``InputSignatureError``); and a refused event that names a task id still
encodes as a ``rejected`` result.

The models are the real ``digits`` and ``minilm`` (``prepare`` needs no
weights, so neither is loaded).

Examples per run (``max_examples``): 400 valid tasks round-tripped, 1,200
byte-level mutations of valid tasks, 1,000 JSON-field mutations, 600
hostile literals (huge numbers, NaN/Infinity, deep nesting, odd unicode) put
into fields, and 1,500 strings of random bytes and text: 4,700 random events
plus 30 fixed deep-nesting cases; about 20 s on two slow cores. No example
database is written, so runs do not depend on earlier ones.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoglm.errors import EventError
from autoglm.models.digits import DigitsModel
from autoglm.models.minilm import MiniLMModel
from autoglm.streams.events import (
    MAX_ID_CHARS,
    ErrorInfo,
    Result,
    Task,
    decode_result,
    decode_task,
    encode_result,
    encode_task,
)

DIGITS = DigitsModel(max_rows=16)
MINILM = MiniLMModel(max_rows=8, max_chars=200)
MODELS = (DIGITS, MINILM)

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the property ---------------------------------------------------------------------


def check_event(raw: bytes | str) -> Task | None:
    """Decode ``raw`` as the pipeline does; fail the test on any non-EventError outcome."""
    try:
        task = decode_task(raw)
    except EventError as exc:
        check_rejection(exc)
        return None
    check_task(task)
    for model in MODELS:
        try:
            prepared = model.prepare(task.inputs)
        except EventError as exc:
            assert exc.code == "input_signature" and exc.model == model.name
            continue
        check_prepared(model, prepared)
    return task


def check_rejection(exc: EventError) -> None:
    """What the pipeline does with a refused event: a message, a code, a ``rejected`` result."""
    assert isinstance(exc.code, str) and exc.code
    assert isinstance(str(exc), str)
    if exc.task_id is not None:
        assert isinstance(exc.task_id, str) and 0 < len(exc.task_id) <= MAX_ID_CHARS
        rejected = Result(
            id=exc.task_id, model=exc.model or "", status="rejected", error=ErrorInfo(exc.code, str(exc))
        )
        back = decode_result(encode_result(rejected))
        assert (back.id, back.status, back.error.code) == (exc.task_id, "rejected", exc.code)


def check_task(task: Task) -> None:
    assert isinstance(task.id, str) and 0 < len(task.id) <= MAX_ID_CHARS
    assert isinstance(task.model, str) and 0 < len(task.model) <= MAX_ID_CHARS
    assert isinstance(task.priority, int) and not isinstance(task.priority, bool)
    for ms in (task.deadline_ms, task.created_ms):
        assert ms is None or (type(ms) is int and 0 <= ms < 2**53)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in task.attributes.items())
    if isinstance(task.inputs, list):
        assert task.inputs and all(isinstance(t, str) for t in task.inputs)
        return
    # one tensor, or named tensors (an object without dtype/shape/data keys: a multi-input model's inputs)
    arrays = task.inputs.values() if isinstance(task.inputs, dict) else [task.inputs]
    assert arrays
    for array in arrays:
        assert isinstance(array, np.ndarray) and array.flags.c_contiguous
        if array.dtype.kind == "f":
            assert np.isfinite(array).all()


def check_prepared(model: Any, prepared: Any) -> None:
    if model is DIGITS:
        assert prepared.dtype == np.float32 and prepared.flags.c_contiguous
        assert prepared.ndim == 4 and prepared.shape[1:] == (1, 8, 8)
        assert 1 <= prepared.shape[0] <= DIGITS.max_rows and np.isfinite(prepared).all()
    else:
        assert isinstance(prepared, list) and 1 <= len(prepared) <= MINILM.max_rows
        assert all(isinstance(t, str) and len(t) <= MINILM.max_chars for t in prepared)


# -- valid tasks -------------------------------------------------------------------------

ids = st.text(min_size=1, max_size=40)
topics = st.from_regex(r"[a-zA-Z0-9._-]{1,40}", fullmatch=True)
attributes = st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=3)
DIGIT_SHAPES = [(64,), (8, 8), (1, 8, 8)] + [(n, *s) for n in (1, 2, 5) for s in ((64,), (8, 8), (1, 8, 8))]


@st.composite
def digit_tensors(draw: st.DrawFn) -> np.ndarray:
    shape = draw(st.sampled_from(DIGIT_SHAPES))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).random(shape).astype(dtype)


texts = st.lists(st.text(max_size=60), min_size=1, max_size=6)


@st.composite
def valid_tasks(draw: st.DrawFn) -> Task:
    tensor = draw(st.booleans())
    return Task(
        id=draw(ids),
        model="digits" if tensor else "minilm",
        inputs=draw(digit_tensors()) if tensor else draw(texts),
        priority=draw(st.integers(-(2**31), 2**31)),
        deadline_ms=draw(st.none() | st.integers(0, 2**53 - 1)),
        created_ms=draw(st.none() | st.integers(0, 2**53 - 1)),
        reply_to=draw(st.none() | topics),
        attributes=draw(attributes),
    )


@settings(FUZZ, max_examples=400)
@given(valid_tasks())
def test_valid_tasks_round_trip_and_pass_their_model(task):
    """400 examples: every valid task decodes to itself and its own model prepares it."""
    back = check_event(encode_task(task))
    assert back is not None
    assert (back.id, back.model, back.priority, back.deadline_ms, back.created_ms, back.reply_to, back.attributes) == (
        task.id, task.model, task.priority, task.deadline_ms, task.created_ms, task.reply_to, task.attributes,
    )
    if isinstance(task.inputs, list):
        assert back.inputs == task.inputs
        assert MINILM.prepare(back.inputs) == task.inputs
    else:
        assert back.inputs.dtype == task.inputs.dtype
        np.testing.assert_array_equal(back.inputs, task.inputs)
        rows = DIGITS.prepare(back.inputs)
        np.testing.assert_array_equal(rows.reshape(-1), task.inputs.astype(np.float32).reshape(-1))


# -- byte-level mutations ------------------------------------------------------------------


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    data = bytearray(encode_task(draw(valid_tasks())))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "duplicate", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from(b'"{}[],:\\0-e.\x00\xff\xc3\xed ' + bytes([draw(st.integers(0, 255))])))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "duplicate":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 32))]
        else:
            del data[pos:]
    return bytes(data)


@settings(FUZZ, max_examples=1200)
@given(mutated_bytes())
def test_mutated_bytes_are_a_task_or_an_event_error(raw):
    """1,200 examples: valid encoded tasks with flipped, set, inserted, deleted or duplicated bytes."""
    check_event(raw)


# -- JSON-field mutations ------------------------------------------------------------------

FIELDS = ["schema", "id", "model", "inputs", "priority", "deadline_ms", "created_ms", "reply_to", "attributes"]
TENSOR_FIELDS = ["dtype", "shape", "data"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from([0, -1, 2**31, 2**53, 2**53 + 1, 2**62, 2**63 - 1, 2**64 - 1, -(2**63)])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([1e308, -1e308, 3.5e38, 1e39, 5e-324, -0.0, 0.5])
    | st.text(max_size=20)
    | st.sampled_from(["", "float32", "bool", "autoglm.task/v1", "autoglm.task/v2", "AAAA", "\x00", "\u202e",
                       "ＡＡＡＡ", "🙂" * 5, "a" * 300])
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=24,
)
number_lists = st.recursive(
    st.lists(scalars, max_size=70),
    lambda children: st.lists(children, min_size=1, max_size=4),
    max_leaves=6,
)


@st.composite
def mutated_docs(draw: st.DrawFn) -> bytes:
    doc = orjson.loads(encode_task(draw(valid_tasks())))
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "delete", "unknown", "tensor", "shape", "data", "numbers", "root"]))
        inputs = doc.get("inputs") if isinstance(doc, dict) else None
        if not isinstance(doc, dict):
            break
        if op == "set":
            doc[draw(st.sampled_from(FIELDS))] = draw(json_values)
        elif op == "delete":
            doc.pop(draw(st.sampled_from(FIELDS)), None)
        elif op == "unknown":
            doc[draw(st.text(max_size=10))] = draw(json_values)
        elif op == "tensor" and isinstance(inputs, dict):
            inputs[draw(st.sampled_from(TENSOR_FIELDS))] = draw(json_values)
        elif op == "shape" and isinstance(inputs, dict) and isinstance(inputs.get("shape"), list):
            shape = inputs["shape"]
            big = st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0, 2**31, 2**62, 2**63 - 1])
            if shape and draw(st.booleans()):
                shape[draw(st.integers(0, len(shape) - 1))] = draw(big)
            else:
                shape.insert(0, draw(big | st.integers(0, 4)))
        elif op == "data" and isinstance(inputs, dict):
            raw = draw(st.binary(max_size=600))
            text = base64.b64encode(raw).decode()
            inputs["data"] = draw(st.sampled_from([text, text[:-1], text + "=", text.replace("A", "-")]))
        elif op == "numbers":
            doc["inputs"] = draw(number_lists)
        elif op == "root":
            doc = draw(json_values)
    return orjson.dumps(doc)


@settings(FUZZ, max_examples=1000)
@given(mutated_docs())
def test_mutated_fields_are_a_task_or_an_event_error(raw):
    """1,000 examples: fields of valid tasks replaced by any JSON value, deleted, or added."""
    check_event(raw)


# -- hostile literals -------------------------------------------------------------------------

SLOT = "__SLOT__"
DEPTHS = [30, 64, 500, 900, 990, 1000, 1022, 1023, 1024, 1100]
LITERALS = (
    ["NaN", "-NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "1E+39", "-0", "0.0e0",
     "123456789012345678901234567890", "-9223372036854775809", "18446744073709551616",
     "1.7976931348623157e308", "4.9e-324", "3.4028236e38", "[1e39]", "[[1e39,0]]", "[-1e39]",
     '"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', '"\\uFFFF"', '"\\u202e"', '"\\uD83D\\uDE42"',
     '{"":{}}', "[]", "[[]]", "{}", "[\"\"]", "[0,\"a\"]", "[true]", "[null]", "[[1,2],[3]]", "00", "+1", ".5"]
    + ["[" * d + "]" * d for d in DEPTHS]
    + ["[" * d + "0.5" + "]" * d for d in DEPTHS]
    + ["{\"a\":" * d + "1" + "}" * d for d in DEPTHS]
    + ['"' + "é" * 5000 + '"', '"' + "a" * 300 + '"']
)
SLOTS = FIELDS + ["inputs.dtype", "inputs.shape", "inputs.shape.0", "inputs.data", "attributes.k"]


@st.composite
def hostile_literals(draw: st.DrawFn) -> bytes:
    doc = orjson.loads(encode_task(draw(valid_tasks())))
    slot = draw(st.sampled_from(SLOTS))
    head, _, tail = slot.partition(".")
    if not tail:
        doc[head] = SLOT
    elif head == "attributes":
        doc["attributes"] = {"k": SLOT}
    else:
        if not isinstance(doc["inputs"], dict):
            doc["inputs"] = {"dtype": "float32", "shape": [1, 64], "data": base64.b64encode(bytes(256)).decode()}
        if tail == "shape.0":
            doc["inputs"]["shape"][0] = SLOT
        else:
            doc["inputs"][tail] = SLOT
    return orjson.dumps(doc).replace(f'"{SLOT}"'.encode(), draw(st.sampled_from(LITERALS)).encode())


@settings(FUZZ, max_examples=600)
@given(hostile_literals())
def test_hostile_literals_are_a_task_or_an_event_error(raw):
    """600 examples: huge and non-finite numbers, deep nesting, lone surrogates and odd unicode in any field."""
    check_event(raw)


@pytest.mark.parametrize("depth", [500, 900, 990, 1000, 1023])
@pytest.mark.parametrize("slot", ["id", "inputs", "attributes", "inputs.shape", "inputs.dtype", "inputs.data"])
def test_deep_nesting_anywhere_is_an_event_error(slot, depth):
    """Nesting just under the JSON parser's limit (1,024) is refused with an EventError, not a RecursionError."""
    head, _, tail = slot.partition(".")
    doc: dict[str, Any] = {"schema": "autoglm.task/v1", "id": "t1", "model": "digits", "inputs": "x"}
    if tail:
        doc["inputs"] = {"dtype": "float32", "shape": [1], "data": "AAAAAA=="}
        doc["inputs"][tail] = SLOT
    else:
        doc[head] = SLOT
    raw = orjson.dumps(doc).replace(f'"{SLOT}"'.encode(), ("[" * depth + "1" + "]" * depth).encode())
    with pytest.raises(EventError) as info:
        decode_task(raw)
    assert len(str(info.value)) < 400
    check_rejection(info.value)


# -- random bytes -----------------------------------------------------------------------------------


@settings(FUZZ, max_examples=1500)
@given(st.binary(max_size=300) | st.text(max_size=200))
def test_random_bytes_are_an_event_error(raw):
    """1,500 examples: random bytes and random text (JSON or not) are refused or decode to a valid task."""
    check_event(raw)


# -- the bugs this fuzzing found, pinned ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [[], ["float32"], {"": {}}, {"float32": 1}])
def test_unhashable_dtype_is_a_tensor_error(dtype):
    """A list or object as ``inputs.dtype`` raised TypeError (unhashable) from the set lookup."""
    raw = orjson.dumps(
        {"schema": "autoglm.task/v1", "id": "t1", "model": "digits",
         "inputs": {"dtype": dtype, "shape": [1], "data": "AAAAAA=="}}
    )
    with pytest.raises(EventError) as info:
        decode_task(raw)
    assert (info.value.code, info.value.field, info.value.task_id) == ("invalid_tensor", "inputs.dtype", "t1")


def test_rejected_result_without_a_model_decodes():
    """The pipeline rejects a task whose model is unreadable with ``model=""``; clients could not read that result."""
    back = decode_result(
        encode_result(Result(id="t1", model="", status="rejected", error=ErrorInfo("invalid_field", "no model")))
    )
    assert (back.id, back.model, back.status, back.error) == ("t1", "", "rejected", ErrorInfo("invalid_field", "no model"))
    with pytest.raises(EventError, match="'model'"):  # an ok result still needs its model
        decode_result(encode_result(Result(id="t1", model="", status="ok")))


def test_number_beyond_float32_is_named_not_called_nan():
    """1e39 in a nested list became inf in float32 (with a RuntimeWarning) and was reported as NaN or inf."""
    raw = orjson.dumps({"schema": "autoglm.task/v1", "id": "t1", "model": "digits", "inputs": [[0.5, 1e39]]})
    with pytest.raises(EventError) as info:
        decode_task(raw)
    assert info.value.code == "invalid_tensor" and "1e+39, beyond float32's range" in str(info.value)
