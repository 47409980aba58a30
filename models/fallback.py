"""Serve a model's tasks with a fallback model while the primary fails to load or keeps failing.

A circuit breaker counted in batches, so that it needs no clock
(:class:`FallbackPolicy`, pure), and the runner that follows it
(:class:`FallbackRunner`, same ``run_isolated`` as
:class:`~autoglm.models.runner.ModelRunner`).

States of the primary::

    healthy ──(max_failures batches in a row with no task served)──► degraded
       ▲                                                                │
       └──────────(a probe batch serves at least one task)──────────────┘

While degraded, the fallback serves every batch except every
``probe_every``-th, which goes to the primary first (a probe). A primary that
failed to load starts degraded; its probe is a new load attempt in the
background while the fallback serves the batch, and a successful load makes
it healthy again.

Nothing here imports Kafka.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

import numpy as np

from autoglm.processors.errors import ConfigError, InferenceError, ModelError, ModelLoadError
from autoglm.models.base import InferenceModel
from autoglm.models.runner import ItemError, ItemOutcome, ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_MAX_FAILURES = 3
DEFAULT_PROBE_EVERY = 10


class FallbackPolicy:
    """Which model serves the next batch; told what happened, never looks at a clock.

    Args:
        max_failures: consecutive failed primary batches (batches in which no
            task got an output) after which the primary is degraded; default 3,
            the "three strikes" of common circuit breakers: one failed batch
            can be a single poisoned task, three in a row are rarely chance.
        probe_every: while degraded, every ``probe_every``-th batch is tried on
            the primary first; default 10, so a broken primary costs at most
            one failed (or timed-out) batch in ten while recovery is noticed
            within ten batches.

    Raises:
        ConfigError: either argument is < 1.
    """

    def __init__(self, *, max_failures: int = DEFAULT_MAX_FAILURES, probe_every: int = DEFAULT_PROBE_EVERY):
        if max_failures < 1:
            raise ConfigError(f"max_failures must be >= 1, got {max_failures!r}")
        if probe_every < 1:
            raise ConfigError(f"probe_every must be >= 1, got {probe_every!r}")
        self.max_failures = max_failures
        self.probe_every = probe_every
        self.consecutive_failures = 0
        self.degraded = False
        self._since_probe = 0

    def use_primary(self) -> bool:
        """Whether the next batch goes to the primary; call once per batch (it counts probes)."""
        if not self.degraded:
            return True
        self._since_probe += 1
        if self._since_probe >= self.probe_every:
            self._since_probe = 0
            return True
        return False

    def record(self, primary_ok: bool) -> None:
        """What a batch tried on the primary came to: ``True`` when it served at least one task."""
        if primary_ok:
            self.consecutive_failures = 0
            self.degraded = False
            return
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.max_failures and not self.degraded:
            self.degraded = True
            self._since_probe = 0

    def primary_down(self) -> None:
        """The primary is unusable (it failed to load): degrade now."""
        self.consecutive_failures = max(self.consecutive_failures, self.max_failures)
        if not self.degraded:
            self.degraded = True
            self._since_probe = 0


class FallbackRunner:
    """A primary :class:`ModelRunner` whose tasks a fallback runner serves while it fails.

    The two models must take the same prepared inputs and give rows of the
    same width: tasks are prepared by the primary's ``prepare`` (the pipeline
    uses :attr:`model`) and the fallback's ``collate`` gets them unchanged.

    Routing per batch (see the module docstring and :class:`FallbackPolicy`):

    - primary healthy, or a probe: the primary runs the batch with
      :meth:`ModelRunner.run_isolated`; with ``retry_on_fallback`` the tasks
      it failed (isolated errors and timeouts) are run again on the fallback.
      A batch in which the primary served no task counts as a failure.
    - primary degraded: the fallback runs the batch.

    Worst case per batch: the primary's bisection and timeout, then the
    fallback's on the tasks that failed, so up to ``2 * timeout_s`` of waiting.

    Args:
        primary: the model the tasks name; constructed, not started.
        fallback: the model that stands in; constructed, not started.
        max_failures, probe_every: see :class:`FallbackPolicy` (defaults 3 and 10).
        retry_on_fallback: run the tasks the primary failed on the fallback
            too (default ``True``).

    Attributes:
        primary, fallback: the two runners.
        policy: the :class:`FallbackPolicy`.
        fallback_tasks: tasks the fallback has served (with an output) so far.

    Raises:
        ConfigError: the two models have the same name, or differ in input
            kind, output width or declared outputs (the message names both signatures).
    """

    def __init__(
        self,
        primary: ModelRunner,
        fallback: ModelRunner,
        *,
        max_failures: int = DEFAULT_MAX_FAILURES,
        probe_every: int = DEFAULT_PROBE_EVERY,
        retry_on_fallback: bool = True,
    ):
        p, f = primary.model.signature, fallback.model.signature
        if primary.name == fallback.name:
            raise ConfigError(f"model {primary.name!r} cannot be its own fallback")
        if p.input_kind != f.input_kind or p.output_dim != f.output_dim or p.outputs != f.outputs:
            raise ConfigError(
                f"model {fallback.name!r} cannot stand in for {primary.name!r}: it takes {f.input_kind} "
                f"and gives {f.output} (rows of {f.output_dim}), the primary takes {p.input_kind} "
                f"and gives {p.output} (rows of {p.output_dim})"
            )
        self.primary = primary
        self.fallback = fallback
        self.policy = FallbackPolicy(max_failures=max_failures, probe_every=probe_every)
        self.retry_on_fallback = retry_on_fallback
        self.fallback_tasks = 0
        self._reload: asyncio.Future[None] | None = None

    # -- what the pipeline and the worker read ---------------------------------

    @property
    def model(self) -> InferenceModel:
        """The primary's model: its ``name``, ``signature`` and ``prepare`` apply to every task."""
        return self.primary.model

    @property
    def name(self) -> str:
        """The primary's registry name."""
        return self.primary.name

    @property
    def started(self) -> bool:
        """Whether either model is loaded (tasks can be served)."""
        return self.primary.started or self.fallback.started

    @property
    def degraded(self) -> bool:
        """Whether the fallback is serving instead of the primary."""
        return self.policy.degraded

    @property
    def forward_calls(self) -> int:
        """Forward calls of both models so far (see :attr:`ModelRunner.forward_calls`)."""
        return self.primary.forward_calls + self.fallback.forward_calls

    @property
    def abandoned_threads(self) -> int:
        """Model threads both models left behind after timeouts (see :attr:`ModelRunner.abandoned_threads`)."""
        return self.primary.abandoned_threads + self.fallback.abandoned_threads

    @property
    def device(self) -> str | None:
        """The device of the model that serves now (the primary's unless it is not loaded)."""
        return (self.primary if self.primary.started else self.fallback).device

    @property
    def load_s(self) -> float | None:
        """Load seconds of the model that serves now, as :attr:`device`."""
        return (self.primary if self.primary.started else self.fallback).load_s

    @property
    def last_inference_s(self) -> float | None:
        """Seconds of the last batch of the primary (or of the fallback when the primary is not loaded)."""
        return (self.primary if self.primary.started else self.fallback).last_inference_s

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Load both models (the fallback too, so that it is warm when needed).

        A primary that fails to load is logged and degraded (the fallback
        serves, the primary is tried again on probes); a fallback that fails
        to load is logged and the primary serves alone.

        Raises:
            ModelLoadError: both models failed to load (the message names both).
        """
        primary_error = fallback_error = None
        try:
            await self.primary.start()
        except ModelLoadError as exc:
            primary_error = exc
        try:
            await self.fallback.start()
        except ModelLoadError as exc:
            fallback_error = exc
        self._after_start(primary_error, fallback_error)

    def start_sync(self) -> None:
        """:meth:`start` for offline use and for a worker that loads before its loop runs.

        Raises:
            ModelLoadError: as :meth:`start`.
        """
        primary_error = fallback_error = None
        try:
            self.primary.start_sync()
        except ModelLoadError as exc:
            primary_error = exc
        try:
            self.fallback.start_sync()
        except ModelLoadError as exc:
            fallback_error = exc
        self._after_start(primary_error, fallback_error)

    def _after_start(self, primary_error: ModelLoadError | None, fallback_error: ModelLoadError | None) -> None:
        if primary_error is not None and fallback_error is not None:
            raise ModelLoadError(
                f"model {self.name!r} and its fallback {self.fallback.name!r} both failed to load: "
                f"{primary_error}; {fallback_error}"
            )
        if primary_error is not None:
            logger.error(
                "model %s failed to load (%s); its fallback %s serves its tasks, the load is retried every %d batches",
                self.name, primary_error, self.fallback.name, self.policy.probe_every,
            )
            self.policy.primary_down()
        if fallback_error is not None:
            logger.error("fallback %s of model %s failed to load (%s); %s serves alone",
                         self.fallback.name, self.name, fallback_error, self.name)

    async def settle(self) -> None:
        """Wait until a load retry of the primary in progress (if any) has finished.

        Its outcome applies from the next batch on. For shutdown and tests.
        """
        if self._reload is not None:
            await asyncio.wait({self._reload})

    def close(self, *, wait: bool = True) -> None:
        """Close both runners and drop a load retry in progress."""
        if self._reload is not None and not self._reload.done():
            self._reload.cancel()
        self.primary.close(wait=wait)
        self.fallback.close(wait=wait)

    # -- inference ------------------------------------------------------------------

    async def run_isolated(self, items: Sequence[Any], *, timeout_s: float | None) -> list[ItemOutcome]:
        """Run one micro-batch on the primary or the fallback, as the policy says.

        Args:
            items: tasks prepared by ``self.model.prepare``, in order.
            timeout_s: seconds one forward call may take (> 0), or ``None``;
                see :meth:`ModelRunner.run_isolated`.

        Returns:
            One :class:`ItemOutcome` per item, in order; ``served_by`` names
            the model that produced the output (or that failed last). An
            error after a retry on the fallback has the fallback's code, and a
            message naming both failures.

        Raises:
            ConfigError: ``timeout_s`` is not ``None`` and not > 0.
            ModelError: neither model is loaded, or the runner is closed.
        """
        batch = list(items)
        if not batch:
            return []
        self._collect_reload()
        fallback_ready = self.fallback.started
        if self.policy.use_primary() or not fallback_ready:
            if self.primary.started or not fallback_ready:
                return await self._on_primary(batch, timeout_s, retry=fallback_ready and self.retry_on_fallback)
            self._start_reload()
        return self._count(await self.fallback.run_isolated(batch, timeout_s=timeout_s))

    async def run(self, items: Sequence[Any]) -> list[np.ndarray]:
        """:meth:`run_isolated` with no timeout, in the shape of :meth:`ModelRunner.run`.

        Returns:
            One float32 array ``(rows_i, output_dim)`` per item, in order.

        Raises:
            InferenceError: some task got no output from either model (the
                first such error's message).
            ModelError: as :meth:`run_isolated`.
        """
        outcomes = await self.run_isolated(items, timeout_s=None)
        for outcome in outcomes:
            if outcome.error is not None:
                raise InferenceError(outcome.error.message)
        return [o.output for o in outcomes if o.output is not None]

    async def _on_primary(self, batch: list[Any], timeout_s: float | None, *, retry: bool) -> list[ItemOutcome]:
        outcomes = await self.primary.run_isolated(batch, timeout_s=timeout_s)
        served = any(o.ok for o in outcomes)
        was_degraded = self.policy.degraded
        self.policy.record(served)
        if was_degraded and served:
            logger.warning("model %s is serving again; its fallback %s stands down", self.name, self.fallback.name)
        elif self.policy.degraded and not was_degraded:
            logger.error(
                "model %s failed %d batches in a row; its fallback %s serves its tasks (primary probed every %d batches)",
                self.name, self.policy.consecutive_failures, self.fallback.name, self.policy.probe_every,
            )
        failed = [i for i, o in enumerate(outcomes) if not o.ok]
        if not (retry and failed):
            return outcomes
        retried = self._count(await self.fallback.run_isolated([batch[i] for i in failed], timeout_s=timeout_s))
        for i, again in zip(failed, retried):
            first = outcomes[i].error
            if again.error is not None and first is not None:
                again = ItemOutcome(
                    again.served_by,
                    error=ItemError(
                        again.error.code,
                        f"{again.error.message} (after model {self.name!r} failed: {first.message})",
                        again.error.retriable,
                    ),
                )
            outcomes[i] = again
        return outcomes

    def _count(self, outcomes: list[ItemOutcome]) -> list[ItemOutcome]:
        self.fallback_tasks += sum(1 for o in outcomes if o.ok)
        return outcomes

    # -- reloading a primary that failed to load ---------------------------------

    def _start_reload(self) -> None:
        if self._reload is None:
            logger.info("model %s: trying to load it again in the background", self.name)
            self._reload = asyncio.ensure_future(self.primary.start())

    def _collect_reload(self) -> None:
        reload, self._reload = self._reload, None
        if reload is None:
            return
        if not reload.done():
            self._reload = reload
            return
        if reload.cancelled():
            return
        exc = reload.exception()
        if exc is None:
            logger.warning("model %s loaded on retry; it serves its tasks again", self.name)
            self.policy.record(True)
        elif isinstance(exc, ModelError):
            logger.error("model %s: load retry failed: %s", self.name, exc)
        else:
            logger.error("model %s: load retry failed: %r", self.name, exc)
