"""Human approval: pause a run at a `wait` node, save it, and resume it later with a decision.

    submit_expense --> approval (wait) --approve--> pay_out
                                       +--reject--> notify_rejected

The first run stops at `approval` with status `awaiting`. Its `serialized_context` (a JSON
string) holds everything needed to continue, so it can be stored anywhere (here: a file) and
resumed by another process, hours later, with the approver's decision as the action.

    python examples/approval.py
"""
from __future__ import annotations

import os
import tempfile

from flowcraft import FlowRuntime, NodeContext, create_flow


def submit_expense(ctx: NodeContext):
    return {"employee": "grace", "amount": 380.0, "reason": "conference ticket"}


def pay_out(ctx: NodeContext):
    expense = ctx.context.get("submit_expense")
    # The resume output (the approver's note) arrives as this node's input.
    return f"paid {expense['amount']:.2f} to {expense['employee']} ({ctx.input['note']})"


def notify_rejected(ctx: NodeContext):
    expense = ctx.context.get("submit_expense")
    return f"told {expense['employee']} the expense was rejected ({ctx.input['note']})"


flow = (
    create_flow("expense-approval")
    .node("submit_expense", submit_expense)
    .wait("approval", approver="finance")  # keyword details are stored with the pause
    .node("pay_out", pay_out)
    .node("notify_rejected", notify_rejected)
    .edge("submit_expense", "approval")
    .edge("approval", "pay_out", action="approve")
    .edge("approval", "notify_rejected", action="reject")
)


def save(text: str) -> str:
    """Write a paused run to a temp file, as a web app might store it in a database."""
    handle, path = tempfile.mkstemp(prefix="flowcraft-run-", suffix=".json")
    with os.fdopen(handle, "w") as f:
        f.write(text)
    return path


def load(path: str) -> str:
    with open(path) as f:
        return f.read()


def main():
    paused = flow.run()
    details = paused.context["_awaitingDetails"]["approval"]
    print(f"first run: {paused.status}, waiting at {paused.awaiting} for {details['approver']}")

    path = save(paused.serialized_context)
    try:
        saved = load(path)
    finally:
        os.remove(path)
    print(f"  saved the paused run to a file and read it back ({len(saved)} bytes of JSON)")

    # A fresh runtime stands in for a different process: nothing but the saved text is shared.
    approved = flow.resume(FlowRuntime(), serialized_context=saved, action="approve",
                           output={"note": "within budget"})
    print(f"approve -> {approved.status}: {approved.context['pay_out']}")

    # The same saved state can take the other branch instead.
    rejected = FlowRuntime().resume(flow.to_blueprint(), saved, action="reject",
                                    output={"note": "no receipt"}, registry=flow.registry)
    print(f"reject  -> {rejected.status}: {rejected.context['notify_rejected']}")
    return {"paused": paused, "approved": approved, "rejected": rejected}


if __name__ == "__main__":
    main()
