"""Routing (SPEC 14): a checkout whose `charge` node runs only on workers serving "payments".

`queue="payments"` on a node (wire: `"config": {"queue": "payments"}`) sends its jobs to that queue
of the backend; every other node uses the default queue. Workers serve the queues they are given:

    flowcraft worker --app examples.routed:runtime --burst                    # the default queue
    flowcraft worker --app examples.routed:runtime --queue payments --burst   # only "payments"

Run this file to see it in memory: a default worker, then a payments worker, then the default one.

    python examples/routed.py
"""
from __future__ import annotations

import threading
from typing import Any, List

from flowcraft import FlowRuntime, create_flow
from flowcraft.distributed import DistributedAdapter
from flowcraft.testing import InMemoryAdapter

RAN: List[str] = []


def ran(name: str) -> None:
    RAN.append(f"{name} on {threading.current_thread().name}")


def validate(ctx: Any) -> int:
    ran("validate")
    return int(ctx.context.get("amount") or 0)


def charge(ctx: Any) -> str:
    ran("charge")
    return f"charged {ctx.input}"  # the card processor is reachable from the payments hosts only


def receipt(ctx: Any) -> str:
    ran("receipt")
    return f"receipt: {ctx.input}"


flow = (create_flow("checkout")
        .node("validate", validate)
        .node("charge", charge, queue="payments")
        .node("receipt", receipt)
        .edge("validate", "charge").edge("charge", "receipt"))
runtime = FlowRuntime()
runtime.add_blueprint(flow)


def main() -> None:
    default = InMemoryAdapter(runtime)
    payments = DistributedAdapter(runtime, default.queue.serve(["payments"]), default.store)
    run_id = default.start_workflow("checkout", {"amount": 12})
    for worker, name in ((default, "default"), (payments, "payments"), (default, "default")):
        threading.current_thread().name = f"{name} worker"
        worker.work(burst=True)
    for line in RAN:
        print(line)
    print(default.wait_for_result(run_id, timeout=5).context["receipt"])


if __name__ == "__main__":
    main()
