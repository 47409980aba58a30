"""Run one model on its own thread: load, collate and forward never touch the event loop.

A :class:`ModelRunner` owns one model thread at a time (a single daemon
thread that runs submitted calls in order, like a
``ThreadPoolExecutor(max_workers=1)``). Every call into the model other than
:meth:`~autoglm.models.base.InferenceModel.prepare` happens on that thread, so
the asyncio event loop only awaits a future.

Fault isolation (:meth:`ModelRunner.run_isolated`): a batch whose forward
raises is split in halves and retried until the failing tasks are isolated,
and a forward that passes the per-batch timeout is abandoned: a Python thread
cannot be killed, so the runner leaves the stuck thread behind (a daemon, so
it never blocks interpreter exit) and starts a fresh one for the next batch.

Nothing here imports Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from typing import Any, Sequence

import numpy as np
import torch

from autoglm.processors.errors import (
    ConfigError,
    InferenceError,
    InferenceTimeoutError,
    ModelError,
    ModelLoadError,
)
from autoglm.models.base import InferenceModel, ItemError, ItemOutcome
from autoglm.models.outputs import output_problems, split_outputs
from autoglm.models.thread import ModelThread

logger = logging.getLogger(__name__)

_DEVICES = ("cpu", "cuda")
_CUDA_N = re.compile(r"^cuda:(\d+)$")

__all__ = ["ItemError", "ItemOutcome", "ModelRunner", "select_device"]


def select_device(preferred: str | None = None) -> str:
    """Choose the torch device a model runs on.

    Args:
        preferred: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (GPU number N), or
            ``None`` / ``"auto"`` to choose (``"cuda"`` when
            ``torch.cuda.is_available()``, else ``"cpu"``). Case and
            surrounding spaces are ignored.

    Returns:
        ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.

    Raises:
        ModelLoadError: ``"cuda"`` was asked for but no CUDA GPU is usable, or
            GPU N does not exist.
        ConfigError: ``preferred`` is none of the values above.
    """
    choice = "auto" if preferred is None else preferred.strip().lower()
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    numbered = _CUDA_N.match(choice)
    if numbered:
        index = int(numbered.group(1))
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise ModelLoadError(f"device {choice!r} was requested but this machine has {count} usable CUDA GPU(s)")
        return choice
    if choice not in _DEVICES:
        raise ConfigError(f"unknown device {preferred!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'")
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
        forward_calls: batches (and sub-batches) submitted to the model since
            construction, bisection retries included.
        abandoned_threads: model threads left behind because a forward passed
            its timeout (see :meth:`run_isolated`); each may still hold the
            model and its batch in memory until its forward returns.
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
        self.forward_calls = 0
        self.abandoned_threads = 0
        self._started = False
        self._closed = False
        self._generation = 0
        self._abandoned: list[ModelThread] = []
        self._thread = self._new_thread()

    @property
    def name(self) -> str:
        """The model's registry name."""
        return self.model.name

    @property
    def started(self) -> bool:
        """Whether the model is loaded and :meth:`run` may be called."""
        return self._started

    @property
    def stuck_threads(self) -> int:
        """Abandoned model threads still running their timed-out forward."""
        self._abandoned = [t for t in self._abandoned if t.alive]
        return len(self._abandoned)

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Load the model and warm it up on the model thread; records :attr:`load_s`.

        Raises:
            ModelLoadError: the device is unusable or ``model.load`` failed
                (any other exception from it is wrapped, naming the model).
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        await asyncio.wrap_future(self._thread.submit(self._load), loop=loop)

    def start_sync(self) -> None:
        """:meth:`start` for offline use (benchmarks, tests): blocks until loaded.

        Raises:
            ModelLoadError: as :meth:`start`.
        """
        self._check_open()
        self._thread.submit(self._load).result()

    def close(self, *, wait: bool = True) -> None:
        """Shut the model thread down; queued batches that have not started are cancelled.

        Args:
            wait: block until a forward in progress has finished.
        """
        if self._closed:
            return
        self._closed = True
        self._started = False
        self._thread.shutdown(wait=wait)
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
        self.forward_calls += 1
        return await asyncio.wrap_future(self._thread.submit(self._run_batch, list(items)))

    def run_sync(self, items: Sequence[Any]) -> list[np.ndarray]:
        """:meth:`run` for offline use: same thread, same checks, blocks until done."""
        self._check_running()
        self.forward_calls += 1
        return self._thread.submit(self._run_batch, list(items)).result()

    async def run_isolated(self, items: Sequence[Any], *, timeout_s: float | None) -> list[ItemOutcome]:
        """Run one micro-batch; isolate the tasks that make it fail; never wait past ``timeout_s``.

        The batch runs as :meth:`run` does. When it raises
        :class:`~autoglm.processors.errors.InferenceError` (forward raised, or returned
        the wrong rows or dtype), it is split in halves and each half retried,
        recursively, down to single tasks: a task that fails alone gets an
        error outcome, every other task its output. Halves run in order, one
        at a time, on the model thread.

        Work bound: with ``n`` tasks of which ``k`` fail (deterministically),
        the sub-batches that fail are those holding a failing task, at most
        ``k`` per level of the halving tree, so the forward calls number at
        most ``min(2n - 1, 1 + 2k * ceil(log2 n))``: 1 for a clean batch,
        ``1 + 2 * ceil(log2 n)`` for one bad task (15 for 128 tasks), and
        ``2n - 1`` when every task fails (a broken model; see
        :class:`~autoglm.models.fallback.FallbackRunner` for that case).

        Timeout: each forward call (the whole batch, or one sub-batch while
        bisecting) may take at most ``timeout_s``. One that takes longer is
        abandoned: its tasks get ``inference_timeout`` errors
        (:class:`~autoglm.processors.errors.InferenceTimeoutError`), and so do the tasks
        of the batch that have not been served yet, since a model that hangs
        on a batch is not split (each half could hang as long again). The
        stuck thread is left running (a daemon; counted in
        :attr:`abandoned_threads`, logged as a warning) and a fresh model
        thread serves the next batch. The stuck forward may still be using
        the model when the next one starts on the fresh thread, so a model
        must tolerate two concurrent forwards in that case (torch modules in
        eval mode under ``inference_mode`` do). The timeout counts from
        submission, so call it for one batch at a time per runner (as the
        micro-batcher does): a batch queued behind another would spend part
        of its time waiting.

        Args:
            items: prepared tasks (results of ``model.prepare``), in order.
            timeout_s: seconds one forward call may take, > 0; ``None`` waits
                for as long as the forward runs.

        Returns:
            One :class:`ItemOutcome` per item, in the order of ``items``;
            ``output`` is float32 ``(rows_i, output_dim)``, ``served_by`` is
            this model's name. No forward call for an empty ``items``.

        Raises:
            ConfigError: ``timeout_s`` is not ``None`` and not > 0.
            ModelError: the runner is not started or already closed.
        """
        self._check_running()
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 seconds or None, got {timeout_s!r}")
        batch = list(items)
        outcomes: list[ItemOutcome | None] = [None] * len(batch)
        pending = [(0, len(batch))] if batch else []  # half-open ranges, left half on top
        while pending:
            lo, hi = pending.pop()
            try:
                outputs = await self._forward(batch[lo:hi], timeout_s)
            except InferenceTimeoutError as exc:
                error = ItemError.of(exc)
                unserved = ItemError(
                    exc.code,
                    f"model {self.name!r}: not run: another part of its batch timed out after {timeout_s} s",
                    exc.retriable,
                )
                for i in range(lo, hi):
                    outcomes[i] = ItemOutcome(self.name, error=error)
                for rest_lo, rest_hi in pending:
                    for i in range(rest_lo, rest_hi):
                        outcomes[i] = ItemOutcome(self.name, error=unserved)
                break
            except InferenceError as exc:
                if hi - lo == 1:
                    outcomes[lo] = ItemOutcome(self.name, error=ItemError.of(exc))
                    continue
                mid = (lo + hi) // 2
                logger.info(
                    "model %s: a batch of %d failed (%s); retrying it in halves of %d and %d",
                    self.name, hi - lo, exc, mid - lo, hi - mid,
                )
                pending.append((mid, hi))
                pending.append((lo, mid))
                continue
            for i, output in zip(range(lo, hi), outputs):
                outcomes[i] = ItemOutcome(self.name, output=output)
        return [o for o in outcomes if o is not None]

    async def _forward(self, items: list[Any], timeout_s: float | None) -> list[np.ndarray]:
        """One forward call on the current model thread, bounded by ``timeout_s``.

        Raises:
            InferenceError: as :meth:`run`.
            InferenceTimeoutError: the call took longer than ``timeout_s``; the
                thread running it has been abandoned and replaced.
        """
        self._check_running()
        self.forward_calls += 1
        thread = self._thread
        future = asyncio.wrap_future(thread.submit(self._run_batch, items))
        if timeout_s is None:
            return await future
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            self._abandon(thread, timeout_s, len(items))
            raise InferenceTimeoutError(
                f"model {self.name!r}: forward of {len(items)} tasks did not return within {timeout_s} s",
                timeout_s=timeout_s,
                batch_size=len(items),
            ) from None

    def _abandon(self, thread: ModelThread, timeout_s: float, batch_size: int) -> None:
        """Leave ``thread`` to its stuck forward and start a fresh one for the next batch."""
        if thread is not self._thread or self._closed:
            return
        self._thread = self._new_thread()
        thread.shutdown(wait=False)  # queued calls are cancelled; the thread ends if the forward ever returns
        self._abandoned.append(thread)
        self.abandoned_threads += 1
        logger.warning(
            "model %s: a forward of %d tasks passed its %.3f s timeout; abandoned thread %s "
            "(%d abandoned, %d still stuck) and started %s",
            self.name, batch_size, timeout_s, thread.name, self.abandoned_threads,
            self.stuck_threads, self._thread.name,
        )

    def _new_thread(self) -> ModelThread:
        name = f"autoglm-model-{self.model.name}_{self._generation}"
        self._generation += 1
        return ModelThread(name)

    # -- on the model thread ------------------------------------------------

    def _load(self) -> None:
        if self._torch_threads is not None:
            torch.set_num_threads(self._torch_threads)
        device = select_device(self._preferred_device)
        t0 = time.perf_counter()
        try:
            self.model.load(device)
        except (ModelLoadError, ConfigError):  # ConfigError: a model.yaml that the real model contradicts
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
        if threading.current_thread().name == self._thread.name:  # not a late, abandoned forward
            self.last_inference_s = time.perf_counter() - t0
        return split_outputs(out, counts)

    def _check_output(self, out: Any, total: int) -> None:
        declared = self.model.signature.outputs
        if declared is not None:
            problems = output_problems(declared, out, total)
            if problems:
                key, expected, actual = problems[0]
                raise InferenceError(
                    f"model {self.name!r}: forward returned {actual} for {key}, expected {expected}"
                )
            return
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
