"""`flowcraft.testing`: `Stepper`, `run_with_trace`, `InMemoryEventLogger`, and `runtime.replay` (SPEC §6)."""
from __future__ import annotations

import io
import json
from typing import List

from flowcraft import FlowRuntime, NodeResult, create_flow
from flowcraft.testing import InMemoryEventLogger, Stepper, run_with_trace


def diamond():
    def a(ctx):
        ctx.context.set("seen", ["a"])
        return 1

    def b(ctx):
        ctx.context.set("b_val", ctx.input + 10)
        return ctx.input + 1

    def c(ctx):
        ctx.context.set("c_val", ctx.input * 100)
        return ctx.input * 2

    def d(ctx):
        ctx.context.set("seen", ctx.context.get("seen") + ["d"])
        return {"sum": ctx.input["b"] + ctx.input["c"]}

    return (
        create_flow("diamond")
        .node("a", a)
        .node("b", b)
        .node("c", c)
        .node("d", d)
        .edge("a", "b")
        .edge("a", "c")
        .edge("b", "d")
        .edge("c", "d")
    )


# --- Stepper --------------------------------------------------------------------------------------


def test_stepper_runs_a_diamond_wave_by_wave():
    flow = diamond()
    stepper = Stepper(FlowRuntime(), flow.to_blueprint(), {"x": 1}, registry=flow.registry)
    assert stepper.ready == ["a"]
    assert stepper.done is False
    assert dict(stepper.context) == {"x": 1}

    assert stepper.step() == ["a"]
    assert stepper.ready == ["b", "c"]
    assert stepper.context["a"] == 1
    assert stepper.context["seen"] == ["a"]
    assert "b" not in stepper.context and "c" not in stepper.context

    assert stepper.step() == ["b", "c"]
    assert stepper.ready == ["d"]
    assert stepper.context["b_val"] == 11
    assert stepper.context["c_val"] == 100
    assert "d" not in stepper.context

    assert stepper.step() == ["d"]
    assert stepper.ready == []
    assert stepper.done is True
    assert stepper.steps == 3

    result = stepper.result()
    assert result.status == "completed"
    assert result.context["d"] == {"sum": 4}
    assert result.context["seen"] == ["a", "d"]
    assert result.context["x"] == 1


def test_stepper_run_to_end_matches_a_normal_run():
    flow = diamond()
    runtime = FlowRuntime()
    stepped = Stepper(runtime, flow.to_blueprint(), {"x": 1}, registry=flow.registry).run_to_end()
    normal = flow.run(runtime, {"x": 1})
    assert stepped.status == normal.status == "completed"
    assert stepped.context == normal.context


def test_stepper_stops_on_failure():
    def boom(ctx):
        raise ValueError("stepper boom")

    flow = create_flow("sf").node("a", lambda ctx: 1).node("b", boom).node("c", lambda ctx: 3).edge("a", "b").edge("b", "c")
    stepper = Stepper(FlowRuntime(), flow.to_blueprint(), registry=flow.registry)
    stepper.step()
    assert stepper.ready == ["b"]
    stepper.step()
    assert stepper.done is True
    result = stepper.result()
    assert result.status == "failed"
    assert result.errors[0].node_id == "b"
    assert "c" not in result.context


def test_stepper_reports_skipped_branch():
    flow = (
        create_flow("sk")
        .node("a", lambda ctx: NodeResult(output=1, action="left"))
        .node("l", lambda ctx: "L")
        .node("r", lambda ctx: "R")
        .edge("a", "l", action="left")
        .edge("a", "r", action="right")
    )
    stepper = Stepper(FlowRuntime(), flow.to_blueprint(), registry=flow.registry)
    stepper.step()
    assert stepper.ready == ["l"]
    result = stepper.run_to_end()
    assert result.status == "completed"
    assert result.skipped == ["r"]


# --- run_with_trace ----------------------------------------------------------------------------------


def test_run_with_trace_writes_trace_for_failing_run():
    def boom(ctx):
        raise ValueError("kaboom-42")

    flow = create_flow("bad").node("a", lambda ctx: 1).node("z", boom).edge("a", "z")
    stream = io.StringIO()
    result = run_with_trace(FlowRuntime(), flow.to_blueprint(), registry=flow.registry, stream=stream)
    assert result.status == "failed"
    text = stream.getvalue()
    assert result.run_id in text
    assert "failed" in text
    assert "kaboom-42" in text
    for kind in ("workflow:start", "node:start", "node:error", "workflow:finish"):
        assert kind in text
    # events appear in order
    assert text.index("workflow:start") < text.index("node:error") < text.index("workflow:finish")


def test_run_with_trace_is_silent_for_completing_run():
    flow = diamond()
    stream = io.StringIO()
    result = run_with_trace(FlowRuntime(), flow.to_blueprint(), {"x": 1}, registry=flow.registry, stream=stream)
    assert result.status == "completed"
    assert stream.getvalue() == ""


def test_run_with_trace_writes_for_awaiting_run():
    flow = create_flow("aw").wait("w")
    stream = io.StringIO()
    result = run_with_trace(FlowRuntime(), flow.to_blueprint(), registry=flow.registry, stream=stream)
    assert result.status == "awaiting"
    assert "workflow:pause" in stream.getvalue()


def test_run_with_trace_keeps_the_runtimes_own_event_bus():
    log = InMemoryEventLogger()
    flow = create_flow("keep-bus").node("a", lambda ctx: 1)
    run_with_trace(FlowRuntime(event_bus=log), flow.to_blueprint(), registry=flow.registry, stream=io.StringIO())
    assert log.types() == ["workflow:start", "node:start", "node:finish", "workflow:finish"]


# --- InMemoryEventLogger ----------------------------------------------------------------------------


def test_event_logger_helpers():
    log = InMemoryEventLogger()
    flow = diamond()
    flow.run(FlowRuntime(event_bus=log), {"x": 1})
    assert log.find("node:finish", node_id="c").payload["output"] == 2
    assert log.find("node:finish", node_id="nope") is None
    assert len(log.of_type("node:start")) == 4
    log.clear()
    assert log.events == []


# --- replay -----------------------------------------------------------------------------------------


def record(flow, initial=None, **options):
    log = InMemoryEventLogger()
    runtime = FlowRuntime(event_bus=log)
    result = flow.run(runtime, initial, **options)
    return runtime, log, result


def test_replay_diamond_gives_same_context():
    flow = diamond()
    runtime, log, result = record(flow, {"x": 1})
    replayed = runtime.replay(flow.to_blueprint(), log.events)
    assert replayed.status == "completed"
    assert replayed.context == result.context
    assert replayed.run_id == result.run_id


def test_replay_runs_no_node_code():
    calls: List[str] = []
    flow = create_flow("no-code").node("a", lambda ctx: calls.append("a") or "A")
    runtime, log, result = record(flow)
    assert calls == ["a"]
    replayed = runtime.replay(flow.to_blueprint(), log.events)
    assert calls == ["a"]
    assert replayed.context == result.context


def test_replay_with_skipped_branch():
    flow = (
        create_flow("skip")
        .node("a", lambda ctx: 1)
        .node("b", lambda ctx: ctx.context.set("b_set", True) or "B")
        .node("c", lambda ctx: "C")
        .node("d", lambda ctx: ctx.input)
        .edge("a", "b", condition="result.output > 0")
        .edge("a", "c", condition="result.output < 0")
        .edge("b", "d")
        .edge("c", "d")
    )
    runtime, log, result = record(flow)
    assert result.skipped == ["c"]
    replayed = runtime.replay(flow.to_blueprint(), log.events)
    assert replayed.status == "completed"
    assert replayed.skipped == ["c"]
    assert replayed.context == result.context


def test_replay_of_failed_run():
    def boom(ctx):
        raise ValueError("replayed failure")

    flow = create_flow("fail").node("a", lambda ctx: 1).node("b", boom).edge("a", "b")
    runtime, log, result = record(flow)
    replayed = runtime.replay(flow.to_blueprint(), log.events)
    assert replayed.status == "failed"
    assert replayed.context == result.context
    assert [(e.node_id, e.message, e.type) for e in replayed.errors] == [("b", "replayed failure", "ValueError")]


def test_replay_loop():
    def inc(ctx):
        i = ctx.context.get("i", 0) + 1
        ctx.context.set("i", i)
        return i

    flow = (
        create_flow("loop")
        .node("body", inc)
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 5")
        .node("after", lambda ctx: ctx.input)
        .edge("lp", "after")
    )
    runtime, log, result = record(flow)
    assert result.context["i"] == 5
    replayed = runtime.replay(flow.to_blueprint(), log.events)
    assert replayed.context == result.context


def test_replay_batch():
    flow = (
        create_flow("batch")
        .batch("bt", lambda ctx: ctx.input * 2, input_key="items", output_key="out")
        .node("after", lambda ctx: sum(ctx.input))
        .edge("bt", "after")
    )
    runtime, log, result = record(flow, {"items": [1, 2, 3]}, concurrency=3)
    assert result.context["out"] == [2, 4, 6]
    replayed = runtime.replay(flow.to_blueprint(), log.events)
    assert replayed.context == result.context


def test_replay_across_wait_and_resume():
    flow = create_flow("wr").node("a", lambda ctx: 1).wait("w").node("n", lambda ctx: ctx.input).edge("a", "w").edge("w", "n")
    runtime, log, paused = record(flow)
    done = runtime.resume(flow.to_blueprint(), paused.serialized_context, output=5, registry=flow.registry)
    replayed = runtime.replay(flow.to_blueprint(), log.events)
    assert replayed.status == "completed"
    assert replayed.context == done.context


def test_replay_from_json_round_tripped_events():
    # events persisted as JSON (e.g. in a log store) still replay to the same context
    from flowcraft import Event

    flow = diamond()
    runtime, log, result = record(flow, {"x": 1})
    stored = json.dumps([{"type": e.type, "payload": e.payload} for e in log.events])
    events = [Event(item["type"], item["payload"]) for item in json.loads(stored)]
    replayed = runtime.replay(flow.to_blueprint(), events)
    assert replayed.context == result.context


def _counted_chain(calls: List[str]):
    def node(name: str, value: int):
        def run(ctx):
            calls.append(name)
            return value
        return run

    return (create_flow("counted").node("a", node("a", 1)).node("b", node("b", 2)).node("c", node("c", 3))
            .edge("a", "b").edge("b", "c"))


def test_stepper_prev_undoes_a_step_without_running_node_code_again() -> None:
    """TS packages/core/src/testing/stepper.ts (`createStepper`: `next()` pushes the serialized state
    onto a history, `prev()` pops it back): stepping back restores the state before the last step;
    stepping again runs that node again."""
    calls: List[str] = []
    flow = _counted_chain(calls)
    stepper = Stepper(FlowRuntime(), flow.to_blueprint(), {"seed": 0}, registry=flow.registry)
    assert stepper.step() == ["a"] and stepper.step() == ["b"]
    assert stepper.context["b"] == 2 and stepper.ready == ["c"]
    assert stepper.prev() == ["b"]
    assert "b" not in stepper.context and stepper.context["a"] == 1 and stepper.steps == 1
    assert calls == ["a", "b"]  # undoing ran nothing
    assert stepper.step() == ["b"] and calls == ["a", "b", "b"]
    result = stepper.run_to_end()
    assert result.status == "completed" and result.context["c"] == 3
    assert result.context == flow.run(FlowRuntime(), {"seed": 0}).context


def test_stepper_reset_goes_back_before_the_first_step_and_prev_at_the_start_is_a_no_op() -> None:
    """TS packages/core/src/testing/stepper.ts: `reset()` re-initialises state and history; `prev()`
    with no history returns null (here: [])."""
    calls: List[str] = []
    flow = _counted_chain(calls)
    stepper = Stepper(FlowRuntime(), flow.to_blueprint(), {"seed": 0}, registry=flow.registry)
    assert stepper.prev() == []
    stepper.run_to_end()
    assert stepper.done
    stepper.reset()
    assert not stepper.done and stepper.ready == ["a"] and stepper.steps == 0
    assert dict(stepper.context) == {"seed": 0}
    assert stepper.run_to_end().context["c"] == 3 and calls == ["a", "b", "c"] * 2


def test_stepper_step_with_concurrency_runs_the_ready_nodes_at_once() -> None:
    """TS packages/core/src/testing/stepper.ts `next({ concurrency })`: the ready nodes of a step run in parallel. Three nodes wait
    on one barrier of three, which only opens if all three run at the same time."""
    import threading

    barrier = threading.Barrier(3, timeout=5)

    def meet(ctx):
        barrier.wait()
        return ctx.node_id if hasattr(ctx, "node_id") else True

    flow = create_flow("wide").node("s", lambda ctx: 0)
    for name in ("x", "y", "z"):
        flow.node(name, meet).edge("s", name)
    stepper = Stepper(FlowRuntime(), flow.to_blueprint(), {}, registry=flow.registry)
    stepper.step()
    assert sorted(stepper.step(concurrency=3)) == ["x", "y", "z"]
    result = stepper.run_to_end()
    assert result.status == "completed", result.errors
