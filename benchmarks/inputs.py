"""Single-row task inputs for the throughput and overhead benchmarks (no Kafka)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import numpy as np

#: models whose tasks are digit images; the others take one sentence
IMAGE_MODELS = ("digits", "digits-linear")
_WORDS = ("stream model kafka batch latency partition offset worker result task control pause resume adaptive "
          "throughput queue deadline priority commit broker").split()


@lru_cache(maxsize=None)
def _images() -> np.ndarray:
    from autoglm.tasks import holdout_digits

    return holdout_digits(360)[0]


@lru_cache(maxsize=None)
def _texts() -> tuple[str, ...]:
    rng = np.random.default_rng(0)
    return tuple(" ".join(rng.choice(_WORDS, size=int(rng.integers(8, 24)))) for _ in range(200))


def task_inputs(model: str) -> Callable[[int], Any]:
    """``inputs(i)``: task ``i``'s single row: float32 ``(1, 1, 8, 8)`` held-out digit images
    (cycling over the 360) for the image models, else ``[sentence]`` of 8-23 words (200, cycling)."""
    if model in IMAGE_MODELS:
        x = _images()
        return lambda i: x[i % len(x): i % len(x) + 1]
    texts = _texts()
    return lambda i: [texts[i % len(texts)]]


def encoded_tasks(model: str, n: int, run: str) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` of ``n`` single-row tasks ``<run>-<i>`` encoded with the project's codec,
    ``created_ms`` stamped now."""
    from autoglm.streams.events import Task, encode_task, now_ms

    inputs, stamp = task_inputs(model), now_ms()
    out = []
    for i in range(n):
        tid = f"{run}-{i}"
        out.append((tid.encode(), encode_task(Task(id=tid, model=model, inputs=inputs(i), created_ms=stamp))))
    return out
