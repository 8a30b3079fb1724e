"""A batch: run one worker per item of a list, and collect the results in item order.

    load_invoices --> add_tax (x 1,000) --> summarize

`.batch("add_tax", worker, input_key=..., output_key=...)` reads the list at `input_key`,
runs `worker` once per item (each item is the worker's `ctx.input`), and stores the list of
results at `output_key`, in the same order as the items, even when workers run in parallel.

    python examples/batch.py
"""
from __future__ import annotations

from flowcraft import NodeContext, create_flow

TAX_RATE = 0.2


def load_invoices(ctx: NodeContext):
    # The batch reads its items from the context, so put the list there under a clear name.
    invoices = [{"id": f"INV-{n:04d}", "net": float(n)} for n in range(1, 1001)]
    ctx.context.set("invoices", invoices)
    return len(invoices)


def add_tax(ctx: NodeContext):
    invoice = ctx.input
    return {"id": invoice["id"], "gross": round(invoice["net"] * (1 + TAX_RATE), 2)}


def summarize(ctx: NodeContext):
    taxed = ctx.context.get("taxed_invoices")
    return {"count": len(taxed), "gross_total": round(sum(i["gross"] for i in taxed), 2)}


flow = (
    create_flow("invoice-batch")
    .node("load_invoices", load_invoices)
    .batch("add_tax", add_tax, input_key="invoices", output_key="taxed_invoices")
    .node("summarize", summarize)
    # Edges to and from the batch use its id; the builder wires them to its scatter and gather.
    .edge("load_invoices", "add_tax")
    .edge("add_tax", "summarize")
)


def main():
    result = flow.run(concurrency=4)
    taxed = result.context["taxed_invoices"]
    summary = result.context["summarize"]
    print(f"{result.status}: {summary['count']} invoices, gross total {summary['gross_total']:.2f}")
    print(f"  first {taxed[0]['id']} -> {taxed[0]['gross']}, last {taxed[-1]['id']} -> {taxed[-1]['gross']}")
    return result


if __name__ == "__main__":
    main()
