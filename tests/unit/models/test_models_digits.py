"""The digits model: training, cache, determinism, input validation, batching."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.errors import InputSignatureError
from autoglm.models.digits import DigitsModel, cache_path, load_or_train_digits
from autoglm.models.runner import ModelRunner

SHAPES_TEXT = "float32 (B, 1, 8, 8), (B, 8, 8) or (B, 64), or one row (1, 8, 8), (8, 8) or (64,)"


def predict(runner: ModelRunner, x: np.ndarray, chunk: int = 200) -> np.ndarray:
    model = runner.model
    items = [model.prepare(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    return np.concatenate(runner.run_sync(items))


# -- training, cache, determinism -------------------------------------------------------


def test_held_out_accuracy_and_probabilities(digits_runner, digits_split):
    _, _, x_test, y_test = digits_split
    assert x_test.shape == (360, 1, 8, 8) and x_test.dtype == np.float32
    probs = predict(digits_runner, x_test)
    assert probs.shape == (360, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float((probs.argmax(axis=1) == y_test).mean())
    assert accuracy >= 0.95, accuracy


def test_split_is_stratified_and_deterministic(digits_split):
    x_tr, y_tr, x_te, y_te = digits_split
    assert x_tr.shape == (1437, 1, 8, 8) and y_tr.dtype == np.int64 and y_te.shape == (360,)
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    assert np.bincount(y_te).min() >= 35  # every class ~ 20 % of its ~180 images


def test_training_writes_the_cache_file(digits_runner, digits_cache_dir):
    path = digits_cache_dir / "digits-v1-seed0.pt"
    assert path.is_file()
    assert [p.name for p in digits_cache_dir.iterdir()] == [path.name]  # no temp file left
    assert digits_runner.model.train_s is not None  # it trained, the cache was empty


def test_second_load_uses_the_cache_bit_identically(digits_runner, digits_cache_dir, digits_split):
    model = DigitsModel(cache_directory=digits_cache_dir)
    runner = ModelRunner(model, device="cpu")
    runner.start_sync()
    try:
        assert model.train_s is None  # came from the cache
        assert_same_weights(model.net, digits_runner.model.net)
        x = digits_split[2][:32]
        np.testing.assert_array_equal(predict(runner, x), predict(digits_runner, x))
    finally:
        runner.close()


def test_training_is_deterministic(digits_runner, tmp_path):
    net, train_s = load_or_train_digits(0, tmp_path)
    assert train_s is not None and (tmp_path / "digits-v1-seed0.pt").is_file()
    assert_same_weights(net, digits_runner.model.net)


def test_corrupt_cache_is_retrained_over_with_a_warning(digits_runner, tmp_path, caplog):
    path = tmp_path / "digits-v1-seed0.pt"
    path.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="autoglm.models.digits"):
        net, train_s = load_or_train_digits(0, tmp_path)
    assert train_s is not None
    assert any("unusable" in r.getMessage() for r in caplog.records)
    assert_same_weights(net, digits_runner.model.net)
    reloaded = torch.load(path, weights_only=True)
    assert_same_weights(reloaded, digits_runner.model.net)


def test_cache_path_follows_autoglm_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOGLM_CACHE_DIR", str(tmp_path))
    assert cache_path(3) == tmp_path / "digits-v1-seed3.pt"
    monkeypatch.delenv("AUTOGLM_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_path() == tmp_path / "home" / ".cache" / "autoglm" / "digits-v1-seed0.pt"


def assert_same_weights(a, b) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].cpu(), sb[key].cpu()), key


# -- prepare ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "rows"),
    [((64,), 1), ((8, 8), 1), ((1, 8, 8), 1), ((1, 64), 1), ((5, 64), 5), ((5, 8, 8), 5),
     ((8, 8, 8), 8), ((5, 1, 8, 8), 5), ((256, 64), 256)],
)
def test_prepare_accepts_every_listed_shape(shape, rows):
    model = DigitsModel()
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = model.prepare(x)
    assert out.shape == (rows, 1, 8, 8) and out.dtype == np.float32 and out.flags.c_contiguous
    assert model.rows(out) == rows
    np.testing.assert_array_equal(out.reshape(-1), x.reshape(-1))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_prepare_casts_other_float_dtypes(dtype):
    out = DigitsModel().prepare(np.full((2, 64), 0.5, dtype=dtype))
    assert out.dtype == np.float32 and out.shape == (2, 1, 8, 8)


def test_prepare_makes_non_contiguous_input_contiguous():
    x = np.zeros((64, 4), dtype=np.float32).T  # (4, 64), Fortran order
    out = DigitsModel().prepare(x)
    assert out.flags.c_contiguous and out.shape == (4, 1, 8, 8)


@pytest.mark.parametrize(
    ("shape", "actual"),
    [((2, 63), "float32 (2, 63)"), ((63,), "float32 (63,)"), ((0, 64), "float32 (0, 64)"),
     ((2, 2, 8, 8), "float32 (2, 2, 8, 8)"), ((), "float32 ()"), ((2, 8, 8, 1), "float32 (2, 8, 8, 1)"),
     ((1, 1, 1, 8, 8), "float32 (1, 1, 1, 8, 8)"), ((4, 8), "float32 (4, 8)")],
)
def test_prepare_rejects_wrong_shapes(shape, actual):
    with pytest.raises(InputSignatureError) as info:
        DigitsModel().prepare(np.zeros(shape, dtype=np.float32))
    assert info.value.expected == SHAPES_TEXT
    assert info.value.actual == actual
    assert info.value.model == "digits"
    assert actual in str(info.value)


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.int32, np.bool_, np.complex64])
def test_prepare_rejects_non_float_dtypes(dtype):
    with pytest.raises(InputSignatureError) as info:
        DigitsModel().prepare(np.zeros((2, 64), dtype=dtype))
    assert info.value.expected == "float32 (float16 and float64 are cast)"
    assert info.value.actual == f"{np.dtype(dtype)} (2, 64)"


def test_prepare_rejects_non_arrays():
    with pytest.raises(InputSignatureError) as info:
        DigitsModel().prepare(["a text"])
    assert info.value.actual == "list of 1 texts"


def test_prepare_caps_rows():
    model = DigitsModel(max_rows=4)
    assert model.prepare(np.zeros((4, 64), np.float32)).shape[0] == 4
    with pytest.raises(InputSignatureError) as info:
        model.prepare(np.zeros((5, 8, 8), np.float32))
    assert info.value.expected == "at most 4 rows per task"
    assert info.value.actual == "5 rows (float32 (5, 8, 8))"
    with pytest.raises(InputSignatureError):
        DigitsModel().prepare(np.zeros((257, 64), np.float32))


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 256), layout=st.sampled_from([(64,), (8, 8), (1, 8, 8)]))
def test_prepare_row_count_property(rows, layout):
    out = DigitsModel().prepare(np.zeros((rows, *layout), np.float32))
    assert out.shape == (rows, 1, 8, 8)


# -- batching through the runner -------------------------------------------------------


def test_batched_tasks_equal_each_task_alone(digits_runner, digits_split):
    x = digits_split[2]
    model = digits_runner.model
    items = [model.prepare(x[0, 0].reshape(64)), model.prepare(x[1:4, 0]), model.prepare(x[4:6])]
    batched = digits_runner.run_sync(items)
    assert [o.shape for o in batched] == [(1, 10), (3, 10), (2, 10)]
    for item, out in zip(items, batched):
        (alone,) = digits_runner.run_sync([item])
        assert np.abs(out - alone).max() <= 1e-5
