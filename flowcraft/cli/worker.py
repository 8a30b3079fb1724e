"""`flowcraft worker`: one worker process, or a supervisor of several that forwards stop signals.

SIGTERM or SIGINT stops a worker gracefully: the jobs in hand (one fetch: a single job with
`--batch 1`, else up to the adapter's batch size) are finished, committed and acknowledged,
prefetched jobs go back to the queue, and the process exits 0. A second signal stops it at once
(exit 1): the jobs in hand are not acknowledged and will be delivered again.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Any, List, Sequence

from . import backends
from .errors import EXIT_FAILED, EXIT_OK
from .inputs import load_app, load_blueprint
from .signals import STOP_SIGNALS, ForcedStop, StopSignals

logger = logging.getLogger("flowcraft.cli")


def cmd_worker(args: Any, argv: Sequence[str]) -> int:
    runtime = load_app(args.app)
    for path in args.blueprint or ():
        runtime.add_blueprint(load_blueprint(path, runtime))
    adapter = backends.open_adapter(args, runtime)
    if args.concurrency > 1:
        backends.close_adapter(adapter)  # it only checked the input and services, once: children open their own
        return supervise(args.concurrency, child_argv(argv))
    try:
        return serve(adapter, burst=args.burst, label=f"{args.backend} queue {backends.queue_name(args)!r}")
    finally:
        backends.close_adapter(adapter)


def serve(adapter: Any, burst: bool = False, label: str = "") -> int:
    """Run `adapter.work()` in this (main) thread until the queue is empty (`burst`) or a stop signal
    (`stop()` makes `work()` return after the jobs in hand, even when it comes before `work()` starts)."""
    stop = adapter.stop
    with StopSignals(stop) as signals:
        logger.info("worker %d started on %s%s", os.getpid(), label, " (burst)" if burst else "")
        try:
            processed = adapter.work(burst=burst)
        except ForcedStop as forced:
            logger.warning("worker %d: forced stop (%s): the jobs in hand will be delivered again", os.getpid(), forced)
            return EXIT_FAILED
    reason = "stop signal" if signals.stopping else "queue empty" if burst else "stopped"
    logger.info("worker %d stopped (%s) after %s job(s)", os.getpid(), reason, processed)
    return EXIT_OK


# --- several processes ------------------------------------------------------------------------


def child_argv(argv: Sequence[str]) -> List[str]:
    """The command line of one child worker: this one without `--concurrency`."""
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--concurrency":
            skip = True
        elif not arg.startswith("--concurrency="):
            out.append(arg)
    return out


def supervise(count: int, argv: Sequence[str]) -> int:
    """Start `count` worker processes and forward SIGTERM/SIGINT to them; exit with the worst code."""
    command = [sys.executable, "-m", "flowcraft", *argv]
    children: List[subprocess.Popen] = []

    def forward(signum: int, frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}  # before any child exists
    try:
        # Own sessions: a terminal's Ctrl-C reaches the children only through us, once.
        children.extend(subprocess.Popen(command, start_new_session=True) for _ in range(count))
        logger.info("supervisor %d started %d workers: %s", os.getpid(), count, " ".join(str(c.pid) for c in children))
        codes = [child.wait() for child in children]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return max((code if code >= 0 else EXIT_FAILED for code in codes), default=EXIT_OK)
