"""Redis adapter for Flowcraft: a reliable list queue, run state in hashes, coordination in strings.

Installed as the top-level package ``flowcraft_redis``; needs the ``redis`` extra
(``pip install 'flowcraft[redis]'``). Lua scripts ship in ``lua/``. Key layout: `keys.py`.
"""
from ._util import RedisUnavailable
from .adapter import RedisAdapter, create_redis_reconciler
from .context import RedisContext
from .coordination import RedisCoordinationStore
from .queue import RedisQueue
from .rq_adapter import RqAdapter
from .store import RedisRunStore

__all__ = ["RedisAdapter", "RedisContext", "RedisCoordinationStore", "RedisQueue", "RedisRunStore",
           "RedisUnavailable", "RqAdapter", "create_redis_reconciler"]
