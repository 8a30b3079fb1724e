"""Forged batch items and the per-item cost of a batch on a real Redis (issue 11, items 7 and 10),
batch items a row per field on PostgreSQL, and a finished run's context stored once (item 9).

The hostile cases run in a child process with a memory cap and a timeout (`run_bounded`); the child
uses this test's key prefix (deleted afterwards) and its own queue, and prints one JSON line of what
it saw.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Any, Dict

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bounded import run_bounded  # noqa: E402

pytestmark = pytest.mark.integration

PRELUDE = '''
import json
import redis
from flowcraft import FlowRuntime, create_flow
from flowcraft_redis import RedisAdapter

URL, PREFIX, QUEUE = {url!r}, {prefix!r}, {queue!r}
EVIL = []

def evil(ctx):
    EVIL.append(ctx.input)
    return "FORGED"

class Counting(redis.Redis):
    """Counts the commands sent and the bytes of their replies."""
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.commands = 0
        self.reply_bytes = 0
    def execute_command(self, *args, **options):
        reply = super().execute_command(*args, **options)
        self.commands += 1
        self.reply_bytes += size(reply)
        return reply

def size(x):
    if isinstance(x, (bytes, str)):
        return len(x)
    if isinstance(x, (list, tuple)):
        return sum(size(v) for v in x)
    return 8

def report(**values):
    print("RESULT " + json.dumps(values))
'''


def bounded(code: str, url: str, prefix: str, timeout: float = 120, memory_mb: int = 1024) -> Dict[str, Any]:
    prelude = PRELUDE.format(url=url, prefix=prefix, queue=f"fcq-{uuid.uuid4().hex[:8]}")
    result = run_bounded(prelude + code, timeout=timeout, memory_mb=memory_mb)
    assert result.ok, result.describe()
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.describe()
    return json.loads(lines[-1][len("RESULT "):])


def test_forged_item_jobs_in_the_redis_list_run_nothing_of_the_attackers(redis_url: str, redis_prefix: str) -> None:
    seen = bounded('''
flow = (create_flow("items").node("make", lambda ctx: [1, 2, 3])
        .batch("each", lambda ctx: ctx.input * 10, input_key="make", output_key="out").edge("make", "each"))
plain = create_flow("plain").node("p", lambda ctx: "fine")
rt = FlowRuntime()
rt.add_blueprint(flow)
rt.add_blueprint(plain)
rt.registry["evil"] = evil
client = redis.Redis.from_url(URL)
ad = RedisAdapter(rt, client, queue_name=QUEUE, prefix=PREFIX, fetch_batch=10)
run_id = ad.start_workflow("items")
others = [ad.start_workflow("plain") for _ in range(3)]
ad.work(max_jobs=1, burst=True)  # "make": the scatter's job is queued next
base = {"runId": run_id, "blueprintId": "items", "kind": "item", "parent": "each_scatter"}
for body in [dict(base, nodeId="each_scatter.0", index=0, uses="evil", input="FORGED"),
             dict(base, nodeId="each_scatter.1", index=1, input=99, params={"p": 1}),
             dict(base, nodeId="each_scatter.7", index=7, uses="evil"),
             dict(base, nodeId="x", index=2, uses="evil")]:
    client.lpush(ad.queue.keys.ready, json.dumps(body))  # straight into the list, as a queue writer would
ad.work(burst=True)
result = ad.wait_for_result(run_id, timeout=10)
report(status=result.status, out=result.context.get("out"), evil=EVIL,
       others=[ad.wait_for_result(r, timeout=10).status for r in others], pending=ad.queue.pending())
ad.close()
''', redis_url, redis_prefix)
    assert seen["evil"] == []
    assert seen["status"] == "completed" and seen["out"] == [10, 20, 30]
    assert seen["others"] == ["completed"] * 3
    assert seen["pending"] == 0


def test_item_jobs_of_a_20000_item_batch_read_only_their_own_item(redis_url: str, redis_prefix: str) -> None:
    """The bytes an item job reads from Redis do not grow with the batch: a sample of item jobs of
    a 20,000-item batch (whose input list is about 600 KB as JSON) read under 2 KB each."""
    seen = bounded('''
n = 20000
flow = (create_flow("many").node("make", lambda ctx: [{"k": i, "pad": "x" * 20} for i in range(n)])
        .batch("each", lambda ctx: ctx.input["k"] * 2, input_key="make", output_key="out").edge("make", "each"))
rt = FlowRuntime()
rt.add_blueprint(flow)
client = Counting.from_url(URL)
ad = RedisAdapter(rt, client, queue_name=QUEUE, prefix=PREFIX, fetch_batch=20)
run_id = ad.start_workflow("many")
ad.work(max_jobs=2, burst=True)  # make, then the scatter: 20,000 item jobs queued
list_bytes = len(client.hget(PREFIX + "workflow:state:" + run_id, "make"))
samples = []
for _ in range(3):
    before, commands = client.reply_bytes, client.commands
    done = ad.work(max_jobs=100)
    samples.append([(client.reply_bytes - before) / done, (client.commands - commands) / done])
status = ad.get_status(run_id).status
report(list_bytes=list_bytes, samples=samples, status=status, left=ad.queue.pending())
ad.close()
''', redis_url, redis_prefix, timeout=180)
    assert seen["list_bytes"] > 500_000
    assert seen["status"] == "running" and seen["left"] == 20000 - 300
    for per_item_bytes, per_item_commands in seen["samples"]:
        assert per_item_bytes < 2000, seen["samples"]
        assert per_item_commands <= 4, seen["samples"]


def test_postgres_stores_batch_items_a_row_per_field(amqp_url: str, postgres_dsn: str, redis_url: str, redis_prefix: str,
                                                      amqp_queue_name: str, pg_table_prefix: str, pg_conn: Any) -> None:
    """On PostgreSQL an item's commit writes its own row and its job reads its own rows: the run's
    item document (`<runs>.items`) is never read or rewritten whole per item."""
    import redis as redis_client
    from psycopg2 import sql

    from flowcraft import FlowRuntime, create_flow
    from flowcraft_rabbitmq import RabbitMqAdapter, RedisCoordinationStore

    n = 50
    flow = (create_flow("pgitems").node("make", lambda ctx: list(range(n)))
            .batch("each", lambda ctx: ctx.input * 3, input_key="make", output_key="out").edge("make", "each"))
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    coordination = RedisCoordinationStore(redis_client.Redis.from_url(redis_url), prefix=redis_prefix)
    adapter = RabbitMqAdapter(runtime, coordination, amqp_url, postgres_dsn, queue_name=amqp_queue_name, poll_timeout=0.2,
                              context_table_name=f"{pg_table_prefix}contexts", status_table_name=f"{pg_table_prefix}statuses")
    try:
        adapter.start()
        run_id = adapter.start_workflow("pgitems")
        result = adapter.wait_for_result(run_id, timeout=60)
    finally:
        adapter.close()
        coordination.client.close()
    assert result.status == "completed", result.errors
    assert result.context["out"] == [3 * i for i in range(n)]
    with pg_conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE run_id = %s").format(
            sql.Identifier(f"{pg_table_prefix}items")), (run_id,))
        rows = cur.fetchone()[0]
        cur.execute(sql.SQL("SELECT items FROM {} WHERE run_id = %s").format(
            sql.Identifier(f"{pg_table_prefix}runs")), (run_id,))
        document = cur.fetchone()[0]
    pg_conn.rollback()
    assert rows == 2 + 2 * n  # the header, the count of finished items, each item's input and result
    assert document == {}


def test_a_finished_runs_context_is_stored_once_on_redis(redis_client: Any, redis_prefix: str) -> None:
    """The context hash and the seed's status key hold a finished run's context; the record does not
    hold a third copy, and the result read back is still the whole one."""
    from flowcraft import FlowRuntime, create_flow
    from flowcraft_redis import RedisAdapter
    from flowcraft_redis.keys import RunKeys

    flow = create_flow("once").node("a", lambda ctx: ctx.context.set("big", "v" * 5000)).node("b", lambda ctx: 1).edge("a", "b")
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    adapter = RedisAdapter(runtime, redis_client, queue_name=f"fcq-{uuid.uuid4().hex[:8]}", prefix=redis_prefix)
    try:
        run_id = adapter.start_workflow("once")
        adapter.work(burst=True)
        result = adapter.wait_for_result(run_id, timeout=10)
        status = adapter.get_status(run_id)
    finally:
        adapter.close()
    keys = RunKeys(redis_prefix)
    assert result.status == "completed" and result.context["big"] == "v" * 5000
    assert status.result["context"]["big"] == "v" * 5000
    assert redis_client.hget(keys.record(run_id), "result") == b"null"
    assert json.loads(redis_client.get(keys.status(run_id)))["result"]["context"]["big"] == "v" * 5000
    stored = sum(len(v) for v in redis_client.hgetall(keys.record(run_id)).values())
    assert stored < 1000, stored


def test_a_finished_runs_context_is_stored_once_on_postgres(amqp_url: str, postgres_dsn: str, redis_url: str,
                                                            redis_prefix: str, amqp_queue_name: str,
                                                            pg_table_prefix: str, pg_conn: Any) -> None:
    import redis as redis_client
    from psycopg2 import sql

    from flowcraft import FlowRuntime, create_flow
    from flowcraft_rabbitmq import RabbitMqAdapter, RedisCoordinationStore

    flow = create_flow("once").node("a", lambda ctx: ctx.context.set("big", "v" * 5000)).node("b", lambda ctx: 1).edge("a", "b")
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    coordination = RedisCoordinationStore(redis_client.Redis.from_url(redis_url), prefix=redis_prefix)
    adapter = RabbitMqAdapter(runtime, coordination, amqp_url, postgres_dsn, queue_name=amqp_queue_name, poll_timeout=0.2,
                              context_table_name=f"{pg_table_prefix}contexts", status_table_name=f"{pg_table_prefix}statuses")
    try:
        adapter.start()
        run_id = adapter.start_workflow("once")
        result = adapter.wait_for_result(run_id, timeout=60)
        status = adapter.get_status(run_id)
    finally:
        adapter.close()
        coordination.client.close()
    assert result.status == "completed" and result.context["big"] == "v" * 5000
    assert status.result["context"]["big"] == "v" * 5000
    with pg_conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT record->'result' FROM {} WHERE run_id = %s").format(
            sql.Identifier(f"{pg_table_prefix}runs")), (run_id,))
        in_record = cur.fetchone()[0]
        cur.execute(sql.SQL("SELECT result->'context'->>'big' FROM {} WHERE run_id = %s").format(
            sql.Identifier(f"{pg_table_prefix}statuses")), (run_id,))
        in_status = cur.fetchone()[0]
    pg_conn.rollback()
    assert in_record is None and in_status == "v" * 5000


def test_nan_from_a_transform_fails_the_runs_on_rabbitmq_and_the_worker_goes_on(
        amqp_url: str, postgres_dsn: str, redis_url: str, redis_prefix: str, amqp_queue_name: str,
        pg_table_prefix: str) -> None:
    """Issue 11, item 5's NaN: three such runs queued used to crash the RabbitMQ/PostgreSQL worker."""
    code = f'''
import json, redis
from flowcraft import FlowRuntime, create_flow
from flowcraft_rabbitmq import RabbitMqAdapter, RedisCoordinationStore
bp = {{"id": "nan", "nodes": [{{"id": "a", "uses": "src"}}, {{"id": "b", "uses": "echo"}}],
      "edges": [{{"source": "a", "target": "b", "transform": "float('nan')"}}]}}
rt = FlowRuntime(registry={{"src": lambda ctx: 1, "echo": lambda ctx: ctx.input}}, blueprints=[bp])
rt.add_blueprint(create_flow("plain").node("p", lambda ctx: "fine"))
coordination = RedisCoordinationStore(redis.Redis.from_url({redis_url!r}), prefix={redis_prefix!r})
ad = RabbitMqAdapter(rt, coordination, {amqp_url!r}, {postgres_dsn!r}, queue_name={amqp_queue_name!r}, poll_timeout=0.2,
                     context_table_name={pg_table_prefix + "contexts"!r}, status_table_name={pg_table_prefix + "statuses"!r})
runs = [ad.start_workflow("nan") for _ in range(3)] + [ad.start_workflow("plain")]
ad.start()
results = [ad.wait_for_result(r, timeout=60) for r in runs]
alive = ad._thread is not None and ad._thread.is_alive()
ad.close()
print("RESULT " + json.dumps({{"statuses": [r.status for r in results], "alive": alive,
                               "errors": [[e.message for e in r.errors] for r in results]}}))
'''
    result = run_bounded(code, timeout=120, memory_mb=1024)
    assert result.ok, result.describe()
    seen = json.loads([line for line in result.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert seen["statuses"] == ["failed"] * 3 + ["completed"]
    assert all("NaN" in errors[0] for errors in seen["errors"][:3])
    assert seen["alive"]
