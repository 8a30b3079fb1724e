"""The overhead of the production controls (SPEC 14) on Redis: a concurrency key on a chain.

Shape: a_chain as in benchmarks/redis.py (RUNS runs of a CHAIN-node chain started at once, every
run's result checked), measured twice per round, interleaved: `plain` (no limit) and `keyed`
(every node has `concurrencyKey: "'bench'"` with a generous `maxConcurrency`, so it never limits:
what is measured is the cost of taking and giving back a slot). The worker is a `RedisAdapter` in
a thread of this process, on its own client that counts its round trips (each command, each
pipeline, each script call); the client starting and waiting for the runs has another, uncounted.

Output: one JSON line per measurement (node executions/s, round trips per node execution) and a
summary with the medians and the overhead of the key: extra round trips per node execution
(target: at most 1) and the change in node executions/s. Exit 1 if a run ended wrong.

    python benchmarks/controls.py                       # 3 rounds of 20 runs x 50 nodes
    python benchmarks/controls.py --rounds 1 --runs 2 --chain 3

Keys: REDIS_URL (default redis://127.0.0.1:6379/0) under the prefix `fcbench:<tag>:`, deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# benchmarks/redis.py would shadow the redis package if this directory stayed on sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path[:0] = [ROOT, os.path.join(ROOT, "adapters")]

import redis  # noqa: E402

from flowcraft import FlowRuntime, create_flow  # noqa: E402

MODES = ("plain", "keyed")


class CountingRedis(redis.Redis):
    """A client that counts its round trips: one per command, one per pipeline execute."""

    round_trips = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.round_trips += 1
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        def counted(*a: Any, **k: Any) -> Any:
            self.round_trips += 1
            return execute(*a, **k)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe


def chain_flow(mode: str, length: int) -> Any:
    options = {"concurrency_key": "'bench'", "max_concurrency": 1_000_000} if mode == "keyed" else {}
    flow = create_flow(f"controls-{mode}-{length}")
    flow.node("n0", lambda ctx: ctx.context.get("value") + 1, **options)
    for i in range(1, length):
        flow.node(f"n{i}", lambda ctx: ctx.input + 1, **options).edge(f"n{i - 1}", f"n{i}")
    return flow


def measure(url: str, prefix: str, mode: str, runs: int, length: int, timeout: float) -> Dict[str, Any]:
    flow = chain_flow(mode, length)
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    from flowcraft_redis import RedisAdapter

    queue_name = f"fcbench-{uuid.uuid4().hex[:8]}"
    counted = CountingRedis.from_url(url)
    plain = redis.Redis.from_url(url)
    worker = RedisAdapter(runtime, counted, queue_name=queue_name, prefix=prefix, poll_timeout=0.05)
    client = RedisAdapter(runtime, plain, queue_name=queue_name, prefix=prefix)
    try:
        warm = client.start_workflow(flow.id, {"value": 0})  # the worker is up and its scripts loaded
        worker.start()
        client.wait_for_result(warm, timeout=timeout)
        counted.round_trips = 0
        began = time.perf_counter()
        run_ids = [client.start_workflow(flow.id, {"value": 0}) for _ in range(runs)]
        results = [client.wait_for_result(run_id, timeout=timeout) for run_id in run_ids]
        wall = time.perf_counter() - began
        trips = counted.round_trips
    finally:
        worker.stop(timeout=10)
        worker.close()
        client.close()
    wrong = [(r.run_id, r.status, r.context.get(f"_outputs.n{length - 1}")) for r in results
             if r.status != "completed" or r.context.get(f"_outputs.n{length - 1}") != length]
    nodes = runs * length
    # the waits of an idle worker (BLMOVE timeouts, heartbeats) count too: a small share at this pace
    return {"kind": "controls", "mode": mode, "runs": runs, "chain": length, "node_executions": nodes,
            "wall_s": round(wall, 4), "nodes_per_s": round(nodes / wall, 1),
            "round_trips_per_node": round(trips / nodes, 3), "wrong": wrong[:3]}


def cleanup(url: str, prefix: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
        return len(keys)
    finally:
        client.close()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="chain runs started at once")
    p.add_argument("--chain", type=int, default=50, help="nodes per chain")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one run")
    args = p.parse_args(argv)
    for name in ("runs", "chain", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    tag = uuid.uuid4().hex[:8]
    prefix = f"fcbench:{tag}:"
    print(json.dumps({"kind": "setup", "tag": tag, "prefix": prefix}), flush=True)
    lines: List[Dict[str, Any]] = []
    try:
        for round_ in range(args.rounds):
            for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                line = measure(url, prefix, mode, args.runs, args.chain, args.timeout)
                line["round"] = round_
                lines.append(line)
                print(json.dumps(line), flush=True)
    finally:
        cleanup(url, prefix)

    def med(mode: str, key: str) -> float:
        return statistics.median(line[key] for line in lines if line["mode"] == mode)

    ok = not any(line["wrong"] for line in lines)
    extra = round(med("keyed", "round_trips_per_node") - med("plain", "round_trips_per_node"), 3)
    summary = {"kind": "summary", "ok": ok,
               "nodes_per_s": {m: med(m, "nodes_per_s") for m in MODES},
               "round_trips_per_node": {m: med(m, "round_trips_per_node") for m in MODES},
               "extra_round_trips_per_node": extra,
               "nodes_per_s_change_pct": round(100 * (med("keyed", "nodes_per_s") / med("plain", "nodes_per_s") - 1), 1),
               "target": {"what": "a concurrency key costs at most 1 extra round trip per node execution",
                          "met": extra <= 1.0}}
    print(json.dumps(summary), flush=True)
    print(f"redis a_chain {args.runs}x{args.chain}: plain {summary['nodes_per_s']['plain']} nodes/s, "
          f"{summary['round_trips_per_node']['plain']} round trips/node; with a concurrency key "
          f"{summary['nodes_per_s']['keyed']} nodes/s ({summary['nodes_per_s_change_pct']:+}%), "
          f"{summary['round_trips_per_node']['keyed']} round trips/node (+{extra})", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
