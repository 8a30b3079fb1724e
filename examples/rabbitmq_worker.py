"""A Flowcraft worker on RabbitMQ (jobs), PostgreSQL (contexts and statuses) and Redis
(coordination): the worker side of the RabbitMQ seed, in Python.

It runs the order-fulfilment workflow of `workflows.py`; start `rabbitmq_client.py` to give it
runs. Start as many workers as you like: they share the queue (and a run's fan-out) between them.

    python examples/rabbitmq_worker.py                  # works until Ctrl-C or SIGTERM
    python examples/rabbitmq_worker.py --burst          # stops once the queue is empty
    python examples/rabbitmq_worker.py --latency 0.5    # every node takes 0.5 s longer (to watch it)

Ctrl-C or SIGTERM stops it gracefully: the job in hand is finished, committed and acknowledged,
and prefetched jobs go back to the queue. A RabbitMQ or PostgreSQL restart does not stop it: it
reconnects with backoff and goes on.

Settings (environment): RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/%2F),
POSTGRES_URL (default postgresql://root@127.0.0.1:5432/test), REDIS_URL (default
redis://127.0.0.1:6379/0), FLOWCRAFT_QUEUE (default flowcraft-jobs), FLOWCRAFT_TABLE_PREFIX
(default flowcraft_: the seed's tables flowcraft_contexts and flowcraft_statuses, plus
flowcraft_runs and flowcraft_outbox) and FLOWCRAFT_PREFIX (a Redis key prefix, default none).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import closing
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

if __package__ in (None, ""):  # run as `python examples/rabbitmq_worker.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2  # noqa: E402
import redis  # noqa: E402
from flowcraft_rabbitmq import RabbitMqAdapter, RedisCoordinationStore, ensure_schema  # noqa: E402

from examples.workflows import make_runtime, serve  # noqa: E402

logger = logging.getLogger("examples.rabbitmq_worker")

DEFAULTS = {
    "RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:5672/%2F",
    "POSTGRES_URL": "postgresql://root@127.0.0.1:5432/test",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
}


def settings() -> Dict[str, str]:
    """Connection settings and names from the environment; the defaults suit local services and
    give the seed's queue and table names."""
    tables = os.environ.get("FLOWCRAFT_TABLE_PREFIX") or "flowcraft_"
    return {
        **{name: os.environ.get(name) or default for name, default in DEFAULTS.items()},
        "queue_name": os.environ.get("FLOWCRAFT_QUEUE") or "flowcraft-jobs",
        "context_table_name": f"{tables}contexts",
        "status_table_name": f"{tables}statuses",
        "redis_prefix": os.environ.get("FLOWCRAFT_PREFIX", ""),
    }


def open_adapter(runtime: Any, **options: Any) -> RabbitMqAdapter:
    """The adapter worker and client both use."""
    config = settings()
    coordination = RedisCoordinationStore(redis.Redis.from_url(config["REDIS_URL"]), prefix=config["redis_prefix"])
    return RabbitMqAdapter(
        runtime, coordination, config["RABBITMQ_URL"], config["POSTGRES_URL"],
        context_table_name=config["context_table_name"], status_table_name=config["status_table_name"],
        queue_name=config["queue_name"], **options,
    )


def create_tables() -> None:
    """The seed's `CREATE TABLE`s (and the adapter's own two tables): idempotent, so every worker
    runs it on start (`flowcraft db init` does the same)."""
    config = settings()
    with closing(psycopg2.connect(config["POSTGRES_URL"])) as conn:
        ensure_schema(conn, config["context_table_name"], config["status_table_name"])


def main(argv: Optional[Sequence[str]] = None) -> Optional[int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="stop once the queue is empty")
    parser.add_argument("--latency", type=float, default=0.0, metavar="SECONDS",
                        help="make every node take this much longer (default: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)  # pika logs every connection step at INFO

    # 1. The blueprints and the registry (shared with the client), in a runtime.
    runtime = make_runtime(latency=args.latency)
    # 2. The tables, then the adapter: RabbitMQ for the jobs (durable queue, persistent messages,
    #    publisher confirms, ack after commit), PostgreSQL for contexts and statuses, Redis for
    #    coordination.
    create_tables()
    adapter = open_adapter(runtime)
    config = settings()
    logger.info("worker %d on RabbitMQ queue %r, tables %s/%s%s", os.getpid(), config["queue_name"],
                config["context_table_name"], config["status_table_name"], ", burst" if args.burst else "")
    # 3. Process jobs.
    try:
        processed = serve(adapter, args.burst)
    finally:
        adapter.close()
        adapter.coordination.client.close()
    logger.info("worker %d stopped%s", os.getpid(), "" if processed is None else f" after {processed} job(s)")
    return processed


if __name__ == "__main__":
    main()
