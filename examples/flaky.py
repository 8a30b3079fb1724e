"""A checkout whose payment dependency is down while a file named `payment-down` exists in the
working directory (README "Operating Flowcraft": find the failed run, read its traceback, fix
the cause, retry it).

    flowcraft start checkout --app examples.flaky:runtime
    flowcraft worker --burst --app examples.flaky:runtime
"""
import os

from flowcraft import FlowRuntime, create_flow


def load_order(ctx):
    return {"order": ctx.context.get("orderId", "A-1"), "amount": 42}


def charge(ctx):
    if os.path.exists("payment-down"):
        raise ConnectionError("payment service unavailable")
    return {"charged": ctx.input["amount"]}


def ship(ctx):
    return "shipped"


checkout = (create_flow("checkout").node("load", load_order).node("charge", charge).node("ship", ship)
            .edge("load", "charge").edge("charge", "ship"))
runtime = FlowRuntime(blueprints=[checkout])


def main() -> None:
    """Run the checkout once in memory: it fails while `payment-down` exists here, else completes."""
    result = runtime.run("checkout", {"orderId": "A-1"})
    print(f"checkout A-1: {result.status}")
    for error in result.errors:
        print(f"  node {error.node_id}: {error.type}: {error.message}")


if __name__ == "__main__":
    main()
