"""Telemetry across worker processes (issue 16, SPEC 13): a run started under a span in this process
and executed by `flowcraft worker` processes on Redis (two) and RabbitMQ (one) is one trace holding
one span per node execution; a failed node's span has error status and the exception; and
`flowcraft worker --metrics-port P` answers with the Prometheus metrics of what it ran.

Each worker process records its spans with the SDK's `InMemorySpanExporter` and, when it stops
gracefully (SIGTERM), writes them as JSON to a file named by its pid: the spans the test reads are
the ones the workers' own exporters finished, nothing is reconstructed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, List

import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("prometheus_client")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from flowcraft import FlowRuntime  # noqa: E402
from flowcraft.cli import backends  # noqa: E402
from flowcraft.cli.parser import build_parser  # noqa: E402
from flowcraft.telemetry import OpenTelemetryMiddleware  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SPANS_ENV = "FLOWCRAFT_TEST_SPANS_DIR"
FAN = 6

APP_SOURCE = '''
"""The telemetry app: a fan of slow nodes (so that both workers take some), and a failing node.
Its spans go to an InMemorySpanExporter, written to $%(env)s/<pid>.json when the process exits."""
import atexit
import json
import os
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flowcraft import FlowRuntime, create_flow
from flowcraft.telemetry import OpenTelemetryMiddleware

SPANS_DIR = os.environ["%(env)s"]
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))


@atexit.register
def _dump():
    spans = [json.loads(span.to_json()) for span in exporter.get_finished_spans()]
    path = os.path.join(SPANS_DIR, "%%d.json" %% os.getpid())
    with open(path + ".tmp", "w") as out:
        json.dump(spans, out)
    os.replace(path + ".tmp", path)


with open(os.path.join(SPANS_DIR, "%%d.ready" %% os.getpid()), "w"):
    pass


def start(ctx):
    return 1


def slow(ctx):
    time.sleep(0.3)
    return ctx.input + 1


def join(ctx):
    return sum(ctx.input.values())


def broken(ctx):
    raise ValueError("broken on purpose")


fan = create_flow("fan").node("start", start).node("join", join)
for i in range(%(fan)d):
    fan.node("p%%d" %% i, slow).edge("start", "p%%d" %% i).edge("p%%d" %% i, "join")
failing = create_flow("failing").node("first", start).node("broken", broken, max_retries=2).edge("first", "broken")
runtime = FlowRuntime(blueprints=[fan, failing], middleware=[OpenTelemetryMiddleware(tracer_provider=provider)])
''' % {"env": SPANS_ENV, "fan": FAN}


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory) -> Any:
    path = tmp_path_factory.mktemp("telemetry_app")
    name = f"telemetry_app_{uuid.uuid4().hex[:8]}"
    (path / f"{name}.py").write_text(APP_SOURCE)
    return path, name


@pytest.fixture(params=["redis", "rabbitmq"])
def backend(request) -> Dict[str, Any]:
    """One backend's connection flags (isolated for this test) and how many workers to start."""
    kind = request.param
    redis_url = request.getfixturevalue("redis_url")
    flags = ["--backend", kind, "--redis-url", redis_url, "--prefix", request.getfixturevalue("redis_prefix")]
    if kind == "redis":
        return {"flags": flags + ["--queue", f"otel-{uuid.uuid4().hex[:8]}"], "workers": 2}
    tables = request.getfixturevalue("pg_table_prefix")
    flags += ["--rabbitmq-url", request.getfixturevalue("amqp_url"), "--queue", request.getfixturevalue("amqp_queue_name"),
              "--postgres-url", request.getfixturevalue("postgres_dsn"),
              "--context-table", f"{tables}contexts", "--status-table", f"{tables}statuses"]
    return {"flags": flags, "workers": 1}


class Workers:
    """`flowcraft worker` processes of the app, and their spans once they stopped."""

    def __init__(self, app_dir: Any, flags: List[str], spans_dir: Path) -> None:
        path, name = app_dir
        self.app, self.flags, self.spans_dir, self.cwd = f"{name}:runtime", flags, spans_dir, str(path)
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(path), str(ROOT), str(ROOT / "adapters"), os.environ.get("PYTHONPATH")])),
            **{SPANS_ENV: str(spans_dir)})
        self.procs: List[subprocess.Popen] = []

    def start(self, count: int, *extra: str) -> None:
        for _ in range(count):
            command = [sys.executable, "-m", "flowcraft", "worker", "--batch", "1", *extra, *self.flags, "--app", self.app]
            self.procs.append(subprocess.Popen(command, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 60
        while not all((self.spans_dir / f"{p.pid}.ready").exists() for p in self.procs):  # each imported the app
            assert time.monotonic() < deadline, "the workers did not start"
            assert all(p.poll() is None for p in self.procs), [p.communicate() for p in self.procs]
            time.sleep(0.05)

    def stop(self) -> Dict[int, List[Dict[str, Any]]]:
        """SIGTERM every worker (a graceful stop: exit 0, atexit writes the spans); spans by pid."""
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
        out = {}
        for proc in self.procs:
            out[proc.pid] = json.loads((self.spans_dir / f"{proc.pid}.json").read_text())
        self.procs = []
        return out

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture
def workers(app_dir, backend, tmp_path) -> Any:
    spans_dir = tmp_path / "spans"
    spans_dir.mkdir()
    running = Workers(app_dir, backend["flags"], spans_dir)
    yield running
    running.kill()


def client_adapter(flags: List[str], app_module: Any, provider: Any) -> Any:
    """This process's adapter on the backend: a client whose runtime has the app's blueprints and
    an OpenTelemetry middleware (its `traceparent()` gives the run the current span's context)."""
    args = build_parser().parse_args(["worker", *flags, "--app", "unused:runtime"])
    runtime = FlowRuntime(blueprints=list(app_module.runtime.blueprints.values()),
                          middleware=[OpenTelemetryMiddleware(tracer_provider=provider)])
    return backends.open_adapter(args, runtime)


def _hex(value: str) -> int:
    return int(value, 16)


def test_a_run_over_worker_processes_is_one_trace_with_a_span_per_node(app_dir, backend, workers, monkeypatch):
    path, name = app_dir
    monkeypatch.syspath_prepend(str(path))
    monkeypatch.setenv(SPANS_ENV, str(workers.spans_dir))
    import importlib

    app_module = importlib.import_module(name)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    adapter = client_adapter(backend["flags"], app_module, provider)
    try:
        workers.start(backend["workers"])
        with provider.get_tracer("test").start_as_current_span("client request") as root:
            fan_run = adapter.start_workflow("fan")
            failing_run = adapter.start_workflow("failing")
        assert adapter.wait_for_result(fan_run, timeout=60).context["_outputs.join"] == FAN * 2
        assert adapter.wait_for_result(failing_run, timeout=60).status == "failed"
    finally:
        backends.close_adapter(adapter)
    by_pid = workers.stop()
    spans = [span for pid_spans in by_pid.values() for span in pid_spans]
    root_context = root.get_span_context()

    fan_spans = [s for s in spans if s["attributes"]["flowcraft.run_id"] == fan_run]
    assert sorted(s["attributes"]["flowcraft.node_id"] for s in fan_spans) == sorted(
        ["start", "join", *(f"p{i}" for i in range(FAN))])  # one span per node execution
    if backend["workers"] == 2:  # both processes executed some of the run's nodes
        assert all(any(s["attributes"]["flowcraft.run_id"] == fan_run for s in pid_spans) for pid_spans in by_pid.values())
    for span in fan_spans:  # one trace: the client's, every node span a child of its current span
        assert _hex(span["context"]["trace_id"]) == root_context.trace_id
        assert _hex(span["parent_id"]) == root_context.span_id
        node = span["attributes"]["flowcraft.node_id"]
        assert span["name"] == f"flowcraft.node {node}"
        assert span["attributes"] == {"flowcraft.run_id": fan_run, "flowcraft.blueprint_id": "fan",
                                      "flowcraft.node_id": node, "flowcraft.iteration": 0, "flowcraft.attempt": 1}
        assert span["status"]["status_code"] == "UNSET"

    failing_spans = {s["attributes"]["flowcraft.node_id"]: s for s in spans
                     if s["attributes"]["flowcraft.run_id"] == failing_run}
    assert sorted(failing_spans) == ["broken", "first"]
    assert {_hex(s["context"]["trace_id"]) for s in failing_spans.values()} == {root_context.trace_id}
    broken = failing_spans["broken"]
    assert broken["status"]["status_code"] == "ERROR"
    assert "ValueError: broken on purpose" in broken["status"]["description"]
    assert broken["attributes"]["flowcraft.attempt"] == 2
    [exception] = [e for e in broken["events"] if e["name"] == "exception"]
    assert exception["attributes"]["exception.type"] == "ValueError"
    assert exception["attributes"]["exception.message"] == "broken on purpose"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_worker_metrics_port_answers_with_the_metrics_of_its_run(app_dir, backend, workers, monkeypatch):
    path, name = app_dir
    monkeypatch.syspath_prepend(str(path))
    monkeypatch.setenv(SPANS_ENV, str(workers.spans_dir))
    import importlib

    app_module = importlib.import_module(name)
    port = _free_port()
    adapter = client_adapter(backend["flags"], app_module, TracerProvider())
    try:
        workers.start(1, "--metrics-port", str(port))
        run_id = adapter.start_workflow("fan")
        assert adapter.wait_for_result(run_id, timeout=60).status == "completed"
    finally:
        backends.close_adapter(adapter)
    deadline = time.monotonic() + 30
    while True:  # the worker counts the run right after its last commit, which the client may see first
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if "flowcraft_runs_finished_total{" in page or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    workers.stop()
    assert 'flowcraft_node_executions_total{blueprint="fan",node="p0",status="completed"} 1.0' in page
    assert 'flowcraft_node_duration_seconds_count{blueprint="fan",node="join"} 1.0' in page
    assert 'flowcraft_runs_finished_total{blueprint="fan",status="completed"} 1.0' in page
    assert "flowcraft_commit_conflicts_total " in page
    assert "flowcraft_jobs_dead_lettered_total 0.0" in page
    queue = backend["flags"][backend["flags"].index("--queue") + 1]
    assert f'flowcraft_queue_depth{{queue="{queue}"}} 0.0' in page
