"""Hostile input against the RabbitMQ adapter (issue 11, items 5, 6, 9 and 11), on the real services.

Hostile messages are published straight to the job queue, as any queue writer could; the worker
runs in a child process with a memory cap and a timeout (`bounded.run_bounded`), in burst mode: it
must serve every job queued with the hostile ones (same prefetch window) and return, neither crash
(a non-zero exit) nor loop (the timeout). Then the test checks the dead-letter queue (the hostile
body unchanged, a bounded reason header) and the runs' statuses. The store's refusals are also
checked on `PostgresRunStore` directly: `StoreRejected` naming the run and the part at fault, the
same connection still in use afterwards (no reconnect: not taken for an outage).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Tuple

import pika
import pytest
import redis

from flowcraft import create_flow
from flowcraft.errors import StoreRejected
from flowcraft.ports import Commit, RunRecord

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bounded import run_bounded  # noqa: E402
from test_distributed import SCENARIOS, make_runtime  # noqa: E402

from flowcraft_rabbitmq import (  # noqa: E402
    MAX_REASON_BYTES, REASON_BYTES_HEADER, REASON_HEADER, PostgresRunStore, RabbitMqAdapter, RedisCoordinationStore,
    validate_identifier,
)

pytestmark = pytest.mark.integration

MB = 1_000_000


def _make(spec: Any) -> Any:
    """The `emit` flow's node: the output its run's context asks for."""
    if spec == "nul":
        return "before\x00after"  # PostgreSQL's JSONB cannot hold NUL
    if spec == "nul-key":
        return {"ok": 1, "k\x00": 2}
    return "x" * int(spec)


def flows() -> List[Any]:
    """The blueprints of the worker and of the client: the chain, and `emit` (one node's output
    chosen by the run, then a node that reads it)."""
    emit = (create_flow("emit")
            .node("make", lambda ctx: _make(ctx.input), inputs="spec")
            .node("measure", lambda ctx: len(ctx.input))
            .edge("make", "measure"))
    return SCENARIOS["chain"].build() + [emit]


def worker_adapter(config: Dict[str, Any]) -> RabbitMqAdapter:
    """The adapter the child's worker runs (also used by the client side of the tests)."""
    return RabbitMqAdapter(
        make_runtime(flows()), RedisCoordinationStore(redis.Redis.from_url(config["redis_url"]), prefix=config["redis_prefix"]),
        config["amqp_url"], config["postgres_dsn"], queue_name=config["queue"], poll_timeout=0.2,
        context_table_name=config["context_table_name"], status_table_name=config["status_table_name"],
        prefetch=config.get("prefetch", 40),
    )


# The worker, in a child: a worker thread serves the queue until the runs given are over and the
# dead letters expected are in (or the time is up); the child exits 1 if the worker thread died.
WORKER = """
import json, logging, sys, threading, time
sys.path[:0] = ["tests", "tests/integration"]
logging.basicConfig(level=logging.WARNING)
from test_hostile_rabbitmq import worker_adapter
config = json.loads({config!r})
adapter = worker_adapter(config)
served = []
thread = threading.Thread(target=lambda: served.append(adapter.work()), daemon=True)
thread.start()

def finished():
    records = [adapter.store.get_record(run_id) for run_id in config["runs"]]
    ready, _, dead = adapter.queue.message_counts()
    over = all(r is not None and r.status in ("completed", "failed", "cancelled", "stalled") for r in records)
    return over and ready == 0 and dead >= config["dead"]

deadline = time.monotonic() + config["seconds"]
while thread.is_alive() and not finished() and time.monotonic() < deadline:
    time.sleep(0.05)
alive = thread.is_alive()
done = finished() if alive else None  # before stopping: a stopped worker gives back what it prefetched
adapter.stop(timeout=10)
thread.join(10)  # work() returns how many it served
adapter.close()
print("ALIVE", alive, "FINISHED", done, "SERVED", served[0] if served else None)
sys.exit(0 if alive else 1)
"""


@pytest.fixture
def config(amqp_url: str, postgres_dsn: str, redis_url: str, redis_prefix: str, amqp_queue_name: str,
           pg_table_prefix: str) -> Dict[str, Any]:
    return {"amqp_url": amqp_url, "postgres_dsn": postgres_dsn, "redis_url": redis_url, "redis_prefix": redis_prefix,
            "queue": amqp_queue_name, "context_table_name": f"{pg_table_prefix}contexts",
            "status_table_name": f"{pg_table_prefix}statuses"}


@pytest.fixture
def client(config: Dict[str, Any]) -> Iterator[RabbitMqAdapter]:
    """The client side (starts runs, reads statuses); never works."""
    adapter = worker_adapter(config)
    yield adapter
    adapter.close()
    adapter.coordination.client.close()


def publish(amqp_connection: Any, queue: str, *bodies: bytes) -> None:
    """Publish raw bodies to the job queue, as an attacker with write access would."""
    channel = amqp_connection.channel()
    for body in bodies:
        channel.basic_publish("", queue, body, properties=pika.BasicProperties(delivery_mode=2))
    channel.close()


def dead_letters(amqp_connection: Any, queue: str) -> List[Tuple[bytes, Dict[str, Any]]]:
    channel = amqp_connection.channel()
    out = []
    while True:
        method, props, body = channel.basic_get(f"{queue}.dead", auto_ack=True)
        if method is None:
            break
        out.append((body, dict(props.headers or {})))
    channel.close()
    return out


def run_worker(config: Dict[str, Any], runs: List[str], dead: int, seconds: float = 30.0, memory_mb: int = 1024) -> int:
    """Run a worker in a bounded child until `runs` are over and `dead` dead letters are in; assert
    it stayed alive and did not run out of time. Returns how many deliveries it served."""
    child = dict(config, runs=runs, dead=dead, seconds=seconds)
    result = run_bounded(WORKER.format(config=json.dumps(child)), timeout=seconds + 30, memory_mb=memory_mb)
    assert result.ok, "the worker crashed or hung:\n" + result.describe()
    assert "ALIVE True FINISHED True" in result.stdout, "the runs did not finish in time:\n" + result.describe()
    return int(result.stdout.split("SERVED")[-1].split()[0])


def assert_bounded_reason(headers: Dict[str, Any], *fragments: str) -> str:
    reason = headers[REASON_HEADER]
    reason = reason.decode() if isinstance(reason, bytes) else reason
    assert len(reason.encode()) <= MAX_REASON_BYTES, len(reason.encode())
    assert "\x00" not in reason
    for fragment in fragments:
        assert fragment in reason, reason[:500]
    return reason


def assert_queue_drained(client: RabbitMqAdapter) -> None:
    """Nothing left to redeliver: the hostile job was not put back, nothing loops."""
    ready, delayed, _ = client.queue.message_counts()
    assert (ready, delayed) == (0, 0)


def chain_ok(client: RabbitMqAdapter, run_id: str) -> None:
    result = client.wait_for_result(run_id, timeout=5)
    assert result.status == "completed", (result.status, result.errors)
    assert result.context["stored"] == "value=42"


# ================================================================================================
# Item 6: hostile identity fields
# ================================================================================================


def test_nul_in_run_id_is_dead_lettered_and_the_worker_serves_the_others(
        config: Dict[str, Any], client: RabbitMqAdapter, amqp_connection: Any, amqp_queue_name: str) -> None:
    before = client.start_workflow("chain", {"start": 21})
    hostile = json.dumps({"runId": "run\x00; DROP", "blueprintId": "chain", "nodeId": "load"}).encode()
    publish(amqp_connection, amqp_queue_name, hostile)
    after = client.start_workflow("chain", {"start": 21})
    served = run_worker(config, [before, after], dead=1)
    assert served >= 9  # 4 nodes of each chain, and the hostile delivery
    chain_ok(client, before)
    chain_ok(client, after)
    dead = dead_letters(amqp_connection, amqp_queue_name)
    assert [body for body, _ in dead] == [hostile]  # the body unchanged: it can be requeued as it came
    assert_bounded_reason(dead[0][1])
    assert client.store.run_ids() == sorted([before, after])  # nothing of the attacker's was created
    assert_queue_drained(client)


def test_nul_in_node_id_of_a_real_run_is_dead_lettered_and_fails_no_run(
        config: Dict[str, Any], client: RabbitMqAdapter, amqp_connection: Any, amqp_queue_name: str) -> None:
    """Needs the core's parsing change (NUL in an identity field: malformed, no run failed): on the
    adapter's own, the run it names is failed (by design before item 12), but the worker survives."""
    victim = client.start_workflow("chain", {"start": 21})
    hostile = json.dumps({"runId": victim, "blueprintId": "chain", "nodeId": "lo\x00ad"}).encode()
    publish(amqp_connection, amqp_queue_name, hostile)
    bystander = client.start_workflow("chain", {"start": 21})
    run_worker(config, [victim, bystander], dead=1)
    chain_ok(client, bystander)
    dead = dead_letters(amqp_connection, amqp_queue_name)
    assert [body for body, _ in dead] == [hostile]
    assert_bounded_reason(dead[0][1])
    assert_queue_drained(client)
    chain_ok(client, victim)  # core: a job with NUL in an identity field fails no run


def test_nul_ids_never_reach_postgresql_and_reads_find_nothing(client: RabbitMqAdapter) -> None:
    """What the worker's error path calls with a hostile job's ids: nothing raises, nothing is found
    (PostgreSQL could hold no such id), and the connection is the same afterwards."""
    store = client.store
    real = client.start_workflow("chain", {"start": 21})
    pid = store.backend_pid
    bad = "a\x00b"
    assert store.get_record(bad) is None and store.load(bad, ["load"], ["start"]) is None
    assert store.load_many([(bad, None, None), (real, ["lo\x00ad", "load"], ["st\x00art", "start"])])[0] is None
    snap = store.load_many([(bad, None, None), (real, ["lo\x00ad", "load"], ["st\x00art", "start"])])[1]
    assert snap is not None and snap.context == {"start": 21}
    assert store.read_context(bad, ["start"]) == {} and store.read_all_context(bad) == {}
    assert store.read_states(bad, ["load"]) == {} and store.read_all_states(bad) == {}
    assert store.read_context(real, ["st\x00art", "start"]) == {"start": 21}
    assert store.read_items(bad, ["f"]) == [None] and store.read_items(real, ["f\x00", "g"]) == [None, None]
    store.touch(bad, time.time())
    assert store.publish_outboxes([bad], client.queue) == 0 and store.idle_runs(0.0)[0] == 1
    record = store.get_record(real)
    assert store.commit(Commit(bad, 1, RunRecord(bad, "chain"))) is False  # no such run: as a stale commit
    assert store.commit_many([Commit(bad, 1, RunRecord(bad, "chain")),
                              Commit(real, record.version, record, context_set={"ok": 1})]) == [False, True]
    assert store.read_context(real, ["ok"]) == {"ok": 1}
    assert store.backend_pid == pid


def test_a_failure_quoting_nul_is_recorded_escaped(client: RabbitMqAdapter) -> None:
    """Recording a run's failure never fails in turn: error messages (which quote hostile ids) are
    stored with NUL and lone surrogates escaped."""
    store = client.store
    run_id = client.start_workflow("chain", {"start": 21})
    record = store.get_record(run_id)
    error = {"node_id": "lo\x00ad", "message": "unknown node 'lo\x00ad' \ud800", "type": "InvalidJob"}
    failed = RunRecord(run_id, "chain", record.blueprint_version, status="failed", errors=[error],
                       result={"status": "failed", "run_id": run_id, "context": {}, "errors": [error]})
    assert store.commit(Commit(run_id, record.version, failed))
    stored = store.get_record(run_id)
    assert stored.status == "failed"
    assert stored.errors == [{"node_id": "lo\\x00ad", "message": "unknown node 'lo\\x00ad' \\ud800", "type": "InvalidJob"}]
    assert stored.result["errors"] == stored.errors


@pytest.mark.parametrize("field", ["runId", "blueprintId", "nodeId"])
def test_a_200_kb_field_is_dead_lettered_once_with_a_bounded_reason(
        field: str, config: Dict[str, Any], client: RabbitMqAdapter, amqp_connection: Any, amqp_queue_name: str) -> None:
    """A reason quoting a 200 KB field would not fit in an AMQP header frame (128 KB): the header is
    cut to MAX_REASON_BYTES, the body stays whole, and the worker neither reconnects forever nor
    sees the message again."""
    victim = client.start_workflow("chain", {"start": 21})
    job = {"runId": "r-" + "x" * 10, "blueprintId": "chain", "nodeId": "load", field: "y" * 200_000}
    hostile = json.dumps(job).encode()
    publish(amqp_connection, amqp_queue_name, hostile)
    bystander = client.start_workflow("chain", {"start": 21})
    run_worker(config, [victim, bystander], dead=1)
    chain_ok(client, victim)
    chain_ok(client, bystander)
    dead = dead_letters(amqp_connection, amqp_queue_name)
    assert [body for body, _ in dead] == [hostile]
    headers = dead[0][1]
    reason = assert_bounded_reason(headers)
    if headers.get(REASON_BYTES_HEADER) is not None:  # the reason quoted the field: cut, its length kept
        assert headers[REASON_BYTES_HEADER] > 200_000 and reason.endswith(f"[reason cut: {headers[REASON_BYTES_HEADER]} bytes in all]")
    assert_queue_drained(client)


# ================================================================================================
# Items 5 and 9: what PostgreSQL refuses fails the run, never the worker, never the batch
# ================================================================================================


def test_a_node_output_postgresql_refuses_fails_its_run_and_the_window_completes(
        config: Dict[str, Any], client: RabbitMqAdapter, amqp_connection: Any, amqp_queue_name: str) -> None:
    """A valid job of a real run whose node outputs a string holding NUL, fetched in one prefetch
    window with other runs' jobs (one group commit): that run fails naming the key, the others
    complete, the worker survives. Needs the core's handling of `StoreRejected` from `commit_many`
    (commit one by one, fail the run at fault) on the batched path."""
    good = [client.start_workflow("emit", {"spec": 10}) for _ in range(2)]
    bad = client.start_workflow("emit", {"spec": "nul"})
    bad_key = client.start_workflow("emit", {"spec": "nul-key"})
    big = client.start_workflow("emit", {"spec": 2 * MB})  # 2 MB: PostgreSQL holds it
    good.append(client.start_workflow("emit", {"spec": 10}))
    run_worker(config, good + [bad, bad_key, big], dead=0)
    for run_id in good:
        result = client.wait_for_result(run_id, timeout=5)
        assert result.status == "completed" and result.context["measure"] == 10, (result.status, result.errors)
    result = client.wait_for_result(big, timeout=5)
    assert result.status == "completed" and result.context["measure"] == 2 * MB, (result.status, result.errors)
    for run_id in (bad, bad_key):
        result = client.wait_for_result(run_id, timeout=5)
        assert result.status == "failed", result.status
        message = " ".join(e.message for e in result.errors)
        assert "make" in message and ("NUL" in message or "\\u0000" in message), message
        assert client.store.read_context(run_id, ["make"]) == {}  # nothing of the refused commit written
    assert_queue_drained(client)


def test_a_single_job_whose_output_postgresql_refuses_fails_its_run(
        config: Dict[str, Any], client: RabbitMqAdapter, amqp_connection: Any, amqp_queue_name: str) -> None:
    """The same refusal on the one-job path (prefetch 1): the run fails, the worker goes on."""
    bad = client.start_workflow("emit", {"spec": "nul"})
    good = client.start_workflow("chain", {"start": 21})
    run_worker(dict(config, prefetch=1), [bad, good], dead=0)
    chain_ok(client, good)
    result = client.wait_for_result(bad, timeout=5)
    assert result.status == "failed"
    assert any("NUL" in e.message or "\\u0000" in e.message for e in result.errors), result.errors
    assert_queue_drained(client)


def _stored_run(store: PostgresRunStore, run_id: str = "victim") -> RunRecord:
    store.create_run(RunRecord(run_id, "emit", version=1), {"spec": 1}, {}, [])
    return store.get_record(run_id)


@pytest.mark.parametrize("value, fragment", [
    pytest.param("a\x00b", "\\u0000", id="nul-in-string"),
    pytest.param({"k\x00": 1}, "\\u0000", id="nul-in-key"),
    pytest.param(float("nan"), "NaN", id="nan"),
    pytest.param(math.inf, "Infinity", id="infinity"),
    pytest.param(10 ** 5000, "not encodable as JSON", id="int-too-long-for-json"),
    pytest.param({1j}, "not encodable as JSON", id="not-json"),
])
def test_the_store_refuses_what_postgresql_cannot_hold(value: Any, fragment: str, client: RabbitMqAdapter) -> None:
    """`commit`, `commit_many` and `create_run` raise `StoreRejected` naming the run and the key,
    nothing is written, and the same connection serves the next commit (not an outage)."""
    store = client.store
    record = _stored_run(store)
    other = _stored_run(store, "bystander")
    pid = store.backend_pid
    commit = Commit("victim", record.version, record, context_set={"fine": 1, "bad": value})
    with pytest.raises(StoreRejected) as raised:
        store.commit(commit)
    assert raised.value.run_id == "victim"
    assert "'victim'" in str(raised.value) and "context key 'bad'" in str(raised.value) and fragment in str(raised.value)
    assert "\x00" not in str(raised.value)
    with pytest.raises(StoreRejected):
        store.commit_many([commit, Commit("bystander", other.version, other, context_set={"x": 1})])
    with pytest.raises(StoreRejected) as raised:
        store.create_run(RunRecord("new-run", "emit", version=1), {"bad": value}, {}, [])
    assert raised.value.run_id == "new-run" and "context key 'bad'" in str(raised.value)
    assert store.get_record("new-run") is None
    assert store.read_all_context("victim") == {"spec": 1} and store.read_all_context("bystander") == {"spec": 1}
    assert store.commit_many([Commit("victim", record.version, record, context_set={"fine": 1}),
                              Commit("bystander", other.version, other, context_set={"x": 1})]) == [True, True]
    assert store.backend_pid == pid


def test_a_run_id_too_long_for_the_index_is_refused_not_an_outage(client: RabbitMqAdapter) -> None:
    """PostgreSQL's program limits (class 54) are `OperationalError`s in psycopg2, as a lost
    connection is: a run id over the btree limit must be refused at once, not reconnected for."""
    store = client.store
    pid = store.backend_pid
    run_id = os.urandom(10_000).hex()  # random: PostgreSQL would compress a repetitive one below the limit
    started = time.monotonic()
    with pytest.raises(StoreRejected, match="the run id, too long .*index row") as raised:
        store.create_run(RunRecord(run_id, "emit", version=1), {}, {}, [])
    assert raised.value.run_id == run_id
    assert len(str(raised.value)) < 1000  # the id is named, cut
    assert time.monotonic() - started < 5 and store.backend_pid == pid
    assert store.get_record(run_id) is None


def test_a_result_too_large_for_postgresql_is_refused_not_an_outage(client: RabbitMqAdapter) -> None:
    """A statement whose result PostgreSQL cannot build (a program limit, class 54, which psycopg2
    files under `OperationalError`) is refused at once: before, it was taken for a lost connection,
    reconnected for, run again and reported as `StoreUnavailable`."""
    store = client.store
    pid = store.backend_pid
    with pytest.raises(StoreRejected, match="requested length too large"):
        store._run(lambda cur: cur.execute("SELECT repeat('xx', 600000000)"))  # checked before allocating
    assert store.backend_pid == pid and store.run_ids() == []


def test_a_nul_run_id_at_start_is_refused(client: RabbitMqAdapter) -> None:
    with pytest.raises(StoreRejected, match="the run id"):
        client.store.create_run(RunRecord("a\x00b", "emit", version=1), {}, {}, [])


@pytest.mark.slow
def test_a_value_over_postgresqls_jsonb_limit_is_refused_not_an_outage(config: Dict[str, Any]) -> None:
    """A 270 MB node output (over JSONB's 256 MB per string) used to be retried as an outage
    forever: now the commit is refused once (no reconnect), naming the run and the key."""
    code = f"""
        import json, time
        from flowcraft.errors import StoreRejected
        from flowcraft.ports import Commit, RunRecord
        from flowcraft_rabbitmq import PostgresRunStore
        config = json.loads({json.dumps(config)!r})
        store = PostgresRunStore(config["postgres_dsn"], config["context_table_name"], config["status_table_name"])
        store.create_run(RunRecord("huge", "emit", version=1), {{}}, {{}}, [])
        record = store.get_record("huge")
        pid = store.backend_pid
        started = time.monotonic()
        try:
            store.commit(Commit("huge", record.version, record, context_set={{"make": "x" * 270_000_000}}))
        except StoreRejected as error:
            print("REJECTED", error.run_id, str(error)[:300])
        print("SAME_CONNECTION", store.backend_pid == pid, "SECONDS", round(time.monotonic() - started, 1))
        print("STORED", store.read_all_context("huge"))
    """
    result = run_bounded(code, timeout=240, memory_mb=6000)
    assert result.ok, result.describe()
    assert "REJECTED huge" in result.stdout and "context key 'make'" in result.stdout, result.describe()
    assert "jsonb" in result.stdout and "SAME_CONNECTION True" in result.stdout and "STORED {}" in result.stdout


# ================================================================================================
# Item 11: identifiers match whole
# ================================================================================================


@pytest.mark.parametrize("bad", ["x_runs\n", "x_runs\r\n", "x\n_runs", "x_runs\x00"])
def test_validate_identifier_refuses_a_trailing_newline(bad: str, postgres_dsn: str, pg_table_prefix: str,
                                                        pg_conn: Any) -> None:
    with pytest.raises(ValueError, match=r"invalid runs table name .*use 1-63 letters, digits or underscores"):
        validate_identifier(bad, "runs table name")
    with pytest.raises(ValueError, match="invalid runs table name"):
        PostgresRunStore(postgres_dsn, f"{pg_table_prefix}contexts", f"{pg_table_prefix}statuses",
                         runs_table_name=pg_table_prefix + bad)
    with pg_conn.cursor() as cur:  # refused before anything was created
        cur.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE %s", (pg_table_prefix + "%",))
        assert cur.fetchone()[0] == 0
    pg_conn.rollback()
    assert validate_identifier("x_runs") == "x_runs"
