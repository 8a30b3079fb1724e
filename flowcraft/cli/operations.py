"""The operator subcommands (SPEC section 11): runs, inspect, retry, restart, skip, dlq, prune.

Each takes the parsed arguments and returns an exit code; a bad input, an unknown run or node, or
an action that does not apply is one line on stderr with exit 2 (a `CliError`), nothing changed.
"""
from __future__ import annotations

import datetime as _dt
import sys
from typing import Any, Callable, Dict, List, Optional

from ..builtins import parse_duration
from ..graph import NodeState
from ..result import FINAL_STATUSES
from .commands import connected, print_json
from .errors import EXIT_OK, CliError, one_line
from .inputs import parse_json_arg


def _when(epoch: Optional[float]) -> str:
    if not epoch:
        return "-"
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _clean(text: Any) -> str:
    """One line, control characters shown escaped (a run's values come from anyone)."""
    out = one_line(text)
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in out)


def _acting(action: Callable[[], Any], run_id: str) -> Any:
    try:
        return action()
    except KeyError:
        raise CliError(f"unknown run {run_id!r}") from None
    except ValueError as error:
        raise CliError(one_line(error)) from None


def cmd_runs(args: Any) -> int:
    """List runs newest first (one line each, or a JSON document with --json)."""
    with connected(args) as adapter:
        try:
            page = adapter.list_runs(status=args.status, blueprint_id=args.blueprint, limit=args.limit,
                                     cursor=args.cursor)
        except ValueError as error:
            raise CliError(one_line(error)) from None
    if args.json:
        print_json({"runs": [s.to_dict() for s in page.runs], "next_cursor": page.next_cursor})
        return EXIT_OK
    if not page.runs:
        print("no runs")
        return EXIT_OK
    print(f"{'RUN ID':<36}  {'STATUS':<9}  {'BLUEPRINT':<20}  {'UPDATED (UTC)':<19}  ERROR")
    for s in page.runs:
        print(f"{_clean(s.run_id):<36}  {s.status:<9}  {_clean(s.blueprint_id or '-'):<20}  {_when(s.updated_at):<19}  "
              f"{_clean(s.error or '')[:80]}")
    if page.next_cursor:
        print(f"more: flowcraft runs --cursor {page.next_cursor}", file=sys.stderr)
    return EXIT_OK


def inspect_run(adapter: Any, run_id: str) -> Dict[str, Any]:
    """What the run's record and node states hold, and its node timeline from its durable history
    (`get_history`): each node execution with its time, duration, attempt and worker."""
    record = adapter.store.get_record(run_id)
    if record is None:
        raise CliError(f"unknown run {run_id!r}")
    states = adapter.store.read_all_states(run_id) if record.version else {}
    nodes = {n: {"status": st.status, "iteration": st.iteration, **({"pending_items": st.pending} if st.pending else {})}
             for n, raw in sorted(states.items()) for st in [NodeState.from_dict(raw)]}
    return {
        "run_id": run_id, "blueprint_id": record.blueprint_id, "blueprint_version": record.blueprint_version,
        "status": record.status, "version": record.version, "updated_at": record.updated_at,
        "outstanding": record.outstanding, "nodes": nodes, "errors": list(record.errors),
        "awaiting": record.awaiting,
        "timeline": _timeline(adapter.get_history(run_id)),
    }


_TIMELINE = ("workflow:start", "node:finish", "node:error", "node:skipped", "node:skip", "workflow:pause",
             "workflow:resume", "run:retry", "run:restart", "run:cancel", "run:deadline", "context:patch",
             "workflow:finish")


def _timeline(history: Any) -> List[Dict[str, Any]]:
    """The events of a run's history an operator reads (not the context changes), compact."""
    keep = ("node_id", "iteration", "attempt", "worker", "timestamp", "duration_ms", "index", "parent", "status",
            "message", "type", "node_ids")
    return [{"event": e.type, **{k: e.payload[k] for k in keep if e.payload.get(k) is not None}}
            for e in history if e.type in _TIMELINE]


def cmd_inspect(args: Any) -> int:
    """A run's summary, node states, errors with their tracebacks, and what it awaits."""
    with connected(args) as adapter:
        info = inspect_run(adapter, args.run_id)
    if args.json:
        print_json(info)
        return EXIT_OK
    print(f"run        {_clean(info['run_id'])}")
    print(f"blueprint  {_clean(info['blueprint_id'])} (version {_clean(info['blueprint_version'])})")
    print(f"status     {info['status']}   updated {_when(info['updated_at'])} UTC   commits {info['version']}")
    print("nodes:")
    for node_id, st in info["nodes"].items():
        extra = f", {st['pending_items']} item(s) pending" if "pending_items" in st else ""
        print(f"  {_clean(node_id):<30} {st['status']:<8} iteration {st['iteration']}{extra}")
    if info["awaiting"]:
        print("awaiting:")
        for node_id, details in info["awaiting"].items():
            print(f"  {_clean(node_id)}: {_clean(details.get('type'))}")
    if info["errors"]:
        print("errors:")
        for error in info["errors"]:
            print(f"  node {_clean(error.get('node_id'))}: {_clean(error.get('type'))}: {_clean(error.get('message'))}")
            for line in str(error.get("traceback") or "").rstrip("\n").splitlines():
                print("    " + "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in line))
    print("timeline:")
    for entry in info["timeline"]:
        when = _when(entry["timestamp"]) if "timestamp" in entry else " " * 19
        what = _clean(entry.get("node_id") or entry.get("status") or ",".join(entry.get("node_ids") or []))
        details = [f"{entry['duration_ms']:.1f} ms" if "duration_ms" in entry else "",
                 f"attempt {entry['attempt']}" if entry.get("attempt", 1) != 1 else "",
                 f"item {entry['index']}" if "index" in entry else "",
                 _clean(entry.get("worker") or ""), _clean(entry.get("message") or "")[:120]]
        print(f"  {when}  {entry['event']:<16} {what:<30} {'  '.join(x for x in details if x)}")
    return EXIT_OK


def cmd_retry(args: Any) -> int:
    """Run a failed, cancelled or stalled run again from its failed nodes (or --node ...)."""
    with connected(args) as adapter:
        enqueued = _acting(lambda: adapter.retry(args.run_id, args.node or None), args.run_id)
    print_json({"run_id": args.run_id, "enqueued": sorted(enqueued)})
    return EXIT_OK


def cmd_restart(args: Any) -> int:
    """Run a node and everything downstream of it again."""
    with connected(args) as adapter:
        enqueued = _acting(lambda: adapter.restart_from(args.run_id, args.from_node), args.run_id)
    print_json({"run_id": args.run_id, "enqueued": sorted(enqueued)})
    return EXIT_OK


def cmd_skip(args: Any) -> int:
    """Count a failed or awaiting node as completed with --output, and go on."""
    output = parse_json_arg(args.output, "--output")
    with connected(args) as adapter:
        enqueued = _acting(lambda: adapter.skip(args.run_id, args.node_id, output), args.run_id)
    print_json({"run_id": args.run_id, "enqueued": sorted(enqueued)})
    return EXIT_OK


def cmd_dlq(args: Any) -> int:
    """dlq list | requeue ID | purge."""
    with connected(args) as adapter:
        if args.dlq_command == "list":
            letters = adapter.dead_letters(limit=args.limit)
            if args.json:
                print_json([d.to_dict() for d in letters])
            elif not letters:
                print("no dead letters")
            else:
                for d in letters:
                    print(f"{_clean(d.id)}  {_when(d.dead_at)}  run {_clean(d.run_id or '-')}  {_clean(d.reason)[:120]}")
            return EXIT_OK
        if args.dlq_command == "requeue":
            if not _acting(lambda: adapter.requeue_dead_letter(args.id), "?"):
                raise CliError(f"no dead letter {args.id!r}")
            print_json({"requeued": args.id})
            return EXIT_OK
        print_json({"purged": adapter.purge_dead_letters()})
        return EXIT_OK


def cmd_prune(args: Any) -> int:
    """Delete ended runs last updated longer ago than --older-than."""
    try:
        seconds = parse_duration(args.older_than)
    except ValueError as error:
        raise CliError(f"--older-than: {error}") from None
    statuses: List[str] = args.status or ["completed", "failed", "cancelled"]
    bad = [s for s in statuses if s not in FINAL_STATUSES]
    if bad:
        raise CliError(f"--status: only ended runs can be pruned, not {bad}")
    with connected(args) as adapter:
        deleted = adapter.prune(seconds, statuses=tuple(statuses))
    print_json({"deleted": deleted})
    return EXIT_OK


def add_parsers(add: Callable[..., Any], app: Callable[[bool], Any], conn: Any) -> None:
    """The operator subcommands on `flowcraft`'s parser (`add(name, help, *parents)`)."""
    from .parser import positive_int

    runs = add("runs", "list runs, newest first", app(False), conn)
    runs.add_argument("--status", choices=("running", "awaiting", "completed", "failed", "cancelled", "stalled"))
    runs.add_argument("--blueprint", metavar="ID", help="only runs of this blueprint")
    runs.add_argument("--limit", type=positive_int, default=50, metavar="N", help="at most N runs (default: 50)")
    runs.add_argument("--cursor", help="the next page (printed on stderr after a full page)")
    runs.add_argument("--json", action="store_true", help="print the runs as JSON")

    inspect = add("inspect", "show a run: node states, errors with tracebacks, what it awaits", app(False), conn)
    inspect.add_argument("run_id", metavar="RUN_ID")
    inspect.add_argument("--json", action="store_true", help="print it as JSON")

    retry = add("retry", "run a failed run again from its failed nodes", app(True), conn)
    retry.add_argument("run_id", metavar="RUN_ID")
    retry.add_argument("--node", action="append", metavar="ID", help="retry from this node instead (repeatable)")

    restart = add("restart", "run a node and everything downstream of it again", app(True), conn)
    restart.add_argument("run_id", metavar="RUN_ID")
    restart.add_argument("--from", dest="from_node", required=True, metavar="NODE")

    skip = add("skip", "count a failed or awaiting node as completed, and go on", app(True), conn)
    skip.add_argument("run_id", metavar="RUN_ID")
    skip.add_argument("node_id", metavar="NODE")
    skip.add_argument("--output", metavar="JSON|@FILE", help="the node's output")

    dlq = add("dlq", "dead letters: list, requeue, purge")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", metavar="COMMAND", required=True)
    sub = [app(False), conn]  # the connection options after the subcommand: `flowcraft dlq list --backend ...`
    listing = dlq_commands.add_parser("list", help="list the dead letters", parents=sub, allow_abbrev=False)
    listing.add_argument("--limit", type=positive_int, default=100, metavar="N")
    listing.add_argument("--json", action="store_true")
    requeue = dlq_commands.add_parser("requeue", help="put a dead letter back in the queue", parents=sub,
                                      allow_abbrev=False)
    requeue.add_argument("id", metavar="ID")
    dlq_commands.add_parser("purge", help="delete every dead letter", parents=sub, allow_abbrev=False)

    prune = add("prune", "delete ended runs last updated longer ago than --older-than", app(False), conn)
    prune.add_argument("--older-than", required=True, metavar="DURATION", help="e.g. 30d, 12h, 90m, 3600")
    prune.add_argument("--status", action="append", metavar="S",
                       help="only runs of this status (repeatable; default: completed, failed, cancelled)")


HANDLERS = {"runs": cmd_runs, "inspect": cmd_inspect, "retry": cmd_retry, "restart": cmd_restart, "skip": cmd_skip,
            "dlq": cmd_dlq, "prune": cmd_prune}
