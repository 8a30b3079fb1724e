"""`RabbitMqAdapter`: `flowcraft.distributed.DistributedAdapter` over RabbitMQ (jobs), PostgreSQL
(contexts, statuses, run records, outbox), and optionally a coordination store (Redis) for the code
that uses one: the engine itself needs none. All orchestration is the core's; this module only
wires the ports."""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from flowcraft.distributed import DistributedAdapter, Reconciler

from .queue import DEFAULT_PREFETCH, RabbitMqQueue
from .schema import DEFAULT_CONTEXT_TABLE, DEFAULT_STATUS_TABLE, validate_identifier
from .context import PostgresContext
from .store import PostgresRunStore

logger = logging.getLogger("flowcraft.rabbitmq.adapter")


class RabbitMqAdapter(DistributedAdapter):
    """A worker and a client: `work()`, `start()`, `stop()`, `start_workflow()`, `get_status()`,
    `wait_for_result()`, `resume_with_action()`, `cancel()`, `reconcile()`.

    `amqp_url` may be a ready `pika.BlockingConnection` (used for consuming; a second connection
    with the same parameters publishes) and `postgres_dsn` a ready `psycopg2` connection (switched
    to autocommit; it is re-opened from its DSN after a drop). The tables are created if missing
    (`ensure_schema`). `coordination_store` may be None: the engine never calls it (it is kept as
    `adapter.coordination` for node code and tools that share locks). Other keyword options go to
    `DistributedAdapter` (`retry_mode`, `threads`, `fetch_batch`, `max_fetch`, `poll_timeout`,
    `version_mismatch_ttl`, ...)."""

    queue: RabbitMqQueue
    store: PostgresRunStore

    def __init__(
        self,
        runtime: Any,
        coordination_store: Optional[Any],
        amqp_url: Any,
        postgres_dsn: Any,
        context_table_name: str = DEFAULT_CONTEXT_TABLE,
        status_table_name: str = DEFAULT_STATUS_TABLE,
        queue_name: str = "flowcraft-jobs",
        prefetch: int = DEFAULT_PREFETCH,
        *,
        runs_table_name: Optional[str] = None,
        outbox_table_name: Optional[str] = None,
        reconnect_timeout: float = 60.0,
        queues: Optional[Sequence[str]] = None,
        **options: Any,
    ) -> None:
        for name, what in ((context_table_name, "context table name"), (status_table_name, "status table name")):
            validate_identifier(name, what)  # before connecting to anything
        store = PostgresRunStore(postgres_dsn, context_table_name, status_table_name, runs_table_name, outbox_table_name,
                                 reconnect_timeout=reconnect_timeout)
        try:
            queue = RabbitMqQueue(amqp_url, queue_name, prefetch, reconnect_timeout=reconnect_timeout, queues=queues)
        except BaseException:
            store.close()
            raise
        # while jobs are fast, the whole prefetch window is one batch; while they are slow, a
        # thread holds one (`_hold` sizes the window as the fetch)
        options.setdefault("max_fetch", queue.prefetch)
        # A `BlockingConnection` is not thread-safe and a psycopg2 connection serialises its users:
        # each worker thread but the first consumes on a connection of its own and commits on a
        # PostgreSQL connection of its own (`queue.lane()`, `store.lane()`); publishing shares one
        # connection, behind its lock.
        super().__init__(runtime, queue, store, coordination_store, **options)

    def context(self, run_id: str) -> PostgresContext:
        """The run's context in PostgreSQL, read and patched key by key."""
        return PostgresContext(self.store, run_id)


def create_rabbitmq_reconciler(adapter: RabbitMqAdapter, status_table_name: Optional[str] = None,
                               stalled_threshold_seconds: float = 300.0, limit: int = 1000, **_: Any) -> Reconciler:
    """A `Reconciler` over the adapter's status table: runs `running` whose `updated_at` is older than
    `stalled_threshold_seconds` get their frontier re-enqueued (`reconciler.run()` -> stats); outbox
    rows older than that threshold (a killed worker's) are published again and deleted."""
    if status_table_name is not None:
        validate_identifier(status_table_name, "status table name")
        if status_table_name != adapter.store.status_table:
            raise ValueError(f"status_table_name {status_table_name!r} is not the adapter's status table "
                             f"{adapter.store.status_table!r}")
    return Reconciler(adapter, stalled_threshold_seconds=stalled_threshold_seconds, limit=limit)  # it sweeps the store's outbox
