"""Order processing with actions, conditions, a merging join and a fallback node.

    validate_order --> check_stock --in_stock--> reserve_stock --------+
                           |                                         +--> charge_payment --> send_confirmation
                           +--backorder--> schedule_backorder -------+    |
                                                                          +--(amount > 500)--> fraud_review

    (if charge_payment fails for good, pay_by_invoice runs in its place)

- `check_stock` returns an *action*; only the edges labelled with that action are followed.
- `charge_payment` has two incoming edges but only one branch ever runs. It is an `all` join
  (the default), and it still runs: the branch that was not taken is marked dead, and a join
  waits only for edges that can still arrive.
- `charge_payment` calls a flaky gateway. After its last attempt fails, the `pay_by_invoice`
  node runs in its place, and the run carries on from its result.

    python examples/order_pipeline.py
"""
from __future__ import annotations

from flowcraft import NodeContext, NodeResult, create_flow

WAREHOUSE = {"lamp": 12, "sofa": 0, "rug": 3}

ORDERS = {
    "O-1": {"item": "lamp", "qty": 2, "unit_price": 45.0, "card": "visa"},
    "O-2": {"item": "sofa", "qty": 1, "unit_price": 899.0, "card": "amex"},
}

# Which card networks the fake payment gateway can currently reach.
GATEWAY_ONLINE = {"visa": True, "amex": False}


def validate_order(ctx: NodeContext):
    order = ORDERS[ctx.input]
    if order["qty"] <= 0:
        raise ValueError(f"order {ctx.input}: quantity must be positive")
    return {"order_id": ctx.input, **order, "amount": order["qty"] * order["unit_price"]}


def check_stock(ctx: NodeContext):
    order = ctx.input
    in_stock = WAREHOUSE.get(order["item"], 0) >= order["qty"]
    # The action, not the output, picks the branch.
    return NodeResult(output=order, action="in_stock" if in_stock else "backorder")


def reserve_stock(ctx: NodeContext):
    order = ctx.input
    return {**order, "fulfilment": "ships today"}


def schedule_backorder(ctx: NodeContext):
    order = ctx.input
    return {**order, "fulfilment": "ships when restocked"}


def charge_payment(ctx: NodeContext):
    # One branch is dead, so the join receives the live branch's output as-is
    # (it would get {predecessor id: output} if both had run).
    order = ctx.input
    if not GATEWAY_ONLINE[order["card"]]:
        raise ConnectionError(f"payment gateway unreachable for {order['card']}")
    return {**order, "paid_by": "card"}


def pay_by_invoice(ctx: NodeContext):
    # A fallback node receives the failed node's input, so it can do the same job another way.
    order = ctx.input
    return {**order, "paid_by": "invoice"}


def send_confirmation(ctx: NodeContext):
    order = ctx.input
    return f"{order['order_id']}: {order['qty']} x {order['item']}, {order['fulfilment']}, paid by {order['paid_by']}"


def fraud_review(ctx: NodeContext):
    return {"order_id": ctx.input["order_id"], "queued_for_review": True}


flow = (
    create_flow("order-pipeline")
    .node("validate_order", validate_order, inputs="order_id")
    .node("check_stock", check_stock)
    .node("reserve_stock", reserve_stock)
    .node("schedule_backorder", schedule_backorder)
    .node("charge_payment", charge_payment, max_retries=2, fallback="pay_by_invoice")
    .node("pay_by_invoice", pay_by_invoice)
    .node("send_confirmation", send_confirmation)
    .node("fraud_review", fraud_review)
    .edge("validate_order", "check_stock")
    .edge("check_stock", "reserve_stock", action="in_stock")
    .edge("check_stock", "schedule_backorder", action="backorder")
    .edge("reserve_stock", "charge_payment")
    .edge("schedule_backorder", "charge_payment")
    .edge("charge_payment", "send_confirmation")
    .edge("charge_payment", "fraud_review", condition="result.output.amount > 500")
)


def main():
    results = {}
    for order_id in ORDERS:
        result = flow.run(initial_context={"order_id": order_id})
        results[order_id] = result
        print(f"{order_id}: {result.status}")
        print(f"  {result.context.get('send_confirmation')}")
        if result.context.get("fraud_review"):
            print("  large order: queued for fraud review")
        print(f"  skipped: {', '.join(result.skipped) or '-'}")
    return results


if __name__ == "__main__":
    main()
