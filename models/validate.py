"""``autoglm models validate``: load every model of a repository as a worker would, and time it.

For each model: parse and check its spec (keys, file, factory), build it,
load it and run its warm-up (outputs checked against ``model.yaml``), then
time two batches through the same :class:`~autoglm.models.runner.ModelRunner`
a worker uses (so every batch's outputs are checked too): one task of one row
(batch-1) and ``max_batch`` tasks of one row (the model's
``batching.max_batch_size``, else :data:`DEFAULT_MAX_BATCH`). A time is the
median of ``repeats`` runs after one untimed run.

Nothing here imports Kafka.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from autoglm.processors.errors import AutoGLMError, ModelSpecError
from autoglm.models.adapters import warmup_inputs
from autoglm.models.repository import ModelRepository, check_spec, create_model, model_version
from autoglm.models.runner import ModelRunner
from autoglm.models.spec import ModelSpec

#: Tasks in the timed large batch when ``batching.max_batch_size`` is not set: a common dynamic-batching bound.
DEFAULT_MAX_BATCH = 64


@dataclass
class Validation:
    """The outcome for one model (a row of the table, an object of ``--json``).

    Attributes:
        ok: loaded, warmed up, outputs as declared, both batches served.
        error: why not (the message names file, key and expected value for spec errors); ``None`` when ok.
        error_key: the ``model.yaml`` key at fault, when known.
        batch1_ms, max_batch_ms: median service time of one batch, milliseconds.
        max_batch: tasks (of one row each) in the large timed batch.
    """

    model: str
    format: str = "?"
    device: str = "?"
    inputs: str = ""
    outputs: str = ""
    ok: bool = False
    error: str | None = None
    error_key: str | None = None
    file: str | None = None
    batch1_ms: float | None = None
    max_batch_ms: float | None = None
    max_batch: int = 0
    version: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _time_ms(runner: ModelRunner, items: list[Any], repeats: int) -> float:
    runner.run_sync(items)  # untimed: first-call allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.run_sync(items)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def _one_row(spec: ModelSpec) -> Any:
    one = warmup_inputs(spec)
    if isinstance(one, list):
        return one[:1]
    if isinstance(one, dict):
        return {k: v[:1] for k, v in one.items()}
    return one[:1]


def validate_model(spec: ModelSpec, *, device: str | None = None, repeats: int = 5) -> Validation:
    """Validate one parsed spec (see the module docstring); never raises for the model's own faults."""
    row = Validation(model=spec.name, format=spec.format, inputs=spec.describe_inputs(),
                     outputs=spec.describe_outputs(), file=spec.source, version=model_version(spec))
    runner = None
    try:
        check_spec(spec)
        chosen = None if spec.device == "auto" else spec.device
        runner = ModelRunner(create_model(spec), device=chosen or device)
        runner.start_sync()
        row.device = runner.device or "?"
        item = runner.model.prepare(_one_row(spec))
        row.max_batch = spec.batching.max_batch_size or DEFAULT_MAX_BATCH
        row.batch1_ms = round(_time_ms(runner, [item], repeats), 3)
        row.max_batch_ms = round(_time_ms(runner, [item] * row.max_batch, repeats), 3)
        row.ok = True
    except ModelSpecError as exc:
        row.error, row.error_key, row.file = str(exc), exc.key, exc.file
    except AutoGLMError as exc:
        row.error = f"{spec.source}: {exc}"
    finally:
        if runner is not None:
            runner.close()
    return row


def validate_repository(root: str | Path, names: Iterable[str] | None = None, *, device: str | None = None,
                        repeats: int = 5) -> list[Validation]:
    """Validate the models of ``root`` (all, or ``names``), one row each, in name order.

    A model whose ``model.yaml`` cannot be parsed gets a row with the error;
    the others are still validated.

    Raises:
        ConfigError: ``root`` is not a folder.
        UnknownModelError: a name in ``names`` has no ``<root>/<name>/model.yaml``.
    """
    repo = ModelRepository(root)
    rows = []
    for name in (list(names) if names is not None else repo.names()):
        try:
            spec = repo.spec(name)
        except ModelSpecError as exc:
            rows.append(Validation(model=name, error=str(exc), error_key=exc.key, file=exc.file))
            continue
        rows.append(validate_model(spec, device=device, repeats=repeats))
    return rows
