"""Subflows: `Flow.subflow(...)` and the `subflow` built-in (SPEC §5 "Subflows")."""
from __future__ import annotations

import json
import time

import pytest

from flowcraft import FlowRuntime, UnknownNodeError, create_flow


def doubling_child():
    return create_flow("child").node("dbl", lambda ctx: ctx.context.set("y", ctx.context.get("x") * 2) or "doubled")


def parent_of(child_id: str = "child"):
    return (
        create_flow("parent")
        .node("prep", lambda ctx: ctx.context.set("a", 21))
        .subflow("sub", child_id, inputs={"x": "a"}, outputs={"b": "y"})
        .node("use", lambda ctx: ctx.context.get("b") + 1)
        .edge("prep", "sub")
        .edge("sub", "use")
    )


def test_subflow_wire_format():
    bp = parent_of().to_blueprint()
    sub = bp.node("sub")
    assert sub.uses == "subflow"
    assert sub.params == {"blueprintId": "child", "inputs": {"x": "a"}, "outputs": {"b": "y"}}


def test_subflow_with_child_given_to_constructor_maps_inputs_and_outputs():
    runtime = FlowRuntime(blueprints=[doubling_child()])
    result = parent_of().run(runtime)
    assert result.status == "completed", result.errors
    assert result.context["b"] == 42
    assert result.context["use"] == 43
    assert result.context["_outputs.sub"] == {"b": 42}
    # the child's internals do not leak into the parent context
    assert "y" not in result.context
    assert "x" not in result.context
    assert "dbl" not in result.context


def test_subflow_with_child_added_via_add_blueprint():
    runtime = FlowRuntime()
    bp = runtime.add_blueprint(doubling_child())
    assert bp.id == "child"
    result = parent_of().run(runtime)
    assert result.status == "completed", result.errors
    assert result.context["b"] == 42
    assert result.context["use"] == 43


def test_subflow_without_outputs_returns_child_public_context():
    child = create_flow("kid").node("k", lambda ctx: ctx.context.set("answer", 42))
    parent = create_flow("p").subflow("sub", "kid")
    result = parent.run(FlowRuntime(blueprints=[child]))
    assert result.status == "completed", result.errors
    out = result.context["sub"]
    assert out["answer"] == 42
    assert not any(k.startswith("_") for k in out)


def test_child_failure_fails_parent_node_with_child_error():
    def boom(ctx):
        raise RuntimeError("child exploded at step 7")

    child = create_flow("childf").node("x", boom)
    parent = create_flow("p2").subflow("sub", "childf").node("after", lambda ctx: 1).edge("sub", "after")
    result = parent.run(FlowRuntime(blueprints=[child]))
    assert result.status == "failed"
    assert len(result.errors) == 1
    error = result.errors[0]
    assert error.node_id == "sub"
    assert "child exploded at step 7" in error.message
    assert "childf" in error.message
    assert "after" not in result.context


def test_unknown_blueprint_id_is_refused_before_anything_runs():
    ran = []
    parent = (create_flow("p3").node("first", lambda ctx: ran.append("first")).subflow("sub", "no-such-child")
              .node("after", lambda ctx: 1).edge("first", "sub").edge("sub", "after"))
    with pytest.raises(UnknownNodeError) as error:
        parent.run(FlowRuntime())
    assert str(error.value) == ("blueprint 'p3' cannot run, nothing was started: subflow blueprints the runtime "
                                "does not know: 'no-such-child' (node 'sub')")
    assert ran == []


def approval_child():
    return (
        create_flow("childw")
        .node("pre", lambda ctx: ctx.context.set("seen", ctx.context.get("x")))
        .wait("approve")
        .node("yes", lambda ctx: ctx.context.set("res", {"approved": ctx.input}))
        .node("no", lambda ctx: ctx.context.set("res", {"rejected": ctx.input}))
        .edge("pre", "approve")
        .edge("approve", "yes", action="approve")
        .edge("approve", "no", action="reject")
    )


def approval_parent():
    return (
        create_flow("pw")
        .node("prep", lambda ctx: ctx.context.set("a", 5))
        .subflow("sub", "childw", inputs={"x": "a"}, outputs={"final": "res", "seen2": "seen"})
        .node("after", lambda ctx: {"final": ctx.context.get("final")})
        .edge("prep", "sub")
        .edge("sub", "after")
    )


def test_awaiting_child_makes_parent_await():
    runtime = FlowRuntime(blueprints=[approval_child()])
    result = approval_parent().run(runtime)
    assert result.status == "awaiting"
    assert result.awaiting == ["sub"]
    assert result.context["_awaitingNodeIds"] == ["sub"]
    assert "sub" in result.context["_awaitingDetails"]
    assert "after" not in result.context
    assert result.errors == []


def test_resume_parent_resumes_child_and_maps_outputs():
    runtime = FlowRuntime(blueprints=[approval_child()])
    parent = approval_parent()
    paused = parent.run(runtime)
    assert paused.status == "awaiting"
    done = runtime.resume(parent.to_blueprint(), paused.serialized_context, output={"by": "bob"},
                          action="approve", registry=parent.registry)
    assert done.status == "completed", done.errors
    assert done.context["final"] == {"approved": {"by": "bob"}}
    assert done.context["seen2"] == 5
    assert done.context["after"] == {"final": {"approved": {"by": "bob"}}}
    assert "_awaitingNodeIds" not in done.context
    assert done.awaiting == []


def test_resume_parent_action_drives_child_edges():
    runtime = FlowRuntime(blueprints=[approval_child()])
    parent = approval_parent()
    paused = parent.run(runtime)
    done = parent.resume(runtime, paused.serialized_context, output="nope", action="reject")
    assert done.status == "completed", done.errors
    assert done.context["final"] == {"rejected": "nope"}


def test_resume_child_that_then_fails_fails_parent():
    def explode(ctx):
        raise ValueError("after approval it broke")

    child = create_flow("cw2").wait("w").node("x", explode).edge("w", "x")
    parent = create_flow("pw2").subflow("sub", "cw2").node("after", lambda ctx: 1).edge("sub", "after")
    runtime = FlowRuntime(blueprints=[child])
    paused = parent.run(runtime)
    assert paused.status == "awaiting"
    done = parent.resume(runtime, paused.serialized_context, output=1)
    assert done.status == "failed"
    assert done.errors[0].node_id == "sub"
    assert "after approval it broke" in done.errors[0].message
    assert "after" not in done.context


def test_child_with_sleep_awaits_and_resumes_after_wake_up():
    child = create_flow("cs").sleep("nap", duration=0.05).node("post", lambda ctx: ctx.context.set("woke", True)).edge("nap", "post")
    parent = create_flow("ps").subflow("sub", "cs", outputs={"woke": "woke"})
    runtime = FlowRuntime(blueprints=[child])
    paused = parent.run(runtime)
    assert paused.status == "awaiting"
    assert paused.awaiting == ["sub"]
    time.sleep(0.1)
    done = parent.resume(runtime, paused.serialized_context)
    assert done.status == "completed", done.errors
    assert done.context["woke"] is True


def test_child_registry_from_flow_is_merged_by_add_blueprint():
    # the child's node code lives only in the child flow's registry; add_blueprint(flow) merges it
    child = create_flow("merged").node("k", lambda ctx: ctx.context.set("v", "from-child"))
    runtime = FlowRuntime()
    runtime.add_blueprint(child)
    parent = create_flow("pm").subflow("sub", "merged", outputs={"v": "v"})
    result = parent.run(runtime)
    assert result.status == "completed", result.errors
    assert result.context["v"] == "from-child"


def test_two_parallel_awaiting_subflows_resumed_by_node_id():
    child = create_flow("kid").wait("w").node("n", lambda ctx: ctx.context.set("r", ctx.input)).edge("w", "n")
    parent = (
        create_flow("pp")
        .node("s", lambda ctx: 1)
        .subflow("s1", "kid", outputs={"r1": "r"})
        .subflow("s2", "kid", outputs={"r2": "r"})
        .edge("s", "s1")
        .edge("s", "s2")
    )
    runtime = FlowRuntime(blueprints=[child])
    paused = parent.run(runtime)
    assert paused.status == "awaiting"
    assert sorted(paused.awaiting) == ["s1", "s2"]
    half = parent.resume(runtime, paused.serialized_context, node_id="s1", output="one")
    assert half.status == "awaiting"
    assert half.awaiting == ["s2"]
    assert half.context["r1"] == "one"
    done = parent.resume(runtime, half.serialized_context, node_id="s2", output="two")
    assert done.status == "completed", done.errors
    assert (done.context["r1"], done.context["r2"]) == ("one", "two")


def test_subflow_inside_a_loop_runs_each_lap():
    child = create_flow("k2").node("n", lambda ctx: ctx.context.set("y", ctx.context.get("x") * 10))
    seen = []

    def step(ctx):
        n = ctx.context.get("n", 0) + 1
        ctx.context.set("n", n)

    def record(ctx):
        seen.append(ctx.context.get("y"))

    parent = (
        create_flow("sub-loop")
        .node("st", step)
        .subflow("sub", "k2", inputs={"x": "n"}, outputs={"y": "y"})
        .node("rec", record)
        .edge("st", "sub")
        .edge("sub", "rec")
        .loop("lp", start_node_id="st", end_node_id="rec", condition="n < 3")
    )
    result = parent.run(FlowRuntime(blueprints=[child]))
    assert result.status == "completed", result.errors
    assert seen == [10, 20, 30]


# --- raw JSON ---------------------------------------------------------------------------------------


RAW_CHILD = {"id": "raw-child", "nodes": [{"id": "dbl", "uses": "double"}, {"id": "gate", "uses": "wait"}],
             "edges": [{"source": "dbl", "target": "gate"}]}
RAW_PARENT = {
    "id": "raw-parent",
    "nodes": [
        {"id": "p", "uses": "seven"},
        {"id": "sub", "uses": "subflow", "params": {
            "blueprintId": "raw-child", "inputs": {"x": "p"}, "outputs": {"doubled": "dbl", "approval": "gate"},
        }},
        {"id": "end", "uses": "report"},
    ],
    "edges": [{"source": "p", "target": "sub"}, {"source": "sub", "target": "end"}],
}
RAW_REGISTRY = {
    "seven": lambda ctx: 7,
    "double": lambda ctx: ctx.context.get("x") * 2,
    "report": lambda ctx: {"got": ctx.input, "doubled": ctx.context.get("doubled")},
}


def test_raw_json_subflow_maps_inputs_and_outputs_through_an_awaiting_child():
    runtime = FlowRuntime(registry=RAW_REGISTRY, blueprints=[RAW_CHILD])
    paused = runtime.run(RAW_PARENT, run_id="raw")
    assert paused.status == "awaiting" and paused.awaiting == ["sub"]
    details = paused.context["_awaitingDetails"]["sub"]
    assert details == {"type": "subflow", "blueprintId": "raw-child", "childRunId": "raw.sub.0",
                       "childAwaiting": ["gate"], "iteration": 0}
    assert "x" not in paused.context and "dbl" not in paused.context  # the child's keys stay in the child
    done = runtime.resume(RAW_PARENT, paused.serialized_context, output="ok")
    assert done.status == "completed", done.errors
    assert (done.context["doubled"], done.context["approval"]) == (14, "ok")
    assert done.context["_outputs.sub"] == {"doubled": 14, "approval": "ok"}
    assert done.context["end"] == {"got": {"doubled": 14, "approval": "ok"}, "doubled": 14}


def test_child_context_is_kept_with_the_traversal_and_older_contexts_still_resume():
    runtime = FlowRuntime(registry=RAW_REGISTRY, blueprints=[RAW_CHILD])
    paused = runtime.run(RAW_PARENT, run_id="raw")
    saved = json.loads(paused.serialized_context)
    child = saved["_traversal"]["childContexts"]["sub"]
    assert json.loads(child)["_awaitingNodeIds"] == ["gate"]
    # a context saved before the child's context moved out of the awaiting details
    del saved["_traversal"]["childContexts"]
    saved["_awaitingDetails"]["sub"]["childContext"] = child
    done = runtime.resume(RAW_PARENT, json.dumps(saved), output="ok")
    assert done.status == "completed", done.errors
    assert done.context["approval"] == "ok"
    # and one that holds neither fails the node clearly instead of guessing
    del saved["_awaitingDetails"]["sub"]["childContext"]
    broken = runtime.resume(RAW_PARENT, json.dumps(saved), output="ok")
    assert broken.status == "failed" and "no context of its awaiting child" in broken.errors[0].message


def test_each_lap_of_a_loop_gets_its_own_child_run():
    from flowcraft.testing import InMemoryEventLogger

    log = InMemoryEventLogger()
    child = create_flow("k3").node("n", lambda ctx: ctx.context.set("y", ctx.context.get("x")))
    parent = (
        create_flow("lap-children")
        .node("st", lambda ctx: ctx.context.set("n", ctx.context.get("n", 0) + 1))
        .subflow("sub", "k3", inputs={"x": "n"}, outputs={"y": "y"})
        .edge("st", "sub")
        .loop("lp", start_node_id="st", end_node_id="sub", condition="n < 3")
    )
    result = parent.run(FlowRuntime(blueprints=[child], event_bus=log), run_id="r")
    assert result.status == "completed", result.errors
    starts = [e.payload["run_id"] for e in log.of_type("workflow:start")]
    assert starts == ["r", "r.sub.0", "r.sub.1", "r.sub.2"]
