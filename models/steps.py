"""One pipeline step over a micro-batch: the tasks' gathered inputs in, their named outputs out.

:func:`execute_step` is the step code every pipeline runner shares (the dry run of
:mod:`autoglm.pipelines`, and a Kafka runner that serves a step from its topic): each task's
inputs (what :func:`autoglm.processors.routing.gather_inputs` made of it) are checked by the
model's ``prepare``, the valid ones run as one micro-batch through the runner's
``run_isolated`` (the worker's fault isolation: a failing task is bisected out, the others are
served), and each task's output is named after the model's declared outputs. A task whose
inputs the model refuses, or that fails in the model, gets a
:class:`~autoglm.processors.dag.StepError` instead; the others are unaffected.

Nothing here imports Kafka.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from autoglm.processors.dag import StepError
from autoglm.processors.routing import name_outputs
from autoglm.processors.errors import EventError
from autoglm.models.base import InferenceModel, ItemOutcome


class StepRunner(Protocol):
    """What a step runs on: :class:`~autoglm.models.runner.ModelRunner` or
    :class:`~autoglm.models.fallback.FallbackRunner` (started)."""

    model: InferenceModel

    async def run_isolated(self, items: Sequence[Any], *, timeout_s: float | None) -> list[ItemOutcome]:
        """One micro-batch of prepared tasks -> one outcome per task, in order."""


async def execute_step(runner: StepRunner, inputs: Sequence[Any], output_names: Sequence[str], *,
                       timeout_s: float | None = None) -> list[dict[str, Any] | StepError]:
    """Run one micro-batch of a step.

    Args:
        runner: the started runner of the step's model.
        inputs: one entry per task: the model's inputs for it (an array ``(rows, ...)``, a list of
            texts, or ``{name: array}``), as :func:`~autoglm.processors.routing.gather_inputs` gives them.
        output_names: the model's declared output names, in order (a single array is named after
            the only one).
        timeout_s: seconds one forward may take (``None``: no limit), as the worker's batch timeout.

    Returns:
        One entry per task, in order: ``{output name: array (rows, ...)}``, or a
        :class:`StepError` (code ``input_signature`` when ``prepare`` refused the inputs, else the
        model's error code, e.g. ``inference``).
    """
    out: list[dict[str, Any] | StepError | None] = [None] * len(inputs)
    prepared, where = [], []
    for i, item in enumerate(inputs):
        got = prepare_step(runner.model, item)
        if isinstance(got, StepError):
            out[i] = got
        else:
            prepared.append(got)
            where.append(i)
    if prepared:
        outcomes = await runner.run_isolated(prepared, timeout_s=timeout_s)
        for i, outcome in zip(where, outcomes):
            out[i] = step_outputs(outcome, output_names)
    return [o for o in out if o is not None]


def prepare_step(model: InferenceModel, inputs: Any) -> Any:
    """One task's step inputs checked and prepared by the model (``model.prepare``), or the
    :class:`StepError` saying why the model refuses them (its code, e.g. ``input_signature``)."""
    try:
        return model.prepare(inputs)
    except EventError as exc:
        return StepError(exc.code, str(exc))


def step_outputs(outcome: ItemOutcome, output_names: Sequence[str]) -> dict[str, Any] | StepError:
    """One task's outcome of a step's micro-batch: its outputs named after the model's declared
    outputs, or a :class:`StepError` with the model's error code (e.g. ``inference``)."""
    if outcome.error is not None:
        return StepError(outcome.error.code, outcome.error.message)
    return name_outputs(outcome.output, output_names)
