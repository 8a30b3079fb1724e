"""The Celery 5.7 side of benchmarks/realistic.py (run with a python that has celery: the Python
peer's venv). Broker and result backend: Redis (``BENCH_REDIS_URL``, default DB 14), a queue of
its own per invocation; workers ``celery worker --pool=threads`` (Celery's defaults otherwise).

Shapes as realistic.py's: ``fan_threads`` (start -> chord of FAN sleeping tasks -> sum, one worker
of THREADS threads), ``fan_procs`` (the same on PROCS workers of 1 thread, with each worker's share
of the tasks), ``chains`` (RUNS concurrent chains of CHAIN sleeping tasks, one worker of
CHAIN_THREADS threads). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid

from celery import Celery, chain, chord

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "fcreal-celery")

app = Celery("realistic_celery", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(task_default_queue=QUEUE, task_default_exchange=QUEUE, task_default_routing_key=QUEUE,
                worker_enable_remote_control=False, worker_send_task_events=False, task_send_sent_event=False,
                broker_connection_retry_on_startup=True, result_expires=600)
_redis = None


def _count(hostname: str) -> None:
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(REDIS_URL)
    _redis.hincrby(f"{QUEUE}:counts", hostname, 1)


@app.task(bind=True)
def nap(self, value, ms):
    time.sleep(ms / 1000.0)
    _count(self.request.hostname or "?")
    return value


@app.task(bind=True)
def nap_add(self, value, ms):
    time.sleep(ms / 1000.0)
    _count(self.request.hostname or "?")
    return value + 1


@app.task
def tsum(values, ms=0.0):
    time.sleep(ms / 1000.0)
    return {"count": len(values), "sum": sum(values)}


def start_workers(count: int, threads: int) -> list:
    env = dict(os.environ, BENCH_CELERY_QUEUE=QUEUE, BENCH_REDIS_URL=REDIS_URL)
    here = os.path.dirname(os.path.abspath(__file__))
    procs = []
    for i in range(count):
        argv = [sys.executable, "-m", "celery", "-A", "realistic_celery", "worker", "--pool=threads",
                f"--concurrency={threads}", "--loglevel=WARNING", "-Q", QUEUE, "-n", f"{QUEUE}-{i}@%h"]
        procs.append(subprocess.Popen(argv, cwd=here, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      start_new_session=True))
    return procs


def stop_workers(procs: list) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def fan_once(args: argparse.Namespace, timeout: float) -> float:
    started = time.perf_counter()
    flow = chain(nap.si(0, args.ends_ms), chord([nap.si(i, args.fan_ms) for i in range(args.fan)], tsum.s(args.ends_ms)))
    result = flow.apply_async().get(timeout=timeout)
    wall = time.perf_counter() - started
    want = {"count": args.fan, "sum": args.fan * (args.fan - 1) // 2}
    if result != want:
        raise RuntimeError(f"celery fan: {result!r} != {want!r}")
    return wall


def measure(args: argparse.Namespace) -> dict:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    shapes = {}
    plans = [("fan_threads", 1, args.threads), ("fan_procs", args.procs, 1), ("chains", 1, args.chain_threads)]
    for shape, count, threads in plans:
        procs = start_workers(count, threads)
        try:
            for _ in range(2 * count):  # every worker up
                nap.delay(0, 0).get(timeout=120)
            if shape == "chains":
                # a new chain per run: applying one chain object again reuses its frozen task ids,
                # whose results the backend already holds
                def flow() -> chain:
                    return chain(nap_add.s(0, args.chain_ms), *[nap_add.s(args.chain_ms) for _ in range(args.chain - 1)])

                flow().apply_async().get(timeout=args.timeout)  # warm-up
                started = time.perf_counter()
                pending = [flow().apply_async() for _ in range(args.runs)]
                values = [p.get(timeout=args.timeout) for p in pending]
                wall = time.perf_counter() - started
                if values != [args.chain] * args.runs:
                    raise RuntimeError(f"celery chains: {values!r}")
                nodes = args.runs * args.chain
                shapes[shape] = {"wall_s": round(wall, 3), "node_executions": nodes, "nodes_per_s": round(nodes / wall, 1)}
            else:
                fan_once(args, args.timeout)  # warm-up
                client.delete(f"{QUEUE}:counts")
                walls = [fan_once(args, args.timeout) for _ in range(args.repeat)]
                counts = [int(v) for v in client.hgetall(f"{QUEUE}:counts").values()]
                entry = {"wall_s": round(statistics.median(walls), 3), "walls_s": [round(w, 3) for w in walls]}
                if count > 1:
                    total = sum(counts) or 1
                    entry["shares"] = sorted(round(c / total, 3) for c in counts + [0] * (count - len(counts)))
                shapes[shape] = entry
        finally:
            stop_workers(procs)
            client.delete(f"{QUEUE}:counts")
    client.close()
    return shapes


def main() -> int:
    p = argparse.ArgumentParser()
    for name, kind, default in (("fan", int, 100), ("fan-ms", float, 50.0), ("ends-ms", float, 0.0), ("threads", int, 16), ("procs", int, 4),
                                ("runs", int, 20), ("chain", int, 10), ("chain-ms", float, 20.0),
                                ("chain-threads", int, 8), ("repeat", int, 3), ("timeout", float, 120.0)):
        p.add_argument(f"--{name}", type=kind, default=default)
    args = p.parse_args()
    global QUEUE
    QUEUE = f"{QUEUE}-{uuid.uuid4().hex[:8]}"
    app.conf.update(task_default_queue=QUEUE, task_default_exchange=QUEUE, task_default_routing_key=QUEUE)
    try:
        import celery

        shapes = measure(args)
        print(json.dumps({"ok": True, "peer": "celery", "celery": celery.__version__, "pool": "threads",
                          "broker": "redis", "shapes": shapes}), flush=True)
        return 0
    except Exception as error:
        print(json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}), flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
