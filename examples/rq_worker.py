"""A Flowcraft worker on RQ: the seed's "Worker Usage", with RQ jobs instead of BullMQ.

The blueprint and the node code live in this module; a worker that imports it can execute the
jobs of its runs. With Redis running (``redis://127.0.0.1:6379/0`` unless REDIS_URL says
otherwise), start a worker in one of two ways:

    python examples/rq_worker.py        # RqAdapter.work(): an RQ worker inside this process

    FLOWCRAFT_APP=examples.rq_worker:runtime rq worker -w flowcraft_redis.rq_worker.FlowcraftWorker \\
        --serializer rq.serializers.JSONSerializer --with-scheduler flowcraft-queue

(the second is RQ's own command line; ``FLOWCRAFT_APP`` tells the job function where the runtime
is, ``--with-scheduler`` fires the sleep below; `FlowcraftWorker` runs Flowcraft jobs only, where
RQ's own worker classes would run any function a job in the queue names). Then start runs with ``python examples/rq_client.py``.

Settings: REDIS_URL, FLOWCRAFT_QUEUE (the RQ queue, default ``flowcraft-queue``), FLOWCRAFT_PREFIX
(a key prefix for the run state, default none). SIGTERM or Ctrl-C stops the worker after the job
in hand.

    fetch_order --+--> reserve_stock --+--> ship --> cool_off (sleep 1 s) --> notify
                  +--> charge_card ----+
"""
from __future__ import annotations

import logging
import os
import signal
import time

from flowcraft import FlowRuntime, NodeContext, create_flow

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("FLOWCRAFT_QUEUE", "flowcraft-queue")
PREFIX = os.environ.get("FLOWCRAFT_PREFIX", "")
FLOW_ID = "rq-order"

ORDERS = {
    "A-1001": {"items": [{"sku": "lamp", "qty": 2, "price": 45.0}], "email": "ada@example.com"},
    "A-1002": {"items": [{"sku": "rug", "qty": 1, "price": 120.0}, {"sku": "lamp", "qty": 1, "price": 45.0}],
               "email": "alan@example.com"},
}


# 1. The node implementations (plain functions of a NodeContext).
def fetch_order(ctx: NodeContext):
    return {"orderId": ctx.input, **ORDERS[ctx.input]}


def reserve_stock(ctx: NodeContext):
    return {"reserved": [item["sku"] for item in ctx.input["items"]]}


def charge_card(ctx: NodeContext):
    # A job may be delivered twice (a worker killed mid-job): a real payment gateway call would
    # pass ctx.idempotency_key, the same for every delivery of this node execution, to charge once.
    total = sum(item["qty"] * item["price"] for item in ctx.input["items"])
    return {"charged": total, "paymentRef": f"pay-{ctx.input['orderId']}"}


def ship(ctx: NodeContext):
    # an `all` join: its input maps each predecessor to its output
    return {"shipped": ctx.input["reserve_stock"]["reserved"], "charged": ctx.input["charge_card"]["charged"]}


def notify(ctx: NodeContext):
    order = ctx.context.get("fetch_order")
    return f"mailed {order['email']}: {len(ctx.input['shipped'])} item(s) shipped, {ctx.input['charged']:.2f} charged"


# 2. The blueprint, built with the flow builder (its `uses` keys are these functions' names).
flow = (
    create_flow(FLOW_ID)
    .node("fetch_order", fetch_order, inputs="orderId")
    .node("reserve_stock", reserve_stock)
    .node("charge_card", charge_card)
    .node("ship", ship)
    .sleep("cool_off", duration=1)  # a durable timer: an RQ scheduled job, no worker blocks on it
    .node("notify", notify)
    .edge("fetch_order", "reserve_stock")
    .edge("fetch_order", "charge_card")
    .edge("reserve_stock", "ship")
    .edge("charge_card", "ship")
    .edge("ship", "cool_off")
    .edge("cool_off", "notify")
)

# 3. The runtime: blueprints and registry (what FLOWCRAFT_APP names for `rq worker`).
runtime = FlowRuntime()
runtime.add_blueprint(flow)


def make_adapter():
    """The RQ adapter for this app (a worker and a client)."""
    from flowcraft_redis import RqAdapter  # needs the `redis` extra: redis and rq

    return RqAdapter(runtime, REDIS_URL, queue_name=QUEUE, prefix=PREFIX)


def main() -> None:
    if __name__ == "__main__":
        # Run as a script: serve with the importable copy of this module, whose builder `uses`
        # keys (and so the blueprint's digest) are `examples.rq_worker.*`, as in every client.
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from examples import rq_worker

        return rq_worker.main()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # 4. The adapter: it enqueues and runs RQ jobs, and keeps run state in Redis.
    adapter = make_adapter()
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, frame: stopping.append(received))
    # 5. Start the worker (a background thread here; `adapter.work()` would block instead).
    adapter.start()
    print(f"Flowcraft worker with RqAdapter is running on RQ queue {QUEUE!r}...", flush=True)
    while not stopping:
        time.sleep(0.1)
    adapter.stop(timeout=30)  # finishes the job in hand first
    adapter.close()
    print("worker stopped", flush=True)


if __name__ == "__main__":
    main()
