"""Telemetry: OpenTelemetry spans and Prometheus metrics for node executions (SPEC section 13).

Both are optional: `pip install 'flowcraft[otel]'` (opentelemetry-api) and
`pip install 'flowcraft[prometheus]'` (prometheus-client). `import flowcraft` never imports this
module, and this module imports those libraries only when one of its classes is instantiated.

- `OpenTelemetryMiddleware(tracer_provider=None)`: a middleware giving one span per node execution,
  `flowcraft.node <node_id>`, with the run, blueprint, node, iteration and (last) attempt as
  attributes, and error status plus the recorded exception when the node fails. Its
  `traceparent()` hook gives a new run the trace context current when it starts (a new trace when
  none is); distributed, the core carries that string in every job of the run (`traceparent`), and
  each node span is parented on it, so a run is one trace across all the workers it touched.
- `PrometheusMetrics(registry=None)`: a middleware counting node executions and their durations, and
  (through the light middleware hooks, no event bus needed) finished runs and dead-lettered jobs;
  `watch(adapter)` adds the adapter's version conflicts and its queue's depth, read on scrape.
"""
from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .events import Event
from .node import NodeContext, NodeResult

logger = logging.getLogger("flowcraft.telemetry")

_TRACER_NAME = "flowcraft"
_MAX_PARENTS = 4096  # parsed trace contexts kept (one per run in flight is enough)


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"flowcraft.telemetry needs {module!r}: install it with pip install 'flowcraft[{extra}]'"
        ) from error


def format_traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    """A W3C `traceparent` header value (version 00)."""
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


class OpenTelemetryMiddleware:
    """One OpenTelemetry span per node execution (retries included: `flowcraft.attempt` is the last),
    parented on the run's trace context (`ctx.traceparent`) when it has one."""

    def __init__(self, tracer_provider: Any = None) -> None:
        trace = _require("opentelemetry.trace", "otel")
        context = _require("opentelemetry.context", "otel")
        tracecontext = _require("opentelemetry.trace.propagation.tracecontext", "otel")
        self._trace = trace
        self._attach, self._detach = context.attach, context.detach
        self._set_span = trace.set_span_in_context
        self._propagator = tracecontext.TraceContextTextMapPropagator()
        self._error = trace.StatusCode.ERROR
        self._status = trace.Status
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self._tracer = provider.get_tracer(_TRACER_NAME)
        self._parents: Dict[str, Any] = {}

    # --- the run's trace context ----------------------------------------------------------------

    def traceparent(self) -> str:
        """The trace context a run starting now belongs to: the current span's, or a new trace's
        (then the node spans' parent is that id, which no exported span has)."""
        span_context = self._trace.get_current_span().get_span_context()
        if span_context.is_valid:
            return format_traceparent(span_context.trace_id, span_context.span_id, bool(span_context.trace_flags & 1))
        random = int.from_bytes(os.urandom(24), "big")
        return format_traceparent(random >> 64 or 1, random & ((1 << 64) - 1) or 1)

    def _parent(self, traceparent: str) -> Any:
        parent = self._parents.get(traceparent)
        if parent is None:
            if len(self._parents) >= _MAX_PARENTS:
                self._parents.clear()
            parent = self._parents[traceparent] = self._propagator.extract({"traceparent": traceparent})
        return parent

    # --- middleware -----------------------------------------------------------------------------

    def around(self, ctx: NodeContext, call_next: Callable[..., NodeResult]) -> NodeResult:
        traceparent = ctx.traceparent
        span = self._tracer.start_span(
            "flowcraft.node " + ctx.node_id,
            context=self._parent(traceparent) if traceparent else None,
            attributes={
                "flowcraft.run_id": ctx.run_id,
                "flowcraft.blueprint_id": ctx.blueprint_id,
                "flowcraft.node_id": ctx.node_id,
                "flowcraft.iteration": ctx.iteration,
                "flowcraft.attempt": ctx.attempt,
            },
        )
        token = self._attach(self._set_span(span))  # the node's own spans (and subflows) nest in it
        try:
            result = call_next()
        except BaseException as error:
            span.set_attribute("flowcraft.attempt", ctx.attempt)
            span.record_exception(error)
            span.set_status(self._status(self._error, f"{type(error).__name__}: {error}"))
            raise
        finally:
            self._detach(token)
            if ctx.attempt != 1:
                span.set_attribute("flowcraft.attempt", ctx.attempt)
            span.end()
        return result


class PrometheusMetrics:
    """Prometheus metrics of node executions, runs, version conflicts and queue depths.

    Hand it to a runtime as middleware (`FlowRuntime(middleware=[m])`): node executions and
    durations come from `around`, finished runs and dead-lettered jobs from the middleware hooks
    (`run_finished`, `job_dead_lettered`), so no event bus is needed. It still accepts events
    (`emit`), and ignores them: counted by the hooks, they would be counted twice."""

    def __init__(self, registry: Any = None) -> None:
        prometheus = _require("prometheus_client", "prometheus")
        self._prometheus = prometheus
        self.registry = registry if registry is not None else prometheus.CollectorRegistry()
        core = _require("prometheus_client.core", "prometheus")
        # node executions and durations: counted here under one lock, turned into the counter and
        # histogram families on scrape (prometheus_client's own labelled metrics cost a few locks
        # and a loop over the buckets per observation: several times a whole in-memory node)
        self.nodes = _NodeStats(core)
        self.registry.register(self.nodes)
        self.runs_finished = prometheus.Counter(
            "flowcraft_runs_finished", "Runs that finished, by blueprint and status.",
            ["blueprint", "status"], registry=self.registry,
        )
        self.jobs_dead_lettered = prometheus.Counter(
            "flowcraft_jobs_dead_lettered", "Jobs sent to a dead-letter queue.", registry=self.registry,
        )
        self._watched: List[Tuple[Any, str]] = []  # (adapter, queue label)
        self.registry.register(_AdapterCollector(core, self._watched))
        self._run_children: Dict[Tuple[str, str], Any] = {}  # labelled children, looked up once

    # --- middleware -----------------------------------------------------------------------------

    def around(self, ctx: NodeContext, call_next: Callable[..., NodeResult]) -> NodeResult:
        started = time.perf_counter()
        try:
            result = call_next()
        except BaseException:
            self.nodes.observe(ctx.blueprint_id, ctx.node_id, 1, time.perf_counter() - started)
            raise
        self.nodes.observe(ctx.blueprint_id, ctx.node_id, 0, time.perf_counter() - started)
        return result

    # --- middleware hooks -----------------------------------------------------------------------

    def run_finished(self, run_id: str, blueprint_id: Optional[str], status: str) -> None:
        key = (blueprint_id or "", status)
        child = self._run_children.get(key)
        if child is None:
            child = self._run_children[key] = self.runs_finished.labels(*key)
        child.inc()

    def job_dead_lettered(self, run_id: Optional[str], blueprint_id: Optional[str], node_id: Optional[str],
                          reason: str) -> None:
        self.jobs_dead_lettered.inc()

    def emit(self, event: Event) -> None:
        """An event bus that counts nothing: the hooks count (see the class)."""

    # --- adapters -------------------------------------------------------------------------------

    def watch(self, adapter: Any, queue: Optional[str] = None) -> None:
        """Report `adapter`'s version conflicts (`flowcraft_commit_conflicts_total`) and the depth of
        its queue (`flowcraft_queue_depth{queue}`, when the queue has a `depth()`), read on scrape.
        `queue` labels the depth (default: the queue's `queue_name`)."""
        label = queue or str(getattr(adapter.queue, "queue_name", None) or type(adapter.queue).__name__)
        self._watched.append((adapter, label))

    # --- exposition -----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The metrics page in the Prometheus text format."""
        return bytes(self._prometheus.generate_latest(self.registry))

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve the metrics page over HTTP on `port` in a background thread; returns the server
        (`.shutdown()` stops it)."""
        served = self._prometheus.start_http_server(port, addr=addr, registry=self.registry)
        return served[0] if isinstance(served, tuple) else served


_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)  # prometheus_client's default


class _NodeStats:
    """Node executions by (blueprint, node, status) and their duration histogram by (blueprint,
    node), kept as plain numbers under one lock and exposed as metric families on scrape."""

    def __init__(self, core: Any) -> None:
        self._core = core
        self._lock = threading.Lock()
        # (blueprint, node) -> [completed, failed, sum of seconds, count per bucket..., count over the last]
        self._stats: Dict[Tuple[str, str], List[float]] = {}

    def observe(self, blueprint: str, node: str, failed: int, seconds: float) -> None:
        key = (blueprint, node)
        bucket = 3 + bisect.bisect_left(_BUCKETS, seconds)
        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                stats = self._stats[key] = [0.0] * (4 + len(_BUCKETS))
            stats[failed] += 1
            stats[2] += seconds
            stats[bucket] += 1

    def describe(self) -> List[Any]:
        return [self._core.CounterMetricFamily("flowcraft_node_executions", ""),
                self._core.HistogramMetricFamily("flowcraft_node_duration_seconds", "")]

    def collect(self) -> Any:
        with self._lock:
            stats = {key: list(values) for key, values in self._stats.items()}
        executions = self._core.CounterMetricFamily(
            "flowcraft_node_executions", "Node executions, by blueprint, node and final status.",
            labels=["blueprint", "node", "status"])
        durations = self._core.HistogramMetricFamily(
            "flowcraft_node_duration_seconds", "Duration of a node execution (all its attempts).",
            labels=["blueprint", "node"])
        for (blueprint, node), values in stats.items():
            for index, status in ((0, "completed"), (1, "failed")):
                if values[index]:
                    executions.add_metric([blueprint, node, status], values[index])
            cumulative, buckets = 0.0, []
            for bound, count in zip((*(repr(b) for b in _BUCKETS), "+Inf"), values[3:]):
                cumulative += count
                buckets.append((bound, cumulative))
            durations.add_metric([blueprint, node], buckets, values[2])
        yield executions
        yield durations


class _AdapterCollector:
    """Conflicts and queue depths of the watched adapters, read when the registry is scraped."""

    def __init__(self, core: Any, watched: List[Tuple[Any, str]]) -> None:
        self._core = core
        self._watched = watched

    def describe(self) -> List[Any]:
        return [self._core.CounterMetricFamily("flowcraft_commit_conflicts", ""),
                self._core.GaugeMetricFamily("flowcraft_queue_depth", "", labels=["queue"])]

    def collect(self) -> Any:
        conflicts = self._core.CounterMetricFamily(
            "flowcraft_commit_conflicts", "Commits that found the run's version changed and were derived again.")
        conflicts.add_metric([], float(sum(int(getattr(adapter, "conflicts", 0)) for adapter, _ in self._watched)))
        yield conflicts
        depth = self._core.GaugeMetricFamily("flowcraft_queue_depth", "Jobs waiting in a queue.", labels=["queue"])
        for adapter, label in self._watched:
            read = getattr(adapter.queue, "depth", None)
            if read is None:
                continue
            try:
                depth.add_metric([label], float(read()))
            except Exception as error:  # a service down must not break the metrics page
                logger.warning("queue depth of %s unavailable: %s", label, error)
        yield depth


__all__ = ["OpenTelemetryMiddleware", "PrometheusMetrics", "format_traceparent"]
