"""Workers for real nodes (SPEC section 10): nodes that sleep (I/O-bound), on threads and on
several worker processes, side by side with Celery 5.7 (threads pool) and Flowcraft TS on BullMQ.

Shapes (sizes from the command line; the defaults are the issue's):

* ``fan_threads``: a 1 -> FAN -> 1 fan whose FAN nodes sleep ``--fan-ms`` (50), one worker process
  with ``--threads`` (16) threads; wall time of one run (median of ``--repeat``), target <= 0.45 s.
  The issue's ideal, 0.31 s = 100 x 50 ms / 16, counts the FAN nodes only: its start and join do
  not sleep (``--ends-ms 0``, the default; at best ceil(100 / 16) = 7 rounds of 50 ms = 0.35 s).
  With ``--ends-ms 50`` they sleep too: at best 0.45 s, which would leave the target nothing for
  fetching and committing (the targets are then not judged);
* ``fan_procs``: the same fan on ``--procs`` (4) worker processes of 1 thread: wall time (target
  <= 1.6 s; ideal 1.25 s = 100 x 50 ms / 4 = 25 rounds; with ``--ends-ms 50`` at best 1.35 s) and
  each worker's share of the node executions (target 15-35 %);
* ``chains``: ``--runs`` (20) concurrent runs of a ``--chain`` (10)-node chain of nodes sleeping
  ``--chain-ms`` (20), one worker with ``--chain-threads`` (8) threads: node executions per second
  (target >= 0.8 x 8 x 1000 / 20 = 320).

Every run's result is checked (the join saw every output). Until commits of one run stop
serialising on one run-wide version, threads of one run conflict: each of our lines reports
`conflicts` (`DistributedAdapter.conflicts`, summed over the workers).

Peers, each measured in the same invocation on the same shapes: Celery 5.7 on Redis with
``--pool=threads`` (a chord of FAN sleeping tasks and a sum, chains of sleeping tasks;
`realistic_celery.py`, run with the Python peer's venv) and Flowcraft TS on BullMQ with its worker
concurrency raised through BullMQ's ``Worker.concurrency`` setter (`realistic_bullmq.mjs`, run in
the TS peer's directory). ``--no-peer`` skips them. Prints JSON lines on stdout, a table on stderr.

Peer setup (automatic, on first use): the peers' sources are copied from ``../shared/peers`` beside
the checkout (a git worktree elsewhere: set ``BENCH_PEERS_DIR=/path/to/shared/peers``) into
benchmarks/.peers/ (git-ignored); the Python peer gets ``benchmarks/.peers/py/.venv`` (``python -m
venv`` + ``pip install -r requirements.txt``: Celery 5.7.0, RQ, redis, pika, psycopg2), the TS peer
``npm install`` (Node 20; flowcraft 2.10.1, @flowcraft/bullmq-adapter 1.7.1, bullmq). Either may be
given ready-made instead: ``--py-peer-python /path/to/venv/bin/python`` (a python with celery 5.7),
``--ts-peer-dir DIR`` (a copy of the TS peer with its node_modules). ``--shapes`` measures some
shapes only (of ours; the peers measure all).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
for path in (os.path.join(ROOT, "adapters"),):
    if path not in sys.path:
        sys.path.insert(0, path)

from benchmarks import _common as C  # noqa: E402
from benchmarks import scale as S  # noqa: E402

TARGETS = {"fan_threads": ("wall_s", "<=", 0.45), "fan_procs": ("wall_s", "<=", 1.6),
           "chains": ("nodes_per_s", ">=", 320.0)}
SHARE_RANGE = (0.15, 0.35)


# =================================================================================================
# ours
# =================================================================================================


class Workers(S.ScaleWorkers):
    """Worker processes (`scale.worker_main`) whose reports are read one by one."""

    def finish_each(self) -> List[Dict[str, Any]]:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        reports: List[Dict[str, Any]] = []
        for proc, (out, _) in zip(self.procs, self.logs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            for line in C.read_all(out).splitlines():
                if line.startswith('{"pid"'):
                    reports.append(json.loads(line))
        self.stop()
        return reports


def wait_all(poll: C.FinalStatuses, run_ids: Sequence[str], timeout: float) -> Dict[str, Any]:
    """Poll, every 2 ms with one read for all of them (as the peers do), until every run ended;
    their results."""
    pending = list(run_ids)
    results: Dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for run_id, (status, result) in poll(pending).items():
            results[run_id] = dict(result or {}, status=status)
        pending = [r for r in pending if r not in results]
        if pending:
            if time.monotonic() > deadline:
                raise C.CheckFailed(f"{len(pending)} runs still not finished after {timeout}s")
            time.sleep(0.002)
    return results


def check(shape: str, n: int, results: Mapping[str, Any]) -> None:
    for result in results.values():
        S.check_result(shape, n, result.get("status"), result.get("context") or {}, result.get("errors"))


def measure_ours(backend: str, args: argparse.Namespace, tag: str, out: C.Output) -> List[Dict[str, Any]]:
    fan, chain = (fan_shape(args), args.fan, args.fan_ms), ("chain", args.chain, args.chain_ms)
    flows = [fan, chain]
    runtime = S.make_runtime(flows)
    lines = []
    plans = [("fan_threads", 1, args.threads), ("fan_procs", args.procs, 1), ("chains", 1, args.chain_threads)]
    plans = [plan for plan in plans if plan[0] in args.shape_list]
    for shape, procs, threads in plans:
        conf = S.backend_conf(backend, f"{tag}{shape[:2]}", flows, {"threads": threads} if threads > 1 else {})
        S.prepare(conf)
        client = S.adapter_for(conf, runtime, worker=False)
        poll = C.final_statuses(conf, client)
        workers = Workers(conf, procs)
        try:
            workers.wait_ready()
            if shape == "chains":
                flow = S.flow_id("chain", args.chain, args.chain_ms)
                wait_all(poll, [client.start_workflow(flow, {"value": 0})], args.timeout)  # warm-up
                started = time.perf_counter()
                run_ids = [client.start_workflow(flow, {"value": 0}) for _ in range(args.runs)]
                results = wait_all(poll, run_ids, args.timeout)
                wall = time.perf_counter() - started
                check("chain", args.chain, results)
                nodes = args.runs * args.chain
                figures: Dict[str, Any] = {"wall_s": round(wall, 3), "node_executions": nodes,
                                           "nodes_per_s": round(nodes / wall, 1)}
            else:
                flow = S.flow_id(fan_shape(args), args.fan, args.fan_ms)
                wait_all(poll, [client.start_workflow(flow)], args.timeout)  # warm-up
                walls = []
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    results = wait_all(poll, [client.start_workflow(flow)], args.timeout)
                    walls.append(time.perf_counter() - started)
                    check("fan", args.fan, results)
                figures = {"wall_s": round(statistics.median(walls), 3), "walls_s": [round(w, 3) for w in walls],
                           "node_executions": args.fan + 2}
        finally:
            reports = workers.finish_each()
            C.close_adapter(client)
            S.cleanup(conf)
        figures["conflicts"] = sum(r.get("conflicts", 0) for r in reports)
        if procs > 1:
            total = sum(r.get("processed", 0) for r in reports) or 1
            shares = sorted(round(r.get("processed", 0) / total, 3) for r in reports)
            figures["shares"] = shares
            figures["shares_met"] = bool(shares) and SHARE_RANGE[0] <= shares[0] and shares[-1] <= SHARE_RANGE[1]
        line = out.emit("ours", backend=backend, shape=shape, procs=procs, threads=threads, **figures,
                        **target_verdict(shape, figures, args))
        out.note(f"{backend:<9} {shape:<12} procs={procs} threads={threads:<3} " + describe(figures))
        lines.append(line)
    return lines


def fan_shape(args: argparse.Namespace) -> str:
    """`scale.build_flow`'s fan: its start and join sleep too (`--ends-ms` = `--fan-ms`) or not (0)."""
    return "fan" if args.ends_ms else "fan_mid"


def issue_sizes(args: argparse.Namespace) -> bool:
    return (args.fan, args.fan_ms, args.ends_ms, args.threads, args.procs, args.runs, args.chain, args.chain_ms,
            args.chain_threads) == (100, 50.0, 0.0, 16, 4, 20, 10, 20.0, 8)


def target_verdict(shape: str, figures: Mapping[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    if not issue_sizes(args):
        return {}
    key, op, bound = TARGETS[shape]
    value = figures[key]
    return {"target": f"{key} {op} {bound}", "met": value <= bound if op == "<=" else value >= bound}


def describe(figures: Mapping[str, Any]) -> str:
    parts = [f"wall {figures['wall_s']:.3f} s"]
    if "nodes_per_s" in figures:
        parts.append(f"{figures['nodes_per_s']:.0f} nodes/s")
    if "shares" in figures:
        parts.append("shares " + "/".join(f"{s:.0%}" for s in figures["shares"]))
    parts.append(f"conflicts {figures['conflicts']}")
    return ", ".join(parts)


# =================================================================================================
# peers
# =================================================================================================


def peer_args(args: argparse.Namespace) -> List[str]:
    return ["--fan", str(args.fan), "--fan-ms", str(args.fan_ms), "--ends-ms", str(args.ends_ms), "--threads", str(args.threads), "--procs",
            str(args.procs), "--runs", str(args.runs), "--chain", str(args.chain), "--chain-ms", str(args.chain_ms),
            "--chain-threads", str(args.chain_threads), "--repeat", str(args.repeat)]


def run_celery(args: argparse.Namespace) -> Dict[str, Any]:
    python = args.py_peer_python
    if not python:
        peer, why = C.ensure_py_peer()
        if peer is None:
            raise RuntimeError(why)
        python = os.path.join(peer, ".venv", "bin", "python")
    env = dict(os.environ, BENCH_REDIS_URL=args.celery_redis_url)
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory() as where:  # away from benchmarks/redis.py, which would shadow `redis`
        script = shutil.copy(os.path.join(HERE, "realistic_celery.py"), where)
        done = subprocess.run([python, script, *peer_args(args)], cwd=where, env=env, capture_output=True, text=True,
                              timeout=args.timeout * 10, stdin=subprocess.DEVNULL)
    line = C.last_json_line(done.stdout)
    if line is None or not line.get("ok"):
        raise RuntimeError(f"celery peer failed (exit {done.returncode}): {(line or {}).get('error') or done.stderr[-800:]}")
    return line


def run_bullmq(args: argparse.Namespace) -> Dict[str, Any]:
    peer = args.ts_peer_dir
    if not peer:
        peer, why = C.ensure_ts_peer()
        if peer is None:
            raise RuntimeError(why)
    script = os.path.join(peer, "realistic_bullmq.mjs")  # beside its node_modules, for the imports
    shutil.copy(os.path.join(HERE, "realistic_bullmq.mjs"), script)
    env = dict(os.environ)
    done = subprocess.run(["node", script, *peer_args(args)], cwd=peer, env=env, capture_output=True, text=True,
                          timeout=args.timeout * 10)
    line = C.last_json_line(done.stdout)
    if line is None or not line.get("ok"):
        raise RuntimeError(f"BullMQ peer failed (exit {done.returncode}): {(line or {}).get('error') or done.stderr[-800:]}")
    return line


# =================================================================================================
# main
# =================================================================================================


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="redis,rabbitmq", help="comma-separated: redis, rabbitmq")
    p.add_argument("--shapes", default=",".join(TARGETS), help="comma-separated: " + ", ".join(TARGETS))
    p.add_argument("--fan", type=int, default=100)
    p.add_argument("--fan-ms", type=float, default=50.0)
    p.add_argument("--ends-ms", type=float, default=0.0,
                   help="sleep of the fan's start and join nodes: 0 (the issue's shape) or the --fan-ms value")
    p.add_argument("--threads", type=int, default=16, help="threads of the one worker on the fan")
    p.add_argument("--procs", type=int, default=4, help="worker processes (1 thread each) on the fan")
    p.add_argument("--runs", type=int, default=20, help="concurrent chain runs")
    p.add_argument("--chain", type=int, default=10)
    p.add_argument("--chain-ms", type=float, default=20.0)
    p.add_argument("--chain-threads", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3, help="fan runs measured (the median is reported)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--no-peer", action="store_true", help="measure ours only")
    p.add_argument("--py-peer-python", help="a python with celery 5.7 (default: the peer's venv, made on first use)")
    p.add_argument("--ts-peer-dir", help="the TS peer's directory with node_modules (default: made on first use)")
    p.add_argument("--celery-redis-url", default=os.environ.get("BENCH_CELERY_REDIS_URL", "redis://127.0.0.1:6379/14"))
    p.add_argument("--json", action="store_true", help="JSON lines only (no table on stderr)")
    args = p.parse_args(argv)
    if args.ends_ms not in (0.0, args.fan_ms):
        p.error("--ends-ms is 0 or the --fan-ms value")
    args.backend_list = [b for b in args.backends.split(",") if b]
    if not set(args.backend_list) <= {"redis", "rabbitmq"}:
        p.error(f"unknown backends in {args.backends!r}")
    args.shape_list = [s for s in args.shapes.split(",") if s]
    if not set(args.shape_list) <= set(TARGETS):
        p.error(f"unknown shapes in {args.shapes!r}")
    return args


def summary_rows(ours: Sequence[Mapping[str, Any]], peers: Mapping[str, Mapping[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for line in ours:
        shape = line["shape"]
        key = "nodes_per_s" if shape == "chains" else "wall_s"
        row: Dict[str, Any] = {"backend": line["backend"], "shape": shape, key: line[key], "conflicts": line["conflicts"]}
        for name, peer in peers.items():
            theirs = (peer.get("shapes") or {}).get(shape, {}).get(key)
            row[name] = theirs
            # > 1: ours is better (faster wall, or more nodes/s)
            row[f"vs_{name}"] = C.ratio(line[key], theirs, higher_is_better=key == "nodes_per_s")
        rows.append(row)
    return rows


def run(args: argparse.Namespace, out: C.Output) -> int:
    tag = C.new_tag()
    ok = True
    ours: List[Dict[str, Any]] = []
    for backend in args.backend_list:
        try:
            ours += measure_ours(backend, args, tag, out)
        except C.CheckFailed as error:
            out.emit("check_failed", backend=backend, error=str(error))
            ok = False
    peers: Dict[str, Dict[str, Any]] = {}
    if not args.no_peer:
        for name, runner in (("celery_threads", run_celery), ("ts_bullmq", run_bullmq)):
            try:
                peers[name] = runner(args)
                out.emit("peer", **dict(peers[name], peer=name))
                out.note(f"{name:<15} " + ", ".join(f"{s}: {describe_peer(f)}" for s, f in peers[name]["shapes"].items()))
            except Exception as error:  # a peer that cannot run is reported, ours still stand
                out.emit("peer_unavailable", peer=name, error=str(error)[:1000])
                out.note(f"{name}: not measured: {str(error)[:300]}")
    rows = summary_rows(ours, peers)
    out.emit("summary", ok=ok, rows=rows)
    if not args.json:
        out.note(table(rows))
    return 0 if ok else 1


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    keys = ["backend", "shape", "wall_s", "nodes_per_s", "conflicts", "celery_threads", "vs_celery_threads",
            "ts_bullmq", "vs_ts_bullmq"]
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if value < 10 else f"{value:,.0f}"
        return str(value)

    cells = [keys] + [[cell(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells)


def describe_peer(figures: Mapping[str, Any]) -> str:
    if "nodes_per_s" in figures:
        return f"{figures['nodes_per_s']:.0f} nodes/s"
    text = f"{figures['wall_s']:.3f} s"
    if figures.get("shares"):
        text += " (shares " + "/".join(f"{s:.0%}" for s in figures["shares"]) + ")"
    return text


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "worker":
        return S.worker_main(sys.argv[2])
    args = parse_args(argv)
    return C.run_main("realistic", args, run)


if __name__ == "__main__":
    sys.exit(main())
