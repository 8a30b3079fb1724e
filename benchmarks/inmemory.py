"""In-memory runtime throughput, measured back to back with Flowcraft TS's in-memory runtime.

Shapes (the same as ../shared/peers/ts/inmem.mjs, checked inside the timed loop):
  a_chain    200-node chain of function nodes                     -> node executions/s
  b_fan      1 -> 200 -> 1 fan-out/fan-in, joinStrategy 'all'        -> node executions/s
  c_diamond  5-node diamond a->{b,c}->d->e                          -> runs/s
  d_batch    one .batch() over 10,000 items (ours only)             -> items/s

Each shape runs in a fresh process, alternating ours and the TS peer, ROUNDS times; medians and the
ratio ours/TS are printed. Usage:

    python benchmarks/inmemory.py                 # ours and the TS peer (needs node + npm)
    python benchmarks/inmemory.py --no-peer       # ours only
    python benchmarks/inmemory.py --shape a_chain # one shape, one process, one JSON line
    python benchmarks/inmemory.py --scale         # cost per node as the run grows (fans, chains)
    python benchmarks/inmemory.py --telemetry     # a_chain with OpenTelemetry + Prometheus, next to without

--telemetry measures the a_chain shape in one process, the variants interleaved ROUNDS times:
plain, PrometheusMetrics only, OpenTelemetryMiddleware only (an SDK TracerProvider, no span
processor nor exporter: every span is still recorded and ended), and both; it prints nodes/s,
the ratio to plain (issue 16's target: both >= 70%) and the cost per node of each, plus the cost
of one bare SDK span measured alone (what a recording span costs whatever the middleware does).
Needs the otel and prometheus extras and opentelemetry-sdk.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

CHAIN_N = 200
FAN_N = 200
BATCH_N = 10_000
PEER_SRC = os.path.join(ROOT, "..", "shared", "peers", "ts")
PEER_DIR = os.path.join(HERE, ".peers", "ts")


def build(shape: str):
    from flowcraft import create_flow

    if shape == "a_chain":
        flow = create_flow(f"chain-{CHAIN_N}")
        flow.node("n0", lambda ctx: ctx.context.get("value") + 1)
        for i in range(1, CHAIN_N):
            flow.node(f"n{i}", lambda ctx: ctx.input + 1)
            flow.edge(f"n{i - 1}", f"n{i}")
        return flow, {"value": 0}, CHAIN_N, lambda r: r.context[f"_outputs.n{CHAIN_N - 1}"] == CHAIN_N
    if shape == "b_fan":
        flow = create_flow(f"fan-{FAN_N}")
        flow.node("start", lambda ctx: 0)
        for i in range(FAN_N):
            flow.node(f"p{i}", (lambda k: lambda ctx: ctx.input + k)(i))
            flow.edge("start", f"p{i}")
            flow.edge(f"p{i}", "join")

        def join(ctx):  # the join gets every predecessor's output, in edge order
            values = ctx.input
            return {"count": len(values), "sum": sum(values.values())}

        flow.node("join", join)
        expected = FAN_N * (FAN_N - 1) // 2
        return flow, {}, FAN_N + 2, lambda r: r.context["_outputs.join"] == {"count": FAN_N, "sum": expected}
    if shape == "c_diamond":
        flow = (
            create_flow("diamond-5")
            .node("a", lambda ctx: ctx.context.get("value"))
            .node("b", lambda ctx: ctx.input + 1)
            .node("c", lambda ctx: ctx.input * 10)
            .node("d", lambda ctx: ctx.context.get("b") + ctx.context.get("c"))
            .node("e", lambda ctx: ctx.input + 1)
            .edge("a", "b").edge("a", "c").edge("b", "d").edge("c", "d").edge("d", "e")
        )
        return flow, {"value": 1}, 5, lambda r: r.context["_outputs.e"] == 13
    if shape == "d_batch":
        flow = create_flow("batch-10k").batch("double", lambda ctx: ctx.input * 2, input_key="items", output_key="out")
        items = list(range(BATCH_N))
        return flow, {"items": items}, BATCH_N, lambda r: r.context["out"][-1] == 2 * (BATCH_N - 1)
    raise SystemExit(f"unknown shape {shape!r}")


def measure_ours(shape: str, seconds: float, warmup: float) -> dict:
    from flowcraft import FlowRuntime

    flow, initial, nodes, check = build(shape)
    blueprint, registry, runtime = flow.to_blueprint(), flow.registry, FlowRuntime()

    def once() -> None:
        result = runtime.run(blueprint, dict(initial), registry=registry)
        if result.status != "completed" or not check(result):
            raise SystemExit(f"{shape}: wrong result {result.status} {result.errors}")

    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        once()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or runs < 3:
        once()
        runs += 1
    wall = time.perf_counter() - started
    return {"shape": shape, "runs": runs, "wall_s": round(wall, 3), "nodes_per_s": round(runs * nodes / wall, 1),
            "runs_per_s": round(runs / wall, 1), "us_per_run": round(wall / runs * 1e6, 1)}


def measure_telemetry(seconds: float, rounds: int) -> dict:
    """a_chain nodes/s plain and with telemetry (see the module docstring); medians of `rounds`."""
    from opentelemetry.sdk.trace import TracerProvider

    from flowcraft import FlowRuntime
    from flowcraft.telemetry import OpenTelemetryMiddleware, PrometheusMetrics

    flow, initial, nodes, check = build("a_chain")
    blueprint, registry = flow.to_blueprint(), flow.registry
    variants = {
        "plain": lambda: FlowRuntime(),
        "prometheus": lambda: FlowRuntime(middleware=[PrometheusMetrics()]),
        "otel": lambda: FlowRuntime(middleware=[OpenTelemetryMiddleware(tracer_provider=TracerProvider())]),
        "both": lambda: FlowRuntime(middleware=[OpenTelemetryMiddleware(tracer_provider=TracerProvider()),
                                                PrometheusMetrics()]),
    }

    def rate(runtime: Any) -> float:
        for _ in range(3):  # warm-up
            runtime.run(blueprint, dict(initial), registry=registry)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or runs < 3:
            result = runtime.run(blueprint, dict(initial), registry=registry)
            if result.status != "completed" or not check(result):
                raise SystemExit(f"a_chain: wrong result {result.status} {result.errors}")
            runs += 1
        return runs * nodes / (time.perf_counter() - started)

    samples: dict = {name: [] for name in variants}
    for _ in range(rounds):
        for name, make in variants.items():
            samples[name].append(rate(make()))
    tracer = TracerProvider().get_tracer("bench")
    span_cost = []
    for _ in range(rounds):
        started, count = time.perf_counter(), 20_000
        for _ in range(count):
            tracer.start_span("flowcraft.node n").end()
        span_cost.append((time.perf_counter() - started) / count * 1e6)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    plain = medians["plain"]
    return {"shape": "a_chain", "nodes_per_s": {k: round(v, 1) for k, v in medians.items()},
            "ratio_to_plain": {k: round(v / plain, 3) for k, v in medians.items()},
            "us_per_node_added": {k: round((1 / v - 1 / plain) * 1e6, 2) for k, v in medians.items()},
            "bare_sdk_span_us": round(statistics.median(span_cost), 2), "target_both_ratio": 0.7}


SCALE_SIZES = {"fan": (250, 1_000, 4_000), "chain": (100, 1_000, 10_000)}


def measure_scale(kind: str, size: int, seconds: float) -> float:
    """Microseconds per node of one run of a 1->size->1 fan or a size-node chain (best of the runs)."""
    from flowcraft import FlowRuntime, create_flow

    flow = create_flow(f"{kind}-{size}")
    if kind == "fan":
        flow.node("start", lambda ctx: 0)
        for i in range(size):
            flow.node(f"p{i}", lambda ctx: ctx.input + 1)
            flow.edge("start", f"p{i}")
            flow.edge(f"p{i}", "join")
        flow.node("join", lambda ctx: len(ctx.input))
        nodes, last, expected = size + 2, "join", size
    else:
        flow.node("n0", lambda ctx: 1)
        for i in range(1, size):
            flow.node(f"n{i}", lambda ctx: ctx.input + 1)
            flow.edge(f"n{i - 1}", f"n{i}")
        nodes, last, expected = size, f"n{size - 1}", size
    blueprint, registry, runtime = flow.to_blueprint(), flow.registry, FlowRuntime()
    best, started, runs = float("inf"), time.perf_counter(), 0
    while runs < 2 or (time.perf_counter() - started < seconds and runs < 50):
        t0 = time.perf_counter()
        result = runtime.run(blueprint, {}, registry=registry)
        best = min(best, time.perf_counter() - t0)
        if result.status != "completed" or result.context[f"_outputs.{last}"] != expected:
            raise SystemExit(f"{kind}-{size}: wrong result {result.status} {result.errors}")
        runs += 1
    return best / nodes * 1e6


def run_scale(seconds: float) -> None:
    rows = {}
    for kind, sizes in SCALE_SIZES.items():
        costs = [measure_scale(kind, size, seconds) for size in sizes]
        ratio = costs[-1] / costs[0]
        rows[kind] = {"sizes": list(sizes), "us_per_node": [round(c, 2) for c in costs], "ratio_large_small": round(ratio, 2)}
        shown = "  ".join(f"{size:>6,}: {cost:6.1f} us/node" for size, cost in zip(sizes, costs))
        print(f"{kind:<6} {shown}  ratio large/small {ratio:.2f}", file=sys.stderr)
    print(json.dumps({"bench": "flowcraft-py-inmem-scale", "loadavg": os.getloadavg(), "scale": rows}))


def ensure_peer() -> bool:
    if not shutil.which("node") or not shutil.which("npm") or not os.path.isdir(PEER_SRC):
        print("TS peer unavailable (needs node, npm and ../shared/peers/ts)", file=sys.stderr)
        return False
    if not os.path.isdir(os.path.join(PEER_DIR, "node_modules")):
        os.makedirs(PEER_DIR, exist_ok=True)
        for name in os.listdir(PEER_SRC):
            src = os.path.join(PEER_SRC, name)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(PEER_DIR, name))
                os.chmod(os.path.join(PEER_DIR, name), 0o644)
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=PEER_DIR, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"npm install of the TS peer failed: {done.stderr[-500:]}", file=sys.stderr)
            return False
    return True


def measure_peer(shape: str, seconds: float) -> dict:
    env = dict(os.environ, MIN_SECONDS=str(seconds), WARMUP_SECONDS="1")
    out = subprocess.run(["node", "inmem.mjs", shape], cwd=PEER_DIR, capture_output=True, text=True, env=env)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    if not line.get("ok"):
        raise SystemExit(f"TS peer failed on {shape}: {line.get('error')}")
    return line["result"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", help="measure one shape in this process and print its JSON line")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--scale", action="store_true", help="cost per node at growing fan and chain sizes, and the ratio")
    parser.add_argument("--telemetry", action="store_true",
                        help="a_chain with OpenTelemetry + Prometheus next to without, and the ratio")
    args = parser.parse_args()
    if args.telemetry:
        out = measure_telemetry(args.seconds, args.rounds)
        for name, value in out["nodes_per_s"].items():
            print(f"a_chain {name:<11} {value:>10,.0f} nodes/s  {out['ratio_to_plain'][name]:>6.1%} of plain  "
                  f"+{out['us_per_node_added'][name]:.1f} us/node", file=sys.stderr)
        print(f"one bare SDK span (start + end): {out['bare_sdk_span_us']:.1f} us; "
              f"both/plain {out['ratio_to_plain']['both']:.1%} (target 70%)", file=sys.stderr)
        print(json.dumps({"bench": "flowcraft-py-inmem-telemetry", "python": sys.version.split()[0],
                          "loadavg": os.getloadavg(), **out}))
        return
    if args.scale:
        run_scale(args.seconds)
        return
    if args.shape:
        print(json.dumps(measure_ours(args.shape, args.seconds, args.warmup)))
        return
    peer = not args.no_peer and ensure_peer()
    rows = {}
    for shape in ("a_chain", "b_fan", "c_diamond", "d_batch"):
        ours, theirs = [], []
        metric = "runs_per_s" if shape == "c_diamond" else "nodes_per_s"
        for _ in range(args.rounds):
            out = subprocess.run([sys.executable, __file__, "--shape", shape, "--seconds", str(args.seconds),
                                  "--warmup", str(args.warmup)], capture_output=True, text=True, check=True)
            ours.append(json.loads(out.stdout)[metric])
            if peer and shape != "d_batch":
                theirs.append(measure_peer(shape, args.seconds)[metric])
        row = {"metric": metric, "ours": ours, "ours_median": statistics.median(ours)}
        if theirs:
            row.update(ts=theirs, ts_median=statistics.median(theirs),
                       ratio=round(statistics.median(ours) / statistics.median(theirs), 2))
        rows[shape] = row
        ratio = f"  ratio ours/TS {row['ratio']:.2f}x (TS median {row['ts_median']:,.0f})" if "ratio" in row else ""
        print(f"{shape:<10} {metric:<12} ours median {row['ours_median']:>10,.0f}{ratio}", file=sys.stderr)
    print(json.dumps({"bench": "flowcraft-py-inmem", "python": sys.version.split()[0], "loadavg": os.getloadavg(),
                      "shapes": rows}))


if __name__ == "__main__":
    main()
