"""Routing (SPEC 14): `config.queue` sends a node's jobs to another queue; workers serve queues in
priority order; the reconciler reports jobs waiting on a queue no live worker serves."""
from __future__ import annotations

import json
import threading
from typing import Any, Dict, List, Sequence

import pytest

from flowcraft import BlueprintError, Flow, FlowRuntime, WorkflowBlueprint, create_flow
from flowcraft.distributed import DistributedAdapter, Reconciler
from flowcraft.ports import Job
from flowcraft.routing import RoutingError
from flowcraft.testing import InMemoryAdapter


class Seen:
    """Which worker (thread name) ran which node, in order."""

    def __init__(self) -> None:
        self.calls: List[tuple] = []
        self._lock = threading.Lock()

    def node(self, name: str, value: Any = None) -> Any:
        def run(ctx: Any) -> Any:
            with self._lock:
                self.calls.append((name, threading.current_thread().name))
            return value if value is not None else name
        return run

    def nodes(self) -> List[str]:
        return [n for n, _ in self.calls]


def _runtime(*flows: Flow) -> FlowRuntime:
    runtime = FlowRuntime()
    for flow in flows:
        runtime.add_blueprint(flow)
    return runtime


def _worker(adapter: InMemoryAdapter, queues: Sequence[str], **options: Any) -> DistributedAdapter:
    """Another worker over the same fakes, serving `queues`."""
    return DistributedAdapter(adapter.runtime, adapter.queue.serve(queues), adapter.store, **options)


def _chain(seen: Seen) -> Flow:
    return (create_flow("routed")
            .node("a", seen.node("a", 1))
            .node("b", lambda ctx: seen.node("b")(ctx) and ctx.input + 1, queue="B")
            .node("c", lambda ctx: seen.node("c")(ctx) and ctx.input * 10)
            .edge("a", "b").edge("b", "c"))


# --- the blueprint and the builder ------------------------------------------------------------


def test_the_builder_keyword_and_the_wire_round_trip_the_queue() -> None:
    blueprint = _chain(Seen()).to_blueprint()
    wire = blueprint.to_dict()
    assert [n.get("config") for n in wire["nodes"]] == [None, {"queue": "B"}, None]
    again = WorkflowBlueprint.from_dict(json.loads(json.dumps(wire)))
    assert again.to_dict() == wire
    assert again.nodes[1].settings.extra == {"queue": "B"}


def test_a_batch_keyword_routes_its_scatter_and_gather() -> None:
    flow = create_flow("b").batch("items", lambda ctx: ctx.input, input_key="xs", queue="B")
    configs = {n.id: n.config.to_dict() for n in flow.to_blueprint().nodes}
    assert configs == {"items_scatter": {"queue": "B"}, "items_gather": {"queue": "B"}}


@pytest.mark.parametrize("bad", [3, "", None, ["B"], "a\x00b"])
def test_a_queue_that_is_not_a_name_is_refused_naming_the_node(bad: Any) -> None:
    wire = {"id": "bad", "nodes": [{"id": "x", "uses": "f", "config": {"queue": bad}}], "edges": []}
    with pytest.raises(BlueprintError) as info:
        WorkflowBlueprint.from_dict(wire).validate()
    assert "node 'x'" in str(info.value) and "queue" in str(info.value)


def test_a_name_the_backend_cannot_use_fails_the_start_naming_the_node() -> None:
    adapter = InMemoryAdapter(_runtime(_chain(Seen())))
    adapter.queue.queue_name_problem = lambda name: "no such queue here"  # type: ignore[method-assign]
    with pytest.raises(RoutingError, match="node 'b': queue 'B' cannot be used: no such queue here"):
        adapter.start_workflow("routed")
    assert adapter.queue.pending == 0


def test_jobs_of_unrouted_nodes_keep_their_wire_form() -> None:
    job = Job("r", "bp", "n")
    assert job.to_json() == '{"runId":"r","blueprintId":"bp","nodeId":"n"}'
    routed = job.with_(queue="B")
    assert json.loads(routed.to_json())["queue"] == "B"
    assert Job.from_json(routed.to_json()) == routed


# --- workers and queues ----------------------------------------------------------------------


def test_a_routed_node_runs_only_on_a_worker_serving_its_queue() -> None:
    seen = Seen()
    runtime = _runtime(_chain(seen))
    expected = runtime.run("routed").context
    seen.calls.clear()
    default = InMemoryAdapter(runtime)
    run_id = default.start_workflow("routed")
    default.work(burst=True)
    assert seen.nodes() == ["a"]  # b waits on B: the default worker does not take it
    assert default.queue.depth("B") == 1 and default.queue.depth() == 0
    assert default.get_status(run_id).status == "running"

    stats = Reconciler(default, stalled_threshold_seconds=3600).run()
    assert stats.unserved == 1  # the default worker is live, nobody serves B

    b_worker = _worker(default, ["B"])
    b_worker.work(burst=True)
    assert seen.nodes() == ["a", "b"]  # c is back on the default queue
    assert Reconciler(default, stalled_threshold_seconds=3600).run().unserved == 0
    default.work(burst=True)
    assert seen.nodes() == ["a", "b", "c"]
    result = default.wait_for_result(run_id, timeout=5)
    assert result.status == "completed"
    assert result.context == expected


def test_the_reconciler_names_the_unserved_queue(caplog: pytest.LogCaptureFixture) -> None:
    adapter = InMemoryAdapter(_runtime(_chain(Seen())))
    adapter.start_workflow("routed")
    adapter.work(burst=True)
    with caplog.at_level("WARNING", logger="flowcraft.distributed"):
        assert Reconciler(adapter, stalled_threshold_seconds=3600).run().unserved == 1
    assert any("B (1)" in r.getMessage() for r in caplog.records)


def test_a_worker_serving_several_queues_takes_them_in_priority_order() -> None:
    seen = Seen()
    first = create_flow("on_a").node("x", seen.node("a"), queue="A")
    second = create_flow("on_b").node("y", seen.node("b"), queue="B")
    adapter = InMemoryAdapter(_runtime(first, second), queues=["A", "B"])
    for _ in range(3):
        adapter.start_workflow("on_b")  # B's jobs are older
    for _ in range(3):
        adapter.start_workflow("on_a")
    adapter.work(burst=True)
    assert seen.nodes() == ["a"] * 3 + ["b"] * 3
    assert adapter.queue.pending == 0


def test_a_worker_lists_every_queue_it_serves() -> None:
    adapter = InMemoryAdapter(_runtime(_chain(Seen())), queues=["B", "in-memory"])
    adapter.work(burst=True)
    (worker,) = adapter.live_workers() or []
    assert worker.queues == ("B", "in-memory") and worker.queue == "B"


def test_a_routed_batch_runs_its_items_on_its_queue() -> None:
    seen = Seen()
    flow = (create_flow("batch")
            .node("load", lambda ctx: [1, 2, 3])
            .batch("items", lambda ctx: seen.node("item")(ctx) and ctx.input * 2, input_key="load", output_key="out",
                   queue="B")
            .node("after", lambda ctx: seen.node("after")(ctx) and sum(ctx.context.get("out")))
            .edge("load", "items").edge("items", "after"))
    runtime = _runtime(flow)
    expected = runtime.run("batch").context
    seen.calls.clear()
    default = InMemoryAdapter(runtime)
    run_id = default.start_workflow("batch")
    default.work(burst=True)
    assert seen.nodes() == []  # the scatter waits on B
    _worker(default, ["B"]).work(burst=True)
    assert seen.nodes() == ["item"] * 3
    assert default.queue.depth() == 1  # "after" is on the default queue
    default.work(burst=True)
    result = default.wait_for_result(run_id, timeout=5)
    assert result.status == "completed" and result.context == expected
    assert result.context["out"] == [2, 4, 6]


def test_a_routed_node_after_a_join_runs_on_its_queue_once() -> None:
    seen = Seen()
    flow = (create_flow("join")
            .node("start", seen.node("start", 1))
            .node("left", lambda ctx: seen.node("left")(ctx) and 2)
            .node("right", lambda ctx: seen.node("right")(ctx) and 3)
            .node("join", lambda ctx: seen.node("join")(ctx) and "joined", queue="B")
            .edge("start", "left").edge("start", "right").edge("left", "join").edge("right", "join"))
    runtime = _runtime(flow)
    expected = runtime.run("join").context
    seen.calls.clear()
    default = InMemoryAdapter(runtime)
    run_id = default.start_workflow("join")
    default.work(burst=True)
    assert sorted(seen.nodes()) == ["left", "right", "start"]
    assert default.queue.depth("B") == 1
    b_worker = _worker(default, ["B"])
    b_worker.work(burst=True)
    assert seen.nodes().count("join") == 1
    result = default.wait_for_result(run_id, timeout=5)
    assert result.status == "completed" and result.context == expected


def test_queue_retries_and_timers_stay_on_the_routed_queue() -> None:
    attempts: Dict[str, int] = {"n": 0}

    def flaky(ctx: Any) -> str:
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise RuntimeError("first attempt fails")
        return "ok"

    flow = (create_flow("retry").node("flaky", flaky, queue="B", max_retries=2)
            .sleep("nap", duration=0.01).node("after", lambda ctx: "done", queue="B")
            .edge("flaky", "nap").edge("nap", "after"))
    runtime = _runtime(flow)
    default = InMemoryAdapter(runtime, retry_mode="queue")
    run_id = default.start_workflow("retry")
    b_worker = _worker(default, ["B"], retry_mode="queue")
    for _ in range(50):
        b_worker.work(burst=True)
        default.work(burst=True)
        status = default.get_status(run_id)
        if status is not None and status.status == "completed":
            break
        threading.Event().wait(0.01)
    assert default.get_status(run_id).status == "completed"
    assert attempts["n"] == 2


def test_operations_route_the_jobs_they_enqueue() -> None:
    fail = {"on": True}

    def sometimes(ctx: Any) -> str:
        if fail["on"]:
            raise RuntimeError("down")
        return "up"

    flow = create_flow("ops").node("a", lambda ctx: 1).node("b", sometimes, queue="B").edge("a", "b")
    default = InMemoryAdapter(_runtime(flow))
    b_worker = _worker(default, ["B"])
    run_id = default.start_workflow("ops")
    default.work(burst=True)
    b_worker.work(burst=True)
    assert default.get_status(run_id).status == "failed"
    fail["on"] = False
    assert default.retry(run_id) == {"b"}
    assert default.queue.depth("B") == 1 and default.queue.depth() == 0
    b_worker.work(burst=True)
    assert default.wait_for_result(run_id, timeout=5).status == "completed"


def test_a_dead_letter_of_a_routed_node_is_requeued_on_its_queue() -> None:
    flow = create_flow("dl").node("a", lambda ctx: 1, queue="B")
    default = InMemoryAdapter(_runtime(flow))
    # a job whose run is unknown is dead-lettered without failing anything
    default.queue.push_raw(Job("nobody", "dl", "a").with_(queue="B").to_json().encode(), queue="B")
    _worker(default, ["B"]).work(burst=True)
    (letter,) = default.dead_letters()
    assert default.requeue_dead_letter(letter.id)
    assert default.queue.depth("B") == 1 and default.queue.depth() == 0


def test_queues_must_be_names() -> None:
    with pytest.raises(ValueError, match="queues must be a non-empty list"):
        InMemoryAdapter(FlowRuntime(), queues=[])
    with pytest.raises(ValueError, match="queues must be a non-empty list"):
        InMemoryAdapter(FlowRuntime(), queues="B")  # type: ignore[arg-type]


def test_the_worker_command_serves_every_queue_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from flowcraft.cli import backends
    from flowcraft.cli.parser import build_parser

    monkeypatch.delenv("FLOWCRAFT_QUEUE", raising=False)
    runtime = _runtime(_chain(Seen()))  # routes node b to queue "B"

    def parsed(*queues: str) -> Any:
        return build_parser().parse_args(["worker", "--app", "m:a", *(x for q in queues for x in ("--queue", q))])

    args = parsed("B", "jobs")  # the default queue: the first no node is routed to
    assert (backends.queue_name(args, runtime), backends.served_queues(args, runtime)) == ("jobs", ["B", "jobs"])
    args = parsed("B")  # only the routed queue: unrouted jobs still go to the backend's default queue
    assert (backends.queue_name(args, runtime), backends.served_queues(args, runtime)) == ("flowcraft-queue", ["B"])
    args = parsed("jobs")  # one queue, as before routing: it is the default queue
    assert (backends.queue_name(args, runtime), backends.served_queues(args, runtime)) == ("jobs", None)
