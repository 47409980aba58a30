"""Result encoding per micro-batch: the fields a batch's results share are serialised once.

Every ``ok`` result of one batch has the same ``schema``, ``model``,
``status``, ``batch_size``, ``worker`` and ``inference_ms``, and its output
tensor the same dtype. :class:`BatchResultEncoder` serialises those once (a
JSON object prefix) and per task only the id, timings, attributes and the
output's shape and base64 data. The bytes decode to the same result as
:func:`~autoglm.streams.events.encode_result` gives (field order aside, which
JSON does not define).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson

from autoglm.processors.errors import TensorError
from autoglm.streams.codec import SUPPORTED_DTYPES, preview
from autoglm.streams.events import RESULT_SCHEMA


class BatchResultEncoder:
    """Encodes the ``ok`` results of one micro-batch.

    Args:
        model: the model name every result carries.
        worker: the worker id.
        batch_size: tasks in the batch.
        inference_ms: the batch's forward duration, milliseconds.
        served_by: the model that served the batch, when not ``model`` (a fallback).
    """

    __slots__ = ("_prefix", "_dtype", "_dtype_name")

    def __init__(self, model: str, worker: str, batch_size: int, inference_ms: float,
                 served_by: str | None = None):
        shared: dict[str, Any] = {
            "schema": RESULT_SCHEMA, "model": model, "status": "ok", "batch_size": batch_size,
            "worker": worker, "inference_ms": round(inference_ms, 3),
        }
        if served_by is not None and served_by != model:
            shared["served_by"] = served_by
        self._prefix = orjson.dumps(shared)[:-1] + b","  # '{"schema":...,' : the shared fields, once
        self._dtype: np.dtype | None = None  # the batch's output dtype and its wire name (numpy's
        self._dtype_name = ""                # dtype.name costs microseconds: looked up once per batch)

    def encode(self, task_id: str, output: np.ndarray, queue_ms: float, end_to_end_ms: float,
               attributes: dict[str, str]) -> bytes:
        """One result: the shared prefix, then this task's fields.

        Args:
            output: the task's rows, any supported dtype, shape ``(rows, ...)``;
                finiteness is the caller's per-batch check (:func:`all_finite`).

        Raises:
            TensorError: the output's dtype is not a wire dtype.
        """
        dtype = output.dtype
        if dtype is not self._dtype:
            name = dtype.name
            if name not in SUPPORTED_DTYPES:
                raise TensorError("outputs.dtype", f"one of {sorted(SUPPORTED_DTYPES)}", preview(name))
            self._dtype, self._dtype_name = dtype, name
        if dtype.byteorder == ">":
            output = output.astype(dtype.newbyteorder("<"))
        own = orjson.dumps({
            "id": task_id,
            "queue_ms": round(queue_ms, 3),
            "end_to_end_ms": round(end_to_end_ms, 3),
            "attributes": attributes,
            "outputs": {"dtype": self._dtype_name, "shape": output.shape,
                        "data": base64.b64encode(output.tobytes()).decode("ascii")},
        })
        return self._prefix + own[1:]


def all_finite(arrays: list[np.ndarray]) -> bool:
    """Whether every float array of ``arrays`` holds only finite numbers: one vectorised check for
    a whole batch (the caller checks task by task only when this is False)."""
    floats = [a.reshape(-1) for a in arrays if a.dtype.kind == "f" and a.size]
    if not floats:
        return True
    joined = floats[0] if len(floats) == 1 else np.concatenate(floats)
    return bool(np.isfinite(joined).all())


class PipelineResultEncoder:
    """Encodes the ``ok`` pipeline results of the tasks a step's micro-batch finishes.

    They share ``schema``, ``status``, ``pipeline``, ``worker`` and ``batch_size`` (the finishing
    step's batch), serialised once; per task its id, model, timings, attributes, ``steps``,
    ``skipped`` and named outputs. The outputs' finiteness is not checked here: every output was
    checked when its step served it (:meth:`autoglm.streams.hops.StepStage.served`). The bytes
    decode to the same result as :func:`~autoglm.streams.events.encode_result` gives.

    Args:
        pipeline: the pipeline's name.
        worker: the worker id.
        batch_size: tasks in the finishing step's batch.
    """

    __slots__ = ("_prefix", "_names")

    def __init__(self, pipeline: str, worker: str, batch_size: int):
        shared = {"schema": RESULT_SCHEMA, "status": "ok", "pipeline": pipeline, "worker": worker,
                  "batch_size": batch_size}
        self._prefix = orjson.dumps(shared)[:-1] + b","
        self._names: dict[np.dtype, str] = {}

    def encode(self, result: Any) -> bytes:
        """One ``ok`` result (a :class:`~autoglm.streams.events.Result` with ``pipeline`` set).

        Raises:
            TensorError: an output's dtype is not a wire dtype.
        """
        doc: dict[str, Any] = {
            "id": result.id, "model": result.model, "queue_ms": round(result.queue_ms, 3),
            "inference_ms": round(result.inference_ms, 3), "end_to_end_ms": round(result.end_to_end_ms, 3),
            "attributes": result.attributes, "steps": result.steps,
        }
        if result.outputs is not None:
            doc["outputs"] = {name: self._tensor(array) for name, array in result.outputs.items()}
        if result.skipped:
            doc["skipped"] = result.skipped
        return self._prefix + orjson.dumps(doc)[1:]

    def _tensor(self, array: np.ndarray) -> dict[str, Any]:
        dtype = array.dtype
        name = self._names.get(dtype)
        if name is None:
            name = dtype.name
            if name not in SUPPORTED_DTYPES:
                raise TensorError("outputs.dtype", f"one of {sorted(SUPPORTED_DTYPES)}", preview(name))
            self._names[dtype] = name
        if dtype.byteorder == ">":
            array = array.astype(dtype.newbyteorder("<"))
        return {"dtype": name, "shape": array.shape, "data": base64.b64encode(array.tobytes()).decode("ascii")}
