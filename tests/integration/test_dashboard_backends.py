"""The dashboard at the WSGI level on real backends: the JSON API and its actions on Redis, and
the overview (queue depth, live workers) on Redis, RQ and RabbitMQ + PostgreSQL."""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import pytest

from flowcraft.dashboard import create_app

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.dashboard_scenarios import Payments, call, get_json, post_api, runtime  # noqa: E402
from tests.integration import test_operations_backends as backends  # noqa: E402

# the backends' adapter fixtures, shared with the operations tests
_drain = backends._drain
redis_make, rq_make, rabbit_make = backends.redis_make, backends.rq_make, backends.rabbit_make

pytestmark = pytest.mark.integration


def test_redis_api_actions_and_pages(redis_make: Any) -> None:
    payments = Payments()
    adapter = redis_make(runtime(payments))
    app = create_app(adapter)
    waiting = adapter.start_workflow("approval", {})
    failed = adapter.start_workflow("pay", {})
    _drain(adapter)
    listed = get_json(app, "/api/runs")["runs"]
    assert {r["run_id"]: r["status"] for r in listed} == {waiting: "awaiting", failed: "failed"}
    assert [r["run_id"] for r in get_json(app, "/api/runs", query={"status": "failed"})["runs"]] == [failed]
    page = get_json(app, "/api/runs", query={"limit": 1})
    assert len(page["runs"]) == 1 and page["next_cursor"]
    info = get_json(app, f"/api/runs/{waiting}")
    assert info["drawn_states"] == {"prepare": "completed", "review": "awaiting"}
    assert info["resume_choices"] == {"review": ["approve", "reject"]}
    assert post_api(app, f"/api/runs/{waiting}/resume", {"action": "approve", "node": "review"})[0] == 200
    payments.down = False
    assert post_api(app, f"/api/runs/{failed}/retry")[0] == 200
    _drain(adapter)
    assert get_json(app, f"/api/runs/{waiting}")["status"] == "completed"
    assert get_json(app, f"/api/runs/{failed}")["drawn_states"] == {"load": "completed", "charge": "completed",
                                                                   "ship": "completed"}
    history = get_json(app, f"/api/runs/{failed}/history")
    assert "run:retry" in [e["type"] for e in history]
    for path in ("/", "/runs", f"/runs/{failed}", "/blueprints/pay", "/dead-letters"):
        assert call(app, "GET", path)[0] == 200, path


def test_redis_overview_lists_the_live_worker(redis_make: Any) -> None:
    adapter = redis_make(runtime())
    app = create_app(adapter)
    adapter.start_workflow("approval", {})
    assert get_json(app, "/api/overview")["queues"][0]["depth"] == 1
    adapter.start()
    try:
        deadline = time.monotonic() + 10
        while not get_json(app, "/api/overview")["workers"] and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = get_json(app, "/api/overview")["workers"]
        assert [w["id"] for w in workers] == [adapter.queue.worker_id]
    finally:
        adapter.stop(timeout=5)


def test_rq_overview(rq_make: Any) -> None:
    adapter = rq_make(runtime())
    adapter.start_workflow("approval", {})
    data = get_json(create_app(adapter), "/api/overview")
    assert data["queues"][0]["depth"] == 1 and data["runs"]["running"]["count"] == 1
    assert data["workers"] == []  # no `rq worker` listens on this queue


def test_rabbitmq_overview_counts_consumers(rabbit_make: Any) -> None:
    adapter = rabbit_make(runtime())
    app = create_app(adapter)
    run_id = adapter.start_workflow("approval", {})
    assert get_json(app, "/api/overview")["workers"] == []
    adapter.start()
    try:
        deadline = time.monotonic() + 10
        while adapter.get_status(run_id).status != "awaiting" and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = get_json(app, "/api/overview")["workers"]
        assert [w["id"] for w in workers] == ["consumer 1"]
        assert get_json(app, f"/api/runs/{run_id}")["drawn_states"]["review"] == "awaiting"
    finally:
        adapter.stop(timeout=5)
