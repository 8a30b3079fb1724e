"""How the cost of a node execution grows with the size of a run, in memory and on each backend.

Shapes, each at a small and a large size (every run's result checked):
  chain        a chain of N nodes                       (default 100 and 1,000)
  fan          1 -> N -> 1 fan-out/fan-in               (default 100 and 1,000; the join sees N values)
  batch_start  a batch of N items that is a start node  (default 1,000 and 10,000)
  batch_after  a batch of N items behind a producer     (default 1,000 and 10,000)

For each backend (memory: `Flow.run`; redis, rq, rabbitmq: one run at a time, its jobs worked by
the adapter in this process with `work(burst=True)`) and shape it prints the wall time per node
execution (a batch item, its scatter and its gather each count as one) at both sizes and the
ratio large/small: the target is <= 1.3 (a run 10x larger costs at most 1.3x per node).

`--workers 1,2,4` measures contention instead: for each N, N worker processes (the adapter's own
`work()`; for rq, `RqAdapter.work()`, an in-process RQ SimpleWorker per process) run one
1 -> WORKERS_FAN -> 1 fan and one WORKERS_BATCH-item batch (behind a producer), started from this
process; it prints node executions/s and the workers' commit conflicts per node execution
(`DistributedAdapter.conflicts`: commits whose checks failed (a node commit: a state it changes had
changed; a run commit: the run's version had moved) and were derived
again). `--sleep-ms` makes every node sleep that long first (nodes that wait on I/O).

Output: one JSON line per measurement on stdout, then a summary line; a table on stderr unless
`--json`. Exit 1 if a run ended wrong. The machine is shared and the figures are noisy: compare
the ratios measured in one invocation, and read `loadavg_1m`.

    python benchmarks/scale.py                                   # every backend and shape
    python benchmarks/scale.py --backends redis,rabbitmq --shapes fan,batch_start,batch_after
    python benchmarks/scale.py --backends redis --fan 50,200 --batch 200,2000   # quicker
    python benchmarks/scale.py --backends redis,rabbitmq --workers 1,2,4 --sleep-ms 10

Services: REDIS_URL, RABBITMQ_URL, POSTGRES_URL (defaults: the local ones). Keys
`fcbench:<tag>:*`, queues `fcbench-<tag>-*`, tables `fcbench_<tag>_*`, removed afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# benchmarks/redis.py would shadow the redis package if this directory stayed on sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, ROOT)

from benchmarks import _common as C  # noqa: E402

BACKENDS = ("memory", "redis", "rq", "rabbitmq")
SHAPES = ("chain", "fan", "batch_start", "batch_after")
TARGET = 1.3  # large/small cost per node execution


# =================================================================================================
# workflows
# =================================================================================================


def flow_id(shape: str, n: int, sleep_ms: float) -> str:
    return f"scale-{shape}-{n}" + (f"-sleep{sleep_ms:g}" if sleep_ms else "")


def _sleeping(fn: Callable[[Any], Any], sleep_ms: float) -> Callable[[Any], Any]:
    if not sleep_ms:
        return fn

    def slow(ctx: Any) -> Any:
        time.sleep(sleep_ms / 1000.0)
        return fn(ctx)

    return slow


def _add(k: int) -> Callable[[Any], Any]:
    return lambda ctx: ctx.input + k


def _join(ctx: Any) -> Dict[str, int]:
    return {"count": len(ctx.input), "sum": sum(ctx.input.values())}


def build_flow(shape: str, n: int, sleep_ms: float = 0.0) -> Any:
    from flowcraft import create_flow

    flow = create_flow(flow_id(shape, n, sleep_ms))
    s = lambda fn: _sleeping(fn, sleep_ms)  # noqa: E731
    if shape == "chain":
        flow.node("n0", s(lambda ctx: ctx.context.get("value") + 1))
        for i in range(1, n):
            flow.node(f"n{i}", s(_add(1))).edge(f"n{i - 1}", f"n{i}")
    elif shape in ("fan", "fan_mid"):  # fan_mid: only the FAN middle nodes sleep, not the start and the join
        ends = s if shape == "fan" else (lambda fn: fn)
        flow.node("start", ends(lambda ctx: 0))
        for i in range(n):
            flow.node(f"p{i}", s(_add(i))).edge("start", f"p{i}").edge(f"p{i}", "join")
        flow.node("join", ends(_join))
    elif shape == "batch_start":
        flow.batch("each", s(lambda ctx: ctx.input * 2), input_key="items", output_key="out")
    elif shape == "batch_after":
        flow.node("make", s((lambda m: lambda ctx: list(range(m)))(n)))
        flow.batch("each", s(lambda ctx: ctx.input * 2), input_key="make", output_key="out").edge("make", "each")
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return flow


def initial_context(shape: str, n: int) -> Dict[str, Any]:
    if shape == "chain":
        return {"value": 0}
    if shape == "batch_start":
        return {"items": list(range(n))}
    return {}


def node_executions(shape: str, n: int) -> int:
    """Jobs a run executes: every node; a batch's scatter, its items and its gather."""
    return {"chain": n, "fan": n + 2, "batch_start": n + 2, "batch_after": n + 3}[shape]


def check_result(shape: str, n: int, status: Optional[str], context: Mapping[str, Any], errors: Any) -> None:
    C.check(status == "completed", f"{shape} {n}: status {status} {errors}")
    if shape == "chain":
        C.check(context.get(f"n{n - 1}") == n, f"chain {n}: last output {context.get(f'n{n - 1}')!r} != {n}")
    elif shape == "fan":
        want = {"count": n, "sum": n * (n - 1) // 2}
        C.check(context.get("join") == want, f"fan {n}: join saw {context.get('join')!r}, expected {want}")
    else:
        C.check(context.get("out") == [2 * i for i in range(n)], f"{shape} {n}: wrong batch output")


def make_runtime(flows: Sequence[Tuple[str, int, float]]) -> Any:
    from flowcraft import FlowRuntime

    runtime = FlowRuntime()
    for shape, n, sleep_ms in flows:
        runtime.add_blueprint(build_flow(shape, n, sleep_ms))
    return runtime


# =================================================================================================
# backends
# =================================================================================================


def urls() -> Dict[str, str]:
    return {"redis_url": os.environ.get("REDIS_URL") or C.DEFAULT_REDIS_URL,
            "amqp_url": os.environ.get("RABBITMQ_URL") or C.DEFAULT_RABBITMQ_URL,
            "postgres_dsn": os.environ.get("POSTGRES_URL") or C.DEFAULT_POSTGRES_URL}


def backend_conf(backend: str, tag: str, flows: Sequence[Tuple[str, int, float]], options: Mapping[str, Any]) -> Dict[str, Any]:
    return {"backend": backend, "tag": tag, **urls(), "prefix": f"fcbench:{tag}:{backend}:",
            "queue": f"fcbench-{tag}-{backend}", "context_table": f"fcbench_{tag}_contexts",
            "status_table": f"fcbench_{tag}_statuses", "table_prefix": f"fcbench_{tag}_",
            "flows": [list(f) for f in flows], "worker_options": dict(options)}


def prepare(conf: Mapping[str, Any]) -> None:
    if conf["backend"] == "rabbitmq":
        from benchmarks import rabbitmq as R

        R.create_schema(conf)


def cleanup(conf: Mapping[str, Any]) -> None:
    """Remove the backend's keys, queues and tables (as redis.py and rabbitmq.py do)."""
    if conf["backend"] == "rabbitmq":
        from benchmarks import rabbitmq as R

        R.cleanup(conf)
        return
    from benchmarks import redis as RB

    RB.cleanup(conf)
    if conf["backend"] == "rq":  # the records RQ keeps for a minute of the in-process workers that stopped
        import redis

        client = redis.Redis.from_url(conf["redis_url"])
        try:
            C.delete_redis_keys(client, f"rq:worker:flowcraft-{C._glob_escape(conf['queue'])}-*")
        finally:
            client.close()


def adapter_for(conf: Mapping[str, Any], runtime: Any, worker: bool) -> Any:
    return C.build_adapter(conf, runtime, worker=worker)


# =================================================================================================
# one run at a time, worked in this process
# =================================================================================================


def measure_memory(shape: str, n: int) -> Dict[str, Any]:
    flow = build_flow(shape, n)
    runtime = make_runtime([(shape, n, 0.0)])
    started = time.perf_counter()
    result = flow.run(runtime, initial_context(shape, n))
    wall = time.perf_counter() - started
    check_result(shape, n, result.status, result.context, result.errors)
    return {"wall_s": wall, "conflicts": 0}


def measure_distributed(adapter: Any, shape: str, n: int, timeout: float) -> Dict[str, Any]:
    conflicts_before = adapter.conflicts
    started = time.perf_counter()
    run_id = adapter.start_workflow(flow_id(shape, n, 0.0), initial_context(shape, n))
    deadline = started + timeout
    while True:
        adapter.work(burst=True)
        status = adapter.get_status(run_id)
        if status is not None and status.status in C.FINAL:
            break
        if time.perf_counter() > deadline:
            raise C.CheckFailed(f"{shape} {n}: run {run_id} still {status and status.status} after {timeout}s")
        time.sleep(0.001)  # a job published but not yet deliverable (a broker's round trip)
    wall = time.perf_counter() - started
    result = adapter.wait_for_result(run_id, timeout=10)
    check_result(shape, n, result.status, result.context, result.errors)
    return {"wall_s": wall, "conflicts": adapter.conflicts - conflicts_before}


def scale_lines(args: argparse.Namespace, out: C.Output, tag: str) -> None:
    sizes = {shape: getattr(args, "batch" if shape.startswith("batch") else shape) for shape in args.shape_list}
    flows = [(shape, n, 0.0) for shape, both in sizes.items() for n in both]
    for backend in args.backend_list:
        conf = backend_conf(backend, tag, flows, {})
        adapter = None
        if backend != "memory":
            prepare(conf)
            adapter = adapter_for(conf, make_runtime(flows), worker=True)
        try:
            for shape, both in sizes.items():
                for _ in range(args.warmup):  # connections, scripts, caches: not part of the small size's cost
                    measure_memory(shape, both[0]) if adapter is None else measure_distributed(adapter, shape, both[0], args.timeout)
                costs = []
                for n in both:
                    walls = []
                    conflicts = 0
                    for _ in range(args.repeat):
                        m = measure_memory(shape, n) if adapter is None else measure_distributed(adapter, shape, n, args.timeout)
                        walls.append(m["wall_s"])
                        conflicts += m["conflicts"]
                    wall = statistics.median(walls)
                    nodes = node_executions(shape, n)
                    us = wall / nodes * 1e6
                    costs.append(us)
                    out.emit("scale", backend=backend, shape=shape, size=n, node_executions=nodes, repeat=args.repeat,
                             wall_s=round(wall, 4), us_per_node=round(us, 2), conflicts=conflicts)
                    out.note(f"{backend:<9} {shape:<12} {n:>7,}  {us:>9,.1f} us/node  ({wall:.3f} s)")
                small, large = both
                ratio = round(costs[1] / costs[0], 2) if costs[0] > 0 else None
                out.emit("ratio", backend=backend, shape=shape, small=small, large=large,
                         us_per_node_small=round(costs[0], 2), us_per_node_large=round(costs[1], 2), ratio=ratio,
                         target=TARGET, met=ratio is not None and ratio <= TARGET)
        finally:
            if adapter is not None:
                C.close_adapter(adapter)
                cleanup(conf)


# =================================================================================================
# several worker processes
# =================================================================================================


def worker_main(conf_json: str) -> int:
    """A worker process: say ready, work until SIGTERM, then print what it processed and its conflicts."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conf = json.loads(conf_json)
    adapter = adapter_for(conf, make_runtime([tuple(f) for f in conf["flows"]]), worker=True)
    stop = lambda *_: adapter.stop()  # noqa: E731 - finishes the job in hand, then work() returns
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    processed = 0
    try:
        processed = adapter.work()
    finally:
        conflicts = adapter.conflicts
        C.close_adapter(adapter)
        print(json.dumps({"pid": os.getpid(), "processed": processed, "conflicts": conflicts}), flush=True)
    return 0


class ScaleWorkers(C.Workers):
    """Worker processes running `worker_main` (for rq too: `RqAdapter.work()`, so each can report
    its conflicts)."""

    def _command(self, i: int) -> Tuple[List[str], Dict[str, str]]:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return [sys.executable, "-m", "benchmarks.scale", "worker", json.dumps(self.conf)], env

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not all("ready" in C.read_all(out) for out, _ in self.logs):
            self.assert_alive()
            if time.monotonic() > deadline:
                raise C.CheckFailed(f"workers not ready after {timeout}s")
            time.sleep(0.05)

    def finish(self) -> Dict[str, Any]:
        """Stop them; what they processed and their conflicts, summed."""
        conflicts = 0
        logs = [out for out, _ in self.logs]
        texts: List[str] = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except Exception:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for out in logs:
            texts.append(C.read_all(out))
        for text in texts:
            for line in text.splitlines():
                if line.startswith('{"pid"'):
                    conflicts += json.loads(line).get("conflicts", 0)
        report = self.stop()  # collects `processed` and errors, closes the files
        report["conflicts"] = conflicts
        return report


def contention_lines(args: argparse.Namespace, out: C.Output, tag: str) -> None:
    shapes = [("fan", args.workers_fan), ("batch_after", args.workers_batch)]
    flows = [(shape, n, args.sleep_ms) for shape, n in shapes]
    for backend in [b for b in args.backend_list if b != "memory"]:
        for count in args.worker_counts:
            for shape, n in shapes:
                conf = backend_conf(backend, f"{tag}w{count}{shape[0]}", flows, {})
                prepare(conf)
                workers = None
                client = None
                try:
                    workers = ScaleWorkers(conf, count)
                    workers.wait_ready()
                    client = adapter_for(conf, make_runtime(flows), worker=False)
                    started = time.perf_counter()
                    run_id = client.start_workflow(flow_id(shape, n, args.sleep_ms), initial_context(shape, n))
                    deadline = started + args.timeout
                    while True:
                        status = client.get_status(run_id)
                        if status is not None and status.status in C.FINAL:
                            break
                        if time.perf_counter() > deadline:
                            raise C.CheckFailed(f"{backend} {shape} {n} with {count} workers: not done after {args.timeout}s")
                        workers.assert_alive()
                        time.sleep(0.005)
                    wall = time.perf_counter() - started
                    result = client.wait_for_result(run_id, timeout=10)
                    check_result(shape, n, result.status, result.context, result.errors)
                finally:
                    report = workers.finish() if workers is not None else {}
                    if client is not None:
                        C.close_adapter(client)
                    cleanup(conf)
                nodes = node_executions(shape, n)
                conflicts = report.get("conflicts", 0)
                out.emit("workers", backend=backend, shape=shape, size=n, workers=count, sleep_ms=args.sleep_ms,
                         node_executions=nodes, wall_s=round(wall, 4), nodes_per_s=round(nodes / wall, 1),
                         conflicts=conflicts, conflicts_per_node=round(conflicts / nodes, 3),
                         processed=report.get("processed"), clean_shutdown=report.get("clean_shutdown"),
                         worker_errors=report.get("worker_errors"))
                out.note(f"{backend:<9} {shape:<12} {n:>6,} x{count} workers  {nodes / wall:>8,.0f} nodes/s  "
                         f"{conflicts / nodes:.3f} conflicts/node")


# =================================================================================================
# main
# =================================================================================================


def sizes(p: argparse.ArgumentParser, name: str, text: str) -> Tuple[int, int]:
    try:
        small, large = (int(x) for x in text.split(","))
    except ValueError:
        p.error(f"--{name} wants SMALL,LARGE (two whole numbers), not {text!r}")
    if not 1 <= small < large:
        p.error(f"--{name}: want 1 <= SMALL < LARGE, not {text!r}")
    return small, large


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="memory,redis,rq,rabbitmq", help="comma-separated: " + ", ".join(BACKENDS))
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--chain", default="100,1000", help="chain lengths SMALL,LARGE")
    p.add_argument("--fan", default="100,1000", help="fan widths SMALL,LARGE")
    p.add_argument("--batch", default="1000,10000", help="batch sizes SMALL,LARGE (both batch shapes)")
    p.add_argument("--repeat", type=int, default=1, help="runs per size (the median is printed)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of the small size before each shape")
    p.add_argument("--workers", default="", help="e.g. 1,2,4: measure contention with that many worker processes "
                                                  "instead of the scale table")
    p.add_argument("--workers-fan", type=int, default=500, help="fan width of the --workers measurement")
    p.add_argument("--workers-batch", type=int, default=1000, help="batch size of the --workers measurement")
    p.add_argument("--sleep-ms", type=float, default=0.0, help="every node of the --workers runs sleeps this long")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    p.add_argument("--json", action="store_true", help="JSON lines only (no progress or table on stderr)")
    args = p.parse_args(argv)
    args.backend_list = [b for b in args.backends.split(",") if b]
    args.shape_list = [s for s in args.shapes.split(",") if s]
    for name, chosen, known in (("backends", args.backend_list, BACKENDS), ("shapes", args.shape_list, SHAPES)):
        unknown = sorted(set(chosen) - set(known))
        if unknown or not chosen:
            p.error(f"--{name}: unknown {unknown}; expected some of {', '.join(known)}")
    if "rq" in args.backend_list:
        available, why = C.rq_available()
        if not available:
            p.error(f"--backends rq is not available: {why}")
    args.chain, args.fan, args.batch = (sizes(p, n, getattr(args, n)) for n in ("chain", "fan", "batch"))
    try:
        args.worker_counts = [int(x) for x in args.workers.split(",") if x]
    except ValueError:
        p.error(f"--workers wants counts like 1,2,4, not {args.workers!r}")
    if any(c < 1 for c in args.worker_counts) or min(args.repeat, args.workers_fan, args.workers_batch) < 1 or args.warmup < 0:
        p.error("--workers counts, --repeat, --workers-fan and --workers-batch must be >= 1, --warmup >= 0")
    if args.sleep_ms < 0:
        p.error("--sleep-ms must be >= 0")
    return args


def _aligned(rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def table(lines: Sequence[Mapping[str, Any]]) -> str:
    text: List[str] = []
    ratios = [(l["backend"], l["shape"], f"{l['small']:,}", f"{l['us_per_node_small']:,.1f}", f"{l['large']:,}",
               f"{l['us_per_node_large']:,.1f}", f"{l['ratio']:.2f}x" if l["ratio"] is not None else "-",
               "met" if l["met"] else "NOT met") for l in lines if l["kind"] == "ratio"]
    if ratios:
        text += _aligned([("backend", "shape", "small", "us/node", "large", "us/node", "large/small", f"<= {TARGET}"), *ratios])
    workers = [(l["backend"], l["shape"], f"{l['size']:,}", str(l["workers"]), f"{l['sleep_ms']:g}", f"{l['nodes_per_s']:,.0f}",
                f"{l['conflicts_per_node']:.3f}") for l in lines if l["kind"] == "workers"]
    if workers:
        text += _aligned([("backend", "shape", "size", "workers", "sleep ms", "nodes/s", "conflicts/node"), *workers])
    text.append("A shared, noisy machine: compare ratios measured in one invocation; see loadavg_1m.")
    return "\n".join(text)


def run(args: argparse.Namespace, out: C.Output) -> int:
    tag = C.new_tag()
    out.emit("setup", tag=tag, backends=args.backend_list, shapes=args.shape_list, chain=args.chain, fan=args.fan,
             batch=args.batch, workers=args.worker_counts, sleep_ms=args.sleep_ms, redis_prefix=f"fcbench:{tag}")
    failed = False
    try:
        if args.worker_counts:
            contention_lines(args, out, tag)
        else:
            scale_lines(args, out, tag)
    except C.CheckFailed as exc:
        failed = True
        out.emit("check_failed", error=str(exc))
        out.note(f"CHECK FAILED: {exc}")
    ratios = [l for l in out.lines if l["kind"] == "ratio"]
    out.emit("summary", ok=not failed, target=TARGET, ratios={f"{l['backend']}:{l['shape']}": l["ratio"] for l in ratios},
             met=all(l["met"] for l in ratios) if ratios else None)
    out.note("\n" + table(out.lines))
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    return C.run_main("flowcraft-scale", parse_args(argv), run)


if __name__ == "__main__":
    # the node functions must come from the module `benchmarks.scale` in the client and in every
    # worker alike (a blueprint's uses keys name them; those of `__main__` would differ)
    from benchmarks import scale as _module

    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(_module.worker_main(sys.argv[2]))
    sys.exit(_module.main())
