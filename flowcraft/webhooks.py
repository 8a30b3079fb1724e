"""Webhooks: resume a run awaiting a `webhook` node from an HTTP POST.

A `webhook` node pauses its run like `wait`; its awaiting details (`_awaitingDetails[<node>]`)
carry `webhook = {"path": "/<run id>/<node id>", "token": <secret>, "event": "webhook:<run>:<node>"}`.
`create_webhook_app(target)` is a WSGI application: `POST <mount>/<run id>/<node id>` with the
token (header `X-Flowcraft-Token`, or `?token=`) and a JSON body resumes the run with the body as
the node's output (`?action=NAME` gives an action). Mount it in any WSGI app (dispatch on a path
prefix and strip it, as `SCRIPT_NAME`/`PATH_INFO` say) or serve it alone.

`target` is either a distributed client (anything with `resume_with_action` and a `store` whose
`get_record(run_id).awaiting` holds the details: every adapter's client) or, in memory, a
`MemoryWebhooks(runtime)` to which paused runs are handed (`track(blueprint, result)`).

Answers are JSON: 202 `{"run_id", "node_id", "status"}` when resumed; 400 (bad JSON, too large a
body, a refused action), 404 (unknown path, run or webhook, or a wrong token: a wrong token is not
told apart from an unknown run), 405 (not POST), 409 (the node no longer awaits), each with
`{"error": "..."}`. The body is bounded (`max_body_bytes`, default 1 MiB; nesting 128 levels) and
parsed as JSON only: nothing in it is ever evaluated.
"""
from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple
from urllib.parse import parse_qs, quote, unquote

from .errors import FlowcraftError

logger = logging.getLogger("flowcraft.webhooks")

TOKEN_HEADER = "HTTP_X_FLOWCRAFT_TOKEN"
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
MAX_BODY_DEPTH = 128


def webhook_details(run_id: str, node_id: str) -> Dict[str, str]:
    """What a `webhook` node exposes: its path under the app's mount point, a fresh secret token and
    the TS event name. The token is 32 random bytes, URL-safe."""
    return {
        "path": f"/{quote(run_id, safe='')}/{quote(node_id, safe='')}",
        "token": secrets.token_urlsafe(32),
        "event": f"webhook:{run_id}:{node_id}",
    }


class WebhookRefused(FlowcraftError):
    """A webhook request that cannot resume anything; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class MemoryWebhooks:
    """The in-memory runs a webhook app may resume: `track(blueprint, result)` each paused run
    (a run that finishes or awaits no webhook is dropped). Thread-safe; one resume per run at once."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self._runs: Dict[str, Tuple[Any, Any, Optional[Mapping[str, Any]]]] = {}
        self._lock = threading.Lock()
        self.results: Dict[str, Any] = {}  # run id -> the result of its last webhook resume

    def track(self, blueprint: Any, result: Any, registry: Optional[Mapping[str, Any]] = None) -> None:
        with self._lock:
            if result.status == "awaiting" and _hooks(result.context.get("_awaitingDetails") or {}):
                self._runs[result.run_id] = (blueprint, result, registry)
            else:
                self._runs.pop(result.run_id, None)

    def awaiting(self, run_id: str) -> Optional[Mapping[str, Any]]:
        with self._lock:
            entry = self._runs.get(run_id)
        return None if entry is None else entry[1].context.get("_awaitingDetails") or {}

    def resume(self, run_id: str, node_id: str, output: Any, action: Optional[str]) -> Dict[str, Any]:
        with self._lock:
            entry = self._runs.pop(run_id, None)  # taken: a second POST at once finds nothing to resume
        if entry is None:
            raise WebhookRefused(409, f"run {run_id!r} is not awaiting (it was resumed already)")
        blueprint, paused, registry = entry
        try:
            result = self.runtime.resume(blueprint, paused.serialized_context, output=output, action=action,
                                         node_id=node_id, registry=registry)
        except BaseException:
            with self._lock:
                self._runs.setdefault(run_id, entry)  # refused (a bad action): the run is unchanged
            raise
        self.track(blueprint, result, registry)
        self.results[run_id] = result
        return {"status": result.status}


class ClientWebhooks:
    """The runs of a distributed client (`resume_with_action`, `store.get_record`)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def awaiting(self, run_id: str) -> Optional[Mapping[str, Any]]:
        record = self.client.store.get_record(run_id)
        return None if record is None else record.awaiting

    def resume(self, run_id: str, node_id: str, output: Any, action: Optional[str]) -> Dict[str, Any]:
        try:
            enqueued = self.client.resume_with_action(run_id, action, output, node_id=node_id)
        except KeyError:
            raise WebhookRefused(404, f"unknown run {run_id!r}") from None
        return {"status": "running", "enqueued": sorted(enqueued)}


def _hooks(details: Mapping[str, Any]) -> Dict[str, Mapping[str, Any]]:
    return {n: d["webhook"] for n, d in details.items() if isinstance(d, Mapping) and isinstance(d.get("webhook"), Mapping)}


def create_webhook_app(target: Any, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Callable[..., Iterable[bytes]]:
    """The WSGI application resuming `target`'s webhook nodes (see the module doc)."""
    hooks = ClientWebhooks(target) if hasattr(target, "resume_with_action") else target

    def app(environ: Mapping[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
        try:
            status, body = 202, _handle(hooks, environ, max_body_bytes)
        except WebhookRefused as refused:
            status, body = refused.status, {"error": str(refused)}
        except ValueError as error:  # the runtime refused the resume (a misspelt action, a value too large)
            status, body = 400, {"error": str(error)}
        except Exception:
            logger.exception("webhook request %s failed", environ.get("PATH_INFO"))
            status, body = 500, {"error": "internal error (logged by the server)"}
        data = json.dumps(body).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        if status == 405:
            headers.append(("Allow", "POST"))
        start_response(f"{status} {_REASONS[status]}", headers)
        return [data]

    return app


_REASONS = {202: "Accepted", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            413: "Payload Too Large", 500: "Internal Server Error"}


def _handle(hooks: Any, environ: Mapping[str, Any], max_body_bytes: int) -> Dict[str, Any]:
    parts = [unquote(p) for p in (environ.get("PATH_INFO") or "").split("/") if p]
    if len(parts) != 2:
        raise WebhookRefused(404, "no such webhook: POST to <mount>/<run id>/<node id>")
    if environ.get("REQUEST_METHOD") != "POST":
        raise WebhookRefused(405, f"a webhook takes POST, not {environ.get('REQUEST_METHOD')}")
    run_id, node_id = parts
    query = parse_qs(environ.get("QUERY_STRING") or "")
    token = environ.get(TOKEN_HEADER) or (query.get("token") or [""])[0]
    details = hooks.awaiting(run_id)
    hook = _hooks(details or {}).get(node_id)
    if hook is None or not token or not hmac.compare_digest(str(hook.get("token", "")).encode(), token.encode()):
        raise WebhookRefused(404, f"no webhook {node_id!r} awaits in run {run_id!r} for this token")
    output = _read_json(environ, max_body_bytes)
    actions = query.get("action")
    result = hooks.resume(run_id, node_id, output, actions[0] if actions else None)
    return {"run_id": run_id, "node_id": node_id, **result}


def _read_json(environ: Mapping[str, Any], max_body_bytes: int) -> Any:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise WebhookRefused(400, "bad Content-Length") from None
    if length < 0:
        raise WebhookRefused(400, "bad Content-Length")
    if length > max_body_bytes:
        raise WebhookRefused(413, f"the body is {length} bytes, more than the webhook's {max_body_bytes}")
    if length == 0:
        return None
    raw = environ["wsgi.input"].read(length)
    from .ports import nesting_exceeds

    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise WebhookRefused(400, f"the body is nested deeper than {MAX_BODY_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise WebhookRefused(400, f"the body is not valid JSON: {error}") from None
    if text.count("[") + text.count("{") > MAX_BODY_DEPTH and nesting_exceeds(value, MAX_BODY_DEPTH):
        raise WebhookRefused(400, f"the body is nested deeper than {MAX_BODY_DEPTH} levels")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
