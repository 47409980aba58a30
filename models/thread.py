"""A single daemon thread that runs submitted calls in order: where a model's forwards run.

Nothing here imports Kafka or torch.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

_T = TypeVar("_T")

#: The longest a shutdown with ``wait`` waits for the current call (seconds).
JOIN_TIMEOUT_S = 30.0


class ModelThread:
    """One daemon thread that runs submitted calls in order; returns ``concurrent.futures.Future``.

    Like ``ThreadPoolExecutor(max_workers=1)``, except that its thread is a
    daemon: the executor's threads are joined at interpreter exit, so one
    stuck in a forward that never returns would keep the process alive.
    """

    def __init__(self, name: str):
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._shutdown = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the thread is still running (a stuck forward keeps it alive)."""
        return self._thread.is_alive()

    def submit(self, fn: Callable[..., _T], *args: Any) -> "Future[_T]":
        """Queue ``fn(*args)``; raises RuntimeError after :meth:`shutdown`."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError(f"model thread {self.name} is shut down")
            future: Future[_T] = Future()
            self._jobs.put((future, fn, args))
        return future

    def shutdown(self, *, wait: bool) -> None:
        """Cancel queued calls, let the thread end after its current call; ``wait``: join it
        (at most ``JOIN_TIMEOUT_S``)."""
        with self._lock:
            if not self._shutdown:
                self._shutdown = True
                while True:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        job[0].cancel()
                self._jobs.put(None)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout=JOIN_TIMEOUT_S)  # a hung forward must not hang the shutdown

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # delivered to the awaiting side, as an executor does
                future.set_exception(exc)
            else:
                future.set_result(result)
            del job, future, fn, args
