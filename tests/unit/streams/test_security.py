"""Broker security settings reach every client the project creates."""

from __future__ import annotations

import ssl

import pytest

from autoglm.config import load_settings
from autoglm.errors import ConfigError
from autoglm.streams.security import client_kwargs


def test_plaintext_adds_nothing():
    assert client_kwargs(load_settings()) == {}


def test_sasl_plaintext_passes_mechanism_and_credentials():
    s = load_settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                      sasl_username="svc", sasl_password="s3cret")
    assert client_kwargs(s) == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                                "sasl_plain_username": "svc", "sasl_plain_password": "s3cret"}
    assert "s3cret" not in repr(s), "the password must not show in logs of the settings"


def test_ssl_builds_a_verifying_context_and_a_missing_ca_file_is_a_config_error(tmp_path):
    kwargs = client_kwargs(load_settings(security_protocol="SSL"))
    assert kwargs["security_protocol"] == "SSL"
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert kwargs["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigError, match="AUTOGLM_SSL_CAFILE"):
        client_kwargs(load_settings(security_protocol="SSL", ssl_cafile=str(tmp_path / "missing.pem")))


def test_every_kafka_client_of_the_worker_and_cli_gets_the_security_arguments():
    """Structural check: each aiokafka client the project constructs takes a ``**`` of arguments
    (the security kwargs; the SASL integration test checks they are the right ones)."""
    import inspect

    from autoglm import demo, tasks, worker
    from autoglm.streams import app, client, consumer, control, topics, transactions

    for module in (app, client, consumer, control, topics, transactions, tasks, worker, demo):
        source = inspect.getsource(module)
        for ctor in ("AIOKafkaProducer(", "AIOKafkaConsumer(", "AIOKafkaAdminClient("):
            for chunk in source.split(ctor)[1:]:
                call = chunk[: chunk.index(")\n") if ")\n" in chunk else 400]
                assert "**" in call, f"{module.__name__}: {ctor} without security kwargs: {call[:120]!r}"
