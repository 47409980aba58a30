"""Which models a worker can serve, by name; models are built on demand.

Factories import their model's module lazily, so importing this module does
not import transformers (or train anything).

Nothing here imports Kafka.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from autoglm.errors import UnknownModelError
from autoglm.models.base import InferenceModel

logger = logging.getLogger(__name__)

ModelFactory = Callable[[], InferenceModel]


@dataclass(frozen=True, slots=True)
class _Entry:
    factory: ModelFactory
    description: str


class ModelRegistry:
    """Named model factories.

    ``name in registry`` tells whether a name is registered.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, factory: ModelFactory, *, description: str = "") -> None:
        """Register ``factory`` (no arguments, returns a new unloaded model) under ``name``.

        Raises:
            ValueError: ``name`` is empty or already registered.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"model name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"model {name!r} is already registered")
        self._entries[name] = _Entry(factory, description)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def descriptions(self) -> dict[str, str]:
        """``{name: description}`` for every registered model, sorted by name."""
        return {name: self._entries[name].description for name in self.names()}

    def create(self, name: str) -> InferenceModel:
        """A new, unloaded model for ``name`` (the factory is called each time).

        Raises:
            UnknownModelError: ``name`` is not registered; the message lists
                the known names.
        """
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self.names()) or "(none)"
            raise UnknownModelError(f"unknown model {name!r}; known models: {known}", model=name)
        model = entry.factory()
        if model.name != name:
            logger.warning("model registered as %r reports name %r", name, model.name)
        return model

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def _digits() -> InferenceModel:
    from autoglm.models.digits import DigitsModel

    return DigitsModel()


def _minilm() -> InferenceModel:
    from autoglm.models.minilm import MiniLMModel

    return MiniLMModel()


def default_registry() -> ModelRegistry:
    """A new registry with the built-in models ``digits`` and ``minilm`` (default settings)."""
    registry = ModelRegistry()
    registry.register(
        "digits", _digits, description="8x8 handwritten digits CNN: float32 (B, 64) -> (B, 10) probabilities"
    )
    registry.register(
        "minilm", _minilm, description="all-MiniLM-L6-v2 sentence embeddings: texts -> float32 (B, 384)"
    )
    return registry
