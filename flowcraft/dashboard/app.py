"""The dashboard's WSGI application: routing, HTTP Basic auth, CSRF and Origin checks, read-only mode.

Pages render on the server (`pages`), the JSON API under `/api/` serves the same data (`views`),
and every POST is an operator action of SPEC section 11 (or resume / cancel / requeue). A POST
needs the app's CSRF token (form field `csrf` or header `X-CSRF-Token`; `GET /api/csrf` gives it)
and, when the browser sends an `Origin` (or `Referer`), one of this host.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import secrets
import threading
import traceback
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qs, urlsplit

from ..errors import FlowcraftError
from . import pages, views
from .assets import CSS, JS
from .svg import render_graph

logger = logging.getLogger("flowcraft.dashboard")

Headers = List[Tuple[str, str]]
StartResponse = Callable[..., Any]
MAX_BODY = 1 << 20
_SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"), ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
]
_REASONS = {200: "OK", 303: "See Other", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}
ACTIONS = ("resume", "cancel", "retry", "restart", "skip")


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    """What a handler reads of a WSGI environ."""

    def __init__(self, environ: Mapping[str, Any]) -> None:
        self.environ = environ
        self.method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        raw = str(environ.get("PATH_INFO", "") or "/")
        self.path = raw.encode("latin-1", "replace").decode("utf-8", "replace")  # PEP 3333: bytes as latin-1
        self.query = parse_qs(str(environ.get("QUERY_STRING", "")), keep_blank_values=True)
        self._body: Optional[bytes] = None

    def arg(self, name: str) -> Optional[str]:
        values = self.query.get(name)
        return values[0] if values else None

    def header(self, name: str) -> Optional[str]:
        value = self.environ.get("HTTP_" + name.upper().replace("-", "_"))
        return None if value is None else str(value)

    @property
    def wants_json(self) -> bool:
        return self.path.startswith("/api/")

    def body(self) -> bytes:
        if self._body is None:
            try:
                length = int(self.environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                raise HttpError(400, "bad Content-Length") from None
            if length > MAX_BODY:
                raise HttpError(413, f"request body over {MAX_BODY} bytes")
            self._body = self.environ["wsgi.input"].read(length) if length > 0 else b""
        return self._body

    def form(self) -> Dict[str, List[str]]:
        """The POSTed fields: a JSON object (API) or an urlencoded form (pages); values as lists."""
        body = self.body()
        kind = str(self.environ.get("CONTENT_TYPE") or "")
        if kind.startswith("application/json"):
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                raise HttpError(400, "the request body is not JSON") from None
            if not isinstance(data, dict):
                raise HttpError(400, "the request body must be a JSON object")
            return {k: (v if isinstance(v, list) else [v]) for k, v in data.items()}
        return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def _parse_auth(auth: Union[None, str, Tuple[str, str]]) -> Optional[bytes]:
    if auth is None:
        return None
    if isinstance(auth, str):
        if ":" not in auth:
            raise ValueError("auth must be 'USER:PASSWORD' or a (user, password) pair")
        return auth.encode("utf-8")
    user, password = auth
    return f"{user}:{password}".encode("utf-8")


def _metrics_registry(metrics: Any) -> Any:
    return getattr(metrics, "registry", metrics)


class DashboardApp:
    """The WSGI application (see `create_app`)."""

    def __init__(self, adapter: Any, read_only: bool = False, auth: Union[None, str, Tuple[str, str]] = None,
                 metrics: Any = None, csrf_token: Optional[str] = None) -> None:
        self.adapter = adapter
        self.read_only = bool(read_only)
        self._credentials = _parse_auth(auth)
        self.metrics = metrics
        self.csrf_token = csrf_token or secrets.token_urlsafe(32)
        # one request at a time reaches the adapter: not every adapter's client is thread-safe,
        # and a server may call the app from several threads
        self._adapter_lock = threading.Lock()

    # --- WSGI -----------------------------------------------------------------------------------

    def __call__(self, environ: Mapping[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        try:
            self._check_auth(request)
            status, headers, body = self._route(request)
        except HttpError as error:
            status, headers, body = self._error(request, error.status, error.message)
        except Exception:
            logger.error("dashboard: %s %s failed", request.method, request.path, exc_info=True)
            status, headers, body = self._error(request, 500, "internal error (logged by the server)")
        if status == 401:
            headers.append(("WWW-Authenticate", 'Basic realm="flowcraft", charset="UTF-8"'))
        headers.extend(_SECURITY_HEADERS)
        headers.append(("Content-Length", str(len(body))))
        start_response(f"{status} {_REASONS.get(status, 'Error')}", headers)
        return [b"" if request.method == "HEAD" else body]

    def _error(self, request: Request, status: int, message: str) -> Tuple[int, Headers, bytes]:
        if request.wants_json or request.path == "/metrics":
            return self._json({"error": message}, status)
        return self._html(pages.message_page(f"{status} {_REASONS.get(status, 'Error')}", message), status, "")

    # --- security -------------------------------------------------------------------------------

    def _check_auth(self, request: Request) -> None:
        if self._credentials is None:
            return
        given = request.header("Authorization") or ""
        scheme, _, encoded = given.partition(" ")
        try:
            supplied = base64.b64decode(encoded.strip(), validate=True) if scheme.lower() == "basic" else b""
        except (binascii.Error, ValueError):
            supplied = b""
        if not hmac.compare_digest(supplied, self._credentials):
            raise HttpError(401, "authentication required")

    def _check_post(self, request: Request, fields: Mapping[str, List[str]]) -> None:
        if self.read_only:
            raise HttpError(403, "the dashboard is read-only: actions are refused")
        origin = request.header("Origin") or request.header("Referer")
        if origin is not None:
            parts = urlsplit(origin)
            host = request.header("Host") or f"{request.environ.get('SERVER_NAME')}:{request.environ.get('SERVER_PORT')}"
            if parts.netloc.lower() != host.lower():
                raise HttpError(403, "cross-origin request refused")
        token = request.header("X-CSRF-Token") or (fields.get("csrf") or [""])[0]
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self.csrf_token.encode()):
            raise HttpError(403, "missing or wrong CSRF token")

    # --- responses ------------------------------------------------------------------------------

    def _html(self, body: str, status: int = 200, here: str = "/", flash: Optional[Mapping[str, str]] = None,
              title: str = "Dashboard") -> Tuple[int, Headers, bytes]:
        page = pages.layout(title, body, here=here, read_only=self.read_only, flash=flash)
        return status, [("Content-Type", "text/html; charset=utf-8")], page.encode("utf-8")

    @staticmethod
    def _json(data: Any, status: int = 200) -> Tuple[int, Headers, bytes]:
        text = json.dumps(data, default=str, ensure_ascii=False)
        return status, [("Content-Type", "application/json; charset=utf-8")], text.encode("utf-8")

    @staticmethod
    def _redirect(location: str) -> Tuple[int, Headers, bytes]:
        return 303, [("Location", location), ("Content-Type", "text/plain")], b""

    # --- routing --------------------------------------------------------------------------------

    def _route(self, request: Request) -> Tuple[int, Headers, bytes]:
        path, method = request.path, request.method
        if method == "POST":
            with self._adapter_lock:
                return self._post(request)
        if method not in ("GET", "HEAD"):
            raise HttpError(405, f"method {method} not allowed")
        if path == "/static/app.css":
            return 200, [("Content-Type", "text/css; charset=utf-8")], CSS.encode()
        if path == "/static/app.js":
            return 200, [("Content-Type", "text/javascript; charset=utf-8")], JS.encode()
        if path == "/metrics":
            return self._metrics()
        with self._adapter_lock:
            if path.startswith("/api/"):
                return self._api_get(request, path[len("/api"):])
            return self._page(request, path)

    def _page(self, request: Request, path: str) -> Tuple[int, Headers, bytes]:
        flash = pages.flash_of(request.query)
        if path == "/":
            return self._html(pages.overview_page(views.overview(self.adapter)), here="/", flash=flash, title="Overview")
        if path == "/runs":
            filters, data = self._run_list(request)
            return self._html(pages.run_list_page(data, filters, sorted(self.adapter.runtime.blueprints)), here="/runs",
                              flash=flash, title="Runs")
        if path.startswith("/runs/"):
            run_id = path[len("/runs/"):]
            info = self._run(run_id)
            api = f"/api/runs/{pages.path_part(run_id)}"  # the page polls `?view=live` of it
            return self._html(pages.run_page(info, self.csrf_token, self.read_only, api), here="/runs", flash=flash,
                              title=f"Run {run_id}")
        if path == "/blueprints":
            return self._html(pages.blueprints_page(views.blueprint_list(self.adapter)), here="/blueprints",
                              title="Blueprints")
        if path.startswith("/blueprints/"):
            blueprint_id = path[len("/blueprints/"):]
            return self._html(pages.blueprint_page(blueprint_id, render_graph(self._graph(blueprint_id))),
                              here="/blueprints", title=f"Blueprint {blueprint_id}")
        if path == "/dead-letters":
            letters = [d.to_dict() for d in self.adapter.dead_letters(limit=500)]
            return self._html(pages.dead_letters_page(letters, self.csrf_token, self.read_only), here="/dead-letters",
                              flash=flash, title="Dead letters")
        raise HttpError(404, f"no page {path}")

    def _api_get(self, request: Request, path: str) -> Tuple[int, Headers, bytes]:
        if path == "/csrf":
            return self._json({"token": self.csrf_token, "read_only": self.read_only})
        if path == "/overview":
            return self._json(views.overview(self.adapter))
        if path == "/runs":
            return self._json(self._run_list(request)[1])
        if path.startswith("/runs/"):
            run_id = path[len("/runs/"):]
            history_of = self._history_of(run_id, request)
            if history_of is not None:
                return self._json([{"type": ev.type, "payload": ev.payload} for ev in self.adapter.get_history(history_of)])
            if request.arg("view") == "live":
                try:
                    return self._json(views.live_view(self.adapter, run_id))
                except KeyError:
                    raise HttpError(404, f"unknown run {run_id!r}") from None
            return self._json(self._run(run_id, with_svg=False))
        if path == "/blueprints":
            return self._json(views.blueprint_list(self.adapter))
        if path.startswith("/blueprints/"):
            return self._json(self._graph(path[len("/blueprints/"):]).blueprint.to_dict())
        if path == "/dead-letters":
            return self._json([d.to_dict() for d in self.adapter.dead_letters(limit=500)])
        raise HttpError(404, f"no API endpoint {path}")

    def _metrics(self) -> Tuple[int, Headers, bytes]:
        try:
            import prometheus_client
        except ImportError:
            raise HttpError(404, "no metrics: prometheus_client is not installed (pip install 'flowcraft[prometheus]')") from None
        registry = _metrics_registry(self.metrics) if self.metrics is not None else prometheus_client.REGISTRY
        return 200, [("Content-Type", prometheus_client.CONTENT_TYPE_LATEST)], prometheus_client.generate_latest(registry)

    # --- data -------------------------------------------------------------------------------------

    def _run_list(self, request: Request) -> Tuple[Dict[str, Optional[str]], Dict[str, Any]]:
        filters = {k: request.arg(k) or None for k in ("status", "blueprint", "since", "until", "limit", "cursor")}
        try:
            limit = int(filters["limit"] or 50)
            if not 1 <= limit <= 500:
                raise ValueError
        except ValueError:
            raise HttpError(400, f"limit: a whole number from 1 to 500, not {filters['limit']!r}") from None
        try:
            data = views.run_list(self.adapter, filters["status"], filters["blueprint"],
                                  views.parse_time(filters["since"], "since"), views.parse_time(filters["until"], "until"),
                                  limit, filters["cursor"])
        except ValueError as error:
            raise HttpError(400, str(error)) from None
        return filters, data

    def _history_of(self, path_id: str, request: Request) -> Optional[str]:
        """The run whose history `/api/runs/<path_id>` asks for, or None (the run itself is asked
        for): `?view=history`, or a path ending in `/history` unless a run has that whole id (the
        server hands the path over decoded, so an id with `%2F` in its URL reads as `/`)."""
        if request.arg("view") == "history":
            self._run_exists(path_id)
            return path_id
        if not path_id.endswith("/history") or self.adapter.store.get_record(path_id) is not None:
            return None
        run_id = path_id[:-len("/history")]
        self._run_exists(run_id)
        return run_id

    def _run_exists(self, run_id: str) -> None:
        if self.adapter.store.get_record(run_id) is None:
            raise HttpError(404, f"unknown run {run_id!r}")

    def _run(self, run_id: str, with_svg: bool = True) -> Dict[str, Any]:
        try:
            return views.run_view(self.adapter, run_id, with_svg=with_svg)
        except KeyError:
            raise HttpError(404, f"unknown run {run_id!r}") from None

    def _graph(self, blueprint_id: str) -> Any:
        if blueprint_id not in self.adapter.runtime.blueprints:
            raise HttpError(404, f"unknown blueprint {blueprint_id!r}")
        return self.adapter.runtime.graph(self.adapter.runtime.blueprint(blueprint_id))

    # --- actions --------------------------------------------------------------------------------

    def _post(self, request: Request) -> Tuple[int, Headers, bytes]:
        fields = request.form()
        self._check_post(request, fields)
        api = request.wants_json
        path = request.path[len("/api"):] if api else request.path
        target, _, action = path.rpartition("/")
        if target.startswith("/runs/") and action in ACTIONS:
            run_id = target[len("/runs/"):]
            back = f"/runs/{pages.path_part(run_id)}"
            enqueued, refused = self._act(lambda: self._run_action(run_id, action, fields), api, back)
            if refused is not None:
                return refused
            if api:
                return self._json({"run_id": run_id, "action": action, "enqueued": enqueued})
            return self._redirect(f"{back}?ok={pages.path_part(action + ': done')}")
        if target.startswith("/dead-letters/") and action == "requeue":
            letter = target[len("/dead-letters/"):]
            _, refused = self._act(lambda: self._requeue(letter), api, "/dead-letters")
            if refused is not None:
                return refused
            if api:
                return self._json({"requeued": letter})
            return self._redirect(f"/dead-letters?ok={pages.path_part('requeued ' + letter)}")
        raise HttpError(404, f"no action {path}")

    def _act(self, do: Callable[[], Any], api: bool, back: str) -> Tuple[List[str], Optional[Tuple[int, Headers, bytes]]]:
        """(the node ids enqueued, None), or ([], the response) when the action is refused: 404
        (unknown run) or 409 (does not apply), shown on the page it came from for a form."""
        try:
            return sorted(do() or ()), None
        except HttpError:
            raise
        except KeyError as error:
            status, message = 404, f"unknown run or dead letter: {error.args[0] if error.args else ''}"
        except (ValueError, FlowcraftError) as error:
            status, message = 409, str(error)
        except Exception as error:
            logger.error("dashboard: action failed\n%s", traceback.format_exc())
            status, message = 500, f"the action failed: {type(error).__name__}: {error}"
        if api:
            return [], self._json({"error": message}, status)
        return [], self._redirect(f"{back}?err={pages.path_part(message[:400])}")

    def _requeue(self, letter: str) -> Sequence[str]:
        if not self.adapter.requeue_dead_letter(letter):
            raise KeyError(letter)
        return ()

    def _run_action(self, run_id: str, action: str, fields: Mapping[str, List[str]]) -> Any:
        def one(name: str) -> Optional[str]:
            values = [v for v in fields.get(name) or () if v not in (None, "")]
            return None if not values else values[0] if isinstance(values[0], str) else json.dumps(values[0])

        def output() -> Any:
            given: List[Any] = list(fields.get("output") or ())
            raw = given[0] if given else None
            if raw is None or raw == "":
                return None
            if not isinstance(raw, str):
                return raw  # a JSON body's value, already decoded
            try:
                return json.loads(raw)
            except ValueError:
                raise ValueError(f"output is not JSON: {raw[:80]!r}") from None

        self._run_exists(run_id)
        adapter = self.adapter
        if action == "cancel":
            adapter.cancel(run_id)
            return ()
        if action == "retry":
            nodes = [str(n) for n in fields.get("node") or () if n]
            return adapter.retry(run_id, nodes or None)
        node = one("node")
        if action == "resume":
            return adapter.resume_with_action(run_id, one("action"), output(), node_id=node)
        if node is None:
            raise ValueError(f"{action}: which node? (field 'node')")
        if action == "restart":
            return adapter.restart_from(run_id, node)
        return adapter.skip(run_id, node, output())


def create_app(adapter: Any, read_only: bool = False, auth: Union[None, str, Tuple[str, str]] = None, *,
               metrics: Any = None) -> DashboardApp:
    """The dashboard of `adapter` (a `DistributedAdapter`) as a WSGI application.

    `read_only` refuses every action (403); `auth` ("USER:PASSWORD" or a pair) makes every request
    need those HTTP Basic credentials (401 otherwise); `metrics` (a `flowcraft.telemetry.PrometheusMetrics`
    or a prometheus_client registry) is served at `/metrics` (default: prometheus_client's global
    registry; 404 without prometheus_client)."""
    return DashboardApp(adapter, read_only=read_only, auth=auth, metrics=metrics)
