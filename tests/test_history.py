"""A run's durable history (SPEC 11, issue 14): appended by the same atomic commit as the state it
describes, so it never says a node completed that did not and never misses one that did, whatever
crashes; `runtime.replay(blueprint, adapter.get_history(run_id))` rebuilds the run's context."""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List

import pytest

from flowcraft import FlowRuntime, create_flow
from flowcraft.events import Event
from flowcraft.testing import InMemoryAdapter
from flowcraft.testing import fakes
from flowcraft.testing.conformance import SCENARIOS, conformance_runtime
from flowcraft.testing.fakes import CRASH_POINTS

COMPLETING = [s for s in SCENARIOS.values() if s.status == "completed"]


def _run(adapter: InMemoryAdapter, scenario: Any) -> Any:
    run_id = adapter.start_workflow(scenario.blueprint_id, dict(scenario.initial_context))
    adapter.drain()
    if scenario.resume is not None:
        assert adapter.wait_for_result(run_id, timeout=5).status == "awaiting"
        adapter.resume_with_action(run_id, *scenario.resume)
        adapter.drain()
    return run_id, adapter.wait_for_result(run_id, timeout=5)


def _finished(history: List[Event]) -> Counter:
    """(node, iteration, item index) -> how many node:finish events the history holds."""
    return Counter((e.payload["node_id"], e.payload.get("iteration", 0), e.payload.get("index"))
                   for e in history if e.type == "node:finish")


@pytest.mark.parametrize("scenario", COMPLETING, ids=str)
@pytest.mark.parametrize("faults", [{}, {"crash_at": CRASH_POINTS, "crash_rate": 0.3, "seed": 3, "duplicate_rate": 0.3},
                                    {"fetch_batch": 20}, {"fetch_batch": 20, "crash_at": CRASH_POINTS, "crash_rate": 0.05, "seed": 4}],
                         ids=["clean", "crashes", "waves", "waves-crashes"])
def test_replaying_the_history_gives_the_runs_context_and_each_execution_is_there_once(scenario: Any, faults: Dict[str, Any]) -> None:
    runtime = conformance_runtime()
    adapter = InMemoryAdapter(runtime, **faults)
    run_id, result = _run(adapter, scenario)
    assert result.status == "completed", result.errors
    history = adapter.get_history(run_id)
    assert history[0].type == "workflow:start" and history[-1].type == "workflow:finish"
    assert history[-1].payload["status"] == "completed"
    assert runtime.replay(scenario.blueprint_id, history).context == result.context
    finished = _finished(history)
    assert set(finished.values()) == {1}, finished  # one per node execution, however often it ran or crashed
    done = {(node, iteration) for (run, node, iteration), n in adapter.store.completions.items() if run == run_id and n}
    # every completion the store counted is there (a loop body's own lap-resetting commit is not counted
    # as a completion by the fake's counter, which sees its state reset in the same commit)
    assert done <= {(node, iteration) for node, iteration, index in finished if index is None}
    if faults.get("crash_rate", 0) >= 0.3:  # at 5% a short scenario may well see no crash
        assert sum(adapter.crashes.values()) > 0


def test_history_events_say_who_ran_what_when_and_how_long() -> None:
    flow = (create_flow("timeline").node("a", lambda ctx: 1).node("b", lambda ctx: ctx.input + 1)
            .node("c", lambda ctx: ctx.input * 2, config={"maxRetries": 1}).edge("a", "b").edge("b", "c"))
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow(flow.id, {"x": 1})
    adapter.drain()
    history = adapter.get_history(run_id)
    assert history[0].payload["initial_context"] == {"x": 1}
    finishes = [e.payload for e in history if e.type == "node:finish"]
    assert [p["node_id"] for p in finishes] == ["a", "b", "c"]
    for payload in finishes:
        assert payload["worker"] == adapter.worker_name and payload["attempt"] == 1 and payload["iteration"] == 0
        assert payload["duration_ms"] >= 0 and payload["timestamp"] > 0
    timestamps = [e.payload["timestamp"] for e in history if "timestamp" in e.payload]
    assert timestamps == sorted(timestamps)


def test_a_failed_node_is_in_the_history_with_its_error() -> None:
    def boom(ctx: Any) -> Any:
        raise RuntimeError("the payment API said no")

    flow = create_flow("fails").node("a", lambda ctx: 1).node("pay", boom).edge("a", "pay")
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow(flow.id)
    adapter.drain()
    history = adapter.get_history(run_id)
    errors = [e.payload for e in history if e.type == "node:error"]
    assert len(errors) == 1 and errors[0]["node_id"] == "pay" and "said no" in errors[0]["message"]
    assert errors[0]["type"] == "RuntimeError"
    assert history[-1].type == "workflow:finish" and history[-1].payload["status"] == "failed"


def test_cancel_is_in_the_history() -> None:
    flow = create_flow("cancel-me").node("a", lambda ctx: 1).node("b", lambda ctx: 2).edge("a", "b")
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow(flow.id)
    adapter.cancel(run_id)
    assert [e.type for e in adapter.get_history(run_id)] == ["workflow:start", "run:cancel", "workflow:finish"]


def test_the_history_keeps_the_newest_commits_up_to_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fakes, "HISTORY_CAP", 5)
    flow = create_flow("long")
    previous = None
    for i in range(12):
        flow.node(f"n{i}", lambda ctx: 1)
        if previous is not None:
            flow.edge(previous, f"n{i}")
        previous = f"n{i}"
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow(flow.id)
    adapter.drain()
    nodes = [e.payload["node_id"] for e in adapter.get_history(run_id) if e.type == "node:finish"]
    assert nodes == ["n7", "n8", "n9", "n10", "n11"]  # the start and early commits are gone: a capped history
