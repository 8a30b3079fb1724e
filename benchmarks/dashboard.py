"""Server time of the dashboard's pages (the WSGI app called directly, no HTTP): the run list with
`--runs` runs stored (default 100,000) and the page of a 1,000-node run; target: each under 200 ms.

For each backend (the in-memory fakes, Redis), the runs are stored in bulk with the helpers of
benchmarks/operations.py (honest rows, as the store keeps them), then the median (and the
slowest) of `--repeat` requests is printed, one JSON line per figure:

* `/runs` (the HTML run list, 50 a page), `/runs?status=failed`, `/api/runs`;
* `/` (the overview: runs by status up to 1,000 each, queue depth, dead letters, workers);
* `/runs/<id>` and `/api/runs/<id>` of a completed 1,000-node chain and of a 1 -> 998 -> 1 fan
  (the page draws the SVG, the timeline of 1,000 executions and the context).

    .venv/bin/python benchmarks/dashboard.py
    .venv/bin/python benchmarks/dashboard.py --runs 1000 --backends memory --repeat 5

Services: REDIS_URL (default the local one); keys `fcbench:dash<tag>:*`, removed afterwards.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import uuid
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]  # benchmarks/redis.py
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "adapters"))
sys.path.insert(0, HERE)

from operations import REDIS_URL, delete_redis_prefix, emit, store_memory_runs, store_redis_runs  # noqa: E402

TARGET_MS = 200.0
SIZE = 1000


def request_ms(app: Any, path: str, query: str, repeat: int) -> Dict[str, Any]:
    """Median and slowest server time of `repeat` GETs of path?query, and the body's size."""
    times: List[float] = []
    size = 0
    for _ in range(repeat):
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "bench",
                   "SERVER_PORT": "80", "HTTP_HOST": "bench", "wsgi.input": io.BytesIO(b""),
                   "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr}
        seen: Dict[str, str] = {}

        def start_response(status: str, headers: Any, seen: Dict[str, str] = seen) -> None:
            seen["status"] = status

        start = time.perf_counter()
        body = b"".join(app(environ, start_response))
        times.append((time.perf_counter() - start) * 1000)
        if not seen["status"].startswith("200"):
            raise RuntimeError(f"GET {path}?{query}: {seen['status']}: {body[:200]!r}")
        size = len(body)
    median = statistics.median(times)
    return {"median_ms": round(median, 2), "max_ms": round(max(times), 2), "repeat": repeat, "bytes": size}


def runtime() -> Any:
    from flowcraft import FlowRuntime, create_flow

    chain = create_flow("chain1000")
    for i in range(SIZE):
        chain.node(f"step{i:04d}", lambda ctx: (ctx.input or 0) + 1)
        if i:
            chain.edge(f"step{i - 1:04d}", f"step{i:04d}")
    fan = create_flow("fan1000").node("split", lambda ctx: 0).node("join", lambda ctx: len(ctx.input))
    for i in range(SIZE - 2):
        fan.node(f"part{i:04d}", lambda ctx: 1).edge("split", f"part{i:04d}").edge(f"part{i:04d}", "join")
    checkout = create_flow("checkout").node("load", lambda ctx: 1).node("charge", lambda ctx: 2).edge("load", "charge")
    rt = FlowRuntime()
    for flow in (chain, fan, checkout):
        rt.add_blueprint(flow)
    return rt


def measure(backend: str, adapter: Any, runs: int, repeat: int, drain: Any) -> None:
    from flowcraft.dashboard import create_app

    app = create_app(adapter)
    for label, path, query in (("run list", "/runs", ""), ("run list, failed", "/runs", "status=failed"),
                               ("api run list", "/api/runs", ""), ("overview", "/", "")):
        figure = request_ms(app, path, query, repeat)
        emit(kind="page", backend=backend, page=label, runs=runs, **figure,
             **({"target_ms": TARGET_MS, "ok": figure["median_ms"] < TARGET_MS} if "list" in label else {}))
    for blueprint in ("chain1000", "fan1000"):
        run_id = adapter.start_workflow(blueprint, {})
        drain(adapter)
        status = adapter.get_status(run_id)
        if status is None or status.status != "completed":
            raise RuntimeError(f"{blueprint} run ended {status}")
        for label, path in (("run page", f"/runs/{run_id}"), ("api run", f"/api/runs/{run_id}")):
            figure = request_ms(app, path, "", repeat)
            emit(kind="page", backend=backend, page=f"{label}, {blueprint}", nodes=SIZE, **figure,
                 **({"target_ms": TARGET_MS, "ok": figure["median_ms"] < TARGET_MS} if label == "run page" else {}))


def bench_memory(runs: int, repeat: int) -> None:
    from flowcraft.testing import InMemoryAdapter

    adapter = InMemoryAdapter(runtime())
    store_memory_runs(adapter.store, runs)
    measure("memory", adapter, runs, repeat, lambda a: a.drain(timeout=300))


def bench_redis(runs: int, repeat: int, tag: str) -> None:
    import redis

    from flowcraft_redis import RedisAdapter

    prefix = f"fcbench:dash{tag}:"
    client = redis.Redis.from_url(REDIS_URL)
    adapter = RedisAdapter(runtime(), client, prefix=prefix, queue_name=f"fcbench-dash-{tag}", poll_timeout=0.1)
    try:
        start = time.perf_counter()
        store_redis_runs(client, adapter.store, runs)
        emit(kind="stored", backend="redis", runs=runs, seconds=round(time.perf_counter() - start, 2))

        def drain(a: Any) -> None:
            for _ in range(3):
                a.work(burst=True)

        measure("redis", adapter, runs, repeat, drain)
    finally:
        adapter.close()
        delete_redis_prefix(client, prefix)
        client.close()


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=100_000, help="runs stored per backend (default: 100,000)")
    p.add_argument("--repeat", type=int, default=20, help="requests per figure (the median is printed)")
    p.add_argument("--backends", default="memory,redis", help="comma-separated: memory, redis")
    args = p.parse_args(argv)
    tag = uuid.uuid4().hex[:8]
    emit(kind="start", runs=args.runs, backends=args.backends, redis_prefix=f"fcbench:dash{tag}:",
         load=os.getloadavg()[0])
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if backend == "memory":
            bench_memory(args.runs, args.repeat)
        elif backend == "redis":
            bench_redis(args.runs, args.repeat, tag)
        else:
            p.error(f"unknown backend {backend!r}")
    emit(kind="end", load=os.getloadavg()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
