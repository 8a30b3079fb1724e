"""`examples/rq_worker.py` and `examples/rq_client.py` run as their docstrings say, on a real Redis.

Each test starts the worker (the example script, or RQ's own ``rq worker`` with
``FLOWCRAFT_APP=examples.rq_worker:runtime``) and the client as subprocesses, on a queue name and
key prefix of its own (``FLOWCRAFT_QUEUE``, ``FLOWCRAFT_PREFIX``), checks the client's printed
result against an in-memory run of the same flow, and stops the worker with SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from typing import Any, Dict, Iterator, List

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

pytestmark = pytest.mark.integration

from test_rq_adapter import RQ_CLI, delete_rq_queue  # noqa: E402

from examples import rq_worker  # noqa: E402


@pytest.fixture
def example_env(redis_client: Any, redis_prefix: str, redis_url: str) -> Iterator[Dict[str, str]]:
    queue = f"fcrqx-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, REDIS_URL=redis_url, FLOWCRAFT_QUEUE=queue, FLOWCRAFT_PREFIX=redis_prefix,
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               FLOWCRAFT_APP="examples.rq_worker:runtime")
    yield env
    delete_rq_queue(redis_client, queue)


def expected(order_id: str) -> Any:
    return rq_worker.flow.run(initial_context={"orderId": order_id}, wait_timers=True)


def run_client(env: Dict[str, str], *args: str) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "examples/rq_client.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started" in proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stop(worker: subprocess.Popen) -> str:
    worker.send_signal(signal.SIGTERM)
    try:
        output, _ = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    return output


def start_worker(command: List[str], env: Dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def check(result: Dict[str, Any], order_id: str) -> None:
    memory = expected(order_id)
    assert memory.status == "completed", memory.errors
    assert result["status"] == "completed", result
    assert result["context"] == memory.context
    assert result["context"]["notify"].startswith("mailed ")


@pytest.mark.slow
def test_example_worker_serves_both_example_clients(example_env: Dict[str, str]) -> None:
    worker = start_worker([sys.executable, "examples/rq_worker.py"], example_env)
    try:
        check(run_client(example_env, "A-1002"), "A-1002")
        check(run_client(example_env, "--seed-client", "A-1001"), "A-1001")
    finally:
        output = stop(worker)
    assert worker.returncode == 0, output[-3000:]
    assert "is running" in output and "worker stopped" in output
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.slow
def test_stock_rq_worker_runs_the_example_app(example_env: Dict[str, str]) -> None:
    command = [RQ_CLI, "worker", "--url", example_env["REDIS_URL"], "-w", "flowcraft_redis.rq_worker.FlowcraftWorker",
               "--serializer", "rq.serializers.JSONSerializer", "--with-scheduler",
               "--name", f"{example_env['FLOWCRAFT_QUEUE']}-worker", example_env["FLOWCRAFT_QUEUE"]]
    worker = start_worker(command, example_env)
    try:
        check(run_client(example_env, "A-1001"), "A-1001")
    finally:
        output = stop(worker)
    assert worker.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
