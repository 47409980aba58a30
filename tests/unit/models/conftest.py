"""Shared fixtures for the models tests: the digits model is trained once per session."""

from __future__ import annotations

import os

# Model hubs are unreachable here; anything that loads a Hugging Face model
# must read local files only. Set before transformers / huggingface_hub load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path
from typing import Iterator

import pytest

from autoglm.models.digits import DigitsModel, split_digits
from autoglm.models.runner import ModelRunner


@pytest.fixture(scope="session")
def digits_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The AUTOGLM_CACHE_DIR the session's digits model was trained into."""
    return tmp_path_factory.mktemp("autoglm-cache")


@pytest.fixture(scope="session")
def digits_runner(digits_cache_dir: Path) -> Iterator[ModelRunner]:
    """A started CPU runner of DigitsModel(seed=0), trained once (cache in digits_cache_dir)."""
    runner = ModelRunner(DigitsModel(), device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOGLM_CACHE_DIR", str(digits_cache_dir))
        runner.start_sync()
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def digits_split():
    """``split_digits(0)``: (x_train, y_train, x_test, y_test)."""
    return split_digits(0)
