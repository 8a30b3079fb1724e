"""The subcommands other than `worker`: each takes the parsed arguments and returns an exit code."""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator

import attrs

from ..cancel import CancelToken
from ..result import AWAITING, COMPLETED, WorkflowResult
from . import backends
from .errors import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, CliError
from .inputs import is_blueprint_file, load_app, load_blueprint, parse_context, parse_json_arg, read_json_file
from .progress import Progress, watching
from .signals import StopSignals

_SUCCESS_STATUSES = (COMPLETED, AWAITING)  # a paused run is not a failure: it waits for a resume


def print_json(value: Any) -> None:
    """One JSON document on stdout: indented on a terminal, one line when piped (one per line for tools)."""
    indent = 2 if sys.stdout.isatty() else None
    sys.stdout.write(json.dumps(value, indent=indent, default=str) + "\n")
    sys.stdout.flush()


def status_exit(status: str) -> int:
    return EXIT_OK if status in _SUCCESS_STATUSES else EXIT_FAILED


@contextlib.contextmanager
def connected(args: Any, runtime: Any = None) -> Iterator[Any]:
    """The backend's adapter for the block, closed afterwards."""
    adapter = backends.open_adapter(args, runtime if runtime is not None else load_app(args.app))
    try:
        yield adapter
    finally:
        backends.close_adapter(adapter)


def _unknown_run(run_id: str) -> CliError:
    return CliError(f"unknown run {run_id!r}")


# --- in memory ----------------------------------------------------------------------------------


def cmd_run(args: Any) -> int:
    """Run a blueprint in this process; print its `WorkflowResult` JSON."""
    runtime = load_app(args.app)
    blueprint = load_blueprint(args.blueprint, runtime)
    context = parse_context(args.context)
    progress = Progress(sys.stderr, blueprint.id, len(blueprint.nodes)) if sys.stderr.isatty() else None
    token = CancelToken()
    # Ctrl-C / SIGTERM: no new node starts, the run ends `cancelled` and its result is still printed.
    with watching(runtime, progress), StopSignals(lambda: token.cancel("interrupted")):
        result = runtime.run(blueprint, context, concurrency=args.concurrency, cancel=token,
                             wait_timers=args.wait_timers, deadline=args.deadline)
    if progress is not None:
        progress.finish(result.status)
    print_json(result.to_dict())
    return status_exit(result.status)


def cmd_graph(args: Any) -> int:
    """Print the blueprint as a Mermaid flowchart; with `--run`, that run's path drawn on it."""
    from ..mermaid import generate_mermaid, generate_mermaid_for_run

    runtime = load_app(args.app)
    blueprint = load_blueprint(args.blueprint, runtime)
    if args.run is None:
        print(generate_mermaid(blueprint))
        return EXIT_OK
    with connected(args, runtime) as adapter:
        result = _stored_result(adapter, args.run)
    print(generate_mermaid_for_run(blueprint, result))
    return EXIT_OK


def _stored_result(adapter: Any, run_id: str) -> Any:
    """A run's result: the stored one, else (still running) what its context shows so far."""
    status = adapter.get_status(run_id)
    if status is None:
        raise _unknown_run(run_id)
    if status.result is not None:
        return status.result
    try:
        return adapter.wait_for_result(run_id, timeout=0)
    except TimeoutError:
        return WorkflowResult(status.status, adapter.store.read_all_context(run_id), run_id=run_id)


def cmd_lint(args: Any) -> int:
    """Print every problem of a blueprint; exit 1 if any is an error."""
    from ..analysis import lint_blueprint

    runtime = load_app(args.app) if args.app else None
    if is_blueprint_file(args.blueprint):
        data: Any = read_json_file(args.blueprint, "blueprint file")
    else:
        data = load_blueprint(args.blueprint, runtime if runtime is not None else load_app(None))
    result = lint_blueprint(data, runtime.registry if runtime is not None else None)
    if runtime is None:
        print("flowcraft: warning: uses keys not checked: without --app there is no registry to check them against",
              file=sys.stderr)
    if args.json:
        print_json(result.to_dict())
    else:
        for issue in result.issues:
            where = f" (node {issue.node_id})" if issue.node_id else ""
            print(f"{issue}{where}")
        print("valid" if result.is_valid else f"invalid: {len(result.errors)} error(s)")
    return EXIT_OK if result.is_valid else EXIT_FAILED


# --- distributed client ---------------------------------------------------------------------


def cmd_start(args: Any) -> int:
    """Start a run on the backend; print its id."""
    runtime = load_app(args.app)
    blueprint = load_blueprint(args.blueprint, runtime)
    context = parse_context(args.context)
    if runtime.blueprints.get(blueprint.id) != blueprint:
        print(f"flowcraft: warning: blueprint {blueprint.id!r} differs from the app's or is not in it: "
              f"workers need it too (flowcraft worker --blueprint {args.blueprint})", file=sys.stderr)
    with connected(args, runtime) as adapter:
        run_id = adapter.start_workflow(blueprint, context, run_id=args.run_id, deadline=args.deadline)
    print(run_id)
    return EXIT_OK


def cmd_status(args: Any) -> int:
    """Print a run's status JSON (`run_id`, `status`, `updated_at`, `result`)."""
    with connected(args) as adapter:
        status = adapter.get_status(args.run_id)
    if status is None:
        raise _unknown_run(args.run_id)
    print_json(attrs.asdict(status))
    return EXIT_OK


def cmd_wait(args: Any) -> int:
    """Wait until a run completes, fails, is cancelled or awaits; print its result JSON."""
    with connected(args) as adapter:
        if adapter.get_status(args.run_id) is None:
            raise _unknown_run(args.run_id)
        try:
            result = adapter.wait_for_result(args.run_id, timeout=args.timeout)
        except TimeoutError:
            raise CliError(f"run {args.run_id!r} did not finish within {args.timeout:g}s (it goes on)", EXIT_TIMEOUT) from None
    print_json(result.to_dict())
    return status_exit(result.status)


def cmd_resume(args: Any) -> int:
    """Complete a run's awaiting `wait` node with an action and output."""
    output = parse_json_arg(args.output, "--output")
    with connected(args) as adapter:
        try:
            enqueued = adapter.resume_with_action(args.run_id, args.action, output, node_id=args.node)
        except KeyError:
            raise _unknown_run(args.run_id) from None
        except ValueError as error:
            raise CliError(str(error)) from None
    print_json({"run_id": args.run_id, "enqueued": sorted(enqueued)})
    return EXIT_OK


def cmd_cancel(args: Any) -> int:
    """Cancel a run; print its status afterwards."""
    with connected(args) as adapter:
        try:
            adapter.cancel(args.run_id)
        except KeyError:
            raise _unknown_run(args.run_id) from None
        status = adapter.get_status(args.run_id)
    print_json({"run_id": args.run_id, "status": status.status if status else None})
    return EXIT_OK


def cmd_reconcile(args: Any) -> int:
    """Re-enqueue the frontier of idle runs, once or every `--every` seconds until SIGTERM/SIGINT."""
    with connected(args) as adapter, StopSignals() as signals:
        reconciler = backends.open_reconciler(args, adapter)
        while True:
            print_json(attrs.asdict(reconciler.run()))
            if args.every is None or signals.sleep(args.every):
                return EXIT_OK


# --- schema -----------------------------------------------------------------------------------


def cmd_db_init(args: Any) -> int:
    """Create the RabbitMQ adapter's PostgreSQL tables if missing; print their names."""
    print_json(backends.init_schema(args))
    return EXIT_OK
