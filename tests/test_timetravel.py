"""Time travel and debugging of in-memory runs (flowcraft.timetravel), written from Flowcraft TS's
packages/core/src/runtime/runtime.ts (`executeNodes`, `patchContext`, `markNodeCompleted`,
`rollbackExecution`, `replayFrom`) and test/runtime/runtime.test.ts ("FlowRuntime - executeNodes",
"- patchContext", "- markNodeCompleted", "- rollbackExecution")."""
import pytest

from flowcraft import Event, FlowcraftError, FlowRuntime, create_flow
from flowcraft.testing import InMemoryEventLogger


class Calls:
    def __init__(self):
        self.log = []

    def node(self, name, fn):
        def run(ctx):
            self.log.append(name)
            return fn(ctx)
        return run


def _chain(calls, fail_c=False):
    flow = create_flow("chain")
    flow.node("A", calls.node("A", lambda ctx: ctx.context.get("seed", 1)))
    flow.node("B", calls.node("B", lambda ctx: ctx.input * 10))

    def c(ctx):
        if fail_c:
            raise RuntimeError("C broke")
        return ctx.input + 1
    flow.node("C", calls.node("C", c))
    flow.edge("A", "B").edge("B", "C")
    return flow


def _recorded(flow, initial=None):
    logger = InMemoryEventLogger()
    runtime = FlowRuntime(event_bus=logger)
    runtime.add_blueprint(flow)
    result = runtime.run("chain", initial)
    return runtime, logger, result


def test_replay_from_reruns_the_node_and_its_successors_with_ancestors_from_history():
    """runtime.ts replayFrom: ancestors' outputs come from the history, input overrides are applied,
    and the run goes on from the node."""
    calls = Calls()
    runtime, logger, first = _recorded(_chain(calls), {"seed": 2})
    assert first.context["C"] == 21 and calls.log == ["A", "B", "C"]
    calls.log.clear()
    again = runtime.replay_from("chain", logger.events, "B", input_overrides={"seed": 99})
    assert calls.log == ["B", "C"]  # A was not run: its output is the recorded 2
    assert again.status == "completed" and again.context["A"] == 2 and again.context["C"] == 21
    assert again.context["seed"] == 99
    with pytest.raises(FlowcraftError, match="'Z' not found"):
        runtime.replay_from("chain", logger.events, "Z")


def test_replay_from_follows_the_recorded_action_of_an_ancestor():
    flow = create_flow("chain")
    calls = Calls()
    flow.node("A", calls.node("A", _left))
    flow.node("L", calls.node("L", lambda ctx: "l"))
    flow.node("R", calls.node("R", lambda ctx: "r"))
    flow.edge("A", "L", action="left").edge("A", "R", action="right")
    runtime, logger, first = _recorded(flow)
    assert first.skipped == ["R"]
    calls.log.clear()
    again = runtime.replay_from("chain", logger.events, "L")
    assert calls.log == ["L"] and again.skipped == ["R"] and again.context["L"] == "l"


def _left(ctx):
    from flowcraft import NodeResult
    return NodeResult(output=1, action="left")


def test_mark_node_completed_skips_a_failed_node_and_goes_on():
    """runtime.ts markNodeCompleted: the node counts as completed with a synthetic output, its
    outgoing edges are followed; here the run goes on (SPEC 11 `skip`)."""
    calls = Calls()
    flow = _chain(calls, fail_c=True)
    flow.node("D", calls.node("D", lambda ctx: ctx.input * 2)).edge("C", "D")
    runtime, logger, failed = _recorded(flow)
    assert failed.status == "failed" and calls.log == ["A", "B", "C"]
    calls.log.clear()
    result = runtime.mark_node_completed("chain", logger.events, "C", 5)
    assert calls.log == ["D"]
    assert result.status == "completed" and result.context["_outputs.C"] == 5 and result.context["D"] == 10
    assert result.context["B"] == 10


def test_rollback_removes_what_nodes_after_the_target_wrote():
    """runtime.test.ts 'should remove nodes completed after target node', and 'has not completed'."""
    calls = Calls()
    runtime, logger, _ = _recorded(_chain(calls))
    rolled = runtime.rollback_execution("chain", logger.events, "B")
    assert rolled.context["_outputs.A"] == 1 and rolled.context["_outputs.B"] == 10
    assert "_outputs.C" not in rolled.context and "C" not in rolled.context and "_inputs.C" not in rolled.context
    assert rolled.status == "running"
    events = [Event("node:finish", {"node_id": "A", "output": "a"})]
    with pytest.raises(FlowcraftError, match="has not completed"):
        runtime.rollback_execution("chain", events, "B")


def test_patch_context_of_an_awaiting_run_keeps_it_resumable_and_emits_changes():
    """runtime.test.ts patchContext: patches set and delete keys in sequence; context:change events."""
    logger = InMemoryEventLogger()
    runtime = FlowRuntime(event_bus=logger)
    flow = create_flow("gate")
    flow.wait("approve")
    flow.node("after", lambda ctx: ctx.context.get("limit"))
    flow.edge("approve", "after")
    runtime.add_blueprint(flow)
    paused = runtime.run("gate", {"limit": 1, "junk": True})
    patched = runtime.patch_context("gate", paused.serialized_context, set={"limit": 7}, delete=["junk"])
    assert patched.status == "awaiting" and patched.context["limit"] == 7 and "junk" not in patched.context
    changes = [e.payload for e in logger.of_type("context:change")][-2:]
    assert [(c["key"], c["op"], c["run_id"]) for c in changes] == [("limit", "set", paused.run_id),
                                                                   ("junk", "delete", paused.run_id)]
    resumed = runtime.resume("gate", patched.serialized_context)
    assert resumed.status == "completed" and resumed.context["after"] == 7
    with pytest.raises(ValueError, match="engine's own state"):
        runtime.patch_context("gate", paused.serialized_context, delete=["_traversal"])
    from_events = runtime.patch_context("gate", logger.events, set={"x": [1]})
    # the history holds the first patch as events too: folding it gives the patched value
    assert from_events.context["x"] == [1] and from_events.context["limit"] == 7 and "junk" not in from_events.context


def test_execute_nodes_runs_only_the_chosen_nodes_over_the_history():
    """runtime.test.ts executeNodes: 'should reconstruct context from context:change events',
    'should execute a single node and store output'; nothing downstream runs."""
    calls = Calls()
    runtime, logger, _ = _recorded(_chain(calls))
    calls.log.clear()
    result = runtime.execute_nodes("chain", ["B"], logger.events, input_overrides={"B": {"note": "x"}})
    assert calls.log == ["B"] and result.status == "completed"
    assert result.context["B"] == 10 and result.context["note"] == "x" and result.context["_inputs.C"] == 10
    only_events = [Event("context:change", {"key": "value", "op": "set", "value": 42})]
    assert runtime.execute_nodes("chain", [], only_events).context["value"] == 42
    failing = _chain(Calls(), fail_c=True)
    runtime.add_blueprint(failing)
    broken = runtime.execute_nodes("chain", ["C"], logger.events)
    assert broken.status == "failed" and broken.errors[0].node_id == "C" and "C broke" in broken.errors[0].message


@pytest.mark.parametrize("concurrency", [1, 2])
def test_request_pause_stops_a_running_run_at_the_next_node_and_resume_goes_on(concurrency):
    """runtime.ts requestPause / runtime.test.ts 'should set pause flag for execution': the run
    pauses at the next safe checkpoint, is marked awaiting, and can be resumed later."""
    import threading

    calls = Calls()
    started, release = threading.Event(), threading.Event()

    def slow(ctx):
        started.set()
        assert release.wait(5)
        return 3

    flow = create_flow("chain")
    flow.node("A", calls.node("A", slow))
    flow.node("B", calls.node("B", lambda ctx: ctx.input * 10))
    flow.node("C", calls.node("C", lambda ctx: ctx.input + 1))
    flow.edge("A", "B").edge("B", "C")
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("r", runtime.run("chain", run_id="r1",
                                                                             concurrency=concurrency)))
    worker.start()
    assert started.wait(5)
    runtime.request_pause("r1")
    release.set()
    worker.join(5)
    paused = out["r"]
    assert calls.log == ["A"]  # A finished; B never started
    assert paused.status == "awaiting" and paused.awaiting == ["B"]
    assert paused.context["_awaitingDetails"]["B"]["type"] == "pause"
    assert runtime.pause_requests == set()  # the request is spent
    resumed = runtime.resume("chain", paused.serialized_context)
    assert calls.log == ["A", "B", "C"]
    assert resumed.status == "completed" and resumed.context["C"] == 31 and resumed.run_id == "r1"
