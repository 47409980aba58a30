"""Settings: one frozen object, from environment variables and CLI flags.

Every field can be set with ``AUTOGLM_<FIELD>`` (e.g. ``AUTOGLM_BOOTSTRAP_SERVERS``)
or the matching CLI flag; flags win. Values are validated once, at start;
an invalid value raises :class:`~autoglm.errors.ConfigError` naming the
setting and its environment variable.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from autoglm.errors import ConfigError
from autoglm.processors import tunables
from autoglm.processors.adaptive import ADAPTIVE_MAX_BATCH_SIZE, ADAPTIVE_MAX_WAIT_S

ENV_PREFIX = "AUTOGLM_"
#: Batch bounds of the fixed mode when none are given: the "typical default" (32 tasks / 10 ms).
FIXED_MAX_BATCH_SIZE = 32
FIXED_MAX_WAIT_S = 0.010
#: Never echoed in error messages.
SECRET_FIELDS = ("control_key", "sasl_password", "console_token")


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """All settings of a worker or client. Durations are float seconds (``_s``).

    Defaults and where they come from:

    - ``batching_mode="adaptive"`` with ``latency_target_s=0.100``: batch sizes
      from EWMA latency feedback against a 100 ms p99 target (a common online
      SLO).
    - ``max_batch_size`` and ``max_wait_s`` default by mode. Adaptive: 256 tasks
      and 0.050 s, generous bounds, because the adaptive mode fills a batch only
      while it is over its target (a backlog) and never waits with an idle
      model; a larger batch then drains the backlog faster (figure A,
      benchmarks/README.md). Fixed: 32 tasks and 0.010 s, the "typical
      default" of fixed micro-batching (Triton's dynamic batcher examples,
      faust ``take(32, within=0.01)``-style code).
    - ``aging_per_s=1.0``: a waiting task gains one priority level per second.
    - ``max_in_flight=1024`` tasks: the memory bound; at ~4 KiB per digits task
      that is ~4 MiB of queued inputs.
    - ``max_message_bytes=4 MiB``: above Kafka's 1 MiB default so that text
      batches fit; brokers need ``message.max.bytes`` at least this large.
    - ``rebalance_timeout_s=60``: faust's default; ``session_timeout_s=45`` and
      ``heartbeat_interval_s=3``: Kafka's consumer defaults (KIP-735). The
      embedded broker uses 6 s / 6 s / 1 s because its group join waits about
      half of them (ARCHITECTURE.md).
    - ``delivery="at_least_once"``: commit after the result is acknowledged;
      ``exactly_once`` (Apache Kafka only) produces results and commits the
      consumed offsets in one Kafka transaction; readers use read_committed.
      ``transaction_timeout_s=30`` bounds how long a crashed worker's open
      transaction can hold back read_committed readers.
    - ``inference_timeout_s=30``: a batched forward taking longer is abandoned
      (its tasks get ``inference_timeout`` errors); a few times the slowest
      expected batch.
    - ``max_task_bytes=1 MiB`` and ``max_result_bytes=1 MiB``: Kafka's default
      ``max.message.bytes``; larger tasks are dead-lettered (``too_large``),
      larger results become ``result_too_large`` errors.
    - ``fallbacks`` (``"model=fallback,..."``): the fallback serves a model's
      tasks while it fails to load or fails ``fallback_max_failures=3`` batches
      in a row; the primary is probed every ``fallback_probe_every=10`` batches.
    - ``max_poll_interval_s=300``: Kafka's ``max.poll.interval.ms`` default.
      A paused worker keeps polling, so a pause longer than this is safe.
    - ``status_interval_s=5``: heartbeats on ``<prefix>.status``; a worker
      silent for three intervals counts as gone (``autoglm ctl --wait``).
    - ``drain_timeout_s=120``: the longest a drain waits for in-flight tasks.
    - ``stop_timeout_s=30``: on SIGTERM, the longest the worker waits for its
      partial batches to be served and delivered before it commits and leaves
      (give the process manager a longer grace period, e.g. compose's 60 s).
    - ``metrics_host="127.0.0.1"``: the Prometheus endpoint (``metrics_port``) is
      reachable from this machine only; set ``0.0.0.0`` in a container so that
      Prometheus can scrape it.
    - ``otel=False``: with ``AUTOGLM_OTEL=1`` the worker traces each batch with
      OpenTelemetry (``process``/``send`` spans linked to each task's ``traceparent``,
      exported with OTLP to ``OTEL_EXPORTER_OTLP_ENDPOINT``); needs the ``otel`` extra.
    - ``console_token``: the ops console's token (>= 16 chars); unset, ``autoglm
      console`` makes a random one per start and prints the URL that carries it
      (as Jupyter does).
    - ``model_repo``: a model repository folder (``DIR/<name>/model.yaml``,
      README "Serve your own model"); with it, ``models`` defaults to every
      model of the repository, without it to ``digits``. Built-in models
      stay available by name beside repository models.
    - ``control_key``: unset means control events are not signed (fine on a
      private broker); set it (>= 16 chars) on every worker and ops client to
      require HMAC-SHA256 signatures.
    - ``security_protocol`` and the ``ssl_*``/``sasl_*`` settings go to every
      Kafka client the project creates (Kafka's own names and meanings).
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    bootstrap_servers: str | None = Field(
        default=None, description="host:port[,host:port]; unset starts the embedded broker"
    )
    topic_prefix: str = Field(default="autoglm", pattern=r"^[a-zA-Z0-9._-]{1,100}$")
    partitions: int = Field(default=3, ge=1, le=10_000)
    replication_factor: int = Field(default=1, ge=1, le=32)
    #: pipeline files (``pipeline.yaml``) whose steps this worker serves; with them and no ``models``
    #: given, the worker serves the pipelines only (declared before ``models``, whose check reads it)
    pipelines: Annotated[tuple[str, ...], NoDecode] = ()
    models: Annotated[tuple[str, ...], NoDecode] = ("digits",)
    model_repo: str | None = Field(default=None, description="model repository folder (DIR/<name>/model.yaml)")
    group_id: str | None = None
    worker_id: str = Field(default_factory=_default_worker_id)
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    torch_threads: int | None = Field(default=None, ge=1)
    batching_mode: str = Field(default="adaptive", pattern=r"^(adaptive|fixed)$")
    # ranges: processors/tunables.py, the same for the control plane's configure and the policies
    latency_target_s: float = Field(default=0.100, gt=tunables.LATENCY_TARGET_S.low, le=tunables.LATENCY_TARGET_S.high)
    #: defaults by mode (adaptive 256 / 0.050 s, fixed 32 / 0.010 s), see _bounds_by_mode
    max_batch_size: int = Field(default=ADAPTIVE_MAX_BATCH_SIZE, ge=tunables.MAX_BATCH_SIZE.low,
                                le=tunables.MAX_BATCH_SIZE.high)
    max_wait_s: float = Field(default=ADAPTIVE_MAX_WAIT_S, ge=tunables.MAX_WAIT_S.low, le=tunables.MAX_WAIT_S.high)
    aging_per_s: float = Field(default=1.0, ge=0.0)
    metrics_port: int | None = Field(default=None, ge=0, le=65_535)
    #: the address the Prometheus endpoint binds: loopback by default, 0.0.0.0 in containers
    metrics_host: str = Field(default="127.0.0.1", min_length=1, max_length=255)
    max_in_flight: int = Field(default=1024, ge=1)
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    commit_interval_s: float = Field(default=1.0, gt=0.0, le=60.0)
    rebalance_timeout_s: float = Field(default=60.0, gt=0.0)
    session_timeout_s: float = Field(default=45.0, gt=0.0)
    heartbeat_interval_s: float = Field(default=3.0, gt=0.0)
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    # reliability
    delivery: str = Field(default="at_least_once", pattern=r"^(at_least_once|exactly_once)$")
    transaction_timeout_s: float = Field(default=30.0, gt=0.0, le=900.0)
    inference_timeout_s: float | None = Field(default=30.0, gt=0.0)
    max_task_bytes: int = Field(default=1024 * 1024, ge=256)
    max_result_bytes: int = Field(default=1024 * 1024, ge=256)
    fallbacks: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    fallback_max_failures: int = Field(default=3, ge=1)
    fallback_probe_every: int = Field(default=10, ge=1)
    # control plane
    max_poll_interval_s: float = Field(default=300.0, gt=0.0)
    status_interval_s: float = Field(default=5.0, gt=0.0, le=3600.0)
    drain_timeout_s: float = Field(default=120.0, gt=0.0)
    stop_timeout_s: float = Field(default=30.0, gt=0.0)
    control_key: SecretStr | None = Field(default=None, description="shared HMAC-SHA256 key; control events must be signed")
    #: OpenTelemetry spans per batch, exported with OTLP (the `otel` extra; streams/tracing.py)
    otel: bool = False
    # ops console (`autoglm console`)
    console_token: SecretStr | None = Field(default=None, description="token of the ops console; unset: a random one per start")
    # broker security, passed to every Kafka client (producer, consumers, admin)
    security_protocol: str = Field(default="PLAINTEXT", pattern=r"^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$")
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    sasl_mechanism: str | None = Field(default=None, pattern=r"^(PLAIN|SCRAM-SHA-256|SCRAM-SHA-512)$")
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not value and not info.data.get("pipelines"):
            raise ValueError("at least one model name is needed, e.g. digits,minilm (or a pipeline file)")
        return value

    @field_validator("pipelines", mode="before")
    @classmethod
    def _split_pipelines(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value


    @field_validator("console_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: Any) -> Any:
        """``AUTOGLM_CONSOLE_TOKEN=`` (compose's ``${AUTOGLM_CONSOLE_TOKEN:-}``) means: make a random one."""
        return None if value == "" else value

    @field_validator("fallbacks", mode="before")
    @classmethod
    def _split_fallbacks(cls, value: Any) -> Any:
        if isinstance(value, str):
            pairs = [p.strip() for p in value.split(",") if p.strip()]
            out = {}
            for pair in pairs:
                model, sep, fallback = pair.partition("=")
                if not sep or not model.strip() or not fallback.strip():
                    raise ValueError(f"expected model=fallback[,model=fallback], got {pair!r}")
                out[model.strip()] = fallback.strip()
            return out
        return value

    @model_validator(mode="before")
    @classmethod
    def _models_of_repository(cls, data: Any) -> Any:
        """With a model repository and no ``models`` given, serve every model of the repository."""
        if isinstance(data, dict) and data.get("pipelines") and not data.get("models"):
            return dict(data, models=())  # a pipeline worker serves its steps only, unless models are named
        if isinstance(data, dict) and data.get("model_repo") and not data.get("models"):
            from pathlib import Path

            root = Path(str(data["model_repo"])).expanduser()
            if not root.is_dir():
                raise ValueError(f"model_repo (AUTOGLM_MODEL_REPO): {str(root)!r} is not a folder")
            names = sorted(p.parent.name for p in root.glob("*/model.yaml") if p.is_file())
            if not names:
                raise ValueError(f"model_repo (AUTOGLM_MODEL_REPO): {str(root)!r} holds no <name>/model.yaml")
            data = dict(data, models=names)
        return data

    @model_validator(mode="before")
    @classmethod
    def _bounds_by_mode(cls, data: Any) -> Any:
        """Batch bounds not given default by the batching mode (see the class docstring)."""
        if isinstance(data, dict) and str(data.get("batching_mode") or "adaptive") == "fixed":
            data = dict(data)
            if data.get("max_batch_size") is None:
                data["max_batch_size"] = FIXED_MAX_BATCH_SIZE
            if data.get("max_wait_s") is None:
                data["max_wait_s"] = FIXED_MAX_WAIT_S
        return data

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.heartbeat_interval_s >= self.session_timeout_s:
            raise ValueError(
                "heartbeat_interval_s (AUTOGLM_HEARTBEAT_INTERVAL_S) must be below "
                "session_timeout_s (AUTOGLM_SESSION_TIMEOUT_S)"
            )
        if self.security_protocol.startswith("SASL") and not (self.sasl_mechanism and self.sasl_username
                                                             and self.sasl_password is not None):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password "
                "(AUTOGLM_SASL_MECHANISM, AUTOGLM_SASL_USERNAME, AUTOGLM_SASL_PASSWORD)"
            )
        if self.delivery == "exactly_once" and not self.bootstrap_servers:
            raise ValueError(
                "delivery=exactly_once (AUTOGLM_DELIVERY) needs Apache Kafka: set AUTOGLM_BOOTSTRAP_SERVERS. "
                "The embedded broker has no transactions, so it serves at_least_once only"
            )
        if max(self.max_task_bytes, self.max_result_bytes) > self.max_message_bytes:
            raise ValueError(
                "max_task_bytes (AUTOGLM_MAX_TASK_BYTES) and max_result_bytes (AUTOGLM_MAX_RESULT_BYTES) "
                f"must not exceed max_message_bytes (AUTOGLM_MAX_MESSAGE_BYTES) = {self.max_message_bytes}"
            )
        if self.console_token is not None and len(self.console_token.get_secret_value()) < 16:
            raise ValueError("console_token (AUTOGLM_CONSOLE_TOKEN) must be at least 16 characters")
        if self.control_key is not None and len(self.control_key.get_secret_value()) < 16:
            raise ValueError("control_key (AUTOGLM_CONTROL_KEY) must be at least 16 characters")
        return self

    @property
    def control_key_bytes(self) -> bytes | None:
        """The HMAC key of control events, or None when control events are not signed."""
        return None if self.control_key is None else self.control_key.get_secret_value().encode()

    @property
    def embedded(self) -> bool:
        """True when no bootstrap servers are configured (the embedded broker is used)."""
        return not self.bootstrap_servers

    @property
    def consumer_group(self) -> str:
        """The consumer group of the task consumers: ``group_id`` or ``<prefix>-workers``."""
        return self.group_id or f"{self.topic_prefix}-workers"

    @property
    def bootstrap_list(self) -> list[str]:
        """Bootstrap servers as a list of ``host:port``."""
        return [s.strip() for s in (self.bootstrap_servers or "").split(",") if s.strip()]


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment, then ``overrides`` (CLI flags; None means unset).

    Raises:
        ConfigError: a value is invalid; the message names the setting and
            its environment variable.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            env = f"{ENV_PREFIX}{name.upper()}" if name != "settings" else ENV_PREFIX + "*"
            shown = err.get("input")
            if name == "settings" or name in SECRET_FIELDS:  # whole-settings errors would print every value
                problems.append(f"{name} ({env}): {err['msg']}")
            else:
                problems.append(f"{name} ({env}): {err['msg']}; got {shown!r}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
