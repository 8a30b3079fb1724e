"""Behaviour ported from Flowcraft TS (core 2.10.1) where SPEC states no deliberate difference
(issue 18). Each test names the TS source or test it mirrors; each runs in memory and, where the
issue asks for it, distributed on the fakes (`InMemoryAdapter`) with the same result."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import pytest

from flowcraft import BlueprintError, Flow, FlowRuntime, WorkflowResult, create_flow
from flowcraft.testing import InMemoryAdapter


def runtime_of(flows: Sequence[Flow]) -> FlowRuntime:
    runtime = FlowRuntime()
    for flow in flows:
        runtime.add_blueprint(flow)
    return runtime


def both(flows: Sequence[Flow], initial: Optional[Dict[str, Any]] = None) -> WorkflowResult:
    """Run flows[0] in memory and distributed; assert the same outcome; return the in-memory one."""
    local = flows[0].run(runtime_of(flows), dict(initial or {}))
    adapter = InMemoryAdapter(runtime_of(flows))
    run_id = adapter.start_workflow(flows[0].id, dict(initial or {}))
    adapter.drain()
    remote = adapter.wait_for_result(run_id, timeout=5)
    assert remote.status == local.status, (remote.errors, local.errors)
    assert remote.context == local.context
    assert remote.errors == local.errors
    return local


# --- item 2: subflow mapping without outputs / inputs ---------------------------------------------


def test_subflow_without_outputs_returns_the_single_terminal_output_in_memory_and_distributed() -> None:
    """TS packages/core/src/nodes/subflow.ts: without `outputs`, the output is
    `_outputs.<terminal>` when the child has one terminal node."""
    child = create_flow("kid1").node("a", lambda ctx: 20).node("b", lambda ctx: ctx.input + 1).edge("a", "b")
    parent = create_flow("p1").subflow("sub", "kid1").node("after", lambda ctx: ctx.input * 2).edge("sub", "after")
    result = both([parent, child])
    assert result.status == "completed", result.errors
    assert result.context["sub"] == 21
    assert result.context["after"] == 42


def test_subflow_without_outputs_and_several_terminals_returns_terminal_id_to_output() -> None:
    """TS subflow.ts: several terminal nodes give `{terminalId: _outputs.<terminalId>}`."""
    child = (create_flow("kid2").node("a", lambda ctx: 1).node("x", lambda ctx: "X").node("y", lambda ctx: "Y")
             .edge("a", "x").edge("a", "y"))
    parent = create_flow("p2").subflow("sub", "kid2")
    result = both([parent, child])
    assert result.status == "completed", result.errors
    assert result.context["sub"] == {"x": "X", "y": "Y"}


def test_subflow_without_inputs_hands_the_node_input_to_every_child_start_node() -> None:
    """TS subflow.ts: without `inputs`, `_inputs.<start>` = the subflow node's input for each of
    the child's start nodes (no spreading of a dict input into the child's context)."""
    child = (create_flow("kid3").node("s1", lambda ctx: ["s1", ctx.input]).node("s2", lambda ctx: ["s2", ctx.input])
             .node("j", lambda ctx: ctx.input).edge("s1", "j").edge("s2", "j"))
    parent = (create_flow("p3").node("make", lambda ctx: {"order": 7}).subflow("sub", "kid3").edge("make", "sub"))
    result = both([parent, child])
    assert result.status == "completed", result.errors
    assert result.context["sub"] == {"s1": ["s1", {"order": 7}], "s2": ["s2", {"order": 7}]}
    local = parent.run(runtime_of([parent, child]))
    assert "order" not in local.context


# --- item 3: dotted inputs are property paths into a node's output --------------------------------


def test_dotted_inputs_are_property_paths_into_a_node_output() -> None:
    """TS packages/core/src/runtime/workflow-logic-handler.ts `resolveInputValue`: "node.prop.sub"
    reads the property path of `_outputs.<node>`; "node" the node's output; "_key" a context key."""
    flow = (create_flow("dotted")
            .node("createCart_1", lambda ctx: {"cartId": "c-9", "items": [{"sku": "A"}, {"sku": "B"}]})
            .node("use", lambda ctx: ctx.input,
                  inputs={"cartId": "createCart_1.cartId", "sku": "createCart_1.items.1.sku",
                          "missing": "createCart_1.nope.deeper", "whole": "createCart_1", "raw": "_outputs.createCart_1"})
            .node("one", lambda ctx: ctx.input, inputs="createCart_1.cartId")
            .edge("createCart_1", "use").edge("use", "one"))
    result = both([flow])
    assert result.status == "completed", result.errors
    cart = {"cartId": "c-9", "items": [{"sku": "A"}, {"sku": "B"}]}
    assert result.context["use"] == {"cartId": "c-9", "sku": "B", "missing": None, "whole": cart, "raw": cart}
    assert result.context["one"] == "c-9"


# --- item 4: a graph with no start node starts at its cycles' entry points ------------------------


def _pure_cycle() -> Flow:
    def bump(ctx: Any) -> int:
        n = (ctx.context.get("n") or 0) + 1
        ctx.context.set("n", n)
        ctx.context.set("order", (ctx.context.get("order") or []) + [ctx.node_id])
        return n

    return (create_flow("pure_cycle").node("A", bump).node("B", bump)
            .edge("A", "B").edge("B", "A", condition="n < 4"))


def test_a_pure_cycle_starts_at_its_first_node_and_completes() -> None:
    """TS packages/core/src/runtime/traverser.ts constructor ("should handle cycles if not strict",
    test/runtime/traverser.test.ts; runtime.test.ts "should correctly execute a graph with a cycle
    when strict mode is off"): no start node -> each cycle's first node. Our cycle cap (SPEC 5)
    still applies, so the back edge here has a condition that ends it."""
    result = both([_pure_cycle()])
    assert result.status == "completed", result.errors
    assert result.context["order"] == ["A", "B", "A", "B"]


def test_cycle_entry_points_metadata_chooses_where_a_pure_cycle_starts() -> None:
    """TS traverser.ts: `metadata.cycleEntryPoints` names the cycle's entry node."""
    from flowcraft.blueprint import WorkflowBlueprint

    flow = _pure_cycle()
    data = flow.to_blueprint().to_dict()
    data["id"] = "entry_b"
    data["metadata"] = dict(data.get("metadata") or {}, cycleEntryPoints=["B"])
    bp = WorkflowBlueprint.from_dict(data)
    local = FlowRuntime().run(bp, {}, registry=flow.registry)
    assert local.status == "completed", local.errors
    assert local.context["order"][0] == "B"
    runtime = FlowRuntime(registry=flow.registry, blueprints=[bp])
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow("entry_b", {})
    adapter.drain()
    remote = adapter.wait_for_result(run_id, timeout=5)
    assert remote.status == "completed" and remote.context == local.context


def test_a_self_loop_runs_and_a_strict_run_refuses_the_cycle() -> None:
    """TS traverser.ts: the entry points are used only when not strict (strict refuses cycles)."""
    def tick(ctx: Any) -> int:
        ctx.context.set("t", (ctx.context.get("t") or 0) + 1)
        return ctx.context.get("t")

    flow = create_flow("selfloop").node("S", tick).edge("S", "S", condition="t < 3")
    result = both([flow])
    assert result.status == "completed", result.errors
    assert result.context["t"] == 3
    with pytest.raises(BlueprintError, match="closes a cycle"):
        flow.run(FlowRuntime(), {}, strict=True)


# --- item 6: invalid built-in configurations are refused ------------------------------------------


def _loop_without_continue() -> Dict[str, Any]:
    return {"id": "nocontinue", "nodes": [
        {"id": "body", "uses": "body"},
        {"id": "loop", "uses": "loop-controller", "params": {"condition": "false"}, "config": {"joinStrategy": "any"}},
        {"id": "after", "uses": "body"}],
        "edges": [{"source": "body", "target": "loop"}, {"source": "loop", "target": "after", "action": "break"}]}


def test_a_loop_controller_without_a_continue_edge_is_refused_in_memory_and_distributed() -> None:
    """TS packages/core/src/runtime/traverser.ts `filterNodesInLoops`: "Loop '<id>' has no continue
    edge to start node" is thrown before anything runs."""
    registry = {"body": lambda ctx: 1}
    with pytest.raises(BlueprintError, match="'loop' has no outgoing 'continue' edge"):
        FlowRuntime(registry=registry).run(_loop_without_continue())
    adapter = InMemoryAdapter(FlowRuntime(registry=registry))
    with pytest.raises(BlueprintError, match="'loop' has no outgoing 'continue' edge"):
        adapter.start_workflow(_loop_without_continue(), {})
    assert adapter.queue.pending == 0


def _sleeper(params: Dict[str, Any]) -> Dict[str, Any]:
    return {"id": "sleeper", "nodes": [{"id": "nap", "uses": "sleep", "params": params}], "edges": []}


@pytest.mark.parametrize("params", [{}, {"duration": None}])
def test_a_sleep_without_a_duration_fails_its_node_in_memory_and_distributed(params: Dict[str, Any]) -> None:
    """TS packages/core/src/nodes/sleep.ts: a duration that is neither a string nor a number throws
    (the node fails) instead of sleeping 0 s."""
    local = FlowRuntime().run(_sleeper(params), wait_timers=True)
    assert local.status == "failed"
    assert local.errors[0].node_id == "nap" and "params.duration" in local.errors[0].message
    adapter = InMemoryAdapter(FlowRuntime())
    run_id = adapter.start_workflow(_sleeper(params), {})
    adapter.drain()
    remote = adapter.wait_for_result(run_id, timeout=5)
    assert remote.status == "failed" and remote.errors == local.errors


# --- item 5: middleware `after` is called when a node fails ---------------------------------------


def test_middleware_after_is_called_when_a_node_fails() -> None:
    """TS packages/core/src/runtime/executors.ts: `afterNode` hooks run in a `finally`, with the
    error, when the node throws. Ours gets a `NodeResult` whose `error` names it; the failure stands."""
    seen: list = []

    class Watch:
        def after(self, ctx: Any, result: Any) -> Any:
            seen.append((ctx.node_id, result.output, result.error))
            return "replaced?"  # ignored on a failure

    def boom(ctx: Any) -> None:
        raise RuntimeError("kaput")

    flow = create_flow("after_fail").node("ok", lambda ctx: 1).node("bad", boom).edge("ok", "bad")
    result = flow.run(FlowRuntime(middleware=[Watch()]))
    assert result.status == "failed" and result.errors[0].node_id == "bad"
    assert seen == [("ok", 1, None), ("bad", None, "RuntimeError: kaput")]


# --- item 7: an empty condition or transform is no expression -------------------------------------


def test_an_empty_condition_or_transform_is_treated_as_absent() -> None:
    """TS packages/core/src/runtime/workflow-logic-handler.ts (`if (edge.condition)`,
    `if (edge.transform)`): an empty string is falsy, so the edge is unconditional and passes its
    input unchanged. Loading, lint and both drivers agree; the blueprint keeps the "" (lossless)."""
    from flowcraft import lint_blueprint
    from flowcraft.blueprint import WorkflowBlueprint

    data = {"id": "empty_expr", "nodes": [{"id": "a", "uses": "a"}, {"id": "b", "uses": "b"}],
            "edges": [{"source": "a", "target": "b", "condition": "", "transform": ""}]}
    bp = WorkflowBlueprint.from_dict(data)
    assert bp.to_dict()["edges"][0]["condition"] == ""
    registry = {"a": lambda ctx: 5, "b": lambda ctx: ctx.input + 1}
    assert lint_blueprint(data, registry).is_valid
    local = FlowRuntime(registry=registry).run(data)
    assert local.status == "completed", local.errors
    assert local.context["b"] == 6
    adapter = InMemoryAdapter(FlowRuntime(registry=registry))
    run_id = adapter.start_workflow(data, {})
    adapter.drain()
    assert adapter.wait_for_result(run_id, timeout=5).context == local.context


# --- item 8: smaller ones ---------------------------------------------------------------------------


def test_mermaid_for_run_uses_edge_evaluate_events() -> None:
    """TS packages/core/src/analysis.ts (generateMermaidForRun: `edge:evaluate` with `result` true
    marks the edge taken): a dead edge between two nodes that both ran is not drawn as taken."""
    from flowcraft import generate_mermaid_for_run
    from flowcraft.testing import InMemoryEventLogger

    flow = (create_flow("dead_edge").node("a", lambda ctx: 1).node("c", lambda ctx: 2).node("b", lambda ctx: 3)
            .edge("a", "b", condition="false").edge("a", "c").edge("c", "b"))
    logger = InMemoryEventLogger()
    result = flow.run(FlowRuntime(event_bus=logger))
    assert result.status == "completed" and result.context["b"] == 3
    drawn = generate_mermaid_for_run(flow, logger.events)
    styled = {int(line.split()[1]) for line in drawn.splitlines() if line.strip().startswith("linkStyle")}
    assert styled == {1, 2}  # a->c and c->b; edge 0 (a->b) was evaluated and not taken


def test_context_delete_says_whether_the_key_existed_in_memory_and_in_a_worker() -> None:
    """TS packages/core/src/context.ts: `delete(key): boolean` (Map.delete)."""
    def drop(ctx: Any) -> Any:
        return [ctx.context.delete("k"), ctx.context.delete("k"), ctx.context.delete("never")]

    flow = create_flow("deleting").node("d", drop)
    result = both([flow], {"k": 1})
    assert result.context["d"] == [True, False, False]
    assert "k" not in result.context


def test_to_blueprint_of_a_flow_without_nodes_is_refused() -> None:
    """TS packages/core/src/flow.ts toBlueprint: "Cannot build a blueprint with no nodes."."""
    with pytest.raises(BlueprintError, match="has no nodes"):
        create_flow("nothing").to_blueprint()


def test_stepper_is_not_done_while_the_run_awaits() -> None:
    """TS packages/core/src/testing/stepper.ts `isDone()`: false while the run awaits."""
    from flowcraft.testing import Stepper

    flow = create_flow("stepwait").node("a", lambda ctx: 1).wait("w").edge("a", "w")
    stepper = Stepper(FlowRuntime(), flow, registry=flow.registry)
    assert stepper.step() == ["a"]
    assert stepper.step() == ["w"]
    assert stepper.ready == [] and not stepper.done
    assert stepper.run_to_end().status == "awaiting"


def test_lint_reports_the_target_of_a_dangling_edge_unreachable() -> None:
    """TS packages/core/src/linter.ts: start nodes come from all edges, so the target of an edge
    from an unknown node is no start node and is reported unreachable (ORPHAN_NODE)."""
    from flowcraft import lint_blueprint

    data = {"id": "dangling", "nodes": [{"id": "a", "uses": "x"}, {"id": "b", "uses": "x"}],
            "edges": [{"source": "ghost", "target": "b"}]}
    issues = {(i.code, i.node_id) for i in lint_blueprint(data, {"x": lambda ctx: 1}).issues}
    assert ("ORPHAN_NODE", "b") in issues
    assert any(code == "DANGLING_EDGE" for code, _ in issues)


def test_optional_chaining_reads_like_a_plain_access() -> None:
    """TS's default evaluator runs edge expressions as JavaScript, where `a?.b` is undefined when
    `a` is nullish: ours reads it as `a.b` (already None on a missing value); in a condition too."""
    from flowcraft.evaluator import SafeEvaluator

    ev = SafeEvaluator()
    assert ev.compile("a?.b?.c")({"a": {"b": {"c": 3}}}) == 3
    assert ev.compile("a?.b?.c")({"a": None}) is None
    assert ev.compile("a?.[1]")({"a": [5, 6]}) == 6
    assert ev.compile("'?.' == s")({"s": "?."}) is True
    flow = (create_flow("optchain").node("a", lambda ctx: {"user": None}).node("b", lambda ctx: "B")
            .node("c", lambda ctx: "C")
            .edge("a", "b", condition="result.output?.user?.name === null").edge("a", "c", condition="result.output?.user"))
    result = both([flow])
    assert result.status == "completed", result.errors
    assert result.context.get("b") == "B" and "c" not in result.context


# --- features -----------------------------------------------------------------------------------


def test_run_accepts_a_serialized_initial_context() -> None:
    """TS packages/core/src/runtime/runtime.ts `run(blueprint, initialState: Partial<T> | string)`:
    a string is deserialized with the runtime's serializer."""
    flow = create_flow("fromjson").node("a", lambda ctx: ctx.context.get("n") + 1)
    result = flow.run(FlowRuntime(), '{"n": 41}')
    assert result.status == "completed" and result.context["a"] == 42
    with pytest.raises(TypeError, match="must be a JSON object"):
        flow.run(FlowRuntime(), "[1, 2]")


def test_a_fatal_error_is_not_retried_and_carries_structured_fields() -> None:
    """TS packages/core/src/errors.ts (`FlowcraftError` options `cause`, `nodeId`, `blueprintId`,
    `executionId`, `isFatal`) and runtime/executors.ts (a fatal error is not retried)."""
    from flowcraft.errors import FlowcraftError

    calls: list = []

    def fatal(ctx: Any) -> None:
        calls.append(ctx.attempt)
        raise FlowcraftError("card declined for good", node_id=ctx.node_id, run_id=ctx.run_id,
                             cause=KeyError("card"), fatal=True)

    def flaky(ctx: Any) -> None:
        calls.append(("flaky", ctx.attempt))
        raise FlowcraftError("try again")

    flow = create_flow("fatal").node("charge", fatal, config={"maxRetries": 3})
    result = both([flow])
    assert result.status == "failed" and "card declined" in result.errors[0].message
    assert calls == [1, 1]  # one attempt in memory, one distributed
    calls.clear()
    assert both([create_flow("notfatal").node("f", flaky, config={"maxRetries": 3})]).status == "failed"
    assert calls == [("flaky", 1), ("flaky", 2), ("flaky", 3)] * 2
    error = FlowcraftError("x", node_id="n", blueprint_id="bp", run_id="r", cause=ValueError("v"), fatal=True)
    assert (error.node_id, error.blueprint_id, error.run_id, error.fatal) == ("n", "bp", "r", True)
    assert isinstance(error.__cause__, ValueError) and error.cause is error.__cause__
    assert FlowcraftError("plain").fatal is False and FlowcraftError("plain").node_id is None


def test_a_fatal_error_skips_the_fallbacks() -> None:
    """TS docs/api/errors.md (`FatalNodeExecutionError`: "It will not attempt any further retries or
    execute any configured fallbacks"): neither a fallback node nor a class node's `fallback` runs."""
    from flowcraft import BaseNode
    from flowcraft.errors import FlowcraftError

    ran: list = []

    def fatal(ctx: Any) -> None:
        raise FlowcraftError("gone for good", fatal=True)

    class Guarded(BaseNode):
        def exec(self, prep_result: Any, ctx: Any) -> Any:
            raise FlowcraftError("gone for good", fatal=True)

        def fallback(self, error: BaseException, ctx: Any) -> Any:
            ran.append("class fallback")
            return "recovered"

    flow = (create_flow("fatal-fallback").node("main", fatal, config={"fallback": "spare"})
            .node("spare", lambda ctx: ran.append("fallback node") or "spare"))
    result = both([flow])
    assert result.status == "failed" and "gone for good" in result.errors[0].message
    classy = both([create_flow("fatal-class").node("main", Guarded)])
    assert classy.status == "failed"
    assert ran == []
    plain = both([create_flow("plain-fallback").node("main", lambda ctx: 1 / 0, config={"fallback": "spare"})
                  .node("spare", lambda ctx: "spare")])
    assert plain.status == "completed"  # a plain error still goes to the fallback


def test_lint_reports_an_unknown_batch_worker_and_an_unknown_subflow_blueprint() -> None:
    """Issue 18's lint codes (TS's runtime refuses both when run: subflow.ts "Sub-blueprint '<id>'
    not found", the batch worker's unknown `uses`): found before any run."""
    from flowcraft import lint_blueprint

    flow = (create_flow("lintme").batch("b", lambda ctx: ctx.input, input_key="items", output_key="out")
            .subflow("s", "child_bp").edge("b", "s"))
    data = flow.to_blueprint().to_dict()
    codes = {(i.code, i.node_id) for i in lint_blueprint(data, {}, blueprints=["other"]).issues}
    assert ("UNKNOWN_BATCH_WORKER", "b_scatter") in codes
    assert ("UNKNOWN_SUBFLOW", "s") in codes
    clean = {i.code for i in lint_blueprint(data, flow.registry, blueprints=["child_bp"]).issues}
    assert not clean & {"UNKNOWN_BATCH_WORKER", "UNKNOWN_SUBFLOW"}
    runtime = FlowRuntime(registry=flow.registry, blueprints=[create_flow("child_bp").node("k", lambda ctx: 1)])
    assert not {i.code for i in lint_blueprint(data, runtime).issues} & {"UNKNOWN_BATCH_WORKER", "UNKNOWN_SUBFLOW"}


def test_sanitize_blueprint_drops_what_an_editor_adds() -> None:
    """TS packages/core/src/sanitizer.ts `sanitizeBlueprint`: only NodeDefinition/EdgeDefinition
    keys are kept (nodes/edges may be objects keyed by id); the default load stays lossless."""
    from flowcraft import sanitize_blueprint
    from flowcraft.blueprint import WorkflowBlueprint

    raw = {"id": "ui", "__proto__": {"polluted": True}, "viewport": {"x": 1},
           "nodes": {"a": {"id": "a", "uses": "u", "params": {"k": 1}, "position": {"x": 3}, "__proto__": {"x": 1},
                           "config": {"maxRetries": 2, "color": "red"}},
                     "b": {"id": "b", "uses": "u", "style": "bold"}},
           "edges": {"e1": {"source": "a", "target": "b", "animated": True, "constructor": "x"}}}
    bp = sanitize_blueprint(raw)
    assert bp.to_dict() == {"id": "ui", "nodes": [
        {"id": "a", "uses": "u", "params": {"k": 1}, "config": {"maxRetries": 2}}, {"id": "b", "uses": "u"}],
        "edges": [{"source": "a", "target": "b"}]}
    assert sanitize_blueprint(bp.to_json() if hasattr(bp, "to_json") else bp).to_dict() == bp.to_dict()
    kept = WorkflowBlueprint.from_dict(dict(raw, nodes=list(raw["nodes"].values()), edges=list(raw["edges"].values())))
    assert kept.to_dict()["nodes"][0]["position"] == {"x": 3}  # the lossless default
    result = FlowRuntime(registry={"u": lambda ctx: 1}).run(bp)
    assert result.status == "completed", result.errors
