"""Concurrency limits (SPEC 14) on the in-memory fakes and in memory: `config.concurrencyKey` with
`config.maxConcurrency` N lets at most N executions with the same key run at once, across every
worker; a job over the limit goes back to the queue (not an attempt, not a failure); a dead holder's
slot expires; mistakes in the key or the limit are clear errors naming the node."""
from __future__ import annotations

import threading
import time
from typing import Any, List

import pytest

from flowcraft import BlueprintError, FlowRuntime, NodeContext, WorkflowBlueprint, create_flow
from flowcraft.distributed import DistributedAdapter
from flowcraft.limits import SLOT_PREFIX, ConcurrencySlots, PortableSlots
from flowcraft.testing import InMemoryAdapter, InMemoryCoordinationStore, InMemoryQueue, InMemoryRunStore
from limits_scenarios import Spans, limited_fan


def runtime_of(*flows: Any) -> FlowRuntime:
    runtime = FlowRuntime()
    for flow in flows:
        runtime.add_blueprint(flow)
    return runtime


def workers(runtime: FlowRuntime, count: int, threads: int, coordination: Any = None, **options: Any) -> List[DistributedAdapter]:
    """`count` workers of `threads` threads over one queue, run store and coordination store."""
    queue, store = InMemoryQueue(), InMemoryRunStore()
    coordination = coordination if coordination is not None else InMemoryCoordinationStore()
    options.setdefault("concurrency_retry_delay", 0.01)
    return [DistributedAdapter(runtime, queue, store, coordination, threads=threads, poll_timeout=0.02, **options)
            for _ in range(count)]


def run_on(adapters: List[DistributedAdapter], blueprint_id: str, context: Any = None, timeout: float = 30) -> Any:
    for adapter in adapters:
        adapter.start()
    try:
        return adapters[0].wait_for_result(adapters[0].start_workflow(blueprint_id, context), timeout=timeout)
    finally:
        for adapter in adapters:
            adapter.stop(timeout=10)


# --- distributed, on the fakes ----------------------------------------------------------------


@pytest.mark.parametrize("limit, fetch_batch", [(1, None), (2, None), (2, 4)])
def test_never_more_than_the_limit_run_at_once_across_workers(limit: int, fetch_batch: Any) -> None:
    """`fetch_batch`: each fetch takes several jobs, whose slots are taken in one call per wave."""
    spans = Spans()
    flow = limited_fan(f"fan{limit}", 8, spans.body(0.03), limit=limit)
    adapters = workers(runtime_of(flow), count=3, threads=3, fetch_batch=fetch_batch)
    result = run_on(adapters, flow.id)
    assert result.status == "completed", result.errors
    assert spans.peak() == limit  # the limit is reached (9 threads want 8 at once) and never passed
    assert len(spans.spans) == 8  # each node ran once
    assert spans.attempts == [1] * 8  # being put back is not an attempt
    assert result.context == flow.run(runtime_of(flow)).context  # ends as in memory
    assert adapters[0].queue.dead == []  # type: ignore[attr-defined]
    assert adapters[0].coordination._data == {}  # every slot was given back  # type: ignore[union-attr]


def test_different_keys_do_not_wait_for_each_other() -> None:
    """Each node's key is its input's tenant; two tenants with a limit of 1 each meet at a barrier of two."""
    barrier = threading.Barrier(2, timeout=10)

    def meet(ctx: NodeContext) -> str:
        barrier.wait()
        return ctx.input["tenant"]

    flow = (create_flow("tenants").node("start", lambda ctx: 0)
            .node("a", meet, inputs={"tenant": "ta"}, concurrency_key="input.tenant", max_concurrency=1)
            .node("b", meet, inputs={"tenant": "tb"}, concurrency_key="input.tenant", max_concurrency=1)
            .edge("start", "a").edge("start", "b"))
    result = run_on(workers(runtime_of(flow), count=1, threads=2), flow.id, {"ta": "acme", "tb": "globex"})
    assert result.status == "completed", result.errors
    assert (result.context["a"], result.context["b"]) == ("acme", "globex")


def test_a_key_read_from_the_context_is_loaded_with_the_node() -> None:
    """`concurrencyKey: "region"` names a context key the node does not otherwise read."""
    spans = Spans()
    flow = limited_fan("byregion", 4, spans.body(0.02), key="region", limit=1)
    result = run_on(workers(runtime_of(flow), count=2, threads=2), flow.id, {"region": "eu"})
    assert result.status == "completed", result.errors
    assert spans.peak() == 1


def test_a_node_longer_than_the_ttl_keeps_its_slot() -> None:
    """The holder renews its slot while its node runs: with a 0.2 s TTL, 0.5 s nodes never overlap."""
    spans = Spans()
    flow = limited_fan("long", 3, spans.body(0.5), limit=1)
    result = run_on(workers(runtime_of(flow), count=2, threads=2, concurrency_slot_ttl=0.2), flow.id)
    assert result.status == "completed", result.errors
    assert spans.peak() == 1


def test_a_dead_holders_slot_comes_back_after_its_ttl() -> None:
    now = [1000.0]
    coordination = InMemoryCoordinationStore(clock=lambda: now[0])
    # a worker that took the only slot and died: it never renews nor releases it
    assert PortableSlots(coordination).acquire_slot(SLOT_PREFIX + "payments", "dead-worker", 1, 30.0) == 0
    spans = Spans()
    flow = limited_fan("dead", 1, spans.body(0.0), limit=1)
    adapters = workers(runtime_of(flow), count=1, threads=2, coordination=coordination)
    adapters[0].start()
    try:
        run_id = adapters[0].start_workflow(flow.id)
        time.sleep(0.3)
        assert spans.spans == []  # the node waits for the slot (put back again and again)
        assert adapters[0].get_status(run_id).status == "running"  # type: ignore[union-attr]
        now[0] += 31  # the dead holder's TTL passes
        result = adapters[0].wait_for_result(run_id, timeout=10)
    finally:
        adapters[0].stop(timeout=10)
    assert result.status == "completed", result.errors
    assert spans.attempts == [1]


def test_slots_are_renewed_and_released() -> None:
    now = [0.0]
    coordination = InMemoryCoordinationStore(clock=lambda: now[0])
    slots = ConcurrencySlots(coordination, ttl=10.0)
    first, second = slots.acquire("k", 2), slots.acquire("k", 2)
    assert first is not None and second is not None and slots.acquire("k", 2) is None
    now[0] = 8.0
    slots.backend.renew_slots([first], 10.0)  # what the renewer does every third of the TTL
    now[0] = 12.0  # `second` was not renewed: expired; `first` holds until 18
    third = slots.acquire("k", 2)
    assert third is not None and slots.acquire("k", 2) is None
    slots.release([first, None])
    assert slots.acquire("k", 2) is not None and slots.acquire("k", 2) is None
    assert first not in slots.held() and len(slots.held()) == 3  # (`second` is renewed in vain until released)


def test_over_limit_jobs_are_neither_attempts_nor_failures() -> None:
    """Retries configured, events recorded: the puts back show as `job:enqueued`, never as
    `node:retry` or `job:failed`, and every node starts at attempt 1."""
    events: List[Any] = []
    spans = Spans()
    flow = limited_fan("noattempts", 6, spans.body(0.02), limit=1, max_retries=3)
    runtime = runtime_of(flow)
    runtime.event_bus = type("Bus", (), {"emit": lambda self, e: events.append(e)})()
    result = run_on(workers(runtime, count=1, threads=3), flow.id)
    assert result.status == "completed", result.errors
    kinds = {e.type for e in events}
    assert "node:retry" not in kinds and "job:failed" not in kinds
    assert spans.attempts == [1] * 6
    put_back = [e for e in events if e.type == "job:enqueued" and e.payload.get("delay")]
    assert put_back and all(e.payload["attempt"] == 1 for e in put_back)


def test_a_key_that_is_not_a_string_or_a_number_fails_the_node() -> None:
    flow = create_flow("badkey").node("a", lambda ctx: 1, concurrency_key="input", max_concurrency=1)
    adapter = InMemoryAdapter(runtime_of(flow))
    run_id = adapter.start_workflow(flow.id)
    adapter.work(burst=True)
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "failed"
    [error] = result.errors
    assert (error.node_id, error.type) == ("a", "ConcurrencyKeyError")
    assert "node 'a': concurrencyKey 'input' gave NoneType None, not a string or a whole number" in error.message
    assert flow.run(runtime_of(flow)).errors[0].message == error.message  # as in memory


def test_a_limited_node_without_a_coordination_store_fails_saying_so() -> None:
    flow = create_flow("nocoord").node("a", lambda ctx: 1, concurrency_key="'k'", max_concurrency=1)
    adapter = DistributedAdapter(runtime_of(flow), InMemoryQueue(), InMemoryRunStore(), None)
    run_id = adapter.start_workflow(flow.id)
    adapter.work(burst=True)
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "failed"
    assert "has a concurrencyKey, and this worker has no coordination store" in result.errors[0].message


# --- in memory --------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2])
def test_in_memory_threads_honour_the_limit(limit: int) -> None:
    spans, free = Spans(), Spans()
    flow = limited_fan(f"mem{limit}", 8, spans.body(0.02), limit=limit, free=free.body(0.02))
    result = flow.run(runtime_of(flow), concurrency=6)
    assert result.status == "completed", result.errors
    assert result.context["end"] == 9
    assert spans.peak() == limit
    assert free.spans[0][0] < spans.spans[-1][0]  # the unlimited node did not wait behind the limited ones


# --- the blueprint ----------------------------------------------------------------------------


def test_builder_keywords_round_trip_on_the_wire() -> None:
    flow = create_flow("wire").node("a", lambda ctx: 1, concurrency_key="input.customer_id", max_concurrency=3,
                                    max_retries=2)
    wire = flow.to_blueprint().to_dict()
    assert wire["nodes"][0]["config"] == {"maxRetries": 2, "concurrencyKey": "input.customer_id", "maxConcurrency": 3}
    again = WorkflowBlueprint.from_dict(wire)
    assert again.to_dict() == wire
    config = again.nodes[0].settings
    assert (config.concurrency_key, config.max_concurrency) == ("input.customer_id", 3)


@pytest.mark.parametrize("config, message", [
    ({"concurrencyKey": "input..customer", "maxConcurrency": 2},
     "node 'a': concurrencyKey 'input..customer' cannot be parsed"),
    ({"concurrencyKey": "__import__('os')", "maxConcurrency": 2}, "node 'a': concurrencyKey \"__import__('os')\" cannot be parsed"),
    ({"concurrencyKey": "'k'", "maxConcurrency": 0}, "node 'a': maxConcurrency must be a whole number >= 1, not 0"),
    ({"concurrencyKey": "'k'", "maxConcurrency": 1.5}, "node 'a': maxConcurrency must be a whole number >= 1, not 1.5"),
    ({"concurrencyKey": "'k'", "maxConcurrency": True}, "node 'a': maxConcurrency must be a whole number >= 1, not True"),
    ({"concurrencyKey": "'k'"}, "node 'a': concurrencyKey \"'k'\" needs a maxConcurrency"),
    ({"maxConcurrency": 2}, "node 'a': maxConcurrency needs a concurrencyKey"),
    ({"concurrencyKey": 7, "maxConcurrency": 2}, "node 'a': concurrencyKey must be a non-empty expression string, not 7"),
])
def test_mistakes_in_the_limit_are_refused_when_compiled_naming_the_node(config: Any, message: str) -> None:
    blueprint = {"id": "bad", "nodes": [{"id": "a", "uses": "x", "config": config}], "edges": []}
    with pytest.raises(BlueprintError) as raised:
        FlowRuntime().graph(blueprint)
    assert len(raised.value.problems) == 1, raised.value.problems
    assert message in raised.value.problems[0]
