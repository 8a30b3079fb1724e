"""Take the README's dashboard screenshots (docs/dashboard-*.png) with a headless Chromium.

    PYTHONPATH=.:adapters .venv/bin/python docs/screenshots.py

Builds a demo on the in-memory fakes (an order pipeline with an approval, a loop and a batch, a
payment that fails), serves the dashboard in a thread and photographs the overview, the run list
and a run's page. Needs selenium and /usr/bin/chromium + /usr/bin/chromedriver.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Tuple

from flowcraft import FlowRuntime, create_flow
from flowcraft.dashboard import create_app
from flowcraft.testing import InMemoryAdapter
from flowcraft.testing.web import headless_chromium, serving

HERE = os.path.dirname(os.path.abspath(__file__))


class Payments:
    """A payment service that is down for the first runs."""

    down = True

    def charge(self, ctx: Any) -> Any:
        if self.down and ctx.context.get("customer") in ("acme", "globex"):
            raise ConnectionError("payment gateway timed out after 30s (POST /v2/charges)")
        return {"charged": ctx.context.get("total", 0)}


class DemoClock:
    """Time that moves on a few minutes per run, so that the demo spans an afternoon."""

    def __init__(self) -> None:
        self.now = time.time() - 5 * 3600

    def __call__(self) -> float:
        self.now += 0.4
        return self.now

    def advance(self, minutes: float) -> None:
        self.now += minutes * 60


def demo() -> Tuple[InMemoryAdapter, str]:
    """An adapter holding a few dozen runs; returns it and the id of a run awaiting approval."""
    payments = Payments()
    orders = (create_flow("order-fulfilment")
              .node("validate", lambda ctx: {"ok": True})
              .node("reserve_stock", lambda ctx: {"reserved": 3})
              .node("charge_card", payments.charge)
              .node("prepare", lambda ctx: {"ready": True})
              .wait("approval")
              .node("ship", lambda ctx: {"tracking": "1Z999"})
              .node("refund", lambda ctx: {"refunded": True})
              .batch("notify", lambda ctx: f"sent to {ctx.input}", input_key="recipients", output_key="sent")
              .node("archive", lambda ctx: "archived")
              .edge("validate", "reserve_stock").edge("validate", "charge_card")
              .edge("reserve_stock", "prepare").edge("charge_card", "prepare")
              .edge("prepare", "approval")
              .edge("approval", "ship", action="approve").edge("approval", "refund", action="reject")
              .edge("ship", "notify_scatter").edge("notify_gather", "archive"))
    ingest = (create_flow("nightly-ingest")
              .node("fetch_page", lambda ctx: ctx.context.set("page", (ctx.context.get("page") or 0) + 1) or "page")
              .node("parse", lambda ctx: {"rows": 100}).edge("fetch_page", "parse")
              .loop("pages", start_node_id="fetch_page", end_node_id="parse", condition="page < 3")
              .node("publish", lambda ctx: "published")
              .edge("pages", "publish", action="break"))
    runtime = FlowRuntime()
    for flow in (orders, ingest):
        runtime.add_blueprint(flow)
    clock = DemoClock()
    adapter = InMemoryAdapter(runtime, clock=clock)
    customers = ["initech", "acme", "umbrella", "globex", "hooli", "stark", "wayne", "wonka"]
    previous = None
    for i in range(26):
        run_id = adapter.start_workflow("order-fulfilment", {"customer": customers[i % len(customers)], "total": 40 + i,
                                                             "recipients": ["ops@example.com", "buyer@example.com"]})
        if i % 4 == 0:
            adapter.start_workflow("nightly-ingest", {"source": f"s3://exports/2026-12-{i + 1:02d}.csv"})
        adapter.drain()
        if previous is not None and i % 5 != 4:  # the approver decides on the previous order now
            adapter.resume_with_action(previous, "reject" if i % 6 == 0 else "approve")
            adapter.drain()
        status = adapter.get_status(run_id)
        previous = run_id if status is not None and status.status == "awaiting" else None
        clock.advance(11)
    payments.down = False
    adapter.start_workflow("order-fulfilment", {"customer": "initech", "total": 99})  # queued: no worker ran it yet
    awaiting = [r.run_id for r in adapter.list_runs(status="awaiting", limit=100).runs]
    return adapter, awaiting[0]


def shoot(driver: Any, url: str, name: str, height: int) -> None:
    """A screenshot of the page at `url`, at most `height` pixels tall (less if the page is shorter)."""
    driver.set_window_size(1400, height)
    driver.get(url)
    time.sleep(0.3)
    content = int(driver.execute_script("return document.documentElement.scrollHeight"))
    if content < height:
        driver.set_window_size(1400, content + (height - int(driver.execute_script("return window.innerHeight"))))
        time.sleep(0.2)
    path = os.path.join(HERE, name)
    driver.save_screenshot(path)
    print(f"wrote {os.path.relpath(path)}")


def main() -> int:
    logging.getLogger("flowcraft").setLevel(logging.CRITICAL)  # the demo's failing payments are expected
    adapter, run_id = demo()
    with serving(create_app(adapter)) as base, headless_chromium() as driver:
        shoot(driver, base + "/", "dashboard-overview.png", 1100)
        shoot(driver, base + "/runs?limit=12", "dashboard-runs.png", 1000)
        shoot(driver, f"{base}/runs/{run_id}", "dashboard-run.png", 1250)
    return 0


if __name__ == "__main__":
    sys.exit(main())
