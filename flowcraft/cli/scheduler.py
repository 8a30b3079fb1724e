"""`flowcraft scheduler` (start the app's scheduled runs until SIGTERM/SIGINT) and `flowcraft
schedules` (list them with their next and last started tick); see `flowcraft.schedules`.

The schedules are those the app's runtime registered (`runtime.schedule(...)` in the app module).
The lease and the ticks live in the backend's coordination store: Redis for `redis` and `rq`; the
`rabbitmq` backend has none of its own (its engine needs none), so its schedulers share a Redis
too, at `--redis-url` / `$REDIS_URL`, as its `RabbitMqAdapter` coordination store does.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Callable, Iterator

from ..schedules import DEFAULT_LEASE_TTL, Scheduler
from . import backends
from .commands import connected, print_json
from .errors import EXIT_OK, CliError, one_line
from .inputs import load_app
from .signals import StopSignals

logger = logging.getLogger("flowcraft.cli")


def add_parsers(add: Callable[..., Any], app: Callable[[bool], Any], conn: Any) -> None:
    """The `scheduler` and `schedules` subcommands on `flowcraft`'s parser."""
    from .parser import positive_float

    scheduler = add("scheduler", "start the app's scheduled runs on time, until SIGTERM/SIGINT "
                                 "(run any number: one of them leads)", app(True), conn)
    scheduler.add_argument("--lease-ttl", type=positive_float, default=DEFAULT_LEASE_TTL, metavar="SECONDS",
                           help=f"a dead leader is replaced within this long (default: {DEFAULT_LEASE_TTL:g})")
    schedules = add("schedules", "list the app's schedules with their next and last started tick", app(True), conn)
    schedules.add_argument("--json", action="store_true", help="print them as JSON")


@contextlib.contextmanager
def _scheduler(args: Any) -> Iterator[Scheduler]:
    runtime = load_app(args.app)
    if not runtime.schedules:
        raise CliError(f"the app {args.app!r} has no schedules: call runtime.schedule(blueprint_id, cron) in it")
    with connected(args, runtime) as adapter:
        coordination = adapter.coordination
        client = None
        try:
            if coordination is None:  # rabbitmq: the lease needs a Redis (see the module doc)
                client = _redis(args)
                from flowcraft_redis import RedisCoordinationStore

                coordination = RedisCoordinationStore(client, backends.key_prefix(args))
            yield Scheduler(runtime, adapter, coordination, lease_ttl=getattr(args, "lease_ttl", DEFAULT_LEASE_TTL))
        finally:
            if client is not None:
                client.close()


def _redis(args: Any) -> Any:
    try:
        return backends._redis_client(args)
    except (ConnectionError, CliError) as error:
        raise CliError(f"flowcraft {args.command} --backend {args.backend} keeps its lease in Redis "
                       f"(--redis-url or $REDIS_URL): {one_line(error)}") from None


def cmd_scheduler(args: Any) -> int:
    with _scheduler(args) as scheduler:
        stop = threading.Event()
        with StopSignals(stop.set):
            names = ", ".join(sorted(scheduler.runtime.schedules))
            logger.info("scheduler %s (pid %d) started on %s: %s", scheduler.name, os.getpid(), args.backend, names)
            scheduler.run(stop)
        logger.info("scheduler %s stopped", scheduler.name)
    return EXIT_OK


def cmd_schedules(args: Any) -> int:
    with _scheduler(args) as scheduler:
        rows = scheduler.describe()
    if args.json:
        print_json({"schedules": rows})
        return EXIT_OK
    print(f"{'NAME':<20}  {'BLUEPRINT':<20}  {'CRON':<16}  {'TIMEZONE':<14}  {'NEXT TICK':<25}  LAST STARTED TICK")
    for row in rows:
        print(f"{row['name']:<20}  {row['blueprint_id']:<20}  {row['cron']:<16}  {row['timezone']:<14}  "
              f"{row['next_tick']:<25}  {row['last_started_tick'] or '-'}")
    return EXIT_OK


HANDLERS = {"scheduler": cmd_scheduler, "schedules": cmd_schedules}
