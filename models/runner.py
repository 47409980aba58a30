"""Run one model on its own thread: load, collate and forward never touch the event loop.

A :class:`ModelRunner` owns exactly one worker thread (a
``ThreadPoolExecutor(max_workers=1)``). Every call into the model other than
:meth:`~autoglm.models.base.InferenceModel.prepare` happens on that thread, so
a model never sees two forwards at once and the asyncio event loop only awaits
a future.

Nothing here imports Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import torch

from autoglm.errors import ConfigError, InferenceError, ModelError, ModelLoadError
from autoglm.models.base import InferenceModel

logger = logging.getLogger(__name__)

_DEVICES = ("cpu", "cuda")


def select_device(preferred: str | None = None) -> str:
    """Choose the torch device a model runs on.

    Args:
        preferred: ``"cpu"``, ``"cuda"``, or ``None`` / ``"auto"`` to choose
            (``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``).
            Case and surrounding spaces are ignored.

    Returns:
        ``"cuda"`` or ``"cpu"``.

    Raises:
        ModelLoadError: ``"cuda"`` was asked for but no CUDA GPU is usable.
        ConfigError: ``preferred`` is none of the values above.
    """
    choice = "auto" if preferred is None else preferred.strip().lower()
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice not in _DEVICES:
        raise ConfigError(f"unknown device {preferred!r}: expected 'cpu', 'cuda' or 'auto'")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "device 'cuda' was requested but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "use device 'cpu' or 'auto', or run on a machine with a usable NVIDIA GPU"
        )
    return choice


class ModelRunner:
    """One :class:`InferenceModel` plus the single thread it runs on.

    Args:
        model: the model, constructed but not loaded.
        device: passed to :func:`select_device` at :meth:`start`
            (``None`` = CUDA when available, else CPU).
        torch_threads: when set, ``torch.set_num_threads(torch_threads)`` is
            called on the model thread at :meth:`start`; ``None`` keeps torch's
            default (the number of physical cores). Torch's intra-op pool is
            shared by the whole process, so this also affects other models.

    Attributes:
        model: the wrapped model.
        device: ``"cpu"`` or ``"cuda"`` once started, else ``None``.
        load_s: seconds :meth:`start` spent in ``model.load`` (weights and
            warm-up), or ``None`` before it finished.
        last_inference_s: seconds the last micro-batch spent in collate +
            forward + output checks, measured on the model thread; ``None``
            before the first one.
    """

    def __init__(
        self, model: InferenceModel, *, device: str | None = None, torch_threads: int | None = None
    ):
        if torch_threads is not None and torch_threads < 1:
            raise ConfigError(f"torch_threads must be >= 1 or None, got {torch_threads!r}")
        self.model = model
        self.device: str | None = None
        self.load_s: float | None = None
        self.last_inference_s: float | None = None
        self._preferred_device = device
        self._torch_threads = torch_threads
        self._started = False
        self._closed = False
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"autoglm-model-{model.name}"
        )

    @property
    def name(self) -> str:
        """The model's registry name."""
        return self.model.name

    @property
    def started(self) -> bool:
        """Whether the model is loaded and :meth:`run` may be called."""
        return self._started

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Load the model and warm it up on the model thread; records :attr:`load_s`.

        Raises:
            ModelLoadError: the device is unusable or ``model.load`` failed
                (any other exception from it is wrapped, naming the model).
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    def start_sync(self) -> None:
        """:meth:`start` for offline use (benchmarks, tests): blocks until loaded.

        Raises:
            ModelLoadError: as :meth:`start`.
        """
        self._check_open()
        self._executor.submit(self._load).result()

    def close(self, *, wait: bool = True) -> None:
        """Shut the model thread down; queued batches that have not started are cancelled.

        Args:
            wait: block until a forward in progress has finished.
        """
        if self._closed:
            return
        self._closed = True
        self._started = False
        self._executor.shutdown(wait=wait, cancel_futures=True)
        logger.info("model %s: runner closed", self.name)

    def __enter__(self) -> "ModelRunner":
        self.start_sync()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inference ------------------------------------------------------------

    async def run(self, items: Sequence[Any]) -> list[np.ndarray]:
        """Run one micro-batch on the model thread and split the outputs per task.

        Args:
            items: prepared tasks (results of ``model.prepare``), in order.

        Returns:
            One float32 array ``(rows_i, output_dim)`` per item, in the order
            of ``items``; they are views into one batch output array.

        Raises:
            InferenceError: forward raised (wrapped, naming the model), or its
                output is not a float32 numpy array of ``(sum(rows), output_dim)``.
            ModelError: the runner is not started or already closed.
        """
        self._check_running()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run_batch, list(items))

    def run_sync(self, items: Sequence[Any]) -> list[np.ndarray]:
        """:meth:`run` for offline use: same thread, same checks, blocks until done."""
        self._check_running()
        return self._executor.submit(self._run_batch, list(items)).result()

    # -- on the model thread ------------------------------------------------

    def _load(self) -> None:
        if self._torch_threads is not None:
            torch.set_num_threads(self._torch_threads)
        device = select_device(self._preferred_device)
        t0 = time.perf_counter()
        try:
            self.model.load(device)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"model {self.name!r} failed to load on {device}: {exc!r}") from exc
        self.load_s = time.perf_counter() - t0
        self.device = device
        self._started = True
        logger.info(
            "model %s: loaded on %s in %.2f s (torch threads %d)",
            self.name, device, self.load_s, torch.get_num_threads(),
        )

    def _run_batch(self, items: list[Any]) -> list[np.ndarray]:
        if not items:
            return []
        t0 = time.perf_counter()
        try:
            counts = [self.model.rows(item) for item in items]
            with torch.inference_mode():
                out = self.model.forward(self.model.collate(items))
        except Exception as exc:
            raise InferenceError(f"model {self.name!r}: forward failed: {exc!r}") from exc
        total = sum(counts)
        self._check_output(out, total)
        self.last_inference_s = time.perf_counter() - t0
        bounds = np.cumsum(counts)[:-1]
        return np.split(out, bounds, axis=0)

    def _check_output(self, out: Any, total: int) -> None:
        dim = self.model.signature.output_dim
        expected = f"float32 ({total}, {dim})"
        if not isinstance(out, np.ndarray):
            raise InferenceError(
                f"model {self.name!r}: forward returned {type(out).__name__}, expected a numpy array {expected}"
            )
        if out.ndim != 2 or out.shape[0] != total:
            rows = out.shape[0] if out.ndim else "no"
            raise InferenceError(
                f"model {self.name!r}: forward returned {rows} rows for {total} input rows "
                f"(expected {expected}, got {out.dtype} {out.shape})"
            )
        if out.dtype != np.float32 or out.shape[1] != dim:
            raise InferenceError(
                f"model {self.name!r}: forward returned {out.dtype} {out.shape}, expected {expected}"
            )

    # -- state checks -------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ModelError(f"model {self.name!r}: runner is closed")

    def _check_running(self) -> None:
        self._check_open()
        if not self._started:
            raise ModelError(f"model {self.name!r}: runner not started (call start() first)")
