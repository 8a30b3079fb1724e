"""The `webhook` built-in and the `flowcraft.webhooks` WSGI handler.

Mirrors Flowcraft TS packages/core/src/nodes/webhook.ts (the node exposes `{url, event}` for a
caller, from `adapter.registerWebhookEndpoint(runId, nodeId)`) and the HITL resume of
test/runtime/hitl.test.ts (a paused node is resumed with an output that drives its edges); TS
leaves the HTTP handler to the user, so the handler's answers are ours (module doc)."""
import json
import threading
import urllib.error
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from flowcraft import FlowRuntime, create_flow
from flowcraft.testing import InMemoryAdapter
from flowcraft.webhooks import MemoryWebhooks, create_webhook_app


def _flow():
    flow = create_flow("hooked")
    flow.node("ask", lambda ctx: {"question": "ship it?"})
    flow.webhook("reply")
    flow.node("yes", lambda ctx: {"approved": ctx.input})
    flow.node("no", lambda ctx: "rejected")
    flow.edge("ask", "reply").edge("reply", "yes", action="approve").edge("reply", "no", action="reject")
    return flow


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(app):
        server = make_server("127.0.0.1", 0, app, server_class=WSGIServer, handler_class=_Quiet)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _post(url, body=b"", method="POST", headers=None):
    request = urllib.request.Request(url, data=body if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _runtime(flow):
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    return runtime


def test_webhook_node_pauses_and_exposes_path_token_and_event():
    """webhook.ts: the node's result carries the `url` and `event` a caller needs."""
    runtime = _runtime(_flow())
    paused = runtime.run("hooked")
    assert paused.status == "awaiting" and paused.awaiting == ["reply"]
    details = paused.context["_awaitingDetails"]["reply"]
    hook = details["webhook"]
    assert details["type"] == "wait"
    assert hook["path"] == f"/{paused.run_id}/reply"
    assert hook["event"] == f"webhook:{paused.run_id}:reply"
    assert len(hook["token"]) >= 40
    other = runtime.run("hooked").context["_awaitingDetails"]["reply"]["webhook"]["token"]
    assert other != hook["token"]  # a fresh secret per run


def test_a_post_resumes_an_in_memory_run_with_its_body_as_output(serve):
    """hitl.test.ts: resuming a paused node with an output and action completes the run along that action."""
    runtime = _runtime(_flow())
    hooks = MemoryWebhooks(runtime)
    base = serve(create_webhook_app(hooks))
    paused = runtime.run("hooked")
    hooks.track("hooked", paused)
    hook = paused.context["_awaitingDetails"]["reply"]["webhook"]
    status, body = _post(base + hook["path"] + "?action=approve", json.dumps({"by": "ann"}).encode(),
                         headers={"X-Flowcraft-Token": hook["token"]})
    assert (status, body) == (202, {"run_id": paused.run_id, "node_id": "reply", "status": "completed"})
    result = hooks.results[paused.run_id]
    assert result.context["yes"] == {"approved": {"by": "ann"}} and result.skipped == ["no"]
    # the run no longer awaits: the same URL answers 404 and changes nothing
    status, body = _post(base + hook["path"] + "?token=" + hook["token"], b"{}")
    assert status == 404 and "no webhook" in body["error"]


def test_the_handler_refuses_what_it_cannot_resume(serve):
    runtime = _runtime(_flow())
    hooks = MemoryWebhooks(runtime)
    base = serve(create_webhook_app(hooks, max_body_bytes=1000))
    paused = runtime.run("hooked")
    hooks.track("hooked", paused)
    hook = paused.context["_awaitingDetails"]["reply"]["webhook"]
    url, token = base + hook["path"], {"X-Flowcraft-Token": hook["token"]}
    assert _post(url, b"{}", headers={"X-Flowcraft-Token": "wrong"})[0] == 404
    assert _post(url, b"{}")[0] == 404  # no token
    assert _post(base + f"/{paused.run_id}/ask", b"{}", headers=token)[0] == 404  # not a webhook
    assert _post(base + "/nope", b"{}", headers=token)[0] == 404
    status, body = _post(url, method="GET", headers=token)
    assert status == 405 and "POST" in body["error"]
    status, body = _post(url + "?action=approve", b"{not json", headers=token)
    assert status == 400 and "not valid JSON" in body["error"]
    assert _post(url + "?action=approve", b"NaN", headers=token)[0] == 400
    status, body = _post(url + "?action=approve", b"[" * 200 + b"]" * 200, headers=token)
    assert status == 400 and "nested deeper" in body["error"]
    status, body = _post(url + "?action=approve", json.dumps("x" * 2000).encode(), headers=token)
    assert status == 413 and "1000" in body["error"]
    status, body = _post(url + "?action=aprove", b"{}", headers=token)
    assert status == 400 and "aprove" in body["error"]
    # every refusal left the run as it was: the right request still resumes it
    status, body = _post(url + "?action=reject", b"{}", headers=token)
    assert (status, body["status"]) == (202, "completed")
    assert hooks.results[paused.run_id].context["no"] == "rejected"


def test_a_post_resumes_a_distributed_run_on_the_fakes(serve):
    """The webhook node in the distributed driver: it awaits like `wait` and the POST resumes it
    through `resume_with_action` (the run then completes as the in-memory one does)."""
    flow = _flow()
    adapter = InMemoryAdapter(_runtime(flow))
    base = serve(create_webhook_app(adapter))
    run_id = adapter.start_workflow("hooked")
    adapter.drain()
    paused = adapter.wait_for_result(run_id, timeout=5)
    assert paused.status == "awaiting" and paused.awaiting == ["reply"]
    hook = paused.context["_awaitingDetails"]["reply"]["webhook"]
    assert hook["path"] == f"/{run_id}/reply"
    assert _post(base + hook["path"] + "?action=approve", b"{}", headers={"X-Flowcraft-Token": "x"})[0] == 404
    status, body = _post(base + hook["path"] + "?action=approve", json.dumps({"by": "bo"}).encode(),
                         headers={"X-Flowcraft-Token": hook["token"]})
    assert status == 202 and body["enqueued"] == ["yes"]
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "completed" and result.context["yes"] == {"approved": {"by": "bo"}}
    assert _post(base + hook["path"], b"{}", headers={"X-Flowcraft-Token": hook["token"]})[0] == 404
