"""Lua scripts with named keys and arguments, run by their SHA1.

Every state change of a job is one script, so it is atomic. Each script declares what it touches as
two dataclasses: its keys (each a `str`, or a `tuple[str, ...]` for a run of keys such as a queue's
priority bands) and its arguments (`str`, `int`, `float`, `bool`, an `int` or `float` or None, or a
`tuple[str, ...]`). The script's body sees each field as a Lua local of the same name, already
converted (a number with `tonumber`, a flag as a boolean, a missing number as nil), so no call is
built or read by position. A run of keys becomes a Lua table (`for _, key in ipairs(bands)`,
`unpack(bands)`), and so does a run of arguments. A value that is only stored is best sent as text:
Redis writes a Lua number it is given back as text in its own format.

Scripts run by SHA1 (`EVALSHA`): every job's path runs several, and sending each one's source
(kilobytes) with every call cost more than the call itself, on both sides of the connection.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class CountKeys:
...     counter: str
...     bands: tuple[str, ...]
>>> @dataclass(frozen=True)
... class CountArgs:
...     by: int
...     deadline: float | None
>>> script = Script(CountKeys, CountArgs, "return redis.call('INCRBY', counter, by)")
>>> script.call(CountKeys("c", ("b9", "b8")), CountArgs(by=2, deadline=None))
(3, ('c', 'b9', 'b8', '2', '2', ''))
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import types
import typing
from typing import Any, Generic, TypeVar

from redis.exceptions import NoScriptError

from gputorrent.keys import check_one_cell
from gputorrent.pipelined import pipelined
from gputorrent.redis_client import RedisClient

KeysT = TypeVar("KeysT")
ArgsT = TypeVar("ArgsT")


@dataclasses.dataclass(frozen=True)
class NoKeys:
    """The keys of a script that declares none."""


@dataclasses.dataclass(frozen=True)
class NoArgs:
    """The arguments of a script that takes none."""


_LUA_WORDS = frozenset((
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "if", "in", "local", "nil", "not",
    "or", "repeat", "return", "then", "true", "until", "while",  # Lua's reserved words
    "redis", "cjson", "struct", "cmsgpack", "bit", "table", "string", "math", "tonumber", "tostring", "unpack",
    "ipairs", "pairs", "type", "KEYS", "ARGV",  # what a script's body may call or read
))  # fmt: skip
# What an argument's annotation becomes in Lua: the text of ARGV, a number, or a flag.
_ARG_KINDS: dict[Any, str] = {str: "text", int: "number", float: "number", bool: "flag"}


def _fields(cls: type, what: str) -> list[tuple[str, str]]:
    """(name, kind) for each field of a keys or arguments dataclass, in order."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__}: the {what} of a script are a dataclass")
    hints = typing.get_type_hints(cls)
    found = []
    for field in dataclasses.fields(cls):
        name, hint = field.name, hints[field.name]
        if name in _LUA_WORDS or name.startswith("_"):
            raise TypeError(f"{cls.__name__}.{name}: not a name a Lua local can have")
        if what == "keys":
            kind = "one" if hint is str else "many" if hint == tuple[str, ...] else ""
        elif hint == tuple[str, ...]:
            kind = "many"
        else:
            options = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
            optional = type(None) in options
            kinds = {_ARG_KINDS.get(option, "") for option in options - {type(None)}}
            kind = kinds.pop() if len(kinds) == 1 and "" not in kinds else ""
            if optional and kind != "number":  # only a number has a "missing" that Lua tells apart (nil)
                kind = ""
        if not kind:
            raise TypeError(f"{cls.__name__}.{name}: a script's {what} cannot be {hint}")
        found.append((name, kind))
    return found


def _prelude(key_fields: list[tuple[str, str]], arg_fields: list[tuple[str, str]]) -> str:
    """Lua that binds each field to a local of its name. A run of keys is sent with its length first
    among the ARGV, so the positions after it are known only when the script runs."""
    lines = ["local _k, _a = 1, 1"]
    for name, kind in key_fields:
        if kind == "one":
            lines.append(f"local {name} = KEYS[_k]; _k = _k + 1")
        else:
            lines.append(f"local {name} = {{unpack(KEYS, _k, _k + tonumber(ARGV[_a]) - 1)}}")
            lines.append("_k = _k + tonumber(ARGV[_a]); _a = _a + 1")
    for name, kind in arg_fields:
        if kind == "many":  # its length, then its items
            lines.append(f"local {name} = {{unpack(ARGV, _a + 1, _a + tonumber(ARGV[_a]))}}")
            lines.append("_a = _a + 1 + tonumber(ARGV[_a])")
            continue
        read = {"text": "ARGV[_a]", "number": "tonumber(ARGV[_a])", "flag": "ARGV[_a] == '1'"}[kind]
        lines.append(f"local {name} = {read}; _a = _a + 1")
    return "\n".join(lines) + "\n"


def _encode(value: Any) -> str:
    if value is None:
        return ""
    if value is True or value is False:
        return "1" if value else "0"
    return repr(value) if isinstance(value, float) else str(value)


class Script(Generic[KeysT, ArgsT]):
    """A Lua script over the keys of a `KeysT` and the arguments of an `ArgsT`: `await script.run(redis,
    keys, args)` runs it by its SHA1, loading it with `EVAL` the first time a server has not seen it
    (a new or restarted Redis). `call` gives the key count and the flat list `EVALSHA` takes, for
    callers that send it with other commands (`pipelined`, `replication.run`)."""

    def __init__(self, keys: type[KeysT], args: type[ArgsT], body: str) -> None:
        if re.search(r"\b(KEYS|ARGV)\s*\[", body):
            raise ValueError("a script reads its keys and arguments by name, not by position")
        self._keys = [name for name, _ in _fields(keys, "keys")]
        self._runs = [name for name, kind in _fields(keys, "keys") if kind == "many"]
        self._args = [name for name, _ in _fields(args, "arguments")]
        if clash := set(self._keys) & set(self._args):
            raise TypeError(f"{sorted(clash)}: named both as a key and as an argument")
        self.source = _prelude(_fields(keys, "keys"), _fields(args, "arguments")) + body
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def call(self, keys: KeysT, args: ArgsT) -> tuple[int, tuple[str, ...]]:
        """The key count and the keys and arguments of `EVALSHA`, in the order the prelude reads them."""
        flat_keys: list[str] = []
        for name in self._keys:
            value = getattr(keys, name)
            flat_keys.extend(value) if isinstance(value, tuple) else flat_keys.append(value)
        check_one_cell(flat_keys)
        run_lengths = [str(len(getattr(keys, name))) for name in self._runs]
        flat_args: list[str] = []
        for name in self._args:
            value = getattr(args, name)
            if isinstance(value, tuple):
                flat_args.append(str(len(value)))
                flat_args.extend(value)
            else:
                flat_args.append(_encode(value))
        return len(flat_keys), (*flat_keys, *run_lengths, *flat_args)

    async def run(self, redis: RedisClient, keys: KeysT, args: ArgsT) -> Any:
        return await self.run_flat(redis, *self.call(keys, args))

    async def run_flat(self, redis: RedisClient, numkeys: int, keys_and_args: tuple[str | bytes, ...]) -> Any:
        """Run it with what `call` gave (kept by a caller that sends the same call again and again)."""
        # The hot path's connection (pipelined.py), to the node serving the keys' slot on a cluster.
        connection = pipelined(redis, keys_and_args[0] if numkeys else None)
        try:
            return await connection.execute("EVALSHA", self.sha, numkeys, *keys_and_args)
        except NoScriptError:
            return await connection.execute("EVAL", self.source, numkeys, *keys_and_args)
