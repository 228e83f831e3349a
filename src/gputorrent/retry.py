"""Exponential backoff for the loops that must outlive a Redis or network outage."""

from __future__ import annotations

import asyncio


class Backoff:
    """Delays that double from `first_s` up to `max_s`; `reset()` after a success."""

    def __init__(self, first_s: float = 0.1, max_s: float = 5.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.delay_s = first_s

    def reset(self) -> None:
        self.delay_s = self.first_s

    async def wait(self) -> None:
        """Sleep the current delay, then double it.

        redis-py can turn a task's cancellation into a ConnectionError; a retry loop that
        caught it would then run forever. The task still counts the pending cancellation,
        so it is raised again here.
        """
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        await asyncio.sleep(self.delay_s)
        self.delay_s = min(self.delay_s * 2, self.max_s)
