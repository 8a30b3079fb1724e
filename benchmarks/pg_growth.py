"""How RabbitMQ + PostgreSQL costs grow with a run's size (issue 12): one worker (in this process),
one run at a time, fresh tables per run.

  chain N   a chain of N nodes            -> ms per node; the ratio of the largest to the smallest N
  batch N   one node making N items, a batch over them -> items/s

After each run it prints, from `pg_stat_user_tables` (read after a short pause so the statistics
are flushed) and `pg_total_relation_size`, the run's tables' live and dead tuples, updates and HOT
updates, and bytes. Autovacuum may run meanwhile (it lowers the dead count): the line says how
many times it did. The machine is shared: compare ratios within one invocation.

    python benchmarks/pg_growth.py --chain 100,1000 --batch 100,1000,10000

Services: RABBITMQ_URL, POSTGRES_URL, REDIS_URL (defaults: the local ones). Tables
`fcgrow_<tag>_*`, the queue `fcgrow-<tag>` (+ .dead, .delay) and Redis keys `fcgrow:<tag>:*` are
dropped afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]  # benchmarks/redis.py
sys.path.insert(0, ROOT)

import psycopg2  # noqa: E402
import redis  # noqa: E402

from benchmarks.rabbitmq import delete_queues, drop_tables, urls  # noqa: E402
from flowcraft import FlowRuntime, create_flow  # noqa: E402
from flowcraft_rabbitmq import RabbitMqAdapter, RedisCoordinationStore  # noqa: E402


def chain_flow(n: int) -> Any:
    flow = create_flow(f"chain{n}")
    for i in range(n):
        flow.node(f"n{i}", lambda ctx: (ctx.input or 0) + 1)
        if i:
            flow.edge(f"n{i - 1}", f"n{i}")
    return flow


def batch_flow(n: int) -> Any:
    return (create_flow(f"batch{n}").node("make", lambda ctx: list(range(n)))
            .batch("each", lambda ctx: ctx.input * 2, input_key="make", output_key="out").edge("make", "each"))


def table_stats(dsn: str, prefix: str) -> Dict[str, Any]:
    time.sleep(1.5)  # statistics reach pg_stat_user_tables once the backends flush them
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute("SELECT relname, n_live_tup, n_dead_tup, n_tup_upd, n_tup_hot_upd, autovacuum_count,"
                        " pg_total_relation_size(relid) FROM pg_stat_user_tables WHERE relname LIKE %s ORDER BY relname",
                        (prefix.replace("_", r"\_") + "%",))
            rows = cur.fetchall()
    finally:
        conn.close()
    tables = {name[len(prefix):]: {"live": live, "dead": dead, "upd": upd, "hot_upd": hot, "autovacuums": av, "bytes": size}
              for name, live, dead, upd, hot, av, size in rows}
    live = sum(t["live"] for t in tables.values())
    dead = sum(t["dead"] for t in tables.values())
    return {"live": live, "dead": dead, "dead_per_live": round(dead / live, 2) if live else None,
            "bytes": sum(t["bytes"] for t in tables.values()), "tables": tables}


def measure(shape: str, n: int, timeout: float) -> Dict[str, Any]:
    u = urls()
    tag = uuid.uuid4().hex[:8]
    prefix, queue, rprefix = f"fcgrow_{tag}_", f"fcgrow-{tag}", f"fcgrow:{tag}:"
    flow = chain_flow(n) if shape == "chain" else batch_flow(n)
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    client = redis.Redis.from_url(u["redis_url"])
    adapter = RabbitMqAdapter(runtime, RedisCoordinationStore(client, prefix=rprefix), u["amqp_url"], u["postgres_dsn"],
                              queue_name=queue, poll_timeout=0.2, context_table_name=f"{prefix}contexts",
                              status_table_name=f"{prefix}statuses")
    try:
        adapter.start()
        started = time.perf_counter()
        run_id = adapter.start_workflow(flow.id, {})
        result = adapter.wait_for_result(run_id, timeout=timeout)
        seconds = time.perf_counter() - started
        adapter.close()
        line: Dict[str, Any] = {"shape": shape, "n": n, "status": result.status, "seconds": round(seconds, 3)}
        if shape == "chain":
            line["ms_per_node"] = round(1000 * seconds / n, 3)
            ok = result.status == "completed"
        else:
            line["items_per_s"] = round(n / seconds, 1)
            ok = result.status == "completed" and result.context.get("out") == [2 * i for i in range(n)]
        line["ok"] = ok
        line["pg"] = table_stats(u["postgres_dsn"], prefix)
        return line
    finally:
        adapter.close()
        client.delete(*client.keys(rprefix + "*") or [rprefix])
        client.close()
        drop_tables(u["postgres_dsn"], prefix)
        delete_queues(u["amqp_url"], [queue, queue + ".dead", queue + ".delay"])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chain", default="100,1000", help="chain lengths (comma-separated; empty: none)")
    p.add_argument("--batch", default="100,1000,10000", help="batch sizes (comma-separated; empty: none)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take")
    args = p.parse_args(argv)
    lines = []
    for shape, sizes in (("chain", args.chain), ("batch", args.batch)):
        for n in [int(s) for s in sizes.split(",") if s.strip()]:
            line = measure(shape, n, args.timeout)
            print(json.dumps(line), flush=True)
            lines.append(line)
    summary: Dict[str, Any] = {"loadavg": os.getloadavg()}
    for shape, key in (("chain", "ms_per_node"), ("batch", "items_per_s")):
        done = [line for line in lines if line["shape"] == shape and line["status"] == "completed"]
        if len(done) >= 2:
            summary[f"{shape}_{key}_largest_over_smallest"] = round(done[-1][key] / done[0][key], 2)
    print(json.dumps({"summary": summary}), flush=True)
    return 0 if all(line["ok"] for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
