"""Raw round-trip limits of the services, from one Python process (redis-py, pika, psycopg2).

The methods are those of the Python peer (../shared/peers/py/limits.py), so the figures compare,
but on this run's own key prefix, queue and table (the peer FLUSHes Redis DB 14):

  redis       redis_ping_per_s                      PING, sequential, one connection
              redis_pipelined_incr_per_s_batch100   INCR in pipelines of 100 (transaction=False), checked
  handoff     handoff_2proc_per_s                   a producer process LPUSHes N messages; this process
                                                    takes each with BLMOVE src->processing and acks it
                                                    with LREM (RedisAdapter's reliable-queue pattern)
              handoff_1proc_sequential_per_s        LPUSH; BLMOVE; LREM in turn (latency-bound)
  amqp        amqp_publish_confirmed_persistent_per_s   publisher confirms, delivery_mode=2, durable queue
              amqp_consume_manual_ack_prefetch100_per_s the same messages, basic_qos(100), basic_ack each
  pg          pg_update_autocommit_per_s            UPDATE t SET data = data || %s::jsonb WHERE id = %s
              pg_update_tx10_stmts_per_s            the same, COMMIT every 10 statements

Used by redis.py and rabbitmq.py; on its own it prints one JSON line:

    python benchmarks/limits.py --only redis,handoff,amqp,pg --seconds 1
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import uuid
from typing import Any, Callable, Dict, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# benchmarks/redis.py would shadow the redis package if this directory stayed on sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_POSTGRES_URL = "postgresql://root@127.0.0.1:5432/test"
KINDS = ("redis", "handoff", "amqp", "pg")


class CheckFailed(Exception):
    """A correctness check of a measurement failed (the figure would be meaningless)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def timed_loop(fn: Callable[[int], None], seconds: float) -> Tuple[int, float]:
    """Call fn(i) until `seconds` have elapsed (at least 16 calls); return (calls, elapsed)."""
    i = 0
    started = time.perf_counter()
    end = started + seconds
    while True:
        fn(i)
        i += 1
        if (i & 15) == 0 and time.perf_counter() >= end:
            break
    return i, time.perf_counter() - started


def redis_limits(url: str, prefix: str, seconds: float) -> Dict[str, Any]:
    """Sequential PING/s and pipelined INCR/s (batch 100) on one connection."""
    import redis

    client = redis.Redis.from_url(url)
    key = f"{prefix}limits:ctr"
    try:
        client.ping()
        n, dt = timed_loop(lambda i: client.ping(), seconds)
        out = {"redis_ping_per_s": round(n / dt)}
        client.delete(key)
        pipe = client.pipeline(transaction=False)

        def batch(i: int) -> None:
            for _ in range(100):
                pipe.incr(key)
            pipe.execute()

        n, dt = timed_loop(batch, seconds / 2)
        check(int(client.get(key)) == n * 100, "pipelined INCR count mismatch")
        out["redis_pipelined_incr_per_s_batch100"] = round(n * 100 / dt)
        return out
    finally:
        client.delete(key)
        client.close()


def _producer(url: str, src: str, n: int, go: Any) -> None:
    import redis

    client = redis.Redis.from_url(url)
    go.wait()
    for i in range(n):
        client.lpush(src, i)
    client.close()


def handoff_limits(url: str, prefix: str, seconds: float) -> Dict[str, Any]:
    """The reliable-list hand-off (BLMOVE to a processing list, LREM to ack), two ways."""
    import redis

    src, proc = f"{prefix}limits:src", f"{prefix}limits:proc"
    client = redis.Redis.from_url(url)
    client.delete(src, proc)
    n = max(200, int(5000 * seconds))  # the peer: 10,000 messages, about 2 s here
    ctx = mp.get_context("fork")
    go = ctx.Event()
    producer = ctx.Process(target=_producer, args=(url, src, n, go), daemon=True)
    producer.start()
    try:
        got = total = 0
        go.set()
        started = time.perf_counter()
        while got < n:
            body = client.blmove(src, proc, 5, "RIGHT", "LEFT")
            check(body is not None, f"BLMOVE timed out after {got} messages")
            total += int(body)
            check(client.lrem(proc, 1, body) == 1, "LREM ack failed")
            got += 1
        dt = time.perf_counter() - started
        check(total == n * (n - 1) // 2, "hand-off checksum mismatch")
        out = {"handoff_2proc_msgs": n, "handoff_2proc_per_s": round(n / dt)}

        def one(i: int) -> None:
            client.lpush(src, i)
            body = client.blmove(src, proc, 5, "RIGHT", "LEFT")
            check(body is not None and int(body) == i, f"sequential hand-off got {body!r}, expected {i}")
            check(client.lrem(proc, 1, body) == 1, "LREM ack failed")

        n2, dt = timed_loop(one, seconds)
        check(client.llen(src) == 0 and client.llen(proc) == 0, "lists not empty after the hand-off")
        out["handoff_1proc_sequential_per_s"] = round(n2 / dt)
        return out
    finally:
        producer.join(10)
        if producer.is_alive():
            producer.kill()
        client.delete(src, proc)
        client.close()


def amqp_limits(url: str, queue: str, seconds: float) -> Dict[str, Any]:
    """Confirmed persistent publish/s, then consume + manual ack/s of the same messages (prefetch 100)."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    try:
        ch.queue_declare(queue, durable=True)
        ch.queue_purge(queue)
        ch.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        n, dt = timed_loop(lambda i: ch.basic_publish("", queue, str(i).encode(), props, mandatory=True), seconds)
        out = {"amqp_publish_confirmed_persistent_per_s": round(n / dt), "amqp_published": n}
        declared = ch.queue_declare(queue, durable=True, passive=True)
        check(declared.method.message_count == n, f"queue holds {declared.method.message_count}, published {n}")
        ch.basic_qos(prefetch_count=100)
        got = {"n": 0, "sum": 0}

        def on_message(channel: Any, method: Any, properties: Any, body: bytes) -> None:
            got["n"] += 1
            got["sum"] += int(body)
            channel.basic_ack(method.delivery_tag)
            if got["n"] == n:
                channel.stop_consuming()

        started = time.perf_counter()
        ch.basic_consume(queue, on_message, auto_ack=False)
        ch.start_consuming()
        dt = time.perf_counter() - started
        check(got == {"n": n, "sum": n * (n - 1) // 2}, f"consumed {got} of {n}")
        out["amqp_consume_manual_ack_prefetch100_per_s"] = round(n / dt)
        return out
    finally:
        if ch.is_open:
            ch.queue_delete(queue)
        conn.close()


def pg_limits(dsn: str, table: str, seconds: float) -> Dict[str, Any]:
    """Single-row JSONB-merge UPDATE/s, autocommit and with a COMMIT every 10 statements."""
    import psycopg2
    from psycopg2 import sql

    rows = 1000
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    name = sql.Identifier(table)
    try:
        cur.execute("SHOW synchronous_commit")
        out: Dict[str, Any] = {"pg_synchronous_commit": cur.fetchone()[0]}
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))
        cur.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, data jsonb NOT NULL)").format(name))
        cur.execute(sql.SQL("INSERT INTO {} SELECT g, '{{}}'::jsonb FROM generate_series(1, %s) g").format(name), (rows,))
        update = sql.SQL("UPDATE {} SET data = data || %s::jsonb WHERE id = %s").format(name)
        expected: Dict[int, int] = {}

        def upd(i: int) -> None:
            row = i % rows + 1
            cur.execute(update, (json.dumps({"v": i}), row))
            check(cur.rowcount == 1, f"UPDATE touched {cur.rowcount} rows")
            expected[row] = i

        def verify() -> None:
            cur.execute(sql.SQL("SELECT id, (data->>'v')::int FROM {} WHERE data ? 'v'").format(name))
            check(dict(cur.fetchall()) == expected, "jsonb contents differ from the updates sent")

        n, dt = timed_loop(upd, seconds)
        verify()
        out["pg_update_autocommit_per_s"] = round(n / dt)
        cur.execute(sql.SQL("UPDATE {} SET data = '{{}}'::jsonb").format(name))
        expected.clear()
        conn.autocommit = False

        def upd10(i: int) -> None:
            for k in range(10):
                upd(i * 10 + k)
            conn.commit()

        n, dt = timed_loop(upd10, seconds)
        verify()
        conn.commit()
        out["pg_update_tx10_stmts_per_s"] = round(n * 10 / dt)
        return out
    finally:
        conn.rollback()
        conn.autocommit = True
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))
        conn.close()


def measure(kinds: Any, seconds: float, tag: str, redis_url: str = "", amqp_url: str = "",
            postgres_dsn: str = "") -> Dict[str, Any]:
    """Measure the named kinds (a subset of KINDS); `tag` names this run's keys, queue and table."""
    out: Dict[str, Any] = {}
    for kind in kinds:
        if kind == "redis":
            out.update(redis_limits(redis_url or DEFAULT_REDIS_URL, f"fcbench:{tag}:", seconds))
        elif kind == "handoff":
            out.update(handoff_limits(redis_url or DEFAULT_REDIS_URL, f"fcbench:{tag}:", seconds))
        elif kind == "amqp":
            out.update(amqp_limits(amqp_url or DEFAULT_RABBITMQ_URL, f"fcbench-{tag}-limits", seconds))
        elif kind == "pg":
            out.update(pg_limits(postgres_dsn or DEFAULT_POSTGRES_URL, f"fcbench_{tag}_limits", seconds))
        else:
            raise ValueError(f"unknown limit kind {kind!r}; expected some of {KINDS}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    parser.add_argument("--seconds", type=float, default=1.0, help="duration of each measurement (default 1)")
    args = parser.parse_args()
    kinds = [k for k in args.only.split(",") if k]
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        parser.error(f"unknown kind(s) {bad}; expected some of {list(KINDS)}")
    load_start = os.getloadavg()[0]
    line: Dict[str, Any] = {"bench": "flowcraft-limits", "seconds_per_measure": args.seconds}
    code = 0
    try:
        line.update(measure(kinds, args.seconds, uuid.uuid4().hex[:8], os.environ.get("REDIS_URL", ""),
                            os.environ.get("RABBITMQ_URL", ""), os.environ.get("POSTGRES_URL", "")))
        line["ok"] = True
    except CheckFailed as exc:
        line.update(ok=False, check_failed=str(exc))
        code = 1
    line.update(loadavg_1m_start=round(load_start, 2), loadavg_1m_end=round(os.getloadavg()[0], 2))
    print(json.dumps(line))
    return code


if __name__ == "__main__":
    sys.exit(main())
