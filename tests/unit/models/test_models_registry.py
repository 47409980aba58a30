"""The model registry and the package's public surface."""

from __future__ import annotations

import subprocess
import sys

import pytest

import autoglm.models as models
from autoglm.errors import UnknownModelError
from autoglm.models import ModelRegistry, default_registry


def test_default_registry_serves_digits_its_linear_fallback_and_minilm():
    registry = default_registry()
    assert registry.names() == ["digits", "digits-linear", "minilm"]
    assert "digits" in registry and "nope" not in registry
    assert all(registry.descriptions().values())
    digits = registry.create("digits")
    assert digits.name == "digits" and digits.signature.output_dim == 10
    assert registry.create("minilm").signature.output_dim == 384


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match=r"unknown model 'resnet'; known models: digits, digits-linear, minilm") as info:
        default_registry().create("resnet")
    assert info.value.model == "resnet"


def test_register_refuses_duplicates_and_empty_names():
    registry = ModelRegistry()
    registry.register("a", lambda: None, description="x")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", lambda: None)
    with pytest.raises(ValueError):
        registry.register("", lambda: None)
    with pytest.raises(UnknownModelError, match="known models: a"):
        registry.create("b")


def test_importing_models_imports_neither_transformers_nor_kafka():
    code = (
        "import sys, autoglm.models as m; m.default_registry().names(); "
        "bad = [k for k in sys.modules if k.split('.')[0] in ('transformers', 'aiokafka', 'faust', 'sklearn')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_public_names():
    assert set(models.__all__) == {
        "InferenceModel", "Signature", "ModelRunner", "ModelRegistry", "default_registry", "select_device",
    }


def test_digits_linear_is_a_usable_fallback_for_digits(tmp_path):
    """Same signature (so the registry accepts the pair) and a real, trained, accurate linear model."""
    import numpy as np

    from autoglm.models.digits import DigitsLinearModel, split_digits
    from autoglm.models.fallback import FallbackRunner

    registry = default_registry()
    registry.set_fallback("digits", "digits-linear")
    runner = registry.create_runner("digits", device="cpu")
    try:
        assert isinstance(runner, FallbackRunner)
        assert runner.fallback.model.name == "digits-linear"
    finally:
        runner.close(wait=False)
    model = DigitsLinearModel(cache_directory=tmp_path)
    model.load("cpu")
    _, _, x_te, y_te = split_digits(0)
    import torch

    with torch.inference_mode():  # as the runner's thread calls it
        probs = model.forward(model.collate([model.prepare(x) for x in x_te]))
    accuracy = float((probs.argmax(axis=1) == y_te).mean())
    assert probs.shape == (len(x_te), 10) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert 0.90 <= accuracy < 1.0, accuracy
    assert (tmp_path / "digits-linear-v1-seed0.pt").exists()
