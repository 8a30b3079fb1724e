"""Routing (SPEC 14) on the real backends: a node routed to queue B runs only on a worker serving
B, and the run ends with the context the in-memory runtime gives; a worker serving [A, B] takes
A's jobs first; the reconciler counts jobs waiting on a queue nobody serves.

Each test isolates itself as the adapters' own integration tests do: a Redis key prefix, its own
RabbitMQ queue names (deleted afterwards) and PostgreSQL tables.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator, List, Sequence

import pytest

from flowcraft import Flow, FlowRuntime, create_flow

pytestmark = pytest.mark.integration


class Seen:
    """Which nodes ran, in order (the workers run in this process)."""

    def __init__(self) -> None:
        self.calls: List[str] = []
        self._lock = threading.Lock()

    def note(self, name: str) -> None:
        with self._lock:
            self.calls.append(name)


SEEN = Seen()


def node_a(ctx: Any) -> int:
    SEEN.note("a")
    return 1


def node_b(ctx: Any) -> int:
    SEEN.note("b")
    return ctx.input + 1


def node_c(ctx: Any) -> int:
    SEEN.note("c")
    return ctx.input * 10


def on_first(ctx: Any) -> str:
    SEEN.note("first")
    return "first"


def on_second(ctx: Any) -> str:
    SEEN.note("second")
    return "second"


def chain(queue: str) -> Flow:
    return (create_flow("routed").node("a", node_a).node("b", node_b, queue=queue).node("c", node_c)
            .edge("a", "b").edge("b", "c"))


def priority_flows(first: str, second: str) -> List[Flow]:
    return [create_flow("on_first").node("x", on_first, queue=first),
            create_flow("on_second").node("y", on_second, queue=second)]


def runtime_of(flows: Sequence[Flow]) -> FlowRuntime:
    runtime = FlowRuntime()
    for flow in flows:
        runtime.add_blueprint(flow)
    return runtime


def burst_until(adapters: Sequence[Any], done: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        for adapter in adapters:
            adapter.work(burst=True)


# --- one factory per backend: make(flows, queues=None, **options) -> adapter --------------------


@pytest.fixture
def redis_make(redis_client: Any, redis_prefix: str) -> Iterator[Callable[..., Any]]:
    from flowcraft_redis import RedisAdapter, create_redis_reconciler

    made: List[Any] = []

    def make(flows: Sequence[Flow], **options: Any) -> Any:
        options.setdefault("poll_timeout", 0.2)
        adapter = RedisAdapter(runtime_of(flows), redis_client, queue_name="jobs", prefix=redis_prefix, **options)
        made.append(adapter)
        return adapter

    make.names = lambda name: name  # type: ignore[attr-defined]  # the prefix isolates every queue
    make.reconciler = lambda adapter: create_redis_reconciler(adapter, stalled_threshold_seconds=3600)  # type: ignore[attr-defined]
    yield make
    for adapter in made:
        adapter.stop(timeout=5)
        adapter.queue.close()


@pytest.fixture
def rq_make(redis_client: Any, redis_prefix: str) -> Iterator[Callable[..., Any]]:
    import uuid

    from flowcraft_redis import RqAdapter, create_redis_reconciler
    from test_rq_adapter import delete_rq_queue

    made: List[Any] = []
    tag = uuid.uuid4().hex[:8]  # RQ's keys are RQ's (no prefix): every queue of this test is its own

    def make(flows: Sequence[Flow], **options: Any) -> Any:
        options.setdefault("poll_timeout", 0.1)
        options.pop("fetch_batch", None)  # (an RQ worker takes one job at a time)
        options.setdefault("queue_name", f"jobs-{tag}")
        adapter = RqAdapter(runtime_of(flows), redis_client, prefix=redis_prefix, retry_intervals=(0, 0, 0), **options)
        made.append(adapter)
        return adapter

    make.names = lambda name: f"{name}-{tag}"  # type: ignore[attr-defined]
    make.reconciler = lambda adapter: create_redis_reconciler(adapter, stalled_threshold_seconds=3600)  # type: ignore[attr-defined]
    yield make
    for adapter in made:
        adapter.close()
    for name in ("jobs", "A", "B"):
        delete_rq_queue(redis_client, f"{name}-{tag}")


@pytest.fixture
def rabbit_make(amqp_url: str, postgres_dsn: str, redis_url: str, redis_prefix: str, amqp_queue_name: str,
                pg_table_prefix: str) -> Iterator[Callable[..., Any]]:
    import redis
    from conftest import _amqp_connect, delete_amqp_queues
    from flowcraft_rabbitmq import RabbitMqAdapter, RedisCoordinationStore, create_rabbitmq_reconciler

    made: List[Any] = []
    tables = {"context_table_name": f"{pg_table_prefix}contexts", "status_table_name": f"{pg_table_prefix}statuses"}

    def make(flows: Sequence[Flow], **options: Any) -> Any:
        coordination = RedisCoordinationStore(redis.Redis.from_url(redis_url), prefix=redis_prefix)
        adapter = RabbitMqAdapter(runtime_of(flows), coordination, amqp_url, postgres_dsn, queue_name=amqp_queue_name,
                                  poll_timeout=0.2, **dict(tables, **options))
        made.append(adapter)
        return adapter

    make.names = lambda name: f"{amqp_queue_name}-{name}"  # type: ignore[attr-defined]
    make.reconciler = lambda adapter: create_rabbitmq_reconciler(  # type: ignore[attr-defined]
        adapter=adapter, status_table_name=tables["status_table_name"], stalled_threshold_seconds=3600)
    yield make
    for adapter in made:
        adapter.close()
        adapter.coordination.client.close()
    connection = _amqp_connect(amqp_url)
    try:
        delete_amqp_queues(connection, [f"{amqp_queue_name}-{n}{s}" for n in ("A", "B") for s in ("", ".dead", ".delay")])
    finally:
        connection.close()


BACKENDS = ["redis_make", "rq_make", "rabbit_make"]
RABBIT: List[Any] = []  # the RabbitMQ factory of the running test, if it is one


@pytest.fixture(params=BACKENDS)
def make(request: pytest.FixtureRequest) -> Callable[..., Any]:
    SEEN.calls.clear()
    factory = request.getfixturevalue(request.param)
    RABBIT[:] = [factory] if request.param == "rabbit_make" else []
    return factory


def test_a_routed_node_runs_only_on_a_worker_serving_its_queue(make: Callable[..., Any]) -> None:
    queue_b = make.names("B")  # type: ignore[attr-defined]
    flows = [chain(queue_b)]
    expected = runtime_of(flows).run("routed").context
    SEEN.calls.clear()
    default = make(flows)
    run_id = default.start_workflow("routed")
    burst_until([default], lambda: SEEN.calls == ["a"])
    default.work(burst=True)
    assert SEEN.calls == ["a"]  # b waits on B
    assert default.get_status(run_id).status == "running"
    assert default.queue.depth(queue_b) == 1
    assert make.reconciler(default).run().unserved == 1  # type: ignore[attr-defined]

    b_worker = make(flows, queues=[queue_b])
    burst_until([b_worker], lambda: "b" in SEEN.calls)
    burst_until([default, b_worker], lambda: default.get_status(run_id).status != "running")
    assert SEEN.calls == ["a", "b", "c"]
    result = default.wait_for_result(run_id, timeout=10)
    assert result.status == "completed", result.errors
    assert result.context == expected


def test_a_worker_serving_two_queues_takes_the_first_ones_jobs_first(make: Callable[..., Any]) -> None:
    first, second = make.names("A"), make.names("B")  # type: ignore[attr-defined]
    flows = priority_flows(first, second)
    client = make(flows)
    runs = [client.start_workflow("on_second") for _ in range(3)] + [client.start_workflow("on_first") for _ in range(3)]
    # one job per fetch; RabbitMQ pushes deliveries within the worker's window, which follows its
    # fetch size: with a window of one it alternates between the queues, so priority holds among
    # the deliveries a worker holds (here: a window of 10)
    worker = make(flows, queues=[first, second], fetch_batch=10 if make in RABBIT else 1)
    burst_until([worker], lambda: len(SEEN.calls) == 6)
    assert SEEN.calls == ["first"] * 3 + ["second"] * 3
    for run_id in runs:
        assert client.wait_for_result(run_id, timeout=10).status == "completed"
    if make not in RABBIT:  # (the broker names no worker: it counts the consumers of each queue)
        serving = make(flows, queues=[first, second])  # a running worker (RQ's leave when a burst ends)
        serving.start()
        try:
            deadline = time.monotonic() + 10
            while not any(tuple(w.queues) == (first, second) for w in client.live_workers() or []):
                assert time.monotonic() < deadline, client.live_workers()
                time.sleep(0.05)
        finally:
            serving.stop(timeout=10)


def test_rq_a_routed_jobs_unrouted_successor_goes_to_its_enqueuers_default_queue(rq_make: Callable[..., Any]) -> None:
    SEEN.calls.clear()
    queue_b = rq_make.names("B")  # type: ignore[attr-defined]
    flows = [chain(queue_b)]
    default = rq_make(flows)
    run_id = default.start_workflow("routed")
    burst_until([default], lambda: SEEN.calls == ["a"])
    # a worker whose own default queue is B: c still goes to the default queue of the run's client
    b_only = rq_make(flows, queue_name=queue_b)
    burst_until([b_only], lambda: "b" in SEEN.calls)
    b_only.work(burst=True)
    assert SEEN.calls == ["a", "b"]
    assert default.queue.depth() == 1 and default.queue.depth(queue_b) == 0
    burst_until([default], lambda: default.get_status(run_id).status != "running")
    assert default.wait_for_result(run_id, timeout=10).context == runtime_of(flows).run("routed").context


def test_rq_refuses_a_queue_name_rq_cannot_use(rq_make: Callable[..., Any]) -> None:
    from flowcraft.routing import RoutingError

    adapter = rq_make([chain("no,commas")])  # RQ keeps a worker's queues as one comma-separated field
    with pytest.raises(RoutingError, match="node 'b'"):
        adapter.start_workflow("routed")
