"""RabbitMQ adapter for Flowcraft (AMQP job transport with PostgreSQL state).

Installed as the top-level package ``flowcraft_rabbitmq``; needs the
``rabbitmq`` extra (``pip install 'flowcraft[rabbitmq]'``).
"""
from typing import TYPE_CHECKING

from .adapter import RabbitMqAdapter, create_rabbitmq_reconciler
from .queue import MAX_REASON_BYTES, REASON_BYTES_HEADER, REASON_HEADER, RabbitMqQueue
from .schema import ensure_schema, validate_identifier
from .context import PostgresContext
from .store import PostgresRunStore, StoreUnavailable

if TYPE_CHECKING:
    from flowcraft_redis import RedisCoordinationStore

__all__ = [
    "MAX_REASON_BYTES", "PostgresContext", "PostgresRunStore", "RabbitMqAdapter", "RabbitMqQueue", "REASON_BYTES_HEADER",
    "REASON_HEADER", "RedisCoordinationStore",
    "StoreUnavailable", "create_rabbitmq_reconciler", "ensure_schema", "validate_identifier",
]


def __getattr__(name: str) -> object:
    # The coordination store is optional here: redis is imported only when it is asked for.
    if name == "RedisCoordinationStore":  # shared with the Redis adapter, as the SPEC asks
        from flowcraft_redis import RedisCoordinationStore

        return RedisCoordinationStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
