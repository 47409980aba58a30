"""The worker's default torch intra-op threads (autoglm/worker.py)."""

from __future__ import annotations

import os

from autoglm.config import load_settings
from autoglm.worker import worker_torch_threads


def test_default_leaves_the_event_loop_a_core_on_cpu():
    cores = len(os.sched_getaffinity(0))
    assert worker_torch_threads(load_settings(device="cpu")) == max(1, cores - 1)
    assert worker_torch_threads(load_settings(device="auto")) == max(1, cores - 1)


def test_an_explicit_setting_wins_and_cuda_keeps_torchs_default():
    assert worker_torch_threads(load_settings(device="cpu", torch_threads=3)) == 3
    assert worker_torch_threads(load_settings(device="cuda")) is None
