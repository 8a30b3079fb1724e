"""Runs and WSGI helpers shared by the dashboard's tests (WSGI-level, browser, real backend)."""
from __future__ import annotations

import base64
import io
import json
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlencode

from flowcraft import FlowRuntime, create_flow

XSS_NODE = 'n"><script>window.__xss=1</script>'
XSS_OUTPUT = "</script><script>window.__xss=2</script><img src=x onerror=window.__xss=3>"
XSS_ERROR = "<img src=x onerror=window.__xss=4> broke"
XSS_RUN_ID = "run-</script><svg onload=window.__xss=5>"


class Payments:
    """A payment service that fails while `down` is set; counts calls."""

    def __init__(self) -> None:
        self.down = True
        self.calls = 0

    def charge(self, ctx: Any) -> Any:
        self.calls += 1
        if self.down:
            raise ConnectionError("payment service unavailable")
        return {"charged": True}


def hostile(ctx: Any) -> Any:
    raise RuntimeError(XSS_ERROR)


def runtime(payments: Optional[Payments] = None) -> FlowRuntime:
    """Blueprints: `approval` (a wait node with approve/reject edges), `pay` (fails while the
    payment service is down), `xss` (a node id, output and error message that are HTML), `loop`."""
    payments = payments or Payments()
    flows = [
        create_flow("approval").node("prepare", lambda ctx: {"amount": 10}).wait("review")
        .node("ship", lambda ctx: "shipped").node("refund", lambda ctx: "refunded")
        .edge("prepare", "review").edge("review", "ship", action="approve").edge("review", "refund", action="reject"),
        create_flow("pay").node("load", lambda ctx: 1).node("charge", payments.charge).node("ship", lambda ctx: 3)
        .edge("load", "charge").edge("charge", "ship"),
        create_flow("xss").node(XSS_NODE, lambda ctx: XSS_OUTPUT).node("bad", hostile).edge(XSS_NODE, "bad"),
        create_flow("loop").node("tick", lambda ctx: ctx.context.set("n", (ctx.context.get("n") or 0) + 1))
        .node("check", lambda ctx: ctx.context.get("n")).edge("tick", "check")
        .loop("again", start_node_id="tick", end_node_id="check", condition="n < 3")
        .node("done", lambda ctx: "done").edge("again", "done", action="break"),
    ]
    rt = FlowRuntime()
    for flow in flows:
        rt.add_blueprint(flow)
    return rt


def call(app: Any, method: str, path: str, query: Optional[Mapping[str, Any]] = None, form: Optional[Mapping[str, Any]] = None,
         json_body: Any = None, headers: Optional[Mapping[str, str]] = None, auth: Optional[Tuple[str, str]] = None,
         host: str = "dash.test:80") -> Tuple[int, Dict[str, str], bytes]:
    """Call a WSGI app once; (status code, headers, body)."""
    body = b""
    environ: Dict[str, Any] = {
        "REQUEST_METHOD": method, "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": urlencode(query or {}, doseq=True), "SERVER_NAME": host.split(":")[0],
        "SERVER_PORT": host.split(":")[1], "HTTP_HOST": host, "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
    }
    if form is not None:
        body = urlencode(form, doseq=True).encode()
        environ["CONTENT_TYPE"] = "application/x-www-form-urlencoded"
    elif json_body is not None:
        body = json.dumps(json_body).encode()
        environ["CONTENT_TYPE"] = "application/json"
    environ["CONTENT_LENGTH"] = str(len(body))
    environ["wsgi.input"] = io.BytesIO(body)
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    if auth is not None:
        environ["HTTP_AUTHORIZATION"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    seen: Dict[str, Any] = {}

    def start_response(status: str, response_headers: List[Tuple[str, str]]) -> None:
        seen["status"] = int(status.split()[0])
        seen["headers"] = dict(response_headers)

    out = b"".join(app(environ, start_response))
    return seen["status"], seen["headers"], out


def get_json(app: Any, path: str, **kwargs: Any) -> Any:
    status, _, body = call(app, "GET", path, **kwargs)
    assert status == 200, (status, body[:300])
    return json.loads(body)


def post_api(app: Any, path: str, data: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> Tuple[int, Any]:
    """POST a JSON action with the app's CSRF token; (status, decoded JSON)."""
    headers = {"X-CSRF-Token": app.csrf_token, **kwargs.pop("headers", {})}
    status, _, body = call(app, "POST", path, json_body=dict(data or {}), headers=headers, **kwargs)
    return status, json.loads(body)
