"""The order-fulfilment workflow that the backend examples share: a blueprint, the registry of its
node code, and `make_runtime()`. Workers (`redis_worker.py`, `rabbitmq_worker.py`) and clients
(`redis_client.py`, `rabbitmq_client.py`) import this same module, as the seeds' workers and
clients share `blueprints` and `registry`. Only workers run node code; a client only names the
blueprint. `serve()` is the example workers' main loop.

                       +--> reserve_stock --+
    receive_order -----+--> score_risk -----+--> decide --approve--> charge_payment --+--> send_confirmation
                       +--> quote_shipping -+      |                                  |
                                                   +--reject---> cancel_order --------+

    charge_payment --(result.output.amount >= 100)--> award_points

- fan-out: the three checks are independent jobs (several workers run them at once);
- fan-in: `decide` is an `all` join; its input is `{check id: output}`, in edge order;
- `decide` returns an action: only that branch runs, the other one is dead, and
  `send_confirmation` (an `all` join of both branches) still runs, once;
- `award_points` runs only when its edge's condition holds (else it is reported skipped).

Run every demo order in memory (no servers):

    python examples/workflows.py

A worker of the `flowcraft` command can load the same runtime:
`flowcraft worker --backend redis --app examples.workflows:runtime`.
"""
from __future__ import annotations

import signal
import time
from typing import Any, Dict, List, Optional

from flowcraft import FlowRuntime, NodeContext, NodeResult, Registry, WorkflowResult, create_flow

BLUEPRINT_ID = "order-fulfilment"

# Demo data. Real nodes would call the order service, the warehouse, the payment provider...
CATALOGUE = {"lamp": 45.0, "rug": 60.0, "sofa": 899.0, "notebook": 4.5}
STOCK = {"lamp": 12, "rug": 3, "sofa": 0, "notebook": 40}
CUSTOMERS = {"ada": {"since": 2019, "country": "DE"}, "alan": {"since": 2021, "country": "GB"},
             "grace": {"since": 2024, "country": "US"}}
ORDERS = {
    "A-1001": {"customer": "ada", "lines": [{"sku": "lamp", "qty": 2}, {"sku": "rug", "qty": 1}]},
    "A-1002": {"customer": "alan", "lines": [{"sku": "sofa", "qty": 1}]},
    "A-1003": {"customer": "grace", "lines": [{"sku": "notebook", "qty": 3}]},
}
SHIPPING = {"DE": ("DHL", 4.9), "GB": ("Royal Mail", 7.5), "US": ("UPS", 12.0)}
FREE_SHIPPING_FROM = 100.0
RISK_LIMIT = 50

registry = Registry()


@registry.node("receive-order")
def receive_order(ctx: NodeContext) -> Dict[str, Any]:
    order = ORDERS[ctx.input]  # the node's `inputs="orderId"` reads that context key; unknown id: the run fails
    lines = [{**line, "price": CATALOGUE[line["sku"]]} for line in order["lines"]]
    subtotal = round(sum(line["qty"] * line["price"] for line in lines), 2)
    return {"orderId": ctx.input, "customer": order["customer"], "lines": lines, "subtotal": subtotal}


@registry.node("reserve-stock")
def reserve_stock(ctx: NodeContext) -> Dict[str, Any]:
    missing = [line["sku"] for line in ctx.input["lines"] if STOCK.get(line["sku"], 0) < line["qty"]]
    return {"reserved": not missing, "missing": missing}


@registry.node("score-risk")
def score_risk(ctx: NodeContext) -> Dict[str, Any]:
    order = ctx.input
    score = 10 if CUSTOMERS[order["customer"]]["since"] <= 2020 else 40
    if order["subtotal"] > 500:
        score += 30
    return {"score": score}


@registry.node("quote-shipping")
def quote_shipping(ctx: NodeContext) -> Dict[str, Any]:
    order = ctx.input
    carrier, fee = SHIPPING[CUSTOMERS[order["customer"]]["country"]]
    return {"carrier": carrier, "fee": 0.0 if order["subtotal"] >= FREE_SHIPPING_FROM else fee}


@registry.node("decide")
def decide(ctx: NodeContext) -> NodeResult:
    checks = ctx.input  # an `all` join reached by three edges: {"reserve_stock": ..., "score_risk": ..., ...}
    order = ctx.context.get("receive_order")
    reasons = [f"out of stock: {sku}" for sku in checks["reserve_stock"]["missing"]]
    if checks["score_risk"]["score"] >= RISK_LIMIT:
        reasons.append(f"risk score {checks['score_risk']['score']}")
    total = round(order["subtotal"] + checks["quote_shipping"]["fee"], 2)
    decision = {"orderId": order["orderId"], "total": total, "carrier": checks["quote_shipping"]["carrier"],
                "reasons": reasons}
    # The action, not the output, picks the branch (edges labelled "approve" / "reject").
    return NodeResult(output=decision, action="reject" if reasons else "approve")


@registry.node("charge-payment")
def charge_payment(ctx: NodeContext) -> Dict[str, Any]:
    # ctx.idempotency_key is the same for every redelivery of this node execution: a real payment
    # call passes it to the provider, so a job delivered twice never charges twice.
    return {"orderId": ctx.input["orderId"], "amount": ctx.input["total"], "paid": True,
            "reference": f"pay-{ctx.input['orderId']}"}


@registry.node("award-points")
def award_points(ctx: NodeContext) -> Dict[str, Any]:
    return {"customer": ctx.context.get("receive_order")["customer"], "points": int(ctx.input["amount"]) // 10}


@registry.node("cancel-order")
def cancel_order(ctx: NodeContext) -> Dict[str, Any]:
    return {"orderId": ctx.input["orderId"], "cancelled": True, "reasons": ctx.input["reasons"]}


@registry.node("send-confirmation")
def send_confirmation(ctx: NodeContext) -> str:
    outcome = ctx.input  # only one branch ran, so this is that branch's output, as-is
    if outcome.get("paid"):
        return f"{outcome['orderId']}: charged {outcome['amount']:.2f} ({outcome['reference']})"
    return f"{outcome['orderId']}: cancelled ({'; '.join(outcome['reasons'])})"


order_fulfilment = (
    create_flow(BLUEPRINT_ID, metadata={"version": "1.0.0"})
    .node("receive_order", "receive-order", inputs="orderId")
    .node("reserve_stock", "reserve-stock")
    .node("score_risk", "score-risk")
    .node("quote_shipping", "quote-shipping")
    .node("decide", "decide")
    .node("charge_payment", "charge-payment", max_retries=3, retry_delay=0.2)
    .node("award_points", "award-points")
    .node("cancel_order", "cancel-order")
    .node("send_confirmation", "send-confirmation")
    .edge("receive_order", "reserve_stock")
    .edge("receive_order", "score_risk")
    .edge("receive_order", "quote_shipping")
    .edge("reserve_stock", "decide")
    .edge("score_risk", "decide")
    .edge("quote_shipping", "decide")
    .edge("decide", "charge_payment", action="approve")
    .edge("decide", "cancel_order", action="reject")
    .edge("charge_payment", "send_confirmation")
    .edge("cancel_order", "send_confirmation")
    .edge("charge_payment", "award_points", condition="result.output.amount >= 100")
)


class SimulatedLatency:
    """Middleware: every node takes `seconds` longer, standing in for the I/O of real node code
    (to watch several workers share runs, or to restart a service in the middle of one)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def before(self, ctx: NodeContext) -> None:
        time.sleep(self.seconds)


def make_runtime(latency: float = 0.0) -> FlowRuntime:
    """A runtime that knows the order-fulfilment blueprint and its node code."""
    middleware = [SimulatedLatency(latency)] if latency > 0 else []
    return FlowRuntime(registry=registry, blueprints=[order_fulfilment], middleware=middleware)


runtime = make_runtime()  # for `--app examples.workflows:runtime`


def serve(adapter: Any, burst: bool = False) -> Optional[int]:
    """Run an example worker until SIGTERM or SIGINT (Ctrl-C), or with `burst` until the queue is
    empty; return how many jobs it processed (None when it ran in the background).

    The signal handler only records the signal (it may interrupt the worker anywhere, even inside
    a lock); `adapter.stop()` runs afterwards, in the main thread, and finishes the job in hand."""
    received: List[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: received.append(signum))
    if burst:
        processed = 0
        while not received:
            done = adapter.work(burst=True, max_jobs=1)  # one job per call: a signal waits for one job at most
            if not done:
                break
            processed += done
        return processed
    adapter.start()  # the worker loop, on a background thread
    while not received:
        time.sleep(0.2)
    adapter.stop(timeout=60)
    return None


def main() -> Dict[str, WorkflowResult]:
    results = {}
    for order_id in ORDERS:
        result = runtime.run(BLUEPRINT_ID, {"orderId": order_id})
        results[order_id] = result
        print(f"{order_id}: {result.status}: {result.context.get('send_confirmation')}")
        print(f"  skipped: {', '.join(result.skipped) or '-'}")
    return results


if __name__ == "__main__":
    main()
