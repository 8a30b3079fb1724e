"""Distributed throughput on Redis: RedisAdapter (and RqAdapter), interleaved with the peers.

Shapes (those of ../shared/peers/ts/bullmq.mjs), every run checked inside the timed loop:
  a_chain   RUNS runs of a CHAIN-node chain started at once  -> node executions/s, median run latency
  a_serial  SERIAL_RUNS runs of that chain one after another -> ms per run (unloaded latency)
  b_fan     FAN_RUNS runs of 1 -> FAN -> 1 started at once   -> node executions/s (join sum checked)

The worker runs in separate processes (`--workers N`), the client in this process. After a
warm-up, each of `--rounds` rounds measures, in this order: the raw limits of Redis from this
process (PING/s sequential, pipelined INCR/s in batches of 100, the BLMOVE+LREM hand-off/s that
RedisAdapter's queue is built on), our shapes on each backend, then one round of the TS peer
(Flowcraft TS on BullMQ, `node bullmq.mjs`, fresh process); the Python RQ peer (rq_bench.py:
sequential chains and fans on plain RQ, Worker and SimpleWorker) runs once, after the first round.

Output: one JSON line per measurement on stdout, a summary JSON line, and (on stderr, unless
`--json`) progress and a table of medians: shape, ours, peer, ratio. Exit 1 if any run of ours
ended wrong. The machine is shared: read `host_cpu.other_cores` and the load averages.

    python benchmarks/redis.py                              # redis (+ rq if available), both peers
    python benchmarks/redis.py --no-peer --rounds 1         # ours only
    python benchmarks/redis.py --workers 2 --fetch-batch 8  # worker options go to the adapter

Keys: REDIS_URL (default DB 0) under the prefix `fcbench:<tag>:` and RQ queue `fcbench-<tag>-rq`,
deleted afterwards. The TS peer uses DB 15, the RQ peer DB 14 (each FLUSHes its own DB).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Mapping, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# this file is benchmarks/redis.py: with its directory on sys.path, `import redis` would import it
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, ROOT)

from benchmarks import _common as C  # noqa: E402
from benchmarks import limits as L  # noqa: E402

BACKENDS = ("redis", "rq")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", help="redis, rq, redis,rq or auto (redis, and rq when available)")
    C.add_common_args(p)
    p.add_argument("--rq-worker-class", default="flowcraft_redis.rq_worker.FlowcraftWorker",
                   help="worker class of the `rq worker` processes of the rq backend (the recommended FlowcraftWorker; rq.worker.SimpleWorker to compare)")
    p.add_argument("--no-rq-peer", action="store_true", help="skip the (slow) Python RQ peer")
    args = p.parse_args(argv)
    C.check_common_args(p, args)
    args.backends = chosen_backends(p, args.backend)
    return args


def chosen_backends(p: argparse.ArgumentParser, spec: str) -> List[str]:
    """The backends to measure; `rq` only when `flowcraft_redis.RqAdapter` exists (auto: if it does)."""
    available, why = C.rq_available()
    if spec == "auto":
        return ["redis", "rq"] if available else ["redis"]
    backends = [b for b in spec.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        p.error(f"--backend: unknown {unknown}; expected redis, rq, redis,rq or auto")
    if "rq" in backends and not available:
        p.error(f"--backend rq is not available: {why}")
    return backends


def redis_url() -> str:
    return os.environ.get("REDIS_URL") or C.DEFAULT_REDIS_URL


def backend_conf(args: argparse.Namespace, backend: str, tag: str) -> Dict[str, Any]:
    return {"backend": backend, "tag": tag, "redis_url": redis_url(), "prefix": f"fcbench:{tag}:",
            "queue": f"fcbench-{tag}-{backend}", "chain": args.chain, "fan": args.fan,
            "worker_options": C.worker_options(args), "rq_worker_class": args.rq_worker_class}


def cleanup(conf: Mapping[str, Any]) -> None:
    """Delete this backend's keys (by prefix; for RQ also its queue, jobs and worker records)."""
    import redis

    client = redis.Redis.from_url(conf["redis_url"])
    try:
        C.delete_redis_prefix(client, conf["prefix"])
        if conf["backend"] == "rq":
            C.delete_rq_queue(client, conf["queue"], f"fcbench-{conf['tag']}-")
    finally:
        client.close()


# =================================================================================================
# peers
# =================================================================================================


def ts_lines(peer: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The TS peer's one-round result, per shape, in our field names."""
    out = {}
    for theirs, ours in (("a_chain", "a_chain"), ("a_chain_serial", "a_serial"), ("b_fan", "b_fan")):
        shape = (peer.get("shapes") or {}).get(theirs)
        if not shape:
            continue
        first = (shape.get("rounds") or [{}])[0]
        out[ours] = {"nodes_per_s": shape.get("nodes_per_s"), "run_latency_ms_median": shape.get("run_latency_ms_median"),
                     "host_cpu": first.get("host_cpu"),
                     "worker_concurrency": (peer.get("settings") or {}).get("worker_concurrency")}
        if ours == "a_serial":
            out[ours]["ms_per_run"] = shape.get("run_latency_ms_median")
    return out


def rq_peer_lines(peer: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The RQ peer's variants: label -> its figures."""
    out = {}
    for variant in peer.get("variants") or []:
        label = "rq SimpleWorker" if str(variant.get("worker_class", "")).endswith("SimpleWorker") else "rq Worker (fork)"
        out[label] = {k: variant.get(k) for k in ("worker_class", "chain_jobs_per_s", "chain_latency_median_ms",
                                                   "fan_jobs_per_s", "fan_run_median_ms")}
    return out


def measure_ts(ts_dir: str, args: argparse.Namespace, out: C.Output, round_: int) -> None:
    try:
        peer = C.run_ts_bullmq(ts_dir, min(args.warmup, 3.0), args.serial_runs)
    except Exception as exc:  # a peer's failure is reported, it is not ours
        out.note(f"TS peer failed: {exc}")
        out.emit("peer_error", peer="ts-bullmq", round=round_, error=str(exc)[:1000])
        return
    for shape, line in ts_lines(peer).items():
        out.emit("peer", peer="ts-bullmq", shape=shape, round=round_, versions=peer.get("versions"), **line)
        other = (line["host_cpu"] or {}).get("other_cores")
        out.note(f"round {round_} TS BullMQ {shape:<8} {line['nodes_per_s'] or 0:>9,.0f} nodes/s  "
                 f"median run {line['run_latency_ms_median'] or 0:,.1f} ms  other_cores {other}")


def measure_rq_peer(py_dir: str, out: C.Output, round_: int) -> None:
    try:
        peer = C.run_py_peer(py_dir, ["rq_bench.py"])
    except Exception as exc:
        out.note(f"RQ peer failed: {exc}")
        out.emit("peer_error", peer="rq", round=round_, error=str(exc)[:1000])
        return
    for label, line in rq_peer_lines(peer).items():
        out.emit("peer", peer=label, round=round_, rq_version=peer.get("rq_version"), **line)
        out.note(f"round {round_} {label}: sequential chains {line['chain_jobs_per_s']} jobs/s "
                 f"({line['chain_latency_median_ms']} ms/chain), sequential fans {line['fan_jobs_per_s']} jobs/s")


# =================================================================================================
# the summary table
# =================================================================================================


def summary_rows(lines: List[Mapping[str, Any]], backends: List[str], args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Medians over rounds: ours per backend and shape, against each peer's figure for that shape,
    with the median `other_cores` (the rest of the machine's load) of both sides."""
    comparable = C.same_shape_as_peers(args)
    rows: List[Dict[str, Any]] = []

    def median_of(kind: str, key: str, **match: Any) -> Optional[float]:
        return C.median(C.value_at(l, key) for l in lines
                        if l["kind"] == kind and all(l.get(k) == v for k, v in match.items()))

    def row(label: str, metric: str, backend: str, shape: str, key: str, peer: Optional[str] = None,
            theirs: Optional[float] = None, higher: bool = True) -> None:
        if theirs is None:  # that peer was not run: one row of ours only
            if any(r["shape"] == label and r["metric"] == metric for r in rows):
                return
            peer = None
        ours = median_of("ours", key, backend=backend, shape=shape)
        noise = [median_of("ours", "host_cpu.other_cores", backend=backend, shape=shape),
                 median_of("peer", "host_cpu.other_cores", peer="ts-bullmq", shape=shape) if peer == "TS BullMQ" else None]
        rows.append({"shape": label, "metric": metric, "ours": ours, "peer": peer, "peer_value": theirs,
                     "ratio": C.ratio(ours, theirs, higher) if comparable else None, "other_cores": noise})

    ts = lambda shape, key: median_of("peer", key, peer="ts-bullmq", shape=shape)  # noqa: E731
    rq_labels = sorted({l["peer"] for l in lines if l["kind"] == "peer" and l["peer"].startswith("rq ")})
    for b in backends:
        a = f"{b}: a_chain {args.runs}x{args.chain} concurrent"
        row(a, "nodes/s", b, "a_chain", "nodes_per_s", "TS BullMQ", ts("a_chain", "nodes_per_s"))
        row(a, "run latency median ms", b, "a_chain", "run_latency_ms.median", "TS BullMQ",
            ts("a_chain", "run_latency_ms_median"), higher=False)
        if args.serial_runs:
            s = f"{b}: a_serial {args.chain}-node chain, 1 at a time"
            row(s, "ms/run", b, "a_serial", "ms_per_run", "TS BullMQ", ts("a_serial", "ms_per_run"), higher=False)
            for label in rq_labels:  # RQ's chains run one at a time too
                row(s, "ms/run", b, "a_serial", "ms_per_run", f"{label}, seq. chains",
                    median_of("peer", "chain_latency_median_ms", peer=label), higher=False)
        f = f"{b}: b_fan {args.fan_runs}x(1->{args.fan}->1) concurrent"
        row(f, "nodes/s", b, "b_fan", "nodes_per_s", "TS BullMQ", ts("b_fan", "nodes_per_s"))
        for label in rq_labels:  # RQ's fans run one at a time
            row(f, "nodes/s", b, "b_fan", "nodes_per_s", f"{label}, seq. fans", median_of("peer", "fan_jobs_per_s", peer=label))
    for key in ("redis_ping_per_s", "redis_pipelined_incr_per_s_batch100", "handoff_2proc_per_s",
                "handoff_1proc_sequential_per_s"):
        value = median_of("limits", key)
        if value is not None:
            rows.append({"shape": "limit, from this process", "metric": key, "ours": value})
    return rows


def target(rows: List[Mapping[str, Any]], lines: List[Mapping[str, Any]]) -> Dict[str, Any]:
    """The goal: redis a_chain nodes/s >= 2x TS BullMQ's; with the ratio of each round's interleaved pair."""
    ratio = next((r["ratio"] for r in rows if r["shape"].startswith("redis: a_chain") and r["metric"] == "nodes/s"
                  and r.get("peer") == "TS BullMQ"), None)
    per_round = {}
    if ratio is not None:
        ours = {l["round"]: l["nodes_per_s"] for l in lines if l["kind"] == "ours" and l["backend"] == "redis"
                and l["shape"] == "a_chain"}
        theirs = {l["round"]: l["nodes_per_s"] for l in lines if l["kind"] == "peer" and l["peer"] == "ts-bullmq"
                  and l["shape"] == "a_chain"}
        per_round = {r: C.ratio(ours[r], theirs[r]) for r in sorted(ours) if r in theirs}
    return {"what": "redis a_chain nodes/s >= 2x TS BullMQ a_chain", "ratio": ratio,
            "ratio_per_round": list(per_round.values()), "met": None if ratio is None else ratio >= 2.0}


# =================================================================================================
# main
# =================================================================================================


def run(args: argparse.Namespace, out: C.Output) -> int:
    backends = args.backends
    tag = C.new_tag()
    out.emit("setup", tag=tag, backends=backends, workers=args.workers, worker_options=C.worker_options(args),
             redis_prefix=f"fcbench:{tag}:")
    out.note(f"backends {backends}, tag {tag}, workers {args.workers}, worker options {C.worker_options(args)}")
    ts_dir = py_dir = None
    if not args.no_peer:
        ts_dir, why = C.ensure_ts_peer()
        if ts_dir is None:
            out.note(f"TS peer skipped: {why}")
        if not args.no_rq_peer:
            py_dir, why = C.ensure_py_peer()
            if py_dir is None:
                out.note(f"RQ peer skipped: {why}")
    under_test: Dict[str, C.Backend] = {}
    failed = False
    try:
        for b in backends:
            under_test[b] = C.Backend(backend_conf(args, b, tag), args, cleanup)
        for b, backend in under_test.items():
            out.note(f"{b}: warm-up done ({C.warm_up(backend.client, args)} node executions)")
        for round_ in range(args.rounds):
            if not args.no_limits:
                out.emit("limits", round=round_, seconds_per_measure=args.seconds,
                         **L.measure(("redis", "handoff"), args.seconds, tag, redis_url()))
            C.measure_ours(under_test, args, out, round_)
            if ts_dir:
                measure_ts(ts_dir, args, out, round_)
            if py_dir and round_ == 0:
                measure_rq_peer(py_dir, out, round_)
    except (C.CheckFailed, L.CheckFailed) as exc:
        failed = True
        out.emit("check_failed", error=str(exc))
        out.note(f"CHECK FAILED: {exc}")
    finally:
        for b, backend in under_test.items():
            out.emit("workers", backend=b, **backend.close())
    rows = summary_rows(out.lines, backends, args)
    goal = target(rows, out.lines)
    out.emit("summary", ok=not failed, backends=backends, rounds=args.rounds, workers=args.workers,
             worker_options=C.worker_options(args), rows=rows, target=goal)
    out.note("\n" + C.table(rows))
    if goal["ratio"] is not None:
        rounds = ", ".join(f"{r:.2f}x" for r in goal["ratio_per_round"] if r is not None)
        out.note(f"\ntarget: redis a_chain nodes/s >= 2.00x TS BullMQ: {goal['ratio']:.2f}x (ratio of medians; "
                 f"per round: {rounds}): {'met' if goal['met'] else 'NOT met'}. A shared, noisy machine: "
                 "see the other cores column, loadavg and host_cpu in the JSON lines.")
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    return C.run_main("flowcraft-redis", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
