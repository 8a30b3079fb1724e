"""Quick start: a three-step order flow, run in memory.

    fetch_order --> calculate_total --(total > 100)--> apply_discount

Run it from the repository root:

    python examples/quickstart.py
"""
from __future__ import annotations

from flowcraft import BaseNode, NodeContext, create_flow

# A stand-in for a database: order id -> line items.
ORDERS = {
    "A-1001": [{"sku": "keyboard", "price": 80.0, "qty": 1}, {"sku": "mouse", "price": 25.0, "qty": 2}],
    "A-1002": [{"sku": "cable", "price": 9.5, "qty": 2}],
}


def fetch_order(ctx: NodeContext):
    # `inputs="order_id"` on the node below hands us that context key as ctx.input.
    # A plain return value becomes the node's output.
    return {"order_id": ctx.input, "items": ORDERS[ctx.input]}


class CalculateTotal(BaseNode):
    """Prices an order through a pricing service that sometimes times out.

    Only `exec` is retried, so the flaky call lives there; `prep` and `post` run once.
    """

    def exec(self, prep_result, ctx: NodeContext):
        if ctx.attempt == 1:
            # Simulate a transient outage on the first attempt; the engine retries exec().
            raise TimeoutError("pricing service timed out")
        order = ctx.input  # the output of fetch_order, the node that triggered this one
        total = sum(item["price"] * item["qty"] for item in order["items"])
        return {"order_id": order["order_id"], "total": total, "attempts": ctx.attempt}


def apply_discount(ctx: NodeContext):
    # Only reached when the edge condition below holds.
    order = ctx.input
    return {"order_id": order["order_id"], "total": round(order["total"] * 0.9, 2)}


flow = (
    create_flow("quickstart-order")
    .node("fetch_order", fetch_order, inputs="order_id")
    # max_retries is the total number of attempts (1 = no retry); retry_delay is in seconds.
    .node("calculate_total", CalculateTotal, max_retries=3, retry_delay=0.01)
    .node("apply_discount", apply_discount)
    .edge("fetch_order", "calculate_total")
    # Conditions are safe expressions over the context plus `result` (this node's result).
    .edge("calculate_total", "apply_discount", condition="result.output.total > 100")
)


def main(order_id: str = "A-1001"):
    result = flow.run(initial_context={"order_id": order_id})
    priced = result.context["calculate_total"]
    print(f"order {order_id}: {result.status}")
    print(f"  total {priced['total']:.2f} (priced after {priced['attempts']} attempts)")
    if "apply_discount" in result.context:
        print(f"  discounted total {result.context['apply_discount']['total']:.2f}")
    else:
        # A node whose only incoming edge was not taken is skipped, not failed.
        print(f"  no discount (skipped: {', '.join(result.skipped)})")
    return result


if __name__ == "__main__":
    main()
