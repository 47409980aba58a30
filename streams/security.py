"""Broker security settings (TLS, SASL) for every Kafka client the project creates.

One place turns :class:`~autoglm.config.Settings` into client arguments, so
that the worker's faust consumer and producer, the control-plane consumer,
the admin clients and the CLI's publisher and readers all connect the same
way. The names follow Kafka's client settings (``security.protocol``,
``sasl.mechanism``, ``ssl.truststore`` as a CA file).
"""

from __future__ import annotations

import ssl
from typing import Any

from autoglm.config import Settings
from autoglm.errors import ConfigError


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of ``SSL``/``SASL_SSL`` connections, or None for plaintext ones.

    Raises:
        ConfigError: a CA, certificate or key file cannot be read.
    """
    if settings.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    from aiokafka.helpers import create_ssl_context

    try:
        return create_ssl_context(
            cafile=settings.ssl_cafile, certfile=settings.ssl_certfile, keyfile=settings.ssl_keyfile
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot build the TLS context (AUTOGLM_SSL_CAFILE/CERTFILE/KEYFILE): {exc}"
        ) from exc


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client (producer, consumer, admin).

    Returns:
        ``{}`` for ``PLAINTEXT``; otherwise ``security_protocol`` plus
        ``ssl_context`` and/or the SASL arguments.
    """
    if settings.security_protocol == "PLAINTEXT":
        return {}
    kwargs: dict[str, Any] = {"security_protocol": settings.security_protocol}
    context = ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    if settings.security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = (
            settings.sasl_password.get_secret_value() if settings.sasl_password is not None else None
        )
    return kwargs


def faust_credentials(settings: Settings) -> dict[str, Any]:
    """faust app settings (``broker_credentials``) carrying the same security settings."""
    import faust

    if settings.security_protocol == "PLAINTEXT":
        return {}
    context = ssl_context(settings)
    if settings.security_protocol == "SSL":
        return {"broker_credentials": faust.SSLCredentials(context)}
    return {
        "broker_credentials": faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password.get_secret_value() if settings.sasl_password is not None else None,
            ssl_context=context,
            mechanism=settings.sasl_mechanism,
        )
    }
