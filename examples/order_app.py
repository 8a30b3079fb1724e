"""The node code behind `examples/blueprints/order.json`, and a runtime that knows both.

A JSON blueprint (here in the Flowcraft TS wire format) names each node's code by a `uses` key;
this module supplies a registry with those keys. The command line loads it by name:

    flowcraft run examples/blueprints/order.json --app examples.order_app:runtime --context '{"orderId": "A-1002"}'

or run this file directly:

    python examples/order_app.py
"""
from __future__ import annotations

from pathlib import Path

from flowcraft import FlowRuntime, NodeContext, NodeResult, Registry, WorkflowBlueprint

BLUEPRINT_PATH = Path(__file__).parent / "blueprints" / "order.json"

ORDERS = {
    "A-1001": {"items": [{"sku": "lamp", "qty": 1}], "total": 45.0, "email": "ada@example.com"},
    "A-1002": {"items": [{"sku": "sofa", "qty": 1}], "total": 899.0, "email": "alan@example.com"},
}
STOCK = {"lamp": 12, "sofa": 0}
DEMO_ORDER_ID = "A-1001"  # used when the run starts without an orderId, e.g. `flowcraft run` with no --context

registry = Registry()


@registry.node("fetch-order")
def fetch_order(ctx: NodeContext):
    order_id = ctx.input or DEMO_ORDER_ID  # the node's `inputs: "orderId"` reads that context key
    return {"orderId": order_id, **ORDERS[order_id]}


@registry.node("read-cache")
def read_cache(ctx: NodeContext):
    # The blueprint's fallback for `fetch`: after its last failed attempt this runs in its place,
    # with the same input, and serves a cached copy (here the same fake data, marked stale).
    order_id = ctx.input or DEMO_ORDER_ID
    return {"orderId": order_id, **ORDERS[order_id], "stale": True}


@registry.node("check-stock")
def check_stock(ctx: NodeContext):
    order = ctx.input
    in_stock = all(STOCK.get(item["sku"], 0) >= item["qty"] for item in order["items"])
    # The action names match the edges' `action` fields in the JSON.
    return NodeResult(output=order, action="in-stock" if in_stock else "backorder")


@registry.node("reserve-stock")
def reserve_stock(ctx: NodeContext):
    return {**ctx.input, "shipsInDays": 0}


@registry.node("schedule-backorder")
def schedule_backorder(ctx: NodeContext):
    return {**ctx.input, "shipsInDays": ctx.params["restockDays"]}


@registry.node("ship-order")
def ship_order(ctx: NodeContext):
    order = ctx.input  # an `all` join: only one of its two branches ran, so this is that branch's output
    return {"orderId": order["orderId"], "trackingNumber": f"TRK-{order['orderId']}", "shipsInDays": order["shipsInDays"]}


@registry.node("send-email")
def send_email(ctx: NodeContext):
    # The edge's transform `input.trackingNumber` hands this node just the tracking number.
    return f"{ctx.params['template']}: tracking {ctx.input}"


def load_blueprint() -> WorkflowBlueprint:
    # from_json validates and converts the wire format (retryDelay/timeout in ms -> seconds).
    return WorkflowBlueprint.from_json(BLUEPRINT_PATH.read_text())


runtime = FlowRuntime(registry=registry, blueprints=[load_blueprint()])


def main(order_id: str = DEMO_ORDER_ID):
    result = runtime.run("order", {"orderId": order_id})  # a known blueprint can be run by its id
    print(f"order {order_id}: {result.status}")
    print(f"  {result.context['notify']} (ships in {result.context['ship']['shipsInDays']} days)")
    print(f"  skipped: {', '.join(result.skipped) or '-'}")
    return result


if __name__ == "__main__":
    main()
