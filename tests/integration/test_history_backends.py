"""A run's durable history on each real backend (SPEC 11): written by the commits themselves, it
replays to the run's context, holds each node execution once, and says what failed."""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from flowcraft import FlowRuntime, create_flow

from test_conformance_backends import FACTORIES  # the backends as the conformance kit builds them


def _flows() -> Any:
    fan = create_flow("hist-fan").node("src", lambda ctx: 3)
    for i in range(4):
        fan.node(f"w{i}", lambda ctx, i=i: ctx.input * i).edge("src", f"w{i}").edge(f"w{i}", "join")
    fan.node("join", lambda ctx: sum(ctx.input.values()))
    batch = create_flow("hist-batch").node("make", lambda ctx: [1, 2, 3]).batch(
        "each", lambda ctx: ctx.input + 1, input_key="make", output_key="out").edge("make", "each")

    def boom(ctx: Any) -> Any:
        raise ValueError("flaky dependency")

    failing = create_flow("hist-fail").node("a", lambda ctx: 1).node("b", boom).edge("a", "b")
    return fan, batch, failing


@pytest.mark.parametrize("backend", sorted(FACTORIES))
def test_history_replays_and_holds_each_execution_once(backend: str, request: pytest.FixtureRequest) -> None:
    factory = FACTORIES[backend](request)
    runtime = FlowRuntime()
    flows = _flows()
    for flow in flows:
        runtime.add_blueprint(flow)
    adapter = factory.make_adapter(runtime)
    try:
        for flow in flows:
            run_id = adapter.start_workflow(flow.id, {"seed": 1})
            adapter.work(burst=True)
            result = adapter.wait_for_result(run_id, timeout=30)
            history = adapter.get_history(run_id)
            assert history[0].type == "workflow:start" and history[-1].type == "workflow:finish", [e.type for e in history]
            finishes = Counter((e.payload["node_id"], e.payload.get("index")) for e in history if e.type == "node:finish")
            assert set(finishes.values()) == {1}, finishes
            if flow.id == "hist-fail":
                assert result.status == "failed"
                errors = [e.payload for e in history if e.type == "node:error"]
                assert [e["node_id"] for e in errors] == ["b"] and "flaky dependency" in errors[0]["message"]
            else:
                assert result.status == "completed", result.errors
                assert runtime.replay(flow.id, history).context == result.context
    finally:
        factory.close()
