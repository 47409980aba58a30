"""Pipelines on Kafka: each step of a pipeline is a stream of the worker's data path.

::

    <pipeline input topic> ──► step 1 ──hop──► <prefix>.pipelines.<p>.<step 2> ──► step 2 ──► ... ──► results
       (task events)          (batch, model)    (hop events, keyed by task id)                  (one result per task)

A worker started with ``--pipeline FILE`` serves every step of the pipeline as
one more stream of its :class:`~autoglm.streams.pipeline.TaskPipeline`, named
``<pipeline>/<step>``: the same micro-batcher and batching policy (the step's
``batching`` and its share of the pipeline's latency target), the same
runner (fault isolation, fallback), dead-letter topic, in-flight cap, control
plane (``ctl pause --pipeline P``, ``--model M``, ``--step S``), metrics and
commit-after-produce. What differs is only what a record is and what a
finished task turns into, which is this module's :class:`StepStage`:

- **In**: the first step (in topological order) reads the pipeline's input
  topic, whose records are ordinary task events; every later step reads its
  intermediate topic, whose records are hop events (``autoglm.hop/v1``,
  :class:`~autoglm.streams.events.Hop`): the task's state so far.
- **Out**: after a step, the task's next step is decided on the spot
  (:func:`~autoglm.processors.routing.advance`: a ``when`` that does not hold
  or a failed upstream step is recorded and passed over without a hop), and
  the task goes as a hop to that step's topic, or, when every step is
  decided, as a result (``autoglm.result/v1`` with ``pipeline``, ``steps``
  and ``skipped``) to its ``reply_to`` or the results topic.
- **Carried**: a hop holds only what its step or a later one reads (the
  inputs, the outputs of some steps; :func:`~autoglm.processors.routing.carried`),
  and the per-step record (step, model, worker, batch size, queue and
  inference ms). Intermediate outputs reach the result only when ``output``
  names them.

Delivery is the data path's: a consumed record's offset is committed only after
the hop or result it became is acknowledged by the broker (at-least-once per hop,
so end to end); in exactly-once mode each hop is one Kafka transaction (the
records it produces and the offset it consumes), and the next step reads
``read_committed``. A duplicate (a crash between produce and commit) may run a
step twice for a task; its result is keyed by the task id.

Steps run one after the other in topological order: the branches of a DAG are
not served in parallel, and a step that reads several upstream steps finds
them all in the hop (its join always completes; ``join_window_ms`` applies to a
runner that fans branches out, which this one does not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from autoglm.models.steps import prepare_step, step_outputs
from autoglm.processors.control import Stream, stream_name
from autoglm.processors.dag import Pipeline, StepError
from autoglm.processors.errors import EventError, EventValidationError, TensorError
from autoglm.processors.routing import TaskState, advance, assemble_result, carried, decide, gather_inputs, record
from autoglm.streams.events import ErrorInfo, Hop, Result, Task, decode_hop, decode_task, encode_hop, now_ms
from autoglm.streams.results import all_finite
from autoglm.streams.topics import TopicNames

#: ``prepared`` of a task that does not go through the model of the step that received it
#: (its step is skipped, or its inputs were refused): it is forwarded at once.
NOT_RUN = object()


@dataclass
class StepStage:
    """One step of a pipeline as a stream of a worker (see the module).

    Args:
        pipeline: the validated pipeline.
        index: the step's index in ``pipeline.steps`` (topological order).
        names: topic names (the prefix).
        model_inputs: the step model's declared input names, in order.
        output_names: the step model's declared output names, in order.
        max_hop_bytes: a hop larger than this becomes an ``error`` result (``hop_too_large``),
            since the broker would refuse it (None: no limit).
    """

    pipeline: Pipeline
    index: int
    names: TopicNames
    model_inputs: tuple[str, ...]
    output_names: tuple[str, ...]
    max_hop_bytes: int | None = None
    step: Any = field(init=False)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.step = self.pipeline.steps[self.index]
        self.name = stream_name(self.pipeline.name, self.step.name)
        self._carried = carried(self.pipeline)

    @property
    def stream(self) -> Stream:
        """What the control plane knows of this stream (model, pipeline, step)."""
        return Stream(self.step.model, self.pipeline.name, self.step.name)

    @property
    def topic(self) -> str:
        """The topic this step reads."""
        return self.topic_of(self.index)

    def topic_of(self, index: int) -> str:
        """The topic step ``index`` reads: the pipeline's input topic for the first, else its intermediate topic."""
        if index == 0:
            return self.pipeline.topic(self.names.prefix)
        return self.names.pipeline_step(self.pipeline.name, self.pipeline.steps[index].name)

    # -- in ---------------------------------------------------------------------------------

    def receive(self, value: bytes | None, received_ms: int, model: Any) -> tuple[Hop, Task, Any]:
        """A consumed record as ``(hop, task, prepared)``; ``prepared`` is :data:`NOT_RUN` when the
        task does not go through this step's model (forward it with :meth:`forward`).

        Raises:
            EventError: the record is not a valid task (first step) or hop, or the first step's model
                refuses the task's inputs: it goes to the dead-letter topic.
        """
        step = self.step
        if self.index == 0:
            task = decode_task(value, check_finite=False)
            state = TaskState(task.id, task.inputs, task.attributes)
            hop = Hop(state, task.model, self.pipeline.name, step.name, task.priority, task.deadline_ms,
                      task.created_ms or received_ms, task.reply_to)
            verdict = decide(step, state)
            if verdict is not None:  # a when on attributes: skipped (a first step has no upstream to fail)
                record(state, step.name, verdict)
                return hop, task, NOT_RUN
            try:
                return hop, task, model.prepare(gather_inputs(step, state, self.model_inputs,
                                                              self.pipeline.input_names))
            except EventError as exc:  # bad input: the task's own fault, dead-lettered like a model's task
                exc.task_id, exc.model = task.id, task.model
                raise
            except KeyError as exc:
                raise EventValidationError(f"inputs.{exc.args[0]}", f"the named inputs {list(self.model_inputs)}",
                                           "missing", task_id=task.id, model=task.model) from None
        hop = decode_hop(value)
        if hop.pipeline != self.pipeline.name or hop.step != step.name:
            raise EventValidationError("step", f"a hop of pipeline {self.pipeline.name!r} to step {step.name!r}",
                                       f"{hop.pipeline}/{hop.step}", task_id=hop.state.id, model=hop.model)
        task = Task(hop.state.id, hop.model, None, hop.priority, hop.deadline_ms, hop.created_ms, hop.reply_to,
                    dict(hop.state.attributes))
        try:
            inputs = gather_inputs(step, hop.state, self.model_inputs, self.pipeline.input_names)
        except KeyError as exc:
            hop.state.errors[step.name] = StepError("input_missing", f"the hop holds no {exc.args[0]!r}")
            return hop, task, NOT_RUN
        prepared = prepare_step(model, inputs)
        if isinstance(prepared, StepError):
            hop.state.errors[step.name] = prepared
            return hop, task, NOT_RUN
        return hop, task, prepared

    # -- out --------------------------------------------------------------------------------

    def served(self, hop: Hop, outcome: Any, timing: dict[str, Any], *, finite: bool = False) -> StepError | None:
        """Record one task's outcome of this step's micro-batch (and the step's ``timing``); the
        :class:`StepError` when the step failed for it (NaN/inf outputs: ``invalid_output``).

        ``finite``: the caller checked the whole batch's outputs for NaN/inf already (else they are
        checked here, for this task)."""
        hop.steps.append(timing)
        got = step_outputs(outcome, self.output_names)
        if not isinstance(got, StepError) and not finite and not all_finite([np.asarray(a) for a in got.values()]):
            got = StepError("invalid_output", f"model {self.step.model!r} gave NaN or inf")
        if isinstance(got, StepError):
            hop.state.errors[self.step.name] = got
            return got
        hop.state.outputs[self.step.name] = got
        return None

    def forward(self, hop: Hop, *, worker: str, start: int | None = None) -> tuple[str, bytes] | Result:
        """Where the task goes next: ``(topic, hop record value)`` for its next step, or its :class:`Result`.

        Args:
            hop: the task, with this step decided.
            worker: this worker's id (the result's ``worker``).
            start: the first step index still to decide (default: the one after this step).
        """
        index = self.index + 1 if start is None else start
        state = hop.state
        while True:
            nxt = advance(self.pipeline, state, index)
            if nxt is None:
                return self.result(hop, worker=worker)
            step = self.pipeline.steps[nxt]
            hop.step = step.name
            keep = self._carried[nxt]
            try:
                value = encode_hop(hop, inputs=keep.inputs, outputs=keep.outputs)
            except TensorError as exc:  # a dtype the wire has not (NaN/inf were caught when served)
                state.errors[step.name] = StepError("invalid_output", f"cannot carry to step {step.name!r}: {exc}")
                index = nxt + 1
                continue
            if self.max_hop_bytes is not None and len(value) > self.max_hop_bytes:
                state.errors[step.name] = StepError(
                    "hop_too_large", f"the task's state for step {step.name!r} is {len(value)} bytes, above "
                                     f"max_result_bytes={self.max_hop_bytes} (AUTOGLM_MAX_RESULT_BYTES)")
                index = nxt + 1
                continue
            return self.topic_of(nxt), value

    def result(self, hop: Hop, *, worker: str, status: str | None = None, error: ErrorInfo | None = None) -> Result:
        """The task's pipeline result (``status``/``error`` override it: an ``expired`` task)."""
        res = assemble_result(self.pipeline, hop.state)
        outputs = _flat(res.outputs) if status is None and res.status == "ok" else None
        steps = hop.steps
        if error is None and res.error is not None:
            error = ErrorInfo(res.error["code"], res.error["message"])
        return Result(
            id=hop.state.id, model=hop.model, status=status or res.status, outputs=outputs or None, error=error,
            batch_size=steps[-1]["batch_size"] if steps else 0, worker=worker,
            queue_ms=sum(s["queue_ms"] for s in steps), inference_ms=sum(s["inference_ms"] for s in steps),
            end_to_end_ms=float(max(0, now_ms() - hop.created_ms)),
            attributes=dict(hop.state.attributes), pipeline=self.pipeline.name, steps=tuple(steps),
            skipped=dict(res.skipped),
        )


def _flat(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Result outputs as named arrays: a whole-step reference with several outputs becomes ``<name>.<output>``."""
    flat: dict[str, np.ndarray] = {}
    for name, value in outputs.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{k}": np.asarray(v) for k, v in value.items()})
        else:
            flat[name] = np.asarray(value)
    return flat


def stages_of(pipeline: Pipeline, names: TopicNames, signatures: dict[str, tuple[Sequence[str], Sequence[str]]],
              *, max_hop_bytes: int | None = None) -> list[StepStage]:
    """One :class:`StepStage` per step of ``pipeline``.

    Args:
        signatures: model name -> ``(input names, output names)`` as declared by its spec.
    """
    return [StepStage(pipeline, i, names, tuple(signatures[s.model][0]), tuple(signatures[s.model][1]),
                      max_hop_bytes) for i, s in enumerate(pipeline.steps)]
