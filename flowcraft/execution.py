"""Running one node: the class lifecycle, retries, per-attempt timeouts, class fallbacks, middleware.

Shared by the in-memory runtime and the distributed worker, so a node behaves the same everywhere.
It knows nothing of the graph beyond the node it runs.
"""
from __future__ import annotations

import copy
import functools
import logging
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from .cancel import CancelToken, ChildToken
from .errors import CancelledError, NodeTimeoutError, ServiceUnavailable, UnknownNodeError
from .builtins import BUILTINS
from .graph import GraphNode
from .node import BaseNode, NodeContext, NodeResult, is_class_node, to_result

logger = logging.getLogger("flowcraft.execution")

Emit = Optional[Callable[[str, dict], None]]


class RetryLater(Exception):
    """Queue-mode retry: the attempt failed and another one is due after `delay` seconds."""

    def __init__(self, node_id: str, cause: BaseException, delay: float) -> None:
        super().__init__(str(cause))
        self.node_id = node_id
        self.cause = cause
        self.delay = delay


def item_failure(index: int, item_id: str, cause: BaseException) -> BaseException:
    """The error a batch reports for a failing item: the item's own, with its index in the message."""
    message = f"batch item {index} ({item_id!r}) failed: {cause}"
    try:
        return type(cause)(message)
    except Exception:  # an exception class that needs other arguments keeps its own message
        return cause


class FallbackResult:
    """The result of a fallback node that ran in a failed node's place."""

    __slots__ = ("node", "result")

    def __init__(self, node: GraphNode, result: NodeResult) -> None:
        self.node = node
        self.result = result


class NodeFailure(Exception):
    """A node failed for good; `cause` is the last error, `node_id` the node at fault."""

    def __init__(self, node_id: str, cause: BaseException) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.node_id = node_id
        self.cause = cause


def resolve_impl(registry: Mapping[str, Any], node: GraphNode, engine: Any) -> Any:
    """The node's implementation: the registry's, else the built-in bound to `engine`; None if neither."""
    impl = registry.get(node.uses)
    if impl is None and node.uses in BUILTINS:
        impl = functools.partial(BUILTINS[node.uses], engine=engine)
    return impl


_MAX_WRAPPED = 4096


class NodeRunner:
    """Runs a node implementation against a `NodeContext` and returns its `NodeResult`."""

    def __init__(self, middleware: Sequence[Any] = (), emit: Emit = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.middleware = tuple(middleware)
        self.emit = emit
        self.sleep = sleep
        # node, impl -> the middleware chain around them, built once (see `_wrap`)
        self._wrapped: Dict[Tuple[int, int, bool], Tuple[GraphNode, Any, Callable[[NodeContext], Any]]] = {}

    def run_or_fall_back(
        self, node: GraphNode, impl: Any, ctx: NodeContext, fallback: Optional[GraphNode], fallback_impl: Any,
        *, queue_retry: bool = False,
    ) -> Any:
        """Run `node`; if it fails for good and has a fallback node, run that in its place.

        Returns a `NodeResult`, a `FallbackResult`, or a `NodeFailure` (never raises one)."""
        try:
            return self.run(node, impl, ctx, queue_retry=queue_retry)
        except NodeFailure as failure:
            if not node.config.fallback:
                return failure
            return self.fall_back(node, ctx, failure, fallback, fallback_impl)
        except (RetryLater, ServiceUnavailable):
            raise
        except Exception as error:  # middleware, or a bug outside the node's own code
            return NodeFailure(node.id, error)

    def fall_back(
        self, node: GraphNode, ctx: NodeContext, failure: NodeFailure, fallback: Optional[GraphNode], fallback_impl: Any
    ) -> Any:
        """Run `node`'s fallback node in its place; a `FallbackResult`, or a `NodeFailure` (a fatal
        error is never handed to a fallback, as TS's `FatalNodeExecutionError`)."""
        if _fatal(failure.cause):
            return failure
        if fallback is None or fallback_impl is None:
            what = "node" if fallback is None else f"uses {fallback.uses!r} of node"
            return NodeFailure(node.id, UnknownNodeError(
                f"node {node.id!r} failed ({failure}) and its fallback {what} {node.config.fallback!r} is unknown"
            ))
        if self.emit is not None:
            self.emit("node:fallback", {"node_id": node.id, "fallback": fallback.id, "error": str(failure)})
        fallback_ctx = copy.copy(ctx)
        fallback_ctx.node_id, fallback_ctx.params, fallback_ctx.attempt = fallback.id, fallback.params, 1
        fallback_ctx.idempotency_key = f"{ctx.run_id}:{fallback.id}:{ctx.iteration}"
        try:
            return FallbackResult(fallback, self.run(fallback, fallback_impl, fallback_ctx))
        except NodeFailure as second:
            return NodeFailure(node.id, second.cause)
        except Exception as error:
            return NodeFailure(node.id, error)

    def run(self, node: GraphNode, impl: Any, ctx: NodeContext, *, queue_retry: bool = False) -> NodeResult:
        """Run `node` once (with its retries); raise `NodeFailure` when it fails for good.

        With `queue_retry`, only the attempt `ctx.attempt` runs here, and a failure with attempts
        left raises `RetryLater` instead of retrying in this process."""
        if queue_retry:
            return self._run_core(node, impl, ctx, queue_retry=True)
        if not self.middleware:
            config = node.config
            if config.max_retries is None and config.timeout is None and not isinstance(impl, type):
                try:  # the plain function node: one attempt, nothing around it
                    value = impl(ctx)
                except ServiceUnavailable:
                    raise
                except Exception as error:
                    raise NodeFailure(node.id, error) from error
                return value if type(value) is NodeResult else to_result(value)
            return self._run_core(node, impl, ctx)
        call = self._wrap(node, impl)
        try:
            return to_result(call(ctx))
        except (NodeFailure, RetryLater, ServiceUnavailable):
            raise
        except Exception as error:
            raise NodeFailure(node.id, error) from error

    def _wrap(self, node: GraphNode, impl: Any, queue_retry: bool = False) -> Callable[[NodeContext], Any]:
        """The middleware chain around `node`'s `impl`, kept per (node, impl): building it is a
        closure per middleware, a cost every execution of a node would pay again."""
        key = (id(node), id(impl), queue_retry)
        cached = self._wrapped.get(key)
        if cached is not None and cached[0] is node and cached[1] is impl:
            return cached[2]
        call = self._build(node, impl, queue_retry)
        if len(self._wrapped) >= _MAX_WRAPPED:  # batch items and dynamic nodes come and go
            self._wrapped.clear()
        self._wrapped[key] = (node, impl, call)  # holding node and impl: their ids stay theirs
        return call

    def _build(self, node: GraphNode, impl: Any, queue_retry: bool) -> Callable[[NodeContext], Any]:
        def core(ctx: NodeContext) -> NodeResult:
            try:
                if is_class_node(impl):
                    return self._run_class(node, impl, ctx, queue_retry)
                return self._attempts(node, ctx, impl, None, queue_retry)
            except NodeFailure as failure:  # middleware sees the node's own exception
                raise failure.cause from None

        call: Callable[[NodeContext], Any] = core
        for mw in reversed(self.middleware):
            call = _bind_middleware(mw, call)
        return call

    def _run_core(self, node: GraphNode, impl: Any, ctx: NodeContext, queue_retry: bool = False) -> NodeResult:
        if queue_retry and self.middleware:
            try:
                return to_result(self._wrap(node, impl, queue_retry=True)(ctx))
            except (NodeFailure, RetryLater):
                raise
            except Exception as error:
                raise NodeFailure(node.id, error) from error
        if is_class_node(impl):
            return self._run_class(node, impl, ctx, queue_retry)
        return self._attempts(node, ctx, impl, None, queue_retry)

    def _run_class(self, node: GraphNode, impl: type, ctx: NodeContext, queue_retry: bool = False) -> NodeResult:
        instance: BaseNode = impl(params=ctx.params, node_id=node.id)
        try:
            prepared = instance.prep(ctx)
            exec_result = self._attempts(
                node, ctx, lambda attempt_ctx: instance.exec(prepared, attempt_ctx), instance, queue_retry
            )
            return to_result(instance.post(exec_result.output if _wrapped(exec_result) else exec_result, ctx))
        except NodeFailure as failure:
            _recover(instance, failure.cause, ctx)
            raise
        except (RetryLater, ServiceUnavailable):
            raise
        except Exception as error:
            _recover(instance, error, ctx)
            raise NodeFailure(node.id, error) from error

    def _attempts(
        self, node: GraphNode, ctx: NodeContext, call: Callable[[NodeContext], Any], instance: Optional[BaseNode],
        queue_retry: bool = False,
    ) -> Any:
        config = node.config
        attempts = config.attempts
        timeout = config.timeout
        attempt = ctx.attempt if queue_retry else 1
        while True:
            ctx.attempt = attempt
            try:
                value = _call_with_timeout(call, timeout, ctx) if timeout else call(ctx)
                return _Exec(value) if instance is not None else to_result(value)
            except CancelledError as error:
                raise NodeFailure(node.id, error) from error
            except ServiceUnavailable:
                raise  # the infrastructure failed, not the node: the worker backs off, the job comes back
            except Exception as error:
                if attempt >= attempts or _fatal(error) or _run_cancelled(ctx.cancel):
                    return self._after_last_failure(node, ctx, error, instance)
                if queue_retry:
                    raise RetryLater(node.id, error, config.retry_delay or 0) from error
                if self.emit is not None:
                    self.emit("node:retry", {"node_id": node.id, "attempt": attempt, "error": str(error)})
                logger.debug("node %s attempt %d failed: %s", node.id, attempt, error)
                delay = config.retry_delay or 0
                if delay:
                    self.sleep(delay)
                attempt += 1

    def _after_last_failure(self, node: GraphNode, ctx: NodeContext, error: Exception, instance: Optional[BaseNode]) -> Any:
        if instance is not None and instance.has_fallback() and not _fatal(error):
            if self.emit is not None:
                self.emit("node:fallback", {"node_id": node.id, "error": str(error), "fallback": "class"})
            try:
                return _Exec(instance.fallback(error, ctx))
            except Exception as fallback_error:
                raise NodeFailure(node.id, fallback_error) from fallback_error
        raise NodeFailure(node.id, error) from error


def _fatal(error: BaseException) -> bool:
    """A fatal error (`FlowcraftError(fatal=True)`, or any exception with `fatal = True`): no retry, no fallback."""
    return getattr(error, "fatal", False) is True


class _Exec:
    """exec()'s raw value, kept apart from a NodeResult so post() receives what exec returned."""

    __slots__ = ("output",)

    def __init__(self, output: Any) -> None:
        self.output = output


def _wrapped(value: Any) -> bool:
    return type(value) is _Exec


def _recover(instance: BaseNode, error: BaseException, ctx: NodeContext) -> None:
    try:
        instance.recover(error, ctx)
    except Exception:
        logger.exception("recover() of node %s failed", instance.node_id)


def _run_cancelled(token: CancelToken) -> bool:
    return token.parent.cancelled if isinstance(token, _ChildToken) and token.parent is not None else token.cancelled


def _call_with_timeout(call: Callable[[NodeContext], Any], timeout: float, ctx: NodeContext) -> Any:
    """Run one attempt in a helper thread; past `timeout` seconds, set the node's cancel token and fail.

    Python cannot stop a thread, so a timed-out attempt may still be running; node code that checks
    `ctx.cancel` ends early, and its late result is discarded. The next attempt gets a fresh token.
    """
    attempt_ctx = copy.copy(ctx)
    parent = ctx.cancel.parent if isinstance(ctx.cancel, _ChildToken) else ctx.cancel
    attempt_ctx.cancel = _ChildToken(parent)
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = call(attempt_ctx)
        except BaseException as exc:  # handed back to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"flowcraft-node-{ctx.node_id}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        attempt_ctx.cancel.cancel(f"node {ctx.node_id!r} timed out after {timeout:g}s")
        raise NodeTimeoutError(f"node {ctx.node_id!r} timed out after {timeout:g}s (attempt {ctx.attempt})")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _bind_middleware(mw: Any, call_next: Callable[[NodeContext], Any]) -> Callable[[NodeContext], Any]:
    around = getattr(mw, "around", None)
    before = getattr(mw, "before", None)
    after = getattr(mw, "after", None)

    def call(ctx: NodeContext) -> NodeResult:
        if before is not None:
            before(ctx)
        try:
            if around is not None:
                result = to_result(around(ctx, lambda new_ctx=None: to_result(call_next(new_ctx or ctx))))
            else:
                result = to_result(call_next(ctx))
        except Exception as error:  # as TS's afterNode (called in a finally): told of the failure, which stands
            if after is not None:
                after(ctx, NodeResult(error=f"{type(error).__name__}: {error}"))
            raise
        if after is not None:
            replaced = after(ctx, result)
            if replaced is not None:
                result = to_result(replaced)
        return result

    return call


class _ChildToken(ChildToken):
    """A timed-out-able attempt's token: cancelled when the node's is, or on its own."""


__all__ = ["NodeRunner", "NodeFailure", "RetryLater", "FallbackResult", "item_failure", "resolve_impl"]
