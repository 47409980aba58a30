"""Served models: what a model is (``base``), how it runs (``runner``), which exist (``registry``).

Importing this package imports torch but neither transformers nor Kafka; the
built-in models (``autoglm.models.digits``, ``autoglm.models.minilm``) are
imported when the registry first creates them.
"""

from autoglm.models.base import InferenceModel, Signature
from autoglm.models.registry import ModelRegistry, default_registry
from autoglm.models.runner import ModelRunner, select_device

__all__ = [
    "InferenceModel",
    "ModelRegistry",
    "ModelRunner",
    "Signature",
    "default_registry",
    "select_device",
]
