"""SPEC section 11 on the in-memory fakes: run lists, retry / restart / skip / patch, dead
letters, pruning, tracebacks and failure logs (the same scenarios run on each real backend in
tests/integration/test_operations_backends.py)."""
from __future__ import annotations

import logging
from typing import Any

import pytest

from flowcraft import FlowcraftError, FlowRuntime, WorkflowError, create_flow
from flowcraft.testing import InMemoryAdapter
from tests.operations_scenarios import SCENARIOS, dead_letter_listed_and_requeued, requeued_dead_letter_retries_the_run_it_failed


def _make(runtime: FlowRuntime) -> InMemoryAdapter:
    return InMemoryAdapter(runtime)


def _drain(adapter: Any) -> None:
    adapter.drain()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_on_fakes(name: str) -> None:
    SCENARIOS[name](_make, _drain)


def test_dead_letters_on_fakes() -> None:
    dead_letter_listed_and_requeued(_make, _drain, lambda adapter, body: adapter.queue.push_raw(body))


def test_requeued_dead_letter_retries_its_run_on_fakes() -> None:
    requeued_dead_letter_retries_the_run_it_failed(_make, _drain, lambda adapter, body: adapter.queue.push_raw(body))


def test_traceback_in_memory_and_round_trip() -> None:
    def boom(ctx: Any) -> Any:
        raise KeyError("missing-thing")

    flow = create_flow("tb").node("a", boom)
    result = flow.run(FlowRuntime(), {})
    error = result.errors[0]
    assert error.traceback is not None and "in boom" in error.traceback and "KeyError" in error.traceback
    again = WorkflowError.from_dict(error.to_dict())
    assert again.traceback == error.traceback and again == error
    old = WorkflowError.from_dict({"node_id": "a", "message": "m", "type": "T"})  # stored before tracebacks
    assert old.traceback is None and "traceback" not in old.to_dict()


def test_worker_logs_node_failure_warning_and_run_failure_error(caplog: pytest.LogCaptureFixture) -> None:
    def boom(ctx: Any) -> Any:
        raise RuntimeError("disk on fire")

    runtime = FlowRuntime()
    runtime.add_blueprint(create_flow("logs").node("a", boom))
    adapter = InMemoryAdapter(runtime)
    with caplog.at_level(logging.WARNING, logger="flowcraft"):
        run_id = adapter.start_workflow("logs", {})
        adapter.drain()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "node a failed" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is not None and warnings[0].name.startswith("flowcraft")
    assert "disk on fire" in caplog.text and "in boom" in caplog.text  # the traceback is logged
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and run_id in r.getMessage()]
    assert len(errors) == 1 and "disk on fire" in errors[0].getMessage()


def test_operations_refuse_bad_arguments() -> None:
    runtime = FlowRuntime()
    runtime.add_blueprint(create_flow("x").node("a", lambda ctx: 1))
    adapter = InMemoryAdapter(runtime)
    with pytest.raises(ValueError):
        adapter.list_runs(status="nope")
    with pytest.raises(ValueError):
        adapter.list_runs(limit=0)
    with pytest.raises(ValueError):
        adapter.list_runs(cursor="%%%")
    with pytest.raises(KeyError):
        adapter.retry("missing")
    run_id = adapter.start_workflow("x", {})
    adapter.drain()
    with pytest.raises(ValueError):
        adapter.restart_from(run_id, "no-such-node")
    with pytest.raises(ValueError):
        adapter.skip(run_id, "a")  # completed: nothing to skip
    with pytest.raises(ValueError):
        adapter.prune(10, statuses=("running",))
    with pytest.raises(ValueError):
        adapter.patch_context(run_id, set={"_traversal": 1})


def test_runtime_retry_in_memory_runs_only_what_had_not_completed() -> None:
    from collections import Counter

    calls: Counter = Counter()
    broken = {"on": True}

    def step(name: str, value: Any) -> Any:
        def run(ctx: Any) -> Any:
            calls[name] += 1
            if name == "charge" and broken["on"]:
                raise ConnectionError("payment service unavailable")
            return value
        return run

    flow = (create_flow("mem").node("load", step("load", 1)).node("charge", step("charge", 2))
            .node("ship", step("ship", 3)).edge("load", "charge").edge("charge", "ship"))
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)  # its registry too
    failed = runtime.run("mem", {"k": 1})
    assert failed.status == "failed" and failed.errors[0].traceback
    broken["on"] = False
    result = runtime.retry("mem", failed.serialized_context)
    assert result.status == "completed" and result.context["ship"] == 3 and result.context["k"] == 1
    assert calls == Counter({"load": 1, "charge": 2, "ship": 1})
    again = runtime.retry("mem", result.serialized_context, node_ids=["load"])
    assert again.status == "completed" and calls["load"] == 2 and calls["ship"] == 1
    with pytest.raises(FlowcraftError, match="nope"):
        runtime.retry("mem", failed.serialized_context, node_ids=["nope"])


def test_restart_from_a_fan_branch_runs_the_branch_and_the_join_again_with_every_input() -> None:
    """The join counts its arrivals (`graph.counted_joins`): restarting one branch recounts it, so
    it fires again once that branch arrives, with the other branches' values still there."""
    from collections import Counter

    calls: Counter = Counter()

    def node(name: str, value: Any) -> Any:
        def run(ctx: Any) -> Any:
            calls[name] += 1
            return value(ctx)
        return run

    flow = (create_flow("restart-fan").node("src", node("src", lambda ctx: 2))
            .node("a", node("a", lambda ctx: ctx.input * 10)).node("b", node("b", lambda ctx: ctx.input * 100))
            .node("join", node("join", lambda ctx: sorted(ctx.input.values())))
            .edge("src", "a").edge("src", "b").edge("a", "join").edge("b", "join"))
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow(flow.id)
    adapter.drain()
    first = adapter.wait_for_result(run_id, timeout=5)
    assert first.status == "completed" and first.context["join"] == [20, 200]
    assert adapter.restart_from(run_id, "a") == {"a"}
    adapter.drain()
    again = adapter.wait_for_result(run_id, timeout=5)
    assert again.status == "completed", again.errors
    assert again.context["join"] == [20, 200]
    assert calls == Counter({"src": 1, "a": 2, "b": 1, "join": 2})
