"""Fake time for batcher tests: no real sleeps."""

from __future__ import annotations

import asyncio


async def settle(times: int = 40) -> None:
    """Let every ready task run; ``asyncio.sleep(0)`` only yields."""
    for _ in range(times):
        await asyncio.sleep(0)


class JumpClock:
    """Fake monotonic time; ``sleep(d)`` advances it by ``d`` and yields once."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        self.now += delay_s
        await asyncio.sleep(0)
