"""The built-in models as a repository of specs: ``digits``, ``digits-linear``, ``minilm``.

Each is a ``format: python`` spec whose factory is a function of this module,
parsed by the same :func:`~autoglm.models.spec.parse_spec` and built by the
same :func:`~autoglm.models.repository.create_model` as a user's
``model.yaml``, so there is one way to load a model. ``max_rows`` is each
model's documented per-task limit (256 images, 64 texts).

Nothing here imports Kafka; the models' modules are imported when a model is built.
"""

from __future__ import annotations

from typing import Any

from autoglm.models.base import InferenceModel
from autoglm.models.spec import ModelSpec, parse_spec

#: name -> the model.yaml document of a built-in (source ``builtin:<name>``).
BUILTIN_SPECS: dict[str, dict[str, Any]] = {
    "digits": {
        "format": "python",
        "factory": "autoglm.models.builtin:digits",
        "description": "8x8 handwritten digits CNN: float32 (B, 64) -> (B, 10) probabilities",
        "inputs": [{"name": "image", "dtype": "float32", "shape": [64]}],
        "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [10]}],
        "max_rows": 256,
    },
    "digits-linear": {
        "format": "python",
        "factory": "autoglm.models.builtin:digits_linear",
        "description": "8x8 digits, linear (fallback for digits): float32 (B, 64) -> (B, 10) probabilities",
        "inputs": [{"name": "image", "dtype": "float32", "shape": [64]}],
        "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [10]}],
        "max_rows": 256,
    },
    "minilm": {
        "format": "python",
        "factory": "autoglm.models.builtin:minilm",
        "description": "all-MiniLM-L6-v2 sentence embeddings: texts -> float32 (B, 384)",
        "inputs": [{"name": "text", "text": True}],
        "outputs": [{"name": "embedding", "dtype": "float32", "shape": [384]}],
        "max_rows": 64,
    },
}


def builtin_spec(name: str) -> ModelSpec:
    """The parsed spec of built-in ``name`` (``KeyError`` when there is none)."""
    return parse_spec(BUILTIN_SPECS[name], name=name, source=f"builtin:{name}")


def digits(spec: ModelSpec) -> InferenceModel:
    """``digits``: :class:`~autoglm.models.digits.DigitsModel` with the spec's ``max_rows``."""
    from autoglm.models.digits import DigitsModel

    return DigitsModel(max_rows=spec.max_rows)


def digits_linear(spec: ModelSpec) -> InferenceModel:
    """``digits-linear``: :class:`~autoglm.models.digits.DigitsLinearModel` with the spec's ``max_rows``."""
    from autoglm.models.digits import DigitsLinearModel

    return DigitsLinearModel(max_rows=spec.max_rows)


def minilm(spec: ModelSpec) -> InferenceModel:
    """``minilm``: :class:`~autoglm.models.minilm.MiniLMModel` with the spec's ``max_rows``."""
    from autoglm.models.minilm import MiniLMModel

    return MiniLMModel(max_rows=spec.max_rows)
