"""`flowcraft dashboard`: serve the dashboard (`flowcraft.dashboard.create_app`) with wsgiref
(`flowcraft.dashboard.server`); -v logs every request."""
from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Optional, Tuple

from .commands import connected
from .errors import EXIT_OK, CliError
from .signals import StopSignals

logger = logging.getLogger("flowcraft.cli")


def parse_auth(text: Optional[str]) -> Optional[Tuple[str, str]]:
    if text is None:
        return None
    user, colon, password = text.partition(":")
    if not colon or not user or not password:
        raise CliError("--auth must be USER:PASSWORD (both not empty)")
    return user, password


def cmd_dashboard(args: Any) -> int:
    """Serve the dashboard until SIGTERM/SIGINT."""
    from ..dashboard import create_app
    from ..dashboard.server import make_server

    auth = parse_auth(args.auth)
    with connected(args) as adapter:
        app = create_app(adapter, read_only=args.read_only, auth=auth, metrics=_metrics(adapter))
        try:
            server = make_server(app, args.host, args.port)
        except OSError as error:
            raise CliError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
        mode = " (read-only)" if args.read_only else ""
        print(f"flowcraft dashboard: serving http://{args.host}:{server.server_port}/{mode}", file=sys.stderr, flush=True)
        if auth is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("dashboard: listening on %s without --auth: anyone who reaches it can act on runs", args.host)
        with StopSignals(lambda: threading.Thread(target=server.shutdown, daemon=True).start()):
            try:
                server.serve_forever(poll_interval=0.2)
            finally:
                server.server_close()
    return EXIT_OK


def _metrics(adapter: Any) -> Any:
    """Queue depth and conflicts of `adapter` at /metrics, when prometheus_client is installed."""
    try:
        from ..telemetry import PrometheusMetrics

        metrics = PrometheusMetrics()
    except ImportError:
        return None
    metrics.watch(adapter)
    return metrics


def add_parser(add: Any, app: Any, conn: Any) -> None:
    from .parser import positive_int

    dashboard = add("dashboard", "serve the web dashboard (runs, graphs, actions, dead letters)", app(True), conn)
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    dashboard.add_argument("--port", type=positive_int, default=8080, help="port (default: 8080)")
    dashboard.add_argument("--read-only", action="store_true", help="refuse every action (403)")
    dashboard.add_argument("--auth", metavar="USER:PASSWORD", help="require these HTTP Basic credentials")
