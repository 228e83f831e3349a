"""Waiting for results without polling: the coordinator's listener (`listener.py`) wakes the waiters.

A result's announcement usually carries the result itself (see `queue.announces_result`), and
the listener keeps the latest ones for a while: a request waiting for a job it has just admitted
gets its answer without reading Redis at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, defaultdict

from gputorrent import queue
from gputorrent.protocol import JobResult, JobStatus
from gputorrent.redis_client import RedisClient

log = logging.getLogger(__name__)

# A waiter re-reads Redis at least this often, so a missed notification (listener
# reconnecting) delays an answer by at most this much instead of losing it.
RECHECK_INTERVAL_S = 1.0
# The announced results kept, newest last, for requests that start waiting just after theirs came:
# every coordinator hears every result, so this is bounded by size (in characters of the messages),
# not by the results it serves.
RECENT_RESULTS_MAX_CHARS = 16 * 1024 * 1024


class ResultWaiter:
    """Lets requests wait for `result:{request_id}`; the coordinator's `Listener` hands it the
    announcements of `results:ready`."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._events: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        # request id -> its result's JSON, or None when the announcement did not carry it (read Redis)
        self._recent: OrderedDict[str, str | None] = OrderedDict()
        self._recent_chars = 0

    def announced(self, request_id: str, result_json: str | None) -> None:
        """A result announced on `results:ready` (with its JSON, or None when the announcement did not
        carry it): keep it and wake whoever waits for it."""
        if request_id in self._recent:  # not expected (a job is finished once), but then the newest counts
            self._forget(request_id)
        self._recent[request_id] = result_json
        self._recent_chars += len(request_id) + (len(result_json) + 1 if result_json is not None else 0)
        while self._recent_chars > RECENT_RESULTS_MAX_CHARS:
            self._forget(next(iter(self._recent)))
        for event in self._events.get(request_id, ()):
            event.set()

    def subscribed(self) -> None:
        pass  # waiters already re-read Redis after every wake and every `RECHECK_INTERVAL_S`

    def lost(self) -> None:
        """Announcements may be missed: wake every waiter to read Redis."""
        for waiting in self._events.values():
            for event in waiting:
                event.set()

    async def wait(self, request_id: str, timeout_s: float, *, admitted: bool = False) -> JobResult | JobStatus | None:
        """The result once it exists, or the latest status after `timeout_s`; None for an unknown id.

        `admitted`: the caller has just queued this job, so its result is announced after this
        listener subscribed (or the listener is down, and the wait reads Redis every
        `RECHECK_INTERVAL_S`): the first read of Redis is skipped.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        event = asyncio.Event()
        self._events[request_id].add(event)
        read_redis = not admitted
        try:
            while True:
                event.clear()  # cleared before the look, so a result announced after it still wakes us
                if (announced := self._recent.get(request_id)) is not None:
                    return JobResult.model_validate_json(announced)
                remaining_s = deadline - loop.time()
                if read_redis or request_id in self._recent or remaining_s <= 0:
                    found = await queue.lookup(self._redis, request_id)
                    if not isinstance(found, JobStatus) or remaining_s <= 0:
                        return found
                read_redis = True  # from now on a wake without the result in hand reads Redis
                # `timeout` rather than `wait_for`: no task of its own, so a wake reaches us one loop turn sooner.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining_s, RECHECK_INTERVAL_S)):
                        await event.wait()
        finally:
            waiting = self._events[request_id]
            waiting.discard(event)
            if not waiting:
                del self._events[request_id]

    def _forget(self, request_id: str) -> None:
        result_json = self._recent.pop(request_id)
        self._recent_chars -= len(request_id) + (len(result_json) + 1 if result_json is not None else 0)
