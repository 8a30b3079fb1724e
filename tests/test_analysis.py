"""Static tooling: `analyze_blueprint` and `lint_blueprint`."""
from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcraft import create_flow
from flowcraft.analysis import (
    BUILTIN_USES,
    BlueprintAnalysis,
    LintIssue,
    LintResult,
    analyze_blueprint,
    lint_blueprint,
)
from flowcraft.blueprint import WorkflowBlueprint
from flowcraft.errors import BlueprintError
from flowcraft.graph import start_node_ids


def node(node_id, uses="work", **extra):
    return {"id": node_id, "uses": uses, **extra}


def edge(source, target, **extra):
    return {"source": source, "target": target, **extra}


DIAMOND = {
    "id": "diamond",
    "nodes": [node("a"), node("b"), node("c"), node("d")],
    "edges": [edge("a", "b"), edge("a", "c"), edge("b", "d"), edge("c", "d")],
}


def codes(result: LintResult):
    return [issue.code for issue in result.issues]


# ------------------------------------------------------------------------------------------------
# analyze_blueprint
# ------------------------------------------------------------------------------------------------
def test_diamond_start_terminal_and_dag():
    analysis = analyze_blueprint(DIAMOND)
    assert isinstance(analysis, BlueprintAnalysis)
    assert analysis.start_node_ids == ("a",)
    assert analysis.terminal_node_ids == ("d",)
    assert analysis.cycles == []
    assert analysis.is_dag is True
    assert analysis.node_count == 4
    assert analysis.edge_count == 4


def test_accepts_blueprint_object_and_json():
    blueprint = WorkflowBlueprint.from_dict(DIAMOND)
    assert analyze_blueprint(blueprint) == analyze_blueprint(DIAMOND)
    assert analyze_blueprint(json.dumps(DIAMOND)) == analyze_blueprint(DIAMOND)


def test_start_nodes_are_the_graph_rule():
    blueprint = WorkflowBlueprint.from_dict({
        "id": "fb",
        "nodes": [node("a", config={"fallback": "cache"}), node("cache"), node("b"), node("lonely")],
        "edges": [edge("a", "b")],
    })
    analysis = analyze_blueprint(blueprint)
    assert analysis.start_node_ids == start_node_ids(blueprint) == ("a", "lonely")
    # a fallback-only node (no edge at all) is not terminal; a lone regular node is
    assert analysis.terminal_node_ids == ("b", "lonely")


def test_fallback_node_with_edges_is_terminal_when_it_has_no_outgoing_edge():
    analysis = analyze_blueprint({
        "id": "fb2",
        "nodes": [node("a", config={"fallback": "cache"}), node("cache"), node("b")],
        "edges": [edge("a", "b"), edge("b", "cache")],
    })
    assert analysis.terminal_node_ids == ("cache",)


def test_cycle_found_with_its_nodes_in_order():
    analysis = analyze_blueprint({
        "id": "cyc",
        "nodes": [node("s"), node("a"), node("b"), node("c"), node("out")],
        "edges": [edge("s", "a"), edge("a", "b"), edge("b", "c"), edge("c", "a"), edge("c", "out")],
    })
    assert analysis.is_dag is False
    assert analysis.cycles == [["a", "b", "c"]]
    assert analysis.start_node_ids == ("s",)
    assert analysis.terminal_node_ids == ("out",)


def test_self_loop_and_several_cycles_are_deterministic():
    bp = {
        "id": "multi",
        "nodes": [node("s"), node("a"), node("b"), node("c")],
        "edges": [edge("s", "a"), edge("a", "b"), edge("b", "b"), edge("b", "a"), edge("s", "c"),
                  edge("c", "s")],
    }
    first = analyze_blueprint(bp).cycles
    assert first == [["b"], ["a", "b"], ["s", "c"]]
    assert all(analyze_blueprint(copy.deepcopy(bp)).cycles == first for _ in range(5))


def test_loop_controller_continue_edge_is_a_cycle():
    bp = {
        "id": "loop",
        "nodes": [node("init"), node("body"), node("ctl", "loop-controller", params={"condition": "i < 3"},
                                                  config={"joinStrategy": "any"}), node("done")],
        "edges": [edge("init", "body"), edge("body", "ctl"), edge("ctl", "body", action="continue"),
                  edge("ctl", "done", action="break")],
    }
    analysis = analyze_blueprint(bp)
    assert analysis.start_node_ids == ("init",)
    assert analysis.terminal_node_ids == ("done",)
    assert analysis.cycles == [["body", "ctl"]]
    assert not analysis.is_dag


def test_cycle_unreachable_from_start_is_still_found():
    analysis = analyze_blueprint({
        "id": "island",
        "nodes": [node("s"), node("x"), node("y")],
        "edges": [edge("x", "y"), edge("y", "x")],
    })
    assert analysis.start_node_ids == ("s",)
    assert analysis.cycles == [["x", "y"]]


def test_long_chain_does_not_hit_recursion_limit():
    n = 5000
    bp = {
        "id": "chain",
        "nodes": [node(f"n{i}") for i in range(n)],
        "edges": [edge(f"n{i}", f"n{i + 1}") for i in range(n - 1)] + [edge(f"n{n - 1}", "n0")],
    }
    analysis = analyze_blueprint(bp)
    assert analysis.start_node_ids == ()
    assert len(analysis.cycles) == 1 and len(analysis.cycles[0]) == n
    assert analysis.cycles[0][0] == "n0" and analysis.cycles[0][-1] == f"n{n - 1}"


def test_analysis_of_invalid_dict_raises_blueprint_error():
    with pytest.raises(BlueprintError):
        analyze_blueprint({"id": "bad", "nodes": [node("a")], "edges": [edge("a", "ghost")]})


def test_analysis_is_hashable_and_serialisable():
    analysis = analyze_blueprint(DIAMOND)
    hash(analysis)
    assert json.loads(json.dumps(analysis.to_dict()))["start_node_ids"] == ["a"]


# ------------------------------------------------------------------------------------------------
# lint_blueprint: a clean blueprint
# ------------------------------------------------------------------------------------------------
CLEAN = {
    "id": "clean",
    "nodes": [
        node("fetch", "fetch-order", config={"fallback": "fetch-cache", "joinStrategy": "all", "maxRetries": 2}),
        node("fetch-cache", "read-cache"),
        node("ship", "ship-order"),
        node("ctl", "loop-controller", params={"condition": "context.count < 3"}, config={"joinStrategy": "any"}),
        node("pause", "wait"),
    ],
    "edges": [
        edge("fetch", "ship", action="ok", condition="result.output.total > 0", transform="input.items"),
        edge("ship", "ctl"),
        edge("ctl", "ship", action="continue"),
        edge("ctl", "pause", action="break"),
    ],
}
CLEAN_REGISTRY = {"fetch-order": object, "read-cache": object, "ship-order": object}


def test_clean_blueprint_has_no_issues():
    result = lint_blueprint(CLEAN, registry=CLEAN_REGISTRY)
    assert result == LintResult(is_valid=True, issues=())
    # and it does load
    WorkflowBlueprint.from_dict(CLEAN)


def test_clean_blueprint_object_and_json_forms():
    assert lint_blueprint(WorkflowBlueprint.from_dict(CLEAN)).issues == ()
    assert lint_blueprint(json.dumps(CLEAN)).issues == ()


def test_registry_may_be_a_registry_or_a_runtime_like_object():
    from flowcraft.node import Registry

    registry = Registry({key: (lambda ctx: None) for key in CLEAN_REGISTRY})
    assert lint_blueprint(CLEAN, registry).is_valid

    class RuntimeLike:
        def __init__(self, registry):
            self.registry = registry

    assert lint_blueprint(CLEAN, RuntimeLike(dict(CLEAN_REGISTRY))).is_valid
    assert codes(lint_blueprint(CLEAN, RuntimeLike({}))) == ["UNKNOWN_USES"] * 3


# ------------------------------------------------------------------------------------------------
# lint_blueprint: one minimal blueprint per code
# ------------------------------------------------------------------------------------------------
CASES = {
    "UNKNOWN_USES": ({"id": "x", "nodes": [node("a", "nope")], "edges": []}, {"other": 1}),
    "DANGLING_EDGE": ({"id": "x", "nodes": [node("a")], "edges": [edge("a", "ghost")]}, None),
    "ORPHAN_NODE": (
        {"id": "x", "nodes": [node("a"), node("b"), node("c")], "edges": [edge("a", "b"), edge("c", "c")]},
        None,
    ),
    "DUPLICATE_ID": ({"id": "x", "nodes": [node("a"), node("a")], "edges": []}, None),
    "BAD_EXPRESSION": (
        {"id": "x", "nodes": [node("a"), node("b")], "edges": [edge("a", "b", condition="result.output >")]},
        None,
    ),
    "LOOP_WITHOUT_CONTINUE": (
        {"id": "x", "nodes": [node("a"), node("l", "loop-controller", params={"condition": "true"})],
         "edges": [edge("a", "l")]},
        None,
    ),
    "UNKNOWN_FALLBACK": ({"id": "x", "nodes": [node("a", config={"fallback": "nowhere"})], "edges": []}, None),
    "MISSING_FIELD": ({"id": "x", "nodes": [{"id": "a"}], "edges": []}, None),
    "BAD_JOIN_STRATEGY": ({"id": "x", "nodes": [node("a", config={"joinStrategy": "some"})], "edges": []}, None),
    "BAD_CONFIG": ({"id": "x", "nodes": [node("a", config={"maxRetries": 0})], "edges": []}, None),
    "BAD_SHAPE": ({"id": "x", "nodes": [node("a", params=[1, 2])], "edges": []}, None),
}


@pytest.mark.parametrize("code", sorted(CASES))
def test_each_code_is_triggered_by_a_minimal_blueprint(code):
    blueprint, registry = CASES[code]
    before = copy.deepcopy(blueprint)
    result = lint_blueprint(blueprint, registry=registry)
    assert codes(result) == [code], result.issues
    assert blueprint == before  # lint never mutates its input
    issue = result.issues[0]
    assert issue.message
    if code == "ORPHAN_NODE":
        assert issue.severity == "warning"
        assert result.is_valid is True
    else:
        assert issue.severity == "error"
        assert result.is_valid is False
    # the clean blueprint never shows it
    assert code not in codes(lint_blueprint(CLEAN, registry=CLEAN_REGISTRY))


def test_messages_name_the_node_or_edge_at_fault():
    result = lint_blueprint(CASES["DANGLING_EDGE"][0])
    (issue,) = result.issues
    assert issue.node_id == "a" and issue.edge_index == 0
    assert "'ghost'" in issue.message and "edge #0" in issue.message

    (issue,) = lint_blueprint(CASES["UNKNOWN_FALLBACK"][0]).issues
    assert issue.node_id == "a" and "'nowhere'" in issue.message

    (issue,) = lint_blueprint(*CASES["UNKNOWN_USES"]).issues
    assert issue.node_id == "a" and "'nope'" in issue.message

    (issue,) = lint_blueprint(CASES["ORPHAN_NODE"][0]).issues
    assert issue.node_id == "c" and "'c'" in issue.message

    (issue,) = lint_blueprint(CASES["LOOP_WITHOUT_CONTINUE"][0]).issues
    assert issue.node_id == "l"

    (issue,) = lint_blueprint(CASES["BAD_EXPRESSION"][0]).issues
    assert issue.node_id == "a" and issue.edge_index == 0 and "result.output >" in issue.message


def test_unknown_uses_needs_a_registry_and_builtins_are_known():
    bp = {"id": "x", "nodes": [node("a", "nope")], "edges": []}
    assert lint_blueprint(bp).issues == ()
    builtins = {
        "id": "b",
        "nodes": [node(f"n{i}", uses) for i, uses in enumerate(sorted(BUILTIN_USES - {"loop-controller"}))],
        "edges": [],
    }
    assert lint_blueprint(builtins, registry={}).issues == ()
    assert BUILTIN_USES == {"loop-controller", "batch-scatter", "batch-gather", "wait", "webhook", "sleep", "subflow"}


def test_fallback_only_nodes_are_not_orphans():
    bp = {"id": "x", "nodes": [node("a", config={"fallback": "cache"}), node("cache")], "edges": []}
    assert lint_blueprint(bp).issues == ()


def test_loop_continue_edge_does_not_hide_the_start_node():
    # the loop body's only incoming edges are the entry and the continue edge
    bp = {
        "id": "x",
        "nodes": [node("body"), node("ctl", "loop-controller", params={"condition": "true"})],
        "edges": [edge("body", "ctl"), edge("ctl", "body", action="continue")],
    }
    assert lint_blueprint(bp).issues == ()


def test_bad_transform_and_loop_condition_are_bad_expressions():
    bp = {
        "id": "x",
        "nodes": [node("a"), node("b"), node("l", "loop-controller", params={"condition": "x.__class__"})],
        "edges": [edge("a", "b", transform="input["), edge("b", "l"), edge("l", "a", action="continue"),
                  edge("a", "b", condition=42)],
    }
    result = lint_blueprint(bp)
    assert codes(result) == ["BAD_EXPRESSION"] * 3
    assert [i.node_id for i in result.issues] == ["l", "a", "a"]


def test_dangling_source_also_makes_its_target_an_orphan():
    """As TS's linter (start nodes from analyzeBlueprint over every edge): the edge from "ghost"
    still enters "a", so "a" is no start node and unreachable."""
    bp = {"id": "x", "nodes": [node("a")], "edges": [edge("ghost", "a")]}
    assert codes(lint_blueprint(bp)) == ["DANGLING_EDGE", "ORPHAN_NODE"]


def test_missing_fields_everywhere():
    bp = {"nodes": [{"uses": "u"}, {"id": "b"}], "edges": [{"source": "b"}, {}]}
    result = lint_blueprint(bp)
    assert codes(result) == ["MISSING_FIELD"] * 6
    assert not result.is_valid


def test_no_start_node_is_not_reported_for_an_empty_blueprint():
    assert lint_blueprint({"id": "x", "nodes": [], "edges": []}).issues == ()


def test_thoroughly_broken_dict_returns_issues_and_never_raises():
    broken = {
        "id": 12,
        "metadata": "v1",
        "nodes": [
            None,
            "a string",
            {"id": ["not", "hashable"], "uses": {"x": 1}},
            {"id": "a", "uses": "loop-controller", "params": "p", "inputs": 3,
             "config": {"joinStrategy": ["x"], "fallback": {"a": 1}, "maxRetries": True, "retryDelay": -1,
                        "timeout": "soon"}},
            {"id": "a", "uses": "u", "config": "fast"},
            {"id": "z", "uses": "u", "config": {"fallback": "nope"}},
        ],
        "edges": [
            7,
            {"source": ["a"], "target": {"b": 1}},
            {"source": "a", "target": "a", "condition": "__import__('os')", "transform": "(",
             "action": 5},
        ],
    }
    result = lint_blueprint(broken, registry={})
    assert not result.is_valid
    found = set(codes(result))
    assert {"BAD_SHAPE", "DUPLICATE_ID", "BAD_JOIN_STRATEGY", "BAD_CONFIG", "UNKNOWN_FALLBACK",
            "LOOP_WITHOUT_CONTINUE", "BAD_EXPRESSION", "UNKNOWN_USES"} <= found
    assert all(isinstance(i, LintIssue) and i.severity in ("error", "warning") for i in result.issues)
    # deterministic
    assert lint_blueprint(copy.deepcopy(broken), registry={}) == result


@pytest.mark.parametrize("value", [
    None, 42, "not json", "[1, 2]", b"{}", [], {"nodes": 5, "edges": "x"}, {"nodes": {"a": 1}},
    {"id": "x", "nodes": None}, {"id": "x", "nodes": [], "edges": [None, 1, "s"]}, object(),
])
def test_garbage_never_raises(value):
    result = lint_blueprint(value)
    assert isinstance(result, LintResult)
    assert result.is_valid is False
    assert result.issues


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
node_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["a", "b", "c", "", None, 1]),
        "uses": st.sampled_from(["u", "loop-controller", "wait", None, 3]),
        "config": st.fixed_dictionaries({}, optional={
            "fallback": st.sampled_from(["a", "b", "zz", None, 2]),
            "joinStrategy": st.sampled_from(["all", "any", "bad", None]),
            "maxRetries": st.sampled_from([1, 0, "x", None]),
        }) | json_values,
        "params": json_values,
    },
)
edge_like = st.fixed_dictionaries(
    {},
    optional={
        "source": st.sampled_from(["a", "b", "c", "ghost", None, 5]),
        "target": st.sampled_from(["a", "b", "c", "ghost", None]),
        "action": st.sampled_from(["continue", "break", None, 1]),
        "condition": st.sampled_from(["x > 1", "x >", None, "a.__b", 3]),
    },
)


@settings(max_examples=200)
@given(
    st.fixed_dictionaries({}, optional={
        "id": json_values,
        "nodes": st.lists(node_like | json_values, max_size=5) | json_values,
        "edges": st.lists(edge_like | json_values, max_size=5) | json_values,
    })
)
def test_lint_never_raises_and_valid_means_loadable(data):
    result = lint_blueprint(data)
    assert all(i.severity in ("error", "warning") for i in result.issues)
    assert result.is_valid == all(i.severity == "warning" for i in result.issues)
    if result.is_valid:
        WorkflowBlueprint.from_dict(data)  # what lint accepts, the loader accepts


def test_lint_result_helpers():
    result = lint_blueprint({"id": "x", "nodes": [node("a"), node("b", config={"fallback": "q"}), node("c")],
                             "edges": [edge("a", "c"), edge("c", "c")]})
    assert result.codes == ("UNKNOWN_FALLBACK", "UNBOUNDED_CYCLE")  # c -> c has no loop controller
    assert [i.code for i in result.errors] == ["UNKNOWN_FALLBACK"]
    assert [i.code for i in result.warnings] == ["UNBOUNDED_CYCLE"]
    result = lint_blueprint(CASES["ORPHAN_NODE"][0])
    assert result.warnings == result.issues and result.errors == ()
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["issues"][0]["code"] == "ORPHAN_NODE" and payload["is_valid"] is True


def test_unbounded_cycle_is_a_warning_on_reachable_cycles_without_a_loop_controller():
    raw = {"id": "x", "nodes": [node("s"), node("a"), node("b")],
           "edges": [edge("s", "a"), edge("a", "b"), edge("b", "a")]}
    result = lint_blueprint(raw)
    assert result.is_valid and result.codes == ("UNBOUNDED_CYCLE",)
    (issue,) = result.issues
    assert issue.node_id == "b" and issue.severity == "warning"
    assert "'a' -> 'b' -> 'a'" in issue.message and "max_cycle_iterations" in issue.message
    # a loop controller on the cycle bounds it: the builder's loop and the TS shape (edge into the controller)
    looped = create_flow("l").node("s", lambda ctx: 0).node("body", lambda ctx: 1).edge("s", "body")
    looped.loop("lp", start_node_id="body", end_node_id="body", condition="false")
    assert "UNBOUNDED_CYCLE" not in lint_blueprint(looped).codes
    controller = node("lp", uses="loop-controller", params={"condition": "false"})
    ts_shaped = {"id": "x", "nodes": [node("s"), node("body"), controller],
                 "edges": [edge("s", "lp"), edge("lp", "body", action="continue"), edge("body", "lp")]}
    assert "UNBOUNDED_CYCLE" not in lint_blueprint(ts_shaped).codes
    # a cycle no start node reaches never runs: ORPHAN_NODE says enough
    assert lint_blueprint(CASES["ORPHAN_NODE"][0]).codes == ("ORPHAN_NODE",)


# ------------------------------------------------------------------------------------------------
# UNKNOWN_NAME (SPEC 5 "Strict expressions")
# ------------------------------------------------------------------------------------------------
NAMES = {
    "id": "names",
    "nodes": [
        node("calc", "calc", inputs={"order": "order_in"}),
        node("ship", "ship"),
        node("done", "done"),
        node("ctl", "loop-controller", params={"condition": "tries < 3"}, config={"joinStrategy": "any"}),
    ],
    "edges": [
        edge("calc", "ship", condition="result.output.total > 0 and calc.total > 0 and order_in and _outputs.calc"),
        edge("ship", "ctl", transform="{'n': input, 'c': context.x}"),
        edge("ctl", "ship", action="continue"),
        edge("ctl", "done", action="break", condition="totl > 0"),
    ],
}


def test_unknown_names_are_warnings_without_context_keys():
    result = lint_blueprint(NAMES)
    assert result.is_valid  # nodes may write keys lint cannot see
    assert [(i.code, i.severity, i.node_id, i.edge_index) for i in result.issues] == [
        ("UNKNOWN_NAME", "warning", "ctl", None), ("UNKNOWN_NAME", "warning", "ctl", 3),
    ]
    assert result.issues[0].message == ("node 'ctl': loop condition 'tries < 3' reads 'tries', which is not a node "
                                        "id, a key some node's inputs name, nor in context_keys")


def test_unknown_names_are_errors_when_context_keys_are_given():
    result = lint_blueprint(NAMES, context_keys=["tries", "total"])
    assert not result.is_valid
    (issue,) = result.issues
    assert (issue.code, issue.severity, issue.edge_index) == ("UNKNOWN_NAME", "error", 3)
    assert issue.message == ("edge #3 ('ctl' -> 'done'): condition 'totl > 0' reads 'totl', which is not a node "
                             "id, a key some node's inputs name, nor in context_keys (did you mean 'total'?)")
    assert lint_blueprint(NAMES, context_keys=["tries", "totl"]).issues == ()


def test_a_pure_cycle_is_a_no_start_node_warning_naming_where_a_run_starts():
    """TS `GraphTraverser` (not strict) starts a graph without a start node at each cycle's entry
    (`metadata.cycleEntryPoints`, else the cycle's first node): lint warns, and names that entry."""
    cycle = {"id": "x", "nodes": [node("a"), node("b")], "edges": [edge("a", "b"), edge("b", "a")],
             "metadata": {"cycleEntryPoints": ["b"]}}
    result = lint_blueprint(cycle)
    assert codes(result) == ["NO_START_NODE", "UNBOUNDED_CYCLE"], result.issues
    first = result.issues[0]
    assert first.severity == "warning" and "'b'" in first.message and "strict" in first.message
    assert not [i for i in result.issues if i.code == "ORPHAN_NODE"]
