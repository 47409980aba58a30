"""A model repository entry: the ``model.yaml`` schema and its parser.

A repository is a folder of model folders, ``DIR/<name>/model.yaml``
(Triton's model repository layout; the import-string factory is MLServer's
``implementation``)::

    format: torchscript            # torchscript | onnx | python | exported (a torch.export archive)
    file: model.pt                 # relative to the model folder (torchscript, onnx, exported)
    # factory: "mypkg.mymod:make"  # python: called as make(spec) -> InferenceModel
    description: "what it does"
    inputs:                        # per-row signature, in the model's argument order
      - {name: x, dtype: float32, shape: [64]}       # -1 marks a variable axis
    #   - {name: text, text: true}                   # a text model
    outputs:                       # checked at warm-up against what the model returns
      - {name: logits, dtype: float32, shape: [10]}
    max_rows: 256                  # most rows one task may carry
    batching: {latency_target_s: 0.1, max_batch_size: 64, max_wait_s: 0.01, mode: adaptive}
    device: auto                   # auto | cpu | cuda | cuda:N
    fallback: other-model          # serves this model's tasks while it fails
    warmup: {rows: 2}              # or {inputs: {x: [[...]]}}; generated from the signature by default

Every problem raises :class:`~autoglm.processors.errors.ModelSpecError` naming the file,
the key and the expected value; unknown keys are refused (a typo is never
silently ignored). Parsing is pure: no torch, no import of the factory (see
:mod:`autoglm.models.repository` for the checks that touch files and code).

Nothing here imports Kafka or torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from autoglm.processors.errors import ModelSpecError

SPEC_FILE = "model.yaml"
FORMATS = ("torchscript", "onnx", "python", "exported")
#: dtypes a model may take or return: the wire's (``autoglm.streams.codec.SUPPORTED_DTYPES``).
DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")
#: names an output may not have: an object with them would read as one tensor on the wire.
RESERVED_NAMES = ("dtype", "shape", "data")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
NAME_RE = re.compile(r"^[a-zA-Z0-9._-]{1,200}$")
FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
#: ``max_rows`` when a spec gives none (the ``digits`` model's limit, the larger of the built-ins').
DEFAULT_MAX_ROWS = 256
MAX_NDIM = 7  # a wire tensor has at most 8 dimensions, one of which is the row axis

_TOP_KEYS = ("format", "file", "factory", "description", "inputs", "outputs", "max_rows", "batching",
             "device", "fallback", "warmup")
_TENSOR_KEYS = ("name", "dtype", "shape", "text")
_BATCHING_KEYS = {"latency_target_s": (1e-6, 3600.0), "max_batch_size": (1, 65_536), "max_wait_s": (0.0, 60.0)}
_MODES = ("adaptive", "fixed")
_WARMUP_KEYS = ("rows", "inputs")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One named input or output, per row.

    Attributes:
        name: the argument / output name (ONNX graph names for ``onnx``).
        dtype: numpy dtype name, one of :data:`DTYPES`; ``"str"`` for text.
        shape: shape of one row (axis 0, the rows, excluded); ``-1`` marks a
            variable axis. ``()`` is a scalar per row.
        text: a text input (a list of strings, one per row); dtype and shape unused.
    """

    name: str
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    text: bool = False

    def describe(self) -> str:
        """``name: dtype (B, d1, ...)`` with ``?`` for variable axes, or ``name: text``."""
        if self.text:
            return f"{self.name}: text"
        dims = ", ".join("?" if d < 0 else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype} (B{', ' if dims else ''}{dims})"

    def matches(self, shape: tuple[int, ...]) -> bool:
        """Whether a per-row ``shape`` fits this spec (``-1`` axes take any size)."""
        return len(shape) == len(self.shape) and all(d < 0 or d == s for d, s in zip(self.shape, shape))


@dataclass(frozen=True, slots=True)
class BatchingSpec:
    """Batching defaults of one model; ``None`` keeps the worker's setting of the same name."""

    latency_target_s: float | None = None
    max_batch_size: int | None = None
    max_wait_s: float | None = None
    mode: str | None = None

    def as_params(self) -> dict[str, Any]:
        """The set values, as ``ctl configure`` parameters."""
        return {k: getattr(self, k) for k in ("latency_target_s", "max_batch_size", "max_wait_s", "mode")
                if getattr(self, k) is not None}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One parsed ``model.yaml``.

    Attributes:
        name: the model's name (its folder's name), as tasks spell it.
        format: one of :data:`FORMATS`.
        source: the ``model.yaml`` path (or ``builtin:<name>``), for messages.
        folder: the model folder, or ``None`` for built-ins.
        file: the model file resolved against ``folder``, or ``None``.
        factory: ``"package.module:callable"`` for ``python``, else ``None``.
        inputs, outputs: per-row signatures, in order.
        max_rows: most rows one task may carry.
        batching, device, fallback: see the module docstring.
        warmup_rows: rows of the generated warm-up input.
        warmup_inputs: an explicit warm-up input per input name (nested lists
            or texts), or ``None`` to generate it.
    """

    name: str
    format: str
    source: str
    folder: Path | None = None
    file: Path | None = None
    factory: str | None = None
    description: str = ""
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    max_rows: int = DEFAULT_MAX_ROWS
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    device: str = "auto"
    fallback: str | None = None
    warmup_rows: int = 1
    warmup_inputs: Mapping[str, Any] | None = None

    @property
    def text(self) -> bool:
        """Whether the model takes texts (its only input is ``text: true``)."""
        return len(self.inputs) == 1 and self.inputs[0].text

    def describe_inputs(self) -> str:
        """The inputs, e.g. ``x: float32 (B, 64)``; several joined by ``; ``."""
        return "; ".join(t.describe() for t in self.inputs)

    def describe_outputs(self) -> str:
        """The outputs, e.g. ``logits: float32 (B, 10)``; several joined by ``; ``."""
        return "; ".join(t.describe() for t in self.outputs)

    def error(self, key: str, expected: str, actual: Any) -> ModelSpecError:
        """A :class:`ModelSpecError` about ``key`` of this spec's file."""
        return ModelSpecError(self.source, key, expected, actual)


def parse_spec(doc: Any, *, name: str, source: str, folder: Path | None = None) -> ModelSpec:
    """Check and convert one parsed ``model.yaml`` document.

    Args:
        doc: the YAML document (a mapping).
        name: the model's name (its folder's name).
        source: the file, for messages.
        folder: the model folder; ``file`` is resolved against it.

    Returns:
        The spec. The model file's existence and the factory's import are
        checked by :func:`autoglm.models.repository.check_spec`, not here.

    Raises:
        ModelSpecError: a key is unknown, missing, of the wrong type or out of
            range; the message names ``source``, the key and the expected value.
    """
    def fail(key: str, expected: str, actual: Any) -> ModelSpecError:
        return ModelSpecError(source, key, expected, actual)

    if not NAME_RE.match(name):
        raise fail("", "a model folder named with [a-zA-Z0-9._-] (it becomes a Kafka topic name)", name)
    if not isinstance(doc, Mapping):
        raise fail("", "a YAML mapping of the keys " + ", ".join(_TOP_KEYS), type(doc).__name__)
    _no_unknown_keys(doc, _TOP_KEYS, "", fail)
    fmt = doc.get("format")
    if fmt not in FORMATS:
        raise fail("format", f"one of {list(FORMATS)}", "missing" if fmt is None else fmt)
    file = _file(doc, fmt, folder, fail)
    factory = doc.get("factory")
    if fmt == "python":
        if not isinstance(factory, str) or not FACTORY_RE.match(factory):
            raise fail("factory", "an import string 'package.module:callable'", "missing" if factory is None else factory)
    elif factory is not None:
        raise fail("factory", f"no factory for format {fmt!r} (only format 'python' has one)", factory)
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise fail("description", "a string", description)
    inputs = _tensors(doc.get("inputs"), "inputs", fail, allow_text=True)
    if any(t.text for t in inputs) and len(inputs) > 1:
        raise fail("inputs", "a single input when it is 'text: true'", f"{len(inputs)} inputs")
    outputs = _tensors(doc.get("outputs"), "outputs", fail, allow_text=False)
    max_rows = doc.get("max_rows", DEFAULT_MAX_ROWS)
    if not _is_int(max_rows) or not 1 <= max_rows <= 1_000_000:
        raise fail("max_rows", "an integer between 1 and 1000000", max_rows)
    device = doc.get("device", "auto")
    if not isinstance(device, str) or not DEVICE_RE.match(device):
        raise fail("device", "'auto', 'cpu', 'cuda' or 'cuda:N'", device)
    fallback = doc.get("fallback")
    if fallback is not None and (not isinstance(fallback, str) or not NAME_RE.match(fallback) or fallback == name):
        raise fail("fallback", "the name of another model", fallback)
    rows, warm_inputs = _warmup(doc.get("warmup"), inputs, max_rows, fail)
    return ModelSpec(
        name=name, format=fmt, source=source, folder=folder, file=file,
        factory=factory if fmt == "python" else None, description=description,
        inputs=inputs, outputs=outputs, max_rows=max_rows, batching=_batching(doc.get("batching"), fail),
        device=device, fallback=fallback, warmup_rows=rows, warmup_inputs=warm_inputs,
    )


def read_spec(path: Path) -> ModelSpec:
    """Read and parse ``DIR/<name>/model.yaml`` (YAML, safe loader).

    Raises:
        ModelSpecError: unreadable file, invalid YAML, or any :func:`parse_spec` error.
    """
    import yaml

    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelSpecError(str(path), "", "a readable UTF-8 YAML file", repr(exc)) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelSpecError(str(path), "", "valid YAML", str(exc).replace("\n", " ")) from None
    return parse_spec(doc, name=path.parent.name, source=str(path), folder=path.parent)


# -- parts -------------------------------------------------------------------------


def _no_unknown_keys(doc: Mapping[str, Any], known: tuple[str, ...], where: str, fail) -> None:
    for key in doc:
        if key not in known:
            full = f"{where}.{key}" if where else str(key)
            raise fail(full, f"a known key ({', '.join(known)})", f"unknown key {key!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _file(doc: Mapping[str, Any], fmt: str, folder: Path | None, fail) -> Path | None:
    file = doc.get("file")
    if file is None:
        if fmt in ("torchscript", "onnx", "exported"):
            raise fail("file", f"the {fmt} file's path, relative to the model folder", "missing")
        return None
    if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
        raise fail("file", "a relative path inside the model folder", file)
    return (folder / file) if folder is not None else Path(file)


def _tensors(value: Any, key: str, fail, *, allow_text: bool) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list) or not value:
        raise fail(key, "a non-empty list of {name, dtype, shape}" + (" or {name, text: true}" if allow_text else ""),
                   "missing" if value is None else value)
    specs: list[TensorSpec] = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, Mapping):
            raise fail(where, "a mapping {name, dtype, shape}", item)
        _no_unknown_keys(item, _TENSOR_KEYS, where, fail)
        name = item.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise fail(f"{where}.name", "a name of [a-zA-Z0-9._-]", "missing" if name is None else name)
        if not allow_text and name in RESERVED_NAMES:
            raise fail(f"{where}.name", f"a name other than {', '.join(RESERVED_NAMES)}", name)
        if name in {s.name for s in specs}:
            raise fail(f"{where}.name", "a name not used by another entry", name)
        text = item.get("text", False)
        if not isinstance(text, bool) or (text and not allow_text):
            raise fail(f"{where}.text", "true or false (inputs only)" if allow_text else "no 'text' on an output", text)
        if text:
            if "dtype" in item or "shape" in item:
                raise fail(where, "no dtype or shape with 'text: true'", dict(item))
            specs.append(TensorSpec(name=name, dtype="str", shape=(), text=True))
            continue
        dtype = item.get("dtype")
        if dtype not in DTYPES:
            raise fail(f"{where}.dtype", f"one of {list(DTYPES)}", "missing" if dtype is None else dtype)
        shape = item.get("shape")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(_is_int(d) and (d >= 1 or d == -1) for d in shape)):
            raise fail(f"{where}.shape", f"the shape of one row: a list of at most {MAX_NDIM} sizes >= 1 or -1 "
                                         "(variable), [] for a scalar per row", "missing" if shape is None else shape)
        specs.append(TensorSpec(name=name, dtype=dtype, shape=tuple(shape)))
    return tuple(specs)


def _batching(value: Any, fail) -> BatchingSpec:
    if value is None:
        return BatchingSpec()
    if not isinstance(value, Mapping):
        raise fail("batching", "a mapping of latency_target_s, max_batch_size, max_wait_s, mode", value)
    _no_unknown_keys(value, (*_BATCHING_KEYS, "mode"), "batching", fail)
    out: dict[str, Any] = {}
    for key, (low, high) in _BATCHING_KEYS.items():
        if key not in value:
            continue
        v = value[key]
        integral = key == "max_batch_size"
        ok = _is_int(v) if integral else (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        if not ok or not low <= v <= high:
            kind = "an integer" if integral else "a number of seconds"
            raise fail(f"batching.{key}", f"{kind} between {low:g} and {high:g}", v)
        out[key] = v
    if "mode" in value:
        if value["mode"] not in _MODES:
            raise fail("batching.mode", f"one of {list(_MODES)}", value["mode"])
        out["mode"] = value["mode"]
    return BatchingSpec(**out)


def _warmup(value: Any, inputs: tuple[TensorSpec, ...], max_rows: int, fail) -> tuple[int, Mapping[str, Any] | None]:
    if value is None:
        return 1, None
    if not isinstance(value, Mapping):
        raise fail("warmup", "a mapping {rows: N} or {inputs: {name: value}}", value)
    _no_unknown_keys(value, _WARMUP_KEYS, "warmup", fail)
    rows = value.get("rows", 1)
    if not _is_int(rows) or not 1 <= rows <= max_rows:
        raise fail("warmup.rows", f"an integer between 1 and max_rows ({max_rows})", rows)
    given = value.get("inputs")
    if given is None:
        return rows, None
    names = [t.name for t in inputs]
    if not isinstance(given, Mapping) or sorted(given) != sorted(names):
        raise fail("warmup.inputs", f"a mapping with exactly the inputs {names}", given)
    for spec in inputs:
        v = given[spec.name]
        if spec.text and not (isinstance(v, list) and v and all(isinstance(t, str) for t in v)):
            raise fail(f"warmup.inputs.{spec.name}", "a non-empty list of texts", v)
        if not spec.text and not isinstance(v, list):
            raise fail(f"warmup.inputs.{spec.name}", f"a nested list of rows of {spec.describe()}", v)
    return rows, dict(given)
