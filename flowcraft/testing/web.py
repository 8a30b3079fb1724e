"""Serving a WSGI app (the dashboard) in a thread, and a headless Chromium for browser tests.

`serving(app)` serves on an ephemeral port of 127.0.0.1 as `flowcraft dashboard` does (wsgiref,
`flowcraft.dashboard.server`) and yields the base URL. `headless_chromium()` starts Selenium's Chrome driver on the system's
Chromium (`/usr/bin/chromium`, `/usr/bin/chromedriver`, or $CHROMIUM / $CHROMEDRIVER) with a fresh
profile and no network of its own; Selenium Manager is never asked to download anything.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from typing import Any, Iterator, Optional

__all__ = ["CHROMEDRIVER", "CHROMIUM", "browser_available", "headless_chromium", "serving"]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


@contextlib.contextmanager
def serving(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` in a background thread for the block; yields its base URL (`http://host:port`)."""
    from ..dashboard.server import make_server

    server = make_server(app, host, port)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def browser_available() -> Optional[str]:
    """None when a headless browser can be started here, else why not."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'flowcraft[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


@contextlib.contextmanager
def headless_chromium(width: int = 1400, height: int = 900) -> Iterator[Any]:
    """A Selenium WebDriver on a headless Chromium with a fresh profile, quit after the block."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="flowcraft-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--no-first-run", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--hide-scrollbars", f"--window-size={width},{height}",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
