"""Start an order-fulfilment run on RabbitMQ + PostgreSQL, wait for its result and print it: the
client side of the RabbitMQ seed, in Python. A worker (`rabbitmq_worker.py`) must be running, or
be started later.

    python examples/rabbitmq_client.py                          # order A-1001
    python examples/rabbitmq_client.py --order A-1002           # one that is rejected (out of stock)
    python examples/rabbitmq_client.py --seed-protocol          # start it exactly as the seed's client does

The `WorkflowResult` goes to stdout as JSON (`... | jq .context.send_confirmation`); progress
goes to stderr. Settings (environment): as `rabbitmq_worker.py`.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as `python examples/rabbitmq_client.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pika  # noqa: E402
import psycopg2  # noqa: E402
from psycopg2 import sql  # noqa: E402
from psycopg2.extras import Json  # noqa: E402

from flowcraft import WorkflowResult, analyze_blueprint  # noqa: E402

from examples.rabbitmq_worker import open_adapter, settings  # noqa: E402
from examples.workflows import BLUEPRINT_ID, ORDERS, make_runtime  # noqa: E402


def start_like_the_seed(runtime: Any, order_id: str) -> str:
    """What the seed's `startWorkflow` does, by hand: a context row and a `running` status row in
    PostgreSQL, then the start nodes' minimal jobs `{"runId", "blueprintId", "nodeId"}`, published
    persistent to the durable queue. The first worker that takes one of these jobs adopts the run."""
    config = settings()
    run_id = str(uuid.uuid4())
    with closing(psycopg2.connect(config["POSTGRES_URL"])) as conn, conn, conn.cursor() as cur:  # one transaction
        cur.execute(sql.SQL("INSERT INTO {} (run_id, context_data) VALUES (%s, %s)").format(
            sql.Identifier(config["context_table_name"])), (run_id, Json({"orderId": order_id})))
        cur.execute(sql.SQL("INSERT INTO {} (run_id, status) VALUES (%s, %s)").format(
            sql.Identifier(config["status_table_name"])), (run_id, "running"))
    blueprint = runtime.blueprint(BLUEPRINT_ID)
    with closing(pika.BlockingConnection(pika.URLParameters(config["RABBITMQ_URL"]))) as connection:
        channel = connection.channel()
        channel.queue_declare(config["queue_name"], durable=True)  # the seed's assertQueue(queue, {durable: true})
        for node_id in analyze_blueprint(blueprint).start_node_ids:
            job = {"runId": run_id, "blueprintId": blueprint.id, "nodeId": node_id}
            channel.basic_publish("", config["queue_name"], json.dumps(job).encode(),
                                  properties=pika.BasicProperties(delivery_mode=2))  # persistent
    return run_id


def main(argv: Optional[Sequence[str]] = None) -> WorkflowResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", default="A-1001", help=f"the order id (demo orders: {', '.join(ORDERS)})")
    parser.add_argument("--seed-protocol", action="store_true",
                        help="insert the rows and publish the start jobs by hand, as the seed's client does")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="wait at most this long")
    args = parser.parse_args(argv)

    runtime = make_runtime()  # the client runs no node code: it only names the blueprint
    adapter = open_adapter(runtime)  # it creates the tables if they are missing
    try:
        if args.seed_protocol:
            run_id = start_like_the_seed(runtime, args.order)
        else:
            run_id = adapter.start_workflow(BLUEPRINT_ID, {"orderId": args.order})
        print(f"started run {run_id} (order {args.order})", file=sys.stderr, flush=True)
        result = adapter.wait_for_result(run_id, timeout=args.timeout)
    finally:
        adapter.close()
        adapter.coordination.client.close()
    print(f"run {run_id}: {result.status}: {result.context.get('send_confirmation')}", file=sys.stderr)
    print(json.dumps(result.to_dict(), indent=2))
    return result


if __name__ == "__main__":
    main()
