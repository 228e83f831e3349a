"""The worker's heartbeat, on its own thread and connection (to Redis, or to the coordinator).

A generation that keeps the event loop busy (or a long GIL hold) must not make a live worker
look dead, so the beat does not share the loop that runs jobs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from gputorrent.protocol import Heartbeat
from gputorrent.redis_client import REDIS_FAILURES

if TYPE_CHECKING:
    from gputorrent.worker.link import HeartbeatSender

log = logging.getLogger(__name__)


class HeartbeatThread(threading.Thread):
    """Sends what `heartbeat()` says, with the jobs `running()` names, every `interval_s` (or at once
    after `beat_now()`) through `sender` (which it closes), until `stop()`."""

    def __init__(
        self,
        sender: HeartbeatSender,
        worker_id: str,
        interval_s: float,
        heartbeat: Callable[[], Heartbeat],
        running: Callable[[], list[str]],
        on_drain: Callable[[bool], None],
        on_ended: Callable[[list[str]], None],
        on_swarm_epoch: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(name=f"heartbeat-{worker_id}", daemon=True)
        self._sender = sender
        self._worker_id = worker_id
        self._interval_s = interval_s
        self._heartbeat = heartbeat
        self._running = running
        # called (from this thread) once the worker is to drain (an admin asked, or it left the registry),
        # with whether another process registered its id since (`BeatAnswer.replaced`)
        self._on_drain = on_drain
        self._on_ended = on_ended  # called (from this thread) with running jobs that were ended elsewhere
        self._on_swarm_epoch = on_swarm_epoch  # called (from this thread) with each beat's swarm epoch
        self._stopping = threading.Event()
        self._wake = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    answer = self._sender.send(self._heartbeat(), self._running())
                except REDIS_FAILURES as e:
                    log.warning("worker %s heartbeat failed: %s", self._worker_id, e)
                except Exception:  # the outermost boundary of the beat: a thread that dies makes the worker look dead
                    log.exception("worker %s heartbeat failed", self._worker_id)
                else:
                    if answer.ended:
                        self._on_ended(answer.ended)
                    if answer.replaced:  # a beat more would write over the other process's heartbeat
                        self._on_drain(True)
                        return
                    if answer.drain:
                        self._on_drain(False)
                    if self._on_swarm_epoch is not None:
                        self._on_swarm_epoch(answer.swarm_epoch)
                self._wake.wait(self._interval_s)
        finally:
            self._sender.close()

    def beat_now(self) -> None:
        """Beat without waiting for the interval: the worker's condition just changed."""
        self._wake.set()

    def stop(self) -> None:
        """End the loop and wait for the thread (at most one call in flight)."""
        self._stopping.set()
        self._wake.set()
        self.join(timeout=10)
