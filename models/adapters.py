"""Models described by a ``model.yaml``: the base that reads the signature (format adapters: ``formats``).

:class:`RepositoryModel` implements :class:`~autoglm.models.base.InferenceModel`
from a :class:`~autoglm.models.spec.ModelSpec`: ``prepare`` checks a task
against the declared inputs (dtype, per-row shape, ``max_rows``), ``collate``
concatenates rows per input, ``forward`` names the outputs, and ``load`` ends
with a warm-up whose outputs are checked against the declared ``outputs``. A
format adapter (:mod:`autoglm.models.formats`) adds only
:meth:`RepositoryModel.load_weights` and :meth:`RepositoryModel.predict`:

- ``TorchScriptModel``: ``torch.jit.load``; inputs passed positionally in
  the declared order; a tensor, a tuple/list or a dict of tensors comes back.
- ``OnnxModel``: an onnxruntime ``InferenceSession``; inputs and outputs
  by their graph names.
- ``ExportedModel``: a ``torch.export`` archive (``torch.export.save``),
  run as ``torch.export.load(file).module()`` with inputs in the declared order.
- ``python``: the factory's own model (``make(spec) -> InferenceModel``);
  one that is not a :class:`RepositoryModel` is wrapped in :class:`CheckedModel`
  so its warm-up is checked the same way.

Nothing here imports Kafka.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from autoglm.processors.errors import InputSignatureError, ModelLoadError, ModelSpecError
from autoglm.models.base import InferenceModel, Outputs, Signature
from autoglm.models.outputs import output_problems
from autoglm.models.spec import ModelSpec, TensorSpec

logger = logging.getLogger(__name__)


def signature_of(spec: ModelSpec) -> Signature:
    """The :class:`Signature` a spec declares (``output_dim``: elements per row of the first output, -1 if variable)."""
    first = spec.outputs[0]
    dim = -1 if any(d < 0 for d in first.shape) else int(np.prod(first.shape, dtype=np.int64))
    return Signature(
        input_kind="text" if spec.text else "tensor",
        input=spec.describe_inputs() + f"; at most {spec.max_rows} rows per task",
        output=spec.describe_outputs(),
        output_dim=dim,
        outputs=spec.outputs,
    )


def warmup_inputs(spec: ModelSpec) -> Any:
    """A task's inputs for the warm-up: ``warmup.inputs`` of the spec, or generated from the signature.

    Generated: ``warmup.rows`` rows (default 1); floats uniform in [0, 1)
    (seed 0), integers and bools zero, variable axes of size 1, texts
    ``"warm-up"``.

    Returns:
        ``list[str]`` for a text model, one array for a single input, else
        ``{name: array}``.
    """
    if spec.warmup_inputs is not None:
        given = spec.warmup_inputs
        if spec.text:
            return list(given[spec.inputs[0].name])
        arrays = {t.name: np.asarray(given[t.name], dtype=t.dtype) for t in spec.inputs}
        return arrays[spec.inputs[0].name] if len(arrays) == 1 else arrays
    rows = spec.warmup_rows
    if spec.text:
        return ["warm-up"] * rows
    rng = np.random.default_rng(0)
    arrays = {}
    for t in spec.inputs:
        shape = (rows, *(1 if d < 0 else d for d in t.shape))
        dtype = np.dtype(t.dtype)
        arrays[t.name] = rng.random(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype=dtype)
    return arrays[spec.inputs[0].name] if len(arrays) == 1 else arrays


def warm_up(model: InferenceModel, spec: ModelSpec) -> Outputs:
    """Run the warm-up input through ``model`` (prepare, collate, forward) and check it against ``spec.outputs``.

    Returns:
        The warm-up's outputs.

    Raises:
        ModelSpecError: the outputs contradict ``model.yaml`` (the key names
            the output, e.g. ``outputs[0].shape``, expected vs actual), or the
            warm-up input does not fit the model (key ``inputs``).
    """
    import torch

    inputs = warmup_inputs(spec)
    try:
        prepared = model.prepare(inputs)
    except InputSignatureError as exc:
        raise spec.error("warmup" if spec.warmup_inputs is not None else "inputs",
                         "inputs the model accepts", str(exc)) from None
    rows = model.rows(prepared)
    try:
        with torch.inference_mode():
            out = model.forward(model.collate([prepared]))
    except ModelSpecError:
        raise
    except Exception as exc:
        key = "warmup" if spec.warmup_inputs is not None else "inputs"
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        last = lines[-1][:300] if lines else ""  # a TorchScript error ends with the reason
        raise ModelLoadError(
            f"model {spec.name!r} ({spec.source}): key {key!r}: the warm-up forward on the declared "
            f"{key} failed (check their dtype and shape against the model): {type(exc).__name__}: {last}") from exc
    problems = output_problems(spec.outputs, out, rows)
    if problems:
        key, expected, actual = problems[0]
        raise spec.error(key, f"{expected} (declared; the warm-up of {rows} rows returned otherwise)", actual)
    return out


class RepositoryModel(InferenceModel):
    """A model whose inputs, outputs and limits come from its ``model.yaml``.

    Subclass it (a ``python`` factory may return one) and implement
    :meth:`load_weights` and :meth:`predict`; the rest is done here.

    Args:
        spec: the parsed ``model.yaml``.

    Attributes:
        spec: the spec.
        warmup_outputs: the outputs of the warm-up at :meth:`load`.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.name = spec.name
        self.signature = signature_of(spec)
        self.warmup_outputs: Outputs | None = None

    # -- to implement ---------------------------------------------------------------

    def load_weights(self, device: str) -> None:
        """Load the model onto ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``).

        Raises:
            ModelLoadError: the file is missing or unusable.
        """
        raise NotImplementedError

    def predict(self, batch: Any) -> Any:
        """The model's raw forward on collated inputs.

        Args:
            batch: ``list[str]`` of ``B`` texts for a text model, else
                ``{name: array (B, *row)}`` in the declared dtypes and order.

        Returns:
            One array or tensor (single output), a tuple/list in the declared
            output order, or ``{name: array or tensor}``; rows along axis 0.
        """
        raise NotImplementedError

    # -- InferenceModel -------------------------------------------------------------

    def load(self, device: str) -> None:
        """:meth:`load_weights`, then the warm-up checked against ``outputs`` (see :func:`warm_up`).

        Raises:
            ModelLoadError: the weights could not be loaded or the warm-up raised.
            ModelSpecError: the warm-up's outputs contradict ``model.yaml``.
        """
        self.load_weights(device)
        self.device = device
        self.warmup_outputs = warm_up(self, self.spec)

    def prepare(self, inputs: Any) -> Any:
        """Check one task's inputs against the declared signature and put them in row form.

        Args:
            inputs: for a text model a non-empty ``list[str]``; for one input an
                array ``(n, *row)`` or one row ``row`` (or ``{name: array}``);
                for several inputs ``{name: array}`` with the same ``n``.
                Floats are cast to a float dtype; integral values to an
                integer dtype (nested JSON lists decode as float32).

        Returns:
            ``list[str]``, or ``{name: array (n, *row)}`` C-contiguous in the declared dtypes.

        Raises:
            InputSignatureError: kind, names, dtype, shape, or more than
                ``max_rows`` rows (``expected``/``actual`` name them).
        """
        spec = self.spec
        if spec.text:
            return self._prepare_texts(inputs)
        if isinstance(inputs, np.ndarray) and len(spec.inputs) == 1:
            inputs = {spec.inputs[0].name: inputs}
        names = [t.name for t in spec.inputs]
        if not isinstance(inputs, Mapping) or sorted(inputs) != sorted(names):
            raise InputSignatureError(f"named inputs {names} ({spec.describe_inputs()})", _describe(inputs),
                                      model=self.name)
        out: dict[str, np.ndarray] = {}
        rows: int | None = None
        for t in spec.inputs:
            array, n = self._prepare_one(t, inputs[t.name])
            if rows is not None and n != rows:
                raise InputSignatureError("the same number of rows in every input", f"{rows} and {n} rows",
                                          model=self.name)
            rows = n
            out[t.name] = array
        if rows is not None and rows > spec.max_rows:
            raise InputSignatureError(f"at most {spec.max_rows} rows per task (max_rows in {spec.source})",
                                      f"{rows} rows", model=self.name)
        return out

    def _prepare_texts(self, inputs: Any) -> list[str]:
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            raise InputSignatureError("text or a non-empty list of texts", _describe(inputs), model=self.name)
        if len(inputs) > self.spec.max_rows:
            raise InputSignatureError(f"at most {self.spec.max_rows} texts per task (max_rows in {self.spec.source})",
                                      f"{len(inputs)} texts", model=self.name)
        return list(inputs)

    def _prepare_one(self, t: TensorSpec, value: Any) -> tuple[np.ndarray, int]:
        expected = t.describe()
        if not isinstance(value, np.ndarray):
            raise InputSignatureError(expected, _describe(value), model=self.name)
        actual = f"{t.name}: {value.dtype} {tuple(value.shape)}"
        if value.ndim == len(t.shape) and t.matches(tuple(value.shape)):
            value = value.reshape(1, *value.shape)
        elif not (value.ndim == len(t.shape) + 1 and value.shape[0] >= 1 and t.matches(tuple(value.shape[1:]))):
            raise InputSignatureError(expected, actual, model=self.name)
        return _cast(value, np.dtype(t.dtype), expected, actual, self.name), value.shape[0]

    def rows(self, prepared: Any) -> int:  # type: ignore[override]
        """Rows of one prepared task: texts, or axis 0 of its first input."""
        if isinstance(prepared, list):
            return len(prepared)
        return next(iter(prepared.values())).shape[0]

    def collate(self, items: Sequence[Any]) -> Any:
        """Join prepared tasks: texts concatenated, or each input concatenated along axis 0.

        Raises:
            ValueError: tasks whose variable axes differ cannot share a batch
                (the runner then splits the batch until they are apart).
        """
        if self.spec.text:
            return [text for item in items for text in item]
        out = {}
        for t in self.spec.inputs:
            parts = [item[t.name] for item in items]
            shapes = {p.shape[1:] for p in parts}
            if len(shapes) > 1:
                raise ValueError(f"input {t.name!r}: tasks with different per-row shapes {sorted(shapes)} "
                                 "cannot share a batch")
            out[t.name] = np.concatenate(parts, axis=0)
        return out

    def forward(self, batch: Any) -> Outputs:
        """:meth:`predict`, its outputs named and turned into numpy arrays on the CPU.

        Returns:
            One array for a single-output model, else ``{name: array}``.
        """
        raw = self.predict(batch)
        names = [o.name for o in self.spec.outputs]
        if isinstance(raw, Mapping):
            named = {str(k): _to_numpy(v) for k, v in raw.items()}
        elif isinstance(raw, (tuple, list)):
            if len(raw) != len(names):
                raise ValueError(f"the model returned {len(raw)} outputs, model.yaml declares {len(names)}: {names}")
            named = {name: _to_numpy(v) for name, v in zip(names, raw)}
        else:
            named = {names[0]: _to_numpy(raw)}
        if len(names) == 1 and list(named) == names:
            return named[names[0]]
        return named


def _cast(value: np.ndarray, dtype: np.dtype, expected: str, actual: str, model: str) -> np.ndarray:
    if value.dtype == dtype:
        return np.ascontiguousarray(value)
    kind, want = value.dtype.kind, dtype.kind
    if want == "f" and kind == "f":
        return np.ascontiguousarray(value, dtype=dtype)
    if want in "iu" and kind in "iuf":
        info = np.iinfo(dtype)
        if kind == "f" and value.size and not np.all(np.isfinite(value)):
            raise InputSignatureError(expected, actual, model=model)
        if kind == "f" and value.size and not np.array_equal(value, np.floor(value)):
            raise InputSignatureError(f"{expected} (integral values)", f"{actual} with fractions", model=model)
        if value.size and (value.min() < info.min or value.max() > info.max):
            raise InputSignatureError(f"{expected} (values in [{info.min}, {info.max}])", actual, model=model)
        return np.ascontiguousarray(value, dtype=dtype)
    raise InputSignatureError(expected, actual, model=model)


def _to_numpy(value: Any) -> Any:
    """A torch tensor as a CPU numpy array; anything else unchanged (the output check names it)."""
    detach = getattr(type(value), "detach", None)
    if detach is not None and hasattr(value, "cpu"):
        return value.detach().cpu().numpy()
    return value


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return "an object with " + (", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items()) or "no inputs")
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return type(value).__name__


class CheckedModel(InferenceModel):
    """A ``python`` factory's own :class:`InferenceModel`, with the spec's name, outputs and warm-up check.

    Every call is delegated to the wrapped model; :meth:`load` adds the
    warm-up checked against ``outputs`` (:func:`warm_up`). Other attributes
    of the wrapped model are reachable as :attr:`inner`.
    """

    def __init__(self, spec: ModelSpec, inner: InferenceModel):
        self.spec = spec
        self.inner = inner
        self.name = spec.name
        self.signature = dataclasses.replace(inner.signature, outputs=spec.outputs)
        self.warmup_outputs: Outputs | None = None

    def load(self, device: str) -> None:
        """The wrapped model's ``load``, then the checked warm-up."""
        self.inner.load(device)
        self.device = device
        self.warmup_outputs = warm_up(self, self.spec)

    def prepare(self, inputs: Any) -> Any:
        """The wrapped model's ``prepare``."""
        return self.inner.prepare(inputs)

    def rows(self, prepared: Any) -> int:  # type: ignore[override]
        """The wrapped model's ``rows``."""
        return self.inner.rows(prepared)

    def collate(self, items: Sequence[Any]) -> Any:
        """The wrapped model's ``collate``."""
        return self.inner.collate(items)

    def forward(self, batch: Any) -> Outputs:
        """The wrapped model's ``forward``."""
        return self.inner.forward(batch)
