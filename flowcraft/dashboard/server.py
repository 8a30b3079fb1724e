"""Serving the dashboard with the standard library: wsgiref, one thread per connection.

A thread per connection, because a browser opens connections ahead of need (preconnects) and a
one-at-a-time server would wait on such an idle socket while the real request queues behind it;
idle connections time out after `IDLE_TIMEOUT` seconds. The app serialises its calls to the
adapter (see `DashboardApp`), so an adapter that is not thread-safe is safe here.
"""
from __future__ import annotations

import logging
import socketserver
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.simple_server import make_server as _make_server

__all__ = ["IDLE_TIMEOUT", "make_server"]

IDLE_TIMEOUT = 15.0
logger = logging.getLogger("flowcraft.dashboard.http")


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False


class LoggingHandler(WSGIRequestHandler):
    """Requests logged at INFO on "flowcraft.dashboard.http" (not printed on stderr)."""

    timeout = IDLE_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.info("%s " + format, self.address_string(), *args)


def make_server(app: Any, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """A wsgiref server of `app` on host:port (port 0: any free one; see `.server_port`)."""
    return _make_server(host, port, app, server_class=ThreadingWSGIServer, handler_class=LoggingHandler)
