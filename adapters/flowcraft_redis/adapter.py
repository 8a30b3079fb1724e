"""`RedisAdapter`: the core's `DistributedAdapter` over `RedisQueue`, `RedisRunStore` and
`RedisCoordinationStore`, and `create_redis_reconciler`."""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

from flowcraft.distributed import DistributedAdapter, Reconciler

from ._util import connect
from .coordination import RedisCoordinationStore
from .queue import RedisQueue
from .store import RedisRunStore


class RedisAdapter(DistributedAdapter):
    """A worker and client whose queue, run store and coordination store are one Redis.

    Options beyond the spec's: `prefix` (a key prefix, default ""), `worker_id`, `heartbeat_ttl`
    and `recover_interval` (dead-worker detection, seconds: see `RedisQueue`), `queues` (the
    queues this worker serves, in priority order; default: `queue_name`); the rest go to
    `DistributedAdapter` (`threads`, `fetch_batch`, `max_fetch`, `poll_timeout`, ...).
    """

    queue: RedisQueue
    store: RedisRunStore

    def __init__(self, runtime: Any, redis_url_or_client: Any, queue_name: str = "flowcraft-queue",
                 state_ttl_seconds: int = 86400, retry_mode: str = "in-process", *, prefix: str = "",
                 worker_id: Optional[str] = None, heartbeat_ttl: float = 30.0, recover_interval: float = 0.5,
                 queues: Optional[Sequence[str]] = None, **options: Any) -> None:
        client = connect(redis_url_or_client)
        clock = options.get("clock", time.time)
        queue = RedisQueue(client, queue_name, worker_id, prefix, heartbeat_ttl=heartbeat_ttl,
                           recover_interval=recover_interval, clock=clock, queues=queues)
        store = RedisRunStore(client, prefix, state_ttl_seconds, queue=queue, clock=clock)
        options.setdefault("max_fetch", 20)  # while jobs are fast: one fetch, load and commit round for up to 20
        # meanwhile each commit also takes this worker's next jobs (one round trip instead of two:
        # `RedisQueue.hold`); its threads share this client, queue and store (redis-py is thread-safe)
        super().__init__(runtime, queue, store, RedisCoordinationStore(client, prefix), retry_mode=retry_mode, **options)
        self.redis = client


def create_redis_reconciler(adapter: RedisAdapter, redis: Any = None, stalled_threshold_seconds: float = 300.0,
                            scan_count: int = 100) -> Reconciler:
    """A `Reconciler` (`.run() -> ReconcileStats`) that finds runs idle longer than
    `stalled_threshold_seconds` by SCANning the run records, `scan_count` keys per SCAN call.

    `redis` is accepted for the seed's signature; the scan goes through the adapter's own store
    (the core's `Reconciler` asks `adapter.store.idle_runs`), so it must be the same server."""
    if redis is not None and not isinstance(redis, str) and not hasattr(redis, "execute_command"):
        raise TypeError(f"redis must be a redis.Redis client or a URL, not {type(redis).__name__}")
    if int(scan_count) <= 0:
        raise ValueError(f"scan_count must be > 0, not {scan_count!r}")
    adapter.store.scan_count = int(scan_count)
    return Reconciler(adapter, stalled_threshold_seconds)
