"""API keys and worker secrets: random secrets handed out once, kept in Redis only as hashes.

A key reads `gt_<key_id>_<secret>`. Its `scope` says what it may do: `client` (submit requests,
read its own results, list models and workers), `admin` (everything, including managing keys and
workers), `join` (register workers). Secrets are 256 random bits, so one SHA-256 is enough to
store them safely (a slow hash protects guessable passwords, not random keys).

>>> parse_key("gt_0123456789ab_c2VjcmV0IG9mIDIwIG9yIG1vcmU")
('0123456789ab', 'c2VjcmV0IG9mIDIwIG9yIG1vcmU')
>>> parse_key("Bearer nonsense") is None
True
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Literal, cast

from gputorrent import keys
from gputorrent.protocol import ApiKeyInfo
from gputorrent.redis_client import RedisClient

Scope = Literal["client", "admin", "join"]
SCOPES: tuple[Scope, ...] = ("client", "admin", "join")
_KEY_FORMAT = re.compile(r"^gt_([0-9a-f]{12})_([A-Za-z0-9_-]{20,128})$")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(presented: str) -> tuple[str, str] | None:
    """`(key_id, secret)` of a well-formed key, else None."""
    match = _KEY_FORMAT.match(presented)
    return (match.group(1), match.group(2)) if match else None


def new_key() -> tuple[str, str]:
    """A fresh `(key_id, full_key)`."""
    key_id = secrets.token_hex(6)
    return key_id, f"gt_{key_id}_{secrets.token_urlsafe(32)}"


async def store_key(redis: RedisClient, full_key: str, name: str, scope: Scope) -> ApiKeyInfo:
    """Store the hash of `full_key` (made by `new_key`, or one saved earlier and brought back)."""
    parsed = parse_key(full_key)
    if parsed is None:
        raise ValueError("not a GPU Torrent key (gt_<id>_<secret>)")
    key_id, secret = parsed
    info = ApiKeyInfo(key_id=key_id, name=name, scope=scope, created_at=time.time())
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(
            keys.api_key_key(key_id),
            mapping={"hash": hash_secret(secret), "name": name, "scope": scope, "created_at": repr(info.created_at)},
        )
        pipe.sadd(keys.api_keys(), key_id)
        await pipe.execute()
    return info


async def create_key(redis: RedisClient, name: str, scope: Scope) -> tuple[ApiKeyInfo, str]:
    """A new key: its record, and the full key, which is shown once and never stored."""
    _, full_key = new_key()
    return await store_key(redis, full_key, name, scope), full_key


async def list_keys(redis: RedisClient) -> list[ApiKeyInfo]:
    """Every key (never its secret or hash), oldest first."""
    key_ids = sorted(str(k) for k in await redis.smembers(keys.api_keys()))
    async with redis.pipeline(transaction=False) as pipe:
        for key_id in key_ids:
            pipe.hgetall(keys.api_key_key(key_id))
        records = await pipe.execute()
    found = [_info(key_id, record) for key_id, record in zip(key_ids, records, strict=True) if record]
    return sorted(found, key=lambda info: info.created_at)


async def revoke_key(redis: RedisClient, key_id: str) -> bool:
    """Delete the key; False when there was none. It stops working at once on every coordinator
    (each drops it from its key cache on the announcement)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.api_key_key(key_id))
        pipe.srem(keys.api_keys(), key_id)
        deleted, _ = await pipe.execute()
    # After the transaction, not in it: a Redis Cluster takes only one slot's keys in one (a channel has none).
    await redis.publish(keys.KEYS_REVOKED_CHANNEL, key_id)
    return bool(deleted)


async def verify(redis: RedisClient, presented: str, cache: KeyCache | None = None) -> ApiKeyInfo | None:
    """The key's record if `presented` is a live key, else None (unknown, revoked or malformed).

    With a `cache`, a key verified there lately is not read from Redis again (see `KeyCache`).
    """
    parsed = parse_key(presented)
    if parsed is None:
        return None
    key_id, secret = parsed
    hashed = hash_secret(secret)
    if cache is not None and (cached := cache.get(key_id, hashed)) is not None:
        return cached
    generation = cache.generation if cache is not None else 0
    record = {str(k): str(v) for k, v in (await redis.hgetall(keys.api_key_key(key_id))).items()}
    if not record or not hmac.compare_digest(record["hash"], hashed):
        return None
    info = _info(key_id, record)
    if cache is not None:
        cache.put(info, hashed, generation)
    return info


class KeyCache:
    """Keys verified lately, so a busy client's requests skip reading its key from Redis.

    Held only while the coordinator hears `keys:revoked` (its `Listener` calls `subscribed` and
    `lost`): a revoked key is dropped on the announcement, and everything is dropped whenever
    announcements may have been missed. A record read from Redis is kept only if no revocation
    was heard while it was being read (`generation`): the read and the announcement come on
    different connections, in either order. `MAX_AGE_S` bounds an entry's life even so.
    """

    MAX_AGE_S = 10.0
    MAX_KEYS = 10_000

    def __init__(self) -> None:
        self._entries: dict[str, tuple[ApiKeyInfo, str, float]] = {}  # key id -> (record, hash, verified at)
        self._live = False
        self.generation = 0  # counts revocations and losses heard

    def get(self, key_id: str, hashed: str) -> ApiKeyInfo | None:
        entry = self._entries.get(key_id)
        if entry is None:
            return None
        info, stored_hash, verified_at = entry
        if time.monotonic() - verified_at > self.MAX_AGE_S or not hmac.compare_digest(stored_hash, hashed):
            del self._entries[key_id]
            return None
        return info

    def put(self, info: ApiKeyInfo, hashed: str, generation: int) -> None:
        """Keep a record read from Redis while the cache stood at `generation`."""
        if not self._live or generation != self.generation:
            return
        if len(self._entries) >= self.MAX_KEYS:
            self._entries.clear()  # a flood of distinct keys: start over rather than track ages
        self._entries[info.key_id] = (info, hashed, time.monotonic())

    def revoked(self, key_id: str) -> None:
        self.generation += 1
        self._entries.pop(key_id, None)

    def subscribed(self) -> None:
        self._live = True

    def lost(self) -> None:
        self.generation += 1
        self._live = False
        self._entries.clear()


def _info(key_id: str, record: dict[str, str]) -> ApiKeyInfo:
    return ApiKeyInfo(
        key_id=key_id,
        name=str(record.get("name", "")),
        scope=cast(Scope, record.get("scope", "client")),
        created_at=float(record.get("created_at", 0)),
    )


def new_worker_secret() -> str:
    return secrets.token_urlsafe(32)
