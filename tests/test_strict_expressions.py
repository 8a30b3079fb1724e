"""SPEC 5 "Strict expressions": a typo in a condition is an error with `strict_expressions=True`,
and a WARNING once per blueprint and edge without it; the same in memory and distributed."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import pytest

from flowcraft import FlowRuntime, WorkflowResult, create_flow
from flowcraft.analysis import lint_blueprint
from flowcraft.testing import InMemoryAdapter

LOGGER = "flowcraft.expressions"


def order_flow(calls: List[str], condition: str = "result.output.totl > 0", transform: Optional[str] = None,
               output: Any = None) -> Any:
    """calc -> ship (the edge with the user's condition) -> notify: the mistake is on calc -> ship."""

    def calc(ctx):
        calls.append("calc")
        return {"total": 5, "items": ["book"]} if output is None else output

    def ship(ctx):
        calls.append("ship")
        return {"shipped": ctx.input}

    def notify(ctx):
        calls.append("notify")
        return "sent"

    return (
        create_flow("order")
        .node("calc", calc)
        .node("ship", ship)
        .node("notify", notify)
        .edge("calc", "ship", condition=condition, transform=transform)
        .edge("ship", "notify")
    )


def run(driver: str, flow: Any, context: Optional[Dict[str, Any]] = None, **options: Any) -> WorkflowResult:
    runtime = FlowRuntime(**options)
    runtime.add_blueprint(flow)
    if driver == "memory":
        return flow.run(runtime, dict(context or {}))
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow(flow.id, dict(context or {}))
    adapter.drain()
    return adapter.wait_for_result(run_id, timeout=5)


DRIVERS = ["memory", "distributed"]


def expression_warnings(caplog) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --- strict: the edge's source node fails, naming the expression, the name and the keys that exist ----


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_misspelt_key_fails_the_source_node_and_nothing_after_it_runs(driver):
    calls: List[str] = []
    result = run(driver, order_flow(calls), strict_expressions=True)
    assert result.status == "failed"
    (error,) = result.errors
    assert error.node_id == "calc"
    assert error.message == (
        "edge 'calc' -> 'ship': condition 'result.output.totl > 0' failed: 'result.output.totl' does not "
        "exist (result.output has keys: items, total)"
    )
    assert calls == ["calc"]  # nothing downstream ran
    assert "ship" not in result.context and "notify" not in result.context


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_misspelt_top_level_name_lists_the_names_that_exist(driver):
    calls: List[str] = []
    result = run(driver, order_flow(calls, "totl > 0"), {"total": 3}, strict_expressions=True)
    assert result.status == "failed"
    (error,) = result.errors
    assert error.node_id == "calc"
    assert error.message == ("edge 'calc' -> 'ship': condition 'totl > 0' failed: name 'totl' does not exist "
                             "(names: calc, result, total)")
    assert calls == ["calc"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_misspelt_key_in_a_transform_fails_the_source_node(driver):
    calls: List[str] = []
    result = run(driver, order_flow(calls, "result.output.total > 0", transform="input.itmes"),
                 strict_expressions=True)
    assert result.status == "failed"
    (error,) = result.errors
    assert error.node_id == "calc"
    assert error.message == ("edge 'calc' -> 'ship': transform 'input.itmes' failed: 'input.itmes' does not "
                             "exist (input has keys: items, total)")
    assert calls == ["calc"]


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("condition, output, described", [
    ("result.output.total > 3", "5", "'>' compares '5' (str) with 3 (int)"),
    ("result.output.total >= result.output.limit", None, "'>=' compares None (NoneType) with 2 (int)"),
    ("0 < result.output.total < 10", "5", "'<' compares 0 (int) with '5' (str)"),
])
def test_ordering_values_that_cannot_be_ordered_is_an_error(driver, condition, output, described):
    calls: List[str] = []
    flow = order_flow(calls, condition, output={"total": output, "limit": 2})
    result = run(driver, flow, strict_expressions=True)
    assert result.status == "failed"
    (error,) = result.errors
    assert error.node_id == "calc"
    assert error.message == (f"edge 'calc' -> 'ship': condition {condition!r} failed: {described}: values of "
                             f"these types cannot be ordered")
    assert calls == ["calc"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_misspelt_name_in_a_loop_condition_fails_the_loop(driver):
    laps: List[int] = []

    def body(ctx):
        laps.append(1)
        ctx.context.set("count", ctx.context.get("count", 0) + 1)

    flow = (
        create_flow("counting")
        .node("body", body)
        .loop("lp", start_node_id="body", end_node_id="body", condition="cuont < 3")
        .node("after", lambda ctx: "after")
        .edge("lp", "after")
    )
    result = run(driver, flow, strict_expressions=True)
    assert result.status == "failed"
    (error,) = result.errors
    assert error.node_id == "lp"
    assert error.message.startswith("loop 'lp': condition 'cuont < 3' failed: name 'cuont' does not exist (names: ")
    assert "count" in error.message
    assert laps == [1] and "after" not in result.context


@pytest.mark.parametrize("driver", DRIVERS)
def test_names_that_exist_are_fine_in_strict_mode(driver):
    calls: List[str] = []
    condition = ("result.output.total > 0 and context.total == 3 and len(result.output.items) == 1 "
                 "and result.output.items[0] == 'book' and result.action == null and nothing is None "
                 "and order.id == 7 and _outputs.calc.total == 5 and result.output.items.length == 1")
    result = run(driver, order_flow(calls, condition, transform="input.items"),
                 {"total": 3, "nothing": None, "order.id": 7}, strict_expressions=True)
    assert result.status == "completed", result.errors
    assert calls == ["calc", "ship", "notify"]
    assert result.context["ship"] == {"shipped": ["book"]}


# --- lenient (the default): today's values, and one WARNING per blueprint and edge --------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_without_strict_a_typo_reads_none_and_is_logged_once_per_edge(driver, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    runtime = FlowRuntime()
    calls: List[str] = []
    flow = order_flow(calls)
    runtime.add_blueprint(flow)
    adapter = InMemoryAdapter(runtime) if driver == "distributed" else None
    for _ in range(3):
        if adapter is None:
            result = flow.run(runtime, {})
        else:
            run_id = adapter.start_workflow(flow.id, {})
            adapter.drain()
            result = adapter.wait_for_result(run_id, timeout=5)
        assert result.status == "completed"
        assert sorted(result.skipped) == ["notify", "ship"]
    assert calls == ["calc"] * 3
    assert expression_warnings(caplog) == [
        "blueprint 'order': edge 'calc' -> 'ship': condition 'result.output.totl > 0': 'result.output.totl' "
        "does not exist (result.output has keys: items, total); it reads as None (strict_expressions=True "
        "makes this an error; logged once per edge)"
    ]


def test_without_strict_a_number_compared_with_a_string_is_false_and_logged(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    calls: List[str] = []
    flow = order_flow(calls, "result.output.total > 3", output={"total": "5"})
    result = run("memory", flow)
    assert result.status == "completed" and "ship" in result.skipped
    (message,) = expression_warnings(caplog)
    assert "'>' compares '5' (str) with 3 (int): values of these types cannot be ordered; it is false" in message


def test_each_edge_warns_once_and_a_clean_run_warns_nothing(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    flow = (
        create_flow("two")
        .node("a", lambda ctx: {"n": 1})
        .node("b", lambda ctx: 1)
        .node("c", lambda ctx: 1)
        .edge("a", "b", condition="result.output.m == 1")
        .edge("a", "c", condition="result.output.n == 1 and flag")
    )
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    flow.run(runtime, {"flag": True})
    assert expression_warnings(caplog) == [
        "blueprint 'two': edge 'a' -> 'b': condition 'result.output.m == 1': 'result.output.m' does not exist "
        "(result.output has keys: n); it reads as None (strict_expressions=True makes this an error; logged "
        "once per edge)"
    ]
    flow.run(runtime, {})  # edge a -> c now reads the absent `flag`: its own first warning
    assert len(expression_warnings(caplog)) == 2
    assert "name 'flag' does not exist" in expression_warnings(caplog)[1]


def test_the_user_mistake_from_the_issue_is_caught_by_lint_as_well():
    # lint sees top-level names only: `totl > 0` is caught, `result.output.totl` needs strict mode
    flow = order_flow([], "totl > 0")
    result = lint_blueprint(flow, context_keys=["total"])
    assert not result.is_valid
    (issue,) = result.issues
    assert issue.code == "UNKNOWN_NAME" and issue.edge_index == 0 and issue.node_id == "calc"
    assert issue.message == ("edge #0 ('calc' -> 'ship'): condition 'totl > 0' reads 'totl', which is not a node "
                             "id, a key some node's inputs name, nor in context_keys (did you mean 'total'?)")
