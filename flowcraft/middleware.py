"""Middleware: code wrapped around every node execution (logging, transactions, metrics).

A middleware is any object with some of these methods; the first in the runtime's list is the
outermost:

- `around(ctx, call_next) -> NodeResult`: `call_next()` (or `call_next(new_ctx)`) runs the rest of
  the chain and the node; return its result, or another one.
- `before(ctx)`: called before the node (and before `around`).
- `after(ctx, result)`: called after; a non-None return value replaces the result.

A middleware may also observe runs through these optional hooks, which cost nothing when no
middleware has them (unlike an event bus, which makes the runtime build an event for every step):

- `traceparent() -> Optional[str]`: the W3C trace context a new run starts under, asked once when a
  run starts (`FlowRuntime.run`, `start_workflow`); the run's nodes see it as `ctx.traceparent`, and
  distributed it travels in every job of the run (SPEC 13). The core never reads it.
- `run_finished(run_id, blueprint_id, status)`: a run ended (completed, failed, cancelled, stalled).
- `job_dead_lettered(run_id, blueprint_id, node_id, reason)`: a worker dead-lettered a job (the ids
  are None when the job could not be read).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, List, Optional, Protocol, Sequence

from .node import NodeContext, NodeResult


class Middleware(Protocol):
    def around(self, ctx: NodeContext, call_next: Callable[..., NodeResult]) -> NodeResult: ...


class LoggingMiddleware:
    """Logs each node's start, finish and duration to `flowcraft.nodes`."""

    def __init__(self, logger: Optional[logging.Logger] = None, level: int = logging.INFO) -> None:
        self.logger = logger or logging.getLogger("flowcraft.nodes")
        self.level = level

    def around(self, ctx: NodeContext, call_next: Callable[..., NodeResult]) -> NodeResult:
        started = time.perf_counter()
        self.logger.log(self.level, "node %s started (run %s)", ctx.node_id, ctx.run_id)
        try:
            result = call_next()
        except Exception as error:
            self.logger.log(self.level, "node %s failed after %.1f ms: %s", ctx.node_id,
                            (time.perf_counter() - started) * 1000, error)
            raise
        self.logger.log(self.level, "node %s finished in %.1f ms", ctx.node_id, (time.perf_counter() - started) * 1000)
        return result


def hooks(middleware: Sequence[Any], name: str) -> List[Callable[..., Any]]:
    """The bound `name` hooks of the middleware that have one, outermost first."""
    return [hook for hook in (getattr(mw, name, None) for mw in middleware) if hook is not None]


def start_traceparent(middleware: Sequence[Any]) -> Optional[str]:
    """The trace context a new run starts under: the first middleware's `traceparent()` that gives one."""
    for hook in hooks(middleware, "traceparent"):
        try:
            value = hook()
        except Exception:  # an observer must never stop a run from starting
            logging.getLogger("flowcraft.middleware").exception("a middleware's traceparent() failed")
            continue
        if value:
            return str(value)
    return None


def call_hooks(middleware: Sequence[Any], name: str, *args: Any) -> None:
    """Call every middleware's `name` hook; a failing hook is logged, never fatal."""
    for hook in hooks(middleware, name):
        try:
            hook(*args)
        except Exception:
            logging.getLogger("flowcraft.middleware").exception("a middleware's %s hook failed", name)


__all__ = ["Middleware", "LoggingMiddleware", "call_hooks", "hooks", "start_traceparent"]
