"""The blueprint wire model (SPEC section 2): loading, round trips, units, and validation."""
from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowcraft
from flowcraft import (
    BlueprintError,
    EdgeDefinition,
    FlowRuntime,
    NodeConfig,
    NodeDefinition,
    WorkflowBlueprint,
)

# The example of SPEC section 2, verbatim.
SPEC_EXAMPLE_JSON = """
{"id": "order", "metadata": {"version": "1.2.0"},
 "nodes": [{"id": "fetch", "uses": "fetch-order", "params": {}, "inputs": "orderId",
            "config": {"maxRetries": 3, "retryDelay": 1000, "timeout": 5000,
                       "fallback": "fetch-cache", "joinStrategy": "all"}},
           {"id": "fetch-cache", "uses": "read-cache"},
           {"id": "ship", "uses": "ship-order"}],
 "edges": [{"source": "fetch", "target": "ship", "action": "ok",
            "condition": "result.output.total > 0", "transform": "input.items"}]}
"""
SPEC_EXAMPLE = json.loads(SPEC_EXAMPLE_JSON)

# A Flowcraft TS blueprint carrying keys this model does not know, at every level.
TS_WITH_EXTRAS = {
    "id": "ts-authored",
    "name": "Made in the TS visual editor",
    "metadata": {"version": "2.0.0", "author": "ts", "tags": ["a", "b"], "nested": {"deep": [1, {"x": None}]}},
    "nodes": [
        {
            "id": "start.node",
            "uses": "begin",
            "params": {"limit": 10, "opts": {"nested": True}},
            "data": {"label": "Start", "position": {"x": 10, "y": 20}},
            "config": {"maxRetries": 2, "retryDelay": 250, "timeout": 1500, "joinStrategy": "any",
                       "customBackoff": "exponential", "tsOnly": {"a": 1}},
        },
        {"id": "end-node", "uses": "finish", "inputs": {"value": "start.node"}, "ui": {"color": "red"}},
    ],
    "edges": [
        {"source": "start.node", "target": "end-node", "action": "done", "condition": "result.output > 1",
         "transform": "input * 2", "id": "edge-1", "label": "when done", "style": {"dashed": True}},
    ],
    "inputs": {"foo": "bar"},
    "outputs": ["end-node"],
}


# --------------------------------------------------------------------------------------------
# Loading and round trips
# --------------------------------------------------------------------------------------------


def test_spec_example_loads_into_python_attributes():
    bp = WorkflowBlueprint.from_dict(copy.deepcopy(SPEC_EXAMPLE))
    assert bp.id == "order"
    assert bp.metadata == {"version": "1.2.0"}
    assert [n.id for n in bp.nodes] == ["fetch", "fetch-cache", "ship"]
    fetch = bp.nodes[0]
    assert isinstance(fetch, NodeDefinition)
    assert fetch.uses == "fetch-order"
    assert fetch.params == {}
    assert fetch.inputs == "orderId"
    assert isinstance(fetch.config, NodeConfig)
    assert fetch.config.max_retries == 3
    assert fetch.config.retry_delay == pytest.approx(1.0)  # 1000 ms on the wire
    assert fetch.config.timeout == pytest.approx(5.0)  # 5000 ms on the wire
    assert fetch.config.fallback == "fetch-cache"
    assert fetch.config.join_strategy == "all"
    assert bp.nodes[1].uses == "read-cache"
    assert bp.nodes[2].uses == "ship-order"
    (edge,) = bp.edges
    assert isinstance(edge, EdgeDefinition)
    assert (edge.source, edge.target, edge.action, edge.condition, edge.transform) == (
        "fetch", "ship", "ok", "result.output.total > 0", "input.items",
    )


def test_spec_example_round_trips_through_dict_and_json():
    original = copy.deepcopy(SPEC_EXAMPLE)
    bp = WorkflowBlueprint.from_dict(original)
    assert original == SPEC_EXAMPLE, "from_dict must not mutate its input"
    assert bp.to_dict() == SPEC_EXAMPLE
    assert json.loads(bp.to_json()) == SPEC_EXAMPLE
    again = WorkflowBlueprint.from_json(SPEC_EXAMPLE_JSON)
    assert again == bp
    assert WorkflowBlueprint.from_json(bp.to_json()) == bp
    assert WorkflowBlueprint.from_json(bp.to_json().encode()) == bp


def test_unknown_keys_at_every_level_round_trip_losslessly():
    original = copy.deepcopy(TS_WITH_EXTRAS)
    bp = WorkflowBlueprint.from_dict(original)
    assert original == TS_WITH_EXTRAS
    assert bp.to_dict() == TS_WITH_EXTRAS
    assert json.loads(bp.to_json()) == TS_WITH_EXTRAS
    assert WorkflowBlueprint.from_json(json.dumps(TS_WITH_EXTRAS)).to_dict() == TS_WITH_EXTRAS
    # Known keys still land on the Python attributes.
    node = bp.nodes[0]
    assert node.config.max_retries == 2
    assert node.config.retry_delay == pytest.approx(0.25)
    assert node.config.timeout == pytest.approx(1.5)
    assert node.config.join_strategy == "any"
    assert bp.nodes[1].inputs == {"value": "start.node"}
    assert bp.edges[0].action == "done"


def test_round_trip_keeps_the_json_text_of_numbers():
    """Lossless means the JSON text too: 1000 ms stays `1000`, not `1000.0`."""
    bp = WorkflowBlueprint.from_json(SPEC_EXAMPLE_JSON)
    config = bp.to_dict()["nodes"][0]["config"]
    assert json.dumps(config["retryDelay"]) == "1000"
    assert json.dumps(config["timeout"]) == "5000"


@settings(max_examples=150, deadline=None)
@given(
    retry=st.one_of(st.integers(0, 10**9), st.sampled_from([0.5, 1.5, 2.7, 0.1, 33.3, 1234.5])),
    timeout=st.integers(0, 10**9),
    retries=st.integers(1, 50),
)
def test_millisecond_values_round_trip_exactly(retry, timeout, retries):
    wire = {"id": "x", "nodes": [{"id": "a", "uses": "u", "config": {
        "maxRetries": retries, "retryDelay": retry, "timeout": timeout}}], "edges": []}
    bp = WorkflowBlueprint.from_dict(wire)
    assert bp.nodes[0].config.retry_delay == pytest.approx(retry / 1000)
    assert bp.nodes[0].config.timeout == pytest.approx(timeout / 1000)
    assert bp.to_dict() == wire
    assert json.dumps(bp.to_dict(), sort_keys=True) == json.dumps(wire, sort_keys=True)


def test_explicit_nulls_round_trip():
    """A TS blueprint may spell absent optional fields as `null` (JSON.stringify keeps null).

    SPEC: blueprints "round-trip losslessly"; it does not single out nulls.
    """
    wire = {
        "id": "nulls", "metadata": None,
        "nodes": [{"id": "a", "uses": "u", "params": None, "inputs": None,
                   "config": {"fallback": None, "maxRetries": None}}],
        "edges": [{"source": "a", "target": "a", "action": None, "condition": None, "transform": None}],
    }
    bp = WorkflowBlueprint.from_dict(copy.deepcopy(wire))
    assert bp.nodes[0].params is None and bp.edges[0].action is None
    assert bp.to_dict() == wire


def test_seconds_in_python_milliseconds_on_the_wire():
    config = NodeConfig(max_retries=4, retry_delay=0.25, timeout=2, fallback="f", join_strategy="any")
    assert config.to_dict() == {"maxRetries": 4, "retryDelay": 250, "timeout": 2000,
                                "fallback": "f", "joinStrategy": "any"}
    back = NodeConfig.from_dict({"maxRetries": 4, "retryDelay": 250, "timeout": 2000,
                                 "fallback": "f", "joinStrategy": "any"})
    assert (back.max_retries, back.retry_delay, back.timeout, back.fallback, back.join_strategy) == (
        4, pytest.approx(0.25), pytest.approx(2.0), "f", "any")
    assert NodeConfig.from_dict({"retryDelay": 1}).retry_delay == pytest.approx(0.001)


def test_definitions_built_in_python_serialise_to_the_wire_form():
    bp = WorkflowBlueprint(
        "py",
        [NodeDefinition("a-1", "do-a", params={"k": 1}, inputs={"x": "y"},
                        config=NodeConfig(timeout=1.5, retry_delay=0.1)),
         NodeDefinition("b.2", "do-b")],
        [EdgeDefinition("a-1", "b.2", action="go", condition="result.output", transform="input")],
        {"version": "1"},
    )
    wire = bp.to_dict()
    assert wire == {
        "id": "py", "metadata": {"version": "1"},
        "nodes": [{"id": "a-1", "uses": "do-a", "params": {"k": 1}, "inputs": {"x": "y"},
                   "config": {"retryDelay": 100, "timeout": 1500}},
                  {"id": "b.2", "uses": "do-b"}],
        "edges": [{"source": "a-1", "target": "b.2", "action": "go", "condition": "result.output",
                   "transform": "input"}],
    }
    assert WorkflowBlueprint.from_dict(wire) == bp
    assert WorkflowBlueprint.from_json(bp.to_json()) == bp


def test_node_and_edge_definitions_round_trip_on_their_own():
    node_wire = {"id": "n.1-x", "uses": "u", "params": {"a": [1]}, "inputs": "k",
                 "config": {"maxRetries": 1, "joinStrategy": "any", "extra": True}, "tsField": 1}
    assert NodeDefinition.from_dict(node_wire).to_dict() == node_wire
    edge_wire = {"source": "a", "target": "b", "condition": "true", "tsField": {"x": 1}}
    edge = EdgeDefinition.from_dict(edge_wire)
    assert edge.condition == "true" and edge.action is None
    assert edge.to_dict() == edge_wire


def test_node_ids_with_dashes_and_dots_are_valid():
    wire = {"id": "ids", "nodes": [{"id": "fetch-order.v2", "uses": "u"}, {"id": "ship.to-eu", "uses": "u"}],
            "edges": [{"source": "fetch-order.v2", "target": "ship.to-eu"}]}
    bp = WorkflowBlueprint.from_dict(wire)
    assert [n.id for n in bp.nodes] == ["fetch-order.v2", "ship.to-eu"]
    assert bp.to_dict() == wire


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _problems(data) -> list:
    with pytest.raises(BlueprintError) as info:
        WorkflowBlueprint.from_dict(data)
    problems = info.value.problems
    assert isinstance(problems, list) and problems and all(isinstance(p, str) for p in problems)
    # "one clear BlueprintError listing every problem": the message lists them all.
    for problem in problems:
        assert problem in str(info.value)
    return problems


def _has(problems, *needles) -> bool:
    return any(all(n in p for n in needles) for p in problems)


def test_validation_lists_every_semantic_problem_at_once():
    data = {
        "id": "broken",
        "nodes": [
            {"id": "twin", "uses": "u"},
            {"id": "twin", "uses": "u"},
            {"id": "joiner", "uses": "u", "config": {"joinStrategy": "sometimes"}},
        ],
        "edges": [
            {"source": "ghost-src", "target": "twin"},
            {"source": "twin", "target": "ghost-tgt"},
            {"source": "twin", "target": "joiner", "condition": "result.output >"},
            {"source": "twin", "target": "joiner", "transform": "input[["},
        ],
    }
    problems = _problems(data)
    assert _has(problems, "ghost-src"), problems
    assert _has(problems, "ghost-tgt"), problems
    assert _has(problems, "twin", "duplicate"), problems
    assert _has(problems, "sometimes"), problems
    assert _has(problems, "result.output >"), problems
    assert _has(problems, "input[["), problems
    assert len(problems) >= 6


def test_validation_lists_missing_ids_together_with_other_problems():
    """A node without an id must not hide the rest of the blueprint's problems."""
    data = {
        "id": "broken",
        "nodes": [
            {"uses": "no-id-here"},
            {"id": "a", "uses": "u", "config": {"joinStrategy": "sometimes"}},
        ],
        "edges": [{"source": "a", "target": "ghost-tgt", "condition": "((("}],
    }
    problems = _problems(data)
    assert _has(problems, "id"), problems
    assert _has(problems, "sometimes"), problems
    assert _has(problems, "ghost-tgt"), problems
    assert _has(problems, "((("), problems


@pytest.mark.parametrize(
    "data, needle",
    [
        ([], "object"),
        ("order", "object"),
        (None, "object"),
        (42, "object"),
        ({"nodes": [], "edges": []}, "id"),
        ({"id": "x", "nodes": {"a": {"uses": "u"}}}, "nodes"),
        ({"id": "x", "nodes": "a,b"}, "nodes"),
        ({"id": "x", "nodes": [], "edges": {"a": "b"}}, "edges"),
        ({"id": "x", "nodes": ["a"]}, "node"),
        ({"id": "x", "nodes": [{"uses": "u"}]}, "id"),
        ({"id": "x", "nodes": [{"id": "a"}]}, "uses"),
        ({"id": "x", "nodes": [{"id": "a", "uses": "u", "config": []}]}, "config"),
        ({"id": "x", "nodes": [{"id": "a", "uses": "u", "config": {"joinStrategy": "first"}}]}, "first"),
        ({"id": "x", "nodes": [{"id": "a", "uses": "u"}], "edges": [{"source": "a"}]}, "target"),
        ({"id": "x", "nodes": [{"id": "a", "uses": "u"}], "edges": ["a->b"]}, "edge"),
        ({"id": "x", "nodes": [{"id": "a", "uses": "u"}],
          "edges": [{"source": "a", "target": "a", "condition": "import os"}]}, "import os"),
        ({"id": "x", "nodes": [{"id": "a", "uses": "u"}],
          "edges": [{"source": "a", "target": "a", "condition": "result.__class__"}]}, "__class__"),
    ],
)
def test_malformed_blueprints_raise_blueprint_error(data, needle):
    problems = _problems(data)
    assert _has(problems, needle), problems


@pytest.mark.parametrize(
    "data",
    [
        {"id": "x", "nodes": [{"id": ["a"], "uses": "u"}]},
        {"id": "x", "nodes": [{"id": {"a": 1}, "uses": "u"}]},
        {"id": "x", "nodes": [{"id": "a", "uses": "u"}], "edges": [{"source": ["a"], "target": "a"}]},
        {"id": "x", "nodes": [{"id": "a", "uses": "u"}], "edges": [{"source": "a", "target": {"b": 1}}]},
        {"id": ["x"], "nodes": []},
        {"id": "x", "nodes": [{"id": "a", "uses": ["u"]}]},
    ],
)
def test_wrongly_typed_ids_raise_blueprint_error_not_type_error(data):
    with pytest.raises(BlueprintError):
        WorkflowBlueprint.from_dict(data)


@pytest.mark.parametrize("text", ["", "{", "{'id': 'x'}", "not json", '{"id": "x",}', b"\xff\xfe"])
def test_from_json_with_bad_json_raises_blueprint_error(text):
    with pytest.raises(BlueprintError):
        WorkflowBlueprint.from_json(text)


@pytest.mark.parametrize("text", ["[]", "null", "3", '"order"'])
def test_from_json_of_a_non_object_raises_blueprint_error(text):
    with pytest.raises(BlueprintError):
        WorkflowBlueprint.from_json(text)


def test_blueprint_error_is_a_flowcraft_error_with_problems():
    with pytest.raises(flowcraft.FlowcraftError) as info:
        WorkflowBlueprint.from_dict({"id": "x", "nodes": "nope"})
    assert isinstance(info.value, BlueprintError)
    assert info.value.problems


def test_running_an_invalid_dict_raises_blueprint_error_listing_problems():
    runtime = FlowRuntime(registry={"u": lambda ctx: None})
    data = {"id": "bad", "nodes": [{"id": "a", "uses": "u"}, {"id": "a", "uses": "u"}],
            "edges": [{"source": "a", "target": "ghost"}]}
    with pytest.raises(BlueprintError) as info:
        runtime.run(data)
    assert _has(info.value.problems, "ghost")
    assert _has(info.value.problems, "duplicate")


# --------------------------------------------------------------------------------------------
# Fuzzing: whatever JSON comes in, loading gives a blueprint or a BlueprintError, nothing else
# --------------------------------------------------------------------------------------------

_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False),
                          st.sampled_from(["", "a", "b", "u", "all", "any", "x.y", "result.output > 1", "((", "a-b"]))
_json = st.recursive(_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["id", "uses", "a", "x"]), inner, max_size=3)),
    max_leaves=8)


def _maybe(value_strategy):
    return st.one_of(value_strategy, _json)


_config = st.dictionaries(
    st.sampled_from(["maxRetries", "retryDelay", "timeout", "fallback", "joinStrategy", "other"]),
    st.one_of(_json, st.integers(0, 5000)), max_size=4)
_node = st.fixed_dictionaries(
    {"id": _maybe(st.sampled_from(["a", "b", "c"])), "uses": _maybe(st.just("u"))},
    optional={"params": _json, "inputs": _json, "config": _maybe(_config)})
_edge = st.fixed_dictionaries(
    {"source": _maybe(st.sampled_from(["a", "b", "c", "z"])), "target": _maybe(st.sampled_from(["a", "b", "c", "z"]))},
    optional={"action": _json, "condition": _json, "transform": _json})
_blueprint = st.fixed_dictionaries(
    {"id": _maybe(st.just("bp")), "nodes": st.one_of(st.lists(st.one_of(_node, _json), max_size=4), _json)},
    optional={"edges": st.one_of(st.lists(st.one_of(_edge, _json), max_size=4), _json), "metadata": _json})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(_blueprint, _json))
def test_loading_arbitrary_json_gives_a_blueprint_or_a_blueprint_error(data):
    try:
        bp = WorkflowBlueprint.from_dict(copy.deepcopy(data))
    except BlueprintError as exc:
        assert exc.problems
        return
    # What loads must round-trip to what came in (modulo explicit nulls, tested separately).
    assert WorkflowBlueprint.from_dict(bp.to_dict()) == bp
    assert WorkflowBlueprint.from_json(bp.to_json()) == bp
