"""The dashboard in a real browser (headless Chromium driven by Selenium), served by wsgiref in a
thread on an ephemeral port, over the in-memory fakes with a worker running in the background.

Run them: `PYTHONPATH=.:adapters .venv/bin/python -m pytest tests/test_dashboard_browser.py -q`
(needs `pip install selenium` and /usr/bin/chromium + /usr/bin/chromedriver; skipped with the
reason when absent, a failure with FLOWCRAFT_REQUIRE_SERVICES=1 as in CI)."""
from __future__ import annotations

import base64
import os
import time
from typing import Any, Callable, Dict, Iterator, Tuple

import pytest

from flowcraft.dashboard import create_app
from flowcraft.testing import InMemoryAdapter
from flowcraft.testing.web import browser_available, headless_chromium, serving
from tests.dashboard_scenarios import XSS_ERROR, XSS_NODE, XSS_OUTPUT, XSS_RUN_ID, Payments, runtime

pytestmark = pytest.mark.slow

_missing = browser_available()
if _missing is not None:
    if os.environ.get("FLOWCRAFT_REQUIRE_SERVICES", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise RuntimeError(f"browser tests need a browser: {_missing}")
    pytest.skip(f"no headless browser: {_missing}", allow_module_level=True)

from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

# the CSS fill of each state (assets.CSS: --completed, --running, ...)
FILLS = {"completed": "rgb(200, 230, 201)", "awaiting": "rgb(255, 232, 163)", "failed": "rgb(255, 205, 210)",
         "running": "rgb(187, 222, 251)", "skipped": "rgb(224, 224, 224)", "pending": "rgb(255, 255, 255)"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with headless_chromium(1300, 900) as driver:
        yield driver


@pytest.fixture
def payments() -> Payments:
    return Payments()


@pytest.fixture
def adapter(payments: Payments) -> Iterator[InMemoryAdapter]:
    made = InMemoryAdapter(runtime(payments))
    yield made
    made.stop(timeout=5)


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """serve(app) -> base URL, stopped after the test."""
    stack = []

    def start(app: Any) -> str:
        context = serving(app)
        stack.append(context)
        return context.__enter__()

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


def _run(adapter: InMemoryAdapter, blueprint: str, **kwargs: Any) -> str:
    run_id = adapter.start_workflow(blueprint, {}, **kwargs)
    adapter.drain()
    return run_id


def _wait(browser: Any, check: Callable[[Any], Any], timeout: float = 15.0) -> Any:
    # the page is replaced while the check reads it (the action's redirect, the live refresh): an
    # element found in the old page and read in the new one is stale (chromedriver says so in
    # several ways, all WebDriverExceptions); look again at the next poll
    return WebDriverWait(browser, timeout, poll_frequency=0.1, ignored_exceptions=(WebDriverException,)).until(check)


def _status_badge(browser: Any) -> str:
    # read in one script call, not found then read: the page may be replaced in between
    return str(browser.execute_script(
        "const badge = document.getElementById('run-status'); return badge ? badge.textContent.trim() : '';"))


def _node_fills(browser: Any) -> Dict[str, Tuple[str, str]]:
    """node id -> (state class, computed fill of its shape), read in the page."""
    return {k: tuple(v) for k, v in browser.execute_script("""
        var out = {};
        document.querySelectorAll('svg.graph g.node').forEach(function (g) {
          var state = (g.getAttribute('class').match(/st-([a-z]+)/) || [])[1];
          out[g.getAttribute('data-node')] = [state, getComputedStyle(g.querySelector('.shape')).fill];
        });
        return out;""").items()}


def test_run_list_filters(browser: Any, adapter: InMemoryAdapter, serve: Any) -> None:
    approvals = {_run(adapter, "approval") for _ in range(3)}
    failed = _run(adapter, "pay")
    base = serve(create_app(adapter))
    browser.get(base + "/runs")

    def listed() -> set:
        return {a.text for a in browser.find_elements(By.CSS_SELECTOR, "table.runs tbody td:first-child a")}

    assert listed() == approvals | {failed}
    Select(browser.find_element(By.ID, "f-status")).select_by_value("failed")
    browser.find_element(By.ID, "f-apply").click()
    _wait(browser, lambda d: "status=failed" in d.current_url)
    assert listed() == {failed}
    Select(browser.find_element(By.ID, "f-status")).select_by_value("")
    Select(browser.find_element(By.ID, "f-blueprint")).select_by_value("approval")
    limit = browser.find_element(By.ID, "f-limit")
    limit.clear()
    limit.send_keys("2")
    browser.find_element(By.ID, "f-apply").click()
    _wait(browser, lambda d: "blueprint=approval" in d.current_url)
    first = listed()
    assert len(first) == 2 and first <= approvals
    browser.find_element(By.ID, "next-page").click()
    _wait(browser, lambda d: "cursor=" in d.current_url)
    assert listed() == approvals - first
    browser.find_element(By.ID, "f-since").send_keys("01012099" + "\t" + "000000AM")  # a date in the future
    browser.find_element(By.ID, "f-apply").click()
    _wait(browser, lambda d: "since=2099" in d.current_url)
    assert listed() == set()


def test_svg_shows_every_node_in_its_state_colour(browser: Any, adapter: InMemoryAdapter, serve: Any) -> None:
    base = serve(create_app(adapter))
    waiting = _run(adapter, "approval")
    browser.get(f"{base}/runs/{waiting}")
    fills = _node_fills(browser)
    assert fills == {"prepare": ("completed", FILLS["completed"]), "review": ("awaiting", FILLS["awaiting"]),
                     "ship": ("pending", FILLS["pending"]), "refund": ("pending", FILLS["pending"])}
    failed = _run(adapter, "pay")
    browser.get(f"{base}/runs/{failed}")
    assert _node_fills(browser) == {"load": ("completed", FILLS["completed"]), "charge": ("failed", FILLS["failed"]),
                                    "ship": ("pending", FILLS["pending"])}
    assert "payment service unavailable" in browser.find_element(By.CSS_SELECTOR, "pre.tb").text
    legend = browser.find_element(By.CSS_SELECTOR, ".legend").text
    for state in FILLS:
        assert state in legend
    adapter.start_workflow("approval", {})  # no worker: its first node stays ready, drawn running
    queued = adapter.list_runs(status="running").runs[0].run_id
    browser.get(f"{base}/runs/{queued}")
    assert _node_fills(browser)["prepare"] == ("running", FILLS["running"])


def test_approval_resumed_from_the_page(browser: Any, adapter: InMemoryAdapter, serve: Any) -> None:
    base = serve(create_app(adapter))
    run_id = _run(adapter, "approval")
    adapter.start()  # a worker in the background
    browser.get(f"{base}/runs/{run_id}")
    buttons = {b.text: b for b in browser.find_elements(By.CSS_SELECTOR, 'form[data-action="resume"] button')}
    assert set(buttons) == {"Resume review: approve", "Resume review: reject"}
    buttons["Resume review: approve"].click()
    _wait(browser, lambda d: _status_badge(d) == "completed")  # the page refreshes itself while the run is live
    fills = _node_fills(browser)
    assert fills["ship"] == ("completed", FILLS["completed"]) and fills["refund"] == ("skipped", FILLS["skipped"])
    assert adapter.store.read_all_context(run_id)["_outputs.ship"] == "shipped"


def test_failed_run_retried_from_the_page(browser: Any, adapter: InMemoryAdapter, payments: Payments,
                                          serve: Any) -> None:
    base = serve(create_app(adapter))
    run_id = _run(adapter, "pay")
    adapter.start()
    browser.get(f"{base}/runs/{run_id}")
    assert _status_badge(browser) == "failed"
    payments.down = False
    browser.find_element(By.CSS_SELECTOR, 'form[data-action="retry"] button').click()
    _wait(browser, lambda d: _status_badge(d) == "completed")
    assert {state for state, _ in _node_fills(browser).values()} == {"completed"}
    assert adapter.get_status(run_id).status == "completed"  # type: ignore[union-attr]


def _fetch_status(browser: Any, method: str, path: str, headers: Dict[str, str]) -> int:
    return int(browser.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "fetch(arguments[1], {method: arguments[0], headers: arguments[2], credentials: 'omit'}).then(function (r) { done(r.status); });",
        method, path, headers))


def test_read_only_answers_403(browser: Any, adapter: InMemoryAdapter, serve: Any) -> None:
    app = create_app(adapter, read_only=True)
    base = serve(app)
    run_id = _run(adapter, "approval")
    browser.get(f"{base}/runs/{run_id}")
    assert browser.find_elements(By.CSS_SELECTOR, "form[method=post]") == []
    assert "read-only" in browser.find_element(By.CSS_SELECTOR, "header .mode").text
    status = _fetch_status(browser, "POST", f"/api/runs/{run_id}/cancel", {"X-CSRF-Token": app.csrf_token})
    assert status == 403
    assert adapter.get_status(run_id).status == "awaiting"  # type: ignore[union-attr]


def test_auth_answers_401_without_credentials(browser: Any, adapter: InMemoryAdapter, serve: Any) -> None:
    base = serve(create_app(adapter, auth="admin:s3cret"))
    _run(adapter, "approval")
    good = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": good}})
    try:
        browser.get(base + "/runs")
        assert browser.find_elements(By.CSS_SELECTOR, "table.runs tbody tr")
    finally:
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
    answer = browser.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "fetch('/api/runs', {credentials: 'omit'}).then(function (r) { done([r.status, r.headers.get('WWW-Authenticate')]); });")
    assert answer == [401, 'Basic realm="flowcraft", charset="UTF-8"']
    assert _fetch_status(browser, "GET", "/api/runs", {"Authorization": "Basic " + base64.b64encode(b"admin:x").decode()}) == 401
    assert _fetch_status(browser, "GET", "/api/runs", {"Authorization": good}) == 200
    browser.get(base + "/runs")  # the browser's own navigation, without credentials: nothing shown
    assert browser.find_elements(By.CSS_SELECTOR, "table.runs") == []
    browser.get("about:blank")


def test_xss_payloads_are_shown_as_text_never_run(browser: Any, adapter: InMemoryAdapter, serve: Any) -> None:
    base = serve(create_app(adapter))
    run_id = _run(adapter, "xss", run_id=XSS_RUN_ID)
    for path in ("/", "/runs", "/blueprints/xss", "/runs/" + base64.b16encode(b"").decode()):
        browser.get(base + path)
        assert browser.execute_script("return window.__xss === undefined")
    from flowcraft.dashboard.pages import path_part

    browser.get(f"{base}/runs/{path_part(run_id)}")
    time.sleep(0.2)
    assert browser.execute_script("return window.__xss === undefined")
    assert XSS_RUN_ID in browser.find_element(By.TAG_NAME, "h1").text
    assert XSS_ERROR in browser.find_element(By.CSS_SELECTOR, ".error").text
    titles = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg.graph g.node title')).map(function (t) { return t.textContent; })")
    assert any(t.startswith(XSS_NODE) for t in titles)
    context = browser.find_element(By.CSS_SELECTOR, "table.context").text
    assert XSS_OUTPUT in context
    assert browser.execute_script("return document.querySelectorAll('main script, main img, svg.graph svg').length") == 1
