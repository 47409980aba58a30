"""``autoglm results`` lines for single- and multi-output results."""

from __future__ import annotations

import numpy as np

from autoglm.streams.events import Result
from autoglm.tasks import _describe


def test_one_output_shows_dtype_shape_and_argmax():
    line = _describe(Result(id="t1", model="digits", status="ok", outputs=np.eye(2, 10, dtype=np.float32)))
    assert line.endswith("outputs float32 (2, 10) argmax [0, 1]")


def test_named_outputs_show_each_tensor():
    outputs = {"logits": np.array([[0.1, 0.9, 0.0]], np.float32), "label": np.array([1], np.int64)}
    line = _describe(Result(id="t1", model="m", status="ok", outputs=outputs))
    assert line.endswith("outputs logits: float32 (1, 3) argmax [1], label: int64 (1,) [1]")
