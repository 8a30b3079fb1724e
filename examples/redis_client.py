"""Start an order-fulfilment run on Redis, wait for its result and print it: the client side of the
BullMQ seed, in Python. A worker (`redis_worker.py`) must be running, or be started later.

    python examples/redis_client.py                          # order A-1001
    python examples/redis_client.py --order A-1002           # one that is rejected (out of stock)
    python examples/redis_client.py --seed-protocol          # start it exactly as the seed's client does

The `WorkflowResult` goes to stdout as JSON (`... | jq .context.send_confirmation`); progress
goes to stderr. Settings (environment): as `redis_worker.py`.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as `python examples/redis_client.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowcraft import WorkflowResult, analyze_blueprint  # noqa: E402

from examples.redis_worker import open_adapter, settings  # noqa: E402
from examples.workflows import BLUEPRINT_ID, ORDERS, make_runtime  # noqa: E402


def start_like_the_seed(adapter: Any, order_id: str) -> str:
    """What the seed's `startWorkflow` does, by hand: the initial context into the hash
    `workflow:state:<runId>` (raw strings, as `hset(key, initialContext)` writes them), then the
    start nodes' minimal jobs `{"runId", "blueprintId", "nodeId"}` onto the queue. The first
    worker that takes one of these jobs adopts the run."""
    run_id = str(uuid.uuid4())
    prefix, queue = settings()["prefix"], settings()["queue_name"]
    adapter.redis.hset(f"{prefix}workflow:state:{run_id}", mapping={"orderId": order_id})
    blueprint = adapter.runtime.blueprint(BLUEPRINT_ID)
    for node_id in analyze_blueprint(blueprint).start_node_ids:
        job = {"runId": run_id, "blueprintId": blueprint.id, "nodeId": node_id}
        adapter.redis.lpush(f"{prefix}{queue}", json.dumps(job))  # the ready queue is a Redis list
    return run_id


def main(argv: Optional[Sequence[str]] = None) -> WorkflowResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", default="A-1001", help=f"the order id (demo orders: {', '.join(ORDERS)})")
    parser.add_argument("--seed-protocol", action="store_true",
                        help="write the context and the start jobs by hand, as the seed's client does")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="wait at most this long")
    args = parser.parse_args(argv)

    adapter = open_adapter(make_runtime())  # the client runs no node code: it only names the blueprint
    try:
        if args.seed_protocol:
            run_id = start_like_the_seed(adapter, args.order)
        else:
            run_id = adapter.start_workflow(BLUEPRINT_ID, {"orderId": args.order})
        print(f"started run {run_id} (order {args.order})", file=sys.stderr, flush=True)
        result = adapter.wait_for_result(run_id, timeout=args.timeout)
    finally:
        adapter.close()
    print(f"run {run_id}: {result.status}: {result.context.get('send_confirmation')}", file=sys.stderr)
    print(json.dumps(result.to_dict(), indent=2))
    return result


if __name__ == "__main__":
    main()
