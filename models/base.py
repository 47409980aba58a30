"""What a served model is: its signature, how it prepares inputs, its forward.

A model sees rows. A task carries one or more rows (a tensor whose axis 0 is
the row axis, or a list of texts); a micro-batch concatenates the rows of its
tasks, the model runs one forward over all of them, and the outputs are split
back per task by row counts. A model that returns a different number of rows
than it was given is an error for every task of the batch (as in Ray Serve's
``@serve.batch``). What a runner makes of each task is an :class:`ItemOutcome`.

Nothing here imports Kafka.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Literal, Sequence, Union

import numpy as np

from autoglm.processors.errors import ModelError
from autoglm.models.spec import TensorSpec

#: A task's (or a batch's) output: one array, or named arrays for a multi-output model.
Outputs = Union[np.ndarray, dict[str, np.ndarray]]


@dataclass(frozen=True, slots=True)
class Signature:
    """A model's declared input and output, for docs, errors and status.

    Attributes:
        input_kind: ``"tensor"`` or ``"text"``.
        input: human-readable input signature, e.g. ``float32 (B, 1, 8, 8) or (B, 64)``.
        output: human-readable output signature, e.g. ``float32 (B, 10)``.
        output_dim: size of each output row (10 for digits, 384 for minilm);
            for a model with declared ``outputs``, the element count of one
            row of its first output (-1 when it has a variable axis).
        outputs: the declared outputs (names, dtypes, per-row shapes), as a
            repository's ``model.yaml`` gives them; ``None`` for a model whose
            forward returns one float32 ``(B, output_dim)`` array (the
            built-ins). When set, the runner checks every batch against them
            (:func:`autoglm.models.outputs.output_problems`).
    """

    input_kind: Literal["tensor", "text"]
    input: str
    output: str
    output_dim: int
    outputs: tuple[TensorSpec, ...] | None = None


class InferenceModel(abc.ABC):
    """A model served by a worker.

    Lifecycle: construct (cheap) -> :meth:`load` (weights, device placement,
    warm-up; may take seconds, runs on the model's dedicated thread) ->
    :meth:`prepare` per task on the event loop (cheap validation) ->
    :meth:`collate` + :meth:`forward` per micro-batch on the dedicated thread.

    Attributes:
        name: registry name, as tasks spell it in ``model``.
        signature: declared input and output.
        device: ``"cuda"`` or ``"cpu"`` after :meth:`load`.
    """

    name: str
    signature: Signature
    device: str = "cpu"

    @abc.abstractmethod
    def load(self, device: str) -> None:
        """Load weights onto ``device`` and warm up (one forward on dummy input).

        Raises:
            ModelLoadError: weights missing or unusable.
        """

    @abc.abstractmethod
    def prepare(self, inputs: Any) -> Any:
        """Validate one task's decoded inputs and put them in the model's row form.

        Args:
            inputs: a numpy array or a list of strings, as decoded from the wire.

        Returns:
            The task's rows in the form :meth:`collate` expects (for tensor
            models a float32 array ``(n, ...)``; for text models ``list[str]``).

        Raises:
            InputSignatureError: kind, dtype or shape does not match the
                signature; the message names expected and actual.
        """

    @staticmethod
    def rows(prepared: Any) -> int:
        """Number of rows of one prepared task (axis 0 / list length)."""
        return len(prepared)

    @abc.abstractmethod
    def collate(self, items: Sequence[Any]) -> Any:
        """Join prepared tasks into one batch input (rows concatenated in order)."""

    @abc.abstractmethod
    def forward(self, batch: Any) -> Outputs:
        """Run the model on a collated batch; called on the model's thread.

        Returns:
            float32 numpy array ``(total_rows, output_dim)`` on the CPU; or, when
            ``signature.outputs`` is declared, one array ``(total_rows, *row)``
            of the declared dtype (a single output) or ``{name: array}`` (several).
        """


@dataclass(frozen=True, slots=True)
class ItemError:
    """Why one task got no output: an :class:`~autoglm.processors.errors.AutoGLMError` ``code``,
    its message, and whether trying again later may succeed (``retriable``)."""

    code: str
    message: str
    retriable: bool = False

    @classmethod
    def of(cls, exc: ModelError) -> "ItemError":
        """The code, message and ``retriable`` flag of ``exc``."""
        return cls(exc.code, str(exc), exc.retriable)


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """What a runner made of one task of a batch: an output or an error, never both.

    Attributes:
        served_by: registry name of the model that ran (or last tried) the task;
            the primary's name unless a fallback served it.
        output: float32 ``(rows, output_dim)`` when the task succeeded (or, for
            a model with declared outputs, its array ``(rows, *row)`` or named
            arrays), else ``None``.
        error: set when the task failed, else ``None``.
    """

    served_by: str
    output: Outputs | None = None
    error: ItemError | None = None

    def __post_init__(self) -> None:
        if (self.output is None) == (self.error is None):
            raise ValueError("an ItemOutcome holds exactly one of output and error")

    @property
    def ok(self) -> bool:
        """Whether the task has an output."""
        return self.error is None
