"""FastAPI dependencies: what routes get from the app's state.

Async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per
request and dependency on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request
from redis.asyncio import Redis

from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator.results import ResultWaiter
from gputorrent.protocol import PRIORITY_MAX, PRIORITY_MIN, SESSION_ID_PATTERN, EmbeddingRequest, InferenceRequest


async def _redis(request: Request) -> Redis:
    return request.app.state.redis  # type: ignore[no-any-return]


async def _settings(request: Request) -> CoordinatorSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def _waiter(request: Request) -> ResultWaiter:
    return request.app.state.waiter  # type: ignore[no-any-return]


PlacedRequest = TypeVar("PlacedRequest", InferenceRequest, EmbeddingRequest)


@dataclass(frozen=True)
class Placement:
    """Where a request of a compatible API (OpenAI, Ollama, Anthropic) waits and runs: their bodies
    have no place for a priority or a session, so these come as headers (the native API has them
    as body fields)."""

    priority: int | None = None
    session_id: str | None = None

    def apply(self, request: PlacedRequest) -> PlacedRequest:
        update: dict[str, object] = {} if self.priority is None else {"priority": self.priority}
        if self.session_id is not None and isinstance(request, InferenceRequest):
            update["session_id"] = self.session_id
        return request.model_copy(update=update) if update else request


async def _placement(
    priority: Annotated[
        int | None,
        Header(
            alias="x-gputorrent-priority", ge=PRIORITY_MIN, le=PRIORITY_MAX,
            description="0 to 9: a queued job of higher priority is taken first (default 5)",
        ),
    ] = None,
    session_id: Annotated[
        str | None,
        Header(
            alias="x-gputorrent-session-id", pattern=SESSION_ID_PATTERN,
            description="requests with one session id go to one worker while it is not overloaded (its prompt cache)",
        ),
    ] = None,
) -> Placement:  # fmt: skip
    return Placement(priority, session_id)


RedisDep = Annotated[Redis, Depends(_redis)]
PlacementDep = Annotated[Placement, Depends(_placement)]
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
