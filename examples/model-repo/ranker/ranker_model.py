"""A python-format model: subclass RepositoryModel, implement load_weights and predict."""

from __future__ import annotations

import numpy as np

from autoglm.models.adapters import RepositoryModel


class Ranker(RepositoryModel):
    """scores = features @ W (W: float32 (8, 3), fixed); best = argmax of the scores."""

    def load_weights(self, device: str) -> None:
        self.weights = (np.arange(24, dtype=np.float32).reshape(8, 3) - 12.0) / 24.0

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores = batch["features"] @ self.weights
        return {"scores": scores.astype(np.float32), "best": scores.argmax(axis=1).astype(np.int64)}


def make(spec):
    """The factory named in model.yaml: called with the parsed spec, returns the model (unloaded)."""
    return Ranker(spec)
