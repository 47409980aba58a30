"""Model outputs beyond one float32 matrix: check them against a signature, split them per task.

A forward returns, for ``B`` rows in all:

- one array ``(B, *row_shape)`` (a single-output model), or
- an object of named arrays ``{name: (B, *row_shape_name)}`` (a multi-output
  model, e.g. ``{"logits": float32 (B, 10), "label": int64 (B,)}``).

Axis 0 is always the row axis. Pure functions (numpy only), table-tested in
``tests/unit/models/test_models_outputs.py``; the split follows MLServer's
``BatchedRequests`` split: once per batch, by the tasks' row counts.

Nothing here imports Kafka or torch.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import numpy as np

from autoglm.models.spec import TensorSpec

#: What a forward returns, and what each task gets: one array or named arrays.
Outputs = Union[np.ndarray, dict[str, np.ndarray]]


def _describe(array: Any) -> str:
    if isinstance(array, np.ndarray):
        return f"{array.dtype} {tuple(array.shape)}"
    return type(array).__name__


def _expected(spec: TensorSpec, total: int) -> str:
    dims = ", ".join("?" if d < 0 else str(d) for d in spec.shape)
    return f"{spec.dtype} ({total}{', ' if dims else ''}{dims})"


def output_problems(specs: Sequence[TensorSpec], out: Any, total: int) -> list[tuple[str, str, str]]:
    """What is wrong with a forward's ``out`` for ``total`` rows, against the declared ``specs``.

    Args:
        specs: the declared outputs, in order (``model.yaml``'s ``outputs``).
        out: what the forward returned: one numpy array for a single-output
            model, a ``dict[str, np.ndarray]`` for several outputs.
        total: rows the forward was given.

    Returns:
        ``(key, expected, actual)`` per problem, the key in ``model.yaml``
        terms (``outputs``, ``outputs[1].dtype``, ``outputs[0].shape``); empty
        when ``out`` fits.
    """
    if len(specs) == 1 and not isinstance(out, Mapping):
        arrays: Mapping[str, Any] = {specs[0].name: out}
    elif isinstance(out, Mapping):
        arrays = out
        names = [s.name for s in specs]
        if sorted(arrays) != sorted(names):
            return [("outputs", f"outputs named {names}", f"outputs named {sorted(map(str, arrays))}")]
    else:
        return [("outputs", f"an object of {len(specs)} named arrays", _describe(out))]
    problems = []
    for i, spec in enumerate(specs):
        array = arrays[spec.name]
        expected = _expected(spec, total)
        if not isinstance(array, np.ndarray):
            problems.append((f"outputs[{i}]", f"a numpy array {expected}", _describe(array)))
            continue
        if array.dtype.name != spec.dtype:
            problems.append((f"outputs[{i}].dtype", expected, _describe(array)))
        if array.ndim == 0 or array.shape[0] != total or not spec.matches(tuple(array.shape[1:])):
            problems.append((f"outputs[{i}].shape", expected, _describe(array)))
    return problems


def split_outputs(out: Outputs, counts: Sequence[int]) -> list[Outputs]:
    """Split a checked batch output per task, by row counts, in order.

    Args:
        out: one array ``(sum(counts), ...)`` or named arrays of that many rows.
        counts: rows of each task, each >= 1.

    Returns:
        One entry per task: an array view ``(counts[i], ...)`` for a single
        output, a ``dict`` of such views for named outputs.
    """
    bounds = np.cumsum(counts)[:-1]
    if not isinstance(out, Mapping):
        return list(np.split(out, bounds, axis=0))
    parts = {name: np.split(array, bounds, axis=0) for name, array in out.items()}
    return [{name: parts[name][i] for name in out} for i in range(len(counts))]
