"""`flowcraft worker`: one worker process, or a supervisor of several that forwards stop signals.

SIGTERM or SIGINT stops a worker gracefully: the jobs in hand (one fetch: a single job with
`--batch 1`, else up to the adapter's batch size) are finished, committed and acknowledged,
prefetched jobs go back to the queue, and the process exits 0. A second signal stops it at once
(exit 1): the jobs in hand are not acknowledged and will be delivered again.

`--metrics-port P` serves the Prometheus metrics (`flowcraft.telemetry.PrometheusMetrics`, the
app's own if its runtime has one as middleware, else one added) on http://0.0.0.0:P/metrics while
the worker runs; with `--concurrency N`, worker i (0..N-1) serves on P+i.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Any, List, Optional, Sequence

from . import backends
from .errors import EXIT_FAILED, EXIT_OK, CliError
from .inputs import load_app, load_blueprint
from .signals import STOP_SIGNALS, ForcedStop, StopSignals

logger = logging.getLogger("flowcraft.cli")


def cmd_worker(args: Any, argv: Sequence[str]) -> int:
    runtime = load_app(args.app)
    for path in args.blueprint or ():
        runtime.add_blueprint(load_blueprint(path, runtime))
    port = getattr(args, "metrics_port", None)
    metrics = with_metrics(runtime) if port is not None and args.concurrency == 1 else None  # before the adapter binds the middleware
    adapter = backends.open_adapter(args, runtime)
    if args.concurrency > 1:
        backends.close_adapter(adapter)  # it only checked the input and services, once: children open their own
        return supervise(args.concurrency, child_argv(argv), metrics_port=port)
    server = None
    try:
        if metrics is not None:
            metrics.watch(adapter, backends.queue_name(args, runtime))
            try:
                server = metrics.serve(port)
            except OSError as error:
                raise CliError(f"cannot serve metrics on port {port}: {error}") from None
            logger.info("worker %d serves metrics on http://0.0.0.0:%d/metrics", os.getpid(), port)
        served = backends.served_queues(args, runtime) or [backends.queue_name(args, runtime)]
        label = f"{args.backend} queue{'s' if len(served) > 1 else ''} {', '.join(map(repr, served))}"
        return serve(adapter, burst=args.burst, label=label)
    finally:
        if server is not None:
            server.shutdown()
        backends.close_adapter(adapter)


def with_metrics(runtime: Any) -> Any:
    """The runtime's `PrometheusMetrics` middleware, added when it has none."""
    try:
        from ..telemetry import PrometheusMetrics
        for middleware in runtime.middleware:
            if isinstance(middleware, PrometheusMetrics):
                return middleware
        metrics = PrometheusMetrics()
    except ImportError as error:
        raise CliError(f"--metrics-port: {error}") from None
    runtime.middleware = (*runtime.middleware, metrics)
    return metrics


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


def _without(argv: Sequence[str], option: str) -> List[str]:
    """`argv` without `option` and its value (`--option value` or `--option=value`)."""
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def child_argv(argv: Sequence[str]) -> List[str]:
    """The command line of one child worker: this one without `--concurrency`."""
    return _without(argv, "--concurrency")


def with_port(argv: Sequence[str], port: int) -> List[str]:
    """`argv` with `--metrics-port port` instead of its own."""
    return [*_without(argv, "--metrics-port"), "--metrics-port", str(port)]


def supervise(count: int, argv: Sequence[str], metrics_port: Optional[int] = None) -> int:
    """Start `count` worker processes and forward SIGTERM/SIGINT to them; exit with the worst code.
    With `metrics_port` P, worker i serves its metrics on P+i."""
    commands = [[sys.executable, "-m", "flowcraft", *(argv if metrics_port is None else with_port(argv, metrics_port + i))]
                for i in range(count)]
    children: List[subprocess.Popen] = []

    def forward(signum: int, frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}  # before any child exists
    try:
        # Own sessions: a terminal's Ctrl-C reaches the children only through us, once.
        children.extend(subprocess.Popen(command, start_new_session=True) for command in commands)
        logger.info("supervisor %d started %d workers: %s", os.getpid(), count, " ".join(str(c.pid) for c in children))
        codes = [child.wait() for child in children]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return max((code if code >= 0 else EXIT_FAILED for code in codes), default=EXIT_OK)
