"""RabbitMQ adapter for Flowcraft (AMQP job transport with PostgreSQL state).

Installed as the top-level package ``flowcraft_rabbitmq``; needs the
``rabbitmq`` extra (``pip install 'flowcraft[rabbitmq]'``).
"""
from .adapter import RabbitMqAdapter, create_rabbitmq_reconciler
from flowcraft_redis import RedisCoordinationStore  # shared with the Redis adapter, as the SPEC asks
from .queue import MAX_REASON_BYTES, REASON_BYTES_HEADER, REASON_HEADER, RabbitMqQueue
from .schema import ensure_schema, validate_identifier
from .context import PostgresContext
from .store import PostgresRunStore, StoreUnavailable

__all__ = [
    "MAX_REASON_BYTES", "PostgresContext", "PostgresRunStore", "RabbitMqAdapter", "RabbitMqQueue", "REASON_BYTES_HEADER",
    "REASON_HEADER", "RedisCoordinationStore",
    "StoreUnavailable", "create_rabbitmq_reconciler", "ensure_schema", "validate_identifier",
]
