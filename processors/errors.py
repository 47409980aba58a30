"""The one exception hierarchy of the project.

Every error carries a stable machine-readable ``code`` (it becomes the
``autoglm.error.code`` header of a dead-letter record and the ``error.code`` of
a result) and a ``retriable`` flag in the manner of aiokafka's errors: a
retriable error may succeed if the same thing is tried again later, a
non-retriable one will fail the same way every time.

::

    AutoGLMError
    ├── ConfigError                 (ValueError)  a setting is missing or invalid
    │   ├── ModelSpecError                        a model.yaml key is wrong (names file, key, expected)
    │   ├── PipelineSpecError                     one problem of a pipeline.yaml (names file, line, key, reason)
    │   └── PipelineInvalidError                  a pipeline.yaml with problems: every one of them, in order
    ├── EventError                  (ValueError)  an event on the wire is unusable
    │   ├── EventDecodeError                      not UTF-8 JSON, or not an object
    │   ├── SchemaVersionError                    unknown schema name or major version
    │   ├── EventValidationError                  a field has the wrong type or value
    │   │   └── TensorError                       a tensor is malformed or non-finite
    │   ├── UnknownModelError                     no model of that name is served here
    │   └── InputSignatureError                   inputs do not match the model's signature
    ├── ModelError                                a model failed
    │   ├── ModelLoadError                        weights missing, load failed
    │   └── InferenceError                        forward raised or returned the wrong rows
    │       └── InferenceTimeoutError             forward did not return within the batch timeout
    ├── BrokerError                               talking to Kafka failed (retriable)
    │   └── EmbeddedBrokerError                   the embedded broker would not start
    ├── TaskFailedError                           a result came back without outputs (client side)
    │   ├── TaskExpiredError                      status ``expired``: the deadline passed
    │   ├── TaskRejectedError                     status ``rejected``: the task was invalid
    │   └── TaskErrorResult                       status ``error``: the model failed on it
    └── ReplyTimeoutError           (TimeoutError) no result within the client's timeout (retriable)

Errors translate library exceptions at the edge: code outside ``streams/``
never sees an aiokafka or faust exception type.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AutoGLMError",
    "ConfigError",
    "ModelSpecError",
    "PipelineSpecError",
    "PipelineInvalidError",
    "EventError",
    "EventDecodeError",
    "SchemaVersionError",
    "EventValidationError",
    "TensorError",
    "UnknownModelError",
    "InputSignatureError",
    "ModelError",
    "ModelLoadError",
    "InferenceError",
    "InferenceTimeoutError",
    "BrokerError",
    "EmbeddedBrokerError",
    "ControlSignatureError",
    "TaskTooLargeError",
    "TopicMissingError",
    "TaskFailedError",
    "TaskExpiredError",
    "TaskRejectedError",
    "TaskErrorResult",
    "ReplyTimeoutError",
]


class AutoGLMError(Exception):
    """Base of every error raised by this project.

    Attributes:
        code: stable snake_case identifier, used on the wire.
        retriable: whether trying the same operation again may succeed.
    """

    code: str = "error"
    retriable: bool = False


class ConfigError(AutoGLMError, ValueError):
    """A setting is missing or invalid; the message names the setting and its env variable."""

    code = "config"


class ModelSpecError(ConfigError):
    """A model repository entry is unusable: a ``model.yaml`` key, its file, its factory or its signature.

    Args:
        file: the ``model.yaml`` (or other file) at fault, as a path string.
        key: dotted key in that file, e.g. ``outputs[0].dtype`` (``""`` for the whole file).
        expected: what is allowed, in words.
        actual: what was found (shortened for the message).
    """

    code = "model_spec"

    def __init__(self, file: str, key: str, expected: str, actual: Any):
        shown = actual if isinstance(actual, str) else repr(actual)
        if len(shown) > 300:
            shown = shown[:297] + "..."
        where = f"{file}: key {key!r}" if key else str(file)
        super().__init__(f"{where}: expected {expected}, got {shown}")
        self.file = file
        self.key = key
        self.expected = expected
        self.actual = actual


class PipelineSpecError(ConfigError):
    """One problem of a pipeline file (``pipeline.yaml``), where it is.

    Args:
        file: the pipeline file, as a path string.
        line: 1-based line of the key or value at fault (0 when the file as a whole is at fault).
        key: dotted key, e.g. ``steps[1].inputs[0]`` (``""`` for the whole file).
        reason: what is wrong and what is expected, in words.

    The message reads ``FILE:LINE: key 'KEY': REASON``, the form compilers and linters use.
    """

    code = "pipeline_spec"

    def __init__(self, file: str, line: int, key: str, reason: str):
        where = f"{file}:{line}" if line else str(file)
        super().__init__(f"{where}: key {key!r}: {reason}" if key else f"{where}: {reason}")
        self.file = file
        self.line = line
        self.key = key
        self.reason = reason

    def as_dict(self) -> dict[str, Any]:
        """``{"file", "line", "key", "reason", "message"}``, JSON-ready."""
        return {"file": self.file, "line": self.line, "key": self.key, "reason": self.reason, "message": str(self)}


class PipelineInvalidError(ConfigError):
    """A pipeline file has problems; :attr:`errors` holds every one found, in file order.

    Args:
        errors: the problems (at least one).
    """

    code = "pipeline_invalid"

    def __init__(self, errors: list[PipelineSpecError]):
        self.errors = list(errors)
        count = len(self.errors)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in the pipeline:\n"
                         + "\n".join(str(e) for e in self.errors))


class EventError(AutoGLMError, ValueError):
    """An event on the wire cannot be served. Carries what is known of it.

    Args:
        message: what is wrong, for an operator.
        task_id: the event's ``id`` when it could be read, else ``None``.
        model: the event's ``model`` when it could be read, else ``None``.
    """

    code = "invalid_event"

    def __init__(self, message: str, *, task_id: str | None = None, model: str | None = None):
        super().__init__(message)
        self.message = message
        self.task_id = task_id
        self.model = model


class EventDecodeError(EventError):
    """The bytes are not a UTF-8 JSON object."""

    code = "decode"


class SchemaVersionError(EventError):
    """The ``schema`` field is missing, names another event kind, or an unknown major version."""

    code = "schema"


class EventValidationError(EventError):
    """A field has the wrong type or value.

    Args:
        field: dotted path of the field, e.g. ``inputs.shape``.
        expected: what the contract allows, in words.
        actual: what the event carried (shortened for the message).
    """

    code = "invalid_field"

    def __init__(
        self,
        field: str,
        expected: str,
        actual: Any,
        *,
        task_id: str | None = None,
        model: str | None = None,
    ):
        shown = repr(actual)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(
            f"field {field!r}: expected {expected}, got {shown}", task_id=task_id, model=model
        )
        self.field = field
        self.expected = expected
        self.actual = actual


class TensorError(EventValidationError):
    """A tensor is malformed (dtype, shape, data length, base64) or holds NaN/inf."""

    code = "invalid_tensor"


class UnknownModelError(EventError):
    """The task names a model that this worker does not serve."""

    code = "unknown_model"


class InputSignatureError(EventError):
    """The inputs do not match the model's declared input signature (shape, dtype or kind).

    Args:
        expected: the signature, e.g. ``float32 (B, 1, 8, 8) or (B, 64)``.
        actual: what arrived, e.g. ``float32 (2, 63)``.
    """

    code = "input_signature"

    def __init__(self, expected: str, actual: str, *, task_id: str | None = None, model: str | None = None):
        super().__init__(
            f"inputs do not match the model signature: expected {expected}, got {actual}",
            task_id=task_id,
            model=model,
        )
        self.expected = expected
        self.actual = actual


class ModelError(AutoGLMError):
    """A model failed to load or to run."""

    code = "model_error"


class ModelLoadError(ModelError):
    """A model's weights or code could not be loaded."""

    code = "model_load"


class InferenceError(ModelError):
    """A forward pass raised, or returned a different number of rows than it was given."""

    code = "inference"
    retriable = True


class InferenceTimeoutError(InferenceError):
    """A forward did not return within the per-batch timeout; its thread was abandoned.

    Args:
        message: what timed out, for an operator.
        timeout_s: the timeout that was exceeded, in seconds.
        batch_size: number of tasks in the batch that timed out.
    """

    code = "inference_timeout"
    retriable = True

    def __init__(self, message: str, *, timeout_s: float, batch_size: int):
        super().__init__(message)
        self.timeout_s = timeout_s
        self.batch_size = batch_size


class BrokerError(AutoGLMError):
    """Talking to the Kafka broker failed."""

    code = "broker"
    retriable = True


class EmbeddedBrokerError(BrokerError):
    """The embedded broker could not be started (package missing, binary failed)."""

    code = "embedded_broker"
    retriable = False


class ControlSignatureError(EventError):
    """A control event is unsigned or its HMAC-SHA256 signature does not match (a key is configured)."""

    code = "bad_signature"


class TaskTooLargeError(EventError):
    """A task record is larger than ``max_task_bytes``."""

    code = "too_large"


class TopicMissingError(BrokerError):
    """A topic the operation needs does not exist on the broker."""

    code = "topic_missing"


class TaskFailedError(AutoGLMError):
    """A task's result came back with a status other than ``ok`` (raised by ``autoglm.Client``).

    Args:
        result: the :class:`~autoglm.streams.events.Result` that came back.

    Attributes:
        code: the result's ``error.code`` (e.g. ``deadline_expired``, ``input_signature``).
        task_id, model, status: of the result.
        result: the whole result (timings, worker, attributes).
    """

    code = "task_failed"

    def __init__(self, result: Any):
        error = getattr(result, "error", None)
        self.code = getattr(error, "code", None) or result.status
        self.task_id = result.id
        self.model = result.model
        self.status = result.status
        self.result = result
        super().__init__(f"task {result.id!r} ({result.model or '?'}): {result.status}: "
                         f"{getattr(error, 'message', '') or '(no message)'} [{self.code}]")


class TaskExpiredError(TaskFailedError):
    """Status ``expired``: the task's deadline passed before the model served it."""


class TaskRejectedError(TaskFailedError):
    """Status ``rejected``: the task was invalid (schema, inputs, model); it went to the dead-letter topic."""


class TaskErrorResult(TaskFailedError):
    """Status ``error``: the model failed on the task (its ``code`` says how)."""


class ReplyTimeoutError(AutoGLMError, TimeoutError):
    """No result arrived for a task within the client's ``timeout_s`` (the task may still be served later)."""

    code = "reply_timeout"
    retriable = True
