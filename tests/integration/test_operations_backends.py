"""SPEC section 11 on the real backends: the scenarios of tests/operations_scenarios.py (retry,
restart_from, skip / patch_context, prune, run lists, dead letters) on Redis, RQ and
RabbitMQ + PostgreSQL, each isolated by the fixtures of tests/conftest.py."""
from __future__ import annotations

import os
import sys
import uuid
from typing import Any, Callable, Iterator, List

import pytest

from flowcraft import FlowRuntime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.operations_scenarios import (SCENARIOS, dead_letter_listed_and_requeued,  # noqa: E402
                                        requeued_dead_letter_retries_the_run_it_failed)


def _drain(adapter: Any) -> None:
    for _ in range(3):  # a burst works until the queue is empty; jobs published by the last commit too
        adapter.work(burst=True)


@pytest.fixture
def redis_make(redis_client: Any, redis_prefix: str) -> Iterator[Callable[[FlowRuntime], Any]]:
    from flowcraft_redis import RedisAdapter

    queue_name = f"fcops-{uuid.uuid4().hex[:8]}"
    made: List[Any] = []

    def make(runtime: FlowRuntime) -> Any:
        adapter = RedisAdapter(runtime, redis_client, prefix=redis_prefix, queue_name=queue_name, poll_timeout=0.1)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.queue.close()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_redis(redis_make: Any, name: str) -> None:
    SCENARIOS[name](redis_make, _drain)


def test_redis_dead_letters(redis_make: Any) -> None:
    dead_letter_listed_and_requeued(redis_make, _drain, lambda adapter, body: adapter.queue.push_raw(body))


def test_redis_requeued_dead_letter_retries_its_run(redis_make: Any) -> None:
    requeued_dead_letter_retries_the_run_it_failed(redis_make, _drain, lambda adapter, body: adapter.queue.push_raw(body))


def test_redis_index_follows_status_and_prune_deletes_every_key(redis_make: Any, redis_client: Any,
                                                                 redis_prefix: str) -> None:
    from flowcraft import create_flow

    runtime = FlowRuntime()
    runtime.add_blueprint(create_flow("ix").node("a", lambda ctx: 1))
    adapter = redis_make(runtime)
    run_id = adapter.start_workflow("ix", {})
    assert redis_client.zscore(f"{redis_prefix}flowcraft:runs:active", run_id) is not None
    _drain(adapter)
    assert redis_client.zscore(f"{redis_prefix}flowcraft:runs:active", run_id) is None
    assert redis_client.zscore(f"{redis_prefix}flowcraft:runs:completed", run_id) is not None
    assert adapter.prune(0) == 1
    left = [k for k in redis_client.scan_iter(match=f"{redis_prefix}*") if run_id.encode() in k]
    assert left == []
    assert redis_client.zscore(f"{redis_prefix}flowcraft:runs:all", run_id) is None


# --- RQ -----------------------------------------------------------------------------------------


@pytest.fixture
def rq_make(redis_client: Any, redis_prefix: str) -> Iterator[Callable[[FlowRuntime], Any]]:
    from flowcraft_redis import RqAdapter

    from tests.integration.test_rq_adapter import delete_rq_queue

    queue_name = f"fcopsrq-{uuid.uuid4().hex[:8]}"
    made: List[Any] = []

    def make(runtime: FlowRuntime) -> Any:
        adapter = RqAdapter(runtime, redis_client, queue_name=queue_name, prefix=redis_prefix, poll_timeout=0.1,
                            retry_intervals=(0, 0, 0))
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()
    delete_rq_queue(redis_client, queue_name)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_rq(rq_make: Any, name: str) -> None:
    SCENARIOS[name](rq_make, _drain)


def _rq_push_raw(adapter: Any, body: bytes) -> None:
    from flowcraft_redis.rq_queue import RUN_NODE

    adapter.queue.rq.enqueue(RUN_NODE, body.decode())


def test_rq_dead_letters(rq_make: Any) -> None:
    dead_letter_listed_and_requeued(rq_make, _drain, _rq_push_raw)


def test_rq_a_failed_node_is_a_failed_rq_job(rq_make: Any) -> None:
    from flowcraft import create_flow

    def boom(ctx: Any) -> Any:
        raise RuntimeError("flaky dependency")

    runtime = FlowRuntime()
    runtime.add_blueprint(create_flow("rqfail").node("a", boom))
    adapter = rq_make(runtime)
    run_id = adapter.start_workflow("rqfail", {})
    _drain(adapter)
    assert adapter.get_status(run_id).status == "failed"
    registry = adapter.queue.rq.failed_job_registry
    assert registry.count == 1  # what `rq info` counts as failed
    rq_job = adapter.queue.rq.fetch_job(registry.get_job_ids()[0])
    assert "flaky dependency" in (rq_job.latest_result().exc_string or "") and "in boom" in rq_job.latest_result().exc_string
    assert adapter.dead_letters() == []  # a failed node is no dead letter


# --- RabbitMQ + PostgreSQL ------------------------------------------------------------------------


@pytest.fixture
def rabbit_make(amqp_url: str, postgres_dsn: str, redis_url: str, redis_prefix: str, amqp_queue_name: str,
                pg_table_prefix: str) -> Iterator[Callable[[FlowRuntime], Any]]:
    import redis

    from flowcraft_rabbitmq import RabbitMqAdapter
    from flowcraft_redis import RedisCoordinationStore

    made: List[Any] = []

    def make(runtime: FlowRuntime) -> Any:
        adapter = RabbitMqAdapter(
            runtime, RedisCoordinationStore(redis.Redis.from_url(redis_url), prefix=redis_prefix), amqp_url,
            postgres_dsn, queue_name=amqp_queue_name, poll_timeout=0.2,
            context_table_name=f"{pg_table_prefix}contexts", status_table_name=f"{pg_table_prefix}statuses")
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()
        adapter.coordination.client.close()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_rabbitmq(rabbit_make: Any, name: str) -> None:
    SCENARIOS[name](rabbit_make, _drain)


def test_rabbitmq_dead_letters(rabbit_make: Any) -> None:
    dead_letter_listed_and_requeued(rabbit_make, _drain, lambda adapter, body: adapter.queue.publish_raw(body))


def test_rabbitmq_requeued_dead_letter_retries_its_run(rabbit_make: Any) -> None:
    requeued_dead_letter_retries_the_run_it_failed(rabbit_make, _drain, lambda adapter, body: adapter.queue.publish_raw(body))


def test_rabbitmq_listing_dead_letters_loses_none(rabbit_make: Any) -> None:
    runtime = FlowRuntime()
    adapter = rabbit_make(runtime)
    for i in range(5):
        adapter.queue.publish_raw(f"junk {i}".encode())
    _drain(adapter)
    first = adapter.dead_letters(limit=2)
    assert [d.body for d in first] == [b"junk 0", b"junk 1"]
    assert [d.body for d in adapter.dead_letters()] == [f"junk {i}".encode() for i in range(5)]
    assert adapter.queue.message_counts()[2] == 5
    assert adapter.purge_dead_letters() == 5


def test_postgres_list_runs_uses_the_status_index(rabbit_make: Any, pg_conn: Any, pg_table_prefix: str) -> None:
    from psycopg2 import sql

    rabbit_make(FlowRuntime())  # ensure_schema
    with pg_conn.cursor() as cur:
        cur.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", (f"{pg_table_prefix}statuses",))
        defs = " | ".join(d for _, d in cur.fetchall())
        assert "(status, updated_at DESC, run_id DESC)" in defs and "(updated_at DESC, run_id DESC)" in defs
        cur.execute(sql.SQL("SELECT column_name FROM information_schema.columns WHERE table_name = %s"),
                    (f"{pg_table_prefix}statuses",))
        assert {r[0] for r in cur.fetchall()} == {"run_id", "status", "updated_at", "result", "created_at"}


def test_rq_requeued_dead_letter_retries_its_run(rq_make: Any) -> None:
    from flowcraft_redis.rq_queue import RUN_NODE

    def push_first(adapter: Any, body: bytes) -> None:
        # Before the run's own jobs, as the list queue does, and with the adapter's settings (its
        # prefix), as any Flowcraft enqueuer sets them: without them the job is for another store.
        adapter.queue.rq.enqueue(RUN_NODE, body.decode(), at_front=True, meta=adapter.queue._meta)

    requeued_dead_letter_retries_the_run_it_failed(rq_make, _drain, push_first)
