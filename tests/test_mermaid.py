"""Mermaid diagrams of blueprints and of runs."""
from __future__ import annotations

import re

import pytest

from flowcraft.blueprint import WorkflowBlueprint
from flowcraft.events import Event
from flowcraft.mermaid import generate_mermaid, generate_mermaid_for_run, mermaid_ids
from flowcraft.result import WorkflowError, WorkflowResult


def node(node_id, uses="work", **extra):
    return {"id": node_id, "uses": uses, **extra}


def edge(source, target, **extra):
    return {"source": source, "target": target, **extra}


SMALL = {
    "id": "small",
    "nodes": [node("a", "fetch"), node("b", "check"), node("c", "ship")],
    "edges": [edge("a", "b"), edge("b", "c", action="ok", condition="result.output > 0")],
}


def lines(text):
    return text.splitlines()


def edge_lines(text):
    return [line for line in lines(text) if re.search(r" -\.?->", line)]


def class_members(text, cls):
    for line in lines(text):
        match = re.fullmatch(rf"    class (\S+) {cls}", line)
        if match:
            return set(match.group(1).split(","))
    return set()


def linkstyled(text):
    return [int(m) for m in re.findall(r"^    linkStyle (\d+) ", text, flags=re.M)]


# ------------------------------------------------------------------------------------------------
# generate_mermaid
# ------------------------------------------------------------------------------------------------
def test_small_flow_exact_output():
    assert generate_mermaid(SMALL) == "\n".join([
        "flowchart TD",
        '    a["a<br/>fetch"]',
        '    b["b<br/>check"]',
        '    c["c<br/>ship"]',
        "    a --> b",
        '    b -->|"ok / result.output > 0"| c',
    ])


def test_accepts_blueprint_object_and_flow():
    from flowcraft import create_flow

    assert generate_mermaid(WorkflowBlueprint.from_dict(SMALL)) == generate_mermaid(SMALL)
    flow = create_flow("f").node("x", "ux").node("y", "uy").edge("x", "y")
    out = generate_mermaid(flow)
    assert '    x["x<br/>ux"]' in lines(out) and "    x --> y" in lines(out)


def test_edge_labels_action_only_condition_only_and_none():
    bp = {
        "id": "labels",
        "nodes": [node("a"), node("b"), node("c"), node("d")],
        "edges": [edge("a", "b", action="yes"), edge("a", "c", condition="x == 1"),
                  edge("a", "d", transform="input.x")],
    }
    assert edge_lines(generate_mermaid(bp)) == [
        '    a -->|"yes"| b',
        '    a -->|"x == 1"| c',
        "    a --> d",
    ]


def test_ids_with_dash_and_dot_are_sanitised_and_unique():
    bp = {
        "id": "ids",
        "nodes": [node("fetch-order"), node("fetch.order"), node("fetch_order"), node("end"), node("a b")],
        "edges": [edge("fetch-order", "fetch.order"), edge("fetch.order", "fetch_order"),
                  edge("fetch_order", "end"), edge("end", "a b")],
    }
    out = generate_mermaid(bp)
    ids = mermaid_ids(["fetch-order", "fetch.order", "fetch_order", "end", "a b"])
    assert ids["fetch_order"] == "fetch_order"  # an already safe id keeps itself
    assert len(set(ids.values())) == 5
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", v) for v in ids.values())
    assert ids["end"] != "end"  # a Mermaid keyword
    node_lines = [line for line in lines(out)[1:] if "[" in line]
    declared = [line.split("[", 1)[0].strip() for line in node_lines]
    assert declared == [ids[n] for n in ["fetch-order", "fetch.order", "fetch_order", "end", "a b"]]
    assert f'    {ids["fetch-order"]}["fetch-order<br/>work"]' in lines(out)
    assert f'    {ids["fetch.order"]}["fetch.order<br/>work"]' in lines(out)
    assert edge_lines(out) == [
        f'    {ids["fetch-order"]} --> {ids["fetch.order"]}',
        f'    {ids["fetch.order"]} --> fetch_order',
        f'    fetch_order --> {ids["end"]}',
        f'    {ids["end"]} --> {ids["a b"]}',
    ]
    # deterministic
    assert generate_mermaid(bp) == out
    assert mermaid_ids(["fetch-order", "fetch.order"]) == mermaid_ids(["fetch-order", "fetch.order"])


def test_labels_are_escaped():
    bp = {
        "id": "esc",
        "nodes": [node("a", 'say "hi" <b>'), node("b")],
        "edges": [edge("a", "b", condition='result.output == "x"')],
    }
    out = generate_mermaid(bp)
    assert '    a["a<br/>say #quot;hi#quot; #lt;b>"]' in lines(out)
    assert '    a -->|"result.output == #quot;x#quot;"| b' in lines(out)
    body = "\n".join(lines(out)[1:])
    # every label is one quoted string: no raw quote inside
    for line in body.splitlines():
        assert line.count('"') in (0, 2), line


def test_shapes_and_dashed_continue_edges():
    bp = {
        "id": "shapes",
        "nodes": [
            node("start"),
            node("body"),
            node("ctl", "loop-controller", params={"condition": "i < 3"}, config={"joinStrategy": "any"}),
            node("hold", "wait"),
            node("nap", "sleep", params={"duration": 5}),
        ],
        "edges": [edge("start", "body"), edge("body", "ctl"), edge("ctl", "body", action="continue"),
                  edge("ctl", "hold", action="break"), edge("hold", "nap")],
    }
    out = lines(generate_mermaid(bp))
    assert '    ctl{"ctl<br/>loop-controller"}' in out
    assert '    hold(["hold<br/>wait"])' in out
    assert '    nap{{"nap<br/>sleep"}}' in out
    assert '    body["body<br/>work"]' in out
    assert '    ctl -.->|"continue"| body' in out
    assert '    ctl -->|"break"| hold' in out
    assert "    body --> ctl" in out


def test_fallback_link_is_drawn_after_the_edges():
    bp = {"id": "fb", "nodes": [node("a", config={"fallback": "cache"}), node("cache"), node("b")],
          "edges": [edge("a", "b")]}
    assert edge_lines(generate_mermaid(bp)) == ["    a --> b", '    a -.->|"fallback"| cache']


# ------------------------------------------------------------------------------------------------
# generate_mermaid_for_run
# ------------------------------------------------------------------------------------------------
RUN_BP = {
    "id": "run",
    "nodes": [node("a"), node("b"), node("c"), node("d")],
    "edges": [edge("a", "b"), edge("a", "c"), edge("a", "d"), edge("d", "b")],
}


def assert_run_styling(out, executed, skipped, failed):
    assert "    classDef executed " in out and "    classDef skipped " in out and "    classDef failed " in out
    assert re.search(r"classDef executed .*fill:#c8e6c9", out)  # green
    assert re.search(r"classDef skipped .*stroke-dasharray", out)  # dashed grey
    assert re.search(r"classDef failed .*fill:#ffcdd2", out)  # red
    assert class_members(out, "executed") == executed
    assert class_members(out, "skipped") == skipped
    assert class_members(out, "failed") == failed


def test_run_from_workflow_result():
    result = WorkflowResult(
        status="completed", context={"_outputs.a": 1}, skipped=["b"],
        errors=[WorkflowError("c", "boom", "ValueError")],
    )
    out = generate_mermaid_for_run(RUN_BP, result)
    assert out.startswith(generate_mermaid(RUN_BP) + "\n")
    assert_run_styling(out, {"a"}, {"b"}, {"c"})
    assert linkstyled(out) == []  # no edge joins two executed nodes


def test_run_edges_between_executed_nodes_are_highlighted():
    result = WorkflowResult(
        status="completed", context={"_outputs.a": 1, "_outputs.d": 2, "_outputs.b": 3}, skipped=["c"],
    )
    out = generate_mermaid_for_run(RUN_BP, result)
    assert_run_styling(out, {"a", "b", "d"}, {"c"}, set())
    # edges: 0 a->b, 1 a->c, 2 a->d, 3 d->b
    assert linkstyled(out) == [0, 2, 3]
    assert "    linkStyle 0 stroke:" in out


def test_run_from_events():
    events = [
        Event("workflow:start", {"run_id": "r"}),
        Event("node:start", {"node_id": "a"}),
        Event("node:finish", {"node_id": "a", "output": 1}),
        Event("node:skipped", {"node_id": "b"}),
        Event("node:start", {"node_id": "c"}),
        Event("node:error", {"node_id": "c", "error": "boom"}),
        Event("workflow:finish", {"run_id": "r"}),
    ]
    out = generate_mermaid_for_run(RUN_BP, events)
    assert_run_styling(out, {"a"}, {"b"}, {"c"})
    assert out == generate_mermaid_for_run(RUN_BP, WorkflowResult(
        status="failed", context={"_outputs.a": 1}, skipped=["b"], errors=[WorkflowError("c", "boom")],
    ))


def test_run_from_serialised_forms():
    result = WorkflowResult(status="completed", context={"_outputs.a": 1}, skipped=["b"])
    assert generate_mermaid_for_run(RUN_BP, result.to_dict()) == generate_mermaid_for_run(RUN_BP, result)
    events = [{"type": "node:finish", "payload": {"node_id": "a"}}, {"type": "node:skipped", "payload": {"node_id": "b"}}]
    assert generate_mermaid_for_run(RUN_BP, events) == generate_mermaid_for_run(RUN_BP, result)


def test_run_classes_use_safe_ids_and_ignore_unknown_nodes():
    bp = {"id": "x", "nodes": [node("fetch-order"), node("ship.it")], "edges": [edge("fetch-order", "ship.it")]}
    ids = mermaid_ids(["fetch-order", "ship.it"])
    result = WorkflowResult(
        status="completed",
        context={"_outputs.fetch-order": 1, "_outputs.ship.it": 2, "_outputs.worker_0": 3},
    )
    out = generate_mermaid_for_run(bp, result)
    assert class_members(out, "executed") == {ids["fetch-order"], ids["ship.it"]}
    assert linkstyled(out) == [0]


def test_a_node_gets_one_class_failed_first():
    events = [Event("node:finish", {"node_id": "a"}), Event("node:skipped", {"node_id": "a"}),
              Event("node:finish", {"node_id": "b"}), Event("node:error", {"node_id": "b"})]
    out = generate_mermaid_for_run(RUN_BP, events)
    assert class_members(out, "executed") == {"a"}
    assert class_members(out, "failed") == {"b"}
    assert class_members(out, "skipped") == set()


def test_awaiting_nodes_get_their_own_class():
    bp = {"id": "w", "nodes": [node("a"), node("hold", "wait")], "edges": [edge("a", "hold")]}
    result = WorkflowResult(status="awaiting", context={"_outputs.a": 1}, awaiting=["hold"])
    out = generate_mermaid_for_run(bp, result)
    assert class_members(out, "awaiting") == {"hold"}
    assert "classDef awaiting" in out
    assert "classDef awaiting" not in generate_mermaid_for_run(bp, WorkflowResult("completed", {}))


# ------------------------------------------------------------------------------------------------
# end to end with the in-memory runtime
# ------------------------------------------------------------------------------------------------
def _runtime_available():
    try:
        from flowcraft import CallbackEventBus, FlowRuntime, create_flow  # noqa: F401
    except Exception:  # the runtime is being built concurrently
        return False
    return True


@pytest.mark.skipif(not _runtime_available(), reason="flowcraft.runtime is not importable")
def test_end_to_end_if_else_marks_untaken_branch_skipped():
    from flowcraft import CallbackEventBus, FlowRuntime, NodeResult, create_flow

    flow = create_flow("if-else")
    flow.node("check", lambda ctx: NodeResult(output=ctx.input, action="big" if ctx.input > 10 else "small"),
              inputs="amount")
    flow.node("big-branch", lambda ctx: "big")
    flow.node("small.branch", lambda ctx: "small")
    flow.node("merge", lambda ctx: ctx.input)
    flow.edge("check", "big-branch", action="big")
    flow.edge("check", "small.branch", action="small")
    flow.edge("big-branch", "merge").edge("small.branch", "merge")

    events = []
    result = flow.run(FlowRuntime(event_bus=CallbackEventBus(events.append)), {"amount": 50})
    assert result.status == "completed", result.errors
    assert result.skipped == ["small.branch"]

    blueprint = flow.to_blueprint()
    ids = mermaid_ids(n.id for n in blueprint.nodes)
    for diagram in (generate_mermaid_for_run(blueprint, result), generate_mermaid_for_run(blueprint, events)):
        assert class_members(diagram, "executed") == {"check", ids["big-branch"], "merge"}
        assert class_members(diagram, "skipped") == {ids["small.branch"]}
        assert class_members(diagram, "failed") == set()
        # edges: 0 check->big, 1 check->small, 2 big->merge, 3 small->merge
        assert linkstyled(diagram) == [0, 2]
