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
import math
from typing import Any

import numpy as np
import orjson

from autoglm.errors import EventDecodeError, TensorError

#: dtypes that may appear on the wire; names are numpy's.
SUPPORTED_DTYPES: frozenset[str] = frozenset(
    {"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"}
)
#: A tensor may have at most this many dimensions (numpy's own limit is 64).
MAX_NDIM = 8


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


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """Encode an array as a wire tensor.

    Args:
        array: any shape (0-d and empty included), any dtype in
            ``SUPPORTED_DTYPES``; need not be contiguous.

    Returns:
        ``{"dtype": str, "shape": list[int], "data": str}`` with base64 of the
        little-endian C-order bytes.

    Raises:
        TensorError: unsupported dtype, or non-finite values in a float array.
    """
    arr = np.asarray(array)
    name = arr.dtype.name
    if name not in SUPPORTED_DTYPES:
        raise TensorError("outputs.dtype", f"one of {sorted(SUPPORTED_DTYPES)}", name)
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        raise TensorError("outputs.data", "finite numbers", "NaN or inf")
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return {
        "dtype": name,
        "shape": list(arr.shape),
        "data": base64.b64encode(little.tobytes(order="C")).decode("ascii"),
    }


def decode_tensor(obj: Any, *, field: str = "inputs") -> np.ndarray:
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
            lists, or non-finite values.
    """
    if isinstance(obj, list):
        return _decode_nested_list(obj, field)
    if not isinstance(obj, dict):
        raise TensorError(field, "a tensor object {dtype, shape, data} or a nested list", type(obj).__name__)
    dtype_name = obj.get("dtype")
    if dtype_name not in SUPPORTED_DTYPES:
        raise TensorError(f"{field}.dtype", f"one of {sorted(SUPPORTED_DTYPES)}", dtype_name)
    shape = obj.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise TensorError(f"{field}.shape", f"a list of at most {MAX_NDIM} non-negative ints", shape)
    data = obj.get("data")
    if not isinstance(data, str):
        raise TensorError(f"{field}.data", "a base64 string", type(data).__name__)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise TensorError(f"{field}.data", "valid base64 (RFC 4648)", data) from None
    dtype = np.dtype(dtype_name).newbyteorder("<")
    expected_bytes = math.prod(shape) * dtype.itemsize
    if len(raw) != expected_bytes:
        raise TensorError(
            f"{field}.data",
            f"{expected_bytes} bytes for {dtype_name} {tuple(shape)}",
            f"{len(raw)} bytes",
        )
    try:
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    except ValueError:  # e.g. an empty shape with an absurd dimension
        raise TensorError(f"{field}.shape", "a shape numpy can hold", shape) from None
    arr = arr.astype(dtype.newbyteorder("="), copy=True)
    _check_finite(arr, field)
    return arr


def _decode_nested_list(obj: list, field: str) -> np.ndarray:
    try:
        arr = np.array(obj, dtype=np.float32)
    except (ValueError, TypeError):
        raise TensorError(field, "a rectangular nested list of numbers", _preview(obj)) from None
    if arr.ndim > MAX_NDIM:
        raise TensorError(field, f"at most {MAX_NDIM} dimensions", arr.ndim)
    # np.array converts bools and numeric strings silently; the contract says numbers.
    if not _all_numbers(obj):
        raise TensorError(field, "a rectangular nested list of numbers", _preview(obj))
    _check_finite(arr, field)
    return arr


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


def _preview(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."
