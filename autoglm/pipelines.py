"""Pipelines without a broker: validate a ``pipeline.yaml`` against a model repository, and dry-run it.

:func:`validate_file` checks a pipeline (:mod:`autoglm.processors.pipeline_spec`) with the
signatures of the models of a repository and the built-ins. :func:`dry_run` runs tasks through
the validated DAG in this process, with the real models: step by step in topological order, each
step's tasks in micro-batches of its ``max_batch_size``, through :func:`autoglm.models.steps.execute_step`
(the step code a Kafka runner shares) with the routing (``when``) and result assembly of
:mod:`autoglm.processors.routing`. Every source a join waits for is at hand in one process, so no join
times out here; :class:`~autoglm.processors.joins.JoinBuffer` is the join a broker runner needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from autoglm.models.builtin import BUILTIN_SPECS, builtin_spec
from autoglm.models.repository import ModelRepository
from autoglm.models.spec import ModelSpec
from autoglm.processors.dag import Pipeline, Step, StepError, split_latency
from autoglm.processors.routing import PipelineResult, TaskState, assemble_result, decide, gather_inputs
from autoglm.processors.errors import ConfigError, EventError, ModelSpecError, PipelineInvalidError, PipelineSpecError
from autoglm.processors.pipeline_spec import validate_pipeline

logger = logging.getLogger(__name__)

#: micro-batch size of a step whose pipeline entry and model spec set no ``max_batch_size`` (the worker's fixed-mode default)
DEFAULT_STEP_BATCH = 32


def signature_lookup(repo: ModelRepository):
    """``lookup(name) -> ModelSpec`` over ``repo`` and the built-ins (a repository model shadows a built-in).

    The lookup raises ``LookupError`` naming the repository and the known models when there is no
    such model, and quoting the ``model.yaml`` error when the spec is invalid.
    """
    mine = set(repo.names())

    def lookup(name: str) -> ModelSpec:
        if name in mine:
            try:
                return repo.spec(name)
            except ModelSpecError as exc:
                raise LookupError(f"its model.yaml is invalid: {exc}") from None
        if name in BUILTIN_SPECS:
            return builtin_spec(name)
        where = f"the repository {repo.root} or " if repo.root is not None else ""
        raise LookupError(f"no such model in {where}the built-ins; known: {', '.join(sorted(mine | set(BUILTIN_SPECS)))}")

    return lookup


def validate_file(path: str | Path, model_repo: str | Path | None = None) -> tuple[Pipeline | None, list[PipelineSpecError]]:
    """Read and validate ``path``; ``(pipeline, [])`` or ``(None, every error)``.

    Raises:
        ConfigError: ``model_repo`` is not a folder.
    """
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [PipelineSpecError(str(path), 0, "", f"cannot read the file: {exc}")]
    return validate_pipeline(text, str(path), signature_lookup(ModelRepository(model_repo)))


def load_pipeline(path: str | Path, model_repo: str | Path | None = None) -> Pipeline:
    """The validated pipeline of ``path``.

    Raises:
        PipelineInvalidError: every problem found (``.errors``).
        ConfigError: ``model_repo`` is not a folder.
    """
    pipeline, errors = validate_file(path, model_repo)
    if errors:
        raise PipelineInvalidError(errors)
    assert pipeline is not None
    return pipeline


def describe(pipeline: Pipeline) -> dict[str, Any]:
    """The DAG as ``pipeline validate`` prints it: steps in topological order, inputs, conditions, targets."""
    return {
        "name": pipeline.name, "source": pipeline.source, "input_topic": pipeline.input_topic,
        "latency_target_s": pipeline.latency_target_s,
        "steps": [{"name": s.name, "model": s.model, "inputs": [r.text for r in s.inputs],
                   "tensor_map": dict(s.tensor_map), "when": [c.text for c in s.when], "after": s.upstream(),
                   "batching": dict(s.batching), "join_window_ms": s.join_window_ms if len(s.sources()) > 1 else None,
                   "latency_target_s": s.latency_target_s, "line": s.line} for s in pipeline.steps],
        "output": {name: ref.text for name, ref in pipeline.outputs.items()},
    }


# -- samples --------------------------------------------------------------------------------


def read_samples(path: str | Path, pipeline: Pipeline) -> list[TaskState]:
    """Tasks from a JSON-lines file: one task per line, as the task event format (README "Event format").

    Only ``inputs`` is required: ``schema`` defaults to ``autoglm.task/v1``, ``id`` to
    ``sample-<line>``, ``model`` to ``pipeline:<name>``; ``attributes`` is a string map. Blank lines
    and lines starting with ``#`` are skipped.

    Raises:
        ConfigError: unreadable file, or a line that is not a valid task (file, line and field named).
    """
    import orjson

    from autoglm.streams.events import TASK_SCHEMA, decode_task

    path = Path(path)
    try:
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the samples: {exc}") from None
    tasks: list[TaskState] = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            doc = orjson.loads(line)
            if not isinstance(doc, dict):
                raise ConfigError(f"expected a JSON object (a task), got {type(doc).__name__}")
            doc = {"schema": TASK_SCHEMA, "id": f"sample-{n}", "model": f"pipeline:{pipeline.name}", **doc}
            task = decode_task(orjson.dumps(doc))
        except (orjson.JSONDecodeError, EventError, ConfigError) as exc:
            raise ConfigError(f"{path}:{n}: {exc}") from None
        tasks.append(TaskState(task.id, task.inputs, dict(task.attributes)))
    return tasks


# -- the dry run ----------------------------------------------------------------------------------


@dataclass
class StepReport:
    """What one step did in a dry run.

    Attributes:
        batch_sizes: tasks per micro-batch, in order.
        service_s: seconds each micro-batch took (prepare, forward, output split), in order.
        ran, skipped, failed: tasks that got outputs, that the step skipped, that failed in or before it.
    """

    name: str
    model: str
    latency_target_s: float | None
    batch_sizes: list[int] = field(default_factory=list)
    service_s: list[float] = field(default_factory=list)
    ran: int = 0
    skipped: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, service times in ms."""
        return {"name": self.name, "model": self.model, "latency_target_s": self.latency_target_s,
                "batch_sizes": self.batch_sizes, "service_ms": [round(s * 1e3, 3) for s in self.service_s],
                "ran": self.ran, "skipped": self.skipped, "failed": self.failed}


@dataclass
class DryRun:
    """A dry run's outcome: one result and final state per task (in input order), one report per step."""

    pipeline: Pipeline
    results: list[PipelineResult]
    states: list[TaskState]
    steps: list[StepReport]

    def measured_targets(self) -> dict[str, float]:
        """The pipeline's latency target split by the measured service times (``{}`` without a target).

        The split of :func:`~autoglm.processors.dag.split_latency` with each step's weight its mean
        service time per micro-batch here (a step that served no batch weighs the mean of the others).
        On a warm worker, batch service times differ from a dry run's; treat these as a first estimate.
        """
        total = self.pipeline.latency_target_s
        if total is None:
            return {}
        means = {r.name: sum(r.service_s) / len(r.service_s) for r in self.steps if r.service_s}
        fill = sum(means.values()) / len(means) if means else 1.0
        order = [s.name for s in self.pipeline.steps]
        deps = {s.name: s.upstream() for s in self.pipeline.steps}
        return split_latency(order, deps, {n: means.get(n) or fill for n in order}, total)

    def as_dict(self, *, values: bool = True) -> dict[str, Any]:
        """JSON-ready: per task the result (outputs as ``{dtype, shape, data}`` nested lists when
        ``values``) and the intermediate outputs' dtypes and shapes; per step its report."""
        tasks = []
        for result, state in zip(self.results, self.states):
            tasks.append({
                "id": result.id, "status": result.status, "error": result.error, "skipped": result.skipped,
                "attributes": dict(result.attributes),
                "outputs": {k: _tensor(v, values) for k, v in result.outputs.items()},
                "intermediate": {step: {k: _tensor(v, False) for k, v in outs.items()}
                                 for step, outs in state.outputs.items()},
            })
        measured = self.measured_targets()
        steps = [{**s.as_dict(), "measured_latency_target_s": measured.get(s.name)} for s in self.steps]
        return {"pipeline": self.pipeline.name, "tasks": tasks, "steps": steps}


def _tensor(value: Any, values: bool) -> dict[str, Any]:
    array = np.asarray(value)
    out: dict[str, Any] = {"dtype": str(array.dtype), "shape": list(array.shape)}
    if values:
        out["data"] = array.tolist()
    return out


def step_batch_size(step: Step, spec: ModelSpec) -> int:
    """The step's ``max_batch_size``, else its model's (``model.yaml``), else :data:`DEFAULT_STEP_BATCH`."""
    return int(step.batching.get("max_batch_size") or spec.batching.max_batch_size or DEFAULT_STEP_BATCH)


def dry_run(pipeline: Pipeline, tasks: Sequence[TaskState], *, model_repo: str | Path | None = None,
            device: str | None = "cpu", timeout_s: float | None = None) -> DryRun:
    """Run ``tasks`` through ``pipeline`` in this process with the real models (loaded here, closed after).

    Args:
        pipeline: a validated pipeline.
        tasks: the tasks; their states are filled in place.
        model_repo: the repository the pipeline was validated against.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``None``/``auto``.
        timeout_s: seconds one forward may take (``None``: no limit).

    Raises:
        ModelLoadError, ModelSpecError: a model could not be built or loaded.
    """
    return asyncio.run(_dry_run(pipeline, list(tasks), model_repo, device, timeout_s))


async def _dry_run(pipeline: Pipeline, tasks: list[TaskState], model_repo: Any, device: str | None,
                   timeout_s: float | None) -> DryRun:
    from autoglm.models.runner import ModelRunner

    repo = ModelRepository(model_repo)
    lookup = signature_lookup(repo)
    specs = {s.model: lookup(s.model) for s in pipeline.steps}
    runners: dict[str, ModelRunner] = {}
    try:
        for model in specs:
            runners[model] = ModelRunner(repo.create(model), device=None if device == "auto" else device)
            await runners[model].start()
        input_names = pipeline.input_names
        reports = []
        for step in pipeline.steps:
            reports.append(await _run_step(step, specs[step.model], runners[step.model], tasks, input_names,
                                           timeout_s))
    finally:
        for runner in runners.values():
            runner.close()
    return DryRun(pipeline, [assemble_result(pipeline, t) for t in tasks], tasks, reports)


async def _run_step(step: Step, spec: ModelSpec, runner: Any, tasks: list[TaskState], input_names: Sequence[str],
                    timeout_s: float | None) -> StepReport:
    from autoglm.models.steps import execute_step

    report = StepReport(step.name, step.model, step.latency_target_s)
    todo: list[TaskState] = []
    for task in tasks:
        verdict = decide(step, task)
        if verdict is None:
            todo.append(task)
        elif isinstance(verdict, StepError):
            task.errors[step.name] = verdict
            report.failed += 1
        else:
            task.skipped[step.name] = verdict
            report.skipped += 1
    size = step_batch_size(step, spec)
    model_inputs = [t.name for t in spec.inputs]
    outputs = [o.name for o in spec.outputs]
    for start in range(0, len(todo), size):
        chunk = todo[start:start + size]
        t0 = time.perf_counter()
        outs = await execute_step(runner, [gather_inputs(step, t, model_inputs, input_names) for t in chunk],
                                  outputs, timeout_s=timeout_s)
        report.service_s.append(time.perf_counter() - t0)
        report.batch_sizes.append(len(chunk))
        for task, out in zip(chunk, outs):
            if isinstance(out, StepError):
                task.errors[step.name] = out
                report.failed += 1
            else:
                task.outputs[step.name] = out
                report.ran += 1
    logger.info("step %s: %d ran, %d skipped, %d failed in %d batches", step.name, report.ran, report.skipped,
                report.failed, len(report.batch_sizes))
    return report
