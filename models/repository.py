"""A model repository: ``DIR/<name>/model.yaml`` folders, plus the built-in models.

::

    repo/
      classifier/                 one model per folder; the folder name is the model name
        model.yaml                (see autoglm.models.spec)
        model.pt
      ranker/
        model.yaml                format: onnx
        ranker.onnx
      tagger/
        model.yaml                format: python, factory: "tagger_model:make"
        tagger_model.py           the model folder is importable

:class:`ModelRepository` reads the specs, checks every one of them before any
model is built (:meth:`ModelRepository.check`: files exist, factories import,
onnxruntime is installed), creates fresh unloaded models
(:func:`create_model`), and builds the :class:`~autoglm.models.registry.ModelRegistry`
a worker serves from: the repository's models beside the built-ins
(``digits``, ``digits-linear``, ``minilm``, whose specs live in
:mod:`autoglm.models.builtin`; a repository model of the same name takes its
place).

Nothing here imports Kafka; torch and onnxruntime are imported only when a
model is created or loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterable

from autoglm.processors.errors import ConfigError, ModelSpecError, UnknownModelError
from autoglm.models.base import InferenceModel
from autoglm.models.registry import ModelRegistry, default_registry
from autoglm.models.spec import SPEC_FILE, ModelSpec, read_spec

logger = logging.getLogger(__name__)


def _import_factory(spec: ModelSpec) -> Any:
    """The factory callable of a ``python`` spec; the model folder is put on ``sys.path`` first.

    A module already imported from this model folder is imported afresh, so a
    reload picks up edited code. Module names must therefore be unique across
    a repository's python models.

    Raises:
        ModelSpecError: key ``factory``: the module cannot be imported (the
            import error is quoted), the attribute is missing or not callable.
    """
    assert spec.factory is not None
    module_name, _, attr_path = spec.factory.partition(":")
    if spec.folder is not None:
        folder = str(spec.folder.resolve())
        if folder not in sys.path:
            sys.path.insert(0, folder)
        for name, module in list(sys.modules.items()):
            origin = getattr(module, "__file__", None) or ""
            if origin.startswith(folder + "/") and (name == module_name.split(".")[0]
                                                    or name.startswith(module_name.split(".")[0] + ".")):
                del sys.modules[name]
    expected = "an importable 'package.module:callable' (the model folder is on sys.path)"
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # user code: ImportError, SyntaxError, anything it raises at import
        raise ModelSpecError(spec.source, "factory", expected, f"{spec.factory!r}: {exc!r}") from None
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ModelSpecError(spec.source, "factory", expected,
                                 f"{spec.factory!r}: module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise ModelSpecError(spec.source, "factory", "a callable", f"{spec.factory!r} is {type(target).__name__}")
    return target


def check_spec(spec: ModelSpec) -> None:
    """Check what a spec refers to, without loading weights: the file, the factory, the runtime.

    Raises:
        ModelSpecError: key ``file`` (missing file), ``factory`` (see
            :func:`_import_factory`) or ``format`` (onnxruntime not installed).
    """
    if spec.file is not None and not spec.file.is_file():
        raise ModelSpecError(spec.source, "file", "an existing file, relative to the model folder", str(spec.file))
    if spec.format == "python":
        _import_factory(spec)
    if spec.format == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            from autoglm.models.formats import ONNX_HINT

            raise ModelSpecError(spec.source, "format", f"onnxruntime installed for 'onnx' ({ONNX_HINT})",
                                 repr(exc)) from None


def create_model(spec: ModelSpec) -> InferenceModel:
    """A new, unloaded model for ``spec`` (the format's adapter, or the factory's model).

    Raises:
        ModelSpecError: the factory cannot be imported, raises, or does not
            return an :class:`InferenceModel`.
    """
    from autoglm.models.adapters import CheckedModel, RepositoryModel
    from autoglm.models.formats import ExportedModel, OnnxModel, TorchScriptModel

    if spec.format == "torchscript":
        return TorchScriptModel(spec)
    if spec.format == "exported":
        if spec.text:
            raise ModelSpecError(spec.source, "inputs", "tensor inputs for format 'exported'", "text: true")
        return ExportedModel(spec)
    if spec.format == "onnx":
        return OnnxModel(spec)
    factory = _import_factory(spec)
    try:
        model = factory(spec)
    except ModelSpecError:
        raise
    except Exception as exc:
        raise ModelSpecError(spec.source, "factory", "a callable that takes the spec and returns an InferenceModel",
                             f"{spec.factory!r} raised {exc!r}") from None
    if not isinstance(model, InferenceModel):
        raise ModelSpecError(spec.source, "factory", "a callable returning an autoglm InferenceModel",
                             f"{spec.factory!r} returned {type(model).__name__}")
    if isinstance(model, RepositoryModel):
        return model
    return CheckedModel(spec, model)


def model_version(spec: ModelSpec) -> dict[str, Any]:
    """What identifies the version of a model on disk, for heartbeats and ``models list``.

    Returns:
        ``{"sha256": first 16 hex digits over model.yaml and the model file,
        "mtime_ms": latest modification time of the two, epoch ms}``; for a
        built-in ``{"sha256": None, "mtime_ms": None, "builtin": True}``.
    """
    if spec.folder is None:
        return {"sha256": None, "mtime_ms": None, "builtin": True}
    digest = hashlib.sha256()
    mtime_ns = 0
    for path in (Path(spec.source), spec.file):
        if path is None or not path.is_file():
            continue
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        mtime_ns = max(mtime_ns, path.stat().st_mtime_ns)
    return {"sha256": digest.hexdigest()[:16], "mtime_ms": mtime_ns // 1_000_000}


class ModelRepository:
    """The models of one repository folder, and the built-ins beside them.

    Args:
        root: the repository folder, or ``None`` for the built-ins alone.

    Raises:
        ConfigError: ``root`` is given but is not a folder.
    """

    def __init__(self, root: str | Path | None):
        self.root = Path(root).expanduser() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ConfigError(f"model repository {str(self.root)!r} (AUTOGLM_MODEL_REPO / --model-repo) "
                              "is not a folder")

    def names(self) -> list[str]:
        """Names of the repository's models (folders holding a ``model.yaml``), sorted; none without a root."""
        if self.root is None:
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{SPEC_FILE}") if p.is_file())

    def builtin_names(self) -> list[str]:
        """The built-in models' names that no repository model shadows."""
        mine = set(self.names())
        return [n for n in default_registry().names() if n not in mine]

    def spec(self, name: str) -> ModelSpec:
        """Read (afresh) and parse the spec of repository model ``name``.

        Raises:
            UnknownModelError: no ``DIR/<name>/model.yaml``.
            ModelSpecError: the file is invalid.
        """
        if self.root is None or not (self.root / name / SPEC_FILE).is_file():
            raise UnknownModelError(f"no model {name!r} in repository {self.root}; it has: "
                                    f"{', '.join(self.names()) or '(none)'}", model=name)
        return read_spec(self.root / name / SPEC_FILE)

    def check(self, names: Iterable[str] | None = None) -> dict[str, ModelSpec]:
        """Parse and check (:func:`check_spec`) the specs of ``names`` (default: every repository model).

        Built-in names among ``names`` are accepted and skipped. Every spec is
        checked before anything is built, so an error means no model of the
        set was started.

        Returns:
            name -> spec for the repository models among ``names``.

        Raises:
            ModelSpecError: the first invalid spec (file, key and expected value named).
            UnknownModelError: a name is neither in the repository nor built in;
                a ``fallback`` names neither.
        """
        mine = set(self.names())
        wanted = list(names) if names is not None else sorted(mine)
        builtins = set(default_registry().names())
        specs: dict[str, ModelSpec] = {}
        for name in wanted:
            if name in mine:
                specs[name] = self.spec(name)
                check_spec(specs[name])
            elif name not in builtins:
                known = ", ".join(sorted(mine | builtins))
                raise UnknownModelError(f"unknown model {name!r}; the repository and the built-ins have: {known}",
                                        model=name)
        for spec in specs.values():
            if spec.fallback is not None and spec.fallback not in mine | builtins:
                raise ModelSpecError(spec.source, "fallback", "a model of the repository or a built-in",
                                     spec.fallback)
        return specs

    def registry(self, names: Iterable[str] | None = None) -> ModelRegistry:
        """A registry of the built-ins plus the repository models, their fallbacks set from the specs.

        Args:
            names: the models to check first (default: every repository model);
                every repository model is registered, so fallbacks resolve.

        Raises:
            ModelSpecError, UnknownModelError: as :meth:`check`.
        """
        specs = self.check(names)
        registry = ModelRegistry()
        base = default_registry()
        mine = self.names()
        for name in base.names():
            if name not in mine:
                registry.register(name, lambda n=name: base.create(n), description=base.descriptions()[name],
                                  fallback=base.fallback_of(name))
        for name in mine:
            spec = specs.get(name)
            registry.register(name, lambda n=name: self._create_checked(n, specs),
                              description=spec.description if spec else "", device=spec.device if spec else None)
        for spec in specs.values():
            if spec.fallback is not None:
                registry.set_fallback(spec.name, spec.fallback)
        return registry

    def _create_checked(self, name: str, checked: dict[str, ModelSpec]) -> InferenceModel:
        spec = checked.get(name)
        if spec is None:
            spec = self.spec(name)
            check_spec(spec)
        return create_model(spec)

    def create(self, name: str) -> InferenceModel:
        """A new, unloaded model: repository ``name`` read afresh, or a built-in.

        Raises:
            ModelSpecError, UnknownModelError.
        """
        if name in self.names():
            spec = self.spec(name)
            check_spec(spec)
            return create_model(spec)
        return default_registry().create(name)

    def batching_defaults(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """``{model: params}``: each model's ``batching`` from its spec, as ``ctl configure`` parameters.

        For the worker to apply to each model's batching policy at start
        (``policy.configure(**params)``, the path ``ctl configure`` takes), so
        that a later ``configure`` overrides them. Built-ins and models with
        no ``batching`` give ``{}``.
        """
        mine = set(self.names())
        return {name: (self.spec(name).batching.as_params() if name in mine else {}) for name in names}

    def versions(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """``{model: model_version(spec)}`` for heartbeats (``{"builtin": True, ...}`` for built-ins)."""
        from autoglm.models.builtin import builtin_spec

        mine = set(self.names())
        return {name: model_version(self.spec(name) if name in mine else builtin_spec(name)) for name in names}

    def describe(self) -> list[dict[str, Any]]:
        """One row per model for ``autoglm models list``: name, source, format, inputs, outputs, max_rows,
        fallback, version, and ``error`` for a repository model whose spec is invalid."""
        rows: list[dict[str, Any]] = []
        for name in self.names():
            try:
                spec = self.spec(name)
            except ModelSpecError as exc:
                rows.append({"name": name, "source": "repository", "error": str(exc)})
                continue
            rows.append({"name": name, "source": "repository", "format": spec.format,
                         "inputs": spec.describe_inputs(), "outputs": spec.describe_outputs(),
                         "max_rows": spec.max_rows, "device": spec.device, "fallback": spec.fallback,
                         "description": spec.description, "version": model_version(spec)})
        from autoglm.models.builtin import builtin_spec

        for name in self.builtin_names():
            spec = builtin_spec(name)
            rows.append({"name": name, "source": "built-in", "format": spec.format, "inputs": spec.describe_inputs(),
                         "outputs": spec.describe_outputs(), "max_rows": spec.max_rows, "device": spec.device,
                         "fallback": spec.fallback, "description": spec.description, "version": model_version(spec)})
        return rows
