"""Unit tests of the wire codec (streams/codec.py): tensors as {dtype, shape, data}.

The contract (ARCHITECTURE.md, "Event contracts"): ``data`` is the base64 of
the little-endian, C-order bytes; a nested JSON list decodes as float32;
non-finite numbers are rejected on input and never emitted.
"""

from __future__ import annotations

import base64
import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from autoglm.errors import EventDecodeError, TensorError
from autoglm.streams.codec import MAX_NDIM, SUPPORTED_DTYPES, decode_tensor, dumps, encode_tensor, loads

ROUND_TRIP_DTYPES = ["bool", "uint8", "int8", "int32", "int64", "float16", "float32", "float64"]
DTYPE_EXPECTED = f"one of {sorted(SUPPORTED_DTYPES)}"
SHAPE_EXPECTED = f"a list of at most {MAX_NDIM} non-negative ints"
LIST_EXPECTED = "a rectangular nested list of numbers"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def wire(dtype: str, shape: list, data: str) -> dict:
    return {"dtype": dtype, "shape": shape, "data": data}


# -- round trip ----------------------------------------------------------------


def _finite_arrays(dtype_name: str) -> st.SearchStrategy[np.ndarray]:
    dtype = np.dtype(dtype_name)
    elements = {"allow_nan": False, "allow_infinity": False} if dtype.kind == "f" else None
    return hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5), elements=elements)


def _views(draw: st.DrawFn, arr: np.ndarray) -> np.ndarray:
    """``arr`` itself or a non-contiguous view of it (stepped slice, reversal, transpose)."""
    kind = draw(st.sampled_from(["as_is", "transpose", "step", "reverse"]))
    if kind == "transpose" or arr.ndim == 0:
        return arr.T
    if kind == "step":
        axis = draw(st.integers(0, arr.ndim - 1))
        index = [slice(None)] * arr.ndim
        index[axis] = slice(None, None, draw(st.integers(2, 3)))
        return arr[tuple(index)]
    if kind == "reverse":
        return arr[::-1]
    return arr


@st.composite
def wire_arrays(draw: st.DrawFn) -> np.ndarray:
    arr = draw(st.sampled_from(ROUND_TRIP_DTYPES).flatmap(_finite_arrays))
    return _views(draw, arr)


@settings(max_examples=200, deadline=None)
@given(wire_arrays())
def test_decode_of_encode_is_exact(arr: np.ndarray) -> None:
    doc = encode_tensor(arr)
    # The tensor survives the JSON layer too (it is what goes on the wire).
    back = decode_tensor(loads(dumps(doc)))

    assert doc["dtype"] == arr.dtype.name
    assert doc["shape"] == list(arr.shape)
    assert back.dtype == arr.dtype
    assert back.shape == arr.shape
    assert back.flags.c_contiguous and back.dtype.isnative
    # bit-exact: -0.0 stays -0.0, every element in the same C-order position
    assert back.tobytes() == np.ascontiguousarray(arr).tobytes()
    assert np.array_equal(back, arr)


def test_non_contiguous_views_round_trip_in_logical_order() -> None:
    base = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    for view in (base.T, base[:, ::2, ::-1], base[1, :, ::2], np.asfortranarray(base)):
        assert not view.flags.c_contiguous
        back = decode_tensor(encode_tensor(view))
        assert back.shape == view.shape
        assert back.tolist() == view.tolist()


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 2, 5)])
def test_zero_d_and_empty_shapes(shape: tuple) -> None:
    arr = np.full(shape, 7, dtype=np.float32)
    doc = encode_tensor(arr)
    assert doc["shape"] == list(shape)
    assert doc["data"] == ("" if arr.size == 0 else b64(struct.pack("<f", 7.0)))
    back = decode_tensor(doc)
    assert back.shape == shape and back.dtype == np.float32
    assert back.tolist() == arr.tolist()


# -- the bytes on the wire ------------------------------------------------------


def test_base64_is_little_endian_float32() -> None:
    doc = encode_tensor(np.array([1.0, -2.0], dtype=np.float32))
    assert doc == {"dtype": "float32", "shape": [2], "data": b64(struct.pack("<2f", 1.0, -2.0))}


def test_base64_is_c_order_of_the_logical_array() -> None:
    arr = np.array([[1, 2], [3, 4]], dtype=np.int32).T  # logically [[1, 3], [2, 4]]
    doc = encode_tensor(arr)
    assert doc["shape"] == [2, 2]
    assert doc["data"] == b64(struct.pack("<4i", 1, 3, 2, 4))


def test_big_endian_input_is_emitted_little_endian() -> None:
    arr = np.array([1, 256, -2], dtype=">i4")
    doc = encode_tensor(arr)
    assert doc["dtype"] == "int32"
    assert doc["data"] == b64(struct.pack("<3i", 1, 256, -2))
    assert decode_tensor(doc).tolist() == [1, 256, -2]


def test_decode_reads_little_endian_by_hand() -> None:
    arr = decode_tensor(wire("int64", [2], b64(struct.pack("<2q", 1, -(2**40)))))
    assert arr.dtype == np.int64 and arr.tolist() == [1, -(2**40)]
    arr = decode_tensor(wire("float64", [1, 2], b64(struct.pack("<2d", 0.5, -3.25))))
    assert arr.shape == (1, 2) and arr.tolist() == [[0.5, -3.25]]
    arr = decode_tensor(wire("uint8", [3], b64(bytes([0, 127, 255]))))
    assert arr.tolist() == [0, 127, 255]


def test_max_ndim_is_accepted() -> None:
    shape = [1] * MAX_NDIM
    arr = decode_tensor(wire("int8", shape, b64(b"\x05")))
    assert arr.shape == tuple(shape) and arr.item() == 5


# -- nested lists ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shape"),
    [
        ([1, 2.5, -3], (3,)),
        ([[1, 2, 3], [4, 5, 6]], (2, 3)),
        ([[[0.25]], [[0.5]]], (2, 1, 1)),
        ([], (0,)),
        ([[], []], (2, 0)),
    ],
)
def test_nested_list_decodes_as_float32(value: list, shape: tuple) -> None:
    arr = decode_tensor(value)
    assert arr.dtype == np.float32
    assert arr.shape == shape
    assert arr.tolist() == np.array(value, dtype=np.float64).reshape(shape).tolist()


def test_nested_list_from_json() -> None:
    arr = decode_tensor(loads(b"[[1, 2], [3e2, -4.5]]"))
    assert arr.dtype == np.float32 and arr.tolist() == [[1.0, 2.0], [300.0, -4.5]]


def test_nan_literal_cannot_reach_a_nested_list() -> None:
    # Strict JSON (RFC 8259) has no NaN/Infinity literals: the bytes are rejected first.
    for raw in (b"[1.0, NaN]", b"[Infinity]", b"[-Infinity]"):
        with pytest.raises(EventDecodeError):
            loads(raw)


# -- rejections --------------------------------------------------------------------

NAN32 = struct.pack("<f", math.nan)
INF32 = struct.pack("<f", math.inf)

REJECTED = [
    # (id, obj, field, expected)
    ("unknown dtype", wire("complex64", [1], b64(b"\0" * 8)), "inputs.dtype", DTYPE_EXPECTED),
    ("numpy alias dtype", wire("f4", [1], b64(b"\0" * 4)), "inputs.dtype", DTYPE_EXPECTED),
    ("missing dtype", {"shape": [1], "data": b64(b"\0" * 4)}, "inputs.dtype", DTYPE_EXPECTED),
    ("negative dim", wire("float32", [-1], ""), "inputs.shape", SHAPE_EXPECTED),
    ("float dim", wire("float32", [2.0], b64(b"\0" * 8)), "inputs.shape", SHAPE_EXPECTED),
    ("string dim", wire("float32", ["2"], b64(b"\0" * 8)), "inputs.shape", SHAPE_EXPECTED),
    ("bool dim", wire("float32", [True], b64(b"\0" * 4)), "inputs.shape", SHAPE_EXPECTED),
    ("shape not a list", wire("float32", 2, b64(b"\0" * 8)), "inputs.shape", SHAPE_EXPECTED),
    ("missing shape", {"dtype": "float32", "data": ""}, "inputs.shape", SHAPE_EXPECTED),
    ("too many dims", wire("uint8", [1] * (MAX_NDIM + 1), b64(b"\0")), "inputs.shape", SHAPE_EXPECTED),
    ("data not a string", wire("uint8", [1], [0]), "inputs.data", "a base64 string"),
    ("missing data", {"dtype": "uint8", "shape": [1]}, "inputs.data", "a base64 string"),
    ("invalid base64 chars", wire("uint8", [3], "AB*D"), "inputs.data", "valid base64 (RFC 4648)"),
    ("bad base64 padding", wire("uint8", [2], "AAA"), "inputs.data", "valid base64 (RFC 4648)"),
    ("base64 with newline", wire("uint8", [6], "AAAA\nAAAA"), "inputs.data", "valid base64 (RFC 4648)"),
    ("too few bytes", wire("float32", [2], b64(b"\0" * 4)), "inputs.data", "8 bytes for float32 (2,)"),
    ("too many bytes", wire("int64", [1], b64(b"\0" * 9)), "inputs.data", "8 bytes for int64 (1,)"),
    ("bytes for an empty shape", wire("float32", [0, 3], b64(b"\0" * 4)), "inputs.data", "0 bytes for float32 (0, 3)"),
    ("NaN float32", wire("float32", [2], b64(struct.pack("<f", 1.0) + NAN32)), "inputs.data", "finite numbers"),
    ("inf float32", wire("float32", [1], b64(INF32)), "inputs.data", "finite numbers"),
    ("-inf float64", wire("float64", [1], b64(struct.pack("<d", -math.inf))), "inputs.data", "finite numbers"),
    ("inf float16", wire("float16", [1], b64(np.array([np.inf], "<f2").tobytes())), "inputs.data", "finite numbers"),
    ("NaN 0-d", wire("float32", [], b64(NAN32)), "inputs.data", "finite numbers"),
    ("1e39 overflows float32", [[1.0, 1e39]], "inputs.data", "finite numbers"),
    ("-1e39 overflows float32", [-1e39], "inputs.data", "finite numbers"),
    ("ragged list", [[1, 2], [3]], "inputs", LIST_EXPECTED),
    ("ragged depth", [[1, 2], 3], "inputs", LIST_EXPECTED),
    ("list of text", ["a", "b"], "inputs", LIST_EXPECTED),
    ("numeric strings", [["1.5", "2"]], "inputs", LIST_EXPECTED),
    ("bools", [True, False], "inputs", LIST_EXPECTED),
    ("bool among numbers", [[1.0, True]], "inputs", LIST_EXPECTED),
    ("null in list", [1.0, None], "inputs", LIST_EXPECTED),
    ("object in list", [{"a": 1}], "inputs", LIST_EXPECTED),
    ("list too deep", [[[[[[[[[1.0]]]]]]]]], "inputs", f"at most {MAX_NDIM} dimensions"),
    ("number", 3, "inputs", "a tensor object {dtype, shape, data} or a nested list"),
    ("string", "AAAA", "inputs", "a tensor object {dtype, shape, data} or a nested list"),
    ("null", None, "inputs", "a tensor object {dtype, shape, data} or a nested list"),
]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize(("obj", "field", "expected"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
def test_decode_rejects(obj: object, field: str, expected: str) -> None:
    with pytest.raises(TensorError) as info:
        decode_tensor(obj)
    err = info.value
    assert err.field == field
    assert err.expected == expected
    assert err.code == "invalid_tensor"
    assert isinstance(err, ValueError)
    assert field in str(err)


def test_decode_uses_the_given_field_path() -> None:
    with pytest.raises(TensorError) as info:
        decode_tensor(wire("float32", [1], b64(INF32)), field="outputs")
    assert info.value.field == "outputs.data"
    with pytest.raises(TensorError) as info:
        decode_tensor([[1], [2, 3]], field="outputs")
    assert info.value.field == "outputs"


@pytest.mark.parametrize("shape", [[0, 2**62], [0, 2**63], [2**63, 0]])
def test_decode_rejects_impossible_empty_shape(shape: list) -> None:
    # math.prod(shape) == 0 so the empty data has the "right" length; the
    # reshape that follows then fails inside numpy.
    with pytest.raises(TensorError) as info:
        decode_tensor(wire("float32", shape, ""))
    assert info.value.field == "inputs.shape"


# -- encode ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arr",
    [
        np.array([1.0, np.nan], dtype=np.float32),
        np.array([[np.inf]], dtype=np.float64),
        np.array(-np.inf, dtype=np.float16),
        np.array([0.0, np.nan], dtype=np.float32)[::2][:0],  # empty: nothing to reject
    ],
    ids=["nan32", "inf64", "-inf16 0-d", "empty"],
)
def test_encode_rejects_non_finite(arr: np.ndarray) -> None:
    if arr.size == 0:
        assert encode_tensor(arr)["data"] == ""
        return
    with pytest.raises(TensorError) as info:
        encode_tensor(arr)
    assert info.value.field == "outputs.data"
    assert info.value.expected == "finite numbers"


@pytest.mark.parametrize(
    "arr",
    [np.zeros(2, dtype=np.complex64), np.array(["a"]), np.zeros(2, dtype=np.uint16), np.array([None], dtype=object)],
    ids=["complex64", "unicode", "uint16", "object"],
)
def test_encode_rejects_unsupported_dtype(arr: np.ndarray) -> None:
    with pytest.raises(TensorError) as info:
        encode_tensor(arr)
    assert info.value.field == "outputs.dtype"
    assert info.value.expected == DTYPE_EXPECTED
    assert info.value.actual == arr.dtype.name


def test_encode_accepts_lists_as_arrays() -> None:
    # np.asarray: a Python list of ints becomes int64
    assert encode_tensor([1, 2]) == {"dtype": "int64", "shape": [2], "data": b64(struct.pack("<2q", 1, 2))}
