"""Signatures as a pipeline sees them: named per-row tensors, and whether one can feed another.

Nothing here imports Kafka or torch (numpy only, for its cast rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

#: the wire's dtypes (``autoglm.models.spec.DTYPES``; a unit test keeps the two equal)
DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")


class PortLike(Protocol):
    """A named tensor of a signature, per row (``autoglm.models.spec.TensorSpec`` is one)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    text: bool


class ModelSignatureLike(Protocol):
    """A model's declared signature (``autoglm.models.spec.ModelSpec`` is one)."""

    inputs: Sequence[PortLike]
    outputs: Sequence[PortLike]


#: ``lookup(model) -> signature``; raises ``LookupError`` whose message says why there is none.
SignatureLookup = Callable[[str], ModelSignatureLike]


@dataclass(frozen=True, slots=True)
class Port:
    """A declared tensor of the pipeline input: ``name``, numpy ``dtype``, per-row ``shape`` (-1: any), ``text``."""

    name: str
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    text: bool = False


def describe_port(p: PortLike) -> str:
    """``name: text`` or ``name: dtype (B, d1, ...)`` with ``?`` for a variable axis."""
    if p.text:
        return f"{p.name}: text"
    dims = "".join(f", {'?' if d < 0 else d}" for d in p.shape)
    return f"{p.name}: {p.dtype} (B{dims})"


def port_mismatch(up: PortLike, down: PortLike) -> str | None:
    """Why tensors of ``up`` cannot feed ``down``, or ``None`` when they can.

    Text feeds only text; a dtype feeds its own or one it casts to safely
    (``numpy.can_cast(up, down, "safe")``: int32 -> int64, float16 -> float32, not float64 -> float32);
    per-row shapes need as many axes, each equal or variable (-1) on either side.
    """
    if up.text or down.text:
        return None if up.text and down.text else (
            f"input {down.name!r} takes {'text' if down.text else 'a tensor (' + describe_port(down) + ')'}, "
            f"gets {'text' if up.text else 'a tensor'} ({describe_port(up)})")
    if up.dtype != down.dtype and not np.can_cast(np.dtype(up.dtype), np.dtype(down.dtype), "safe"):
        return f"dtype: {describe_port(down)} takes {down.dtype}, gets {up.dtype} (no safe cast)"
    if len(up.shape) != len(down.shape) or any(a != b and a >= 0 and b >= 0 for a, b in zip(up.shape, down.shape)):
        return f"per-row shape: {describe_port(down)}, gets {describe_port(up)}"
    return None
