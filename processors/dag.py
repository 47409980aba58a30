"""A pipeline of models as a DAG: its parts, its order, and the pure logic that runs a task through it.

A pipeline (parsed from ``pipeline.yaml`` by :mod:`autoglm.processors.pipeline_spec`)
is a set of :class:`Step` s; each step runs one model on tensors named by
:class:`Ref` erences (the pipeline input, or other steps' outputs), may be
guarded by a ``when`` :class:`Condition`, and the result is made of the
:attr:`Pipeline.outputs` references. What is here is shared by the dry run
(:mod:`autoglm.pipelines`) and a later Kafka runner:

- :func:`topological_order` and :func:`split_latency` (the per-step latency targets);
- :func:`gather_inputs`: a step's model inputs for one task, from what the task holds so far;
- :func:`decide`: whether a step runs for a task (``when``, skipped or failed upstream steps);
- :class:`JoinBuffer`: the inner join by task id within a window, clock injected;
- :func:`assemble_result`: the result of one task once every step is decided.

Per-task state is a :class:`TaskState`: the task's inputs and attributes, and
for each decided step its named outputs, ``skipped`` or an error. Pure: no
Kafka, no torch, no clock reads (numpy only, to reduce a row in ``when``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

#: the reference to the pipeline's input (``input``, or ``input.<name>`` for one named input tensor)
INPUT = "input"
#: names a step may not have: they read as something else in a reference
RESERVED_STEP_NAMES = (INPUT, "attributes")
#: row reductions a ``when`` may apply to an output: each row's elements -> one number
REDUCERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max": lambda rows: rows.max(axis=1),
    "min": lambda rows: rows.min(axis=1),
    "mean": lambda rows: rows.mean(axis=1),
    "sum": lambda rows: rows.sum(axis=1),
    "argmax": lambda rows: rows.argmax(axis=1),
}
OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}
#: join window when neither the step nor the pipeline sets ``join_window_ms`` (milliseconds, on the wire's unit)
DEFAULT_JOIN_WINDOW_MS = 10_000


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to tensors: ``input``, ``input.<name>``, ``<step>.outputs`` or ``<step>.outputs.<name>``.

    Attributes:
        step: the step's name, or ``None`` for the pipeline input.
        name: the output (or named input) referred to; ``None`` for all of them.
        text: the reference as written.
    """

    step: str | None
    name: str | None
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Condition:
    """One ``when`` comparison: ``[func(]ref[)] op value`` or ``attributes.<key> op value``.

    Attributes:
        op: one of :data:`OPERATORS`.
        value: a number, or a string (compared to attributes only).
        ref: the output compared, or ``None`` for an attribute.
        func: a :data:`REDUCERS` name applied to each row, or ``None`` (the output must be a scalar per row).
        attribute: the attribute's key, or ``None``.
        text: the condition as written.

    A task meets the condition when any of its rows does (a task is routed as a whole).
    """

    op: str
    value: float | str
    ref: Ref | None = None
    func: str | None = None
    attribute: str | None = None
    text: str = ""


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a pipeline.

    Attributes:
        name: the step's name (unique in its pipeline).
        model: the model it runs (a repository or built-in model's name).
        inputs: what it reads, in order.
        tensor_map: reference text -> the name the tensor takes as the model's input.
        when: conditions that must all hold for the step to run (empty: always).
        batching: per-step batching parameters (``latency_target_s``, ``max_batch_size``, ``max_wait_s``).
        join_window_ms: how long the join of several upstream sources waits for the last one, ms.
        service_time_s: the declared service time of one batch, seconds, used to split the latency target.
        latency_target_s: the step's latency target after the split (or as declared), seconds; ``None`` when
            the pipeline sets no target.
        line: the line of the step in its file.
    """

    name: str
    model: str
    inputs: tuple[Ref, ...]
    tensor_map: Mapping[str, str] = field(default_factory=dict)
    when: tuple[Condition, ...] = ()
    batching: Mapping[str, Any] = field(default_factory=dict)
    join_window_ms: int = DEFAULT_JOIN_WINDOW_MS
    service_time_s: float | None = None
    latency_target_s: float | None = None
    line: int = 0

    def upstream(self) -> list[str]:
        """The steps this one waits for (through ``inputs`` or ``when``), in first-mention order."""
        refs = [*self.inputs, *(c.ref for c in self.when if c.ref is not None)]
        return list(dict.fromkeys(r.step for r in refs if r.step is not None))

    def sources(self) -> list[str]:
        """What a join of this step waits for: the upstream steps, plus ``input`` when it reads the input."""
        reads_input = any(r.step is None for r in self.inputs)
        return ([INPUT] if reads_input else []) + self.upstream()


@dataclass(frozen=True, slots=True)
class Pipeline:
    """A validated pipeline.

    Attributes:
        name: the pipeline's name.
        input_topic: the topic its tasks arrive on (``None``: ``<prefix>.pipelines.<name>.in``).
        steps: the steps in topological order.
        outputs: result name -> reference, in result order.
        latency_target_s: the pipeline's end-to-end target, seconds, or ``None``.
        source: the file it was read from.
        input_names: the names of the input's tensors when its signature is declared, else ``()``.
    """

    name: str
    input_topic: str | None
    steps: tuple[Step, ...]
    outputs: Mapping[str, Ref]
    latency_target_s: float | None = None
    source: str = ""
    input_names: tuple[str, ...] = ()

    def step(self, name: str) -> Step:
        """The step called ``name`` (``KeyError`` when there is none)."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def topic(self, prefix: str) -> str:
        """The input topic: the declared one, or ``<prefix>.pipelines.<name>.in``."""
        return self.input_topic or f"{prefix}.pipelines.{self.name}.in"


# -- order and latency targets ---------------------------------------------------------


def topological_order(deps: Mapping[str, Sequence[str]]) -> tuple[list[str], list[str]]:
    """Kahn's algorithm over ``step -> the steps it depends on`` (names outside ``deps`` are ignored).

    Returns:
        ``(order, cycle)``: the steps in a topological order (ties in ``deps`` order) and, when the
        graph has a cycle, one cycle as a closed walk ``[a, b, ..., a]`` (else ``[]``); the steps
        on or behind a cycle are missing from ``order``.
    """
    pending = {s: {d for d in ds if d in deps} for s, ds in deps.items()}
    order: list[str] = []
    ready = [s for s in deps if not pending[s]]
    while ready:
        s = ready.pop(0)
        order.append(s)
        for t in deps:
            if s in pending[t]:
                pending[t].discard(s)
                if not pending[t] and t not in order and t not in ready:
                    ready.append(t)
    left = [s for s in deps if s not in order]
    if not left:
        return order, []
    walk, node = [], left[0]
    while node not in walk:  # every step left has a dependency left: follow them until one repeats
        walk.append(node)
        node = next(d for d in deps[node] if d in pending and d not in order)
    return order, walk[walk.index(node):] + [node]


def split_latency(order: Sequence[str], deps: Mapping[str, Sequence[str]], weights: Mapping[str, float],
                  total_s: float) -> dict[str, float]:
    """Split a pipeline's latency target into step targets, in proportion to the steps' weights.

    Formula: ``t_s = total_s * w_s / W(s)``, where ``w_s`` is step ``s``'s weight (its declared or
    measured service time; equal weights give an equal split along each path) and ``W(s)`` is the
    heaviest sum of weights over the input-to-output paths through ``s``. Along the critical path
    (the heaviest) the targets sum to exactly ``total_s``; along any other path ``P`` they sum to at
    most ``total_s``, since ``W(s) >= W(P)`` for every ``s`` on ``P``. (The proportional split of
    an end-to-end deadline over a chain's stages is the classic one of distributed real-time
    systems; the ``max`` over paths makes it safe on a DAG.)

    Args:
        order: the steps in topological order.
        deps: step -> the steps it depends on.
        weights: step -> weight > 0.
        total_s: the pipeline's target, seconds.

    Returns:
        step -> target, seconds.
    """
    before: dict[str, float] = {}  # heaviest path ending at s, s included
    for s in order:
        before[s] = weights[s] + max((before[d] for d in deps[s] if d in before), default=0.0)
    after: dict[str, float] = {}  # heaviest path starting at s, s included
    for s in reversed(order):
        after[s] = weights[s] + max((after[t] for t in order if s in deps[t]), default=0.0)
    return {s: total_s * weights[s] / (before[s] + after[s] - weights[s]) for s in order}


def heaviest_path(order: Sequence[str], deps: Mapping[str, Sequence[str]],
                  cost: Mapping[str, float]) -> tuple[float, list[str]]:
    """The path of the DAG with the largest sum of ``cost``, and that sum (``(0.0, [])`` when empty)."""
    best: dict[str, tuple[float, list[str]]] = {}
    for s in order:
        prev = max((best[d] for d in deps[s] if d in best), default=(0.0, []), key=lambda b: b[0])
        best[s] = (prev[0] + cost[s], [*prev[1], s])
    return max(best.values(), default=(0.0, []), key=lambda b: b[0])


# -- one task through the DAG -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepError:
    """Why a step gave a task no output: a stable ``code`` and a message."""

    code: str
    message: str


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


# -- joins --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JoinTimeout:
    """A task whose join did not complete within its window.

    Attributes:
        task_id: the task.
        present: the sources that arrived, sorted.
        missing: the sources that did not, sorted.
    """

    task_id: str
    present: tuple[str, ...]
    missing: tuple[str, ...]

    def error(self, step: str) -> StepError:
        """The ``join_timeout`` error the task's result carries, naming the missing inputs."""
        return StepError("join_timeout", f"step {step!r}: no {', '.join(self.missing)} within the join window "
                                         f"(had {', '.join(self.present) or 'nothing'})")


class JoinBuffer:
    """Inner join by task id of several sources within a window (the clock is passed in, never read).

    A task's entry opens with the first source that arrives for it and must be completed by
    every source within ``window_s`` of that arrival; a later arrival of an expired task opens
    a new entry. Memory: one entry per open task.

    Args:
        sources: what the join waits for (step names, ``input``).
        window_s: seconds, > 0.

    Raises:
        ValueError: no sources, or ``window_s`` not > 0.
    """

    def __init__(self, sources: Iterable[str], window_s: float):
        self.sources = tuple(dict.fromkeys(sources))
        if not self.sources or not window_s > 0:
            raise ValueError(f"a join needs sources and a window > 0 s, got {self.sources} and {window_s!r}")
        self.window_s = window_s
        self._open: dict[str, tuple[float, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def offer(self, task_id: str, source: str, value: Any, now_s: float) -> dict[str, Any] | None:
        """Record ``source``'s ``value`` for ``task_id``; the joined ``{source: value}`` once all arrived.

        A repeated source (an at-least-once duplicate) replaces the earlier value.

        Raises:
            KeyError: ``source`` is not one of :attr:`sources`.
        """
        if source not in self.sources:
            raise KeyError(f"{source!r} is not a source of this join ({', '.join(self.sources)})")
        opened, got = self._open.setdefault(task_id, (now_s, {}))
        got[source] = value
        if len(got) < len(self.sources):
            return None
        del self._open[task_id]
        return {s: got[s] for s in self.sources}

    def next_deadline_s(self) -> float | None:
        """When the oldest open entry expires (clock seconds), or ``None`` when none is open."""
        if not self._open:
            return None
        return min(opened for opened, _ in self._open.values()) + self.window_s

    def expire(self, now_s: float) -> list[JoinTimeout]:
        """Remove and return the entries open for ``window_s`` or more at ``now_s``, oldest first."""
        due = sorted((opened, tid) for tid, (opened, _) in self._open.items() if now_s - opened >= self.window_s)
        out = []
        for _, tid in due:
            got = self._open.pop(tid)[1]
            out.append(JoinTimeout(tid, tuple(sorted(got)), tuple(sorted(s for s in self.sources if s not in got))))
        return out
