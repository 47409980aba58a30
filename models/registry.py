"""Which models a worker can serve, by name; models are built on demand.

Factories import their model's module lazily, so importing this module does
not import transformers (or train anything).

A model may name a fallback model (another registered name) that serves its
tasks while it fails to load or keeps failing; :meth:`ModelRegistry.create_runner`
builds the pair as a :class:`~autoglm.models.fallback.FallbackRunner`.

Nothing here imports Kafka.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from autoglm.processors.errors import ConfigError, UnknownModelError
from autoglm.models.base import InferenceModel

if TYPE_CHECKING:
    from autoglm.models.fallback import FallbackRunner
    from autoglm.models.runner import ModelRunner

logger = logging.getLogger(__name__)

ModelFactory = Callable[[], InferenceModel]


@dataclass(frozen=True, slots=True)
class _Entry:
    factory: ModelFactory
    description: str
    fallback: str | None = None
    device: str | None = None


class ModelRegistry:
    """Named model factories.

    ``name in registry`` tells whether a name is registered.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(
        self, name: str, factory: ModelFactory, *, description: str = "", fallback: str | None = None,
        device: str | None = None,
    ) -> None:
        """Register ``factory`` (no arguments, returns a new unloaded model) under ``name``.

        Args:
            fallback: registry name of a model that serves ``name``'s tasks
                while it fails (see :meth:`create_runner`); it may be
                registered later, and is checked when a runner is created.
            device: the device this model must run on (``model.yaml``'s
                ``device``); overrides the ``device`` given to
                :meth:`create_runner`. ``None`` (or ``"auto"``) takes that one.

        Raises:
            ValueError: ``name`` is empty or already registered, or ``fallback``
                is ``name`` itself.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"model name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"model {name!r} is already registered")
        if fallback == name:
            raise ValueError(f"model {name!r} cannot be its own fallback")
        self._entries[name] = _Entry(factory, description, fallback, None if device == "auto" else device)

    def set_fallback(self, name: str, fallback: str | None) -> None:
        """Name (or with ``None`` remove) the fallback of the registered model ``name``.

        For fallbacks chosen by settings rather than at registration.

        Raises:
            UnknownModelError: ``name`` or ``fallback`` is not registered.
            ConfigError: ``fallback`` is ``name`` itself.
        """
        entry = self._entry(name)
        if fallback is not None:
            self._entry(fallback)
            if fallback == name:
                raise ConfigError(f"model {name!r} cannot be its own fallback")
        self._entries[name] = dataclasses.replace(entry, fallback=fallback)

    def fallback_of(self, name: str) -> str | None:
        """The fallback named for ``name``, or ``None``.

        Raises:
            UnknownModelError: ``name`` is not registered.
        """
        return self._entry(name).fallback

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
        model = self._entry(name).factory()
        if model.name != name:
            logger.warning("model registered as %r reports name %r", name, model.name)
        return model

    def create_runner(
        self,
        name: str,
        *,
        device: str | None = None,
        torch_threads: int | None = None,
        use_fallback: bool = True,
        max_failures: int | None = None,
        probe_every: int | None = None,
    ) -> "ModelRunner | FallbackRunner":
        """A new, unstarted runner for ``name``; paired with its fallback when it names one.

        Both have ``start()`` / ``start_sync()``, ``close()``, ``.model`` (the
        model of ``name``: its ``prepare`` and signature) and
        ``async run_isolated(items, *, timeout_s)``. Only one level of fallback
        is built: the fallback's own fallback is not used.

        Args:
            device, torch_threads: for each :class:`~autoglm.models.runner.ModelRunner`.
            use_fallback: ``False`` builds a plain runner even when ``name`` has a fallback.
            max_failures, probe_every: for the
                :class:`~autoglm.models.fallback.FallbackPolicy`; ``None`` keeps
                its defaults (3 and 10).

        Raises:
            UnknownModelError: ``name`` or its fallback is not registered.
            ConfigError: the fallback cannot stand in for ``name`` (input kind
                or output width differ), or a setting is out of range.
        """
        from autoglm.models.runner import ModelRunner

        fallback_name = self._entry(name).fallback if use_fallback else None
        own_device = self._entry(name).device or device
        if fallback_name is None:
            return ModelRunner(self.create(name), device=own_device, torch_threads=torch_threads)
        from autoglm.models.fallback import DEFAULT_MAX_FAILURES, DEFAULT_PROBE_EVERY, FallbackRunner

        models = (self.create(name), self.create(fallback_name))  # both known before any thread starts
        runners: list[ModelRunner] = []
        try:
            for model in models:
                runners.append(ModelRunner(model, device=self._entry(model.name).device or device
                                           if model.name in self else device, torch_threads=torch_threads))
            return FallbackRunner(
                runners[0],
                runners[1],
                max_failures=DEFAULT_MAX_FAILURES if max_failures is None else max_failures,
                probe_every=DEFAULT_PROBE_EVERY if probe_every is None else probe_every,
            )
        except ConfigError:
            for runner in runners:
                runner.close(wait=False)
            raise

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self.names()) or "(none)"
            raise UnknownModelError(f"unknown model {name!r}; known models: {known}", model=name)
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def default_registry() -> ModelRegistry:
    """A new registry with the built-in models ``digits``, ``digits-linear`` and ``minilm``.

    They are built from their specs (:mod:`autoglm.models.builtin`) by
    :func:`~autoglm.models.repository.create_model`, as repository models are.
    """
    from autoglm.models.builtin import BUILTIN_SPECS, builtin_spec

    registry = ModelRegistry()
    for name in BUILTIN_SPECS:
        spec = builtin_spec(name)
        registry.register(name, lambda spec=spec: _create(spec), description=spec.description)
    return registry


def _create(spec) -> InferenceModel:
    from autoglm.models.repository import create_model

    return create_model(spec)
