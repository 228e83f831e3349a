"""FastAPI dependencies: what routes get from the app's state.

Async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per
request and dependency on the hot path.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
from redis.asyncio import Redis

from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator.results import ResultWaiter


async def _redis(request: Request) -> Redis:
    return request.app.state.redis  # type: ignore[no-any-return]


async def _settings(request: Request) -> CoordinatorSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def _waiter(request: Request) -> ResultWaiter:
    return request.app.state.waiter  # type: ignore[no-any-return]


RedisDep = Annotated[Redis, Depends(_redis)]
SettingsDep = Annotated[CoordinatorSettings, Depends(_settings)]
WaiterDep = Annotated[ResultWaiter, Depends(_waiter)]
IdempotencyKeyDep = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=256,
        description="the same key again (within the result TTL) returns the first request's job, never a second one",
    ),
]
