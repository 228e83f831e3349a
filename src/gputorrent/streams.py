"""Token streams in Redis: the worker appends text to `stream:{request_id}`, any coordinator follows it.

A stream ends with one entry holding the whole `JobResult` (written with the result itself,
see `queue.finish`), so a follower always learns how the job ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.typing import KeyT, StreamIdT

from gputorrent import keys, pipelined
from gputorrent.protocol import JobResult, TokenChunk
from gputorrent.queue.lists import FENCE, MOVES_FIELD
from gputorrent.redis_client import REDIS_FAILURES, RedisClient
from gputorrent.scripts import Script

log = logging.getLogger(__name__)

TEXT_FIELD = "text"
TOKENS_FIELD = "tokens"  # how many tokens the entry's text holds, for a worker that resumes the stream
RESULT_FIELD = "result"
FOLLOW_BLOCK_MS = 1000

StreamReply = list[tuple[str, list[tuple[str, dict[str, str]]]]]


# Only the job's holder writes: a worker whose lease was taken (it stalled and the job went on to
# another, or the job was ended) must not interleave its tokens with the next worker's.
@dataclass(frozen=True)
class _AppendKeys:
    stream: str
    cancel: str
    status: str


@dataclass(frozen=True)
class _AppendArgs:
    text: str
    tokens: str
    ttl_s: int
    worker_id: str
    fence: str  # the holder's lease fence ('' = not checked: see `lists.FENCE`)
    moves_field: str


# A worker id names its holder, but a job handed back to its queue and taken again keeps it (a shared
# job, or a worker whose id another process registered): the lease's fence tells the two takes apart.
_APPEND = Script(
    _AppendKeys,
    _AppendArgs,
    """
if redis.call('HGET', status, 'worker_id') ~= worker_id or redis.call('EXISTS', cancel) == 1 then return 0 end
"""
    + FENCE
    + """
redis.call('XADD', stream, '*', 'text', text, 'tokens', tokens)
redis.call('EXPIRE', stream, ttl_s)
return 1
""",
)


async def append(
    redis: RedisClient, request_id: str, worker_id: str, text: str, tokens: int, ttl_s: int, *, fence: str = ""
) -> bool:
    """Append text to the stream if `worker_id` still holds the job (with `fence`, under that lease:
    `queue.Lease.fence`); False (nothing written) once it does not: the job was ended (see
    `queue.end`), finished or handed on."""
    where = _AppendKeys(
        stream=keys.stream_key(request_id), cancel=keys.cancel_key(request_id), status=keys.job_key(request_id)
    )
    append_args = _AppendArgs(
        text=text, tokens=str(tokens), ttl_s=ttl_s, worker_id=worker_id, fence=fence, moves_field=MOVES_FIELD
    )
    return bool(await _APPEND.run(redis, where, append_args))


async def sent_so_far(redis: RedisClient, request_id: str) -> tuple[str, int]:
    """The text an earlier attempt of the job already streamed, and its token count."""
    entries = cast(list[tuple[str, dict[str, str]]], await redis.xrange(keys.stream_key(request_id)))
    texts = [fields for _, fields in entries if TEXT_FIELD in fields]
    return "".join(f[TEXT_FIELD] for f in texts), sum(int(f.get(TOKENS_FIELD, 1)) for f in texts)


StreamEntry = tuple[str, TokenChunk | JobResult]
"""An entry of a token stream: its Redis id (usable as `after`) and its text or the result."""


async def follow(
    redis: RedisClient, request_id: str, timeout_s: float, after: str = "0-0"
) -> AsyncIterator[list[StreamEntry]]:
    """Read the stream from after the entry id `after`, in rounds of at most `FOLLOW_BLOCK_MS`: each
    round's text (maybe none), the `JobResult` last; stops after the result, or after `timeout_s` without one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last_id = after
    key = keys.stream_key(request_id)
    read = ("XREAD", "COUNT", "512", "BLOCK", str(FOLLOW_BLOCK_MS), "STREAMS", key)
    # A connection of its own while it blocks, on the lean path (pipelined.py): a round per batch of text.
    async with pipelined.borrowed(redis, key) as connection:
        while loop.time() < deadline:
            (reply,) = await connection.execute_all((*read, last_id), blocks_s=FOLLOW_BLOCK_MS / 1000)
            batch: list[StreamEntry] = []
            for _, entries in _streams_of(reply):
                for entry_id, flat_fields in entries:
                    last_id = entry_id
                    fields = dict(zip(flat_fields[::2], flat_fields[1::2], strict=True))
                    batch.append((entry_id, item := _item(fields)))
                    if isinstance(item, JobResult):
                        yield batch
                        return
            yield batch


async def follow_many(
    redis: RedisClient, request_ids: Sequence[str], timeout_s: float
) -> AsyncIterator[list[tuple[str, StreamEntry]]]:
    """Read several streams from their start with one XREAD per round (at most `FOLLOW_BLOCK_MS`):
    each round's entries with their request ids (maybe none), each stream's `JobResult` last of it;
    stops once every stream gave its result, or after `timeout_s`. Streams of several cells (one XREAD
    names one cell's keys only, on a cluster) are read with one XREAD a cell, sharing the round's wait."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    request_id_of = {keys.stream_key(request_id): request_id for request_id in request_ids}
    cell_of: dict[KeyT, int] = {key: keys.cell_of(request_id) for key, request_id in request_id_of.items()}
    after: dict[KeyT, StreamIdT] = dict.fromkeys(request_id_of, "0-0")  # the streams without their result yet
    while after and loop.time() < deadline:
        by_cell: dict[int, dict[KeyT, StreamIdT]] = {}
        for key, entry_id in after.items():
            by_cell.setdefault(cell_of[key], {})[key] = entry_id
        block_ms = max(1, FOLLOW_BLOCK_MS // len(by_cell))
        batch: list[tuple[str, StreamEntry]] = []
        for streams in by_cell.values():
            # Once a cell gave entries, the rest are read without waiting: the round's entries go out now.
            reply = cast(StreamReply, await redis.xread(streams, block=None if batch else block_ms, count=512))
            for key, entries in reply:
                for entry_id, fields in entries:
                    after[key] = entry_id
                    batch.append((request_id_of[key], (entry_id, item := _item(fields))))
                    if isinstance(item, JobResult):
                        del after[key]
                        break
        yield batch


def _streams_of(reply: Any) -> Iterable[tuple[str, list[list[Any]]]]:
    """(stream, entries) of an XREAD reply: a map under RESP3 (what redis-py's connections speak
    by default now), a list of pairs under RESP2, None when nothing came."""
    if isinstance(reply, dict):
        return reply.items()
    return reply or ()


def _item(fields: dict[str, str]) -> TokenChunk | JobResult:
    """A stream entry's text, or the result that ends the stream."""
    if RESULT_FIELD in fields:
        return JobResult.model_validate_json(fields[RESULT_FIELD])
    return TokenChunk(text=fields[TEXT_FIELD])


class StreamWriter:
    """Batches a job's text into its stream through `append(text, tokens)` (which answers whether the
    job is still the writer's): one write in flight at a time, the text meanwhile goes in the next.

    The first token goes out at once (time to first token); under a fast generator the batch
    grows to whatever arrived during one round trip, so Redis sees one call per flush, not per token.
    """

    def __init__(self, append: Callable[[str, int], Awaitable[bool]]) -> None:
        self._append = append
        self._pending: list[str] = []
        self._flusher: asyncio.Task[None] | None = None
        self.cancelled = False
        self.failure: Exception | None = None  # the first failed write; the stream stops there

    def push(self, text: str) -> None:
        """Queue one token's text for the stream (never blocks the generation)."""
        if self.failure is not None:
            return
        self._pending.append(text)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending:
                text, tokens = "".join(self._pending), len(self._pending)
                self._pending.clear()
                if not await self._append(text, tokens):
                    self.cancelled = True
        except REDIS_FAILURES as e:  # kept for close(): a later push must not lose it
            self.failure = e
            self._pending.clear()

    async def close(self) -> None:
        """Wait until everything pushed is in Redis.

        Raises:
            REDIS_FAILURES: a write failed; the stream lacks text from that point.
        """
        if self._flusher is not None:
            await self._flusher
        if self.failure is not None:
            raise self.failure
