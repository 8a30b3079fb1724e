"""A subflow: a parent workflow runs a reusable child workflow as one of its steps.

    child  "price-cart":  subtotal --> shipping --> total
    parent "checkout":    load_cart --> price (runs "price-cart") --> receipt

The parent's `price` node maps parent context keys into the child's starting context
(`inputs`: child key -> parent key) and copies child results back (`outputs`: parent key ->
child key). The child runs with its own context, so its internal keys never leak into the parent.

    python examples/subflow.py
"""
from __future__ import annotations

from flowcraft import FlowRuntime, NodeContext, create_flow

FREE_SHIPPING_FROM = 50.0


# --- the child: prices a cart ---------------------------------------------------------------

def subtotal(ctx: NodeContext):
    return sum(line["price"] * line["qty"] for line in ctx.input)


def shipping(ctx: NodeContext):
    return 0.0 if ctx.input >= FREE_SHIPPING_FROM else 4.95


def total(ctx: NodeContext):
    return round(ctx.context.get("subtotal") + ctx.input, 2)


price_cart = (
    create_flow("price-cart")
    .node("subtotal", subtotal, inputs="lines")  # `lines` is set by the parent's input mapping
    .node("shipping", shipping)
    .node("total", total)
    .edge("subtotal", "shipping")
    .edge("shipping", "total")
)


# --- the parent: a checkout that reuses the child -------------------------------------------

def load_cart(ctx: NodeContext):
    ctx.context.set("cart", [{"sku": "mug", "price": 12.0, "qty": 2}, {"sku": "tea", "price": 7.5, "qty": 1}])
    return "loaded"


def receipt(ctx: NodeContext):
    return f"charged {ctx.context.get('order_total'):.2f} (shipping {ctx.context.get('shipping_fee'):.2f})"


checkout = (
    create_flow("checkout")
    .node("load_cart", load_cart)
    .subflow("price", "price-cart",
             inputs={"lines": "cart"},                                # child `lines` <- parent `cart`
             outputs={"order_total": "total", "shipping_fee": "shipping"})  # parent key <- child key
    .node("receipt", receipt)
    .edge("load_cart", "price")
    .edge("price", "receipt")
)

# The runtime knows the child by its id. Passing the Flow (not just its blueprint) also
# registers the child's node functions, so the parent can run it.
runtime = FlowRuntime(blueprints=[price_cart])


def main():
    result = checkout.run(runtime)
    print(f"{result.status}: {result.context['receipt']}")
    print(f"  the price step returned {result.context['price']}")
    return result


if __name__ == "__main__":
    main()
