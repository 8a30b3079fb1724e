"""The in-memory runtime (`FlowRuntime`) against the execution semantics of SPEC section 5."""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Dict, List, Optional

import pytest

import flowcraft
from flowcraft import (
    BaseNode,
    BlueprintError,
    CancelToken,
    FlowRuntime,
    NodeContext,
    NodeResult,
    Registry,
    UnknownNodeError,
    WorkflowBlueprint,
    WorkflowError,
    WorkflowResult,
)

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def bp(nodes, edges=(), id="t") -> Dict[str, Any]:
    """A wire-format blueprint. A node given as a string uses the key of the same name; an edge
    given as a tuple is (source, target)."""
    return {
        "id": id,
        "nodes": [{"id": n, "uses": n} if isinstance(n, str) else n for n in nodes],
        "edges": [{"source": e[0], "target": e[1]} if isinstance(e, tuple) else e for e in edges],
    }


class Recorder:
    """Node functions that record each call (node id, input) in one ordered, thread-safe log."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: List[tuple] = []

    def log(self, *item: Any) -> None:
        with self.lock:
            self.calls.append(item)

    def ran(self) -> List[str]:
        return [c[1] for c in self.calls if c[0] == "call"]

    def inputs(self, node_id: str) -> List[Any]:
        return [c[2] for c in self.calls if c[0] == "call" and c[1] == node_id]

    def fn(self, output: Any = None, *, action: Optional[str] = None, sleep: float = 0.0, raw: bool = False):
        def node(ctx: NodeContext):
            self.log("call", ctx.node_id, ctx.input)
            if sleep:
                time.sleep(sleep)
            value = output(ctx) if callable(output) else output
            if raw:
                return value
            return NodeResult(output=value, action=action)

        return node

    def echo(self, ctx: NodeContext):
        self.log("call", ctx.node_id, ctx.input)
        return ctx.node_id + "-out"


def registry_for(rec: Recorder, *node_ids: str, **impls: Any) -> Dict[str, Any]:
    reg: Dict[str, Any] = {n: rec.echo for n in node_ids}
    reg.update(impls)
    return reg


def run(blueprint, registry, initial_context=None, **options) -> WorkflowResult:
    return FlowRuntime(registry=registry).run(blueprint, initial_context, **options)


def run_guarded(runtime: FlowRuntime, blueprint, timeout: float = 15.0, **options) -> WorkflowResult:
    """Run in a helper thread so that a hang fails the test instead of blocking the suite."""
    box: Dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = runtime.run(blueprint, **options)
        except BaseException as exc:  # pragma: no cover - reported below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the run did not end (hang)"
    if "error" in box:
        raise box["error"]
    return box["result"]


# --------------------------------------------------------------------------------------------
# Loading: what `run` accepts, what it returns
# --------------------------------------------------------------------------------------------


def test_run_accepts_a_blueprint_object_its_dict_and_a_known_id():
    rec = Recorder()
    wire = bp(["a", "b"], [("a", "b")], id="by-ref")
    reg = registry_for(rec, "a", "b")
    expected = {"_outputs.a": "a-out", "a": "a-out", "_inputs.b": "a-out", "_outputs.b": "b-out", "b": "b-out"}
    for runtime, ref in [
        (FlowRuntime(registry=reg), WorkflowBlueprint.from_dict(wire)),
        (FlowRuntime(registry=reg), wire),
        (FlowRuntime(registry=reg, blueprints={"by-ref": WorkflowBlueprint.from_dict(wire)}), "by-ref"),
        (FlowRuntime(registry=reg, blueprints=[WorkflowBlueprint.from_dict(wire)]), "by-ref"),
    ]:
        result = runtime.run(ref)
        assert result.status == "completed", result.errors
        assert result.context == expected
    assert rec.ran() == ["a", "b"] * 4


def test_registry_decorator_and_per_run_registry():
    registry = Registry()

    @registry.node("fetch-order")
    def fetch(ctx):
        return {"id": ctx.input}

    assert fetch.__name__ == "fetch"  # the decorator returns the function itself
    assert registry["fetch-order"] is fetch
    assert "fetch-order" in registry and len(registry) == 1
    wire = {"id": "r", "nodes": [{"id": "f", "uses": "fetch-order", "inputs": "orderId"}], "edges": []}
    result = FlowRuntime(registry=registry).run(wire, {"orderId": 7})
    assert result.status == "completed"
    assert result.context["f"] == {"id": 7}
    # A plain dict given per run works too.
    result = FlowRuntime().run(wire, {"orderId": 8}, registry={"fetch-order": fetch})
    assert result.context["f"] == {"id": 8}


def test_workflow_result_shape_and_serialized_context():
    wire = bp(["a"])
    result = run(wire, {"a": lambda ctx: {"n": [1, 2.5, None, "s"], "ok": True}}, {"seed": {"x": 1}}, run_id="rid-1")
    assert isinstance(result, WorkflowResult)
    assert result.status == "completed"
    assert result.run_id == "rid-1"
    assert result.errors == [] and result.skipped == [] and result.stalled == [] and result.awaiting == []
    assert json.loads(result.serialized_context) == result.context
    assert result.context == {"seed": {"x": 1}, "_outputs.a": {"n": [1, 2.5, None, "s"], "ok": True},
                              "a": {"n": [1, 2.5, None, "s"], "ok": True}}
    as_dict = result.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["status"] == "completed" and as_dict["run_id"] == "rid-1"
    assert as_dict["context"] == result.context
    assert as_dict["errors"] == [] and as_dict["skipped"] == [] and as_dict["stalled"] == []


def test_the_initial_context_passed_in_is_not_mutated():
    initial = {"seed": [1, 2]}
    result = run(bp(["a"]), {"a": lambda ctx: ctx.context.set("seed-copy", ctx.context.get("seed"))}, initial)
    assert result.status == "completed"
    assert initial == {"seed": [1, 2]}
    assert result.context["seed-copy"] == [1, 2]


def test_run_id_is_generated_and_unique_when_not_given():
    seen = []
    wire = bp(["a"])
    runtime = FlowRuntime(registry={"a": lambda ctx: seen.append(ctx.run_id)})
    first, second = runtime.run(wire), runtime.run(wire)
    assert first.run_id and second.run_id and first.run_id != second.run_id
    assert seen == [first.run_id, second.run_id]


# --------------------------------------------------------------------------------------------
# Context, inputs, transforms
# --------------------------------------------------------------------------------------------


def test_outputs_and_inputs_are_stored_under_their_keys():
    rec = Recorder()
    reg = {"a": rec.fn({"x": 1, "items": [1, 2]}), "b": rec.fn(lambda ctx: ctx.input["x"] + 1)}
    result = run(bp(["a", "b"], [("a", "b")]), reg, {"seed": 1})
    assert result.status == "completed", result.errors
    assert result.context == {
        "seed": 1,
        "_outputs.a": {"x": 1, "items": [1, 2]}, "a": {"x": 1, "items": [1, 2]},
        "_inputs.b": {"x": 1, "items": [1, 2]},
        "_outputs.b": 2, "b": 2,
    }
    assert rec.inputs("b") == [{"x": 1, "items": [1, 2]}]


def test_inputs_as_a_context_key_overrides_the_predecessor_output():
    rec = Recorder()
    wire = bp([{"id": "a", "uses": "a", "inputs": "orderId"}, {"id": "b", "uses": "b", "inputs": "a"},
               {"id": "c", "uses": "c", "inputs": "orderId"}],
              [("a", "b"), ("b", "c")])
    reg = {"a": rec.fn("A"), "b": rec.fn("B"), "c": rec.fn("C")}
    result = run(wire, reg, {"orderId": "ord-9"})
    assert result.status == "completed", result.errors
    assert rec.inputs("a") == ["ord-9"]  # a start node reads its input from the context
    assert rec.inputs("b") == ["A"]  # the key "a" holds a's output
    assert rec.inputs("c") == ["ord-9"]  # not b's output "B": inputs win over the predecessor
    assert result.context["c"] == "C"


def test_inputs_as_a_mapping_of_names_to_context_keys():
    rec = Recorder()
    wire = bp(["a", {"id": "b", "uses": "b", "inputs": {"order": "orderId", "prev": "a", "missing": "nope"}}],
              [("a", "b")])
    result = run(wire, {"a": rec.fn([1, 2]), "b": rec.fn("ok")}, {"orderId": 5})
    assert result.status == "completed", result.errors
    assert rec.inputs("b") == [{"order": 5, "prev": [1, 2], "missing": None}]


def test_edge_transforms_see_input_and_context():
    rec = Recorder()
    wire = bp(["a", "b", "c"], [
        {"source": "a", "target": "b", "transform": "input.items"},
        {"source": "a", "target": "c", "transform": "context.factor * input.total"},
    ])
    reg = {"a": rec.fn({"items": ["x", "y"], "total": 3}), "b": rec.fn(None), "c": rec.fn(None)}
    result = run(wire, reg, {"factor": 10})
    assert result.status == "completed", result.errors
    assert rec.inputs("b") == [["x", "y"]]
    assert rec.inputs("c") == [30]
    assert result.context["_inputs.b"] == ["x", "y"]
    assert result.context["_inputs.c"] == 30
    assert result.context["a"] == {"items": ["x", "y"], "total": 3}  # the output itself is untouched


def test_node_context_can_read_and_write_the_run_context():
    def writer(ctx: NodeContext):
        assert ctx.context.get("seed") == 1
        assert ctx.context.get("absent", "dflt") == "dflt"
        assert ctx.context.has("seed") and not ctx.context.has("absent")
        ctx.context.set("written", {"by": ctx.node_id})
        ctx.context.set("temp", 1)
        ctx.context.delete("temp")
        return "w"

    def reader(ctx: NodeContext):
        return {"written": ctx.context.get("written"), "has_temp": ctx.context.has("temp"),
                "snapshot_keys": sorted(ctx.context.to_dict())}

    result = run(bp(["w", "r"], [("w", "r")]), {"w": writer, "r": reader}, {"seed": 1})
    assert result.status == "completed", result.errors
    assert result.context["written"] == {"by": "w"}
    assert "temp" not in result.context
    assert result.context["r"]["written"] == {"by": "w"}
    assert result.context["r"]["has_temp"] is False
    assert {"seed", "written", "w", "_outputs.w"} <= set(result.context["r"]["snapshot_keys"])


def test_node_ids_with_dashes_and_dots_run():
    rec = Recorder()
    wire = bp(["fetch-order.v2", "ship.to-eu"], [("fetch-order.v2", "ship.to-eu")])
    result = run(wire, registry_for(rec, "fetch-order.v2", "ship.to-eu"))
    assert result.status == "completed", result.errors
    assert result.context["_outputs.fetch-order.v2"] == "fetch-order.v2-out"
    assert result.context["fetch-order.v2"] == "fetch-order.v2-out"
    assert result.context["_inputs.ship.to-eu"] == "fetch-order.v2-out"
    assert result.context["ship.to-eu"] == "ship.to-eu-out"


# --------------------------------------------------------------------------------------------
# Return values and edge selection
# --------------------------------------------------------------------------------------------


def test_plain_value_node_result_and_none():
    rec = Recorder()
    wire = bp(["plain", "res", "go", "none", "after"], [
        ("plain", "res"),
        {"source": "res", "target": "go", "action": "go"},
        ("go", "none"), ("none", "after"),
    ])
    reg = {
        "plain": rec.fn(5, raw=True),
        "res": rec.fn(lambda ctx: NodeResult(output=ctx.input + 1, action="go"), raw=True),
        "go": rec.fn(lambda ctx: ctx.input * 2, raw=True),
        "none": rec.fn(None, raw=True),
        "after": rec.fn("end", raw=True),
    }
    result = run(wire, reg)
    assert result.status == "completed", result.errors
    assert result.context["plain"] == 5
    assert result.context["res"] == 6  # NodeResult.output is stored, not the NodeResult
    assert result.context["go"] == 12
    assert result.context.get("none") is None
    assert rec.inputs("after") == [None]
    assert rec.ran() == ["plain", "res", "go", "none", "after"]


@pytest.mark.parametrize(
    "action, runs, skipped",
    [
        ("ok", {"on-ok"}, {"on-error", "default"}),
        ("error", {"on-error"}, {"on-ok", "default"}),
        ("unexpected", {"default"}, {"on-ok", "on-error"}),  # no edge for it: the default edges
        (None, {"default"}, {"on-ok", "on-error"}),  # no action: only edges without one
    ],
)
def test_action_then_default_edge_selection(action, runs, skipped):
    rec = Recorder()
    wire = bp(["src", "on-ok", "on-error", "default"], [
        {"source": "src", "target": "on-ok", "action": "ok"},
        {"source": "src", "target": "on-error", "action": "error"},
        {"source": "src", "target": "default"},
    ])
    reg = registry_for(rec, "on-ok", "on-error", "default", src=rec.fn("v", action=action))
    result = run(wire, reg)
    assert result.status == "completed", result.errors
    assert set(rec.ran()) == {"src"} | runs
    assert set(result.skipped) == skipped
    assert result.errors == []


def test_action_edges_alone_with_no_match_leave_every_successor_skipped():
    rec = Recorder()
    wire = bp(["src", "x"], [{"source": "src", "target": "x", "action": "ok"}])
    result = run(wire, registry_for(rec, "x", src=rec.fn("v", action="nope")))
    assert result.status == "completed"
    assert rec.ran() == ["src"]
    assert result.skipped == ["x"]


CONDITIONS = [
    ("result.output.total > 0", True),
    ("result.output.total > threshold", True),
    ("result.output.total < threshold", False),
    ("result.action == 'ok'", True),
    ("result.action === 'ok' && !blocked", True),
    ("result.action !== 'ok' || blocked", False),
    ("'vip' in tags and len(result.output.items) == 2", True),
    ("src.total == 5", True),  # the node's own output, already in the context
    ("result.output.total >= 5 and not blocked", True),
    ("true", True),
    ("false", False),
    ("missing_key", False),
]


@pytest.mark.parametrize("condition, expected", CONDITIONS)
def test_conditions_see_context_and_result(condition, expected):
    rec = Recorder()
    wire = bp(["src", "dst"], [{"source": "src", "target": "dst", "action": "ok", "condition": condition}])
    reg = registry_for(rec, "dst", src=rec.fn({"total": 5, "items": [1, 2]}, action="ok"))
    result = run(wire, reg, {"threshold": 3, "blocked": False, "tags": ["vip"]})
    assert result.status == "completed", result.errors
    assert ("dst" in rec.ran()) is expected
    assert result.skipped == ([] if expected else ["dst"])


# --------------------------------------------------------------------------------------------
# Joins and dead paths
# --------------------------------------------------------------------------------------------


def _fan_in(join_strategy: str = "all", edge_order=("c", "a", "b")):
    nodes = ["a", "b", "c", {"id": "j", "uses": "j", "config": {"joinStrategy": join_strategy}}]
    return bp(nodes, [(src, "j") for src in edge_order])


@pytest.mark.parametrize("concurrency", [1, 3])
def test_all_join_input_is_a_dict_in_blueprint_edge_order(concurrency):
    rec = Recorder()
    # Completion order with concurrency 3: a, then b, then c. Edge order: c, a, b. Node order: a, b, c.
    reg = {"a": rec.fn("A", sleep=0.0), "b": rec.fn("B", sleep=0.04), "c": rec.fn("C", sleep=0.08),
           "j": rec.fn(lambda ctx: list(ctx.input))}
    result = run(_fan_in("all"), reg, concurrency=concurrency)
    assert result.status == "completed", result.errors
    (joined,) = rec.inputs("j")
    assert joined == {"c": "C", "a": "A", "b": "B"}
    assert list(joined) == ["c", "a", "b"]
    assert result.context["j"] == ["c", "a", "b"]
    assert list(result.context["_inputs.j"]) == ["c", "a", "b"]
    assert list(json.loads(result.serialized_context)["_inputs.j"]) == ["c", "a", "b"]
    if concurrency > 1:
        finished = [c[1] for c in rec.calls if c[0] == "call"]
        assert finished.index("j") == 3  # the join ran last, once


def test_any_join_runs_once_on_the_first_taken_edge():
    rec = Recorder()
    reg = {"a": rec.fn("A", sleep=0.15), "b": rec.fn("B", sleep=0.15), "c": rec.fn("C"), "j": rec.fn("J")}
    result = run(_fan_in("any"), reg, concurrency=3)
    assert result.status == "completed", result.errors
    assert rec.ran().count("j") == 1
    assert rec.inputs("j") == ["C"]  # c finished first by far
    assert set(rec.ran()) == {"a", "b", "c", "j"}


def test_any_join_runs_once_serially_with_one_of_the_values():
    rec = Recorder()
    result = run(_fan_in("any"), registry_for(rec, "a", "b", "c", "j"))
    assert result.status == "completed", result.errors
    assert rec.ran().count("j") == 1
    assert rec.inputs("j")[0] in {"a-out", "b-out", "c-out"}
    assert result.skipped == []


def test_any_join_with_a_dead_edge_still_runs_on_the_taken_one():
    rec = Recorder()
    wire = bp(["a", "b", {"id": "j", "uses": "j", "config": {"joinStrategy": "any"}}], [
        {"source": "a", "target": "j", "condition": "false"}, ("b", "j")])
    result = run(wire, registry_for(rec, "a", "b", "j"))
    assert result.status == "completed"
    assert rec.inputs("j") == ["b-out"]
    assert result.skipped == []


def test_any_join_with_every_edge_dead_is_skipped():
    rec = Recorder()
    wire = bp(["a", "b", {"id": "j", "uses": "j", "config": {"joinStrategy": "any"}}, "k"], [
        {"source": "a", "target": "j", "condition": "false"},
        {"source": "b", "target": "j", "condition": "false"}, ("j", "k")])
    result = run(wire, registry_for(rec, "a", "b", "j", "k"))
    assert result.status == "completed"
    assert sorted(rec.ran()) == ["a", "b"]
    assert sorted(result.skipped) == ["j", "k"]


@pytest.mark.parametrize("value, taken, untaken", [(5, "then", "else"), (-5, "else", "then")])
def test_if_else_diamond_merging_into_an_all_join_completes(value, taken, untaken):
    rec = Recorder()
    wire = bp(["check", "then", "else", "merge"], [
        {"source": "check", "target": "then", "condition": "result.output > 0"},
        {"source": "check", "target": "else", "condition": "result.output <= 0"},
        ("then", "merge"), ("else", "merge"),
    ])
    reg = registry_for(rec, "then", "else", check=rec.fn(value), merge=rec.fn(lambda ctx: ctx.input))
    result = run_guarded(FlowRuntime(registry=reg), wire)
    assert result.status == "completed", result.errors
    assert rec.ran() == ["check", taken, "merge"]
    assert rec.inputs("merge") == [f"{taken}-out"]  # one taken edge: the plain value
    assert result.skipped == [untaken]
    assert result.errors == []
    assert untaken not in result.context and f"_outputs.{untaken}" not in result.context
    assert result.context["merge"] == f"{taken}-out"


def test_skips_propagate_down_a_chain():
    rec = Recorder()
    wire = bp(["a", "b", "c", "d", "e"], [
        {"source": "a", "target": "b", "condition": "false"}, ("b", "c"), ("c", "d"), ("a", "e")])
    result = run(wire, registry_for(rec, "a", "b", "c", "d", "e"))
    assert result.status == "completed"
    assert rec.ran() == ["a", "e"]
    assert sorted(result.skipped) == ["b", "c", "d"]
    assert len(result.skipped) == len(set(result.skipped))
    assert result.errors == []


def test_all_join_fed_by_a_skipped_branch_and_a_live_one_runs():
    rec = Recorder()
    wire = bp(["a", "b", "c", "j"], [
        {"source": "a", "target": "b", "condition": "false"}, ("b", "c"), ("c", "j"), ("a", "j")])
    result = run(wire, registry_for(rec, "a", "b", "c", "j"))
    assert result.status == "completed"
    assert rec.ran() == ["a", "j"]
    assert rec.inputs("j") == ["a-out"]
    assert sorted(result.skipped) == ["b", "c"]


def test_all_join_waits_for_every_predecessor():
    rec = Recorder()
    wire = bp(["a", "slow", "j"], [("a", "j"), ("slow", "j")])
    reg = registry_for(rec, "a", "j", slow=rec.fn("S", sleep=0.05))
    result = run(wire, reg, concurrency=2)
    assert result.status == "completed"
    assert rec.ran()[-1] == "j" and rec.ran().count("j") == 1
    assert rec.inputs("j") == [{"a": "a-out", "slow": "S"}]


# --------------------------------------------------------------------------------------------
# Retries, timeouts
# --------------------------------------------------------------------------------------------


def _flaky(fail_times: int, log: list, exc=ValueError):
    def node(ctx: NodeContext):
        log.append({"attempt": ctx.attempt, "key": ctx.idempotency_key, "t": time.monotonic()})
        if len(log) <= fail_times:
            raise exc(f"failure {len(log)}")
        return "finally"

    return node


def test_max_retries_is_the_total_number_of_attempts():
    log: list = []
    wire = bp([{"id": "a", "uses": "a", "config": {"maxRetries": 3}}, "b"], [("a", "b")])
    rec = Recorder()
    result = run(wire, registry_for(rec, "b", a=_flaky(99, log)))
    assert len(log) == 3
    assert result.status == "failed"
    assert result.errors[0].node_id == "a"
    assert result.errors[0].type == "ValueError"
    assert "failure 3" in result.errors[0].message  # the last error is reported
    assert rec.ran() == []


def test_max_retries_one_means_no_retry():
    log: list = []
    wire = bp([{"id": "a", "uses": "a", "config": {"maxRetries": 1}}])
    result = run(wire, {"a": _flaky(99, log)})
    assert len(log) == 1 and result.status == "failed"


def test_retry_succeeds_on_a_later_attempt_with_stable_idempotency_key():
    log: list = []
    wire = bp([{"id": "a", "uses": "a", "config": {"maxRetries": 3}}, "b"], [("a", "b")])
    rec = Recorder()
    result = run(wire, registry_for(rec, "b", a=_flaky(2, log)))
    assert result.status == "completed", result.errors
    assert [entry["attempt"] for entry in log] == [1, 2, 3]
    assert len({entry["key"] for entry in log}) == 1 and log[0]["key"]
    assert result.context["a"] == "finally"
    assert rec.inputs("b") == ["finally"]
    assert result.errors == []


def test_retry_delay_is_milliseconds_on_the_wire_and_waited_between_attempts():
    log: list = []
    wire = bp([{"id": "a", "uses": "a", "config": {"maxRetries": 3, "retryDelay": 50}}])
    result = run(wire, {"a": _flaky(2, log)})
    assert result.status == "completed"
    gaps = [b["t"] - a["t"] for a, b in zip(log, log[1:])]
    assert len(gaps) == 2
    assert all(gap >= 0.045 for gap in gaps), gaps  # "at least" the delay, never an upper bound


def test_timeout_fails_the_attempt_and_sets_the_nodes_cancel_token():
    saw_cancel = threading.Event()
    rec = Recorder()

    def slow(ctx: NodeContext):
        for _ in range(200):  # at most ~2 s; ends as soon as the engine cancels the attempt
            if ctx.cancel.cancelled:
                saw_cancel.set()
                return "late"
            time.sleep(0.01)
        return "never cancelled"

    wire = bp([{"id": "slow", "uses": "slow", "config": {"timeout": 50}}, "next"], [("slow", "next")])
    result = run(wire, registry_for(rec, "next", slow=slow))
    assert result.status == "failed"
    assert result.errors[0].node_id == "slow"
    assert "timeout" in result.errors[0].type.lower() or "timedout" in result.errors[0].type.lower()
    assert saw_cancel.wait(3), "the timed-out attempt's ctx.cancel was never set"
    assert rec.ran() == []
    assert "slow" not in result.context  # the late result is discarded


def test_retry_after_a_timeout_succeeds_on_a_later_attempt():
    attempts: list = []
    observed_cancel: Dict[int, threading.Event] = {1: threading.Event(), 2: threading.Event()}

    def sometimes_slow(ctx: NodeContext):
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            for _ in range(200):
                if ctx.cancel.cancelled:
                    observed_cancel[1].set()
                    return "late"
                time.sleep(0.01)
        if ctx.cancel.cancelled:
            observed_cancel[2].set()
        return f"attempt-{ctx.attempt}"

    wire = bp([{"id": "n", "uses": "n", "config": {"maxRetries": 2, "timeout": 50}}])
    result = run(wire, {"n": sometimes_slow})
    assert result.status == "completed", result.errors
    assert result.context["n"] == "attempt-2"
    assert sorted(attempts) == [1, 2]
    assert observed_cancel[1].wait(3)
    assert not observed_cancel[2].is_set()  # the next attempt gets a fresh, uncancelled token


# --------------------------------------------------------------------------------------------
# Class nodes
# --------------------------------------------------------------------------------------------


def test_class_node_lifecycle_prep_once_exec_retried_post_gets_exec_value():
    calls: list = []

    class Lifecycle(BaseNode):
        def prep(self, ctx):
            calls.append(("prep", ctx.input))
            return {"base": ctx.input}

        def exec(self, prep_result, ctx):
            calls.append(("exec", ctx.attempt))
            if ctx.attempt < 3:
                raise RuntimeError("not yet")
            return prep_result["base"] * self.params["factor"]

        def post(self, exec_result, ctx):
            calls.append(("post", exec_result))
            return NodeResult(output={"value": exec_result}, action="done")

    wire = bp([{"id": "n", "uses": "lifecycle", "params": {"factor": 3}, "inputs": "x",
                "config": {"maxRetries": 3}}, "after"],
              [{"source": "n", "target": "after", "action": "done"}])
    rec = Recorder()
    result = run(wire, registry_for(rec, "after", lifecycle=Lifecycle), {"x": 7})
    assert result.status == "completed", result.errors
    assert calls == [("prep", 7), ("exec", 1), ("exec", 2), ("exec", 3), ("post", 21)]
    assert result.context["n"] == {"value": 21}
    assert rec.inputs("after") == [{"value": 21}]


def test_spec_multiply_example():
    class Multiply(BaseNode):
        def exec(self, prep_result, ctx):
            return NodeResult(output=ctx.input * self.params["factor"])

    wire = bp([{"id": "m", "uses": "multiply", "params": {"factor": 4}, "inputs": "n"}])
    result = run(wire, {"multiply": Multiply}, {"n": 5})
    assert result.status == "completed", result.errors
    assert result.context["m"] == 20


def test_class_fallback_gives_the_result_after_the_last_retry():
    calls: list = []

    class WithFallback(BaseNode):
        def exec(self, prep_result, ctx):
            calls.append(("exec", ctx.attempt))
            raise ConnectionError(f"down {ctx.attempt}")

        def fallback(self, error, ctx):
            calls.append(("fallback", type(error).__name__, str(error)))
            return "from-fallback"

        def recover(self, error, ctx):
            calls.append(("recover",))

    wire = bp([{"id": "n", "uses": "wf", "config": {"maxRetries": 2}}, "after"], [("n", "after")])
    rec = Recorder()
    result = run(wire, registry_for(rec, "after", wf=WithFallback))
    assert result.status == "completed", result.errors
    assert calls == [("exec", 1), ("exec", 2), ("fallback", "ConnectionError", "down 2")]
    assert result.context["n"] == "from-fallback"
    assert rec.inputs("after") == ["from-fallback"]
    assert result.errors == []


def test_class_recover_runs_when_the_node_fails_for_good():
    calls: list = []

    class Fragile(BaseNode):
        def prep(self, ctx):
            calls.append("prep")

        def exec(self, prep_result, ctx):
            calls.append(f"exec{ctx.attempt}")
            raise KeyError("gone")

        def post(self, exec_result, ctx):  # pragma: no cover - must not run
            calls.append("post")

        def recover(self, error, ctx):
            calls.append(("recover", type(error).__name__))

    wire = bp([{"id": "n", "uses": "fragile", "config": {"maxRetries": 2}}])
    result = run(wire, {"fragile": Fragile})
    assert result.status == "failed"
    assert calls == ["prep", "exec1", "exec2", ("recover", "KeyError")]
    assert result.errors[0].node_id == "n" and result.errors[0].type == "KeyError"


def test_class_node_gets_params_and_node_id():
    seen: dict = {}

    class Introspect(BaseNode):
        def exec(self, prep_result, ctx):
            seen.update(params=dict(self.params), node_id=self.node_id, ctx_params=dict(ctx.params))
            return None

    result = run(bp([{"id": "i.1", "uses": "intro", "params": {"a": [1]}}]), {"intro": Introspect})
    assert result.status == "completed"
    assert seen == {"params": {"a": [1]}, "node_id": "i.1", "ctx_params": {"a": [1]}}


# --------------------------------------------------------------------------------------------
# Fallback nodes
# --------------------------------------------------------------------------------------------


def _fallback_blueprint(cache_edges=()):
    return bp([
        {"id": "fetch", "uses": "fetch", "inputs": "orderId", "config": {"maxRetries": 2, "fallback": "fetch-cache"}},
        "fetch-cache", "ship", "on-hit", *(e[1] for e in cache_edges),
    ], [("fetch", "ship"), {"source": "fetch", "target": "on-hit", "action": "hit"}, *cache_edges])


def test_fallback_node_runs_in_the_failed_nodes_place():
    rec = Recorder()
    attempts: list = []

    def fetch(ctx):
        attempts.append(ctx.attempt)
        raise TimeoutError("api down")

    reg = registry_for(rec, "ship", "on-hit", fetch=fetch, **{"fetch-cache": rec.fn({"cached": True})})
    result = run(_fallback_blueprint(), reg, {"orderId": 1})
    assert result.status == "completed", result.errors
    assert attempts == [1, 2]  # the fallback comes after the last retry
    assert rec.ran() == ["fetch-cache", "ship"]
    assert rec.inputs("fetch-cache") == [1]  # in fetch's place: fetch's input
    assert rec.inputs("ship") == [{"cached": True}]  # fetch's edges, followed from the fallback's result
    assert result.context["fetch-cache"] == {"cached": True}
    assert result.errors == []
    assert result.skipped == ["on-hit"]


def test_fallback_node_action_drives_the_failed_nodes_edges():
    rec = Recorder()

    def fetch(ctx):
        raise RuntimeError("x")

    reg = registry_for(rec, "ship", "on-hit", fetch=fetch, **{"fetch-cache": rec.fn("hit!", action="hit")})
    result = run(_fallback_blueprint(), reg)
    assert result.status == "completed", result.errors
    assert set(rec.ran()) == {"fetch-cache", "on-hit"}
    assert rec.inputs("on-hit") == ["hit!"]
    assert result.skipped == ["ship"]


def test_fallback_nodes_own_edges_are_followed_too():
    rec = Recorder()

    def fetch(ctx):
        raise RuntimeError("x")

    wire = _fallback_blueprint(cache_edges=[("fetch-cache", "audit")])
    reg = registry_for(rec, "ship", "on-hit", "audit", fetch=fetch, **{"fetch-cache": rec.fn("C")})
    result = run(wire, reg)
    assert result.status == "completed", (result.errors, result.stalled)
    assert set(rec.ran()) == {"fetch-cache", "ship", "audit"}
    assert rec.inputs("audit") == ["C"]


def test_fallback_node_does_not_run_when_nothing_fails():
    rec = Recorder()
    reg = registry_for(rec, "fetch", "fetch-cache", "ship", "on-hit")
    result = run(_fallback_blueprint(), reg)
    assert result.status == "completed", (result.errors, result.stalled)
    assert rec.ran() == ["fetch", "ship"]
    assert "fetch-cache" not in result.context
    assert rec.inputs("ship") == ["fetch-out"]


def test_unused_fallback_node_with_its_own_edges_does_not_stall_the_run():
    """The fallback's own successors cannot run when the fallback never runs; the run must still end
    `completed` (stalled means "a bug in the blueprint", and this blueprint is correct)."""
    rec = Recorder()
    wire = _fallback_blueprint(cache_edges=[("fetch-cache", "audit")])
    reg = registry_for(rec, "fetch", "fetch-cache", "ship", "on-hit", "audit")
    result = run_guarded(FlowRuntime(registry=reg), wire)
    assert result.status == "completed", (result.stalled, result.errors)
    assert rec.ran() == ["fetch", "ship"]
    assert result.stalled == []


def test_failing_fallback_node_fails_the_run():
    def boom(ctx):
        raise RuntimeError("both down")

    rec = Recorder()
    reg = registry_for(rec, "ship", "on-hit", fetch=boom, **{"fetch-cache": boom})
    result = run(_fallback_blueprint(), reg)
    assert result.status == "failed"
    assert result.errors and result.errors[0].node_id in {"fetch", "fetch-cache"}
    assert "both down" in result.errors[0].message
    assert rec.ran() == []


# --------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------


def test_failing_node_fails_the_run_with_node_message_and_type():
    rec = Recorder()

    def bad(ctx):
        raise ValueError("bad total: -3")

    result = run(bp(["ok", "bad", "after"], [("ok", "bad"), ("bad", "after")]), registry_for(rec, "ok", "after", bad=bad))
    assert result.status == "failed"
    assert len(result.errors) == 1
    error = result.errors[0]
    assert isinstance(error, WorkflowError)
    assert (error.node_id, error.type) == ("bad", "ValueError")
    assert "bad total: -3" in error.message
    assert result.to_dict()["errors"] == [{"node_id": "bad", "message": error.message, "type": "ValueError",
                                           "traceback": error.traceback}]
    assert error.traceback is not None and "in bad" in error.traceback  # SPEC 11: the node's last exception
    assert rec.ran() == ["ok"]
    assert result.context["ok"] == "ok-out"
    assert "after" not in result.context


def test_no_new_node_starts_after_a_failure_serially():
    rec = Recorder()

    def bad(ctx):
        rec.log("call", ctx.node_id, ctx.input)
        raise RuntimeError("stop")

    wire = bp(["first", "bad", "independent", "bad-next", "ind-next"],
              [("first", "bad"), ("bad", "bad-next"), ("independent", "ind-next")])
    reg = registry_for(rec, "first", "independent", "bad-next", "ind-next", bad=bad)
    result = run(wire, reg, concurrency=1)
    assert result.status == "failed"
    ran = rec.ran()
    assert "bad" in ran
    assert ran[ran.index("bad") + 1:] == [], f"nodes started after the failure: {ran}"
    assert "bad-next" not in ran


def test_nodes_already_running_finish_when_another_fails():
    rec = Recorder()

    def bad(ctx):
        rec.log("call", ctx.node_id, None)
        raise RuntimeError("stop")

    def slow(ctx):
        rec.log("call", ctx.node_id, None)
        time.sleep(0.1)
        rec.log("end", ctx.node_id, None)
        return "slow-done"

    wire = bp(["bad", "slow", "slow-next"], [("slow", "slow-next")])
    result = run(wire, registry_for(rec, "slow-next", bad=bad, slow=slow), concurrency=2)
    assert result.status == "failed"
    assert ("end", "slow", None) in rec.calls  # the running node finished before run() returned
    assert "slow-next" not in rec.ran()
    assert [e.node_id for e in result.errors] == ["bad"]


def test_unknown_uses_is_refused_before_any_node_runs_naming_the_node():
    rec = Recorder()
    wire = bp(["a", {"id": "mystery-node", "uses": "not-registered"}, "c"], [("a", "mystery-node"), ("mystery-node", "c")])
    with pytest.raises(UnknownNodeError) as error:
        run(wire, registry_for(rec, "a", "c"))
    assert str(error.value) == ("blueprint 't' cannot run, nothing was started: not in the registry: "
                                "'not-registered' (node 'mystery-node')")
    assert rec.ran() == []  # not even `a`, which comes before it


@pytest.mark.parametrize("bad_value", [object(), {1, 2}, {"ok": [1, {"deep": object()}]}, b"bytes"],
                         ids=["object", "set", "nested", "bytes"])
def test_non_json_output_fails_the_node_naming_the_key(bad_value):
    rec = Recorder()
    wire = bp(["make-widget", "after"], [("make-widget", "after")])
    result = run(wire, registry_for(rec, "after", **{"make-widget": lambda ctx: bad_value}))
    assert result.status == "failed"
    assert result.errors[0].node_id == "make-widget"
    assert "make-widget" in result.errors[0].message
    assert rec.ran() == []
    json.loads(result.serialized_context)  # the context stays JSON


def test_non_json_value_written_to_the_context_fails_the_node_naming_the_key():
    def writer(ctx):
        ctx.context.set("my-special-key", {1, 2, 3})
        return "ok"

    result = run(bp(["w"]), {"w": writer})
    assert result.status == "failed"
    assert result.errors[0].node_id == "w"
    assert "my-special-key" in result.errors[0].message
    assert "my-special-key" not in result.context


def test_failure_in_an_edge_transform_fails_the_run_not_the_engine():
    rec = Recorder()
    wire = bp(["a", "b"], [{"source": "a", "target": "b", "transform": "input + 1"}])
    result = run(wire, registry_for(rec, "b", a=rec.fn("text")))
    assert result.status == "failed"
    assert result.errors and result.errors[0].node_id in {"a", "b"}
    assert "input + 1" in result.errors[0].message
    assert "b" not in rec.ran()


# --------------------------------------------------------------------------------------------
# Strict mode, stalls
# --------------------------------------------------------------------------------------------


def _cycle_blueprint():
    return bp(["s", "a", "b"], [("s", "a"), ("a", "b"), {"source": "b", "target": "a", "condition": "b < 3"}])


def test_strict_rejects_a_cycle():
    with pytest.raises(BlueprintError) as info:
        FlowRuntime(registry={"s": lambda c: 1, "a": lambda c: 1, "b": lambda c: 1}).run(_cycle_blueprint(), strict=True)
    assert any("cycle" in p for p in info.value.problems)


def test_non_strict_accepts_a_cycle_and_runs_it_until_the_edge_is_not_taken():
    counter = {"b": 0}

    def count(ctx):
        counter["b"] += 1
        return counter["b"]

    rec = Recorder()
    result = run_guarded(FlowRuntime(registry=registry_for(rec, "s", "a", b=count)), _cycle_blueprint())
    assert result.status == "completed", (result.errors, result.stalled)
    assert counter["b"] == 3
    assert rec.ran().count("a") == 3
    assert result.context["b"] == 3


def test_unreachable_cycle_ends_stalled_without_hanging():
    rec = Recorder()
    wire = bp(["start", "loop-a", "loop-b"], [("loop-a", "loop-b"), ("loop-b", "loop-a")])
    result = run_guarded(FlowRuntime(registry=registry_for(rec, "start", "loop-a", "loop-b")), wire)
    assert result.status == "stalled"
    assert sorted(result.stalled) == ["loop-a", "loop-b"]
    assert rec.ran() == ["start"]
    assert result.errors == []
    assert result.context["start"] == "start-out"


# --------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------


def _fan_out_fan_in(width: int = 50):
    branches = [f"branch-{i}" for i in range(width)]
    nodes = ["split", *({"id": b, "uses": "branch"} for b in branches), "gather"]
    edges = [{"source": "split", "target": b, "transform": f"input + {i}"} for i, b in enumerate(branches)]
    edges += [(b, "gather") for b in reversed(branches)]  # edge order != node order
    return bp(nodes, edges)


def _fan_registry(calls: list):
    def branch(ctx):
        time.sleep(((ctx.input * 7) % 5) * 0.002)  # scramble completion order
        calls.append(ctx.node_id)
        ctx.context.set(f"side.{ctx.node_id}", ctx.input * 2)
        return {"n": ctx.input, "sq": ctx.input * ctx.input}

    return {"split": lambda ctx: 100, "branch": branch,
            "gather": lambda ctx: sum(v["sq"] for v in ctx.input.values())}


def test_concurrency_gives_the_same_context_for_a_wide_fan_out_fan_in():
    serial_calls: list = []
    pooled_calls: list = []
    wire = _fan_out_fan_in(50)
    serial = run(wire, _fan_registry(serial_calls), concurrency=1)
    pooled = run(wire, _fan_registry(pooled_calls), concurrency=4)
    assert serial.status == pooled.status == "completed"
    assert sorted(serial_calls) == sorted(pooled_calls) and len(pooled_calls) == 50
    assert pooled.context == serial.context
    assert list(pooled.context["_inputs.gather"]) == list(serial.context["_inputs.gather"])
    assert list(serial.context["_inputs.gather"]) == [f"branch-{i}" for i in reversed(range(50))]
    assert serial.context["gather"] == sum((100 + i) ** 2 for i in range(50))


# --------------------------------------------------------------------------------------------
# Cancellation
# --------------------------------------------------------------------------------------------


def test_cancel_token_basics():
    token = CancelToken()
    assert token.cancelled is False
    token.raise_if_cancelled()  # no-op while not cancelled
    token.cancel()
    assert token.cancelled is True
    with pytest.raises(flowcraft.CancelledError):
        token.raise_if_cancelled()


@pytest.mark.parametrize("concurrency", [1, 3])
def test_cancel_from_inside_a_node_stops_the_run(concurrency):
    token = CancelToken()
    rec = Recorder()

    def canceller(ctx):
        rec.log("call", ctx.node_id, None)
        token.cancel()
        assert ctx.cancel.cancelled
        return "done"

    wire = bp(["first", "canceller", "later", "other"], [("first", "canceller"), ("canceller", "later"), ("first", "other")])
    result = run(wire, registry_for(rec, "first", "later", "other", canceller=canceller), cancel=token,
                 concurrency=concurrency)
    assert result.status == "cancelled"
    ran = rec.ran()
    assert "later" not in ran
    if concurrency == 1:  # serially nothing else can have been started already
        assert ran[ran.index("canceller") + 1:] == []


def test_raise_if_cancelled_raises_cancelled_error_and_the_run_is_cancelled_not_failed():
    token = CancelToken()
    seen: list = []
    rec = Recorder()

    def node(ctx):
        token.cancel()
        try:
            ctx.cancel.raise_if_cancelled()
        except BaseException as exc:
            seen.append(exc)
            raise
        return "unreachable"

    result = run(bp(["n", "after"], [("n", "after")]), registry_for(rec, "after", n=node), cancel=token)
    assert len(seen) == 1 and isinstance(seen[0], flowcraft.CancelledError)
    assert result.status == "cancelled"
    assert rec.ran() == []


def test_cancel_from_another_thread():
    token = CancelToken()
    started = threading.Event()
    rec = Recorder()

    def waiter(ctx):
        started.set()
        for _ in range(300):
            if ctx.cancel.cancelled:
                return "saw-cancel"
            time.sleep(0.01)
        return "timeout"

    canceller = threading.Thread(target=lambda: (started.wait(5), token.cancel()))
    canceller.start()
    result = run_guarded(FlowRuntime(registry=registry_for(rec, "after", waiter=waiter)),
                         bp(["waiter", "after"], [("waiter", "after")]), cancel=token)
    canceller.join(5)
    assert result.status == "cancelled"
    assert rec.ran() == []


def test_a_run_cancelled_before_it_starts_runs_nothing():
    token = CancelToken()
    token.cancel()
    rec = Recorder()
    result = run(bp(["a", "b"], [("a", "b")]), registry_for(rec, "a", "b"), cancel=token)
    assert result.status == "cancelled"
    assert rec.ran() == []


# --------------------------------------------------------------------------------------------
# NodeContext and middleware
# --------------------------------------------------------------------------------------------


def test_node_context_fields():
    seen: list = []
    db = object()

    def node(ctx: NodeContext):
        seen.append({"node_id": ctx.node_id, "run_id": ctx.run_id, "attempt": ctx.attempt,
                     "key": ctx.idempotency_key, "params": dict(ctx.params), "db": ctx.dependencies.get("db"),
                     "input": ctx.input, "cancel": ctx.cancel.cancelled})
        return ctx.node_id

    wire = bp([{"id": "a", "uses": "n", "params": {"p": 1}}, {"id": "b", "uses": "n"}], [("a", "b")])
    runtime = FlowRuntime(registry={"n": node}, dependencies={"db": db})
    result = runtime.run(wire, run_id="run-42")
    assert result.status == "completed" and result.run_id == "run-42"
    a, b = seen
    assert (a["node_id"], a["run_id"], a["attempt"], a["params"], a["input"]) == ("a", "run-42", 1, {"p": 1}, None)
    assert (b["node_id"], b["params"], b["input"]) == ("b", {}, "a")
    assert a["db"] is db and b["db"] is db
    assert a["cancel"] is False
    assert a["key"] and b["key"] and a["key"] != b["key"]
    runtime.run(wire, run_id="run-43")
    assert seen[2]["key"] != a["key"]  # another run, another key


class Tracer:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def around(self, ctx, call_next):
        self.log.append(f"{self.name}:enter:{ctx.node_id}")
        result = call_next()
        self.log.append(f"{self.name}:exit:{ctx.node_id}")
        return result

    def before(self, ctx):
        self.log.append(f"{self.name}:before:{ctx.node_id}")

    def after(self, ctx, result):
        self.log.append(f"{self.name}:after:{ctx.node_id}")


class HooksOnly:
    """A middleware with only `before` and `after` (no `around`)."""

    def __init__(self, log: list) -> None:
        self.log = log

    def before(self, ctx):
        self.log.append(f"before:{ctx.node_id}")

    def after(self, ctx, result):
        self.log.append(f"after:{ctx.node_id}:{result.output}")


def test_middleware_first_in_the_list_is_outermost():
    log: list = []

    def node(ctx):
        log.append(f"node:{ctx.node_id}")
        return 1

    runtime = FlowRuntime(registry={"n": node}, middleware=[Tracer("outer", log), Tracer("inner", log)])
    result = runtime.run(bp([{"id": "x", "uses": "n"}]))
    assert result.status == "completed"
    core = log.index("node:x")
    outer = [i for i, entry in enumerate(log) if entry.startswith("outer:")]
    inner = [i for i, entry in enumerate(log) if entry.startswith("inner:")]
    assert len(outer) == 4 and len(inner) == 4
    assert min(outer) < min(inner) < core < max(inner) < max(outer)
    for name in ("outer", "inner"):
        assert log.index(f"{name}:before:x") < core < log.index(f"{name}:after:x")
        assert log.index(f"{name}:enter:x") < core < log.index(f"{name}:exit:x")


def test_middleware_wraps_every_node_and_around_can_change_the_result():
    class Times10:
        def around(self, ctx, call_next):
            result = call_next()
            return NodeResult(output=result.output * 10, action=result.action)

    log: list = []
    runtime = FlowRuntime(registry={"a": lambda ctx: 2, "b": lambda ctx: ctx.input + 1},
                          middleware=[Times10(), HooksOnly(log)])
    result = runtime.run(bp(["a", "b"], [("a", "b")]))
    assert result.status == "completed", result.errors
    assert result.context["a"] == 20
    assert result.context["b"] == 210
    # HooksOnly is inside Times10: it sees the node's own outputs, before Times10 multiplies them.
    assert log == ["before:a", "after:a:2", "before:b", "after:b:21"]


def test_middleware_sees_a_failure_and_the_run_still_reports_it():
    log: list = []

    class Catcher:
        def around(self, ctx, call_next):
            try:
                return call_next()
            except Exception as exc:
                log.append(type(exc).__name__)
                raise

    def bad(ctx):
        raise ZeroDivisionError("nope")

    result = FlowRuntime(registry={"bad": bad}, middleware=[Catcher()]).run(bp(["bad"]))
    assert result.status == "failed"
    assert result.errors[0].node_id == "bad"
    assert result.errors[0].type == "ZeroDivisionError"
    assert "nope" in result.errors[0].message
    assert log  # the middleware saw the failure
