"""The dashboard (SPEC section 12) at the WSGI level, on the in-memory fakes: the JSON API and its
actions, read-only 403, Basic auth 401, CSRF and Origin checks, escaping, /metrics, the layout."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from flowcraft.dashboard import create_app
from flowcraft.dashboard.layout import layered_layout
from flowcraft.dashboard.pages import script_json
from flowcraft.testing import InMemoryAdapter
from tests.dashboard_scenarios import (XSS_ERROR, XSS_NODE, XSS_OUTPUT, XSS_RUN_ID, Payments, call, get_json, post_api,
                                       runtime)


@pytest.fixture
def payments() -> Payments:
    return Payments()


@pytest.fixture
def adapter(payments: Payments) -> InMemoryAdapter:
    return InMemoryAdapter(runtime(payments))


def _started(adapter: InMemoryAdapter, blueprint: str, **kwargs: Any) -> str:
    run_id = adapter.start_workflow(blueprint, {}, **kwargs)
    adapter.drain()
    return run_id


# --- the JSON API ---------------------------------------------------------------------------------


def test_run_list_filters_and_pages(adapter: InMemoryAdapter) -> None:
    app = create_app(adapter)
    approvals = [_started(adapter, "approval") for _ in range(3)]
    failed = _started(adapter, "pay")
    everything = get_json(app, "/api/runs")["runs"]
    assert {r["run_id"] for r in everything} == set(approvals) | {failed}
    assert [r["run_id"] for r in get_json(app, "/api/runs", query={"status": "failed"})["runs"]] == [failed]
    assert {r["run_id"] for r in get_json(app, "/api/runs", query={"blueprint": "approval"})["runs"]} == set(approvals)
    newest = max(r["updated_at"] for r in everything)
    assert get_json(app, "/api/runs", query={"since": newest + 1})["runs"] == []
    assert len(get_json(app, "/api/runs", query={"until": newest})["runs"]) == 4
    first = get_json(app, "/api/runs", query={"limit": 3})
    assert len(first["runs"]) == 3 and first["next_cursor"]
    second = get_json(app, "/api/runs", query={"limit": 3, "cursor": first["next_cursor"]})
    assert len(second["runs"]) == 1 and second["next_cursor"] is None
    assert {r["run_id"] for r in first["runs"] + second["runs"]} == set(approvals) | {failed}
    for bad in ({"status": "nope"}, {"limit": "0"}, {"since": "yesterday"}, {"cursor": "garbage!"}):
        status, _, body = call(app, "GET", "/api/runs", query=bad)
        assert status == 400, (bad, body)
        assert "error" in json.loads(body)


def test_run_detail_states_history_and_resume_choices(adapter: InMemoryAdapter) -> None:
    app = create_app(adapter)
    run_id = _started(adapter, "approval")
    info = get_json(app, f"/api/runs/{run_id}")
    assert info["status"] == "awaiting"
    assert info["drawn_states"] == {"prepare": "completed", "review": "awaiting"}
    assert info["resume_choices"] == {"review": ["approve", "reject"]}
    assert ["prepare", "review"] in info["taken_edges"]
    assert "svg" not in info  # the page draws it; the API serves the data
    live = get_json(app, f"/api/runs/{run_id}", query={"view": "live"})  # what the page polls
    assert live == {"run_id": run_id, "status": "awaiting", "version": info["version"],
                    "drawn_states": info["drawn_states"]}
    assert call(app, "GET", "/api/runs/nope", query={"view": "live"})[0] == 404
    history = get_json(app, f"/api/runs/{run_id}/history")
    assert [e["type"] for e in history][:2] == ["workflow:start", "node:finish"]
    assert call(app, "GET", "/api/runs/nope")[0] == 404
    assert call(app, "GET", "/api/runs/nope/history")[0] == 404


def test_a_run_id_ending_in_history_is_that_run_not_another_runs_history(adapter: InMemoryAdapter) -> None:
    app = create_app(adapter)
    short = _started(adapter, "approval", run_id="batch")
    long = _started(adapter, "loop", run_id="batch/history")  # its URL: /api/runs/batch%2Fhistory, decoded

    def node_ids(history: Any) -> set:
        return {e["payload"].get("node_id") for e in history} - {None}

    assert get_json(app, "/api/runs/batch/history")["run_id"] == long
    assert node_ids(get_json(app, "/api/runs/batch/history", query={"view": "history"})) == {"tick", "check", "again", "done"}
    assert node_ids(get_json(app, f"/api/runs/{short}", query={"view": "history"})) == {"prepare", "review"}
    assert call(app, "GET", "/api/runs/nope", query={"view": "history"})[0] == 404


def test_resume_from_the_api_and_a_refused_action(adapter: InMemoryAdapter) -> None:
    app = create_app(adapter)
    run_id = _started(adapter, "approval")
    status, body = post_api(app, f"/api/runs/{run_id}/resume", {"action": "sideways", "node": "review"})
    assert status == 409 and "sideways" in body["error"]
    assert adapter.get_status(run_id).status == "awaiting"  # type: ignore[union-attr]
    status, body = post_api(app, f"/api/runs/{run_id}/resume", {"action": "approve", "node": "review"})
    assert status == 200 and body["enqueued"] == ["ship"]
    adapter.drain()
    info = get_json(app, f"/api/runs/{run_id}")
    assert info["status"] == "completed"
    assert info["drawn_states"]["ship"] == "completed" and info["drawn_states"]["refund"] == "skipped"


def test_retry_restart_skip_cancel_from_the_api(adapter: InMemoryAdapter, payments: Payments) -> None:
    app = create_app(adapter)
    run_id = _started(adapter, "pay")
    info = get_json(app, f"/api/runs/{run_id}")
    assert info["drawn_states"]["charge"] == "failed"
    assert "payment service unavailable" in info["errors"][0]["message"]
    assert "Traceback" in info["errors"][0]["traceback"]
    payments.down = False
    assert post_api(app, f"/api/runs/{run_id}/retry")[0] == 200
    adapter.drain()
    assert adapter.get_status(run_id).status == "completed"  # type: ignore[union-attr]
    calls = payments.calls
    assert post_api(app, f"/api/runs/{run_id}/restart", {"node": "charge"}) == (
        200, {"run_id": run_id, "action": "restart", "enqueued": ["charge"]})
    adapter.drain()
    assert payments.calls == calls + 1 and adapter.get_status(run_id).status == "completed"  # type: ignore[union-attr]
    assert post_api(app, f"/api/runs/{run_id}/restart", {})[0] == 409  # which node?

    payments.down = True
    other = _started(adapter, "pay")
    assert post_api(app, f"/api/runs/{other}/skip", {"node": "charge", "output": {"charged": "by hand"}})[0] == 200
    adapter.drain()
    assert adapter.get_status(other).status == "completed"  # type: ignore[union-attr]
    assert adapter.store.read_all_context(other)["_outputs.charge"] == {"charged": "by hand"}

    waiting = _started(adapter, "approval")
    assert post_api(app, f"/api/runs/{waiting}/cancel")[0] == 200
    assert adapter.get_status(waiting).status == "cancelled"  # type: ignore[union-attr]
    assert post_api(app, "/api/runs/unknown-run/cancel")[0] == 404


def test_dead_letter_requeued_from_the_api(adapter: InMemoryAdapter) -> None:
    app = create_app(adapter)
    adapter.queue.push_raw(b'{"runId": "ghost", "blueprintId": "nope", "nodeId": "x"}')
    adapter.drain()
    letters = get_json(app, "/api/dead-letters")
    assert len(letters) == 1 and "nope" in letters[0]["reason"]
    assert get_json(app, "/api/overview")["dead_letters"]["count"] == 1
    assert post_api(app, f"/api/dead-letters/{letters[0]['id']}/requeue")[0] == 200
    assert adapter.queue.depth() == 1
    assert post_api(app, "/api/dead-letters/999/requeue")[0] == 404


def test_overview_counts_queue_and_workers(adapter: InMemoryAdapter) -> None:
    app = create_app(adapter)
    _started(adapter, "approval")
    _started(adapter, "pay")
    adapter.start_workflow("approval", {})  # not worked yet: its job waits in the queue
    data = get_json(app, "/api/overview")
    assert data["runs"]["awaiting"] == {"count": 1, "more": False}
    assert data["runs"]["failed"] == {"count": 1, "more": False}
    assert data["runs"]["running"] == {"count": 1, "more": False}
    assert data["queues"] == [{"name": "in-memory", "depth": 1}]
    assert [w["id"] for w in data["workers"]] == ["MainThread"]  # the thread that drained
    status, _, page = call(app, "GET", "/")
    assert status == 200 and b"MainThread" in page and b"Live workers" in page


def test_pages_render(adapter: InMemoryAdapter) -> None:
    app = create_app(adapter)
    run_id = _started(adapter, "loop")
    for path in ("/", "/runs", "/blueprints", "/blueprints/loop", f"/runs/{run_id}", "/dead-letters",
                 "/static/app.css", "/static/app.js"):
        status, headers, body = call(app, "GET", path)
        assert status == 200, path
        assert "default-src 'self'" in headers["Content-Security-Policy"]
    _, _, page = call(app, "GET", f"/runs/{run_id}")
    assert page.count(b'class="node ') == 4 and b"st-completed" in page
    assert b'class="edge back' in page  # the loop's continue edge
    assert b"kind-loop" in page
    assert call(app, "GET", "/runs/nope")[0] == 404
    assert call(app, "GET", "/blueprints/nope")[0] == 404
    assert call(app, "GET", "/nowhere")[0] == 404
    assert call(app, "DELETE", "/runs")[0] == 405


def test_form_action_redirects_back_with_a_message(adapter: InMemoryAdapter) -> None:
    app = create_app(adapter)
    run_id = _started(adapter, "approval")
    status, headers, _ = call(app, "POST", f"/runs/{run_id}/resume",
                              form={"csrf": app.csrf_token, "node": "review", "action": "reject"})
    assert status == 303 and headers["Location"].startswith(f"/runs/{run_id}?ok=")
    adapter.drain()
    assert adapter.store.read_all_context(run_id)["_outputs.refund"] == "refunded"
    status, headers, _ = call(app, "POST", f"/runs/{run_id}/retry", form={"csrf": app.csrf_token})
    assert status == 303 and "?err=" in headers["Location"]  # a completed run cannot be retried


# --- safety ---------------------------------------------------------------------------------------

ACTIONS = ("resume", "cancel", "retry", "restart", "skip")


def test_read_only_refuses_every_action(adapter: InMemoryAdapter) -> None:
    app = create_app(adapter, read_only=True)
    run_id = _started(adapter, "approval")
    for action in ACTIONS:
        assert post_api(app, f"/api/runs/{run_id}/{action}", {"node": "review", "action": "approve"})[0] == 403
        assert call(app, "POST", f"/runs/{run_id}/{action}", form={"csrf": app.csrf_token})[0] == 403
    assert post_api(app, "/api/dead-letters/1/requeue")[0] == 403
    assert adapter.get_status(run_id).status == "awaiting"  # type: ignore[union-attr]
    status, _, page = call(app, "GET", f"/runs/{run_id}")
    assert status == 200 and b"<form method=\"post\"" not in page and b"read-only" in page


def test_basic_auth_on_every_request(adapter: InMemoryAdapter) -> None:
    app = create_app(adapter, auth="admin:s3cret")
    for path in ("/", "/runs", "/api/runs", "/static/app.css", "/metrics"):
        status, headers, _ = call(app, "GET", path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
        assert call(app, "GET", path, auth=("admin", "wrong"))[0] == 401
        assert call(app, "GET", path, auth=("admin", "s3cret"))[0] == 200
    assert call(app, "GET", "/", headers={"Authorization": "Basic !!!notbase64"})[0] == 401
    assert call(app, "GET", "/", headers={"Authorization": "Bearer xyz"})[0] == 401
    pair = create_app(adapter, auth=("ops", "pw:with:colons"))
    assert call(pair, "GET", "/", auth=("ops", "pw:with:colons"))[0] == 200
    with pytest.raises(ValueError):
        create_app(adapter, auth="no-colon")


def test_csrf_token_and_origin_are_checked_on_every_post(adapter: InMemoryAdapter) -> None:
    app = create_app(adapter)
    run_id = _started(adapter, "approval")
    path = f"/api/runs/{run_id}/cancel"
    assert call(app, "POST", path, json_body={})[0] == 403  # no token
    assert call(app, "POST", path, json_body={}, headers={"X-CSRF-Token": "guess"})[0] == 403
    assert call(app, "POST", f"/runs/{run_id}/cancel", form={"csrf": "guess"})[0] == 403
    token = {"X-CSRF-Token": app.csrf_token}
    for origin in ("http://evil.test", "null", "http://dash.test:8080"):
        assert call(app, "POST", path, json_body={}, headers={**token, "Origin": origin})[0] == 403, origin
    assert call(app, "POST", path, json_body={}, headers={**token, "Referer": "http://evil.test/x"})[0] == 403
    assert adapter.get_status(run_id).status == "awaiting"  # type: ignore[union-attr]
    assert create_app(adapter).csrf_token != app.csrf_token  # a secret per app
    assert get_json(app, "/api/csrf")["token"] == app.csrf_token
    status, _ = post_api(app, path, headers={"Origin": "http://dash.test:80"})
    assert status == 200 and adapter.get_status(run_id).status == "cancelled"  # type: ignore[union-attr]


def test_every_user_controlled_string_is_escaped(adapter: InMemoryAdapter) -> None:
    app = create_app(adapter)
    run_id = _started(adapter, "xss", run_id=XSS_RUN_ID)
    status, _, raw = call(app, "GET", f"/runs/{run_id}")
    assert status == 200
    page = raw.decode()
    for payload in (XSS_NODE, XSS_OUTPUT, XSS_ERROR, XSS_RUN_ID, "<script>window", "<img", "<svg onload"):
        assert payload not in page, payload
    assert "&lt;img src=x onerror=window.__xss=4&gt; broke" in page  # the error, shown as text
    assert "n&quot;&gt;&lt;script&gt;" in page  # the node id
    config = page.split('<script type="application/json" id="run-config">', 1)[1].split("</script>", 1)[0]
    assert json.loads(config)["api"] == "/api/runs/run-%3C%2Fscript%3E%3Csvg%20onload%3Dwindow.__xss%3D5%3E"
    for path in ("/", "/runs", "/blueprints/xss"):
        body = call(app, "GET", path)[2].decode()
        assert "<script>window" not in body and "<svg onload" not in body and "<img src=x" not in body
    status, headers, _ = call(app, "GET", "/runs/x", query={"err": "<script>alert(1)</script>"})
    body = call(app, "GET", "/runs", query={"err": "<script>alert(1)</script>"})[2].decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body and "<script>alert(1)" not in body


def test_json_in_a_page_cannot_close_its_script() -> None:
    text = script_json({"x": "</script><script>alert(1)</script>", "y": "&\u2028"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"x": "</script><script>alert(1)</script>", "y": "&\u2028"}


# --- /metrics -------------------------------------------------------------------------------------


def test_metrics_served_from_the_given_metrics(adapter: InMemoryAdapter) -> None:
    from flowcraft.telemetry import PrometheusMetrics

    metrics = PrometheusMetrics()
    metrics.watch(adapter)
    adapter.start_workflow("approval", {})
    status, headers, body = call(create_app(adapter, metrics=metrics), "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b'flowcraft_queue_depth{queue="in-memory"} 1.0' in body
    status, _, body = call(create_app(adapter, metrics=metrics.registry), "GET", "/metrics")
    assert status == 200 and b"flowcraft_queue_depth" in body


def test_metrics_without_prometheus_client_is_a_clear_404(adapter: InMemoryAdapter, monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    status, _, body = call(create_app(adapter), "GET", "/metrics")
    assert status == 404 and b"prometheus_client is not installed" in body


def test_the_core_and_the_dashboard_never_import_prometheus_or_each_other() -> None:
    code = ("import sys, flowcraft, flowcraft.distributed, flowcraft.cli, flowcraft.testing\n"
            "assert 'flowcraft.dashboard' not in sys.modules, 'core imported the dashboard'\n"
            "import flowcraft.dashboard\n"
            "assert 'prometheus_client' not in sys.modules, 'prometheus imported at import time'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- layout ---------------------------------------------------------------------------------------


def _overlaps(layout: Any, width: float) -> bool:
    rows: dict = {}
    for node, layer in layout.layer.items():
        rows.setdefault(layer, []).append(layout.x[node])
    return any(b - a < width for xs in rows.values() for a, b in zip(sorted(xs), sorted(xs)[1:]))


def test_layout_layers_follow_edges_and_nodes_never_overlap() -> None:
    nodes = ["s"] + [f"w{i}" for i in range(20)] + ["t", "loop"]
    edges = [("s", f"w{i}") for i in range(20)] + [(f"w{i}", "t") for i in range(20)] + [("t", "loop"), ("loop", "s")]
    layout = layered_layout(nodes, edges, {("loop", "s")}, node_width=100)
    assert layout.layer["s"] == 0 and layout.layer["t"] == 2 and layout.layer["loop"] == 3
    assert all(layout.layer[s] < layout.layer[t] for s, t in edges if (s, t) != ("loop", "s"))
    assert not _overlaps(layout, 100)
    assert layout.back == {("loop", "s")}
    cyclic = layered_layout(["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "a")])  # no back edge named
    assert len(cyclic.back) == 1 and len(set(cyclic.layer.values())) == 3


def test_layout_of_a_long_chain_keeps_it_straight() -> None:
    nodes = [f"n{i}" for i in range(1000)]
    layout = layered_layout(nodes, list(zip(nodes, nodes[1:])))
    assert len({layout.x[n] for n in nodes}) == 1 and layout.layer["n999"] == 999


def test_live_workers_of_the_fakes(adapter: InMemoryAdapter) -> None:
    assert adapter.live_workers() == []
    _started(adapter, "approval")
    assert [w.id for w in adapter.live_workers() or []] == ["MainThread"]
    adapter.queue.live_window = -1.0
    assert adapter.live_workers() == []


def test_cli_dashboard_refuses_bad_auth(capsys: Any) -> None:
    from flowcraft.cli import main

    assert main(["dashboard", "--app", "tests.dashboard_scenarios:runtime", "--auth", "nocolon"]) == 2
    assert capsys.readouterr().err.strip() == "flowcraft: error: --auth must be USER:PASSWORD (both not empty)"
