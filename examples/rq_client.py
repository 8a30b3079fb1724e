"""Start a run on the RQ workers and wait for its result: the seed's "Starting a Workflow", with RQ.

With a worker running (``python examples/rq_worker.py``, or ``rq worker`` as that file says) on the
same Redis, queue and prefix (REDIS_URL, FLOWCRAFT_QUEUE, FLOWCRAFT_PREFIX):

    python examples/rq_client.py [ORDER_ID]               # through the adapter's client API
    python examples/rq_client.py --seed-client [ORDER_ID]  # with redis and rq alone, as the seed's client

Prints the run's `WorkflowResult` as JSON.
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.rq_worker import FLOW_ID, PREFIX, QUEUE, REDIS_URL, flow, make_adapter  # noqa: E402
from flowcraft import WorkflowResult, analyze_blueprint  # noqa: E402


def start_with_adapter(order_id: str) -> WorkflowResult:
    adapter = make_adapter()
    run_id = adapter.start_workflow(FLOW_ID, {"orderId": order_id})
    print(f"Workflow {run_id} started.", file=sys.stderr)
    return adapter.wait_for_result(run_id, timeout=60)


def start_like_the_seed(order_id: str) -> WorkflowResult:
    """What the seed's client does (context hash, then the start jobs), with RQ in place of BullMQ."""
    import redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    run_id = uuid.uuid4().hex
    connection = redis.Redis.from_url(REDIS_URL)
    queue = Queue(QUEUE, connection=connection, serializer=JSONSerializer)
    # 1. Set the initial context in a Redis hash (one JSON value per field).
    connection.hset(f"{PREFIX}workflow:state:{run_id}", mapping={"orderId": json.dumps(order_id)})
    # 2. Find the start node(s) of the blueprint.
    start_node_ids = analyze_blueprint(flow.to_blueprint()).start_node_ids
    # 3. Enqueue one RQ job per start node: run_node(<job JSON>). The meta names the key prefix
    #    (only needed when it is not empty).
    queue.enqueue_many([
        Queue.prepare_data("flowcraft_redis.rq_jobs.run_node",
                           (json.dumps({"runId": run_id, "blueprintId": FLOW_ID, "nodeId": node_id}),),
                           meta={"flowcraft": {"prefix": PREFIX}}, result_ttl=60)
        for node_id in start_node_ids
    ])
    print(f"Workflow {run_id} started with {len(start_node_ids)} initial job(s).", file=sys.stderr)
    # 4. Wait for the seed-compatible status key that the workers write when the run ends.
    deadline = time.monotonic() + 60
    while (status := connection.get(f"{PREFIX}workflow:status:{run_id}")) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} did not finish in 60 s")
        time.sleep(0.1)
    connection.close()
    return WorkflowResult.from_dict(json.loads(status)["result"])


def main(argv=None) -> WorkflowResult:
    args = list(sys.argv[1:] if argv is None else argv)
    seed = "--seed-client" in args
    args = [a for a in args if a != "--seed-client"]
    order_id = args[0] if args else "A-1001"
    result = start_like_the_seed(order_id) if seed else start_with_adapter(order_id)
    print(json.dumps(result.to_dict()))
    return result


if __name__ == "__main__":
    main()
