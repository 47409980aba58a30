"""Results of any dtype and shape, named outputs and named inputs: round trips and old readers."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from autoglm.errors import TensorError
from autoglm.streams.events import Result, Task, decode_result, decode_task, encode_result, encode_task


def ok(outputs) -> Result:
    return Result(id="t1", model="m", status="ok", outputs=outputs, batch_size=2, worker="w")


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.int64).reshape(2, 3),
    np.array([True, False]),
    np.arange(24, dtype=np.float16).reshape(2, 3, 4),
    np.array([7, 9], dtype=np.uint8),
])
def test_one_output_of_any_dtype_and_shape_stays_one_tensor(array):
    raw = encode_result(ok(array))
    doc = orjson.loads(raw)
    assert doc["outputs"]["dtype"] == array.dtype.name and doc["outputs"]["shape"] == list(array.shape)
    back = decode_result(raw).outputs
    assert isinstance(back, np.ndarray) and back.dtype == array.dtype and np.array_equal(back, array)


def test_named_outputs_round_trip_as_an_object_of_tensors():
    outputs = {"logits": np.array([[0.5, -1.0, 2.0]], np.float32), "label": np.array([2], np.int64)}
    raw = encode_result(ok(outputs))
    doc = orjson.loads(raw)
    assert list(doc["outputs"]) == ["logits", "label"]
    assert doc["outputs"]["label"] == {"dtype": "int64", "shape": [1],
                                       "data": base64.b64encode(np.int64(2).tobytes()).decode()}
    back = decode_result(raw).outputs
    assert sorted(back) == ["label", "logits"] and back["label"].dtype == np.int64
    assert np.array_equal(back["logits"], outputs["logits"]) and back["label"].tolist() == [2]


def test_a_v1_reader_of_single_output_results_reads_them_unchanged():
    """The bytes of a single float32 output are exactly what they were before named outputs existed."""
    array = np.array([[0.25, 0.75]], np.float32)
    doc = orjson.loads(encode_result(ok(array)))
    assert doc["outputs"] == {"dtype": "float32", "shape": [1, 2], "data": base64.b64encode(array.tobytes()).decode()}


def test_non_finite_named_outputs_are_refused_naming_the_output():
    with pytest.raises(TensorError, match="outputs.score"):
        encode_result(ok({"score": np.array([np.nan], np.float32), "label": np.array([1])}))


def test_a_bad_named_tensor_is_refused_with_its_path():
    raw = orjson.dumps({"schema": "autoglm.result/v1", "id": "t", "model": "m", "status": "ok",
                        "outputs": {"a": {"dtype": "float99", "shape": [1], "data": ""}}})
    with pytest.raises(TensorError, match="outputs.a.dtype"):
        decode_result(raw)


def test_named_inputs_round_trip_and_plain_tensors_still_decode_as_one_array():
    inputs = {"ids": np.array([[1, 2, 3]], np.int64), "mask": np.array([[1, 1, 0]], np.int8)}
    task = decode_task(encode_task(Task(id="t", model="m", inputs=inputs)))
    assert sorted(task.inputs) == ["ids", "mask"] and task.inputs["mask"].dtype == np.int8
    one = decode_task(encode_task(Task(id="t", model="m", inputs=np.zeros((1, 4), np.float32))))
    assert isinstance(one.inputs, np.ndarray) and one.inputs.shape == (1, 4)
    nested = decode_task(orjson.dumps({"schema": "autoglm.task/v1", "id": "t", "model": "m",
                                       "inputs": {"x": [[1, 2]], "y": [[3.5]]}}))
    assert nested.inputs["x"].dtype == np.float32 and nested.inputs["y"].tolist() == [[3.5]]


def test_named_inputs_sent_to_a_single_input_built_in_are_an_input_signature_error():
    from autoglm.errors import InputSignatureError
    from autoglm.models.digits import DigitsModel

    task = decode_task(b'{"schema":"autoglm.task/v1","id":"t","model":"digits","inputs":{"x":[[0.5]]}}')
    assert isinstance(task.inputs, dict)
    with pytest.raises(InputSignatureError):
        DigitsModel().prepare(task.inputs)
