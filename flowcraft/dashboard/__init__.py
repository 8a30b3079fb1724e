"""The Flowcraft dashboard (SPEC section 12): `create_app(adapter, read_only=False, auth=None)`,
a WSGI application any WSGI server can serve (`flowcraft dashboard` serves it with wsgiref).

An optional feature: the core never imports it. Server-rendered HTML with a little vanilla
JavaScript, every asset served by the app itself.
"""
from __future__ import annotations

from .app import DashboardApp, create_app

__all__ = ["DashboardApp", "create_app"]
