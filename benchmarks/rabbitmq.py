"""Distributed throughput on RabbitMqAdapter (RabbitMQ jobs, PostgreSQL state, Redis coordination).

Shapes (those of redis.py and ../shared/peers/ts/bullmq.mjs), every run checked inside the timed loop:
  a_chain   RUNS runs of a CHAIN-node chain started at once  -> node executions/s, median run latency
  a_serial  SERIAL_RUNS runs of that chain one after another -> ms per run (unloaded latency)
  b_fan     FAN_RUNS runs of 1 -> FAN -> 1 started at once   -> node executions/s (join sum checked)

The worker runs in separate processes (`--workers N`), the client in this process. After a
warm-up, each of `--rounds` rounds measures the raw limits from this process (AMQP confirmed
persistent publish/s, consume + manual ack/s with prefetch 100, PostgreSQL single-row JSONB UPDATE/s
in autocommit and with a COMMIT every 10, Redis PING/s), then our shapes. With `--peer`, Celery on
RabbitMQ (../shared/peers/py/celery_bench.py, variants amqp+prefork/2 and amqp+solo/1: sequential
chains of 20 tasks and chords of 100) runs once after the first round; its venv
(benchmarks/.peers/py/.venv) is created from the peer's requirements.txt on first use.

Output: one JSON line per measurement on stdout, a summary JSON line, and (on stderr, unless
`--json`) progress and a table of medians. Exit 1 if any run of ours ended wrong. The machine is
shared: read `host_cpu.other_cores` and the load averages. Target: a_chain >= 1,000 nodes/s.

    python benchmarks/rabbitmq.py
    python benchmarks/rabbitmq.py --peer --workers 2 --prefetch 50 --fetch-batch 10

Services: RABBITMQ_URL, POSTGRES_URL, REDIS_URL (defaults: the local ones). This run's tables
`fcbench_<tag>_*`, queue `fcbench-<tag>-jobs` (+ .dead, .delay) and Redis keys `fcbench:<tag>:*`
are dropped/deleted afterwards. Celery uses Redis DB 14 (FLUSHed) and the queue `bench-celery`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Mapping, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# benchmarks/redis.py would shadow the redis package if this directory stayed on sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, ROOT)

from benchmarks import _common as C  # noqa: E402
from benchmarks import limits as L  # noqa: E402

TARGET_CHAIN_NODES_PER_S = 1000.0
CELERY_VARIANTS = (("amqp", "prefork", 2), ("amqp", "solo", 1))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    p.add_argument("--peer", action="store_true", help="also run the Celery-on-RabbitMQ peer (--no-peer wins)")
    args = p.parse_args(argv)
    C.check_common_args(p, args)
    return args


def urls() -> Dict[str, str]:
    return {"redis_url": os.environ.get("REDIS_URL") or C.DEFAULT_REDIS_URL,
            "amqp_url": os.environ.get("RABBITMQ_URL") or C.DEFAULT_RABBITMQ_URL,
            "postgres_dsn": os.environ.get("POSTGRES_URL") or C.DEFAULT_POSTGRES_URL}


def backend_conf(args: argparse.Namespace, tag: str) -> Dict[str, Any]:
    return {"backend": "rabbitmq", "tag": tag, **urls(), "prefix": f"fcbench:{tag}:", "queue": f"fcbench-{tag}-jobs",
            "context_table": f"fcbench_{tag}_contexts", "status_table": f"fcbench_{tag}_statuses",
            "table_prefix": f"fcbench_{tag}_", "chain": args.chain, "fan": args.fan,
            "worker_options": C.worker_options(args)}


def create_schema(conf: Mapping[str, Any]) -> None:
    """The adapter's tables, before any worker starts (ensure_schema is idempotent)."""
    import psycopg2
    from flowcraft_rabbitmq import ensure_schema

    conn = psycopg2.connect(conf["postgres_dsn"])
    try:
        ensure_schema(conn, context_table_name=conf["context_table"], status_table_name=conf["status_table"])
    finally:
        conn.close()


def cleanup(conf: Mapping[str, Any]) -> None:
    """Drop this run's tables, delete its queues and its Redis keys."""
    try:
        drop_tables(conf["postgres_dsn"], conf["table_prefix"])
    finally:
        try:
            delete_queues(conf["amqp_url"], [conf["queue"], f"{conf['queue']}.dead", f"{conf['queue']}.delay"])
        finally:
            import redis

            client = redis.Redis.from_url(conf["redis_url"])
            try:
                C.delete_redis_prefix(client, conf["prefix"])
            finally:
                client.close()


def drop_tables(dsn: str, prefix: str) -> List[str]:
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT schemaname, tablename FROM pg_catalog.pg_tables"
                        " WHERE substr(tablename, 1, length(%(p)s)) = %(p)s", {"p": prefix})
            tables = cur.fetchall()
            for schema, table in tables:
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {}.{} CASCADE").format(sql.Identifier(schema), sql.Identifier(table)))
        return [t for _, t in tables]
    finally:
        conn.close()


def delete_queues(amqp_url: str, names: List[str]) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for name in names:
            channel = conn.channel()
            try:
                channel.queue_delete(queue=name)  # a missing queue is not an error on RabbitMQ 3.x
                channel.close()
            except pika.exceptions.ChannelClosedByBroker:
                pass
    finally:
        conn.close()


# =================================================================================================
# the Celery peer
# =================================================================================================


def measure_celery(py_dir: str, out: C.Output, round_: int) -> None:
    for broker, pool, concurrency in CELERY_VARIANTS:
        label = f"celery {broker} {pool}/{concurrency}"
        try:
            line = C.run_py_peer(py_dir, ["celery_bench.py", "--variant", broker, pool, str(concurrency)], timeout_s=300)
        except Exception as exc:  # a peer's failure is reported, it is not ours
            out.note(f"{label} failed: {exc}")
            out.emit("peer_error", peer=label, round=round_, error=str(exc)[:1000])
            continue
        fields = {k: line.get(k) for k in ("chain_tasks_per_s", "chain_latency_median_ms", "chord_tasks_per_s",
                                           "chord_run_median_ms", "prefetch_multiplier", "acks_late")}
        out.emit("peer", peer=label, round=round_, **fields)
        out.note(f"round {round_} {label}: sequential chains {fields['chain_tasks_per_s']} tasks/s "
                 f"({fields['chain_latency_median_ms']} ms/chain), sequential chords {fields['chord_tasks_per_s']} tasks/s")


# =================================================================================================
# the summary table
# =================================================================================================


def summary_rows(lines: List[Mapping[str, Any]], args: argparse.Namespace) -> List[Dict[str, Any]]:
    comparable = C.same_shape_as_peers(args)
    rows: List[Dict[str, Any]] = []

    def median_of(kind: str, key: str, **match: Any) -> Optional[float]:
        return C.median(C.value_at(l, key) for l in lines
                        if l["kind"] == kind and all(l.get(k) == v for k, v in match.items()))

    ours = lambda shape, key: median_of("ours", key, shape=shape)  # noqa: E731
    labels = sorted({l["peer"] for l in lines if l["kind"] == "peer"})

    def row(shape: str, metric: str, value: Optional[float], peer: Optional[str] = None,
            theirs: Optional[float] = None, higher: bool = True) -> None:
        ours_shape = shape.split(": ", 1)[1].split(" ", 1)[0]  # "rabbitmq: a_chain 20x20 ..." -> a_chain
        rows.append({"shape": shape, "metric": metric, "ours": value, "peer": peer, "peer_value": theirs,
                     "ratio": C.ratio(value, theirs, higher) if comparable and theirs is not None else None,
                     "other_cores": [median_of("ours", "host_cpu.other_cores", shape=ours_shape), None]})

    a = f"rabbitmq: a_chain {args.runs}x{args.chain} concurrent"
    if comparable:
        row(a, "nodes/s", ours("a_chain", "nodes_per_s"), "target", TARGET_CHAIN_NODES_PER_S)
    else:
        row(a, "nodes/s", ours("a_chain", "nodes_per_s"))
    row(a, "run latency median ms", ours("a_chain", "run_latency_ms.median"))
    if args.serial_runs:
        s = f"rabbitmq: a_serial {args.chain}-node chain, 1 at a time"
        if not labels:
            row(s, "ms/run", ours("a_serial", "ms_per_run"))
        for label in labels:  # Celery's chains run one at a time too
            row(s, "ms/run", ours("a_serial", "ms_per_run"), f"{label}, seq. chains",
                median_of("peer", "chain_latency_median_ms", peer=label), higher=False)
    f = f"rabbitmq: b_fan {args.fan_runs}x(1->{args.fan}->1) concurrent"
    if not labels:
        row(f, "nodes/s", ours("b_fan", "nodes_per_s"))
    for label in labels:  # Celery's chords run one at a time
        row(f, "nodes/s", ours("b_fan", "nodes_per_s"), f"{label}, seq. chords",
            median_of("peer", "chord_tasks_per_s", peer=label))
    for key in ("amqp_publish_confirmed_persistent_per_s", "amqp_consume_manual_ack_prefetch100_per_s",
                "pg_update_autocommit_per_s", "pg_update_tx10_stmts_per_s", "redis_ping_per_s"):
        value = median_of("limits", key)
        if value is not None:
            rows.append({"shape": "limit, from this process", "metric": key, "ours": value})
    return rows


def target(lines: List[Mapping[str, Any]], args: argparse.Namespace) -> Dict[str, Any]:
    """The target applies to the 20x20 chain shape only."""
    value = C.median(l["nodes_per_s"] for l in lines if l["kind"] == "ours" and l["shape"] == "a_chain")
    if not C.same_shape_as_peers(args):
        value = None
    return {"what": f"rabbitmq a_chain 20x20 nodes/s >= {TARGET_CHAIN_NODES_PER_S:,.0f}", "value": value,
            "met": None if value is None else value >= TARGET_CHAIN_NODES_PER_S}


# =================================================================================================
# main
# =================================================================================================


def run(args: argparse.Namespace, out: C.Output) -> int:
    tag = C.new_tag()
    conf = backend_conf(args, tag)
    out.emit("setup", tag=tag, workers=args.workers, worker_options=conf["worker_options"], queue=conf["queue"],
             table_prefix=conf["table_prefix"], redis_prefix=conf["prefix"])
    out.note(f"tag {tag}, workers {args.workers}, worker options {conf['worker_options']}")
    py_dir = None
    if args.peer and not args.no_peer:
        py_dir, why = C.ensure_py_peer()
        if py_dir is None:
            out.note(f"Celery peer skipped: {why}")
    backend: Optional[C.Backend] = None
    failed = False
    try:
        create_schema(conf)
        backend = C.Backend(conf, args, cleanup)
        out.note(f"rabbitmq: warm-up done ({C.warm_up(backend.client, args)} node executions)")
        for round_ in range(args.rounds):
            if not args.no_limits:
                out.emit("limits", round=round_, seconds_per_measure=args.seconds,
                         **L.measure(("amqp", "pg", "redis"), args.seconds, tag, **urls()))
            C.measure_ours({"rabbitmq": backend}, args, out, round_)
            if py_dir and round_ == 0:
                measure_celery(py_dir, out, round_)
    except (C.CheckFailed, L.CheckFailed) as exc:
        failed = True
        out.emit("check_failed", error=str(exc))
        out.note(f"CHECK FAILED: {exc}")
    finally:
        if backend is not None:
            out.emit("workers", backend="rabbitmq", **backend.close())
        else:
            cleanup(conf)
    rows = summary_rows(out.lines, args)
    goal = target(out.lines, args)
    out.emit("summary", ok=not failed, rounds=args.rounds, workers=args.workers, worker_options=conf["worker_options"],
             rows=rows, target=goal)
    out.note("\n" + C.table(rows))
    if goal["value"] is not None:
        out.note(f"\ntarget: rabbitmq a_chain >= {TARGET_CHAIN_NODES_PER_S:,.0f} nodes/s: {goal['value']:,.0f} "
                 f"({'met' if goal['met'] else 'NOT met'}; shared noisy machine: see loadavg and host_cpu.other_cores)")
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    return C.run_main("flowcraft-rabbitmq", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
