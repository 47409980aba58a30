"""Open-AutoGLM stream engine: Kafka-native real-time inference.

``autoglm.Client`` (async) and ``autoglm.SyncClient`` run tasks over Kafka and
return their outputs (see :mod:`autoglm.streams.client`); they are imported on
first use, so ``import autoglm`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Client", "SyncClient"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from autoglm.streams import client

        return getattr(client, name)
    raise AttributeError(f"module 'autoglm' has no attribute {name!r}")
