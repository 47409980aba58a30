"""ModelRunner and select_device, with tiny in-test models (no weights, no GPU)."""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np
import pytest
import torch

from autoglm.errors import ConfigError, InferenceError, ModelError, ModelLoadError
from autoglm.models import InferenceModel, ModelRunner, Signature, select_device


class EchoModel(InferenceModel):
    """Rows (n, 2) float32 -> rows * 2; records the thread of every call."""

    name = "echo"
    signature = Signature(input_kind="tensor", input="float32 (B, 2)", output="float32 (B, 2)", output_dim=2)

    def __init__(self, *, drop_rows: int = 0, fail: Exception | None = None, out_dtype=np.float32):
        self.threads: dict[str, set[int]] = {"load": set(), "collate": set(), "forward": set()}
        self.thread_names: set[str] = set()
        self.grad_enabled: list[bool] = []
        self.drop_rows = drop_rows
        self.fail = fail
        self.out_dtype = out_dtype

    def _record(self, what: str) -> None:
        self.threads[what].add(threading.get_ident())
        self.thread_names.add(threading.current_thread().name)

    def load(self, device: str) -> None:
        self._record("load")
        self.device = device

    def prepare(self, inputs: Any) -> np.ndarray:
        return np.asarray(inputs, dtype=np.float32).reshape(-1, 2)

    def collate(self, items: Sequence[np.ndarray]) -> np.ndarray:
        self._record("collate")
        return np.concatenate(items)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        self._record("forward")
        self.grad_enabled.append(torch.is_grad_enabled())
        self.torch_threads = torch.get_num_threads()
        if self.fail is not None:
            raise self.fail
        out = batch * 2
        return out[: len(out) - self.drop_rows].astype(self.out_dtype)


class BrokenLoadModel(EchoModel):
    name = "broken"

    def load(self, device: str) -> None:
        raise FileNotFoundError("weights.pt")


def tasks(*rows: int) -> list[np.ndarray]:
    start, out = 0, []
    for n in rows:
        out.append(np.arange(start, start + 2 * n, dtype=np.float32).reshape(n, 2))
        start += 2 * n
    return out


@pytest.fixture
def echo_runner():
    runner = ModelRunner(EchoModel(), device="cpu")
    runner.start_sync()
    yield runner
    runner.close()


# -- select_device --------------------------------------------------------------


def test_select_device_auto_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device() == "cpu"
    assert select_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device() == "cuda"
    assert select_device(" CUDA ") == "cuda"


def test_select_device_honours_cpu_even_with_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("cpu") == "cpu"


def test_select_device_cuda_without_gpu_is_a_load_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="cuda"):
        select_device("cuda")


def test_select_device_rejects_unknown_names():
    with pytest.raises(ConfigError, match="tpu"):
        select_device("tpu")


# -- ModelRunner ------------------------------------------------------------------


def test_run_splits_outputs_per_task_in_order(echo_runner):
    items = tasks(1, 3, 2)
    outs = echo_runner.run_sync(items)
    assert [o.shape for o in outs] == [(1, 2), (3, 2), (2, 2)]
    for item, out in zip(items, outs):
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, item * 2)
    assert echo_runner.last_inference_s is not None and echo_runner.last_inference_s >= 0
    assert echo_runner.load_s is not None and echo_runner.device == "cpu"


def test_run_of_no_tasks_does_not_call_forward(echo_runner):
    assert echo_runner.run_sync([]) == []
    assert echo_runner.model.threads["forward"] == set()


def test_load_collate_forward_run_on_one_dedicated_thread(echo_runner):
    echo_runner.run_sync(tasks(2))
    model = echo_runner.model
    used = model.threads["load"] | model.threads["collate"] | model.threads["forward"]
    assert len(used) == 1
    assert threading.get_ident() not in used
    assert all(name.startswith("autoglm-model-echo") for name in model.thread_names)
    assert model.grad_enabled == [False]  # forward ran under torch.inference_mode()


async def test_async_start_and_run_stay_off_the_event_loop_thread():
    model = EchoModel()
    runner = ModelRunner(model, device="cpu")
    try:
        await runner.start()
        outs = await runner.run(tasks(1, 3, 2))
    finally:
        runner.close()
    assert [len(o) for o in outs] == [1, 3, 2]
    loop_thread = threading.get_ident()
    assert loop_thread not in model.threads["load"] | model.threads["forward"]
    assert model.threads["load"] == model.threads["forward"]


def test_wrong_row_count_is_an_inference_error_naming_rows():
    runner = ModelRunner(EchoModel(drop_rows=1), device="cpu")
    runner.start_sync()
    try:
        with pytest.raises(InferenceError, match=r"returned 5 rows for 6 input rows") as info:
            runner.run_sync(tasks(1, 3, 2))
    finally:
        runner.close()
    assert "echo" in str(info.value)


def test_wrong_dtype_is_an_inference_error():
    runner = ModelRunner(EchoModel(out_dtype=np.float64), device="cpu")
    runner.start_sync()
    try:
        with pytest.raises(InferenceError, match=r"float64 \(2, 2\), expected float32 \(2, 2\)"):
            runner.run_sync(tasks(2))
    finally:
        runner.close()


def test_forward_exception_is_wrapped_with_model_name():
    cause = ValueError("boom")
    runner = ModelRunner(EchoModel(fail=cause), device="cpu")
    runner.start_sync()
    try:
        with pytest.raises(InferenceError, match=r"'echo'.*boom") as info:
            runner.run_sync(tasks(1))
    finally:
        runner.close()
    assert info.value.__cause__ is cause
    assert info.value.retriable


async def test_async_forward_exception_is_wrapped():
    runner = ModelRunner(EchoModel(fail=RuntimeError("oom")), device="cpu")
    await runner.start()
    try:
        with pytest.raises(InferenceError, match="oom"):
            await runner.run(tasks(1))
    finally:
        runner.close()


def test_load_failure_is_a_model_load_error():
    runner = ModelRunner(BrokenLoadModel(), device="cpu")
    try:
        with pytest.raises(ModelLoadError, match=r"'broken'.*weights\.pt"):
            runner.start_sync()
        assert not runner.started and runner.load_s is None
    finally:
        runner.close()


def test_run_before_start_and_after_close_is_refused():
    runner = ModelRunner(EchoModel(), device="cpu")
    with pytest.raises(ModelError, match="not started"):
        runner.run_sync(tasks(1))
    runner.start_sync()
    runner.close()
    runner.close()  # idempotent
    with pytest.raises(ModelError, match="closed"):
        runner.run_sync(tasks(1))


def test_torch_threads_is_applied_at_start():
    before = torch.get_num_threads()
    runner = ModelRunner(EchoModel(), device="cpu", torch_threads=1)
    try:
        runner.start_sync()
        runner.run_sync(tasks(1))
        assert runner.model.torch_threads == 1
    finally:
        runner.close()
        torch.set_num_threads(before)


def test_torch_threads_must_be_positive():
    with pytest.raises(ConfigError):
        ModelRunner(EchoModel(), torch_threads=0)
