"""Telemetry: OpenTelemetry spans and Prometheus metrics for node executions (SPEC section 13).

Both are optional: `pip install 'flowcraft[otel]'` (opentelemetry-api) and
`pip install 'flowcraft[prometheus]'` (prometheus-client). `import flowcraft` never imports this
module, and this module imports those libraries only when one of its classes is instantiated.

- `OpenTelemetryMiddleware(tracer_provider=None)`: a middleware giving one span per node execution,
  `flowcraft.node <node_id>`, with the run, blueprint, node, iteration and (last) attempt as
  attributes, and error status plus the recorded exception when the node fails.
- `PrometheusMetrics(registry=None)`: both a middleware (node executions and durations) and an event
  bus (finished runs, dead-lettered jobs); hand it to a runtime as `middleware=[m]` and
  `event_bus=m`.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from .events import Event
from .node import NodeContext, NodeResult

_TRACER_NAME = "flowcraft"


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"flowcraft.telemetry needs {module!r}: install it with pip install 'flowcraft[{extra}]'"
        ) from error


class OpenTelemetryMiddleware:
    """One OpenTelemetry span per node execution (retries included: `flowcraft.attempt` is the last)."""

    def __init__(self, tracer_provider: Any = None) -> None:
        trace = _require("opentelemetry.trace", "otel")
        self._trace = trace
        if tracer_provider is None:
            self._tracer = trace.get_tracer(_TRACER_NAME)
        else:
            self._tracer = tracer_provider.get_tracer(_TRACER_NAME)

    def around(self, ctx: NodeContext, call_next: Callable[..., NodeResult]) -> NodeResult:
        trace = self._trace
        attributes = {
            "flowcraft.run_id": ctx.run_id,
            "flowcraft.blueprint_id": ctx.blueprint_id,
            "flowcraft.node_id": ctx.node_id,
            "flowcraft.iteration": ctx.iteration,
            "flowcraft.attempt": ctx.attempt,
        }
        with self._tracer.start_as_current_span(
            f"flowcraft.node {ctx.node_id}", attributes=attributes,
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                result = call_next()
            except BaseException as error:
                span.set_attribute("flowcraft.attempt", ctx.attempt)
                span.record_exception(error)
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
                raise
            span.set_attribute("flowcraft.attempt", ctx.attempt)
            return result


class PrometheusMetrics:
    """Prometheus metrics of node executions and runs; a middleware and an event bus in one."""

    def __init__(self, registry: Any = None) -> None:
        prometheus = _require("prometheus_client", "prometheus")
        self._prometheus = prometheus
        self.registry = registry if registry is not None else prometheus.CollectorRegistry()
        self.node_executions = prometheus.Counter(
            "flowcraft_node_executions", "Node executions, by blueprint, node and final status.",
            ["blueprint", "node", "status"], registry=self.registry,
        )
        self.node_duration = prometheus.Histogram(
            "flowcraft_node_duration_seconds", "Duration of a node execution (all its attempts).",
            ["blueprint", "node"], registry=self.registry,
        )
        self.runs_finished = prometheus.Counter(
            "flowcraft_runs_finished", "Runs that finished, by blueprint and status.",
            ["blueprint", "status"], registry=self.registry,
        )
        self.jobs_dead_lettered = prometheus.Counter(
            "flowcraft_jobs_dead_lettered", "Jobs sent to a dead-letter queue.", registry=self.registry,
        )

    # --- middleware -----------------------------------------------------------------------------

    def around(self, ctx: NodeContext, call_next: Callable[..., NodeResult]) -> NodeResult:
        started = time.perf_counter()
        status = "failed"
        try:
            result = call_next()
            status = "completed"
            return result
        finally:
            blueprint = ctx.blueprint_id
            self.node_duration.labels(blueprint, ctx.node_id).observe(time.perf_counter() - started)
            self.node_executions.labels(blueprint, ctx.node_id, status).inc()

    # --- event bus ------------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        payload = event.payload
        if event.type == "workflow:finish":
            self.runs_finished.labels(str(payload.get("blueprint_id") or ""), str(payload.get("status"))).inc()
        elif event.type == "job:failed" and payload.get("dead_lettered"):
            self.jobs_dead_lettered.inc()

    # --- exposition -----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The metrics page in the Prometheus text format."""
        return bytes(self._prometheus.generate_latest(self.registry))

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve the metrics page over HTTP on `port` in a background thread; returns the server."""
        return self._prometheus.start_http_server(port, addr=addr, registry=self.registry)


__all__ = ["OpenTelemetryMiddleware", "PrometheusMetrics"]
