"""The builder (SPEC section 4): `create_flow(id)` -> `Flow`, deterministic `uses` keys, running."""
from __future__ import annotations

import json

import pytest

from flowcraft import (
    BaseNode,
    BlueprintError,
    CancelToken,
    Flow,
    FlowRuntime,
    NodeConfig,
    NodeContext,
    NodeResult,
    WorkflowBlueprint,
    WorkflowResult,
    create_flow,
)

MODULE = __name__


def fetch(ctx: NodeContext):
    return NodeResult(output={"id": ctx.input, "items": [1, 2, 3]}, action="found")


def ship(ctx: NodeContext):
    return {"shipped": ctx.input}


class Multiply(BaseNode):
    def exec(self, prep_result, ctx):
        return NodeResult(output=ctx.input * self.params["factor"])


class Tools:
    @staticmethod
    def count(ctx: NodeContext):
        return len(ctx.input)


def make_closure(offset: int):
    def add(ctx: NodeContext):
        return ctx.input + offset

    return add


def build_order_flow() -> Flow:
    """Built twice by the tests: must give equal blueprints and equal registry keys."""
    return (
        create_flow("order")
        .node("fetch", fetch, inputs="orderId", max_retries=3, retry_delay=0.5, timeout=2)
        .node("count", Tools.count)
        .node("double", lambda ctx: ctx.input * 2)
        .node("plus-ten", make_closure(10))
        .node("multiply", Multiply, params={"factor": 3})
        .node("ship.eu", ship)
        .edge("fetch", "count", action="found", transform="input.items")
        .edge("count", "double")
        .edge("double", "plus-ten")
        .edge("plus-ten", "multiply")
        .edge("multiply", "ship.eu", condition="result.output > 0")
    )


# --------------------------------------------------------------------------------------------
# uses keys and the registry
# --------------------------------------------------------------------------------------------


def test_create_flow_returns_a_flow():
    flow = create_flow("x")
    assert isinstance(flow, Flow)


def test_uses_keys_are_module_qualname_or_flow_and_node_id():
    bp = build_order_flow().to_blueprint()
    uses = {n.id: n.uses for n in bp.nodes}
    assert uses == {
        "fetch": f"{MODULE}.fetch",
        "count": f"{MODULE}.Tools.count",
        "double": "order.double",  # a lambda
        "plus-ten": "order.plus-ten",  # a closure
        "multiply": f"{MODULE}.Multiply",
        "ship.eu": f"{MODULE}.ship",
    }


def test_registry_maps_the_generated_keys_to_the_implementations():
    flow = build_order_flow()
    bp = flow.to_blueprint()
    assert set(flow.registry) == {n.uses for n in bp.nodes}
    assert flow.registry[f"{MODULE}.fetch"] is fetch
    assert flow.registry[f"{MODULE}.Multiply"] is Multiply
    assert flow.registry[f"{MODULE}.Tools.count"] is Tools.count
    assert flow.registry["order.double"](NodeContext(None, input=4)) == 8
    assert flow.registry["order.plus-ten"](NodeContext(None, input=4)) == 14


def test_building_the_same_flow_twice_gives_equal_blueprints():
    first, second = build_order_flow(), build_order_flow()
    assert first.to_blueprint() == second.to_blueprint()
    assert first.to_blueprint().to_dict() == second.to_blueprint().to_dict()
    assert first.to_blueprint().to_json() == second.to_blueprint().to_json()
    assert set(first.registry) == set(second.registry)


def test_local_functions_get_flow_and_node_id_keys():
    def local(ctx):
        return 1

    flow = create_flow("f-1").node("step.a", local).node("step-b", lambda ctx: 2)
    assert [n.uses for n in flow.to_blueprint().nodes] == ["f-1.step.a", "f-1.step-b"]


def test_one_function_used_by_two_nodes_shares_one_key():
    flow = create_flow("twice").node("a", ship).node("b", ship).edge("a", "b")
    bp = flow.to_blueprint()
    assert bp.nodes[0].uses == bp.nodes[1].uses == f"{MODULE}.ship"
    assert list(flow.registry) == [f"{MODULE}.ship"]


# --------------------------------------------------------------------------------------------
# Node and edge options
# --------------------------------------------------------------------------------------------


def test_node_options_are_seconds_in_python_and_milliseconds_on_the_wire():
    bp = build_order_flow().to_blueprint()
    node = bp.nodes[0]
    assert node.inputs == "orderId"
    assert node.config.max_retries == 3
    assert node.config.retry_delay == pytest.approx(0.5)
    assert node.config.timeout == pytest.approx(2)
    wire = bp.to_dict()["nodes"][0]
    assert wire["config"] == {"maxRetries": 3, "retryDelay": 500, "timeout": 2000}
    assert wire["inputs"] == "orderId"
    assert bp.to_dict()["nodes"][4]["params"] == {"factor": 3}


def test_fallback_and_join_strategy_keywords():
    flow = (create_flow("kw")
            .node("a", ship, fallback="b")
            .node("b", ship)
            .node("c", ship, join_strategy="any")
            .edge("a", "c"))
    wire = flow.to_blueprint().to_dict()
    assert wire["nodes"][0]["config"] == {"fallback": "b"}
    assert wire["nodes"][2]["config"] == {"joinStrategy": "any"}
    assert "config" not in wire["nodes"][1]


def test_config_given_as_wire_dict_or_node_config():
    flow = (create_flow("cfg")
            .node("wire", ship, config={"maxRetries": 2, "retryDelay": 250, "timeout": 1000})
            .node("obj", ship, config=NodeConfig(timeout=1.5), max_retries=4))
    wire_node, obj_node = flow.to_blueprint().nodes
    assert wire_node.config.max_retries == 2
    assert wire_node.config.retry_delay == pytest.approx(0.25)
    assert wire_node.config.timeout == pytest.approx(1.0)
    assert obj_node.config.timeout == pytest.approx(1.5)
    assert obj_node.config.max_retries == 4
    assert flow.to_blueprint().to_dict()["nodes"][1]["config"] == {"maxRetries": 4, "timeout": 1500}


def test_unknown_node_option_is_a_type_error():
    with pytest.raises(TypeError):
        create_flow("x").node("a", ship, retries=3)


def test_edge_options_reach_the_wire_form():
    wire = build_order_flow().to_blueprint().to_dict()
    assert wire["edges"][0] == {"source": "fetch", "target": "count", "action": "found", "transform": "input.items"}
    assert wire["edges"][-1] == {"source": "multiply", "target": "ship.eu", "condition": "result.output > 0"}
    assert wire["edges"][1] == {"source": "count", "target": "double"}


def test_built_blueprint_round_trips_through_json():
    bp = build_order_flow().to_blueprint()
    assert isinstance(bp, WorkflowBlueprint)
    assert WorkflowBlueprint.from_json(bp.to_json()) == bp
    assert WorkflowBlueprint.from_dict(json.loads(bp.to_json())).to_dict() == bp.to_dict()


def test_to_blueprint_validates():
    with pytest.raises(BlueprintError) as info:
        create_flow("bad").node("a", ship).edge("a", "ghost").to_blueprint()
    assert any("ghost" in p for p in info.value.problems)
    with pytest.raises(BlueprintError):
        create_flow("dup").node("a", ship).node("a", fetch).to_blueprint()
    with pytest.raises(BlueprintError):
        create_flow("cond").node("a", ship).node("b", ship).edge("a", "b", condition="(((").to_blueprint()
    with pytest.raises(BlueprintError):
        create_flow("join").node("a", ship, join_strategy="first").to_blueprint()


def test_to_blueprint_reflects_later_changes():
    flow = create_flow("grow").node("a", ship)
    assert [n.id for n in flow.to_blueprint().nodes] == ["a"]
    flow.node("b", ship).edge("a", "b")
    bp = flow.to_blueprint()
    assert [n.id for n in bp.nodes] == ["a", "b"]
    assert [(e.source, e.target) for e in bp.edges] == [("a", "b")]


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def test_flow_run_uses_a_default_runtime_and_its_registry():
    result = build_order_flow().run(initial_context={"orderId": "o-1"})
    assert isinstance(result, WorkflowResult)
    assert result.status == "completed", result.errors
    ctx = result.context
    assert ctx["fetch"] == {"id": "o-1", "items": [1, 2, 3]}
    assert ctx["_inputs.count"] == [1, 2, 3]
    assert ctx["count"] == 3
    assert ctx["double"] == 6
    assert ctx["plus-ten"] == 16
    assert ctx["multiply"] == 48
    assert ctx["ship.eu"] == {"shipped": 48}
    assert ctx["_outputs.ship.eu"] == {"shipped": 48}


def test_flow_run_with_a_runtime_and_options():
    seen = {}

    def uses_deps(ctx):
        seen["db"] = ctx.dependencies["db"]
        seen["run_id"] = ctx.run_id
        return "ok"

    flow = create_flow("deps").node("a", uses_deps).node("b", lambda ctx: ctx.input + "!").edge("a", "b")
    runtime = FlowRuntime(dependencies={"db": "the-db"})
    result = flow.run(runtime, {"seed": 1}, concurrency=2, run_id="r-7")
    assert result.status == "completed", result.errors
    assert result.run_id == "r-7"
    assert seen == {"db": "the-db", "run_id": "r-7"}
    assert result.context["b"] == "ok!"
    assert result.context["seed"] == 1


def test_flow_run_passes_cancel_through():
    token = CancelToken()
    ran = []

    def cancels(ctx):
        ran.append(ctx.node_id)
        token.cancel()

    flow = create_flow("c").node("a", cancels).node("b", lambda ctx: ran.append("b")).edge("a", "b")
    result = flow.run(cancel=token)
    assert result.status == "cancelled"
    assert ran == ["a"]


def test_built_blueprint_runs_on_a_separate_runtime_from_its_wire_form():
    flow = build_order_flow()
    wire = json.loads(flow.to_blueprint().to_json())
    result = FlowRuntime(registry=flow.registry).run(wire, {"orderId": "o-2"})
    assert result.status == "completed", result.errors
    assert result.context["ship.eu"] == {"shipped": 48}


def test_builder_retry_options_are_honoured_at_run_time():
    attempts = []

    def flaky(ctx):
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise IOError("flaky")
        return "ok"

    result = create_flow("retry").node("f", flaky, max_retries=3, retry_delay=0.01).run()
    assert result.status == "completed", result.errors
    assert attempts == [1, 2, 3]


def test_builder_timeout_is_seconds():
    import time

    def slow(ctx):
        for _ in range(100):
            if ctx.cancel.cancelled:
                return "late"
            time.sleep(0.01)
        return "late"

    result = create_flow("to").node("s", slow, timeout=0.05).run()
    assert result.status == "failed"
    assert result.errors[0].node_id == "s"


def test_building_and_running_twice_gives_the_same_context():
    first = build_order_flow().run(initial_context={"orderId": 3})
    second = build_order_flow().run(initial_context={"orderId": 3})
    assert first.status == second.status == "completed"
    assert first.context == second.context
