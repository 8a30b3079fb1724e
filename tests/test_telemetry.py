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
    assert sample(registry, "flowcraft_node_duration_seconds_bucket", blueprint="order", node="fetch", le="+Inf") == 2
    assert sample(registry, "flowcraft_node_duration_seconds_bucket", blueprint="order", node="ship", le="10.0") == 1
    assert 0 < sample(registry, "flowcraft_node_duration_seconds_sum", blueprint="order", node="fetch") < 10
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


# --- the run's trace context (traceparent) ------------------------------------------------------


def parent_ids(spans: Any) -> set:
    return {span.parent.span_id if span.parent is not None else None for span in spans}


def test_in_memory_a_run_is_one_trace_under_the_current_span():
    provider, exporter = tracing()
    runtime = FlowRuntime(middleware=[OpenTelemetryMiddleware(tracer_provider=provider)])
    with provider.get_tracer("test").start_as_current_span("caller") as caller:
        assert order_flow(fail_times=0).run(runtime=runtime, concurrency=2).status == "completed"
    nodes = [s for s in exporter.get_finished_spans() if s.name.startswith("flowcraft.node")]
    assert len(nodes) == 3
    assert {s.context.trace_id for s in nodes} == {caller.get_span_context().trace_id}
    assert parent_ids(nodes) == {caller.get_span_context().span_id}


def test_in_memory_without_a_current_span_each_run_is_its_own_trace():
    provider, exporter = tracing()
    runtime = FlowRuntime(middleware=[OpenTelemetryMiddleware(tracer_provider=provider)])
    for _ in range(2):
        assert order_flow(fail_times=0).run(runtime=runtime).status == "completed"
    traces: Dict[int, int] = {}
    for span in exporter.get_finished_spans():
        traces[span.context.trace_id] = traces.get(span.context.trace_id, 0) + 1
    assert sorted(traces.values()) == [3, 3]


def traced_flow() -> Any:
    """A batch (item jobs), a sleep (a timer job) and a wait (a resume job) in one run."""
    return (create_flow("traced").node("items", lambda ctx: [1, 2, 3])
            .batch("double", lambda ctx: ctx.input * 2, input_key="_outputs.items", output_key="doubled")
            .sleep("nap", duration=0.01).wait("approve").node("done", lambda ctx: "done")
            .edge("items", "double").edge("double", "nap").edge("nap", "approve").edge("approve", "done"))


def test_distributed_every_job_carries_the_traceparent_and_every_span_joins_the_trace():
    provider, exporter = tracing()
    runtime = FlowRuntime(middleware=[OpenTelemetryMiddleware(tracer_provider=provider)])
    runtime.add_blueprint(traced_flow())
    adapter = InMemoryAdapter(runtime)
    seen: list = []
    enqueue = adapter.queue.enqueue

    def spy(jobs: Any, delay: float = 0.0) -> None:
        seen.extend(jobs)
        enqueue(jobs, delay)

    adapter.queue.enqueue = spy  # type: ignore[method-assign]
    with provider.get_tracer("test").start_as_current_span("client") as client:
        run_id = adapter.start_workflow("traced")
    expected = OpenTelemetryMiddleware(tracer_provider=provider)
    context = client.get_span_context()
    traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
    assert adapter.store.get_record(run_id).traceparent == traceparent
    adapter.start()  # a worker thread (the sleep's timer job is delayed)
    try:
        assert adapter.wait_for_result(run_id, timeout=10).status == "awaiting"
        adapter.resume_with_action(run_id, None, "ok")
        assert adapter.wait_for_result(run_id, timeout=10).status == "completed"
    finally:
        adapter.stop(timeout=5)
    assert {job.kind for job in seen} >= {"node", "item", "timer"}  # the resume job is committed, not enqueued
    assert {job.extra.get("traceparent") for job in seen} == {traceparent}
    assert expected.traceparent() != traceparent  # outside the span, a new run would get a new trace
    nodes = [s for s in exporter.get_finished_spans() if s.name.startswith("flowcraft.node")]
    assert {s.attributes["flowcraft.node_id"] for s in nodes} >= {"items", "done"}
    assert {s.context.trace_id for s in nodes} == {context.trace_id}
    assert parent_ids(nodes) == {context.span_id}


def test_reconciled_jobs_take_the_traceparent_from_the_record():
    runtime = FlowRuntime(middleware=[OpenTelemetryMiddleware(tracer_provider=tracing()[0])])
    runtime.add_blueprint(order_flow(fail_times=0))
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow("order", traceparent="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")
    adapter.queue.fetch(10, timeout=0)  # the start job is lost (taken, never acknowledged)
    seen: list = []
    adapter.queue.enqueue = lambda jobs, delay=0.0: seen.extend(jobs)  # type: ignore[method-assign]
    assert adapter.reconcile(run_id) == {"fetch"}
    assert [job.extra["traceparent"] for job in seen] == ["00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"]


def test_without_a_telemetry_middleware_jobs_carry_no_traceparent():
    runtime = FlowRuntime()
    runtime.add_blueprint(order_flow(fail_times=0))
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow("order")
    assert adapter.store.get_record(run_id).traceparent is None
    [delivery] = adapter.queue.fetch(1, timeout=0)
    assert "traceparent" not in delivery.job.extra


# --- metrics without an event bus, conflicts, queue depth ---------------------------------------


def test_prometheus_as_middleware_only_counts_runs_in_memory_and_distributed():
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    runtime = FlowRuntime(middleware=[metrics])
    assert runtime.event_bus is None
    assert order_flow(fail_times=0).run(runtime=runtime).status == "completed"
    adapter = InMemoryAdapter(FlowRuntime(middleware=[metrics], blueprints=[order_flow(fail_times=5, attempts=1)]))
    run_id = adapter.start_workflow("order")
    adapter.queue.push_raw(b"{not json")
    adapter.work(burst=True)
    assert adapter.wait_for_result(run_id, timeout=5).status == "failed"
    assert sample(registry, "flowcraft_runs_finished_total", blueprint="order", status="completed") == 1
    assert sample(registry, "flowcraft_runs_finished_total", blueprint="order", status="failed") == 1
    assert sample(registry, "flowcraft_jobs_dead_lettered_total") == 1
    assert sample(registry, "flowcraft_node_executions_total", blueprint="order", node="fetch", status="completed") == 2


def test_watch_reports_conflicts_and_queue_depth_on_scrape():
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    runtime = FlowRuntime(middleware=[metrics], blueprints=[order_flow(fail_times=0)])
    adapter = InMemoryAdapter(runtime)
    metrics.watch(adapter, queue="jobs")
    assert sample(registry, "flowcraft_queue_depth", queue="jobs") == 0
    adapter.start_workflow("order")
    adapter.start_workflow("order")
    assert sample(registry, "flowcraft_queue_depth", queue="jobs") == 2
    assert sample(registry, "flowcraft_commit_conflicts_total") == 0
    adapter.conflicts += 3  # as the worker counts a commit that lost a version race
    assert sample(registry, "flowcraft_commit_conflicts_total") == 3
    adapter.work(burst=True)
    assert sample(registry, "flowcraft_queue_depth", queue="jobs") == 0


def test_worker_metrics_port_of_each_supervised_child():
    from flowcraft.cli.worker import with_port

    argv = ["worker", "--app", "m:a", "--metrics-port", "9100", "--burst"]
    assert with_port(argv, 9101) == ["worker", "--app", "m:a", "--burst", "--metrics-port", "9101"]
    assert with_port(["worker", "--metrics-port=9100"], 9102) == ["worker", "--metrics-port", "9102"]


@pytest.mark.parametrize("distributed", [False, True])
def test_a_subflow_child_run_is_in_the_parent_trace_under_the_subflow_node_span(distributed):
    provider, exporter = tracing()
    child = create_flow("child").node("inner", lambda ctx: 7)
    parent = create_flow("parent").node("before", lambda ctx: 1).subflow("sub", "child").edge("before", "sub")
    runtime = FlowRuntime(middleware=[OpenTelemetryMiddleware(tracer_provider=provider)], blueprints=[child, parent])
    runtime.registry.update(child.registry)
    runtime.registry.update(parent.registry)
    with provider.get_tracer("test").start_as_current_span("caller") as caller:
        if distributed:
            adapter = InMemoryAdapter(runtime)
            run_id = adapter.start_workflow("parent")
        else:
            assert runtime.run("parent").status == "completed"
    if distributed:
        adapter.work(burst=True)
        assert adapter.wait_for_result(run_id, timeout=5).status == "completed"
    nodes = [s for s in exporter.get_finished_spans() if s.name.startswith("flowcraft.node")]
    by_node: Dict[str, list] = {}
    for span in nodes:
        by_node.setdefault(span.attributes["flowcraft.node_id"], []).append(span)
    assert sorted(by_node) == ["before", "inner", "sub"]
    assert {span.context.trace_id for span in nodes} == {caller.get_span_context().trace_id}
    assert [s.parent.span_id for s in by_node["before"]] == [caller.get_span_context().span_id]
    [inner] = by_node["inner"]
    assert inner.parent.span_id in {s.context.span_id for s in by_node["sub"]}  # the execution that started it
