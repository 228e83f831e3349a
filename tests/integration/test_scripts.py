"""Scripts read their keys and arguments by name, run by their SHA1, and load themselves again on a
server that lost them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from gputorrent.scripts import NoArgs, Script


@dataclass(frozen=True)
class _AddKeys:
    counter: str


@dataclass(frozen=True)
class _AddArgs:
    by: int


async def test_a_script_runs_again_after_the_server_forgot_it(redis: Redis) -> None:
    add = Script(_AddKeys, _AddArgs, "return redis.call('INCRBY', counter, by)")
    assert await add.run(redis, _AddKeys("counter"), _AddArgs(2)) == 2
    assert await redis.script_exists(add.sha) == [True]  # loaded: later calls send only the SHA1
    await redis.script_flush()  # as after a restart
    assert await add.run(redis, _AddKeys("counter"), _AddArgs(3)) == 5


@dataclass(frozen=True)
class _MixedKeys:
    first: str
    bands: tuple[str, ...]
    last: str
    more: tuple[str, ...]


@dataclass(frozen=True)
class _MixedArgs:
    text: str
    count: int
    ratio: float
    flag: bool
    maybe: float | None
    ids: tuple[str, ...]
    after: str


async def test_every_kind_of_field_reaches_lua_by_its_name_and_type(redis: Redis) -> None:
    """Runs of keys and arguments of any length (none included) leave every later field in its place."""
    echo = Script(
        _MixedKeys,
        _MixedArgs,
        """
return cjson.encode({first = first, bands = bands, last = last, more = more, text = text, count = count + 1,
  ratio = ratio * 2, flag = flag, maybe = maybe == nil and 'nil' or maybe, ids = ids, after = after})
""",
    )
    answer = await echo.run(
        redis,
        _MixedKeys(first="k1", bands=("b9", "b8", "b7"), last="k2", more=()),
        _MixedArgs(text="a b", count=41, ratio=0.25, flag=True, maybe=None, ids=("r1", "r2"), after="z"),
    )
    got = json.loads(answer)
    assert got["first"] == "k1" and got["bands"] == ["b9", "b8", "b7"] and got["last"] == "k2"
    assert got["more"] == {}  # cjson's empty table
    assert got["text"] == "a b" and got["count"] == 42 and got["ratio"] == 0.5 and got["flag"] is True
    assert got["maybe"] == "nil" and got["ids"] == ["r1", "r2"] and got["after"] == "z"


def test_a_script_that_reads_keys_or_arguments_by_position_is_refused() -> None:
    with pytest.raises(ValueError, match="by name"):
        Script(_AddKeys, _AddArgs, "return redis.call('GET', KEYS[1])")


def test_a_field_of_a_type_lua_cannot_be_given_is_refused() -> None:
    @dataclass(frozen=True)
    class BadArgs:
        items: list[str]

    with pytest.raises(TypeError, match=r"BadArgs\.items"):
        Script(_AddKeys, BadArgs, "return 1")


def test_a_field_named_as_a_lua_word_is_refused() -> None:
    @dataclass(frozen=True)
    class BadKeys:
        local: str

    with pytest.raises(TypeError, match=r"BadKeys\.local"):
        Script(BadKeys, NoArgs, "return 1")
