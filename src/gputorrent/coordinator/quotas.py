"""Per-key limits checked at admission: requests and tokens per minute, streams open at once, and
the size of what one request may ask for. Counters live in Redis, so every coordinator shares them.

Tokens are counted when a request is admitted, before it runs: the prompt at about four characters
a token plus the `max_tokens` it may generate. That bounds what a key can make the pool do in a
minute, whatever the requests turn out to use.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from gputorrent import keys
from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator.security import Caller
from gputorrent.errors import InvalidRequest, RateLimited
from gputorrent.protocol import EmbeddingRequest, InferenceRequest

CHARS_PER_TOKEN = 4  # a rough, model-independent estimate of prompt tokens
RATE_WINDOW_TTL_S = 120  # a minute's counters outlive the minute

# Count the request; if either limit is passed, take it back and refuse (0).
_COUNT = """
local requests = redis.call('HINCRBY', KEYS[1], 'requests', 1)
local tokens = redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
if (rpm > 0 and requests > rpm) or (tpm > 0 and tokens > tpm) then
  redis.call('HINCRBY', KEYS[1], 'requests', -1)
  redis.call('HINCRBY', KEYS[1], 'tokens', -tonumber(ARGV[1]))
  return 0
end
return 1
"""

# Drop streams older than the longest a stream may last (a coordinator that died left them), then
# take a slot if one is free.
_OPEN_STREAM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
return 1
"""


def check_size(request: InferenceRequest | EmbeddingRequest, settings: CoordinatorSettings) -> int:
    """The request's token estimate.

    Raises:
        InvalidRequest: the prompt (or input) or `max_tokens` is larger than this coordinator takes.
    """
    if isinstance(request, EmbeddingRequest):
        chars, field = sum(len(text) for text in request.input), "input"
        generated = 0
    else:
        if request.prompt is not None:
            chars, field = len(request.prompt), "prompt"
        else:
            chars, field = sum(len(m.content) for m in request.messages or []), "messages"
        generated = request.options.max_tokens
        if generated > settings.max_tokens:
            raise _too_large("options.max_tokens", f"at most {settings.max_tokens} tokens may be asked for")
    if chars > settings.max_prompt_chars:
        raise _too_large(field, f"at most {settings.max_prompt_chars} characters are taken; this has {chars}")
    return chars // CHARS_PER_TOKEN + generated


async def admit(redis: Redis, caller: Caller, tokens: int, settings: CoordinatorSettings) -> None:
    """Count one request of `tokens` against the caller's minute (admin keys are not limited).

    Raises:
        RateLimited: the key used up its requests or tokens for this minute.
    """
    if caller.admin or not (settings.rate_limit_rpm or settings.rate_limit_tpm):
        return
    now = time.time()
    minute = int(now // 60)
    counted = await redis.eval(
        _COUNT, 1, keys.rate_key(caller.key_id, minute),
        str(tokens), str(settings.rate_limit_rpm), str(settings.rate_limit_tpm), str(RATE_WINDOW_TTL_S),
    )  # fmt: skip
    if not counted:
        raise RateLimited(
            f"this key's limit of {settings.rate_limit_rpm} requests or {settings.rate_limit_tpm} tokens a minute "
            "is reached",
            retry_after_s=max(1, int(60 - now % 60)),
        )


async def open_stream(redis: Redis, caller: Caller, request_id: str, settings: CoordinatorSettings) -> None:
    """Take one of the caller's stream slots for `request_id`; `close_stream` gives it back.

    Raises:
        RateLimited: the key has `max_streams` streams open already.
    """
    if caller.admin or not settings.max_streams:
        return
    now = time.time()
    opened = await redis.eval(
        _OPEN_STREAM, 1, keys.open_streams_key(caller.key_id),
        str(now - settings.max_sync_wait_s - 60), str(settings.max_streams), repr(now), request_id,
    )  # fmt: skip
    if not opened:
        raise RateLimited(f"this key has {settings.max_streams} streams open already; close one", retry_after_s=1)


async def close_stream(redis: Redis, caller: Caller, request_id: str) -> None:
    await redis.zrem(keys.open_streams_key(caller.key_id), request_id)


def _too_large(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{field}: {message}", fields=[{"field": field, "message": message}], param=field)
