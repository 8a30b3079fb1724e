"""Concurrency limits (SPEC 14): a payment provider that takes two calls at a time.

Every `charge` node has `concurrency_key="'payments'"` and `max_concurrency=2`: across every
worker (and, in memory, within a run) at most two of them run at once; the others wait in the
queue (distributed: put back for about 0.1 s, not holding a worker thread, not counted as an
attempt). A key may depend on the node's input or context, e.g. `"input.customer"` for one call
at a time per customer.

    python examples/limited.py
"""
from __future__ import annotations

import threading
import time
from typing import Any, List

from flowcraft import FlowRuntime, create_flow
from flowcraft.testing import InMemoryAdapter

_lock = threading.Lock()
_running: List[int] = [0, 0]  # now, most at once


def charge(ctx: Any) -> int:
    with _lock:
        _running[0] += 1
        _running[1] = max(_running[1], _running[0])
    time.sleep(0.05)  # the provider's API call
    with _lock:
        _running[0] -= 1
    return ctx.input


flow = create_flow("payouts").node("start", lambda ctx: 0)
flow.node("total", lambda ctx: sum(ctx.input.values()))
for i in range(8):
    flow.node(f"charge{i}", charge, inputs=f"amount{i}", concurrency_key="'payments'", max_concurrency=2)
    flow.edge("start", f"charge{i}").edge(f"charge{i}", "total")
runtime = FlowRuntime()
runtime.add_blueprint(flow)
amounts = {f"amount{i}": 10 * (i + 1) for i in range(8)}


def main() -> None:
    result = flow.run(runtime, amounts, concurrency=8)
    print(f"in memory, 8 threads: {result.status}, total {result.context['total']}, at most {_running[1]} charges at once")
    _running[1] = 0
    adapter = InMemoryAdapter(runtime, threads=4)  # the fakes: a worker of 4 threads
    adapter.start()
    try:
        result = adapter.wait_for_result(adapter.start_workflow("payouts", amounts), timeout=30)
    finally:
        adapter.stop(timeout=10)
    print(f"a worker of 4 threads: {result.status}, total {result.context['total']}, at most {_running[1]} charges at once")


if __name__ == "__main__":
    main()
