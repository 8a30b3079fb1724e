"""The per-item cost of a batch on Redis, for several batch sizes: bytes read from Redis, commands
and time per item job (after the scatter), and the time of the scatter's commit.

The cost per item must not grow with the batch (each item job reads only its own item); one JSON
line per size:

    python benchmarks/batch_items.py --sizes 1000,10000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any, Dict

HERE = os.path.dirname(os.path.abspath(__file__))
# benchmarks/redis.py would shadow the redis package if this directory stayed on sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

import redis  # noqa: E402

from flowcraft import FlowRuntime, create_flow  # noqa: E402
from flowcraft_redis import RedisAdapter  # noqa: E402

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class CountingRedis(redis.Redis):
    """Counts commands and the bytes of their replies (pipelines are not used by item jobs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = 0
        self.reply_bytes = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        reply = super().execute_command(*args, **options)
        self.commands += 1
        self.reply_bytes += _size(reply)
        return reply


def _size(reply: Any) -> int:
    if isinstance(reply, (bytes, str)):
        return len(reply)
    if isinstance(reply, (list, tuple)):
        return sum(_size(v) for v in reply)
    return 8


def measure(url: str, n: int) -> Dict[str, Any]:
    flow = (create_flow(f"batch-items-{n}").node("make", lambda ctx: [{"k": i, "pad": "x" * 20} for i in range(n)])
            .batch("each", lambda ctx: ctx.input["k"] * 2, input_key="make", output_key="out")
            .edge("make", "each"))
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    prefix = f"fcbench:{uuid.uuid4().hex}:"
    client = CountingRedis.from_url(url)
    adapter = RedisAdapter(runtime, client, queue_name="fcq-" + uuid.uuid4().hex[:8], prefix=prefix)
    try:
        run_id = adapter.start_workflow(flow.to_blueprint().id, {})
        adapter.work(max_jobs=1, burst=True)  # make
        started = time.perf_counter()
        adapter.work(max_jobs=1, burst=True)  # the scatter: n item fields and n item jobs in one commit
        scatter_s = time.perf_counter() - started
        bytes_before, commands_before, started = client.reply_bytes, client.commands, time.perf_counter()
        adapter.work(burst=True)
        seconds = time.perf_counter() - started
        result = adapter.wait_for_result(run_id, timeout=10)
        if result.status != "completed" or result.context["out"] != [2 * i for i in range(n)]:
            raise SystemExit(f"batch of {n}: wrong result {result.status} {result.errors}")
        return {"items": n, "scatter_s": round(scatter_s, 3),
                "bytes_read_per_item": round((client.reply_bytes - bytes_before) / n, 1),
                "commands_per_item": round((client.commands - commands_before) / n, 2),
                "us_per_item": round(seconds / n * 1e6, 1)}
    finally:
        adapter.close()
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
        client.delete(adapter.queue.keys.ready)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL))
    p.add_argument("--sizes", default="1000,10000", help="comma-separated batch sizes")
    args = p.parse_args()
    for n in (int(s) for s in args.sizes.split(",")):
        print(json.dumps(measure(args.redis_url, n)), flush=True)


if __name__ == "__main__":
    main()
