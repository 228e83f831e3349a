"""What the API-family adapters share: tolerant wire models and one way to report a bad field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from gputorrent.errors import InvalidRequest

Model = TypeVar("Model", bound=BaseModel)


class Tolerant(BaseModel):
    """A request model of another API: fields we do not use are accepted and ignored."""

    model_config = ConfigDict(extra="allow")


def dotted(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a dotted field name.

    >>> dotted(("messages", 0, "content"))
    'messages.0.content'
    """
    return ".".join(str(part) for part in loc)


def validated(model: type[Model], data: dict[str, Any], name: Callable[[tuple[Any, ...]], str] = dotted) -> Model:
    """`model` built from `data`, or `InvalidRequest` naming the first bad field as the client knows it."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = name(tuple(first["loc"]))
        raise InvalidRequest(f"{field}: {first['msg']}", param=field) from None
