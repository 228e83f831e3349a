"""Who is calling: the API key behind a request, and what its scope lets it do.

Every inference, result and model route takes a `Caller`: a live key of scope `client` or
`admin`, sent as `Authorization: Bearer <key>` (or `x-api-key`, as Anthropic's clients send
it). `/register` takes a `join` (or `admin`) key, the `/admin` routes an `admin` key. With
authentication off (`GPUTORRENT_AUTH=off`, allowed on loopback only) every caller is anonymous
and may do everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from gputorrent import auth, keys
from gputorrent.errors import Forbidden, Unauthorized
from gputorrent.redis_client import RedisClient

ANONYMOUS = "anonymous"  # the owner of every request when authentication is off


@dataclass(frozen=True)
class Caller:
    key_id: str  # `ANONYMOUS` when authentication is off
    scope: auth.Scope

    @property
    def admin(self) -> bool:
        return self.scope == "admin"


async def _authenticate(request: Request) -> Caller:
    if not request.app.state.settings.auth:
        return Caller(key_id=ANONYMOUS, scope="admin")
    # Read from the headers here rather than as FastAPI header parameters: those cost tens of
    # microseconds each on every request, and these two are not in the schema anyway.
    authorization = request.headers.get("authorization")
    presented = request.headers.get("x-api-key")
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        presented = value.strip() if scheme.lower() == "bearer" else None
    if not presented:
        raise Unauthorized("an API key is required: send `Authorization: Bearer <key>` (see `gputorrent keys`)")
    info = await auth.verify(request.app.state.redis, presented, request.app.state.key_cache)
    if info is None:
        raise Unauthorized("the API key is not valid (unknown, revoked or malformed)")
    return Caller(key_id=info.key_id, scope=info.scope)


async def require_client(request: Request) -> Caller:
    """The caller, who must hold a key that may make requests (`client` or `admin`): one dependency
    rather than a chain on `_authenticate`, since FastAPI solves each on every request."""
    caller = await _authenticate(request)
    if caller.scope not in ("client", "admin"):
        raise Forbidden(f"a {caller.scope} key cannot make requests; use a client key")
    return caller


async def _joiner(caller: Annotated[Caller, Depends(_authenticate)]) -> Caller:
    if caller.scope not in ("join", "admin"):
        raise Forbidden("registering a worker needs a join key (`gputorrent keys create --scope join`)")
    return caller


async def _admin(caller: Annotated[Caller, Depends(_authenticate)]) -> Caller:
    if not caller.admin:
        raise Forbidden("this needs an admin key")
    return caller


ClientDep = Annotated[Caller, Depends(require_client)]
JoinDep = Annotated[Caller, Depends(_joiner)]
AdminDep = Annotated[Caller, Depends(_admin)]


async def owns(redis: RedisClient, caller: Caller, request_id: str) -> bool:
    """Whether `caller` may see the request: it submitted it, or it is an admin."""
    if caller.admin:
        return True
    return await redis.get(keys.owner_key(request_id)) == caller.key_id
