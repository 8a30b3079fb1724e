"""The backend examples run as a user runs them: `examples/<backend>_client.py` and
`examples/<backend>_worker.py` as separate processes on the real services.

Each test gives the scripts their own names through the environment (`FLOWCRAFT_QUEUE`,
`FLOWCRAFT_PREFIX`, `FLOWCRAFT_TABLE_PREFIX`: the conftest fixtures' names, removed afterwards), and
checks the result the client printed against the in-memory run of the same blueprint (SPEC 5).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.workflows import BLUEPRINT_ID, make_runtime  # noqa: E402

pytestmark = pytest.mark.integration

TIMEOUT = 60


@pytest.fixture(params=["redis", "rabbitmq"])
def backend(request: Any) -> Dict[str, str]:
    """The backend's name and the environment that isolates its scripts (only the services it needs)."""
    if request.param == "redis":
        env = {"REDIS_URL": request.getfixturevalue("redis_url"),
               "FLOWCRAFT_PREFIX": request.getfixturevalue("redis_prefix"),
               "FLOWCRAFT_QUEUE": f"fcq-{uuid.uuid4().hex[:8]}"}  # under the prefix: deleted with it
    else:
        env = {"RABBITMQ_URL": request.getfixturevalue("amqp_url"),
               "POSTGRES_URL": request.getfixturevalue("postgres_dsn"),
               "REDIS_URL": request.getfixturevalue("redis_url"),
               "FLOWCRAFT_QUEUE": request.getfixturevalue("amqp_queue_name"),
               "FLOWCRAFT_TABLE_PREFIX": request.getfixturevalue("pg_table_prefix"),
               "FLOWCRAFT_PREFIX": request.getfixturevalue("redis_prefix")}
    return {"name": request.param, **env}


@pytest.fixture
def processes() -> Iterator[List[subprocess.Popen]]:
    """Every script started by the test; whatever is still running at the end is killed."""
    started: List[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def script(backend: Dict[str, str], role: str, *args: str, processes: List[subprocess.Popen]) -> subprocess.Popen:
    """Start `examples/<backend>_<role>.py ARGS` as a user would, from another directory."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{k: v for k, v in backend.items() if k != "name"})
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / f"{backend['name']}_{role}.py"), *args],
                            cwd=str(ROOT.parent), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    processes.append(proc)
    return proc


def wait_started(client: subprocess.Popen) -> str:
    """The run id the client announces on stderr once the run's start jobs are enqueued."""
    seen = []
    for line in client.stderr:
        if line.startswith("started run "):
            return line.split()[2]
        seen.append(line)
    raise AssertionError(f"the client exited ({client.wait()}) before starting a run: {''.join(seen)}")


def printed_result(client: subprocess.Popen) -> Dict[str, Any]:
    out, err = client.communicate(timeout=TIMEOUT)
    assert client.returncode == 0, err
    return json.loads(out)


def assert_same_as_in_memory(printed: Dict[str, Any], order_id: str) -> None:
    expected = make_runtime().run(BLUEPRINT_ID, {"orderId": order_id})
    assert expected.status == "completed", expected.errors
    assert printed["status"] == "completed", printed["errors"]
    assert printed["context"] == expected.context
    assert sorted(printed["skipped"]) == sorted(expected.skipped)
    assert printed["errors"] == []


def test_client_then_burst_worker(backend: Dict[str, str], processes: List[subprocess.Popen]) -> None:
    """The client enqueues and waits; a worker started afterwards with --burst runs the whole
    run (fan-out, join, approve branch, conditional edge) and exits once the queue is empty."""
    client = script(backend, "client", "--order", "A-1001", processes=processes)
    run_id = wait_started(client)
    jobs = 0
    for _ in range(5):  # a burst worker may see the queue empty between two jobs: start another
        worker = script(backend, "worker", "--burst", processes=processes)
        _, log = worker.communicate(timeout=TIMEOUT)
        assert worker.returncode == 0, log
        assert "stopped after" in log, log
        jobs += int(log.split("stopped after ")[1].split()[0])
        if client.poll() is not None:
            break
    printed = printed_result(client)
    assert printed["run_id"] == run_id
    assert_same_as_in_memory(printed, "A-1001")
    assert printed["context"]["send_confirmation"] == "A-1001: charged 150.00 (pay-A-1001)"
    assert printed["context"]["award_points"] == {"customer": "ada", "points": 15}
    assert jobs == 8  # one job per node that ran: the skipped branch (cancel_order) costs none


def test_worker_serves_clients_and_stops_on_sigterm(backend: Dict[str, str], processes: List[subprocess.Popen]) -> None:
    """A long-running worker serves two clients at once (one starting its run the seed's way, by
    hand), then SIGTERM stops it gracefully: exit status 0."""
    worker = script(backend, "worker", processes=processes)
    rejected = script(backend, "client", "--order", "A-1002", "--seed-protocol", processes=processes)
    small = script(backend, "client", "--order", "A-1003", processes=processes)
    printed = {"A-1002": printed_result(rejected), "A-1003": printed_result(small)}
    for order_id, result in printed.items():
        assert_same_as_in_memory(result, order_id)
    assert printed["A-1002"]["context"]["send_confirmation"] == "A-1002: cancelled (out of stock: sofa; risk score 70)"
    assert sorted(printed["A-1003"]["skipped"]) == ["award_points", "cancel_order"]  # 25.50 < 100: no points
    assert worker.poll() is None, worker.communicate()[1]
    worker.send_signal(signal.SIGTERM)
    _, log = worker.communicate(timeout=TIMEOUT)
    assert worker.returncode == 0, log
    assert "stopped" in log.splitlines()[-1], log

