"""Building a distributed adapter (and its reconciler) from the command line's connection settings.

Adapters are imported here, lazily: the core never imports redis, pika or psycopg2 until a
command needs a backend. Connection settings come from the flags, else the environment
(`REDIS_URL`, `RABBITMQ_URL`, `POSTGRES_URL`), else the local defaults below. A service that
cannot be reached raises `ServiceUnavailable` naming it and its (password-redacted) address.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type
from urllib.parse import urlsplit, urlunsplit

from .. import routing
from ..errors import ServiceUnavailable
from ..runtime import FlowRuntime
from .errors import CliError, one_line

BACKENDS = ("redis", "rq", "rabbitmq")
DEFAULT_URLS = {
    "redis": ("REDIS_URL", "redis://127.0.0.1:6379/0"),
    "rabbitmq": ("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
    "postgres": ("POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test"),
}
DEFAULT_QUEUES = {"redis": "flowcraft-queue", "rq": "flowcraft-queue", "rabbitmq": "flowcraft-jobs"}
# Names the examples (examples/*_worker.py) read from the environment too, with the same defaults:
# a flag wins, then the variable (when set and not empty), then the default.
QUEUE_ENV = "FLOWCRAFT_QUEUE"  # default: DEFAULT_QUEUES[backend]
PREFIX_ENV = "FLOWCRAFT_PREFIX"  # Redis key prefix; default: none (the seed's key names)
TABLE_PREFIX_ENV = "FLOWCRAFT_TABLE_PREFIX"  # rabbitmq: <prefix>contexts and <prefix>statuses
DEFAULT_TABLE_PREFIX = "flowcraft_"
RQ_THREADS = ("--threads is not for rq: its jobs run in RQ worker processes, one job at a time each; "
              "run several (--concurrency N, or `rq worker-pool -n N`)")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")  # as flowcraft_rabbitmq.validate_identifier


def url(args: Any, service: str) -> str:
    """The URL of `service` ("redis", "rabbitmq", "postgres"): its flag, else its env var, else the default."""
    given = getattr(args, f"{service}_url", None)
    env, default = DEFAULT_URLS[service]
    return given or os.environ.get(env) or default


def redact(address: str) -> str:
    """`address` with any password replaced by `***`, for messages."""
    try:
        parts = urlsplit(address)
        if parts.password is None:
            return address
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return address


def table_names(args: Any) -> Tuple[str, str]:
    """The context and status table names (flags, else `$FLOWCRAFT_TABLE_PREFIX` + contexts/statuses),
    checked before anything connects."""
    tables = os.environ.get(TABLE_PREFIX_ENV) or DEFAULT_TABLE_PREFIX
    names = (args.context_table or f"{tables}contexts", args.status_table or f"{tables}statuses")
    for name, given, flag in zip(names, (args.context_table, args.status_table), ("--context-table", "--status-table")):
        if not _IDENTIFIER.match(name):
            culprit = flag if given else f"{flag} (from ${TABLE_PREFIX_ENV})"
            raise CliError(f"{culprit} {name!r} is not a valid table name: use 1-63 letters, digits or "
                           f"underscores, not starting with a digit")
    return names


@contextlib.contextmanager
def reaching(service: str, address: str) -> Iterator[None]:
    """Turn any connection failure inside the block into one line naming the service: a refused login
    raises `CliError` ("authentication failed"), anything else `ServiceUnavailable` ("cannot reach")."""
    try:
        yield
    except CliError:
        raise
    except _connection_errors() as error:
        raise service_error(service, address, error) from None


def service_error(service: str, address: str, error: BaseException) -> Exception:
    """The one-line error for a failure to connect to `service` at `address`."""
    refusal = _refusal(error)
    if refusal:
        return CliError(f"{refusal} for {service} at {redact(address)}: {_auth_detail(error)}")
    return ServiceUnavailable(f"cannot reach {service} at {redact(address)}: {_root_cause(error)}")


# psycopg2 has no class of its own for a refused login: its server message says it.
_PG_AUTH = re.compile(r"password authentication failed|no password supplied|role \S+ does not exist|"
                      r"authentication failed", re.IGNORECASE)


_REFUSALS = (("authentication failed", "redis.exceptions", ("AuthenticationError", "AuthorizationError")),
             ("authentication failed", "pika.exceptions", ("ProbableAuthenticationError", "AuthenticationError")),
             ("access refused", "pika.exceptions", ("ProbableAccessDeniedError",)))  # a vhost missing or not allowed


def _refusal(error: BaseException) -> str:
    """"authentication failed" / "access refused" when the service refused the login, else ""."""
    for words, module, names in _REFUSALS:
        imported = sys.modules.get(module)  # not loaded: none of its errors can be this one
        if imported is not None and isinstance(error, tuple(getattr(imported, n) for n in names if hasattr(imported, n))):
            return words
    psycopg2 = sys.modules.get("psycopg2")
    if psycopg2 is not None and isinstance(error, psycopg2.OperationalError) and _PG_AUTH.search(str(error)):
        return "authentication failed"
    return ""


def _auth_detail(error: BaseException) -> str:
    text = one_line(error)
    refused = re.search(r"[A-Z_]+ - [^'\"]*?(?=\. For details|['\"]|$)", text)  # pika wraps the broker's words
    if refused:
        return refused.group(0)
    return re.sub(r"^connection to server at [^:]*: ", "", text) or type(error).__name__


def _root_cause(error: BaseException) -> str:
    """The socket error at the bottom of a driver's wrapped errors ("Connection refused"), else the
    error's own text: pika nests it three exceptions deep."""
    todo, seen = [error], set()
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        nested = (current.__cause__, current.__context__, getattr(current, "exception", None), *current.args)
        todo.extend(x for x in nested if isinstance(x, BaseException))
    return one_line(error) or type(error).__name__


def _connection_errors() -> Tuple[Type[BaseException], ...]:
    """The connection errors of the installed drivers (imported only when a backend is in use)."""
    errors: List[Type[BaseException]] = [ConnectionError, OSError]
    for module, names in (("redis.exceptions", ("ConnectionError", "TimeoutError", "AuthenticationError")),
                          ("psycopg2", ("OperationalError",)), ("pika.exceptions", ("AMQPError",))):
        try:
            imported = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        errors.extend(getattr(imported, name) for name in names)
    return tuple(errors)


def _import_adapter(package: str, backend: str) -> Any:
    try:
        return __import__(package)
    except ImportError as error:
        extra = "redis" if package == "flowcraft_redis" else "rabbitmq"
        raise CliError(f"backend {backend!r} needs {package} and its drivers "
                       f"(pip install 'flowcraft[{extra}]'): {one_line(error)}") from None


# --- adapters ---------------------------------------------------------------------------------


def open_adapter(args: Any, runtime: FlowRuntime) -> Any:
    """The adapter of `args.backend`, connected and checked (raises `ServiceUnavailable`)."""
    options: Dict[str, Any] = {"fetch_batch": args.batch} if getattr(args, "batch", None) else {}
    threads = getattr(args, "threads", 1) or 1
    if threads > 1:
        if args.backend == "rq":
            raise CliError(RQ_THREADS)
        options["threads"] = threads
    queues = served_queues(args, runtime)
    if queues is not None:
        options["queues"] = queues
    with _first_connection(args):
        if args.backend == "rabbitmq":
            return _rabbitmq_adapter(args, runtime, options)
        return _redis_adapter(args, runtime, options)


@contextlib.contextmanager
def _first_connection(args: Any) -> Iterator[None]:
    """Hold back the adapters' "unreachable, retrying" warnings while they first connect (unless -v):
    if they give up, the command reports it in one line; once connected, a worker logs them again."""
    loggers = [] if getattr(args, "verbose", 0) else [logging.getLogger(n) for n in ("flowcraft.rabbitmq", "flowcraft.redis")]
    saved = [(each, each.level) for each in loggers]
    for each in loggers:
        each.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for each, level in saved:
            each.setLevel(level)


def queue_name(args: Any, runtime: Optional[FlowRuntime] = None) -> str:
    """The default queue (where jobs of unrouted nodes go): the first `--queue` that no node of
    `runtime` is routed to, else `$FLOWCRAFT_QUEUE`, else the backend's default queue."""
    routed = routing.queue_names(runtime) if runtime is not None else set()
    given = [name for name in args.queue or () if name not in routed]
    return given[0] if given else os.environ.get(QUEUE_ENV) or DEFAULT_QUEUES[args.backend]


def served_queues(args: Any, runtime: FlowRuntime) -> Optional[List[str]]:
    """The queues a worker serves, in priority order: every `--queue` (None: the default queue only)."""
    given = list(dict.fromkeys(args.queue or ()))
    return None if not given or given == [queue_name(args, runtime)] else given


def key_prefix(args: Any) -> str:
    """`--prefix`, else `$FLOWCRAFT_PREFIX`, else none (an explicit `--prefix ''` means none)."""
    return args.prefix if args.prefix is not None else os.environ.get(PREFIX_ENV, "")


def _redis_client(args: Any) -> Any:
    import redis

    address = url(args, "redis")
    with reaching("Redis", address):
        try:
            client = redis.Redis.from_url(address, socket_connect_timeout=args.connect_timeout,
                                          health_check_interval=30)
        except ValueError as error:
            raise CliError(f"invalid Redis URL {redact(address)!r}: {one_line(error)}") from None
        client.ping()
    return client


def _redis_adapter(args: Any, runtime: FlowRuntime, options: dict) -> Any:
    package = _import_adapter("flowcraft_redis", args.backend)
    if args.backend == "rq":
        if not hasattr(package, "RqAdapter"):
            raise CliError("backend 'rq' is not available: this flowcraft_redis has no RqAdapter")
        adapter_class = package.RqAdapter
    else:
        adapter_class = package.RedisAdapter
    client = _redis_client(args)
    return adapter_class(runtime, client, queue_name(args, runtime), prefix=key_prefix(args), **options)


def _rabbitmq_adapter(args: Any, runtime: FlowRuntime, options: dict) -> Any:
    context_table, status_table = table_names(args)
    package = _import_adapter("flowcraft_rabbitmq", "rabbitmq")
    coordination = None  # the engine calls none: RabbitMQ + PostgreSQL users need no Redis
    amqp, postgres = url(args, "rabbitmq"), url(args, "postgres")
    # PostgreSQL is reached first (the store), then RabbitMQ: name whichever failed.
    import psycopg2

    try:
        return package.RabbitMqAdapter(runtime, coordination, amqp, postgres, context_table, status_table,
                                       queue_name(args, runtime), reconnect_timeout=args.connect_timeout, **options)
    except psycopg2.Error as error:
        raise service_error("PostgreSQL", postgres, error) from None
    except _connection_errors() as error:
        raise service_error("RabbitMQ", amqp, error) from None


def close_adapter(adapter: Any) -> None:
    """Release the adapter's connections (prefetched jobs go back to the queue)."""
    close = getattr(adapter, "close", None)
    if close is not None:
        close()


# --- reconciler and schema --------------------------------------------------------------------


def open_reconciler(args: Any, adapter: Any) -> Any:
    """The backend's reconciler: runs idle longer than `--stalled-after` seconds get re-enqueued."""
    threshold = args.stalled_after
    if args.backend == "rabbitmq":
        from flowcraft_rabbitmq import create_rabbitmq_reconciler

        return create_rabbitmq_reconciler(adapter=adapter, stalled_threshold_seconds=threshold)
    import flowcraft_redis

    factory = getattr(flowcraft_redis, "create_rq_reconciler", None) if args.backend == "rq" else None
    if factory is not None:
        return factory(adapter, stalled_threshold_seconds=threshold)
    return flowcraft_redis.create_redis_reconciler(adapter, stalled_threshold_seconds=threshold)


def init_schema(args: Any) -> dict:
    """Create the RabbitMQ adapter's tables on `--postgres-url` (idempotent); return their names."""
    context_table, status_table = table_names(args)
    _import_adapter("flowcraft_rabbitmq", "rabbitmq")
    import psycopg2
    from flowcraft_rabbitmq import ensure_schema
    from flowcraft_rabbitmq.schema import (context_keys_table_name, default_table_names, items_table_name,
                                          history_table_name, node_states_table_name)

    address = url(args, "postgres")
    with reaching("PostgreSQL", address):
        conn = psycopg2.connect(address, connect_timeout=max(1, int(args.connect_timeout)))
    try:
        with reaching("PostgreSQL", address):
            ensure_schema(conn, context_table_name=context_table, status_table_name=status_table)
    finally:
        conn.close()
    runs, outbox = default_table_names(context_table)
    return {"context_table": context_table, "status_table": status_table, "runs_table": runs, "outbox_table": outbox,
            "items_table": items_table_name(runs), "node_states_table": node_states_table_name(runs),
            "context_keys_table": context_keys_table_name(runs), "history_table": history_table_name(runs)}
