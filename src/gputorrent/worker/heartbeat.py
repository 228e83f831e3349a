"""The worker's heartbeat, on its own thread and Redis connection.

A generation that keeps the event loop busy (or a long GIL hold) must not make a live worker
look dead, so the beat does not share the loop that runs jobs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis
from redis.exceptions import RedisError

from gputorrent import registry
from gputorrent.protocol import Heartbeat

log = logging.getLogger(__name__)


class HeartbeatThread(threading.Thread):
    """Rewrites `heartbeat:{worker_id}` with what `heartbeat()` says every `interval_s` (or at once
    after `beat_now()`), with a `ttl_s` expiry, until `stop()`."""

    def __init__(
        self,
        redis_url: str,
        worker_id: str,
        interval_s: float,
        ttl_s: float,
        heartbeat: Callable[[], Heartbeat],
        on_drain: Callable[[], None],
    ) -> None:
        super().__init__(name=f"heartbeat-{worker_id}", daemon=True)
        self._client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
        self._worker_id = worker_id
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._heartbeat = heartbeat
        self._on_drain = on_drain  # called (from this thread) once an admin asks the worker to drain
        self._stopping = threading.Event()
        self._wake = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    if registry.beat(self._client, self._worker_id, self._heartbeat(), self._ttl_s):
                        self._on_drain()
                except (RedisError, OSError) as e:
                    log.warning("worker %s heartbeat failed: %s", self._worker_id, e)
                self._wake.wait(self._interval_s)
        finally:
            self._client.close()

    def beat_now(self) -> None:
        """Beat without waiting for the interval: the worker's condition just changed."""
        self._wake.set()

    def stop(self) -> None:
        """End the loop and wait for the thread (at most one Redis call)."""
        self._stopping.set()
        self._wake.set()
        self.join(timeout=10)
