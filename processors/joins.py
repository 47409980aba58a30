"""The join of a pipeline step that reads several sources: inner join by task id within a window.

Pure: the clock is passed in, never read; no Kafka.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from autoglm.processors.dag import StepError

@dataclass(frozen=True, slots=True)
class JoinTimeout:
    """A task whose join did not complete within its window.

    Attributes:
        task_id: the task.
        present: the sources that arrived, sorted.
        missing: the sources that did not, sorted.
    """

    task_id: str
    present: tuple[str, ...]
    missing: tuple[str, ...]

    def error(self, step: str) -> StepError:
        """The ``join_timeout`` error the task's result carries, naming the missing inputs."""
        return StepError("join_timeout", f"step {step!r}: no {', '.join(self.missing)} within the join window "
                                         f"(had {', '.join(self.present) or 'nothing'})")


class JoinBuffer:
    """Inner join by task id of several sources within a window (the clock is passed in, never read).

    A task's entry opens with the first source that arrives for it and must be completed by
    every source within ``window_s`` of that arrival; a later arrival of an expired task opens
    a new entry. Memory: one entry per open task.

    Args:
        sources: what the join waits for (step names, ``input``).
        window_s: seconds, > 0.

    Raises:
        ValueError: no sources, or ``window_s`` not > 0.
    """

    def __init__(self, sources: Iterable[str], window_s: float):
        self.sources = tuple(dict.fromkeys(sources))
        if not self.sources or not window_s > 0:
            raise ValueError(f"a join needs sources and a window > 0 s, got {self.sources} and {window_s!r}")
        self.window_s = window_s
        self._open: dict[str, tuple[float, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def offer(self, task_id: str, source: str, value: Any, now_s: float) -> dict[str, Any] | None:
        """Record ``source``'s ``value`` for ``task_id``; the joined ``{source: value}`` once all arrived.

        A repeated source (an at-least-once duplicate) replaces the earlier value.

        Raises:
            KeyError: ``source`` is not one of :attr:`sources`.
        """
        if source not in self.sources:
            raise KeyError(f"{source!r} is not a source of this join ({', '.join(self.sources)})")
        opened, got = self._open.setdefault(task_id, (now_s, {}))
        got[source] = value
        if len(got) < len(self.sources):
            return None
        del self._open[task_id]
        return {s: got[s] for s in self.sources}

    def next_deadline_s(self) -> float | None:
        """When the oldest open entry expires (clock seconds), or ``None`` when none is open."""
        if not self._open:
            return None
        return min(opened for opened, _ in self._open.values()) + self.window_s

    def expire(self, now_s: float) -> list[JoinTimeout]:
        """Remove and return the entries open for ``window_s`` or more at ``now_s``, oldest first."""
        due = sorted((opened, tid) for tid, (opened, _) in self._open.items() if now_s - opened >= self.window_s)
        out = []
        for _, tid in due:
            got = self._open.pop(tid)[1]
            out.append(JoinTimeout(tid, tuple(sorted(got)), tuple(sorted(s for s in self.sources if s not in got))))
        return out
