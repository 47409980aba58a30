"""One task through a pipeline: its inputs per step, its routing (``when``), its result.

Per-task state is a :class:`TaskState`: the task's inputs and attributes, and for each decided
step its named outputs, a skip reason or a :class:`~autoglm.processors.dag.StepError`. A runner
(the dry run, or a Kafka runner) decides each step in topological order with :func:`decide`,
gathers a running step's model inputs with :func:`gather_inputs`, names its outputs with
:func:`name_outputs`, and builds the result with :func:`assemble_result`.

Pure: no Kafka, no torch, no clock reads (numpy only, to reduce a row in ``when``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from autoglm.processors.dag import INPUT, OPERATORS, REDUCERS, Condition, Pipeline, Ref, Step, StepError

SKIPPED = "skipped"


@dataclass
class TaskState:
    """One task on its way through a pipeline.

    Attributes:
        id: the task id.
        inputs: the task's inputs: one array, ``list[str]`` of texts, or ``{name: array}``.
        attributes: the task's string attributes.
        outputs: step -> its named outputs ``{name: array (rows, ...)}``, for the steps that ran.
        skipped: steps that did not run, with why.
        errors: steps that failed (or could not run), with why.
    """

    id: str
    inputs: Any
    attributes: Mapping[str, str] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: dict[str, StepError] = field(default_factory=dict)


def resolve(ref: Ref, state: TaskState, input_names: Sequence[str] = ()) -> dict[str, Any]:
    """The named tensors ``ref`` stands for in ``state``.

    ``input`` gives the task's inputs: ``{name: value}`` as they are when named, else
    ``{input_names[0] or "input": value}``; ``input.<n>`` gives ``{n: inputs[n]}``;
    ``<step>.outputs`` every output of the step, ``<step>.outputs.<n>`` one.

    Raises:
        KeyError: the step has no outputs in ``state`` or the name is missing.
    """
    if ref.step is None:
        given = state.inputs
        if isinstance(given, Mapping):
            return dict(given) if ref.name is None else {ref.name: given[ref.name]}
        name = input_names[0] if len(input_names) == 1 else INPUT
        if ref.name is not None and ref.name != name:
            raise KeyError(ref.name)
        return {name: given}
    outs = state.outputs[ref.step]
    return dict(outs) if ref.name is None else {ref.name: outs[ref.name]}


def gather_inputs(step: Step, state: TaskState, model_inputs: Sequence[str],
                  input_names: Sequence[str] = ()) -> Any:
    """A step's model inputs for one task, from what the task holds.

    Each reference's tensors are renamed by ``tensor_map`` (keyed by the reference as written, or
    by ``<step>.outputs.<name>`` for one output of a whole-step reference). A model with one input
    gets the single gathered tensor whatever its name (an array, or the texts); a model with
    several gets ``{name: array}`` keyed by its input names.

    Args:
        step: the step.
        state: the task; every step in ``step.inputs`` has outputs in it.
        model_inputs: the model's input names, in order.
        input_names: the pipeline input's declared tensor names (``()`` when not declared).

    Raises:
        KeyError: a tensor the model needs was not gathered (validation rules this out).
    """
    gathered: dict[str, Any] = {}
    for ref in step.inputs:
        for name, value in resolve(ref, state, input_names).items():
            full = ref.text if ref.name is not None or ref.step is None else f"{ref.text}.{name}"
            gathered[step.tensor_map.get(full, step.tensor_map.get(ref.text, name))] = value
    if len(model_inputs) == 1 and len(gathered) == 1:
        return next(iter(gathered.values()))
    return {name: gathered[name] for name in model_inputs}


def condition_holds(cond: Condition, state: TaskState) -> bool:
    """Whether one task meets ``cond`` (any of its rows, for an output).

    An attribute compares as a string with ``==``/``!=`` and as a number with the other
    operators (false when it is missing or not a number). An output is reduced per row by
    ``func`` (rows flattened to ``(rows, -1)`` first), or compared as is when it is a scalar
    per row.
    """
    compare = OPERATORS[cond.op]
    if cond.attribute is not None:
        got = state.attributes.get(cond.attribute)
        if got is None:
            return False
        if isinstance(cond.value, str) or cond.op in ("==", "!=") and not _is_number(got):
            return bool(compare(got, str(cond.value)))
        if not _is_number(got):
            return False
        return bool(compare(float(got), cond.value))
    assert cond.ref is not None
    array = np.asarray(next(iter(resolve(cond.ref, state).values())))
    rows = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    per_row = REDUCERS[cond.func](rows) if cond.func else rows[:, 0]
    return bool(np.any(compare(per_row, cond.value)))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def decide(step: Step, state: TaskState) -> str | StepError | None:
    """Whether ``step`` runs for a task whose upstream steps are all decided.

    Returns:
        ``None`` to run it; :data:`SKIPPED`-prefixed reason text when it is skipped (an upstream
        step was skipped, or ``when`` does not hold); a :class:`StepError` (code
        ``upstream_failed``) when an upstream step failed.
    """
    for name in step.upstream():
        if name in state.errors:
            return StepError("upstream_failed", f"step {step.name!r} not run: step {name!r} failed")
        if name in state.skipped:
            return f"{SKIPPED}: step {name!r} was skipped"
    for cond in step.when:
        if not condition_holds(cond, state):
            return f"{SKIPPED}: when {cond.text!r} does not hold"
    return None


def name_outputs(output: Any, names: Sequence[str]) -> dict[str, Any]:
    """A model's output for one task as ``{name: array}``: one array takes the single declared name."""
    if isinstance(output, Mapping):
        return dict(output)
    if len(names) != 1:
        raise ValueError(f"one array for outputs {list(names)}")
    return {names[0]: output}


@dataclass(frozen=True, slots=True)
class PipelineResult:
    """The result of one task.

    Attributes:
        id: the task id.
        status: ``ok`` or ``error``.
        outputs: result name -> array, for the referenced outputs of steps that ran.
        skipped: steps that did not run, with why.
        error: ``{"code", "message"}`` when ``status`` is ``error`` (the first failed step's), else ``None``.
        attributes: the task's attributes, passed through.
    """

    id: str
    status: str
    outputs: dict[str, Any]
    skipped: dict[str, str]
    error: dict[str, str] | None
    attributes: Mapping[str, str]


def assemble_result(pipeline: Pipeline, state: TaskState) -> PipelineResult:
    """The result of a task whose steps are all decided: the ``output`` references that ran.

    A reference to a skipped step is left out of ``outputs`` (``skipped`` says why); any failed
    step makes the result an ``error`` naming it.
    """
    outputs: dict[str, Any] = {}
    for name, ref in pipeline.outputs.items():
        if ref.step is not None and ref.step not in state.outputs:
            continue
        got = resolve(ref, state)
        outputs[name] = next(iter(got.values())) if ref.name is not None or len(got) == 1 else got
    error = None
    for step_name, err in state.errors.items():
        if err.code != "upstream_failed" or error is None:
            error = {"code": err.code, "message": f"step {step_name!r}: {err.message}"}
            if err.code != "upstream_failed":
                break
    return PipelineResult(state.id, "error" if error else "ok", outputs, dict(state.skipped), error,
                          dict(state.attributes))


def advance(pipeline: Pipeline, state: TaskState, start: int) -> int | None:
    """Decide the steps from index ``start`` on, in topological order, until one must run.

    Each step that does not run is recorded in ``state`` (``skipped`` or ``errors``, as
    :func:`decide` says) and passed over, so a skipped step costs no hop.

    Returns:
        The index (into ``pipeline.steps``) of the next step to run, or ``None`` when every step is
        decided (the task's result can be assembled).
    """
    steps = pipeline.steps
    for index in range(start, len(steps)):
        step = steps[index]
        verdict = decide(step, state)
        if verdict is None:
            return index
        record(state, step.name, verdict)
    return None


def record(state: TaskState, step: str, verdict: str | StepError) -> None:
    """Record that ``step`` does not run for the task: a skip reason or an error, as :func:`decide` gave it."""
    if isinstance(verdict, StepError):
        state.errors[step] = verdict
    else:
        state.skipped[step] = verdict


@dataclass(frozen=True, slots=True)
class Carried:
    """What a task must carry when it travels to a step: the parts of its state read there or later.

    Attributes:
        inputs: whether the task's inputs are read by this step, a later one or the result.
        outputs: the steps whose outputs are read by this step, a later one (inputs or ``when``) or the
            result; the outputs of other steps are dropped on the way.
    """

    inputs: bool
    outputs: frozenset[str]


def carried(pipeline: Pipeline) -> list[Carried]:
    """Per step index, what a task travelling to that step carries (see :class:`Carried`).

    Skip reasons and errors always travel (they are small, and :func:`decide` reads them).
    """
    out: list[Carried] = []
    refs: list[Ref] = list(pipeline.outputs.values())
    for step in reversed(pipeline.steps):
        refs += [*step.inputs, *(c.ref for c in step.when if c.ref is not None)]
        out.append(Carried(any(r.step is None for r in refs), frozenset(r.step for r in refs if r.step is not None)))
    return out[::-1]
