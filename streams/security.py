"""Broker security settings (TLS, SASL) for every Kafka client the project creates.

One place turns the security settings (any object with the fields of
:class:`SecuritySettings`, such as :class:`~autoglm.config.Settings`) into
client arguments, so that the worker's consumer and producer, the
control-plane consumer, the admin clients and the CLI's publisher and readers
all connect the same way. The names follow Kafka's client settings (``security.protocol``,
``sasl.mechanism``, ``ssl.truststore`` as a CA file).
"""

from __future__ import annotations

import ssl
from typing import Any, Protocol

from autoglm.processors.errors import ConfigError


class Secret(Protocol):
    """A secret value (pydantic's ``SecretStr``): shown nowhere, read with ``get_secret_value``."""

    def get_secret_value(self) -> str: ...


class SecuritySettings(Protocol):
    """The security fields a Kafka client needs (Kafka's names; see README, TLS and SASL)."""

    security_protocol: str
    ssl_cafile: str | None
    ssl_certfile: str | None
    ssl_keyfile: str | None
    sasl_mechanism: str | None
    sasl_username: str | None
    sasl_password: Secret | None


Settings = SecuritySettings


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
