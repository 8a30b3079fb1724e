"""Shared test fixtures: Hypothesis profiles and isolated access to real services.

Service fixtures (Redis, PostgreSQL, RabbitMQ) connect to the addresses in
``REDIS_URL``, ``POSTGRES_URL`` and ``RABBITMQ_URL`` (defaults: the local
services).  When a service cannot be reached, or its client library is not
installed, the test is *skipped* with a reason naming the service and the
address -- unless ``FLOWCRAFT_REQUIRE_SERVICES=1``, in which case it *fails*
(CI sets it, so a broken service can never pass as a run of skips).

Every test gets its own namespace and everything in it is removed afterwards:

* Redis: keys under ``redis_prefix`` (``fctest:<uuid>:``), deleted with SCAN.
  The Redis is shared (other users, benchmarks on DBs 14 and 15), so this
  file never calls FLUSHDB, FLUSHALL or KEYS.
* PostgreSQL: tables whose name starts with ``pg_table_prefix``
  (``fct_<hex8>_``), in any schema.
* RabbitMQ: the queue ``amqp_queue_name`` (``fctest-<hex8>``) and its
  ``<name>.dead`` and ``<name>.delay`` companions.
"""
from __future__ import annotations

import importlib
import os
import uuid
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

pytest_plugins = ["pytester"]  # tests/test_service_fixtures.py runs nested sessions

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_URL = "postgresql://root@127.0.0.1:5432/test"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

REQUIRE_SERVICES_ENV = "FLOWCRAFT_REQUIRE_SERVICES"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------
# Hypothesis profiles
# --------------------------------------------------------------------------
try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # the `test` extra is not installed: no profiles needed
    _hypothesis_settings = None
else:
    # These machines are shared and noisy: no per-example deadline anywhere (a slow example is
    # not a failure; speed is measured in benchmarks/). CI also prints the blob that reproduces
    # a failure locally.
    _hypothesis_settings.register_profile("ci", deadline=None, derandomize=False, print_blob=True)
    _hypothesis_settings.register_profile("dev", deadline=None)
    _hypothesis_settings.load_profile(
        os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _env_flag("CI") else "dev")
    )


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return url


def service_unavailable(service: str, url: str, reason: str) -> None:
    """Skip the test -- or fail it when FLOWCRAFT_REQUIRE_SERVICES=1."""
    message = f"{service} unavailable at {redact_url(url)}: {reason}"
    if _env_flag(REQUIRE_SERVICES_ENV):
        pytest.fail(f"{message} ({REQUIRE_SERVICES_ENV}=1: a missing service is a failure)", pytrace=False)
    pytest.skip(message)


def _import_client(module: str, service: str, url: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        service_unavailable(service, url, f"Python package {module!r} is not installed ({exc})")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or repr(exc)
    return f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------
def _redis_glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\^-" else ch for ch in text)


def delete_redis_prefix(client: Any, prefix: str) -> int:
    """Delete every key starting with ``prefix`` using SCAN; return how many.

    A full SCAN returns every key that exists for its whole duration, so one
    pass suffices; a second pass catches keys written concurrently.
    """
    pattern = _redis_glob_escape(prefix) + "*"
    deleted = 0
    for _ in range(3):
        batch: list[Any] = []
        found = 0
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            found += 1
            if len(batch) >= 500:
                deleted += client.delete(*batch)
                batch.clear()
        if batch:
            deleted += client.delete(*batch)
        if not found:
            break
    return deleted


def _redis_connect(url: str) -> Any:
    redis = _import_client("redis", "Redis", url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
        client.ping()
    except Exception as exc:  # connection refused, auth, bad URL...
        service_unavailable("Redis", url, _one_line(exc))
    return client


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Address of a reachable Redis (``REDIS_URL``, default DB 0)."""
    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    _redis_connect(url).close()
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix ``fctest:<uuid>:`` owned by this test; its keys are deleted afterwards."""
    prefix = f"fctest:{uuid.uuid4().hex}:"
    yield prefix
    client = _redis_connect(redis_url)
    try:
        delete_redis_prefix(client, prefix)
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_url: str, redis_prefix: str) -> Iterator[Any]:
    """A ``redis.Redis`` (bytes responses); put keys under ``redis_prefix`` only."""
    client = _redis_connect(redis_url)
    try:
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------
def _pg_connect(dsn: str) -> Any:
    psycopg2 = _import_client("psycopg2", "PostgreSQL", dsn)
    try:
        return psycopg2.connect(dsn, connect_timeout=5)
    except Exception as exc:
        service_unavailable("PostgreSQL", dsn, _one_line(exc))


def drop_pg_tables_with_prefix(conn: Any, prefix: str) -> list[str]:
    """Drop every table (any schema) whose name starts with ``prefix``; return their names."""
    from psycopg2 import sql

    conn.rollback()
    old_autocommit = conn.autocommit
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            # A test that leaks a transaction holding a lock must not hang the run.
            cur.execute("SET lock_timeout = '15s'")
            cur.execute(
                "SELECT schemaname, tablename FROM pg_catalog.pg_tables"
                " WHERE substr(tablename, 1, length(%(p)s)) = %(p)s",
                {"p": prefix},
            )
            tables = cur.fetchall()
            for schema, table in tables:
                cur.execute(
                    sql.SQL("DROP TABLE IF EXISTS {}.{} CASCADE").format(
                        sql.Identifier(schema), sql.Identifier(table)
                    )
                )
            cur.execute("RESET lock_timeout")
    finally:
        conn.autocommit = old_autocommit
    return [f"{schema}.{table}" for schema, table in tables]


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """DSN of a reachable PostgreSQL (``POSTGRES_URL``)."""
    dsn = os.environ.get("POSTGRES_URL") or DEFAULT_POSTGRES_URL
    _pg_connect(dsn).close()
    return dsn


@pytest.fixture
def pg_table_prefix(postgres_dsn: str) -> Iterator[str]:
    """A table-name prefix ``fct_<hex8>_``; tables named with it are dropped afterwards."""
    prefix = f"fct_{uuid.uuid4().hex[:8]}_"
    yield prefix
    conn = _pg_connect(postgres_dsn)
    try:
        drop_pg_tables_with_prefix(conn, prefix)
    finally:
        conn.close()


@pytest.fixture
def pg_conn(postgres_dsn: str, pg_table_prefix: str) -> Iterator[Any]:
    """A psycopg2 connection (not autocommit); closed before the prefix's tables are dropped."""
    conn = _pg_connect(postgres_dsn)
    try:
        yield conn
    finally:
        conn.close()


# --------------------------------------------------------------------------
# RabbitMQ
# --------------------------------------------------------------------------
def _amqp_connect(url: str) -> Any:
    pika = _import_client("pika", "RabbitMQ", url)
    try:
        params = pika.URLParameters(url)
        params.connection_attempts = 1
        params.socket_timeout = 5
        params.stack_timeout = 15
        params.blocked_connection_timeout = 30
        return pika.BlockingConnection(params)
    except Exception as exc:
        service_unavailable("RabbitMQ", url, _one_line(exc))


def delete_amqp_queues(connection: Any, names: list[str]) -> None:
    """Delete the named queues; a queue that does not exist is not an error."""
    import pika.exceptions

    channel = connection.channel()
    try:
        for name in names:
            try:
                channel.queue_delete(queue=name)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise
                channel = connection.channel()
    finally:
        if channel.is_open:
            channel.close()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """AMQP URL of a reachable RabbitMQ (``RABBITMQ_URL``)."""
    url = os.environ.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL
    _amqp_connect(url).close()
    return url


@pytest.fixture
def amqp_queue_name(amqp_url: str) -> Iterator[str]:
    """A queue name ``fctest-<hex8>``; it and ``<name>.dead``/``<name>.delay`` are deleted afterwards."""
    name = f"fctest-{uuid.uuid4().hex[:8]}"
    yield name
    connection = _amqp_connect(amqp_url)
    try:
        delete_amqp_queues(connection, [name, f"{name}.dead", f"{name}.delay"])
    finally:
        connection.close()


@pytest.fixture
def amqp_connection(amqp_url: str, amqp_queue_name: str) -> Iterator[Any]:
    """A ``pika.BlockingConnection``; closed before the test's queues are deleted."""
    connection = _amqp_connect(amqp_url)
    try:
        yield connection
    finally:
        if connection.is_open:
            connection.close()
