"""`flowcraft_rabbitmq` on the real services: RabbitMQ (jobs), PostgreSQL (state), Redis (coordination).

Every scenario's final context must equal the in-memory `flow.run` context (SPEC 5). Each test owns
its tables (`pg_table_prefix`), queues (`amqp_queue_name` + `.dead`/`.delay`) and Redis prefix; the
fixtures in tests/conftest.py remove them afterwards.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List

import pika
import psycopg2
import pytest
import redis
from psycopg2 import sql

from flowcraft import NodeContext, analyze_blueprint, create_flow
from flowcraft.ports import Job

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_distributed import SCENARIOS, Scenario, assert_same_result, make_runtime, run_in_memory  # noqa: E402

from flowcraft_rabbitmq import (  # noqa: E402
    REASON_HEADER, PostgresContext, PostgresRunStore, RabbitMqAdapter, RedisCoordinationStore,
    create_rabbitmq_reconciler, ensure_schema, validate_identifier,
)

pytestmark = pytest.mark.integration

TIMEOUT = 60.0


class CountingStore:
    """Counts node completions per (run, node, iteration) as `InMemoryRunStore.completions` does:
    a successful commit that moves a node to `done` (from another status or iteration). Reads the
    states before each commit, so only for tests with one worker."""

    def __init__(self, store: PostgresRunStore) -> None:
        self.outputs: Counter = Counter()
        self._store = store
        self._commit = store.commit
        self._commit_many = store.commit_many
        store.commit = self.commit  # type: ignore[method-assign]
        store.commit_many = self.commit_many  # type: ignore[method-assign]
        self.grouped = 0  # commits applied by a group commit of several

    def commit(self, commit: Any) -> bool:
        return self._counted([commit], lambda: [self._commit(commit)])[0]

    def commit_many(self, commits: Any) -> Any:
        results = self._counted(commits, lambda: self._commit_many(commits))
        if len(commits) > 1:
            self.grouped += sum(results)
        return results

    def _counted(self, commits: Any, apply: Callable[[], List[bool]]) -> List[bool]:
        befores = [self._store.read_states(c.run_id, list(c.states)) for c in commits]
        results = apply()
        for commit, before, ok in zip(commits, befores, results):
            if ok:
                for node, state in commit.states.items():
                    old = before.get(node, {})
                    if state.get("st") == "done" and (old.get("st") != "done" or old.get("it") != state.get("it")):
                        self.outputs[(commit.run_id, node, state.get("it", 0))] += 1
        return results


@pytest.fixture
def tables(pg_table_prefix: str) -> Dict[str, str]:
    return {"context_table_name": f"{pg_table_prefix}contexts", "status_table_name": f"{pg_table_prefix}statuses"}


@pytest.fixture
def make_adapter(amqp_url: str, postgres_dsn: str, redis_url: str, redis_prefix: str, amqp_queue_name: str,
                 tables: Dict[str, str]) -> Iterator[Callable[..., RabbitMqAdapter]]:
    adapters: List[RabbitMqAdapter] = []

    def make(flows: List[Any], **options: Any) -> RabbitMqAdapter:
        adapter = RabbitMqAdapter(
            make_runtime(flows), RedisCoordinationStore(redis.Redis.from_url(redis_url), prefix=redis_prefix), amqp_url, postgres_dsn,
            queue_name=amqp_queue_name, poll_timeout=0.2, **dict(tables, **options),
        )
        adapters.append(adapter)
        return adapter

    yield make
    for adapter in adapters:
        adapter.close()
        adapter.coordination.client.close()


def run_scenario(adapter: RabbitMqAdapter, scenario: Scenario) -> Any:
    flows = scenario.build()
    run_id = adapter.start_workflow(flows[0].id, dict(scenario.initial_context))
    result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    if scenario.resume is not None:
        assert result.status == "awaiting", (result.status, result.errors)
        action, output = scenario.resume
        adapter.resume_with_action(run_id, action, output=output)
        result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
        while result.status == "awaiting":  # the resume's successors may not have run yet
            time.sleep(0.02)
            result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    return run_id, result


def status_row(pg_conn: Any, tables: Dict[str, str], run_id: str) -> Any:
    with pg_conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT status, result, updated_at FROM {} WHERE run_id = %s").format(
            sql.Identifier(tables["status_table_name"])), (run_id,))
        row = cur.fetchone()
    pg_conn.rollback()
    return row


def dead_letters(amqp_connection: Any, queue: str) -> List[Any]:
    channel = amqp_connection.channel()
    out = []
    while True:
        method, props, body = channel.basic_get(f"{queue}.dead", auto_ack=True)
        if method is None:
            break
        out.append((body, (props.headers or {}).get(REASON_HEADER)))
    channel.close()
    return out


# ================================================================================================
# Scenarios: distributed on RabbitMQ + PostgreSQL == in memory
# ================================================================================================

NAMES = ["chain", "fan_in", "diamond_even", "diamond_odd", "any_join", "loop", "batch", "subflow", "wait_approve",
         "wait_reject"]


@pytest.mark.parametrize("name", NAMES)
def test_scenario_matches_in_memory(name: str, make_adapter: Callable[..., RabbitMqAdapter], pg_conn: Any,
                                    tables: Dict[str, str], amqp_connection: Any, amqp_queue_name: str) -> None:
    scenario = SCENARIOS[name]
    expected = run_in_memory(scenario)
    assert expected.status == "completed", expected.errors
    adapter = make_adapter(scenario.build())
    counting = CountingStore(adapter.store)
    adapter.start()
    run_id, result = run_scenario(adapter, scenario)
    assert_same_result(result, expected)
    status, stored_result, _ = status_row(pg_conn, tables, run_id)
    assert status == "completed"
    assert stored_result["context"] == expected.context
    assert counting.outputs and all(n == 1 for n in counting.outputs.values()), counting.outputs
    adapter.stop(timeout=10)
    assert dead_letters(amqp_connection, amqp_queue_name) == []


def test_sleep_is_a_durable_timer(make_adapter: Callable[..., RabbitMqAdapter]) -> None:
    sleeper = (
        create_flow("sleeper")
        .node("a", lambda ctx: "woke")
        .sleep("nap", duration=0.5)
        .node("b", lambda ctx: {"after_nap": ctx.input})
        .edge("a", "nap")
        .edge("nap", "b")
    )
    adapter = make_adapter([sleeper])
    adapter.start()
    started = time.monotonic()
    run_id = adapter.start_workflow("sleeper")
    time.sleep(0.2)
    assert adapter.get_status(run_id).status == "running"  # sleeping, distributed: still running
    assert adapter.queue.message_counts()[1] == 1  # the timer waits in the delay queue, no worker blocks
    result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    assert time.monotonic() - started >= 0.5
    expected = sleeper.run(make_runtime([sleeper]), wait_timers=True)
    assert_same_result(result, expected)
    assert result.context["b"] == {"after_nap": "woke"}


def test_cancel_stops_the_run(make_adapter: Callable[..., RabbitMqAdapter]) -> None:
    entered, release = threading.Event(), threading.Event()
    ran: List[str] = []

    def slow(ctx: NodeContext) -> Any:
        entered.set()
        release.wait(10)
        return 1

    flow = create_flow("cancellable").node("slow", slow).node("after", lambda ctx: ran.append("after")).edge("slow", "after")
    adapter = make_adapter([flow])
    adapter.start()
    run_id = adapter.start_workflow("cancellable")
    assert entered.wait(10)
    adapter.cancel(run_id)
    release.set()
    result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    assert result.status == "cancelled"
    time.sleep(0.3)
    assert ran == []
    assert adapter.get_status(run_id).status == "cancelled"


def test_reconciler_re_enqueues_a_lost_job(make_adapter: Callable[..., RabbitMqAdapter], pg_conn: Any,
                                           tables: Dict[str, str], amqp_connection: Any, amqp_queue_name: str) -> None:
    scenario = SCENARIOS["chain"]
    adapter = make_adapter(scenario.build())
    run_id = adapter.start_workflow("chain", dict(scenario.initial_context))
    channel = amqp_connection.channel()
    assert channel.queue_purge(amqp_queue_name).method.message_count == 1  # the start job is lost
    channel.close()
    reconciler = create_rabbitmq_reconciler(adapter=adapter, status_table_name=tables["status_table_name"],
                                            stalled_threshold_seconds=60)
    stats = reconciler.run()
    assert (stats.stalled, stats.reconciled, stats.failed) == (0, 0, 0)  # not idle long enough
    with pg_conn.cursor() as cur:
        cur.execute(sql.SQL("UPDATE {} SET updated_at = now() - make_interval(secs => %s) WHERE run_id = %s").format(
            sql.Identifier(tables["status_table_name"])), (3600, run_id))
    pg_conn.commit()
    stats = reconciler.run()
    assert stats.scanned >= 1 and stats.stalled == 1 and stats.reconciled == 1 and stats.failed == 0
    assert reconciler.run().stalled == 0  # reconciling refreshed updated_at
    adapter.start()
    result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    assert_same_result(result, run_in_memory(scenario))
    with pytest.raises(ValueError):
        create_rabbitmq_reconciler(adapter=adapter, status_table_name="other_statuses")


def test_duplicate_delivery_commits_once(make_adapter: Callable[..., RabbitMqAdapter]) -> None:
    scenario = SCENARIOS["chain"]
    adapter = make_adapter(scenario.build())
    counting = CountingStore(adapter.store)
    run_id = adapter.start_workflow("chain", dict(scenario.initial_context))
    for node_id in ("load", "load", "double"):  # the broker delivers the start job again, and a premature job
        adapter.queue.enqueue([Job(run_id, "chain", node_id)])
    adapter.start()
    result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    assert_same_result(result, run_in_memory(scenario))
    time.sleep(0.3)  # let the worker drain the duplicates
    assert adapter.queue.message_counts() == (0, 0, 0)
    assert dict(counting.outputs) == {(run_id, n, 0): 1 for n in ("load", "double", "describe", "store")}


def test_malformed_messages_are_dead_lettered_and_the_worker_goes_on(
        make_adapter: Callable[..., RabbitMqAdapter], amqp_connection: Any, amqp_queue_name: str) -> None:
    scenario = SCENARIOS["chain"]
    adapter = make_adapter(scenario.build())
    adapter.queue.publish_raw(b"not json {")
    adapter.queue.publish_raw(b'{"runId": "r1"}')
    adapter.queue.publish_raw(json.dumps({"runId": "nope", "blueprintId": "unknown-bp", "nodeId": "x"}).encode())
    adapter.start()
    run_id = adapter.start_workflow("chain", dict(scenario.initial_context))
    result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    assert_same_result(result, run_in_memory(scenario))
    adapter.stop(timeout=10)
    dead = dead_letters(amqp_connection, amqp_queue_name)
    assert [body for body, _ in dead] == [b"not json {", b'{"runId": "r1"}',
                                          json.dumps({"runId": "nope", "blueprintId": "unknown-bp", "nodeId": "x"}).encode()]
    reasons = [reason for _, reason in dead]
    assert reasons[0].startswith("malformed job: not valid JSON")
    assert "missing or empty field" in reasons[1]
    assert "unknown blueprint 'unknown-bp'" in reasons[2]


@pytest.mark.parametrize("bad", ["x; DROP TABLE y", "1abc", "a" * 64, "", "name-with-dash", 'q"uote', "x_runs\n", "x\x00"])
def test_table_names_are_validated_identifiers(bad: str, make_adapter: Callable[..., RabbitMqAdapter], pg_conn: Any,
                                               tables: Dict[str, str]) -> None:
    with pytest.raises(ValueError, match="invalid context table name"):
        make_adapter(SCENARIOS["chain"].build(), **dict(tables, context_table_name=bad))
    with pytest.raises(ValueError, match="invalid status table name"):
        ensure_schema(pg_conn, tables["context_table_name"], bad)
    with pytest.raises(ValueError, match="invalid"):
        validate_identifier(bad)
    with pg_conn.cursor() as cur:
        cur.execute("SELECT to_regclass('y') IS NULL OR true")
    pg_conn.rollback()


def test_ensure_schema_creates_exactly_the_seed_tables_idempotently(pg_conn: Any, tables: Dict[str, str],
                                                                   pg_table_prefix: str) -> None:
    for _ in range(2):
        ensure_schema(pg_conn, **tables)
    with pg_conn.cursor() as cur:
        cur.execute("SELECT table_name, column_name, data_type, is_nullable, column_default"
                    " FROM information_schema.columns WHERE table_name = ANY(%s) ORDER BY table_name, ordinal_position",
                    ([tables["context_table_name"], tables["status_table_name"]],))
        columns = cur.fetchall()
    pg_conn.rollback()
    ctx, st = tables["context_table_name"], tables["status_table_name"]
    assert [c[:4] for c in columns] == [
        (ctx, "run_id", "text", "NO"), (ctx, "context_data", "jsonb", "NO"),
        (st, "run_id", "text", "NO"), (st, "status", "text", "NO"),
        (st, "updated_at", "timestamp with time zone", "YES"), (st, "result", "jsonb", "YES"),
        # run lists (SPEC 11): a column of ours after the seed's, which keep their definitions
        (st, "created_at", "timestamp with time zone", "YES"),
    ]
    assert columns[4][4].lower() == "now()"


def test_seed_client_protocol(make_adapter: Callable[..., RabbitMqAdapter], pg_conn: Any, tables: Dict[str, str],
                              amqp_url: str, amqp_queue_name: str) -> None:
    """A run started exactly as the seed's client does it: two rows inserted by hand, the minimal
    payload published persistent to the durable queue (declared as `assertQueue(q, {durable: true})`)."""
    scenario = SCENARIOS["chain"]
    flow = scenario.build()[0]
    adapter = make_adapter([flow])  # ensure_schema made the tables, declared the queues
    run_id = "seed-run-1"
    with pg_conn.cursor() as cur:
        cur.execute(sql.SQL("INSERT INTO {} (run_id, context_data) VALUES (%s, %s)").format(
            sql.Identifier(tables["context_table_name"])), (run_id, json.dumps(scenario.initial_context)))
        cur.execute(sql.SQL("INSERT INTO {} (run_id, status) VALUES (%s, %s)").format(
            sql.Identifier(tables["status_table_name"])), (run_id, "running"))
    pg_conn.commit()
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_declare(amqp_queue_name, durable=True)  # the seed's assertQueue: must not conflict
    for node_id in analyze_blueprint(flow.to_blueprint()).start_node_ids:
        body = json.dumps({"runId": run_id, "blueprintId": flow.id, "nodeId": node_id}).encode()
        channel.basic_publish("", amqp_queue_name, body, properties=pika.BasicProperties(delivery_mode=2))
    connection.close()
    adapter.start()
    result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    expected = run_in_memory(scenario)
    assert_same_result(result, expected)
    status, stored_result, updated_at = status_row(pg_conn, tables, run_id)
    assert status == "completed"
    assert stored_result["status"] == "completed"
    assert stored_result["context"] == expected.context
    assert updated_at is not None
    assert PostgresContext(adapter.store, run_id).get("store") == ["value=42", 21]


def test_postgres_connection_killed_mid_run(make_adapter: Callable[..., RabbitMqAdapter], postgres_dsn: str) -> None:
    killed: List[int] = []
    holder: Dict[str, RabbitMqAdapter] = {}

    def killer(ctx: NodeContext) -> Any:
        if not killed:
            pid = holder["adapter"].store.backend_pid
            with psycopg2.connect(postgres_dsn) as other, other.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
                assert cur.fetchone()[0] is True
            other.close()
            killed.append(pid)
        return ctx.input * 2

    flow = (
        create_flow("killing")
        .node("load", lambda ctx: ctx.input, inputs="start")
        .node("double", killer)
        .node("after", lambda ctx: {"got": ctx.input, "start": ctx.context.get("start")})
        .edge("load", "double")
        .edge("double", "after")
    )
    adapter = holder["adapter"] = make_adapter([flow])
    adapter.start()
    run_id = adapter.start_workflow("killing", {"start": 21})
    result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    expected = flow.run(make_runtime([flow]), {"start": 21})
    assert_same_result(result, expected)
    assert killed and adapter.store.backend_pid != killed[0]


def test_postgres_context_reads_and_patches_single_keys(make_adapter: Callable[..., RabbitMqAdapter]) -> None:
    adapter = make_adapter(SCENARIOS["chain"].build())
    run_id = adapter.start_workflow("chain", {"start": 1, "keep": {"deep": [1, 2]}})
    context = adapter.context(run_id)
    assert context.get("keep") == {"deep": [1, 2]} and context.has("start") and not context.has("nope")
    context.set("added", {"x": 1})
    context.delete("start")
    assert context.to_dict() == {"keep": {"deep": [1, 2]}, "added": {"x": 1}}
    assert context.get("missing", 7) == 7


def _cut(link: Any) -> None:
    """Simulate a network drop: shut the socket of a pika connection under its feet."""
    import socket

    link.connection._impl._transport._sock.shutdown(socket.SHUT_RDWR)


def test_rabbitmq_connection_dropped_mid_run(make_adapter: Callable[..., RabbitMqAdapter]) -> None:
    cut: List[str] = []
    holder: Dict[str, RabbitMqAdapter] = {}

    def dropper(ctx: NodeContext) -> Any:
        if not cut:  # both connections drop while this node runs: its ack and its successors' publish hit them
            queue = holder["adapter"].queue
            _cut(queue._consumer)
            _cut(queue._publisher)
            cut.append(ctx.node_id)
        return ctx.input * 2

    flow = (
        create_flow("dropping")
        .node("load", lambda ctx: ctx.input, inputs="start")
        .node("double", dropper)
        .node("after", lambda ctx: {"got": ctx.input})
        .edge("load", "double")
        .edge("double", "after")
    )
    adapter = holder["adapter"] = make_adapter([flow])
    counting = CountingStore(adapter.store)
    adapter.start()
    run_id = adapter.start_workflow("dropping", {"start": 21})
    result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    assert_same_result(result, flow.run(make_runtime([flow]), {"start": 21}))
    assert cut == ["double"] and adapter.queue._consumer.generation >= 2
    time.sleep(0.3)
    assert adapter.queue.message_counts() == (0, 0, 0)
    assert all(n == 1 for n in counting.outputs.values()), counting.outputs


def test_a_batched_worker_group_commits_concurrent_runs(make_adapter: Callable[..., RabbitMqAdapter]) -> None:
    """Jobs of different runs fetched together are loaded in one query, committed in one
    transaction and their successors published in one AMQP transaction, with the same results."""
    names = ["chain", "fan_in", "diamond_even", "loop", "batch"]
    flows = [flow for name in names for flow in SCENARIOS[name].build()]
    adapter = make_adapter(flows, prefetch=16, fetch_batch=16)
    counting = CountingStore(adapter.store)
    runs = {adapter.start_workflow(SCENARIOS[name].build()[0].id, dict(SCENARIOS[name].initial_context)): name
            for name in names for _ in range(3)}
    adapter.start()
    for run_id, name in runs.items():
        assert_same_result(adapter.wait_for_result(run_id, timeout=TIMEOUT), run_in_memory(SCENARIOS[name]))
    assert counting.grouped > 0, "no group commit happened"
    assert counting.outputs and max(counting.outputs.values()) == 1


# ================================================================================================
# Group commit, outbox and acknowledgements: the store and the queue directly
# ================================================================================================


class RecordingQueue:
    """Stands in for the queue in `publish_outboxes`: records what would be published."""

    def __init__(self) -> None:
        self.bodies: List[Any] = []

    def enqueue_serialized(self, messages: Any) -> None:
        self.bodies.extend(json.loads(body) for body, _ in messages)


def outbox_rows(pg_conn: Any, pg_table_prefix: str, run_id: Any = None) -> List[Any]:
    with pg_conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT run_id, body FROM {} WHERE %s IS NULL OR run_id = %s ORDER BY id").format(
            sql.Identifier(f"{pg_table_prefix}outbox")), (run_id, run_id))
        rows = cur.fetchall()
    pg_conn.rollback()
    return rows


def started_runs(adapter: RabbitMqAdapter, count: int) -> List[str]:
    """`count` chain runs started with their start jobs taken off the queue (no worker runs)."""
    run_ids = [adapter.start_workflow("chain", {"start": 21}) for _ in range(count)]
    assert adapter.queue.message_counts()[0] == count
    channel = adapter.queue._publisher.ensure()
    channel.queue_purge(adapter.queue.queue_name)
    return run_ids


def a_commit(adapter: RabbitMqAdapter, run_id: str, expected: int, marker: Any) -> Any:
    from flowcraft.ports import Commit

    return Commit(run_id, expected, adapter.store.get_record(run_id), context_set={"marker": marker},
                  states={"load": {"it": 0, "st": "done"}}, jobs=[Job(run_id, "chain", "double")])


def test_a_wave_commits_the_fresh_runs_and_reports_the_stale_one(make_adapter: Callable[..., RabbitMqAdapter],
                                                                 pg_conn: Any, pg_table_prefix: str) -> None:
    adapter = make_adapter(SCENARIOS["chain"].build())
    store = adapter.store
    first, stale, last = started_runs(adapter, 3)
    versions = {r: store.get_record(r).version for r in (first, stale, last)}
    commits = [a_commit(adapter, first, versions[first], 1), a_commit(adapter, stale, versions[stale] + 7, 2),
               a_commit(adapter, last, versions[last], 3)]
    assert store.commit_many(commits) == [True, False, True]
    assert [store.get_record(r).version for r in (first, stale, last)] == [versions[first] + 1, versions[stale],
                                                                           versions[last] + 1]
    assert [PostgresContext(store, r).get("marker") for r in (first, stale, last)] == [1, None, 3]
    assert store.read_states(stale, ["load"]) == {"load": {"it": 0, "st": "ready"}}
    assert sorted(r for r, _ in outbox_rows(pg_conn, pg_table_prefix)) == sorted([first, last])
    # the rows the statement returned are published as they are; the stale run's outbox is read from
    # the table (it is empty: nothing of the stale commit was written)
    recording = RecordingQueue()
    assert store.publish_outboxes([first, stale, last], recording) == 2
    assert sorted(b["runId"] for b in recording.bodies) == sorted([first, last])
    assert all(b["nodeId"] == "double" for b in recording.bodies)
    assert outbox_rows(pg_conn, pg_table_prefix) == []  # deleted once published (no worker loop: at once)


def test_published_outbox_rows_are_deleted_by_the_next_commit_or_when_the_worker_idles(
        make_adapter: Callable[..., RabbitMqAdapter], pg_conn: Any, pg_table_prefix: str) -> None:
    adapter = make_adapter(SCENARIOS["chain"].build())
    store = adapter.store
    first, second = started_runs(adapter, 2)
    store.defer_deletes = True  # as while a worker loop runs
    assert store.commit_many([a_commit(adapter, first, store.get_record(first).version, 1)]) == [True]
    assert store.publish_outboxes([first], RecordingQueue()) == 1
    assert [r for r, _ in outbox_rows(pg_conn, pg_table_prefix)] == [first]  # published, delete deferred
    assert store.commit_many([a_commit(adapter, second, store.get_record(second).version, 2)]) == [True]
    assert [r for r, _ in outbox_rows(pg_conn, pg_table_prefix)] == [second]  # that commit deleted it
    store.defer_deletes = False
    store.publish_outboxes([second], RecordingQueue())
    assert outbox_rows(pg_conn, pg_table_prefix) == []
    # a worker loop: its batches' rows are deleted by the following commits, the last ones when it idles
    scenario = SCENARIOS["chain"]
    runs = [adapter.start_workflow("chain", dict(scenario.initial_context)) for _ in range(4)]
    adapter.start()
    for run_id in runs:
        assert_same_result(adapter.wait_for_result(run_id, timeout=TIMEOUT), run_in_memory(scenario))
    deadline = time.monotonic() + 5
    while outbox_rows(pg_conn, pg_table_prefix) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outbox_rows(pg_conn, pg_table_prefix) == []


def fetch_exactly(queue: Any, count: int) -> List[Any]:
    got: List[Any] = []
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        got += queue.fetch(count - len(got), timeout=0.5)
    assert len(got) == count
    return got


@pytest.mark.parametrize("point", ["after_commit", "after_publish", "before_ack"])
def test_a_worker_dying_after_its_group_commit_loses_and_duplicates_nothing(
        point: str, make_adapter: Callable[..., RabbitMqAdapter], pg_conn: Any, pg_table_prefix: str) -> None:
    """A worker dies at `point` of a batch of three runs' jobs (as after SIGKILL: its deliveries go back
    to the queue, the outbox rows it published are not deleted). A second worker, which has not seen
    the dead one's commit, takes the redelivered jobs: the committed jobs not published yet are found
    in the outbox table, those published twice are dropped, and every node commits exactly once."""
    from flowcraft.distributed import WorkerCrash

    scenario = SCENARIOS["chain"]
    first = make_adapter(scenario.build(), prefetch=8)
    counted = [CountingStore(first.store)]
    runs = [first.start_workflow("chain", dict(scenario.initial_context)) for _ in range(3)]
    first.store.defer_deletes = True  # as in its worker loop

    def fault(where: str) -> None:
        if where == point:
            raise WorkerCrash(where)

    first._fault = fault  # type: ignore[method-assign]
    with pytest.raises(WorkerCrash):
        first.handle_batch(fetch_exactly(first.queue, 3))
    first.queue.release()  # the dead worker's channel closes: RabbitMQ requeues its deliveries
    assert counted[0].grouped == 3  # one group commit of the three runs
    left = outbox_rows(pg_conn, pg_table_prefix)
    assert sorted(r for r, _ in left) == sorted(runs) and all(json.loads(b)["nodeId"] == "double" for _, b in left)
    second = make_adapter(scenario.build(), prefetch=8)
    counted.append(CountingStore(second.store))
    second.start()
    for run_id in runs:
        assert_same_result(second.wait_for_result(run_id, timeout=TIMEOUT), run_in_memory(scenario))
    total = counted[0].outputs + counted[1].outputs
    assert set(total) == {(r, n, 0) for r in runs for n in ("load", "double", "describe", "store")}
    assert max(total.values()) == 1, total
    time.sleep(0.3)
    assert second.queue.message_counts() == (0, 0, 0)
    assert outbox_rows(pg_conn, pg_table_prefix) == []


def test_concurrent_group_commits_on_the_same_runs_neither_deadlock_nor_lose_updates(
        postgres_dsn: str, tables: Dict[str, str]) -> None:
    """Two stores commit waves over the same runs at the same time, in opposite orders: the rows are
    locked in run-id order (no deadlock), and each run's version counts exactly the commits applied."""
    from flowcraft.ports import Commit, RunRecord

    stores = [PostgresRunStore(postgres_dsn, **tables) for _ in range(2)]
    retried: List[str] = []  # a deadlock (an OperationalError) would be retried on a new connection
    for store in stores:
        store._reconnect = lambda: retried.append("reconnect")  # type: ignore[method-assign]
    run_ids = [f"lock-{i:02d}" for i in range(8)]
    for run_id in run_ids:
        assert stores[0].create_run(RunRecord(run_id, "chain", None, "running", 1, 1), {}, {}, [])
    applied: List[Counter] = [Counter(), Counter()]
    errors: List[BaseException] = []
    barrier = threading.Barrier(2)

    def committer(i: int) -> None:
        store = stores[i]
        try:
            for step in range(150):
                records = {r: store.get_record(r) for r in run_ids}
                order = run_ids if i == 0 else run_ids[::-1]
                commits = [Commit(r, records[r].version, records[r], context_set={f"w{i}.{step}": step}) for r in order]
                barrier.wait(timeout=10)
                for commit, ok in zip(commits, store.commit_many(commits)):
                    applied[i][commit.run_id] += ok
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=committer, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert errors == [] and retried == []
        for run_id in run_ids:
            done = applied[0][run_id] + applied[1][run_id]
            assert stores[0].get_record(run_id).version == 1 + done
            assert len(PostgresContext(stores[0], run_id).to_dict()) == done
    finally:
        for store in stores:
            store.close()


def test_two_stores_can_share_a_connection(postgres_dsn: str, tables: Dict[str, str]) -> None:
    """The hot statements are prepared per connection under names derived from the tables."""
    from flowcraft.ports import RunRecord

    conn = psycopg2.connect(postgres_dsn)
    try:
        one, two = PostgresRunStore(conn, **tables), PostgresRunStore(conn, **tables)
        assert one.create_run(RunRecord("shared-1", "chain", None, "running", 1, 1), {"a": 1}, {}, [])
        assert two.get_record("shared-1").version == 1
        assert one.load("shared-1", [], ["a"]).context == {"a": 1}
    finally:
        conn.close()


def test_acks_go_out_once_and_as_one_multiple_ack_for_the_oldest(make_adapter: Callable[..., RabbitMqAdapter]) -> None:
    adapter = make_adapter(SCENARIOS["chain"].build(), prefetch=10)
    queue = adapter.queue
    queue.enqueue([Job(f"ack-{i}", "chain", "load") for i in range(5)])
    got: List[Any] = []
    deadline = time.monotonic() + 10
    while len(got) < 3 and time.monotonic() < deadline:
        got += queue.fetch(3 - len(got), timeout=0.5)
    assert len(got) == 3  # the two others wait in the buffer: a multiple ack must not cover them
    sent: List[Any] = []
    channel = queue._consumer.channel
    real_ack = channel.basic_ack
    channel.basic_ack = lambda tag, multiple=False: (sent.append((tag, multiple)), real_ack(tag, multiple=multiple))
    tags = [d.tag[1] for d in got]
    queue.ack([got[1]])
    queue.ack([got[0], got[2], got[1]])  # got[1] again: not sent twice (RabbitMQ would close the channel)
    assert sent == [(tags[1], False), (tags[2], True)]
    while len(got) < 5 and time.monotonic() < deadline:
        got += queue.fetch(5 - len(got), timeout=0.5)
    assert len(got) == 5
    queue.ack(got[3:])
    assert sent[-1] == (got[4].tag[1], True) and len(sent) == 3
    assert queue._consumer.channel.is_open
    queue.release()  # would give back anything unacknowledged
    assert queue.fetch(5, timeout=0.5) == []
    assert queue.message_counts() == (0, 0, 0)


def test_whole_loads_read_every_state_and_the_whole_context(make_adapter: Callable[..., RabbitMqAdapter]) -> None:
    """`load_many` with None for node ids and context keys gives the whole run (`whole` set), so a
    chain's start and last node read nothing else; named ids and keys give just those."""
    flow = (create_flow("wholechain").node("a", lambda ctx: ctx.context.get("seed") + 1)
            .node("b", lambda ctx: ctx.input * 10).edge("a", "b"))
    adapter = make_adapter([flow])
    store = adapter.store
    run_id = adapter.start_workflow("wholechain", {"seed": 4, "other": "x"})
    whole, named = store.load_many([(run_id, None, None), (run_id, ["a"], ["seed"])])
    assert whole.whole and whole.context == {"seed": 4, "other": "x"} and set(whole.states) == {"a"}
    assert not named.whole and named.context == {"seed": 4} and set(named.states) == {"a"}
    reads: List[str] = []
    for name in ("read_context", "read_all_context", "read_states", "read_all_states"):
        original = getattr(store, name)
        setattr(store, name, (lambda n, f: lambda *a, **k: (reads.append(n), f(*a, **k))[1])(name, original))
    adapter.start()
    result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    assert result.status == "completed" and result.context["_outputs.b"] == 50
    assert reads == []


def test_reconciler_sweeps_outbox_rows_a_killed_worker_left(make_adapter: Callable[..., RabbitMqAdapter],
                                                            pg_conn: Any, amqp_connection: Any,
                                                            amqp_queue_name: str) -> None:
    """Outbox rows older than the threshold (a worker killed after publishing them, before their
    deferred delete) are published again and deleted by the reconciler; younger ones stay, and the
    duplicate job is dropped, so each node still commits once."""
    scenario = SCENARIOS["chain"]
    adapter = make_adapter(scenario.build())
    adapter.start()
    run_id = adapter.start_workflow("chain", dict(scenario.initial_context))
    result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    adapter.stop()
    outbox = sql.Identifier(adapter.store.outbox_table)
    left = Job(run_id, "chain", scenario.build()[0].to_blueprint().nodes[0].id).to_json()
    with pg_conn.cursor() as cur:  # one old row, as a killed worker leaves it, and one fresh row
        cur.execute(sql.SQL("INSERT INTO {} (run_id, body, created_at) VALUES (%s, %s, now() - interval '1 hour'),"
                            " (%s, %s, now())").format(outbox), (run_id, left, run_id, left))
    pg_conn.commit()
    reconciler = create_rabbitmq_reconciler(adapter=adapter, stalled_threshold_seconds=60)
    assert reconciler.run().stalled == 0
    with pg_conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*), min(created_at) > now() - interval '1 minute' FROM {}").format(outbox))
        assert cur.fetchone() == (1, True)  # the old row is gone, the fresh one stays
    pg_conn.commit()
    channel = amqp_connection.channel()
    waiting = lambda: channel.queue_declare(amqp_queue_name, durable=True, passive=True).method.message_count  # noqa: E731
    assert waiting() == 1  # the old row's job, published again
    adapter.start()  # it is a duplicate: the worker drops it
    deadline = time.monotonic() + TIMEOUT
    while waiting() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert waiting() == 0
    channel.close()
    time.sleep(0.3)
    final = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    assert final.status == "completed" and final.context == result.context


def _rows(pg_conn: Any, query: str, table: str, *params: Any) -> List[Any]:
    """The rows of `query`, whose `{}` is the quoted identifier `table`."""
    with pg_conn.cursor() as cur:
        cur.execute(sql.SQL(query).format(sql.Identifier(table)), params)
        rows = cur.fetchall()
    pg_conn.rollback()
    return rows


def test_node_states_and_in_flight_context_are_rows_and_context_data_holds_initial_then_final(
        make_adapter: Callable[..., RabbitMqAdapter], pg_conn: Any, tables: Dict[str, str], pg_table_prefix: str) -> None:
    """A commit writes its node state rows and context key rows only: the runs row keeps no node
    states, the seed's context_data holds the initial context while the run is in flight (seen
    from a node) and the final one once it ended."""
    ctx_table = tables["context_table_name"]
    seen: Dict[str, Any] = {}
    n = 30

    def step(ctx: NodeContext) -> Any:
        ctx.context.set(f"k{ctx.node_id}", ctx.node_id)
        if ctx.node_id == "n20":
            seen["in_flight"] = _rows(pg_conn, "SELECT context_data FROM {} WHERE run_id = %s", ctx_table, ctx.run_id)[0][0]
            seen["runs_row"] = _rows(pg_conn, "SELECT states, pg_column_size(record) FROM {} WHERE run_id = %s",
                                              f"{pg_table_prefix}runs", ctx.run_id)[0]
        return 1

    flow = create_flow("rowchain")
    for i in range(n):
        flow.node(f"n{i}", step)
        if i:
            flow.edge(f"n{i - 1}", f"n{i}")
    adapter = make_adapter([flow])
    adapter.start()
    run_id = adapter.start_workflow("rowchain", {"initial": 1})
    result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    assert result.status == "completed", result.errors
    assert seen["in_flight"] == {"initial": 1}
    assert seen["runs_row"][0] == {}
    assert seen["runs_row"][1] < 2000  # bookkeeping only: no states, no context
    states = dict(_rows(pg_conn, "SELECT node_id, state FROM {} WHERE run_id = %s", f"{pg_table_prefix}node_states", run_id))
    assert sorted(states) == sorted(f"n{i}" for i in range(n))
    assert states == adapter.store.read_all_states(run_id)
    keys = dict(_rows(pg_conn, "SELECT key, value FROM {} WHERE run_id = %s", f"{pg_table_prefix}context_keys", run_id))
    final = _rows(pg_conn, "SELECT context_data FROM {} WHERE run_id = %s", ctx_table, run_id)[0][0]
    assert final == keys == result.context == adapter.store.read_all_context(run_id)
    assert final["kn29"] == "n29" and final["initial"] == 1
    snap = adapter.store.load(run_id, ["n3", "nope"], ["kn3", "nope"])
    assert set(snap.states) == {"n3"} and snap.context == {"kn3": "n3"}


def test_deleted_context_keys_leave_the_key_rows_and_the_final_context(make_adapter: Callable[..., RabbitMqAdapter]) -> None:
    flow = (create_flow("dels").node("a", lambda ctx: ctx.context.set("tmp", 1))
            .node("b", lambda ctx: ctx.context.delete("tmp")).edge("a", "b"))
    adapter = make_adapter([flow])
    adapter.start()
    run_id = adapter.start_workflow("dels", {"tmp": 0, "keep": 2})
    result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
    assert result.status == "completed", result.errors
    assert "tmp" not in result.context and result.context["keep"] == 2
    assert "tmp" not in adapter.store.read_all_context(run_id)
    assert adapter.store.read_context(run_id, ["tmp", "keep"]) == {"keep": 2}


def test_runs_of_an_older_schema_are_migrated_once(make_adapter: Callable[..., RabbitMqAdapter], pg_conn: Any,
                                                   tables: Dict[str, str], pg_table_prefix: str) -> None:
    """A run in flight stored the old way (node states in `<runs>.states`, context in context_data,
    no `keyed`) is moved to rows by ensure_schema, once: a second call brings nothing back."""
    adapter = make_adapter(SCENARIOS["chain"].build())
    store = adapter.store
    (run_id,) = started_runs(adapter, 1)
    assert store.commit(a_commit(adapter, run_id, store.get_record(run_id).version, "m"))
    before = store.load(run_id, None, None)
    runs, ctx = sql.Identifier(f"{pg_table_prefix}runs"), sql.Identifier(tables["context_table_name"])
    states, keys = sql.Identifier(f"{pg_table_prefix}node_states"), sql.Identifier(f"{pg_table_prefix}context_keys")
    with pg_conn.cursor() as cur:  # as an older version left it
        cur.execute(sql.SQL("UPDATE {} SET keyed = false, states = (SELECT jsonb_object_agg(node_id, state)"
                            " FROM {} WHERE run_id = %s) WHERE run_id = %s").format(runs, states), (run_id, run_id))
        cur.execute(sql.SQL("UPDATE {} SET context_data = (SELECT jsonb_object_agg(key, value)"
                            " FROM {} WHERE run_id = %s) WHERE run_id = %s").format(ctx, keys), (run_id, run_id))
        cur.execute(sql.SQL("DELETE FROM {} WHERE run_id = %s").format(states), (run_id,))
        cur.execute(sql.SQL("DELETE FROM {} WHERE run_id = %s").format(keys), (run_id,))
    pg_conn.commit()
    assert store.load(run_id, None, None).states == {}
    ensure_schema(pg_conn, **tables)
    after = store.load(run_id, None, None)
    assert (after.record, after.states, after.context) == (before.record, before.states, before.context)
    assert _rows(pg_conn, "SELECT keyed, states FROM {} WHERE run_id = %s", f"{pg_table_prefix}runs", run_id) == [(True, {})]
    store.delete_key(run_id, "marker")
    ensure_schema(pg_conn, **tables)
    assert "marker" not in store.read_all_context(run_id)


@pytest.mark.parametrize("name", ["fan_in", "batch", "diamond_even", "loop", "subflow", "chain"])
def test_a_worker_with_threads_matches_in_memory(name: str, make_adapter: Callable[..., RabbitMqAdapter],
                                                 amqp_connection: Any, amqp_queue_name: str) -> None:
    """`threads=4`: each thread consumes on a channel of its own (acknowledging there) with a
    PostgreSQL connection of its own; every run ends as in memory."""
    scenario = SCENARIOS[name]
    expected = run_in_memory(scenario)
    adapter = make_adapter(scenario.build(), threads=4)
    adapter.start()
    run_ids = [adapter.start_workflow(scenario.build()[0].id, dict(scenario.initial_context)) for _ in range(3)]
    for run_id in run_ids:
        assert_same_result(adapter.wait_for_result(run_id, timeout=TIMEOUT), expected)
    adapter.stop(timeout=10)
    assert dead_letters(amqp_connection, amqp_queue_name) == []


def test_idle_workers_get_the_rest_of_a_fan_out_of_slow_nodes(make_adapter: Callable[..., RabbitMqAdapter]) -> None:
    """Three one-thread workers, a fan-out of three nodes that wait for each other: each worker's
    prefetch window holds what it can start soon, so the three run at once."""
    from test_redis_adapter import _barrier_fan

    flow = _barrier_fan(3)
    workers = [make_adapter([flow]) for _ in range(3)]
    for worker in workers:
        worker.start()
    result = workers[0].wait_for_result(workers[0].start_workflow(flow.id), timeout=30)
    assert result.status == "completed", result.errors
    assert result.context["end"] == [1, 1, 1]
