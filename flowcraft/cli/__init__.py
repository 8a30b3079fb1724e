"""The `flowcraft` command line (also `python -m flowcraft`): `main(argv) -> exit code`.

Subcommands live in `commands.py` and `worker.py`; inputs are read in `inputs.py`, backends built
in `backends.py`. Bad input of any kind ends in one line `flowcraft: error: <what>` on stderr and
exit code 2, before anything is changed; see `errors.py` for every exit code.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..errors import BlueprintError, FlowcraftError
from .errors import EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, CliError, one_line
from .parser import build_parser
from .signals import ForcedStop

__all__ = ["main", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_TIMEOUT"]

_LONG_RUNNING = ("worker", "reconcile", "dashboard", "scheduler")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its usage message
        return int(exit_.code or 0)
    _configure_logging(args)
    try:
        code = _dispatch(args, argv)
        sys.stdout.flush()  # here, not at exit: a reader that went away is handled below
        return code
    except BrokenPipeError as error:
        if not _stdout_closed():
            return _report(args, error)  # a socket's, not ours
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("flowcraft: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ForcedStop as forced:  # a second SIGTERM/SIGINT while stopping gracefully
        print(f"flowcraft: forced stop ({forced})", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:
        return _report(args, error)


def _report(args: Any, error: Exception) -> int:
    """Print the one-line error (after the traceback with --debug); return the exit code."""
    code, message = _classify(error)
    if args.debug:
        traceback.print_exception(type(error), error, error.__traceback__)
    print(f"flowcraft: error: {message}", file=sys.stderr)
    return code


def _stdout_closed() -> bool:
    """True when stdout's reader has gone (`flowcraft graph ... | head`): then stdout is pointed at
    /dev/null, so that the interpreter's own flush at exit cannot fail too (the Python docs' recipe
    for SIGPIPE), and the command ends quietly, as a command killed by SIGPIPE would."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):
        return False  # not a real file (a program capturing our output): the pipe was not ours
    try:
        import select

        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        events = dict(poller.poll(0)).get(fd, 0)
        if not events & select.POLLERR:  # a pipe with no reader left polls as an error
            return False
    except (AttributeError, OSError):
        pass  # no poll() here: a bare BrokenPipeError reaching us is stdout's (drivers wrap theirs)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        pass
    return True


def _dispatch(args: Any, argv: List[str]) -> int:
    from . import commands, worker

    if args.command == "worker":
        return worker.cmd_worker(args, argv)
    if args.command == "db":
        return commands.cmd_db_init(args)
    handlers: Dict[str, Callable[[Any], int]] = {
        "run": commands.cmd_run, "start": commands.cmd_start, "status": commands.cmd_status,
        "wait": commands.cmd_wait, "resume": commands.cmd_resume, "cancel": commands.cmd_cancel,
        "reconcile": commands.cmd_reconcile, "graph": commands.cmd_graph, "lint": commands.cmd_lint,
    }
    from .dashboard import cmd_dashboard
    from .operations import HANDLERS
    from .scheduler import HANDLERS as SCHEDULER_HANDLERS

    handlers.update(HANDLERS)
    handlers["dashboard"] = cmd_dashboard
    handlers.update(SCHEDULER_HANDLERS)
    return handlers[args.command](args)


def _classify(error: Exception) -> tuple:
    """(exit code, one-line message) of an error that ended a command."""
    if isinstance(error, CliError):
        return error.exit_code, one_line(error)
    if isinstance(error, BlueprintError):
        return EXIT_USAGE, one_line("; ".join(error.problems))
    if isinstance(error, (ConnectionError, FlowcraftError, ValueError, OSError)):
        # a service that cannot be reached (ServiceUnavailable is a ConnectionError), or input the
        # engine or an adapter rejected (a bad queue name, a context value that is not JSON...)
        return EXIT_USAGE, one_line(error) or type(error).__name__
    return EXIT_FAILED, f"unexpected {type(error).__name__}: {one_line(error)} (--debug shows the traceback)"


def _configure_logging(args: Any) -> None:
    """Warnings on stderr for the long-running commands (and their start/stop lines), errors only for
    the others (a client's reconnection attempts are not news); -v and -vv show more."""
    if logging.getLogger().handlers:
        return  # called from a program (or a test) that set logging up: not ours to change
    if args.verbose >= 2:
        level = logging.DEBUG
    elif args.verbose == 1:
        level = logging.INFO
    else:
        level = logging.WARNING if args.command in _LONG_RUNNING else logging.ERROR
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pika logs every failed connection attempt at ERROR, with a traceback, though the adapter
    # handles it (retries, then raises the error the command reports in one line): only -vv shows them.
    logging.getLogger("pika").setLevel(level if args.verbose >= 2 else logging.CRITICAL)
    if args.command in _LONG_RUNNING:
        logging.getLogger("flowcraft.cli").setLevel(min(level, logging.INFO))
