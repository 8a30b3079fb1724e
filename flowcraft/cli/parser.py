"""The argument parser of the `flowcraft` command (stdlib argparse)."""
from __future__ import annotations

import argparse
import os

from .. import __version__
from .backends import BACKENDS, DEFAULT_QUEUES, DEFAULT_TABLE_PREFIX, DEFAULT_URLS, PREFIX_ENV, QUEUE_ENV, TABLE_PREFIX_ENV

EPILOG = """\
exit codes:
  0  success (a run completed, or paused awaiting a resume)
  1  a run failed, was cancelled or stalled; lint found errors; a worker was forced to stop
  2  usage or input error, unknown run, unreachable service (one line on stderr; nothing changed)
  3  wait --timeout: the run had not finished in time (it goes on)

environment:
  REDIS_URL     default of --redis-url     (redis://127.0.0.1:6379/0)
  RABBITMQ_URL  default of --rabbitmq-url  (amqp://guest:guest@127.0.0.1:5672/%2F)
  POSTGRES_URL  default of --postgres-url  (postgresql://root@127.0.0.1:5432/test)
  FLOWCRAFT_BACKEND  default of --backend  (redis)
""" + f"""\
  {QUEUE_ENV}    default of --queue   ({DEFAULT_QUEUES["redis"]}; rabbitmq: {DEFAULT_QUEUES["rabbitmq"]})
  {PREFIX_ENV}   default of --prefix  (none)
  {TABLE_PREFIX_ENV}  rabbitmq: the tables are <prefix>contexts and <prefix>statuses
                          unless --context-table/--status-table ({DEFAULT_TABLE_PREFIX})
"""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    common.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    return common


def _app(required: bool) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parent.add_argument("--app", required=required, metavar="MODULE:ATTR",
                        help="a FlowRuntime (registry + blueprints), a Flow, a registry, or a callable returning one")
    return parent


def _connection() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parent.add_argument_group("connection")
    group.add_argument("--backend", choices=BACKENDS, default=os.environ.get("FLOWCRAFT_BACKEND") or "redis")
    for service in ("redis", "rabbitmq", "postgres"):
        env, default = DEFAULT_URLS[service]
        group.add_argument(f"--{service}-url", metavar="URL", help=f"default: ${env}, else {default}".replace("%", "%%"))
    group.add_argument("--prefix", help=f"Redis key prefix (default: ${PREFIX_ENV}, else none)")
    group.add_argument("--queue", metavar="NAME", action="append",
                       help=f"queue name (default: ${QUEUE_ENV}, else {DEFAULT_QUEUES['redis']}; rabbitmq: "
                            f"{DEFAULT_QUEUES['rabbitmq']}); a worker serves every --queue given, in that order "
                            "of priority (repeatable), and its default queue is the first that no node is routed to")
    _tables(group)
    return parent


def _tables(group: argparse._ActionsContainer) -> None:
    for what, table in (("context", "contexts"), ("status", "statuses")):
        group.add_argument(f"--{what}-table", metavar="NAME", help=f"rabbitmq: {what} table (default: "
                                                                  f"${{{TABLE_PREFIX_ENV}}}{table}, else {DEFAULT_TABLE_PREFIX}{table})")
    group.add_argument("--connect-timeout", type=positive_float, default=5.0, metavar="SECONDS",
                       help="give up reaching a service after this long (default: 5)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowcraft", description="Run and operate Flowcraft workflows.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"flowcraft {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common, conn = _common(), _connection()

    def add(name: str, help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, parents=[common, *parents],
                                   allow_abbrev=False)

    run = add("run", "run a blueprint in memory; print the WorkflowResult JSON", _app(False))
    run.add_argument("blueprint", metavar="BLUEPRINT", help="a blueprint JSON file, or the id of one of the app's")
    _context(run)
    run.add_argument("--concurrency", type=positive_int, default=1, metavar="N", help="threads for independent nodes")
    run.add_argument("--wait-timers", action="store_true", help="sleep nodes sleep inline instead of pausing the run")
    _deadline(run)

    worker = add("worker", "process jobs from the backend's queue", _app(True), conn)
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.add_argument("--concurrency", type=positive_int, default=1, metavar="N",
                        help="worker processes (for CPU-bound nodes: each has its own interpreter)")
    worker.add_argument("--threads", type=positive_int, default=1, metavar="N",
                        help="node executions at once in each worker process (for I/O-bound nodes; not with rq)")
    worker.add_argument("--blueprint", action="append", metavar="FILE", help="add a blueprint JSON file (repeatable)")
    worker.add_argument("--metrics-port", type=positive_int, metavar="P",
                        help="serve Prometheus metrics on port P (needs flowcraft[prometheus]); with "
                             "--concurrency N, worker i of N serves on P+i")
    worker.add_argument("--batch", type=positive_int, metavar="N",
                        help="jobs fetched and committed together (default: the adapter's); a stop signal "
                             "lets the batch in hand finish")

    start = add("start", "start a run on the backend; print its id", _app(True), conn)
    start.add_argument("blueprint", metavar="BLUEPRINT", help="a blueprint id of the app, or a blueprint JSON file")
    _context(start)
    start.add_argument("--run-id", help="use this run id (starting it twice is harmless)")
    _deadline(start)

    for name, help_text in (("status", "print a run's status JSON"), ("cancel", "cancel a run")):
        add(name, help_text, _app(False), conn).add_argument("run_id", metavar="RUN_ID")
    wait = add("wait", "wait for a run to finish or await; print its result JSON", _app(False), conn)
    wait.add_argument("run_id", metavar="RUN_ID")
    wait.add_argument("--timeout", type=positive_float, metavar="SECONDS", help="give up after this long (exit 3)")

    resume = add("resume", "resume a run's awaiting wait node", _app(True), conn)
    resume.add_argument("run_id", metavar="RUN_ID")
    resume.add_argument("--action", required=True, help="the action the waiting node returns (drives its edges)")
    resume.add_argument("--output", metavar="JSON|@FILE", help="the waiting node's output")
    resume.add_argument("--node", metavar="ID", help="the waiting node, when several wait")

    reconcile = add("reconcile", "re-enqueue the frontier of runs idle too long", _app(True), conn)
    reconcile.add_argument("--every", type=positive_float, metavar="SECONDS", help="repeat until SIGTERM/SIGINT")
    reconcile.add_argument("--stalled-after", type=positive_float, default=300.0, metavar="SECONDS",
                           help="a run idle this long is reconciled (default: 300)")

    graph = add("graph", "print a blueprint as a Mermaid flowchart", _app(False), conn)
    graph.add_argument("blueprint", metavar="BLUEPRINT", help="a blueprint JSON file, or the id of one of the app's")
    graph.add_argument("--run", metavar="RUN_ID", help="draw this run's path (needs the backend options)")

    lint = add("lint", "check a blueprint; exit 1 if it has errors", _app(False))
    lint.add_argument("blueprint", metavar="BLUEPRINT", help="a blueprint JSON file, or the id of one of the app's")
    lint.add_argument("--json", action="store_true", help="print the issues as JSON")

    from .operations import add_parsers

    add_parsers(add, _app, conn)
    from .dashboard import add_parser as add_dashboard

    add_dashboard(add, _app, conn)

    from .scheduler import add_parsers as add_scheduler_parsers

    add_scheduler_parsers(add, _app, conn)

    db = add("db", "database administration (rabbitmq backend)")
    db_commands = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    db_init = db_commands.add_parser("init", help="create the PostgreSQL tables if missing", parents=[common],
                                     allow_abbrev=False)
    db_init.add_argument("--postgres-url", metavar="URL", help=f"default: $POSTGRES_URL, else {DEFAULT_URLS['postgres'][1]}")
    _tables(db_init)
    return parser


def _context(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context", metavar="JSON|@FILE", help="the initial context, a JSON object")


def _deadline(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deadline", type=positive_float, metavar="SECONDS",
                        help="fail the run with DeadlineExceeded if it has not ended this long after it started "
                             "(default: the blueprint's metadata.deadline)")
