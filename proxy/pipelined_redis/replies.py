"""Scripts as the commands that run them, and error replies as redis-py's exceptions.

A reply comes back from the connection as hiredis parsed it: ints as `int`, bulk and
status strings as `bytes` (as redis-py answers without `decode_responses`, the shapes
`proxy.limiter.redis` reads today), arrays as lists, nil as None, and an error reply as a
`hiredis.ReplyError` value, not raised, so the clients can act on NOSCRIPT, MOVED and ASK
before anything is raised. `raise_for` turns what is left into the redis-py exception
redis-py itself would raise, so callers keep one `except RedisError` boundary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterCrossSlotError,
    ClusterDownError,
    DataError,
    MasterDownError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

Arg = str | bytes | int | float

# hiredis's packer is C and quicker than joining RESP by hand; its stub types the
# argument as a 1-tuple, so it is named here with the type it really takes.
_pack = cast("Callable[[tuple[Arg, ...]], bytes]", hiredis.pack_command)

# The error code (first word) to the class redis-py raises for it (redis/_parsers/base.py).
_ERRORS: dict[str, type[RedisError]] = {
    "NOSCRIPT": NoScriptError,
    "NOAUTH": AuthenticationError,
    "WRONGPASS": AuthenticationError,
    "NOPERM": NoPermissionError,
    "LOADING": BusyLoadingError,
    "READONLY": ReadOnlyError,
    "OOM": OutOfMemoryError,
    "CLUSTERDOWN": ClusterDownError,
    "MASTERDOWN": MasterDownError,
    "TRYAGAIN": TryAgainError,
    "CROSSSLOT": ClusterCrossSlotError,
}


def pack(*args: Arg) -> bytes:
    """One command in RESP; an argument of another type is redis-py's `DataError`."""
    try:
        return _pack(args)
    except TypeError as exc:
        raise DataError(f"a command argument must be str, bytes, int or float: {exc}") from exc


PING = pack("PING")
ASKING = pack("ASKING")
CLUSTER_SLOTS = pack("CLUSTER", "SLOTS")


class Script:
    """A Lua script: its source and SHA1, and the commands that run it."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        if not source.strip():
            raise ValueError("a script needs a source")
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def evalsha(self, keys: Sequence[Arg], args: Sequence[Arg]) -> bytes:
        return pack("EVALSHA", self.sha, len(keys), *keys, *args)

    def eval(self, keys: Sequence[Arg], args: Sequence[Arg]) -> bytes:
        """Runs the script and leaves it in the server's script cache for EVALSHA."""
        return pack("EVAL", self.source, len(keys), *keys, *args)

    def __repr__(self) -> str:
        return f"Script(sha={self.sha})"


def is_error(reply: object, code: str) -> bool:
    """Whether `reply` is an error reply whose first word is `code` (NOSCRIPT, MOVED...)."""
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith(code + " ")


def raise_for(reply: Any) -> Any:
    """`reply` itself, unless it is an error reply: then the redis-py exception for it."""
    if isinstance(reply, hiredis.ReplyError):
        raise error_for(reply)
    return reply


def error_for(reply: hiredis.ReplyError) -> RedisError:
    message = str(reply)
    code = message.split(" ", 1)[0]
    if code == "ERR" and "invalid password" in message:  # servers before Redis 6
        return AuthenticationError(message)
    return _ERRORS.get(code, ResponseError)(message)
