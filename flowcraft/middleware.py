"""Middleware: code wrapped around every node execution (logging, transactions, metrics).

A middleware is any object with some of these methods; the first in the runtime's list is the
outermost:

- `around(ctx, call_next) -> NodeResult`: `call_next()` (or `call_next(new_ctx)`) runs the rest of
  the chain and the node; return its result, or another one.
- `before(ctx)`: called before the node (and before `around`).
- `after(ctx, result)`: called after; a non-None return value replaces the result.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Protocol

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


__all__ = ["Middleware", "LoggingMiddleware"]
