"""Shared fixtures: the integration fixtures (brokers, workers) serve the e2e tests too."""

from tests.integration.conftest import (  # noqa: F401
    embedded_bootstrap,
    kafka_bootstrap,
    model_cache,
    prefix,
    workers,
)
