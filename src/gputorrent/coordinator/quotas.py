"""Per-key limits checked at admission: requests and tokens per minute, streams open at once, and
the size of what one request may ask for. Counters live in Redis, so every coordinator shares them.

Tokens are counted when a request is admitted, before it runs: the prompt at about four characters
a token plus the `max_tokens` it may generate. That bounds what a key can make the pool do in a
minute, whatever the requests turn out to use.
"""

from __future__ import annotations

import time

from gputorrent import keys, queue
from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator.security import Caller
from gputorrent.errors import InvalidRequest, RateLimited
from gputorrent.protocol import EmbeddingRequest, InferenceRequest
from gputorrent.redis_client import RedisClient

CHARS_PER_TOKEN = 4  # a rough, model-independent estimate of prompt tokens
RATE_WINDOW_TTL_S = 120  # a minute's counters outlive the minute


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


def limits(caller: Caller, tokens: int, settings: CoordinatorSettings) -> queue.Limits:
    """The caller's per-key limits for a request of `tokens` (admin keys have none)."""
    if caller.admin:
        return queue.Limits()
    now = time.time()
    return queue.Limits(
        rate_key=keys.rate_key(caller.key_id, int(now // 60)), tokens=tokens, rpm=settings.rate_limit_rpm,
        tpm=settings.rate_limit_tpm, rate_ttl_s=RATE_WINDOW_TTL_S,
        streams_key=keys.open_streams_key(caller.key_id), max_streams=settings.max_streams,
        stale_before=now - settings.max_sync_wait_s - 60,
    )  # fmt: skip


def refused(limit: queue.Refusal, settings: CoordinatorSettings) -> RateLimited:
    """The 429 for a per-key limit (`rate` or `streams`) that turned a request away."""
    if limit == "streams":
        return RateLimited(f"this key has {settings.max_streams} streams open already; close one", retry_after_s=1)
    return RateLimited(
        f"this key's limit of {settings.rate_limit_rpm} requests or {settings.rate_limit_tpm} tokens a minute "
        "is reached",
        retry_after_s=max(1, int(60 - time.time() % 60)),
    )


async def admit_follower(redis: RedisClient, caller: Caller, slot: str, settings: CoordinatorSettings) -> None:
    """Count a stream's follower as a request and give it one of the caller's stream slots (`slot`;
    `close_stream` gives it back).

    Raises:
        RateLimited: the key used up its requests for this minute, or has all its streams open.
    """
    if caller.admin:
        return
    try:  # a free stream slot, a request counted, the slot taken: as the admission of a streamed job
        await limits(caller, 0, settings).count(redis, slot=slot, streamed=True)
    except queue.Refused as e:
        raise refused(e.limit, settings) from None


async def close_stream(redis: RedisClient, caller: Caller, request_id: str) -> None:
    await redis.zrem(keys.open_streams_key(caller.key_id), request_id)


def _too_large(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{field}: {message}", fields=[{"field": field, "message": message}], param=field)
