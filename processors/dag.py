"""A pipeline of models as a DAG: its parts, its order, and the pure logic that runs a task through it.

A pipeline (parsed from ``pipeline.yaml`` by :mod:`autoglm.processors.pipeline_spec`)
is a set of :class:`Step` s; each step runs one model on tensors named by
:class:`Ref` erences (the pipeline input, or other steps' outputs), may be
guarded by a ``when`` :class:`Condition`, and the result is made of the
:attr:`Pipeline.outputs` references. What is here is shared by the dry run
(:mod:`autoglm.pipelines`) and a later Kafka runner:

- :func:`topological_order` and :func:`split_latency` (the per-step latency targets);
- :mod:`autoglm.processors.routing`: one task through the DAG (inputs, ``when``, result);
- :mod:`autoglm.processors.joins`: the inner join by task id within a window, clock injected.

Pure: no Kafka, no torch, no clock reads.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

#: the reference to the pipeline's input (``input``, or ``input.<name>`` for one named input tensor)
INPUT = "input"
#: names a step may not have: they read as something else in a reference (``input``, ``attributes``), or
#: the step's topic ``<prefix>.pipelines.<name>.<step>`` would be the pipeline's input topic (``in``)
RESERVED_STEP_NAMES = (INPUT, "attributes", "in")
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


@dataclass(frozen=True, slots=True)
class StepError:
    """Why a step gave a task no output: a stable ``code`` and a message."""

    code: str
    message: str
