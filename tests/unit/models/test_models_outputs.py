"""Output checks and the per-task split, table-driven (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm.models.outputs import output_problems, split_outputs
from autoglm.models.spec import TensorSpec

ONE = (TensorSpec("y", "float32", (3,)),)
TWO = (TensorSpec("logits", "float32", (3,)), TensorSpec("label", "int64", ()))
VAR = (TensorSpec("tokens", "int32", (-1, 2)),)


@pytest.mark.parametrize(
    "specs, out, total, problems",
    [
        (ONE, np.zeros((4, 3), np.float32), 4, []),
        (ONE, {"y": np.zeros((4, 3), np.float32)}, 4, []),
        (ONE, np.zeros((4, 3), np.float64), 4, [("outputs[0].dtype", "float32 (4, 3)", "float64 (4, 3)")]),
        (ONE, np.zeros((5, 3), np.float32), 4, [("outputs[0].shape", "float32 (4, 3)", "float32 (5, 3)")]),
        (ONE, np.zeros((4,), np.float32), 4, [("outputs[0].shape", "float32 (4, 3)", "float32 (4,)")]),
        (ONE, np.float32(1.0), 1, [("outputs[0]", "a numpy array float32 (1, 3)", "float32")]),
        (ONE, [1, 2, 3], 1, [("outputs[0]", "a numpy array float32 (1, 3)", "list")]),
        (TWO, {"logits": np.zeros((2, 3), np.float32), "label": np.zeros(2, np.int64)}, 2, []),
        (TWO, np.zeros((2, 3), np.float32), 2, [("outputs", "an object of 2 named arrays", "float32 (2, 3)")]),
        (TWO, {"logits": np.zeros((2, 3), np.float32)}, 2,
         [("outputs", "outputs named ['logits', 'label']", "outputs named ['logits']")]),
        (TWO, {"logits": np.zeros((2, 3), np.float32), "label": np.zeros((2, 1), np.int32)}, 2,
         [("outputs[1].dtype", "int64 (2)", "int32 (2, 1)"), ("outputs[1].shape", "int64 (2)", "int32 (2, 1)")]),
        (VAR, np.zeros((3, 7, 2), np.int32), 3, []),
        (VAR, np.zeros((3, 7, 3), np.int32), 3, [("outputs[0].shape", "int32 (3, ?, 2)", "int32 (3, 7, 3)")]),
    ],
)
def test_output_problems(specs, out, total, problems):
    assert output_problems(specs, out, total) == problems


def test_split_one_array_by_rows():
    out = np.arange(12).reshape(6, 2)
    parts = split_outputs(out, [1, 3, 2])
    assert [p.tolist() for p in parts] == [[[0, 1]], [[2, 3], [4, 5], [6, 7]], [[8, 9], [10, 11]]]


def test_split_named_arrays_keeps_names_dtypes_and_row_alignment():
    out = {"logits": np.arange(10, dtype=np.float32).reshape(5, 2), "label": np.arange(5, dtype=np.int64)}
    parts = split_outputs(out, [2, 3])
    assert [sorted(p) for p in parts] == [["label", "logits"]] * 2
    assert parts[0]["label"].tolist() == [0, 1] and parts[1]["label"].tolist() == [2, 3, 4]
    assert parts[1]["logits"].tolist() == [[4, 5], [6, 7], [8, 9]] and parts[1]["logits"].dtype == np.float32
