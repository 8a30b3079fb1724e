"""Telemetry: print each node's OpenTelemetry span with the SDK's console exporter, then the
Prometheus metrics page of the same run.

    pip install -e '.[otel,prometheus]' opentelemetry-sdk
    python examples/telemetry.py
"""
from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from flowcraft import FlowRuntime, WorkflowResult, create_flow
from flowcraft.telemetry import OpenTelemetryMiddleware, PrometheusMetrics


def fetch(ctx):
    return {"id": 42, "total": 30}


def bill(ctx):
    return f"billed {ctx.input['total']}"


def main() -> WorkflowResult:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    metrics = PrometheusMetrics()
    runtime = FlowRuntime(middleware=[OpenTelemetryMiddleware(tracer_provider=provider), metrics])
    flow = create_flow("telemetry-demo").node("fetch", fetch).node("bill", bill).edge("fetch", "bill")
    result = flow.run(runtime=runtime)
    print(result.status)
    print(metrics.render().decode())  # what `flowcraft worker --metrics-port P` serves
    return result


if __name__ == "__main__":
    main()
