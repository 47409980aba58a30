"""Wire codec: JSON with orjson, tensors as ``{dtype, shape, data}``.

A tensor on the wire (contract v1, see ARCHITECTURE.md) is::

    {"dtype": "float32", "shape": [2, 64], "data": "<base64>"}

where ``data`` is the standard base64 (RFC 4648, with padding) of the
little-endian, C-order bytes of the array. On input a plain nested JSON list
of numbers is accepted too and decodes as float32. Non-finite values (NaN,
+/-inf) are rejected on input and never emitted.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
import reprlib
from typing import Any

import numpy as np
import orjson

from autoglm.processors.errors import EventDecodeError, TensorError

#: dtypes that may appear on the wire; names are numpy's.
SUPPORTED_DTYPES: frozenset[str] = frozenset(
    {"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"}
)
#: A tensor may have at most this many dimensions (numpy's own limit is 64).
MAX_NDIM = 8
#: Largest finite float32 value; a nested-list number beyond it would become inf.
_FLOAT32_MAX = float(np.finfo(np.float32).max)

# Error messages show what arrived, bounded in depth and length: a plain repr()
# of a value nested ~1,000 deep (orjson accepts 1,024 levels) raises RecursionError.
_PREVIEW = reprlib.Repr()
_PREVIEW.maxlevel = 3
_PREVIEW.maxlist = _PREVIEW.maxdict = 6
_PREVIEW.maxstring = _PREVIEW.maxother = 60
_PREVIEW.maxlong = 40


def preview(value: Any, *, limit: int = 60) -> Any:
    """What an error message may show of a decoded JSON value.

    Returns ``value`` itself when its ``repr`` is safe and short: ``None``, a
    bool, a float, an int of fewer than ``limit`` digits, a string of at most
    ``limit`` characters, or a list / object of at most 16 such values nested
    at most 3 deep. Otherwise a ``str`` of at most ``limit`` characters from
    :mod:`reprlib`, nesting cut at 3 levels: never a deep recursion, whatever
    the value.
    """
    if _small(value, limit):
        return value
    text = _PREVIEW.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _small(value: Any, limit: int) -> bool:
    stack, seen = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > 16 or depth > 3:
            return False
        if isinstance(item, list):
            stack.extend((v, depth + 1) for v in item[:17])
        elif isinstance(item, dict):
            stack.extend((v, depth + 1) for kv in itertools.islice(item.items(), 17) for v in kv)
        elif isinstance(item, str):
            if len(item) > limit:
                return False
        elif isinstance(item, int) and not isinstance(item, bool):
            if abs(item) >= 10**limit:
                return False
        elif not (item is None or isinstance(item, (bool, float))):
            return False
    return True


def loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """Parse one JSON document.

    Raises:
        EventDecodeError: the bytes are not valid UTF-8 JSON (orjson follows
            RFC 8259 strictly: ``NaN`` and ``Infinity`` literals are invalid).
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventDecodeError(f"not valid UTF-8 JSON: {exc}") from None


def dumps(obj: Any) -> bytes:
    """Serialize ``obj`` to compact UTF-8 JSON bytes (orjson; numpy scalars allowed)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_tensor(array: np.ndarray, *, field: str = "outputs") -> dict[str, Any]:
    """Encode an array as a wire tensor.

    Args:
        array: any shape (0-d and empty included), any dtype in
            ``SUPPORTED_DTYPES``; need not be contiguous.
        field: the field path errors name (``inputs`` for a task's).

    Returns:
        ``{"dtype": str, "shape": list[int], "data": str}`` with base64 of the
        little-endian C-order bytes.

    Raises:
        TensorError: unsupported dtype, or non-finite values in a float array.
    """
    arr = np.asarray(array)
    name = arr.dtype.name
    if name not in SUPPORTED_DTYPES:
        raise TensorError(f"{field}.dtype", f"one of {sorted(SUPPORTED_DTYPES)}", preview(name))
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        raise TensorError(f"{field}.data", "finite numbers", "NaN or inf")
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return {
        "dtype": name,
        "shape": list(arr.shape),
        "data": base64.b64encode(little.tobytes(order="C")).decode("ascii"),
    }


#: dtype name -> (wire dtype, little-endian; native dtype)
_WIRE_DTYPES: dict[str, tuple[np.dtype, np.dtype]] = {
    name: (np.dtype(name).newbyteorder("<"), np.dtype(name)) for name in SUPPORTED_DTYPES
}
_LITTLE = np.little_endian


def decode_tensor(obj: Any, *, field: str = "inputs", check_finite: bool = True) -> np.ndarray:
    """Decode a wire tensor or a nested list of numbers.

    Args:
        obj: ``{"dtype", "shape", "data"}`` or a nested list (rectangular) of
            JSON numbers; a list decodes as float32.
        field: the field path used in error messages.

    Returns:
        A numpy array in native byte order, C-contiguous, with the given
        dtype and shape.

    Raises:
        TensorError: unknown dtype, bad shape, base64 that is invalid or whose
            length disagrees with dtype and shape, ragged or non-numeric
            lists, or non-finite values (base64 tensors only with
            ``check_finite``: the worker checks a whole micro-batch at once;
            nested lists are always checked, in float64).
    """
    if isinstance(obj, list):
        return _decode_nested_list(obj, field)
    if not isinstance(obj, dict):
        raise TensorError(field, "a tensor object {dtype, shape, data} or a nested list", type(obj).__name__)
    dtype_name = obj.get("dtype")
    dtypes = _WIRE_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None  # a list is unhashable
    if dtypes is None:
        raise TensorError(f"{field}.dtype", f"one of {sorted(SUPPORTED_DTYPES)}", preview(dtype_name))
    shape = obj.get("shape")
    if type(shape) is not list or len(shape) > MAX_NDIM or not _dims_ok(shape):
        raise TensorError(f"{field}.shape", f"a list of at most {MAX_NDIM} non-negative ints", preview(shape))
    data = obj.get("data")
    if not isinstance(data, str):
        raise TensorError(f"{field}.data", "a base64 string", type(data).__name__)
    try:
        raw = binascii.a2b_base64(data, strict_mode=True)  # base64.b64decode(validate=True), one call less
    except (binascii.Error, ValueError):
        raise TensorError(f"{field}.data", "valid base64 (RFC 4648)", preview(data)) from None
    dtype, native = dtypes
    expected_bytes = math.prod(shape) * dtype.itemsize
    if len(raw) != expected_bytes:
        raise TensorError(
            f"{field}.data",
            f"{expected_bytes} bytes for {dtype_name} {tuple(shape)}",
            f"{len(raw)} bytes",
        )
    try:
        if _LITTLE:  # the wire's byte order: a writable array over a copy of the bytes, no conversion
            arr = np.frombuffer(bytearray(raw), dtype=native).reshape(shape)
        else:
            arr = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(native)
    except ValueError:  # e.g. an empty shape with an absurd dimension
        raise TensorError(f"{field}.shape", "a shape numpy can hold", preview(shape)) from None
    if check_finite:
        _check_finite(arr, field)
    return arr


def _dims_ok(shape: list) -> bool:
    for d in shape:
        if type(d) is not int or d < 0:  # type(): a bool is no dimension
            return False
    return True


def _decode_nested_list(obj: list, field: str) -> np.ndarray:
    # np.array converts bools and numeric strings silently; the contract says numbers.
    if not _all_numbers(obj):
        raise TensorError(field, "a rectangular nested list of numbers", preview(obj))
    try:  # float64 first: a number beyond float32's range is refused, not turned into inf
        wide = np.array(obj, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise TensorError(field, "a rectangular nested list of numbers", preview(obj)) from None
    if wide.ndim > MAX_NDIM:
        raise TensorError(field, f"at most {MAX_NDIM} dimensions", wide.ndim)
    _check_finite(wide, field)
    if wide.size and np.abs(wide).max() > _FLOAT32_MAX:
        raise TensorError(f"{field}.data", "finite numbers", f"{np.abs(wide).max():.4g}, beyond float32's range")
    return wide.astype(np.float32)


def _all_numbers(obj: Any) -> bool:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            return False
    return True


def _check_finite(arr: np.ndarray, field: str) -> None:
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        raise TensorError(f"{field}.data", "finite numbers", "NaN or inf")
