"""Run deadlines on each real backend (SPEC 14, issue 19): a run with a 1 s deadline whose node
takes 5 s fails at about 1 s with `DeadlineExceeded` naming that node, failed by the delayed
deadline job through a run commit (history: `run:deadline`, `workflow:finish`); the node, left to
finish in its worker process, starts no successor and changes nothing of the failed run.

Workers are real processes (`flowcraft worker`, or a stock `rq worker --with-scheduler`), two per
backend so that one is free for the deadline job while the other runs the slow node; this process
is the client.
"""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from test_conformance_backends import FACTORIES, ROOT  # the backends as the conformance kit builds them

pytestmark = pytest.mark.integration

APP = '''
import time

from flowcraft import FlowRuntime, create_flow


def slow(ctx):
    time.sleep(5)
    return "late"


runtime = FlowRuntime()
runtime.add_blueprint(create_flow("dl-slow").node("a", lambda ctx: 1).node("slow", slow)
                      .node("after", lambda ctx: "ran").edge("a", "slow").edge("slow", "after"))
'''
# RQ's scheduled registry has one-second resolution (a delayed job is due at the next whole second)
# and its scheduler looks once a second: its deadline job runs up to 2 s late
UPPER = {"redis": 3.0, "rabbitmq": 3.0, "rq": 4.0}


def _env(app_dir: Path, **extra: str) -> Dict[str, str]:
    paths = [str(app_dir), ROOT, os.path.join(ROOT, "adapters"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), **extra)


def _workers(backend: str, factory: Any, app_dir: Path) -> List[subprocess.Popen]:
    if backend == "rq":
        from test_rq_adapter import FLOWCRAFT_WORKER, RQ_CLI

        command = [RQ_CLI, "worker", "--url", factory.url, "-w", FLOWCRAFT_WORKER, "--serializer",
                   "rq.serializers.JSONSerializer", "--with-scheduler", factory.queue_name]
        env = _env(app_dir, FLOWCRAFT_APP="dlapp:runtime")
        return [subprocess.Popen(command + ["--name", f"{factory.queue_name}-{i}"], cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
    command = [sys.executable, "-m", "flowcraft", "worker", "--backend", backend, "--app", "dlapp:runtime"]
    if backend == "redis":
        command += ["--redis-url", factory.url, "--prefix", factory.prefix, "--queue", factory.queue_name]
    else:
        options = factory.options
        command += ["--rabbitmq-url", options["amqp_url"], "--postgres-url", options["postgres_dsn"],
                    "--queue", options["queue_name"], "--context-table", options["context_table_name"],
                    "--status-table", options["status_table_name"]]
    return [subprocess.Popen(command, cwd=ROOT, env=_env(app_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in range(2)]


def _stop(workers: List[subprocess.Popen]) -> str:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    errors = []
    for worker in workers:
        try:
            _, err = worker.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            _, err = worker.communicate()
        errors.append(err.decode(errors="replace"))
    return "\n".join(errors)


@pytest.mark.parametrize("backend", sorted(FACTORIES))
def test_a_run_past_its_deadline_fails_on_time_and_its_running_node_starts_nothing(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    (tmp_path / "dlapp.py").write_text(APP)
    sys.path.insert(0, str(tmp_path))
    try:
        runtime = importlib.import_module("dlapp").runtime  # the workers' blueprint, digest included
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("dlapp", None)
    factory = FACTORIES[backend](request)
    client = factory.make_adapter(runtime)
    workers = _workers(backend, factory, tmp_path)
    try:
        warm = client.start_workflow("dl-slow", deadline=0.5)  # the workers are up once this one failed
        client.wait_for_result(warm, timeout=60)
        time.sleep(5)  # and the slow node it started is done
        began = time.monotonic()
        run_id = client.start_workflow("dl-slow", deadline=1)
        result = client.wait_for_result(run_id, timeout=30)
        elapsed = time.monotonic() - began
        assert result.status == "failed", result.to_dict()
        assert [(e.node_id, e.type) for e in result.errors] == [(None, "DeadlineExceeded")]
        assert "still running: ['slow']" in result.errors[0].message
        print(f"{backend}: the run failed {elapsed:.2f}s after it started")
        assert 0.9 <= elapsed <= UPPER[backend], elapsed
        time.sleep(max(0.0, 7.0 - (time.monotonic() - began)))  # the slow node has returned by now
        record = client.store.get_record(run_id)
        assert record.status == "failed" and len(record.errors) == 1
        history = client.get_history(run_id)
        finished = [e.payload["node_id"] for e in history if e.type == "node:finish"]
        assert finished == ["a"], finished  # slow's commit was refused, so `after` never ran
        assert [e.type for e in history][-2:] == ["run:deadline", "workflow:finish"]
        assert history[-2].payload["running"] == ["slow"]
    finally:
        errors = _stop(workers)
        factory.close()
    assert "Traceback" not in errors, errors[-3000:]
