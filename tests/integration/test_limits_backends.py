"""Concurrency limits (SPEC 14) on the real backends, with the slots in Redis: four workers of four
threads (RQ: sixteen one-thread workers) on a 1 -> 40 -> 1 fan of 100 ms nodes with `maxConcurrency: 2` never run more than two of
them at once (and finish in about 2 s), and the slot of a holder that died comes back after its TTL.

The workers are adapters in this process (their node code records its spans in one list), on this
test's own key prefix, queue and tables (the conftest fixtures)."""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

import pytest

from flowcraft import FlowRuntime
from flowcraft.limits import SLOT_PREFIX
from limits_scenarios import Spans, limited_fan

pytestmark = pytest.mark.integration


def _redis_workers(request: Any) -> Callable[..., Any]:
    import uuid

    from flowcraft_redis import RedisAdapter

    client, prefix = request.getfixturevalue("redis_client"), request.getfixturevalue("redis_prefix")
    queue_name = f"fcq-{uuid.uuid4().hex[:8]}"

    def make(runtime: FlowRuntime, **options: Any) -> Any:
        return RedisAdapter(runtime, client, queue_name=queue_name, prefix=prefix, poll_timeout=0.2, **options)

    return make


def _rq_workers(request: Any) -> Callable[..., Any]:
    import uuid

    from flowcraft_redis import RqAdapter
    from test_rq_adapter import delete_rq_queue

    client, prefix = request.getfixturevalue("redis_client"), request.getfixturevalue("redis_prefix")
    queue_name = f"fcrq-{uuid.uuid4().hex[:8]}"
    request.addfinalizer(lambda: delete_rq_queue(client, queue_name))

    def make(runtime: FlowRuntime, threads: int = 1, **options: Any) -> Any:
        # an RQ worker runs one job at a time: as many workers, one thread each
        return RqAdapter(runtime, client, queue_name=queue_name, prefix=prefix, poll_timeout=0.1,
                         retry_intervals=(0, 0, 0), **options)

    make.one_thread = True  # type: ignore[attr-defined]
    return make


def _rabbitmq_workers(request: Any) -> Callable[..., Any]:
    import redis
    from flowcraft_rabbitmq import RabbitMqAdapter, RedisCoordinationStore

    value = request.getfixturevalue
    value("amqp_connection")  # deletes the queues afterwards
    tables = value("pg_table_prefix")
    coordination = RedisCoordinationStore(redis.Redis.from_url(value("redis_url")), prefix=value("redis_prefix"))
    request.addfinalizer(coordination.client.close)

    def make(runtime: FlowRuntime, **options: Any) -> Any:
        return RabbitMqAdapter(runtime, coordination, value("amqp_url"), value("postgres_dsn"),
                               queue_name=value("amqp_queue_name"), context_table_name=tables + "contexts",
                               status_table_name=tables + "statuses", poll_timeout=0.2, **options)

    return make


BACKENDS: Dict[str, Callable[[Any], Callable[..., Any]]] = {"redis": _redis_workers, "rabbitmq": _rabbitmq_workers,
                                                             "rq": _rq_workers}


def _run(make: Callable[..., Any], flow: Any, workers: int, threads: int, timeout: float = 60) -> Any:
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    if getattr(make, "one_thread", False):
        workers, threads = workers * threads, 1
    adapters: List[Any] = [make(runtime, threads=threads) for _ in range(workers)]
    try:
        for adapter in adapters:
            adapter.start()
        began = time.monotonic()
        result = adapters[0].wait_for_result(adapters[0].start_workflow(flow.id), timeout=timeout)
        return result, time.monotonic() - began, adapters[0], f"{workers} workers x {threads} threads"
    finally:
        for adapter in adapters:
            adapter.stop(timeout=10)
        for adapter in adapters:
            adapter.close()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_four_workers_of_four_threads_run_at_most_two_at_once(backend: str, request: pytest.FixtureRequest) -> None:
    spans = Spans()
    flow = limited_fan(f"limit40-{backend}", 40, spans.body(0.1), limit=2)
    result, elapsed, adapter, shape = _run(BACKENDS[backend](request), flow, workers=4, threads=4)
    assert result.status == "completed", result.errors
    assert result.context["end"] == 40
    assert len(spans.spans) == 40 and spans.attempts == [1] * 40  # each once, puts back are no attempts
    assert spans.peak() == 2
    print(f"{backend}: 40 nodes of 100 ms, maxConcurrency 2, {shape}: {elapsed:.2f}s")
    assert not adapter.coordination.client.exists(adapter.coordination.key(SLOT_PREFIX + "payments"))  # all released


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_the_slot_of_a_holder_that_died_comes_back_after_its_ttl(backend: str, request: pytest.FixtureRequest) -> None:
    make = BACKENDS[backend](request)
    spans = Spans()
    flow = limited_fan(f"limitdead-{backend}", 2, spans.body(0.0), limit=1)
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    adapter = make(runtime, threads=2)
    # a worker took the only slot, with a 1.5 s TTL, and died: it neither renews nor releases it
    assert adapter.coordination.acquire_slots([(SLOT_PREFIX + "payments", "dead-worker", 1)], 1.5) == [True]
    try:
        adapter.start()
        began = time.monotonic()
        result = adapter.wait_for_result(adapter.start_workflow(flow.id), timeout=30)
        elapsed = time.monotonic() - began
    finally:
        adapter.stop(timeout=10)
        adapter.close()
    assert result.status == "completed", result.errors
    first_start = min(start for start, _ in spans.spans)
    print(f"{backend}: the dead holder's slot came back; the run took {elapsed:.2f}s")
    assert first_start - began >= 1.0  # nothing ran while the dead holder's slot lived
    assert spans.peak() == 1
