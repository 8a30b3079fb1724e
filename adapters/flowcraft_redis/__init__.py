"""Redis adapter for Flowcraft: a reliable list queue, run state in hashes, coordination in strings.

Installed as the top-level package ``flowcraft_redis``; needs the ``redis`` extra
(``pip install 'flowcraft[redis]'``). Lua scripts ship in ``lua/``. Key layout: `keys.py`.
"""
from typing import TYPE_CHECKING

from ._util import RedisUnavailable
from .adapter import RedisAdapter, create_redis_reconciler
from .context import RedisContext
from .coordination import RedisCoordinationStore
from .queue import RedisQueue
from .store import RedisRunStore

if TYPE_CHECKING:
    from .rq_adapter import RqAdapter

__all__ = ["RedisAdapter", "RedisContext", "RedisCoordinationStore", "RedisQueue", "RedisRunStore",
           "RedisUnavailable", "RqAdapter", "create_redis_reconciler"]


def __getattr__(name: str) -> object:
    # RqAdapter imports rq (tens of milliseconds): only its users pay for it, not every command.
    if name == "RqAdapter":
        from .rq_adapter import RqAdapter

        return RqAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
