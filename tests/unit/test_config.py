"""Unit tests of the settings (autoglm/config.py): defaults, environment, overrides, errors."""

from __future__ import annotations

import os
import socket

import pydantic
import pytest

from autoglm.config import Settings, load_settings
from autoglm.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No AUTOGLM_* variable from the outer environment leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("AUTOGLM_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults() -> None:
    s = load_settings()
    assert isinstance(s, Settings)
    assert s.bootstrap_servers is None
    assert s.topic_prefix == "autoglm"
    assert s.partitions == 3
    assert s.replication_factor == 1
    assert s.models == ("digits",)
    assert s.group_id is None
    assert s.device == "auto"
    assert s.torch_threads is None
    assert s.batching_mode == "adaptive"
    assert s.max_batch_size == 256     # the adaptive mode's bounds
    assert s.max_wait_s == 0.050
    assert s.max_in_flight == 1024
    assert s.max_message_bytes == 4 * 1024 * 1024
    assert s.commit_interval_s == 1.0
    assert (s.rebalance_timeout_s, s.session_timeout_s, s.heartbeat_interval_s) == (60.0, 45.0, 3.0)
    assert s.log_level == "INFO"


def test_default_worker_id_names_host_and_process() -> None:
    assert load_settings().worker_id == f"{socket.gethostname()}-{os.getpid()}"


def test_models_from_env_comma_separated(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AUTOGLM_MODELS", "digits,minilm")
    assert load_settings().models == ("digits", "minilm")
    clean_env.setenv("AUTOGLM_MODELS", " digits , minilm ,, ")
    assert load_settings().models == ("digits", "minilm")


def test_numbers_from_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AUTOGLM_MAX_BATCH_SIZE", "8")
    clean_env.setenv("AUTOGLM_MAX_WAIT_S", "0.25")
    clean_env.setenv("AUTOGLM_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    s = load_settings()
    assert s.max_batch_size == 8 and isinstance(s.max_batch_size, int)
    assert s.max_wait_s == 0.25
    assert s.bootstrap_servers == "k1:9092,k2:9092"


def test_unknown_env_variables_are_ignored(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AUTOGLM_NO_SUCH_SETTING", "x")
    assert load_settings().max_batch_size == 256


def test_overrides_win_over_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AUTOGLM_MAX_BATCH_SIZE", "8")
    clean_env.setenv("AUTOGLM_MODELS", "digits")
    s = load_settings(max_batch_size=16, models="minilm,digits")
    assert s.max_batch_size == 16
    assert s.models == ("minilm", "digits")


def test_none_override_means_unset(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AUTOGLM_MAX_BATCH_SIZE", "8")
    s = load_settings(max_batch_size=None, partitions=None)
    assert s.max_batch_size == 8      # env, not the default and not None
    assert s.partitions == 3


@pytest.mark.parametrize(
    ("env", "value", "setting"),
    [
        ("AUTOGLM_MAX_BATCH_SIZE", "0", "max_batch_size"),
        ("AUTOGLM_MAX_BATCH_SIZE", "many", "max_batch_size"),
        ("AUTOGLM_MAX_WAIT_S", "-1", "max_wait_s"),
        ("AUTOGLM_PARTITIONS", "0", "partitions"),
        ("AUTOGLM_DEVICE", "tpu", "device"),
        ("AUTOGLM_TOPIC_PREFIX", "has space", "topic_prefix"),
        ("AUTOGLM_LOG_LEVEL", "chatty", "log_level"),
        ("AUTOGLM_MAX_IN_FLIGHT", "0", "max_in_flight"),
    ],
)
def test_invalid_env_value_names_setting_and_variable(
    clean_env: pytest.MonkeyPatch, env: str, value: str, setting: str
) -> None:
    clean_env.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert f"{setting} ({env})" in message
    assert repr(value) in message
    assert info.value.code == "config"
    assert isinstance(info.value, ValueError)


def test_invalid_override_names_setting_and_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(partitions=0, max_batch_size=-1)
    message = str(info.value)
    assert "partitions (AUTOGLM_PARTITIONS)" in message
    assert "max_batch_size (AUTOGLM_MAX_BATCH_SIZE)" in message


def test_heartbeat_must_be_below_session_timeout() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(heartbeat_interval_s=10.0, session_timeout_s=10.0)
    assert "heartbeat_interval_s (AUTOGLM_HEARTBEAT_INTERVAL_S) must be below" in str(info.value)
    assert "AUTOGLM_SESSION_TIMEOUT_S" in str(info.value)
    load_settings(heartbeat_interval_s=9.5, session_timeout_s=10.0)  # below: fine


def test_empty_model_list_is_rejected(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AUTOGLM_MODELS", " , ")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "at least one model" in str(info.value)


def test_empty_model_list_error_names_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AUTOGLM_MODELS", "")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "AUTOGLM_MODELS" in str(info.value)


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(pydantic.ValidationError):
        s.max_batch_size = 1  # type: ignore[misc]
    assert s.max_batch_size == 256


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ("adaptive", 256, 0.05)),
        ({"AUTOGLM_BATCHING_MODE": "fixed"}, ("fixed", 32, 0.01)),
        ({"AUTOGLM_BATCHING_MODE": "fixed", "AUTOGLM_MAX_BATCH_SIZE": "8"}, ("fixed", 8, 0.01)),
        ({"AUTOGLM_BATCHING_MODE": "fixed", "AUTOGLM_MAX_WAIT_S": "0.002"}, ("fixed", 32, 0.002)),
        ({"AUTOGLM_MAX_BATCH_SIZE": "16", "AUTOGLM_MAX_WAIT_S": "0"}, ("adaptive", 16, 0.0)),
    ],
)
def test_batch_bounds_default_by_mode(clean_env: pytest.MonkeyPatch, env: dict[str, str], expected: tuple) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    s = load_settings()
    assert (s.batching_mode, s.max_batch_size, s.max_wait_s) == expected
    # a flag (override) picks the mode too
    assert load_settings(batching_mode="fixed", max_batch_size=None).max_batch_size == int(env.get("AUTOGLM_MAX_BATCH_SIZE", 32))


@pytest.mark.parametrize(
    ("servers", "embedded", "listed"),
    [
        (None, True, []),
        ("", True, []),
        ("kafka:9092", False, ["kafka:9092"]),
        (" a:1 , b:2,", False, ["a:1", "b:2"]),
    ],
)
def test_embedded_and_bootstrap_list(servers: str | None, embedded: bool, listed: list[str]) -> None:
    s = Settings(bootstrap_servers=servers)
    assert s.embedded is embedded
    assert s.bootstrap_list == listed


def test_embedded_follows_env(clean_env: pytest.MonkeyPatch) -> None:
    assert load_settings().embedded is True
    clean_env.setenv("AUTOGLM_BOOTSTRAP_SERVERS", "kafka:9092")
    assert load_settings().embedded is False


def test_consumer_group() -> None:
    assert load_settings().consumer_group == "autoglm-workers"
    assert load_settings(topic_prefix="shop").consumer_group == "shop-workers"
    assert load_settings(topic_prefix="shop", group_id="g1").consumer_group == "g1"


def test_consumer_group_from_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AUTOGLM_TOPIC_PREFIX", "staging")
    assert load_settings().consumer_group == "staging-workers"
    clean_env.setenv("AUTOGLM_GROUP_ID", "custom")
    assert load_settings().consumer_group == "custom"


def test_exactly_once_needs_an_external_broker():
    from autoglm.config import load_settings
    from autoglm.errors import ConfigError

    with pytest.raises(ConfigError, match="embedded broker has no transactions"):
        load_settings(delivery="exactly_once")
    assert load_settings(delivery="exactly_once", bootstrap_servers="k:9092").delivery == "exactly_once"


def test_fallbacks_parse_from_the_environment_form():
    from autoglm.config import load_settings
    from autoglm.errors import ConfigError

    assert load_settings(fallbacks="digits=digits-small, minilm=tiny").fallbacks == {
        "digits": "digits-small", "minilm": "tiny"}
    with pytest.raises(ConfigError, match="model=fallback"):
        load_settings(fallbacks="digits")


def test_size_limits_must_fit_the_message_limit_and_sasl_needs_credentials():
    from autoglm.config import load_settings
    from autoglm.errors import ConfigError

    with pytest.raises(ConfigError, match="max_task_bytes"):
        load_settings(max_task_bytes=8 * 1024 * 1024)
    with pytest.raises(ConfigError, match="sasl_mechanism"):
        load_settings(security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ConfigError, match="at least 16"):
        load_settings(control_key="short")


def test_settings_errors_never_print_secrets():
    from autoglm.config import load_settings
    from autoglm.errors import ConfigError

    with pytest.raises(ConfigError) as info:  # a whole-settings error (SASL without a mechanism)
        load_settings(security_protocol="SASL_SSL", sasl_username="u", sasl_password="hunter2-secret",
                      control_key="another-secret-of-length")
    assert "hunter2" not in str(info.value) and "another-secret" not in str(info.value)
    with pytest.raises(ConfigError) as info:  # a field error on a secret
        load_settings(control_key="short-secret")
    assert "short-secret" not in str(info.value)


def test_batching_ranges_are_the_tunables_ranges():
    """One source for each range (processors/tunables.py): the settings accept exactly its bounds."""
    from autoglm.processors import tunables

    for tunable in tunables.TUNABLES.values():
        high = tunable.high
        assert getattr(load_settings(**{tunable.name: high}), tunable.name) == high
        with pytest.raises(ConfigError, match=tunable.name):
            load_settings(**{tunable.name: high * 2})
        tunable.check(high)
        with pytest.raises(ValueError):
            tunable.check(high * 2)
