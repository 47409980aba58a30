"""The models a worker serves, loaded, swapped and unloaded at run time (``ctl load/unload/reload``).

:class:`ModelHost` owns a ``{name: runner}`` mapping (the one the worker's
pipeline reads). Every slow step runs off the event loop: the spec is read and
the factory imported on a worker thread (``asyncio.to_thread``), weights are
loaded and warmed up on the new runner's own model thread
(:meth:`~autoglm.models.runner.ModelRunner.start`), and an old runner is closed
on a thread. Triton's explicit model control is the model for the semantics:

- ``load``: a model not served yet is built from the repository (or the
  built-ins), loaded, warmed up, and only then added to :attr:`ModelHost.runners`.
- ``reload``: the repository is read afresh and a new runner loaded beside
  the old one, which keeps serving meanwhile; on success the mapping points
  at the new one and the old is closed after its forward in progress ends; on
  failure the old version keeps serving and the error is raised (the worker
  acknowledges it).
- ``unload``: the caller first drains the model's tasks (its results
  published, offsets committed; see ``drain``), then the runner is removed,
  closed, and its memory released (``gc.collect`` and, on a GPU,
  ``torch.cuda.empty_cache``).

Versions (:meth:`ModelHost.versions`) are the file hash and mtime of
:func:`~autoglm.models.repository.model_version`, for heartbeats.

Nothing here imports Kafka.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any, Awaitable, Callable

from autoglm.processors.errors import AutoGLMError, ModelError, ModelLoadError, UnknownModelError
from autoglm.models.fallback import FallbackRunner
from autoglm.models.repository import ModelRepository, model_version

logger = logging.getLogger(__name__)

#: ``on_change(name, runner)``: ``runner`` is the new runner, or ``None`` once ``name`` is unloaded.
ChangeHook = Callable[[str, Any], None]


class ModelHost:
    """Loads, reloads and unloads the runners of one worker.

    Args:
        repository: where models come from (a folder, or the built-ins only).
        runners: the mapping the worker serves from, changed in place (a new
            dict when omitted); models already in it count as loaded, their
            version read from the repository's files now.
        device, torch_threads, max_failures, probe_every: for
            :meth:`~autoglm.models.registry.ModelRegistry.create_runner`.
        on_change: called on the event loop after a model is added, swapped or
            removed, so the worker can set up or drop its per-model state
            (batching policy, metrics, topic subscription).

    Attributes:
        runners: ``{name: ModelRunner | FallbackRunner}`` being served.
    """

    def __init__(self, repository: ModelRepository, runners: dict[str, Any] | None = None, *,
                 device: str | None = None, torch_threads: int | None = None, max_failures: int | None = None,
                 probe_every: int | None = None, on_change: ChangeHook | None = None):
        self.repository = repository
        self.runners: dict[str, Any] = runners if runners is not None else {}
        self._versions: dict[str, dict[str, Any]] = {}
        for name in self.runners:  # the files they were loaded from at start, as read now
            try:
                self._versions.update(repository.versions([name]))
            except (KeyError, AutoGLMError):  # a runner of a model the repository does not know
                self._versions[name] = {}
        self._runner_kwargs = dict(device=device, torch_threads=torch_threads, max_failures=max_failures,
                                   probe_every=probe_every)
        self._on_change = on_change
        self._locks: dict[str, asyncio.Lock] = {}

    # -- queries ---------------------------------------------------------------------

    def versions(self) -> dict[str, dict[str, Any]]:
        """``{name: {"sha256", "mtime_ms"} (or {"builtin": True}), "device", "load_s"}`` per served model."""
        out = {}
        for name, runner in self.runners.items():
            out[name] = dict(self._versions.get(name, {}), device=runner.device, load_s=runner.load_s)
        return out

    # -- commands --------------------------------------------------------------------

    async def load(self, name: str) -> dict[str, Any]:
        """Build, load and warm up ``name``, then serve it; nothing to do when it is served already.

        Returns:
            Its entry of :meth:`versions`.

        Raises:
            UnknownModelError: neither in the repository nor built in.
            ModelSpecError: its ``model.yaml`` is invalid or contradicted by the warm-up.
            ModelLoadError: its weights could not be loaded.
        """
        async with self._lock(name):
            if name not in self.runners:
                runner, version = await self._build(name)
                self._install(name, runner, version)
            return self.versions()[name]

    async def reload(self, name: str) -> dict[str, Any]:
        """Load ``name`` afresh from the repository and swap it in; the old version serves until then.

        A model not served yet is loaded. On failure the old version keeps
        serving and the error propagates.

        Returns:
            The new entry of :meth:`versions`.

        Raises:
            as :meth:`load`.
        """
        async with self._lock(name):
            old = self.runners.get(name)
            runner, version = await self._build(name)
            if old is not None and isinstance(runner, FallbackRunner) and not runner.primary.started:
                # its fallback would serve: a failed reload, so the old version stays (Triton's rule)
                await asyncio.to_thread(runner.close, wait=True)
                raise ModelLoadError(f"model {name!r}: the new version failed to load; the old version keeps serving")
            self._install(name, runner, version)
            if old is not None:
                await asyncio.to_thread(old.close, wait=True)
                logger.info("model %s: reloaded (%s); the old version is closed", name, version)
            return self.versions()[name]

    async def unload(self, name: str, drain: Callable[[str], Awaitable[Any]] | None = None) -> dict[str, Any]:
        """Stop serving ``name``: ``await drain(name)`` first, then close its runner and release memory.

        Args:
            drain: waits until every task of ``name`` in flight has its result
                published and its offset committed (the worker's); ``None``
                closes at once (in-flight batches are cancelled).

        Returns:
            ``{"unloaded": True}``, or ``{"unloaded": False}`` when it was not served.
        """
        async with self._lock(name):
            runner = self.runners.get(name)
            if runner is None:
                return {"unloaded": False}
            if drain is not None:
                await drain(name)
            del self.runners[name]
            self._versions.pop(name, None)
            if self._on_change is not None:
                self._on_change(name, None)
            await asyncio.to_thread(runner.close, wait=True)
            del runner
            await asyncio.to_thread(_release_memory)
            logger.info("model %s: unloaded", name)
            return {"unloaded": True}

    async def close(self) -> None:
        """Close every runner (on a thread each)."""
        runners = list(self.runners.values())
        self.runners.clear()  # in place: the worker's pipeline reads this very mapping
        await asyncio.gather(*(asyncio.to_thread(r.close, wait=True) for r in runners))

    # -- internals ---------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _build(self, name: str) -> tuple[Any, dict[str, Any]]:
        """A started runner of ``name`` read afresh, and its version; nothing is left running on failure."""
        def create():
            if name in self.repository.names():
                spec = self.repository.spec(name)
                registry = self.repository.registry([name] + ([spec.fallback] if spec.fallback else []))
                return registry.create_runner(name, **self._runner_kwargs), model_version(spec)
            if name in self.repository.builtin_names():
                registry = self.repository.registry([name])
                return registry.create_runner(name, **self._runner_kwargs), {"builtin": True}
            raise UnknownModelError(f"unknown model {name!r}; the repository and the built-ins have: "
                                    f"{', '.join(self.repository.names() + self.repository.builtin_names())}",
                                    model=name)

        runner, version = await asyncio.to_thread(create)
        try:
            await runner.start()
        except BaseException:
            await asyncio.to_thread(runner.close, wait=False)
            raise
        if not runner.started:
            raise ModelError(f"model {name!r}: runner did not start")
        return runner, version

    def _install(self, name: str, runner: Any, version: dict[str, Any]) -> None:
        self.runners[name] = runner
        self._versions[name] = version
        if self._on_change is not None:
            self._on_change(name, runner)
        logger.info("model %s: serving version %s on %s", name, version, runner.device)


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception as exc:  # releasing is best effort
        logger.debug("cuda cache not emptied: %r", exc)
