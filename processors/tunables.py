"""The batching tunables and their ranges, defined once.

Used by the worker settings (``autoglm/config.py``: field bounds), the control
plane (``configure`` events are checked against them before they are
published and again when applied) and the batching policies (``configure``).
Ranges are inclusive unless ``low_open``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

BATCHING_MODES = ("adaptive", "fixed")


@dataclass(frozen=True, slots=True)
class Tunable:
    """One batching parameter: its Python types, its range and whether ``low`` itself is excluded."""

    name: str
    types: tuple[type, ...]
    low: float
    high: float
    low_open: bool = False

    def check(self, value: Any) -> Any:
        """Return ``value`` when valid.

        Raises:
            ValueError: wrong type, not finite, or out of range (the message names the range).
        """
        if isinstance(value, bool) or not isinstance(value, self.types):
            raise ValueError(f"configure parameter {self.name!r} must be {'/'.join(t.__name__ for t in self.types)}, "
                             f"got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.name} must be finite, got {value!r}")
        below = value <= self.low if self.low_open else value < self.low
        if below or value > self.high:
            low = f"between {self.low:g} (excluded)" if self.low_open else f"between {self.low:g}"
            raise ValueError(f"{self.name} must be {low} and {self.high:g}, got {value!r}")
        return value


#: latency_target_s: the p99 end-to-end SLO, seconds (> 0, at most an hour)
LATENCY_TARGET_S = Tunable("latency_target_s", (int, float), 0.0, 3600.0, low_open=True)
#: max_batch_size: tasks per micro-batch at most
MAX_BATCH_SIZE = Tunable("max_batch_size", (int,), 1, 65_536)
#: max_wait_s: seconds a batch may wait for more tasks
MAX_WAIT_S = Tunable("max_wait_s", (int, float), 0.0, 60.0)

TUNABLES: dict[str, Tunable] = {t.name: t for t in (LATENCY_TARGET_S, MAX_BATCH_SIZE, MAX_WAIT_S)}
#: every parameter ``configure`` accepts (the three above and ``mode``) and the types it may have
CONFIGURE_PARAMS: dict[str, tuple[type, ...]] = {**{n: t.types for n, t in TUNABLES.items()}, "mode": (str,)}


def check_tunables(params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate batching parameters by name (``mode`` in :data:`BATCHING_MODES`).

    Raises:
        ValueError: an unknown name, a wrong type or a value out of range.
    """
    for name, value in params.items():
        if name == "mode":
            if not isinstance(value, str):
                raise ValueError(f"configure parameter 'mode' must be str, got {value!r}")
            if value not in BATCHING_MODES:
                raise ValueError(f"mode must be one of {BATCHING_MODES}, got {value!r}")
            continue
        tunable = TUNABLES.get(name)
        if tunable is None:
            raise ValueError(f"unknown configure parameter {name!r}; known: {sorted(CONFIGURE_PARAMS)}")
        tunable.check(value)
    return dict(params)
