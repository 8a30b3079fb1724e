"""Small shared helpers: script loading and the translation of Redis outages."""
from __future__ import annotations

import functools
import json
import os
from importlib import resources
from typing import Any, Callable, TypeVar

import redis
from flowcraft.errors import ServiceUnavailable
from flowcraft.result import LIVE_STATUSES

F = TypeVar("F", bound=Callable[..., Any])


class RedisUnavailable(ServiceUnavailable):
    """Redis could not be reached (or answered too late).

    A subclass of the built-in `ConnectionError`, which the core's worker treats as an
    infrastructure error (re-raised, never turned into a dead letter or a failed run)."""


def translate_errors(func: F) -> F:
    """Re-raise redis-py's connection and timeout errors as `RedisUnavailable`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnavailable(f"Redis unavailable: {type(exc).__name__}: {exc}") from exc

    return wrapper  # type: ignore[return-value]


# The core's run statuses, as the scripts name them (one set of constants for Python and Lua).
LUA_CONSTANTS = "local RUNNING, AWAITING = {}, {}".format(*(json.dumps(s) for s in LIVE_STATUSES))


def load_script(client: Any, *names: str) -> Any:
    """Register ``lua/<name>`` (package data) with the client, called with EVALSHA; several names
    make one script of their texts in that order (the first ones define functions the last uses),
    after `LUA_CONSTANTS`."""
    lua = resources.files(__package__).joinpath("lua")
    texts = [LUA_CONSTANTS] + [lua.joinpath(name).read_text(encoding="utf-8") for name in names]
    return client.register_script("\n".join(texts))


def to_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def connect(url_or_client: Any) -> Any:
    """A `redis.Redis` from a URL, or the client given."""
    if isinstance(url_or_client, str):
        return redis.Redis.from_url(url_or_client, socket_connect_timeout=5, health_check_interval=30)
    if url_or_client is None or not hasattr(url_or_client, "execute_command"):
        raise TypeError(f"expected a Redis URL or a redis.Redis client, not {type(url_or_client).__name__}")
    return url_or_client


def delayed_member(body: bytes) -> bytes:
    """A delayed job's ZSET member: 16 random hex digits, ":", the body (so equal bodies stay
    distinct); `lua/promote.lua` strips the first 17 bytes."""
    return os.urandom(8).hex().encode() + b":" + body
