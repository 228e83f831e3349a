"""FastAPI dependencies: what routes get from the app's state.

Async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per
request and dependency on the hot path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import Field, TypeAdapter, ValidationError

from gputorrent.config import CoordinatorSettings
from gputorrent.coordinator import dispatch, relay
from gputorrent.coordinator.results import ResultWaiter
from gputorrent.coordinator.security import Caller, require_client
from gputorrent.protocol import (
    PRIORITY_MAX,
    PRIORITY_MIN,
    SESSION_ID_PATTERN,
    Accepted,
    EmbeddingRequest,
    InferenceRequest,
    JobResult,
)
from gputorrent.redis_client import RedisClient


async def _redis(request: Request) -> RedisClient:
    return request.app.state.redis  # type: ignore[no-any-return]


async def _settings(request: Request) -> CoordinatorSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def _waiter(request: Request) -> ResultWaiter:
    return request.app.state.waiter  # type: ignore[no-any-return]


RedisDep = Annotated[RedisClient, Depends(_redis)]
SettingsDep = Annotated[CoordinatorSettings, Depends(_settings)]
WaiterDep = Annotated[ResultWaiter, Depends(_waiter)]


@dataclass(frozen=True)
class OptionalHeader:
    """A request header a submitting route reads itself, checked as FastAPI checks a declared one
    (the same 422, naming the header) and described in the schema from the same rule."""

    name: str
    rule: TypeAdapter[Any]
    description: str

    def read(self, request: Request) -> Any:
        value = request.headers.get(self.name)
        if value is None:
            return None
        try:
            return self.rule.validate_python(value)
        except ValidationError as e:
            raise RequestValidationError(
                [{**error, "loc": ("header", self.name)} for error in e.errors(include_url=False)]
            ) from None

    def parameter(self) -> dict[str, Any]:
        """Its OpenAPI parameter object."""
        schema = {"anyOf": [self.rule.json_schema(), {"type": "null"}], "description": self.description}
        return {"name": self.name, "in": "header", "required": False, "schema": schema, "description": self.description}


PRIORITY_HEADER = OptionalHeader(
    "x-gputorrent-priority",
    TypeAdapter(Annotated[int, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX)]),
    "0 to 9: a queued job of higher priority is taken first (default 5)",
)
SESSION_HEADER = OptionalHeader(
    "x-gputorrent-session-id",
    TypeAdapter(Annotated[str, Field(pattern=SESSION_ID_PATTERN)]),
    "requests with one session id go to one worker while it is not overloaded (its prompt cache)",
)
IDEMPOTENCY_HEADER = OptionalHeader(
    "Idempotency-Key",
    TypeAdapter(Annotated[str, Field(min_length=1, max_length=256)]),
    "the same key again (within the result TTL) returns the first request's job, never a second one",
)


def headers_schema(*headers: OptionalHeader) -> dict[str, Any]:
    """A route's `openapi_extra` documenting the headers it reads through `Submission`."""
    return {"parameters": [header.parameter() for header in headers]}


@dataclass(frozen=True)
class Submission:
    """What a route that submits a job works with besides its body, as one dependency.

    FastAPI solves each dependency and header parameter of a route on every request, tens of
    microseconds apiece, and the submitting routes are the hottest: so they take this alone and read
    their optional headers through it (`placed`, `idempotency_key`), documenting them with
    `headers_schema`.
    """

    request: Request
    caller: Caller

    @property
    def redis(self) -> RedisClient:
        return self.request.app.state.redis  # type: ignore[no-any-return]

    @property
    def settings(self) -> CoordinatorSettings:
        return self.request.app.state.settings  # type: ignore[no-any-return]

    @property
    def waiter(self) -> ResultWaiter:
        return self.request.app.state.waiter  # type: ignore[no-any-return]

    def placed(self, job_request: InferenceRequest | EmbeddingRequest) -> InferenceRequest | EmbeddingRequest:
        """`job_request` at the priority and in the session its headers ask for: the OpenAI, Ollama
        and Anthropic bodies have no place for them (the native API has them as body fields)."""
        update: dict[str, object] = {}
        if (priority := PRIORITY_HEADER.read(self.request)) is not None:
            update["priority"] = priority
        if isinstance(job_request, InferenceRequest) and (session_id := SESSION_HEADER.read(self.request)) is not None:
            update["session_id"] = session_id
        return job_request.model_copy(update=update) if update else job_request

    def idempotency_key(self) -> str | None:
        return IDEMPOTENCY_HEADER.read(self.request)  # type: ignore[no-any-return]

    async def admit(self, job_request: InferenceRequest | EmbeddingRequest) -> Accepted:
        """Admit the job at its headers' placement, under its `Idempotency-Key` (see `dispatch.admit`)."""
        return await dispatch.admit(
            self.redis, self.placed(job_request), self.settings, self.caller, self.idempotency_key()
        )

    async def succeeded(self, accepted: Accepted) -> JobResult:
        """The job's result once done, for an API with no place for a failed one (see `relay.succeeded`)."""
        return await relay.succeeded(self.waiter, accepted, self.settings.max_sync_wait_s)

    def follow(self, accepted: Accepted) -> AsyncIterator[relay.Relayed]:
        """The job's text as it comes, then its result, for this request's stream (see `relay.follow`)."""
        settings = self.settings
        return relay.follow(
            self.redis, accepted.request_id, settings.max_sync_wait_s, settings.result_ttl_s,
            self.request.is_disconnected, owner=self.caller,
        )  # fmt: skip


async def _submission(request: Request) -> Submission:
    return Submission(request, await require_client(request))


SubmissionDep = Annotated[Submission, Depends(_submission)]
ADMIT_HEADERS = (PRIORITY_HEADER, SESSION_HEADER, IDEMPOTENCY_HEADER)  # those `Submission.admit` reads
ADMIT_HEADERS_SCHEMA = headers_schema(*ADMIT_HEADERS)  # for a route that admits through `Submission.admit`
