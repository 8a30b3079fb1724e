"""Telemetry (issue 16, SPEC 13): OpenTelemetry node spans and Prometheus metrics, in memory and on
the distributed fakes. Needs the `otel`/`prometheus` extras and opentelemetry-sdk (the `test` extra)."""
from __future__ import annotations

import subprocess
import sys
from typing import Any, Dict

import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("prometheus_client")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import StatusCode  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from flowcraft import FlowRuntime, create_flow  # noqa: E402
from flowcraft.telemetry import OpenTelemetryMiddleware, PrometheusMetrics  # noqa: E402
from flowcraft.testing import InMemoryAdapter  # noqa: E402


def tracing() -> Any:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def order_flow(fail_times: int, attempts: int = 3) -> Any:
    calls: Dict[str, int] = {"flaky": 0}

    def fetch(ctx: Any) -> Any:
        return 2

    def flaky(ctx: Any) -> Any:
        calls["flaky"] += 1
        if calls["flaky"] <= fail_times:
            raise ValueError(f"boom {calls['flaky']}")
        return ctx.input * 10

    def ship(ctx: Any) -> Any:
        return "shipped"

    return (create_flow("order").node("fetch", fetch).node("flaky", flaky, max_retries=attempts)
            .node("ship", ship).edge("fetch", "flaky").edge("flaky", "ship"))


def spans_by_node(exporter: InMemorySpanExporter) -> Dict[str, Any]:
    return {span.attributes["flowcraft.node_id"]: span for span in exporter.get_finished_spans()}


def test_in_memory_one_span_per_node_with_the_attributes_and_the_last_attempt():
    provider, exporter = tracing()
    runtime = FlowRuntime(middleware=[OpenTelemetryMiddleware(tracer_provider=provider)])
    result = order_flow(fail_times=1).run(runtime=runtime, run_id="run-1")
    assert result.status == "completed"
    spans = spans_by_node(exporter)
    assert sorted(spans) == ["fetch", "flaky", "ship"]
    assert len(exporter.get_finished_spans()) == 3
    flaky = spans["flaky"]
    assert flaky.name == "flowcraft.node flaky"
    assert dict(flaky.attributes) == {"flowcraft.run_id": "run-1", "flowcraft.blueprint_id": "order",
                                      "flowcraft.node_id": "flaky", "flowcraft.iteration": 0,
                                      "flowcraft.attempt": 2}
    assert flaky.status.status_code == StatusCode.UNSET
    assert spans["fetch"].attributes["flowcraft.attempt"] == 1


def test_a_failed_node_span_has_error_status_and_the_exception():
    provider, exporter = tracing()
    runtime = FlowRuntime(middleware=[OpenTelemetryMiddleware(tracer_provider=provider)])
    result = order_flow(fail_times=5, attempts=2).run(runtime=runtime)
    assert result.status == "failed"
    spans = spans_by_node(exporter)
    assert sorted(spans) == ["fetch", "flaky"]
    flaky = spans["flaky"]
    assert flaky.status.status_code == StatusCode.ERROR
    assert "ValueError: boom 2" in flaky.status.description
    assert flaky.attributes["flowcraft.attempt"] == 2
    [exception] = [e for e in flaky.events if e.name == "exception"]
    assert exception.attributes["exception.type"] == "ValueError"
    assert exception.attributes["exception.message"] == "boom 2"


def test_on_the_distributed_fakes_each_node_execution_has_a_span():
    provider, exporter = tracing()
    flow = order_flow(fail_times=0)
    runtime = FlowRuntime(middleware=[OpenTelemetryMiddleware(tracer_provider=provider)])
    runtime.add_blueprint(flow)
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow("order")
    adapter.work(burst=True)
    assert adapter.wait_for_result(run_id, timeout=5).status == "completed"
    spans = spans_by_node(exporter)
    assert sorted(spans) == ["fetch", "flaky", "ship"]
    assert {s.attributes["flowcraft.run_id"] for s in spans.values()} == {run_id}


def sample(registry: CollectorRegistry, name: str, **labels: str) -> Any:
    return registry.get_sample_value(name, labels)


def test_prometheus_metrics_after_known_runs():
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    runtime = FlowRuntime(middleware=[metrics], event_bus=metrics)
    assert order_flow(fail_times=1).run(runtime=runtime).status == "completed"
    assert order_flow(fail_times=5, attempts=2).run(runtime=runtime).status == "failed"
    total = "flowcraft_node_executions_total"
    assert sample(registry, total, blueprint="order", node="fetch", status="completed") == 2
    assert sample(registry, total, blueprint="order", node="flaky", status="completed") == 1
    assert sample(registry, total, blueprint="order", node="flaky", status="failed") == 1
    assert sample(registry, total, blueprint="order", node="ship", status="completed") == 1
    assert sample(registry, total, blueprint="order", node="ship", status="failed") is None
    assert sample(registry, "flowcraft_node_duration_seconds_count", blueprint="order", node="fetch") == 2
    assert sample(registry, "flowcraft_runs_finished_total", blueprint="order", status="completed") == 1
    assert sample(registry, "flowcraft_runs_finished_total", blueprint="order", status="failed") == 1
    assert sample(registry, "flowcraft_jobs_dead_lettered_total") == 0
    page = metrics.render().decode()
    assert 'flowcraft_runs_finished_total{blueprint="order",status="completed"} 1.0' in page


def test_a_dead_lettered_job_is_counted():
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    runtime = FlowRuntime(middleware=[metrics], event_bus=metrics)
    runtime.add_blueprint(order_flow(fail_times=0))
    adapter = InMemoryAdapter(runtime)
    adapter.queue.push_raw(b"{not json")
    adapter.work(burst=True)
    assert sample(registry, "flowcraft_jobs_dead_lettered_total") == 1


def test_import_flowcraft_imports_no_telemetry():
    code = ("import sys, flowcraft, flowcraft.testing, flowcraft.distributed; "
            "bad = [m for m in sys.modules if m.startswith(('opentelemetry', 'prometheus_client', "
            "'flowcraft.telemetry'))]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_missing_library_gives_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)
    with pytest.raises(ImportError, match=r"flowcraft\[otel\]"):
        OpenTelemetryMiddleware()
