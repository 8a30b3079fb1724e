"""Loops: `Flow.loop(...)` and the raw `loop-controller` wire form (SPEC §4, §5 "Loops")."""
from __future__ import annotations

from typing import Any, List, Optional

import pytest

from flowcraft import FlowRuntime, NodeResult, create_flow
from flowcraft.testing import InMemoryEventLogger


def make_counter(key: str = "i", laps: Optional[List[Any]] = None):
    """A node that increments context[key] and returns the new value (recording inputs in `laps`)."""

    def counter(ctx):
        if laps is not None:
            laps.append(ctx.input)
        value = ctx.context.get(key, 0) + 1
        ctx.context.set(key, value)
        return value

    return counter


# --- builder wiring ---------------------------------------------------------------------------


def test_loop_builder_emits_the_ts_wire_format():
    flow = (
        create_flow("wire")
        .node("body", make_counter())
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 5", max_iterations=50)
        .node("after", lambda ctx: ctx.input)
        .edge("lp", "after")
    )
    bp = flow.to_blueprint().to_dict()
    controller = next(n for n in bp["nodes"] if n["id"] == "lp")
    assert controller["uses"] == "loop-controller"
    assert controller["params"]["condition"] == "i < 5"
    assert controller["config"]["joinStrategy"] == "any"
    edges = [(e["source"], e["target"], e.get("action")) for e in bp["edges"]]
    assert ("body", "lp", None) in edges  # end -> controller
    assert ("lp", "body", "continue") in edges  # controller --continue--> start
    assert ("lp", "after", "break") in edges  # every other edge out of the controller is an exit


# --- while semantics --------------------------------------------------------------------------


def test_counter_loop_runs_to_five_and_exits_with_last_output():
    laps: List[Any] = []
    flow = (
        create_flow("counter")
        .node("body", make_counter(laps=laps))
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 5")
        .node("after", lambda ctx: {"final": ctx.input})
        .edge("lp", "after")
    )
    result = flow.run()
    assert result.status == "completed", result.errors
    assert result.errors == []
    assert result.context["i"] == 5
    assert len(laps) == 5
    # the continue edge carries the end node's output into the next lap
    assert laps == [None, 1, 2, 3, 4]
    assert result.context["_outputs.body"] == 5
    assert result.context["body"] == 5
    assert result.context["after"] == {"final": 5}
    assert result.skipped == []
    assert result.stalled == []


def test_condition_false_at_first_check_still_runs_body_once_when_nothing_enters_the_loop():
    # SPEC: "Each time the controller is reached it evaluates condition" -- nothing enters this loop,
    # so its body is a start node and the controller is first reached after it: the body runs once.
    # (An edge into the loop's id tests first: see the "entered at the controller" tests below.)
    laps: List[Any] = []
    flow = (
        create_flow("once")
        .node("body", make_counter(laps=laps))
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 0")
        .node("after", lambda ctx: "after ran")
        .edge("lp", "after")
    )
    result = flow.run()
    assert result.status == "completed"
    assert len(laps) == 1
    assert result.context["i"] == 1
    assert result.context["after"] == "after ran"


def test_loop_condition_reads_initial_context():
    flow = (
        create_flow("init-ctx")
        .node("body", make_counter())
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < limit")
    )
    result = flow.run(initial_context={"i": 10, "limit": 13})
    assert result.status == "completed"
    assert result.context["i"] == 13


def test_multi_node_body_runs_n_times_and_keeps_last_lap_outputs():
    trace: List[str] = []

    def start(ctx):
        trace.append("start")
        return {"lap": ctx.context.get("n", 0)}

    def mid(ctx):
        trace.append("mid")
        return ctx.input["lap"] * 10

    def end(ctx):
        trace.append("end")
        n = ctx.context.get("n", 0) + 1
        ctx.context.set("n", n)
        return {"n": n, "mid": ctx.input}

    flow = (
        create_flow("multi")
        .node("start", start)
        .node("mid", mid)
        .node("end", end)
        .edge("start", "mid")
        .edge("mid", "end")
        .loop("lp", start_node_id="start", end_node_id="end", condition="n < 3")
        .node("after", lambda ctx: ctx.input)
        .edge("lp", "after")
    )
    result = flow.run()
    assert result.status == "completed", result.errors
    assert trace == ["start", "mid", "end"] * 3
    assert result.context["n"] == 3
    # the outputs are those of the last lap (lap index 2)
    assert result.context["_outputs.start"] == {"lap": 2}
    assert result.context["_outputs.mid"] == 20
    assert result.context["_outputs.end"] == {"n": 3, "mid": 20}
    assert result.context["after"] == {"n": 3, "mid": 20}
    # the start node's stored input is the previous lap's end output (continue edge)
    assert result.context["_inputs.start"] == {"n": 2, "mid": 10}


def test_conditional_exit_edge_wins_over_loop_condition():
    flow = (
        create_flow("early")
        .node("body", make_counter())
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 10")
        .node("early", lambda ctx: {"left_at": ctx.context.get("i")})
        .edge("lp", "early", condition="i >= 3")
    )
    bp = flow.to_blueprint().to_dict()
    assert {"source": "lp", "target": "early", "action": "break", "condition": "i >= 3"} in bp["edges"]
    result = flow.run()
    assert result.status == "completed", result.errors
    assert result.context["i"] == 3  # the loop condition (i < 10) still held: the exit edge won
    assert result.context["early"] == {"left_at": 3}
    assert result.context["_outputs.lp"] == 3


def test_conditional_exit_edge_not_taken_when_loop_ends_normally():
    flow = (
        create_flow("early-not-taken")
        .node("body", make_counter())
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 2")
        .node("early", lambda ctx: "early")
        .node("done", lambda ctx: "done")
        .edge("lp", "early", condition="i >= 3")
        .edge("lp", "done")
    )
    result = flow.run()
    assert result.status == "completed", result.errors
    assert result.context["i"] == 2
    assert result.context["done"] == "done"
    assert "early" in result.skipped
    assert "_outputs.early" not in result.context


def test_max_iterations_fails_the_run_with_error_naming_the_loop():
    laps: List[Any] = []
    flow = (
        create_flow("runaway")
        .node("body", make_counter(laps=laps))
        .loop("spin", start_node_id="body", end_node_id="body", condition="true", max_iterations=7)
        .node("after", lambda ctx: "never")
        .edge("spin", "after")
    )
    result = flow.run()
    assert result.status == "failed"
    assert len(result.errors) == 1
    error = result.errors[0]
    assert error.node_id == "spin"
    assert "spin" in error.message
    assert "7" in error.message
    assert "maxiterations" in error.message.lower().replace("_", "")
    assert len(laps) == 7  # exactly max_iterations laps of the body ran
    assert "after" not in result.context
    assert result.to_dict()["errors"][0]["node_id"] == "spin"


def test_loop_after_fan_in():
    laps: List[Any] = []
    flow = (
        create_flow("fan-in-loop")
        .node("a", lambda ctx: "A")
        .node("b", lambda ctx: "B")
        .node("join", lambda ctx: ctx.input)
        .edge("a", "join")
        .edge("b", "join")
        .node("body", make_counter(laps=laps))
        .edge("join", "body")
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 4")
        .node("after", lambda ctx: ctx.input)
        .edge("lp", "after")
    )
    result = flow.run()
    assert result.status == "completed", result.errors
    assert result.context["join"] == {"a": "A", "b": "B"}
    assert laps == [{"a": "A", "b": "B"}, 1, 2, 3]  # first lap gets the join's output
    assert result.context["i"] == 4
    assert result.context["after"] == 4


def test_edge_into_loop_id_reaches_the_controller():
    laps: List[Any] = []
    flow = (
        create_flow("enter")
        .node("init", lambda ctx: ctx.context.set("i", 10))
        .node("body", make_counter(laps=laps))
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 13")
        .edge("init", "lp")
    )
    edges = [(e.source, e.target, e.action) for e in flow.to_blueprint().edges]
    assert ("init", "lp", None) in edges  # SPEC 5: edges into `id` enter the loop at its controller
    assert ("init", "body", None) not in edges
    result = flow.run()
    assert result.status == "completed", result.errors
    assert result.context["i"] == 13  # init ran first (10), then 3 laps
    assert len(laps) == 3


def test_loop_start_node_is_first_node_of_flow_with_successors():
    flow = (
        create_flow("first")
        .node("body", make_counter())
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 3")
        .node("x", lambda ctx: ctx.input * 100)
        .node("y", lambda ctx: ctx.input + 1)
        .edge("lp", "x")
        .edge("x", "y")
    )
    result = flow.run()
    assert result.status == "completed", result.errors
    assert result.context["i"] == 3
    assert result.context["x"] == 300
    assert result.context["y"] == 301


def test_loop_with_branch_inside_body():
    evens: List[int] = []
    odds: List[int] = []

    def route(ctx):
        i = ctx.context.get("i", 0) + 1
        ctx.context.set("i", i)
        return NodeResult(output=i, action="even" if i % 2 == 0 else "odd")

    flow = (
        create_flow("branchy")
        .node("r", route)
        .node("ev", lambda ctx: evens.append(ctx.input) or ctx.input)
        .node("od", lambda ctx: odds.append(ctx.input) or ctx.input)
        .node("m", lambda ctx: ctx.input)
        .edge("r", "ev", action="even")
        .edge("r", "od", action="odd")
        .edge("ev", "m")
        .edge("od", "m")
        .loop("lp", start_node_id="r", end_node_id="m", condition="i < 5")
    )
    result = flow.run()
    assert result.status == "completed", result.errors
    assert evens == [2, 4]
    assert odds == [1, 3, 5]
    assert result.context["m"] == 5
    assert result.stalled == []


def test_loop_with_concurrency_gives_same_result():
    flow = (
        create_flow("conc")
        .node("body", make_counter())
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 5")
        .node("after", lambda ctx: ctx.input)
        .edge("lp", "after")
    )
    result = flow.run(concurrency=4)
    assert result.status == "completed"
    assert result.context["i"] == 5
    assert result.context["after"] == 5


def test_loop_events_show_continue_then_break():
    log = InMemoryEventLogger()
    flow = (
        create_flow("ev")
        .node("body", make_counter())
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 3")
    )
    result = flow.run(FlowRuntime(event_bus=log))
    assert result.status == "completed"
    actions = [e.payload["action"] for e in log.of_type("node:finish") if e.payload["node_id"] == "lp"]
    assert actions == ["continue", "continue", "break"]
    body_iterations = [e.payload["iteration"] for e in log.of_type("node:start") if e.payload["node_id"] == "body"]
    assert body_iterations == [0, 1, 2]


# --- raw JSON -----------------------------------------------------------------------------------


def _raw_loop_blueprint(condition: str = "i < 4", **params: Any):
    return {
        "id": "raw-loop",
        "nodes": [
            {"id": "init", "uses": "init"},
            {"id": "body", "uses": "inc", "config": {"joinStrategy": "any"}},
            {"id": "lp", "uses": "loop-controller", "params": {"condition": condition, **params},
             "config": {"joinStrategy": "any"}},
            {"id": "after", "uses": "echo"},
        ],
        "edges": [
            {"source": "init", "target": "body"},
            {"source": "body", "target": "lp"},
            {"source": "lp", "target": "body", "action": "continue"},
            {"source": "lp", "target": "after", "action": "break"},
        ],
    }


def _raw_registry(laps: List[Any]):
    return {
        "init": lambda ctx: ctx.context.set("i", 0),
        "inc": make_counter(laps=laps),
        "echo": lambda ctx: {"got": ctx.input},
    }


def test_raw_json_loop_runs_through_runtime():
    laps: List[Any] = []
    runtime = FlowRuntime(registry=_raw_registry(laps))
    result = runtime.run(_raw_loop_blueprint())
    assert result.status == "completed", result.errors
    assert result.context["i"] == 4
    assert len(laps) == 4
    assert result.context["after"] == {"got": 4}


def test_raw_json_loop_max_iterations_param():
    laps: List[Any] = []
    runtime = FlowRuntime(registry=_raw_registry(laps))
    result = runtime.run(_raw_loop_blueprint("i < 100", maxIterations=3))
    assert result.status == "failed"
    assert result.errors[0].node_id == "lp"
    assert "lp" in result.errors[0].message
    assert len(laps) == 3


# --- nested loops ---------------------------------------------------------------------------------


def test_nested_loops():
    seen: List[tuple] = []

    def outer_start(ctx):
        ctx.context.set("j", 0)

    def inner(ctx):
        j = ctx.context.get("j", 0) + 1
        ctx.context.set("j", j)
        seen.append((ctx.context.get("k", 0), j))
        return j

    def outer_end(ctx):
        k = ctx.context.get("k", 0) + 1
        ctx.context.set("k", k)
        return k

    flow = (
        create_flow("nested")
        .node("os", outer_start)
        .node("inner", inner)
        .node("oe", outer_end)
        .edge("os", "inner")
        .loop("il", start_node_id="inner", end_node_id="inner", condition="j < 3")
        .edge("il", "oe")
        .loop("ol", start_node_id="os", end_node_id="oe", condition="k < 2")
        .node("after", lambda ctx: ctx.input)
        .edge("ol", "after")
    )
    result = flow.run()
    assert result.status == "completed", result.errors
    assert seen == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert result.context["k"] == 2
    assert result.context["after"] == 2
    assert result.stalled == []


# --- expectations where the SPEC is silent (flagged in the report) ----------------------------------


def test_loop_condition_accepts_ts_style_context_prefix():
    # Flowcraft TS documents loop conditions as `context.count < 5`; SPEC §2 says TS blueprints must
    # load unchanged, so a TS user expects this condition to loop, not to evaluate silently to false.
    flow = (
        create_flow("ts-cond")
        .node("body", make_counter())
        .loop("lp", start_node_id="body", end_node_id="body", condition="context.i < 5")
    )
    result = flow.run()
    assert result.status == "completed"
    assert result.context["i"] == 5


def test_edges_to_loop_declared_before_loop_call_are_wired_the_same():
    # A Python user expects builder calls to be order-independent: `.edge("init", "lp")` and
    # `.edge("lp", "after")` written before `.loop("lp", ...)` should mean the same thing.
    flow = (
        create_flow("order")
        .node("init", lambda ctx: ctx.context.set("i", 10))
        .node("body", make_counter())
        .node("after", lambda ctx: {"i": ctx.context.get("i")})
        .edge("init", "lp")
        .edge("lp", "after")
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 13")
    )
    result = flow.run()
    assert result.status == "completed", result.errors
    assert result.context["i"] == 13
    assert result.context.get("after") == {"i": 13}
    assert result.skipped == []


def test_loop_exit_joins_a_parallel_branch():
    flow = (
        create_flow("loop-join")
        .node("s", lambda ctx: "S")
        .node("x", lambda ctx: "X")
        .node("body", make_counter())
        .edge("s", "x")
        .edge("s", "body")
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 3")
        .node("j", lambda ctx: ctx.input)
        .edge("lp", "j")
        .edge("x", "j")
    )
    for concurrency in (1, 4):
        result = flow.run(concurrency=concurrency)
        assert result.status == "completed", result.errors
        # the join runs once, after the loop exits, with both predecessors' values
        assert result.context["j"] == {"lp": 3, "x": "X"}
        assert result.stalled == [] and result.skipped == []


def test_ts_builder_shaped_raw_loop_with_continue_transform():
    # the exact wire shape Flowcraft TS's builder emits: `<id>-loop` controller, a `continue` edge
    # carrying `transform: "context.<end node>"`, start/end nodes with joinStrategy "any"
    blueprint = {
        "id": "ts-loop",
        "nodes": [
            {"id": "initialize", "uses": "init"},
            {"id": "increment", "uses": "inc", "config": {"joinStrategy": "any"}},
            {"id": "counter-loop", "uses": "loop-controller", "params": {"condition": "count < 5"},
             "config": {"joinStrategy": "any"}},
        ],
        "edges": [
            {"source": "initialize", "target": "increment"},
            {"source": "increment", "target": "counter-loop"},
            {"source": "counter-loop", "target": "increment", "action": "continue",
             "transform": "context.increment"},
        ],
    }
    laps: List[Any] = []
    runtime = FlowRuntime(registry={
        "init": lambda ctx: ctx.context.set("count", 0),
        "inc": make_counter("count", laps),
    })
    result = runtime.run(blueprint)
    assert result.status == "completed", result.errors
    assert result.context["count"] == 5
    assert laps == [None, 1, 2, 3, 4]


def test_edge_out_of_end_node_is_a_loop_exit_like_ts():
    # SPEC is silent; Flowcraft TS's builder rewires every edge out of the loop's END node (other than
    # the one to the controller) into a `break` exit from the controller, so `.edge(end, "after")`
    # runs `after` once, after the loop, with the last lap's output.
    runs: List[Any] = []
    flow = (
        create_flow("end-edge")
        .node("body", make_counter())
        .node("after", lambda ctx: runs.append(ctx.input) or ctx.input)
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 3")
        .edge("body", "after")
    )
    result = flow.run()
    assert result.status == "completed", result.errors
    assert result.context["i"] == 3
    assert runs == [3]


# --- raw cycles: no loop controller -------------------------------------------------------------


def _raw_cycle_blueprint(exit_at=None):
    """s -> a -> b -> a, a cycle with no loop controller; with `exit_at`, b leaves it once i reaches it."""
    edges = [{"source": "s", "target": "a"}, {"source": "a", "target": "b"}]
    if exit_at is None:
        edges.append({"source": "b", "target": "a"})
    else:
        edges.append({"source": "b", "target": "a", "condition": f"i < {exit_at}"})
        edges.append({"source": "b", "target": "out", "condition": f"i >= {exit_at}"})
    nodes = [{"id": n, "uses": "count" if n == "a" else "pass"} for n in ("s", "a", "b", "out")]
    return {"id": "raw-cycle", "nodes": nodes if exit_at is not None else nodes[:3], "edges": edges}


def _raw_cycle_registry(calls):
    def count(ctx):
        calls.append(ctx.node_id)
        return make_counter()(ctx)

    return {"count": count, "pass": lambda ctx: ctx.input}


@pytest.mark.parametrize("concurrency", [1, 3])
def test_raw_cycle_without_a_controller_fails_at_the_default_cap(concurrency):
    calls: List[str] = []
    result = FlowRuntime(registry=_raw_cycle_registry(calls)).run(_raw_cycle_blueprint(), concurrency=concurrency)
    assert result.status == "failed"
    ((node_id, message, kind),) = [(e.node_id, e.message, e.type) for e in result.errors]
    assert (node_id, kind) == ("b", "LoopLimitError")
    assert "'a'" in message and "1000 iterations" in message and "max_cycle_iterations" in message
    assert len(calls) == 1000 and result.context["i"] == 1000


def test_max_cycle_iterations_is_a_runtime_option():
    from flowcraft import LoopLimitError  # exported, for users who catch it

    assert issubclass(LoopLimitError, Exception)
    calls: List[str] = []
    capped = FlowRuntime(registry=_raw_cycle_registry(calls), max_cycle_iterations=5).run(_raw_cycle_blueprint(1500))
    assert capped.status == "failed" and len(calls) == 5
    calls.clear()
    uncapped_runtime = FlowRuntime(registry=_raw_cycle_registry(calls), max_cycle_iterations=None)
    uncapped = uncapped_runtime.run(_raw_cycle_blueprint(1500))
    assert uncapped.status == "completed", uncapped.errors
    assert len(calls) == 1500 and uncapped.context["out"] == 1500
    calls.clear()
    under = FlowRuntime(registry=_raw_cycle_registry(calls)).run(_raw_cycle_blueprint(1000))
    assert under.status == "completed", under.errors  # exactly the cap: the last lap leaves the cycle
    assert len(calls) == 1000


def test_cycle_cap_does_not_apply_to_a_loop_controller():
    laps: List[Any] = []
    flow = (
        create_flow("long-loop")
        .node("body", make_counter(laps=laps))
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 1500", max_iterations=2000)
    )
    result = flow.run(FlowRuntime(max_cycle_iterations=10))
    assert result.status == "completed", result.errors
    assert result.context["i"] == 1500


# --- conditional exits win exclusively (SPEC 5 "Loops") -------------------------------------------


def _exits_flow(runs: List[str]):
    return (
        create_flow("exits")
        .node("body", make_counter())
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 10")
        .node("early", lambda ctx: runs.append("early") or "early")
        .node("normal", lambda ctx: runs.append("normal") or "normal")
        .edge("lp", "early", condition="i >= 3")
        .edge("lp", "normal")
    )


def _run_exits(driver: str, runs: List[str]):
    from flowcraft.testing import InMemoryAdapter

    flow = _exits_flow(runs)
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    if driver == "memory":
        return flow.run(runtime)
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow(flow.id, {})
    adapter.drain()
    return adapter.wait_for_result(run_id, timeout=5)


@pytest.mark.parametrize("driver", ["memory", "distributed"])
def test_a_true_conditional_exit_wins_over_the_unconditional_exit(driver):
    runs: List[str] = []
    result = _run_exits(driver, runs)
    assert result.status == "completed", result.errors
    assert result.context["i"] == 3
    assert runs == ["early"]  # the unconditional exit did not run as well
    assert "normal" in result.skipped and "normal" not in result.context


@pytest.mark.parametrize("driver", ["memory", "distributed"])
def test_the_unconditional_exit_is_taken_when_the_loop_breaks_by_its_own_condition(driver):
    runs: List[str] = []
    flow = _exits_flow(runs)
    from flowcraft.testing import InMemoryAdapter

    bp = flow.to_blueprint().to_dict()
    for node in bp["nodes"]:
        if node["id"] == "lp":
            node["params"]["condition"] = "i < 2"
    runtime = FlowRuntime(registry=flow.registry)
    if driver == "memory":
        result = runtime.run(bp)
    else:
        runtime.add_blueprint(bp)
        adapter = InMemoryAdapter(runtime)
        run_id = adapter.start_workflow("exits", {})
        adapter.drain()
        result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "completed", result.errors
    assert result.context["i"] == 2
    assert runs == ["normal"]
    assert "early" in result.skipped


# --- entered at the controller: the condition is tested before the body runs (SPEC 5, issue 18) ---


def _run_on(driver: str, blueprint: Any, registry: Any = None):
    """Run a flow or blueprint in memory or through the distributed driver on the in-memory fakes."""
    from flowcraft.testing import InMemoryAdapter

    runtime = FlowRuntime(registry=registry if registry is not None else getattr(blueprint, "registry", None))
    runtime.add_blueprint(blueprint)
    bp_id = blueprint["id"] if isinstance(blueprint, dict) else blueprint.id
    if driver == "memory":
        return runtime.run(bp_id if isinstance(blueprint, dict) else blueprint.to_blueprint(), {})
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow(bp_id, {})
    adapter.drain()
    return adapter.wait_for_result(run_id, timeout=5)


def _entered_flow(start: int, condition: str, laps: List[Any], **loop_options: Any):
    return (
        create_flow("entered")
        .node("init", lambda ctx: ctx.context.set("i", start) or "from init")
        .node("body", make_counter(laps=laps))
        .loop("lp", start_node_id="body", end_node_id="body", condition=condition, **loop_options)
        .node("after", lambda ctx: {"got": ctx.input})
        .edge("init", "lp")
        .edge("lp", "after")
    )


def _entered_raw(condition: str) -> dict:
    """SPEC 5's wire form entered at the controller: start -> lp, lp --continue--> body, body -> lp."""
    return {
        "id": "raw-entered",
        "nodes": [
            {"id": "start", "uses": "init"},
            {"id": "body", "uses": "inc"},
            {"id": "lp", "uses": "loop-controller", "params": {"condition": condition},
             "config": {"joinStrategy": "any"}},
            {"id": "end", "uses": "echo"},
        ],
        "edges": [
            {"source": "start", "target": "lp"},
            {"source": "lp", "target": "body", "action": "continue"},
            {"source": "body", "target": "lp"},
            {"source": "lp", "target": "end", "action": "break"},
        ],
    }


DRIVERS = ["memory", "distributed"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_entered_loop_whose_condition_is_false_on_entry_runs_its_body_zero_times(driver):
    laps: List[Any] = []
    result = _run_on(driver, _entered_flow(0, "i < 0", laps))
    assert result.status == "completed", result.errors
    assert laps == []
    assert result.context["i"] == 0
    assert "body" not in result.context and "_outputs.body" not in result.context
    assert result.context["after"] == {"got": "from init"}  # the break carries the entry's value
    assert result.skipped == ["body"]
    assert result.stalled == []


@pytest.mark.parametrize("driver", DRIVERS)
def test_raw_blueprint_entered_at_the_controller_runs_its_body_zero_times(driver):
    laps: List[Any] = []
    result = _run_on(driver, _entered_raw("false"), _raw_registry(laps))
    assert result.status == "completed", result.errors
    assert laps == []
    assert "i" in result.context and result.context["i"] == 0
    assert result.context["end"] == {"got": None}
    assert result.skipped == ["body"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_raw_blueprint_entered_at_the_controller_runs_its_body_while_the_condition_holds(driver):
    laps: List[Any] = []
    result = _run_on(driver, _entered_raw("i < 3"), _raw_registry(laps))
    assert result.status == "completed", result.errors
    assert laps == [None, 1, 2]
    assert result.context["i"] == 3
    assert result.context["end"] == {"got": 3}
    assert result.skipped == []


def test_a_raw_loop_entered_at_the_controller_does_not_start_at_its_body():
    from flowcraft import analyze_blueprint

    assert analyze_blueprint(_entered_raw("false")).start_node_ids == ("start",)
    # without an entry edge the body's start is a start node (the body runs first), as before
    bare = _entered_raw("false")
    bare["nodes"] = [n for n in bare["nodes"] if n["id"] != "start"]
    bare["edges"] = bare["edges"][1:]
    assert analyze_blueprint(bare).start_node_ids == ("body",)


@pytest.mark.parametrize("driver", DRIVERS)
def test_entered_loop_runs_its_body_three_times(driver):
    laps: List[Any] = []
    result = _run_on(driver, _entered_flow(0, "i < 3", laps))
    assert result.status == "completed", result.errors
    assert laps == ["from init", 1, 2]  # the first lap gets what entered the loop
    assert result.context["i"] == 3
    assert result.context["after"] == {"got": 3}
    assert result.skipped == []


@pytest.mark.parametrize("driver", DRIVERS)
def test_entered_loop_max_iterations_counts_body_runs(driver):
    laps: List[Any] = []
    result = _run_on(driver, _entered_flow(0, "true", laps, max_iterations=3))
    assert result.status == "failed"
    assert result.errors[0].node_id == "lp"
    assert "maxIterations=3" in result.errors[0].message
    assert len(laps) == 3  # as a loop entered at its body: max_iterations runs of the body


@pytest.mark.parametrize("driver", DRIVERS)
def test_entered_loop_with_max_iterations_equal_to_its_laps_completes(driver):
    laps: List[Any] = []
    result = _run_on(driver, _entered_flow(0, "i < 3", laps, max_iterations=3))
    assert result.status == "completed", result.errors
    assert len(laps) == 3


def test_entering_at_the_body_start_keeps_the_body_first_behaviour():
    # TS's builder wires `.edge("initialize", "increment")`: the body runs, then the controller decides
    laps: List[Any] = []
    flow = (
        create_flow("ts-entry")
        .node("init", lambda ctx: ctx.context.set("i", 0))
        .node("body", make_counter(laps=laps))
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 0")
        .edge("init", "body")
    )
    result = flow.run()
    assert result.status == "completed", result.errors
    assert len(laps) == 1


def _exits_entered(start: int, runs: List[str], laps: List[Any]):
    return (
        create_flow("exits-entered")
        .node("init", lambda ctx: ctx.context.set("i", start))
        .node("body", make_counter(laps=laps))
        .loop("lp", start_node_id="body", end_node_id="body", condition="i < 10")
        .node("early", lambda ctx: runs.append("early") or "early")
        .node("normal", lambda ctx: runs.append("normal") or "normal")
        .edge("init", "lp")
        .edge("lp", "early", condition="i >= 3")
        .edge("lp", "normal")
    )


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_true_conditional_exit_on_entry_leaves_before_the_body_runs(driver):
    runs: List[str] = []
    laps: List[Any] = []
    result = _run_on(driver, _exits_entered(5, runs, laps))
    assert result.status == "completed", result.errors
    assert laps == []
    assert runs == ["early"]
    assert sorted(result.skipped) == ["body", "normal"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_conditional_exit_of_an_entered_loop_wins_after_some_laps(driver):
    runs: List[str] = []
    laps: List[Any] = []
    result = _run_on(driver, _exits_entered(0, runs, laps))
    assert result.status == "completed", result.errors
    assert len(laps) == 3
    assert result.context["i"] == 3
    assert runs == ["early"]
    assert result.skipped == ["normal"]


def _nested_entered(seen: List[tuple], inner_condition: str):
    def outer_start(ctx):
        ctx.context.set("j", 0)
        return ctx.context.get("k", 0)

    def inner(ctx):
        j = ctx.context.get("j", 0) + 1
        ctx.context.set("j", j)
        seen.append((ctx.context.get("k", 0), j))
        return j

    def outer_end(ctx):
        k = ctx.context.get("k", 0) + 1
        ctx.context.set("k", k)
        return k

    return (
        create_flow("nested-entered")
        .node("init", lambda ctx: ctx.context.set("k", 0))
        .node("os", outer_start)
        .node("inner", inner)
        .node("oe", outer_end)
        .loop("il", start_node_id="inner", end_node_id="inner", condition=inner_condition, max_iterations=3)
        .edge("os", "il")  # both loops are entered at their controllers
        .edge("il", "oe")
        .loop("ol", start_node_id="os", end_node_id="oe", condition="k < 3")
        .edge("init", "ol")
        .node("after", lambda ctx: ctx.input)
        .edge("ol", "after")
    )


@pytest.mark.parametrize("driver", DRIVERS)
def test_nested_entered_loops_start_the_inner_loop_over_on_each_outer_lap(driver):
    seen: List[tuple] = []
    result = _run_on(driver, _nested_entered(seen, "j < 3"))
    # max_iterations=3 on the inner loop: its laps reset on every outer lap, or the second would fail
    assert result.status == "completed", result.errors
    assert seen == [(k, j) for k in range(3) for j in (1, 2, 3)]
    assert result.context["after"] == 3
    assert result.skipped == [] and result.stalled == []


@pytest.mark.parametrize("driver", DRIVERS)
def test_nested_entered_inner_loop_false_on_entry_is_skipped_each_outer_lap(driver):
    seen: List[tuple] = []
    result = _run_on(driver, _nested_entered(seen, "j < 0"))
    assert result.status == "completed", result.errors
    assert seen == []
    assert result.context["k"] == 3
    assert result.context["oe"] == 3
    # in memory `skipped` lists each lap's skip, distributed the final states (a difference that predates this)
    assert set(result.skipped) == {"inner"}


@pytest.mark.parametrize("driver", DRIVERS)
def test_nested_entered_inner_loop_runs_fewer_laps_each_outer_lap(driver):
    seen: List[tuple] = []
    result = _run_on(driver, _nested_entered(seen, "j < 2 - k"))
    assert result.status == "completed", result.errors
    assert seen == [(0, 1), (0, 2), (1, 1)]  # 2 laps, then 1, then none: tested on each entry
    assert result.context["k"] == 3
    # the outer lap starts the inner body over, so on the last outer lap it is skipped, not left done
    assert result.skipped[-1:] == ["inner"]
    assert result.stalled == []
