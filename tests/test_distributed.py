"""Distributed execution (SPEC sections 5 and 7) on the in-memory fakes of `flowcraft.testing`.

Every scenario is run twice: in memory (`Flow.run` / `Flow.resume`) and through an
`InMemoryAdapter` (queue + run store + coordination store); SPEC section 5 says the semantics are
identical, so the final status, context and skipped set must be equal.

The scenario catalogue at the top (`SCENARIOS`, `run_in_memory`, `run_distributed`,
`assert_effectively_once`) is shared with `test_distributed_faults.py`.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest

from flowcraft import BaseNode, Flow, FlowRuntime, NodeContext, WorkflowError, WorkflowResult, create_flow
from flowcraft.distributed import DistributedAdapter, ReconcileStats, Reconciler
from flowcraft.ports import Job
from flowcraft.testing import InMemoryAdapter, InMemoryEventLogger
from flowcraft.testing.conformance import ConformanceSuite

# =================================================================================================
# Scenario catalogue (also imported by test_distributed_faults.py)
# =================================================================================================

FAN_WIDTH = 50
BATCH_SIZE = 100


def _chain() -> List[Flow]:
    return [
        create_flow("chain")
        .node("load", lambda ctx: {"n": ctx.input, "tag": "x"}, inputs="start")
        .node("double", lambda ctx: ctx.input["n"] * 2)
        .node("describe", lambda ctx: f"value={ctx.input}")
        .node("store", lambda ctx: ctx.context.set("stored", ctx.input) or [ctx.input, ctx.context.get("start")])
        .edge("load", "double")
        .edge("double", "describe")
        .edge("describe", "store")
    ]


def _make_worker(i: int) -> Callable[[NodeContext], Any]:
    def work(ctx: NodeContext) -> Any:
        return ctx.input * 100 + i

    return work


def _fan_in() -> List[Flow]:
    flow = create_flow("fanin").node("src", lambda ctx: 7)
    for i in range(FAN_WIDTH):
        flow.node(f"w{i}", _make_worker(i)).edge("src", f"w{i}").edge(f"w{i}", "sink")
    flow.node("sink", lambda ctx: {"keys": list(ctx.input), "total": sum(ctx.input.values())})
    return [flow]


def _diamond() -> List[Flow]:
    return [
        create_flow("diamond")
        .node("decide", lambda ctx: ctx.input, inputs="n")
        .node("even", lambda ctx: "EVEN")
        .node("odd", lambda ctx: "ODD")
        .node("merge", lambda ctx: {"got": ctx.input})
        .edge("decide", "even", condition="result.output % 2 == 0")
        .edge("decide", "odd", condition="result.output % 2 != 0")
        .edge("even", "merge")
        .edge("odd", "merge")
    ]


def _any_join() -> List[Flow]:
    return [
        create_flow("anyjoin")
        .node("s", lambda ctx: 1)
        .node("a", lambda ctx: "A")
        .node("b", lambda ctx: "B")
        .node("first", lambda ctx: {"first": ctx.input}, join_strategy="any")
        .edge("s", "a")
        .edge("s", "b")
        .edge("a", "first")
        .edge("b", "first")
    ]


def _count_up(ctx: NodeContext) -> Any:
    count = ctx.context.get("count", 0) + 1
    ctx.context.set("count", count)
    ctx.context.set(f"lap{count}", ctx.input)
    return count


def _loop() -> List[Flow]:
    return [
        create_flow("looping")
        .node("init", lambda ctx: ctx.context.set("count", 0) or 0)  # the condition is tested first
        .node("body", _count_up)
        .node("after", lambda ctx: {"final": ctx.input, "count": ctx.context.get("count")})
        .loop("repeat", start_node_id="body", end_node_id="body", condition="count < 5")
        .edge("init", "repeat")
        .edge("repeat", "after")
    ]


def _batch() -> List[Flow]:
    return [
        create_flow("batching")
        .node("make", lambda ctx: list(range(BATCH_SIZE)))
        .batch("square", lambda ctx: {"i": ctx.input, "sq": ctx.input * ctx.input}, input_key="make",
               output_key="squares")
        .node("total", lambda ctx: sum(item["sq"] for item in ctx.input))
        .edge("make", "square")
        .edge("square", "total")
    ]


def _subflow() -> List[Flow]:
    child = (
        create_flow("child")
        .node("c1", lambda ctx: ctx.context.get("v") * 3)
        .node("c2", lambda ctx: ctx.input + 1)
        .edge("c1", "c2")
    )
    parent = (
        create_flow("parent")
        .node("p0", lambda ctx: 5)
        .subflow("sub", "child", inputs={"v": "p0"}, outputs={"childResult": "c2"})
        .node("p2", lambda ctx: {"from_child": ctx.context.get("childResult"), "input": ctx.input})
        .edge("p0", "sub")
        .edge("sub", "p2")
    )
    return [parent, child]


def _wait() -> List[Flow]:
    return [
        create_flow("approval")
        .node("request", lambda ctx: {"amount": 10})
        .wait("approve")
        .node("yes", lambda ctx: {"approved": ctx.input})
        .node("no", lambda ctx: {"rejected": ctx.input})
        .node("done", lambda ctx: ctx.input)
        .edge("request", "approve")
        .edge("approve", "yes", action="approve")
        .edge("approve", "no", action="reject")
        .edge("yes", "done")
        .edge("no", "done")
    ]


def _sleep() -> List[Flow]:
    return [
        create_flow("napping")
        .node("before", lambda ctx: {"t": "before"})
        .sleep("nap", duration=0.01)
        .node("after", lambda ctx: {"slept_with": ctx.input})
        .edge("before", "nap")
        .edge("nap", "after")
    ]


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[], List[Flow]]  # the first flow is the one started; the others are subflows
    initial_context: Dict[str, Any] = dataclasses.field(default_factory=dict)
    resume: Optional[Tuple[str, Any]] = None  # (action, output) given to the awaiting run
    wait_timers: bool = False  # in memory, wait for sleeps inline (a distributed run never pauses on them)

    def __str__(self) -> str:
        return self.name


SCENARIOS: Dict[str, Scenario] = {s.name: s for s in [
    Scenario("chain", _chain, {"start": 21}),
    Scenario("fan_in", _fan_in),
    Scenario("diamond_even", _diamond, {"n": 4}),
    Scenario("diamond_odd", _diamond, {"n": 7}),
    Scenario("any_join", _any_join),
    Scenario("loop", _loop),
    Scenario("batch", _batch),
    Scenario("subflow", _subflow),
    Scenario("wait_approve", _wait, resume=("approve", {"by": "ann"})),
    Scenario("wait_reject", _wait, resume=("reject", {"by": "bob"})),
    Scenario("sleep", _sleep, wait_timers=True),
]}


class FakeClock:
    """A clock the test moves by hand (for queue delays, TTLs and `updated_at`)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_runtime(flows: Sequence[Flow]) -> FlowRuntime:
    runtime = FlowRuntime()
    for flow in flows:
        runtime.add_blueprint(flow)
    return runtime


def run_in_memory(scenario: Scenario) -> WorkflowResult:
    flows = scenario.build()
    runtime = make_runtime(flows)
    result = flows[0].run(runtime, dict(scenario.initial_context), wait_timers=scenario.wait_timers)
    if scenario.resume is not None:
        assert result.status == "awaiting", result.errors
        action, output = scenario.resume
        result = flows[0].resume(runtime, result.serialized_context, action=action, output=output)
    return result


def run_distributed(scenario: Scenario, **adapter_options: Any) -> Tuple[InMemoryAdapter, str, WorkflowResult]:
    flows = scenario.build()
    adapter = InMemoryAdapter(make_runtime(flows), **adapter_options)
    run_id = adapter.start_workflow(flows[0].id, dict(scenario.initial_context))
    adapter.drain()
    if scenario.resume is not None:
        paused = adapter.wait_for_result(run_id, timeout=5)
        assert paused.status == "awaiting", (paused.status, paused.errors)
        action, output = scenario.resume
        adapter.resume_with_action(run_id, action, output=output)
        adapter.drain()
    status = adapter.get_status(run_id)
    assert status is not None and status.status != "running", "drain() returned with the run still running"
    return adapter, run_id, adapter.wait_for_result(run_id, timeout=5)


def normalised(counter: Counter, run_id: str) -> Counter:
    """A store counter with the run id replaced by "RUN" (child runs keep their suffix)."""
    return Counter({(key[0].replace(run_id, "RUN", 1),) + tuple(key[1:]): n for key, n in counter.items()})


def assert_effectively_once(adapter: InMemoryAdapter) -> None:
    """SPEC 7, guarantees 1 and 2: each (run, node, iteration) committed once, each join fired once."""
    store = adapter.store
    assert store.completions, "nothing was committed"
    twice = {k: n for k, n in store.completions.items() if n != 1}
    assert not twice, f"node executions committed more than once: {twice}"
    fired = {k: n for k, n in store.activations.items() if n != 1}
    assert not fired, f"nodes made ready more than once: {fired}"


assert_same_result = ConformanceSuite.assert_same_result  # the conformance kit's: SPEC 5's "identical"


# =================================================================================================
# Every scenario: distributed == in memory
# =================================================================================================


@pytest.mark.parametrize("scenario", list(SCENARIOS.values()), ids=str)
def test_scenario_matches_in_memory(scenario: Scenario) -> None:
    expected = run_in_memory(scenario)
    assert expected.status == "completed", expected.errors
    adapter, run_id, result = run_distributed(scenario)
    assert_same_result(result, expected)
    assert result.run_id == run_id
    assert adapter.get_status(run_id).status == "completed"
    assert adapter.get_status(run_id).result["context"] == expected.context
    assert adapter.queue.dead == []
    assert adapter.queue.pending == 0
    assert_effectively_once(adapter)


def test_chain_context() -> None:
    _, _, result = run_distributed(SCENARIOS["chain"])
    assert result.context["store"] == ["value=42", 21]
    assert result.context["stored"] == "value=42"
    assert result.context["_inputs.double"] == {"n": 21, "tag": "x"}


def test_fan_in_join_gets_predecessor_dict_in_edge_order() -> None:
    adapter, run_id, result = run_distributed(SCENARIOS["fan_in"])
    order = [f"w{i}" for i in range(FAN_WIDTH)]
    joined = result.context["_inputs.sink"]
    assert list(joined) == order
    assert joined == {f"w{i}": 700 + i for i in range(FAN_WIDTH)}
    assert result.context["sink"] == {"keys": order, "total": sum(700 + i for i in range(FAN_WIDTH))}
    assert adapter.store.completions[(run_id, "sink", 0)] == 1
    assert adapter.store.activations[(run_id, "sink", 0)] == 1


@pytest.mark.parametrize("n, taken, skipped", [(4, "even", "odd"), (7, "odd", "even")])
def test_if_else_diamond_runs_the_all_join_and_lists_the_skipped_branch(n: int, taken: str, skipped: str) -> None:
    adapter, run_id, result = run_distributed(SCENARIOS[f"diamond_{taken}"])
    assert result.status == "completed"
    assert result.context["decide"] == n
    assert result.skipped == [skipped]
    assert result.context["merge"] == {"got": taken.upper()}
    assert f"_outputs.{skipped}" not in result.context
    assert (run_id, skipped, 0) not in adapter.store.completions
    assert adapter.store.completions[(run_id, "merge", 0)] == 1


def test_any_join_runs_once_on_the_first_taken_edge() -> None:
    adapter, run_id, result = run_distributed(SCENARIOS["any_join"])
    assert result.status == "completed"
    assert result.context["first"] in ({"first": "A"}, {"first": "B"})
    assert adapter.store.completions[(run_id, "first", 0)] == 1
    assert adapter.store.activations[(run_id, "first", 0)] == 1


def test_loop_runs_its_body_once_per_lap() -> None:
    adapter, run_id, result = run_distributed(SCENARIOS["loop"])
    assert result.context["count"] == 5
    assert result.context["after"] == {"final": 5, "count": 5}
    assert [result.context[f"lap{i}"] for i in range(1, 6)] == [0, 1, 2, 3, 4]
    body_laps = sorted(it for (r, node, it) in adapter.store.completions if r == run_id and node == "body")
    assert body_laps == [1, 2, 3, 4, 5]  # entered at the controller: each lap starts with a `continue`


def test_batch_of_100_gathers_results_in_item_order() -> None:
    _, _, result = run_distributed(SCENARIOS["batch"])
    assert result.context["squares"] == [{"i": i, "sq": i * i} for i in range(BATCH_SIZE)]
    assert result.context["total"] == sum(i * i for i in range(BATCH_SIZE))


def test_subflow_runs_the_child_blueprint_and_maps_outputs() -> None:
    adapter, run_id, result = run_distributed(SCENARIOS["subflow"])
    assert result.context["childResult"] == 16
    assert result.context["p2"] == {"from_child": 16, "input": {"childResult": 16}}
    child_runs = {key[0] for key in adapter.store.completions if key[0] != run_id}
    assert len(child_runs) == 1
    (child_run,) = child_runs
    assert adapter.get_status(child_run).status == "completed"


@pytest.mark.parametrize("action, successor, other", [("approve", "yes", "no"), ("reject", "no", "yes")])
def test_wait_then_resume_with_action(action: str, successor: str, other: str) -> None:
    flows = _wait()
    adapter = InMemoryAdapter(make_runtime(flows))
    run_id = adapter.start_workflow("approval")
    adapter.drain()
    assert adapter.get_status(run_id).status == "awaiting"
    paused = adapter.wait_for_result(run_id, timeout=5)
    assert paused.status == "awaiting"
    assert paused.awaiting == ["approve"]
    assert paused.context["_awaitingNodeIds"] == ["approve"]
    assert paused.context["_awaitingDetails"]["approve"]["type"] == "wait"

    expected_paused = flows[0].run(make_runtime(flows))
    assert paused.context == expected_paused.context

    enqueued = adapter.resume_with_action(run_id, action, output={"by": "me"})
    assert successor in enqueued
    assert other not in enqueued
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    expected = flows[0].resume(make_runtime(flows), expected_paused.serialized_context, action=action, output={"by": "me"})
    assert_same_result(result, expected)
    assert result.skipped == [other]
    assert result.context["done"] == {("approved" if action == "approve" else "rejected"): {"by": "me"}}
    assert_effectively_once(adapter)


def test_resume_of_a_run_that_is_not_awaiting_is_refused() -> None:
    adapter = InMemoryAdapter(make_runtime(_chain()))
    run_id = adapter.start_workflow("chain", {"start": 1})
    adapter.drain()
    with pytest.raises(ValueError):
        adapter.resume_with_action(run_id, "approve")
    assert adapter.get_status(run_id).status == "completed"


def test_awaiting_child_makes_the_parent_await_and_resume_reaches_the_child() -> None:
    parent, child = _gated()  # p0 -> sub (a child run: c1 -> gate (wait) -> c2) -> p2
    runtime = make_runtime([parent, child])
    paused_in_memory = parent.run(runtime)
    expected = parent.resume(runtime, paused_in_memory.serialized_context, output="ok")
    assert expected.status == "completed"

    adapter = InMemoryAdapter(make_runtime([parent, child]))
    run_id = adapter.start_workflow("gated-parent")
    adapter.drain()
    paused = adapter.wait_for_result(run_id, timeout=5)
    assert paused.status == "awaiting"
    assert paused.awaiting == ["sub"] == paused_in_memory.awaiting
    assert "c2" in adapter.resume_with_action(run_id, None, output="ok")
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert_same_result(result, expected)
    assert result.context["p2"] == {"out": {"c2": "ok"}}
    assert_effectively_once(adapter)


def _raises_key_error(ctx: NodeContext) -> Any:
    raise KeyError("missing thing")


def _item_three_fails(ctx: NodeContext) -> Any:
    if ctx.input == 3:
        raise ValueError("item 3 is bad")
    return ctx.input


def _failing_subflow() -> List[Flow]:
    child = create_flow("bad-child").node("c1", _raises_key_error)
    parent = create_flow("bad-parent").node("p0", lambda ctx: 0).subflow("sub", "bad-child").edge("p0", "sub")
    return [parent, child]


def _not_json() -> List[Flow]:
    return [create_flow("not-json").node("a", lambda ctx: 1).node("b", lambda ctx: {1, 2}).edge("a", "b")]


def _runaway_loop() -> List[Flow]:
    return [create_flow("runaway").node("body", lambda ctx: 1)
            .loop("forever", start_node_id="body", end_node_id="body", condition="true", max_iterations=5)]


def _raw_cycle() -> List[Flow]:
    """s -> a -> b -> a with no loop controller: capped by max_cycle_iterations (default 1000)."""
    return [create_flow("raw-cycle").node("s", lambda ctx: 0).node("a", lambda ctx: (ctx.input or 0) + 1)
            .node("b", lambda ctx: ctx.input).edge("s", "a").edge("a", "b").edge("b", "a")]


def _failing_batch_item() -> List[Flow]:
    return [create_flow("bad-batch").node("make", lambda ctx: list(range(6)))
            .batch("each", _item_three_fails, input_key="make").edge("make", "each")]


@pytest.mark.parametrize("build, node_id, error_type", [
    pytest.param(_failing_subflow, "sub", "SubflowError", id="failing-child"),
    pytest.param(_not_json, "b", "SerializationError", id="non-json-output"),
    pytest.param(_runaway_loop, "forever", "LoopLimitError", id="loop-limit"),
    pytest.param(_failing_batch_item, "each_scatter", "ValueError", id="failing-batch-item"),
    pytest.param(_raw_cycle, "b", "LoopLimitError", id="raw-cycle-limit"),
])
def test_failures_are_reported_as_in_memory(build: Callable[[], List[Flow]], node_id: str, error_type: str) -> None:
    flows = build()
    expected = flows[0].run(make_runtime(flows))
    assert expected.status == "failed"
    adapter = InMemoryAdapter(make_runtime(build()))
    run_id = adapter.start_workflow(flows[0].id)
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "failed"
    assert [(e.node_id, e.type) for e in result.errors] == [(node_id, error_type)]
    assert result.errors == expected.errors  # SPEC 5: identical in memory and distributed
    assert result.context == expected.context
    assert adapter.queue.dead == []
    assert_effectively_once(adapter)


def test_parallel_waits_are_resumed_one_by_one_by_node_id() -> None:
    flow = (
        create_flow("two-waits")
        .node("s", lambda ctx: 1)
        .wait("w1")
        .wait("w2")
        .node("j", lambda ctx: ctx.input)
        .edge("s", "w1")
        .edge("s", "w2")
        .edge("w1", "j")
        .edge("w2", "j")
    )
    runtime = make_runtime([flow])
    step0 = flow.run(runtime)
    step1 = flow.resume(runtime, step0.serialized_context, node_id="w1", output="one")
    step2 = flow.resume(runtime, step1.serialized_context, node_id="w2", output="two")

    adapter = InMemoryAdapter(make_runtime([flow]))
    run_id = adapter.start_workflow("two-waits")
    adapter.drain()
    assert adapter.wait_for_result(run_id, timeout=5).awaiting == ["w1", "w2"]
    with pytest.raises(ValueError):
        adapter.resume_with_action(run_id, None, output="x")  # which one?
    assert adapter.resume_with_action(run_id, None, output="one", node_id="w1") == set()  # j still waits for w2
    adapter.drain()
    half = adapter.wait_for_result(run_id, timeout=5)
    assert half.status == "awaiting" and half.awaiting == ["w2"]
    assert half.context == step1.context
    assert adapter.resume_with_action(run_id, None, output="two", node_id="w2") == {"j"}
    adapter.drain()
    assert_same_result(adapter.wait_for_result(run_id, timeout=5), step2)
    assert_effectively_once(adapter)


def test_a_second_resume_is_refused_and_changes_nothing() -> None:
    adapter = InMemoryAdapter(make_runtime(_wait()))
    run_id = adapter.start_workflow("approval")
    adapter.drain()
    assert adapter.resume_with_action(run_id, "approve", output=1) == {"yes"}
    with pytest.raises(ValueError):
        adapter.resume_with_action(run_id, "reject", output=2)
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.context["done"] == {"approved": 1}
    assert result.skipped == ["no"]
    assert_effectively_once(adapter)


def _wait_beside_a_failure() -> Flow:
    return (
        create_flow("wait-and-fail")
        .node("s", lambda ctx: 1)
        .wait("w")
        .node("bad", _raises_key_error)
        .node("y", lambda ctx: 2)
        .edge("s", "w")
        .edge("s", "bad")
        .edge("w", "y")
    )


@pytest.mark.parametrize("how", ["cancelled", "failed"])
def test_resume_of_a_finished_run_changes_nothing(how: str) -> None:
    """A cancelled or failed run is final: a late resume must not commit into it.

    (SPEC 5: "once cancelled no new node starts"; "a failed node fails the run: no new nodes start".)"""
    if how == "cancelled":
        flow = _wait()[0]
        adapter = InMemoryAdapter(make_runtime([flow]))
        run_id = adapter.start_workflow(flow.id)
        adapter.drain()
        adapter.cancel(run_id)
        wait_node = "approve"
    else:
        flow = _wait_beside_a_failure()
        adapter = InMemoryAdapter(make_runtime([flow]))
        run_id = adapter.start_workflow(flow.id)
        adapter.drain()
        wait_node = "w"
    assert adapter.get_status(run_id).status == how
    final = adapter.get_status(run_id).result
    context = adapter.store.read_all_context(run_id)
    completions = Counter(adapter.store.completions)
    try:
        enqueued = adapter.resume_with_action(run_id, "approve", output="late", node_id=wait_node)
    except (ValueError, RuntimeError):
        enqueued = set()
    adapter.drain()
    assert adapter.get_status(run_id).status == how
    assert adapter.get_status(run_id).result == final  # the stored final result is not rewritten
    assert adapter.store.read_all_context(run_id) == context
    assert adapter.store.completions == completions  # no completion committed into a finished run
    assert enqueued == set()


def test_updated_at_is_refreshed_on_every_node_completion() -> None:
    clock = FakeClock()
    adapter = InMemoryAdapter(make_runtime(_chain()), clock=clock)
    run_id = adapter.start_workflow("chain", {"start": 1})
    assert adapter.get_status(run_id).updated_at == clock.now
    for _ in range(4):
        clock.advance(10)
        assert adapter.work(max_jobs=1) == 1
        assert adapter.get_status(run_id).updated_at == clock.now
    assert adapter.get_status(run_id).status == "completed"


def test_a_job_with_extra_fields_is_accepted() -> None:
    adapter = InMemoryAdapter(make_runtime(_chain()))
    adapter.store.seed_run("extra", {"start": 2})
    adapter.queue.push_raw(json.dumps({"runId": "extra", "blueprintId": "chain", "nodeId": "load", "attempt": 1,
                                       "traceId": "abc", "headers": {"x": 1}}).encode())
    adapter.drain()
    assert adapter.queue.dead == []
    assert adapter.wait_for_result("extra", timeout=5).context["store"] == ["value=4", 2]


# =================================================================================================
# Sleep: a durable timer; no worker blocks on it
# =================================================================================================


def test_sleep_keeps_the_run_running_and_blocks_no_worker() -> None:
    sleeper = (
        create_flow("sleeper")
        .node("a", lambda ctx: "woke")
        .sleep("nap", duration=0.1)
        .node("b", lambda ctx: {"after_nap": ctx.input})
        .edge("a", "nap")
        .edge("nap", "b")
    )
    quick = create_flow("quick").node("q", lambda ctx: "quick")
    adapter = InMemoryAdapter(make_runtime([sleeper, quick]))
    clock = FakeClock()
    adapter.queue.clock = clock  # the timer becomes due only when the test says so

    slow_run = adapter.start_workflow("sleeper")
    adapter.work(burst=True)  # returns although a timer is pending: nobody blocks on it
    assert adapter.get_status(slow_run).status == "running"
    assert adapter.queue.next_due_in is not None and adapter.queue.next_due_in > 0

    quick_run = adapter.start_workflow("quick")
    adapter.work(burst=True)
    assert adapter.get_status(quick_run).status == "completed"  # the later run finished first
    assert adapter.get_status(slow_run).status == "running"
    assert "_outputs.b" not in adapter.store.read_all_context(slow_run)

    clock.advance(0.1)
    adapter.drain()
    result = adapter.wait_for_result(slow_run, timeout=5)
    expected = sleeper.run(make_runtime([sleeper]), wait_timers=True)
    assert_same_result(result, expected)
    assert result.context["b"] == {"after_nap": "woke"}
    assert_effectively_once(adapter)


# =================================================================================================
# Failure, retries, fallback
# =================================================================================================


def test_failing_node_fails_the_run_once_and_starts_no_new_node() -> None:
    started: List[str] = []

    def track(name: str, value: Any) -> Callable[[NodeContext], Any]:
        def node(ctx: NodeContext) -> Any:
            started.append(name)
            return value

        return node

    def boom(ctx: NodeContext) -> Any:
        started.append("bad")
        raise ValueError("kaput")

    flow = (
        create_flow("failing")
        .node("s", track("s", 1))
        .node("bad", boom)
        .node("sibling", track("sibling", 2))
        .node("after", track("after", 3))
        .edge("s", "bad")
        .edge("s", "sibling")
        .edge("sibling", "after")
    )
    expected = flow.run()
    assert expected.status == "failed"
    started.clear()

    adapter = InMemoryAdapter(make_runtime([flow]))
    run_id = adapter.start_workflow("failing")
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "failed"
    assert result.errors == [WorkflowError("bad", "kaput", "ValueError")]
    assert result.errors == expected.errors
    # FIFO queue, one worker: `bad` is handled before `sibling`; once the run failed, no new node starts
    assert started == ["s", "bad"]
    assert (run_id, "sibling", 0) not in adapter.store.completions
    assert (run_id, "after", 0) not in adapter.store.completions
    assert result.context["s"] == 1
    assert "_outputs.sibling" not in result.context and "_outputs.after" not in result.context

    # "failed" is final: a redelivered job of the failed node and a reconcile change nothing
    adapter.queue.enqueue([Job(run_id, "failing", "bad")])
    adapter.queue.enqueue([Job(run_id, "failing", "sibling")])
    assert adapter.reconcile(run_id) == set()
    adapter.drain()
    assert started == ["s", "bad"]
    again = adapter.wait_for_result(run_id, timeout=5)
    assert again.status == "failed"
    assert again.errors == [WorkflowError("bad", "kaput", "ValueError")]
    assert adapter.queue.dead == []


def _flaky_flow(attempts_seen: List[Tuple[int, str]], *, fail_until: int, max_retries: int, retry_delay: float = 0) -> Flow:
    def flaky(ctx: NodeContext) -> Any:
        attempts_seen.append((ctx.attempt, ctx.idempotency_key))
        if ctx.attempt < fail_until:
            raise RuntimeError(f"attempt {ctx.attempt} failed")
        return {"succeeded_on": ctx.attempt}

    return (
        create_flow("flaky")
        .node("s", lambda ctx: 1)
        .node("flaky", flaky, max_retries=max_retries, retry_delay=retry_delay)
        .node("after", lambda ctx: ctx.input)
        .edge("s", "flaky")
        .edge("flaky", "after")
    )


def test_in_process_retries() -> None:
    seen: List[Tuple[int, str]] = []
    flow = _flaky_flow(seen, fail_until=3, max_retries=3)
    expected = flow.run()
    assert expected.status == "completed"
    seen.clear()

    adapter = InMemoryAdapter(make_runtime([flow]))
    run_id = adapter.start_workflow("flaky")
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert_same_result(result, expected)
    assert result.context["after"] == {"succeeded_on": 3}
    assert [attempt for attempt, _ in seen] == [1, 2, 3]
    assert {key for _, key in seen} == {f"{run_id}:flaky:0"}
    assert adapter.queue.delivered == 3  # s, flaky (all three attempts in one delivery), after
    assert_effectively_once(adapter)


def test_queue_retries_make_each_attempt_a_separate_delivery() -> None:
    seen: List[Tuple[int, str]] = []
    flow = _flaky_flow(seen, fail_until=3, max_retries=3)
    expected = flow.run()
    seen.clear()

    adapter = InMemoryAdapter(make_runtime([flow]), retry_mode="queue")
    run_id = adapter.start_workflow("flaky")
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert [attempt for attempt, _ in seen] == [1, 2, 3]
    assert {key for _, key in seen} == {f"{run_id}:flaky:0"}  # the same node execution every attempt
    assert adapter.queue.delivered == 5  # s, flaky x3, after
    assert_same_result(result, expected)
    assert_effectively_once(adapter)


def test_queue_retries_exhausted_fail_the_run_with_the_node_error() -> None:
    seen: List[Tuple[int, str]] = []
    flow = _flaky_flow(seen, fail_until=99, max_retries=2)
    expected = flow.run()
    seen.clear()

    adapter = InMemoryAdapter(make_runtime([flow]), retry_mode="queue")
    run_id = adapter.start_workflow("flaky")
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert [attempt for attempt, _ in seen] == [1, 2]
    assert result.status == "failed"
    assert result.errors == [WorkflowError("flaky", "attempt 2 failed", "RuntimeError")]
    assert result.errors == expected.errors


def test_queue_retry_backoff_does_not_hold_the_worker() -> None:
    seen: List[Tuple[int, str]] = []
    flow = _flaky_flow(seen, fail_until=2, max_retries=2, retry_delay=30)
    adapter = InMemoryAdapter(make_runtime([flow]), retry_mode="queue")
    clock = FakeClock()
    adapter.queue.clock = clock
    run_id = adapter.start_workflow("flaky")
    adapter.work(burst=True)  # returns: the retry waits in the queue, not in the worker
    assert [attempt for attempt, _ in seen] == [1]
    assert adapter.get_status(run_id).status == "running"
    assert adapter.queue.next_due_in is not None and adapter.queue.next_due_in > 0
    clock.advance(30)
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert [attempt for attempt, _ in seen] == [1, 2]
    assert result.status == "completed"
    assert result.context["after"] == {"succeeded_on": 2}


class AlwaysFails(BaseNode):
    def exec(self, prep_result: Any, ctx: NodeContext) -> Any:
        raise ConnectionError("primary down")


def test_fallback_node_runs_in_the_failed_nodes_place() -> None:
    flow = (
        create_flow("fallbacks")
        .node("s", lambda ctx: 1)
        .node("primary", AlwaysFails, fallback="backup", max_retries=2)
        .node("backup", lambda ctx: {"from": "backup", "input": ctx.input})
        .node("next", lambda ctx: ctx.input)
        .edge("s", "primary")
        .edge("primary", "next")
    )
    expected = flow.run()
    assert expected.status == "completed"
    adapter = InMemoryAdapter(make_runtime([flow]))
    run_id = adapter.start_workflow("fallbacks")
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert_same_result(result, expected)
    assert result.context["next"] == {"from": "backup", "input": 1}
    assert result.errors == []
    assert_effectively_once(adapter)


# =================================================================================================
# Cancel, seed-started runs, version safety
# =================================================================================================


def test_cancel_marks_the_run_cancelled_and_drops_its_later_jobs() -> None:
    started: List[str] = []

    def step(name: str) -> Callable[[NodeContext], Any]:
        def node(ctx: NodeContext) -> Any:
            started.append(name)
            return name

        return node

    flow = create_flow("cancelme").node("a", step("a")).node("b", step("b")).node("c", step("c")).edge("a", "b").edge("b", "c")
    adapter = InMemoryAdapter(make_runtime([flow]))
    run_id = adapter.start_workflow("cancelme")
    assert adapter.work(max_jobs=1) == 1
    assert started == ["a"]
    assert adapter.queue.pending == 1  # b's job is queued

    adapter.cancel(run_id)
    assert adapter.get_status(run_id).status == "cancelled"
    adapter.drain()
    assert started == ["a"]
    assert adapter.queue.pending == 0
    assert adapter.queue.dead == []
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "cancelled"
    assert result.context["a"] == "a"
    assert "_outputs.b" not in result.context
    assert set(adapter.store.completions) == {(run_id, "a", 0)}
    adapter.cancel(run_id)  # cancelling again is harmless
    assert adapter.get_status(run_id).status == "cancelled"


@pytest.mark.parametrize("how", ["job", "raw"])
def test_run_started_the_seed_way_runs_to_completion(how: str) -> None:
    scenario = SCENARIOS["chain"]
    expected = run_in_memory(scenario)
    adapter = InMemoryAdapter(make_runtime(scenario.build()))
    run_id = "seed-run-1"
    adapter.store.seed_run(run_id, dict(scenario.initial_context))
    if how == "job":
        adapter.queue.enqueue([Job(run_id, "chain", "load")])
    else:  # exactly what the seeds' clients publish
        adapter.queue.push_raw(json.dumps({"runId": run_id, "blueprintId": "chain", "nodeId": "load"}).encode())
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert_same_result(result, expected)
    assert adapter.get_status(run_id).status == "completed"
    assert adapter.queue.dead == []
    assert_effectively_once(adapter)


def _versioned(version: str, calls: List[Tuple[str, str]]) -> Flow:
    def first(ctx: NodeContext) -> Any:
        calls.append(("first", version))
        return f"v{version}"

    def second(ctx: NodeContext) -> Any:
        calls.append(("second", version))
        return ctx.input + "!"

    return create_flow("versioned", metadata={"version": version}).node("first", first).node("second", second).edge("first", "second")


def _two_versions(ttl: float = 3600.0) -> Tuple[InMemoryAdapter, DistributedAdapter, List[Tuple[str, str]], FakeClock]:
    calls: List[Tuple[str, str]] = []
    v1 = InMemoryAdapter(make_runtime([_versioned("1", calls)]), version_mismatch_delay=0.01, version_mismatch_ttl=ttl)
    clock = FakeClock()
    v2 = DistributedAdapter(make_runtime([_versioned("2", calls)]), v1.queue, v1.store, v1.coordination,
                            version_mismatch_delay=0.01, version_mismatch_ttl=ttl, clock=clock)
    return v1, v2, calls, clock


def test_wrong_version_worker_never_executes_and_never_loses_the_job() -> None:
    v1, v2, calls, _ = _two_versions()
    run_id = v1.start_workflow("versioned")
    assert v1.store.get_record(run_id).blueprint_version == "1"
    assert v2.work(max_jobs=3) == 3  # takes the job three times, puts it back each time
    assert calls == []
    assert v1.queue.pending == 1
    assert v1.queue.dead == []
    assert v1.get_status(run_id).status == "running"

    v1.drain()
    result = v1.wait_for_result(run_id, timeout=5)
    assert result.status == "completed"
    assert result.context["second"] == "v1!"
    assert calls == [("first", "1"), ("second", "1")]


def test_wrong_version_job_goes_to_the_dead_letter_queue_after_the_ttl() -> None:
    v1, v2, calls, clock = _two_versions(ttl=60)
    run_id = v1.start_workflow("versioned")  # a version-1 run; only the version-2 worker works
    assert v2.work(max_jobs=1) == 1  # put back, first seen now
    assert v1.queue.dead == [] and v1.queue.pending == 1
    clock.advance(61)  # past version_mismatch_ttl
    assert v2.work(max_jobs=1) == 1
    assert calls == []  # never executed by the wrong worker
    assert v1.queue.pending == 0
    assert len(v1.queue.dead) == 1
    body, reason = v1.queue.dead[0]
    job = json.loads(body)
    assert (job["runId"], job["blueprintId"], job["nodeId"]) == (run_id, "versioned", "first")
    assert "version" in reason.lower()


def test_seed_run_adopts_the_version_of_the_first_worker() -> None:
    v1, v2, calls, _ = _two_versions()
    v1.store.seed_run("seeded", {})
    v1.queue.enqueue([Job("seeded", "versioned", "first")])
    assert v2.work(max_jobs=1) == 1  # the v2 worker takes the first job: the run is now version 2
    assert calls == [("first", "2")]
    assert v1.store.get_record("seeded").blueprint_version == "2"
    assert v1.work(max_jobs=2) == 2  # the v1 worker must put the second job back
    assert calls == [("first", "2")]
    assert v1.queue.pending == 1
    assert v2.work(max_jobs=1) == 1
    assert calls == [("first", "2"), ("second", "2")]
    assert v1.wait_for_result("seeded", timeout=5).context["second"] == "v2!"


# =================================================================================================
# Malformed jobs (SPEC 7, guarantee 4)
# =================================================================================================

MALFORMED = [
    pytest.param(b"{not json", "json", id="bad-json"),
    pytest.param(b"\xff\xfe\x00", "json", id="not-utf8"),
    pytest.param(b"[1, 2, 3]", "object", id="json-list"),
    pytest.param(json.dumps({"runId": "r1"}).encode(), "missing", id="missing-fields"),
    pytest.param(json.dumps({"runId": "r1", "blueprintId": "", "nodeId": "load"}).encode(), "blueprintid", id="empty-field"),
    pytest.param(json.dumps({"runId": "r1", "blueprintId": "nope", "nodeId": "load"}).encode(), "unknown blueprint", id="unknown-blueprint"),
    pytest.param(json.dumps({"runId": "r1", "blueprintId": "chain", "nodeId": "nope"}).encode(), "unknown node", id="unknown-node"),
    pytest.param(json.dumps({"runId": "r1", "blueprintId": "chain", "nodeId": "load", "iteration": "x"}).encode(), "iteration", id="bad-iteration"),
    pytest.param(json.dumps({"runId": "r1", "blueprintId": "chain", "nodeId": "load", "kind": "bogus"}).encode(), "kind", id="bad-kind"),
]


@pytest.mark.parametrize("body, reason_fragment", MALFORMED)
def test_malformed_job_is_dead_lettered_and_the_worker_goes_on(body: bytes, reason_fragment: str) -> None:
    adapter = InMemoryAdapter(make_runtime(_chain()))
    adapter.queue.push_raw(body)
    good = adapter.start_workflow("chain", {"start": 1})  # queued after the bad one
    adapter.drain()
    assert len(adapter.queue.dead) == 1
    dead_body, reason = adapter.queue.dead[0]
    assert dead_body == body
    assert reason_fragment in reason.lower()
    assert adapter.queue.pending == 0  # not retried forever
    assert adapter.wait_for_result(good, timeout=5).status == "completed"


@pytest.mark.parametrize("extra, reason_fragment", [
    ({"nodeId": "load", "attempt": "x"}, "attempt"),
    ({"nodeId": "load", "iteration": -3}, "iteration"),
    ({"nodeId": "load", "kind": "bogus"}, "kind"),
])
def test_malformed_job_of_a_known_run_fails_that_run_with_the_reason(extra: Dict[str, Any], reason_fragment: str) -> None:
    adapter = InMemoryAdapter(make_runtime(_chain()))
    victim = "victim"
    adapter.store.seed_run(victim, {"start": 1})
    adapter.queue.push_raw(json.dumps({"runId": victim, "blueprintId": "chain", **extra}).encode())
    bystander = adapter.start_workflow("chain", {"start": 2})
    adapter.drain()
    assert len(adapter.queue.dead) == 1
    assert reason_fragment in adapter.queue.dead[0][1].lower()
    status = adapter.get_status(victim)
    assert status.status == "failed"
    result = adapter.wait_for_result(victim, timeout=5)
    assert result.status == "failed"
    assert len(result.errors) == 1
    assert reason_fragment in result.errors[0].message.lower()
    assert adapter.wait_for_result(bystander, timeout=5).status == "completed"


def test_malformed_job_of_a_started_run_fails_it_and_stops_it() -> None:
    adapter = InMemoryAdapter(make_runtime(_chain()))
    run_id = adapter.start_workflow("chain", {"start": 3})
    adapter.queue.push_raw(json.dumps({"runId": run_id, "blueprintId": "chain", "nodeId": "describe",
                                       "iteration": -1}).encode())
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "failed"
    assert [e.node_id for e in result.errors] == ["describe"]
    assert "iteration" in result.errors[0].message
    assert "_outputs.store" not in result.context  # no node started after the run failed
    assert len(adapter.queue.dead) == 1


def test_a_job_naming_a_node_or_blueprint_its_run_lacks_is_only_dead_lettered() -> None:
    adapter = InMemoryAdapter(make_runtime(_chain() + [create_flow("other").node("x", lambda ctx: 1)]))
    run_id = adapter.start_workflow("chain", {"start": 3})
    for forged in ({"nodeId": "ghost"}, {"blueprintId": "nope", "nodeId": "load"}, {"blueprintId": "other", "nodeId": "x"},
                   {"nodeId": "ghost", "iteration": -1}):
        adapter.queue.push_raw(json.dumps({"runId": run_id, "blueprintId": "chain", **forged}).encode())
    adapter.drain()
    assert adapter.wait_for_result(run_id, timeout=5).status == "completed"  # nobody else's job fails it
    assert len(adapter.queue.dead) == 4


# =================================================================================================
# Reconciler
# =================================================================================================


@pytest.mark.parametrize("scenario_name, jobs_before_loss", [("fan_in", 1), ("batch", 2)])
def test_reconciler_re_enqueues_a_lost_job_and_the_run_completes(scenario_name: str, jobs_before_loss: int) -> None:
    scenario = SCENARIOS[scenario_name]
    expected = run_in_memory(scenario)
    clean, clean_run, _ = run_distributed(scenario)
    adapter = InMemoryAdapter(make_runtime(scenario.build()))
    run_id = adapter.start_workflow(scenario.build()[0].id, dict(scenario.initial_context))
    assert adapter.work(max_jobs=jobs_before_loss) == jobs_before_loss  # the fan-out: many jobs queued
    lost = adapter.queue.fetch(1, timeout=0)
    assert len(lost) == 1 and lost[0].job is not None
    adapter.queue.ack(lost)  # a job lost: taken and acknowledged, never processed
    adapter.drain()
    assert adapter.get_status(run_id).status == "running"  # stuck without the lost job

    stats = Reconciler(adapter, stalled_threshold_seconds=0).run()
    assert isinstance(stats, ReconcileStats)
    assert stats.scanned >= 1
    assert stats.stalled >= 1
    assert stats.reconciled >= 1
    assert stats.failed == 0
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert_same_result(result, expected)
    assert_effectively_once(adapter)
    assert normalised(adapter.store.completions, run_id) == normalised(clean.store.completions, clean_run)


def test_reconciler_leaves_a_healthy_run_alone() -> None:
    adapter = InMemoryAdapter(make_runtime(_chain()))
    run_id = adapter.start_workflow("chain", {"start": 1})
    before = adapter.store.get_record(run_id)
    stats = Reconciler(adapter, stalled_threshold_seconds=3600).run()
    # no worker ever fetched: the start job waits on a queue nobody serves, and the reconciler says so
    assert stats == ReconcileStats(scanned=1, stalled=0, reconciled=0, failed=0, unserved=1)
    assert adapter.queue.pending == 1
    assert adapter.store.get_record(run_id).version == before.version
    adapter.drain()
    assert adapter.wait_for_result(run_id, timeout=5).status == "completed"
    assert_effectively_once(adapter)


def test_reconcile_refreshes_updated_at_without_a_new_version() -> None:
    now = [1000.0]
    adapter = InMemoryAdapter(make_runtime(_chain()), clock=lambda: now[0])
    run_id = adapter.start_workflow("chain", {"start": 1})
    before = adapter.store.get_record(run_id)
    now[0] += 60
    assert adapter.reconcile(run_id) == {"load"}
    after = adapter.store.get_record(run_id)
    assert (after.version, after.updated_at) == (before.version, before.updated_at + 60)
    adapter.store.clock = lambda: now[0] + 10
    assert adapter.store.idle_runs(30) == (1, [])
    assert adapter.store.idle_runs(5) == (1, [run_id])


def test_reconcile_concurrently_with_a_worker_never_commits_twice() -> None:
    scenario = SCENARIOS["fan_in"]
    expected = run_in_memory(scenario)
    adapter = InMemoryAdapter(make_runtime(scenario.build()), poll_timeout=0.01)
    run_id = adapter.start_workflow("fanin", {})
    done = threading.Event()
    reconciled: List[set] = []
    errors: List[BaseException] = []

    def keep_reconciling() -> None:
        try:
            while not done.is_set():
                reconciled.append(adapter.reconcile(run_id))
        except BaseException as error:  # surfaced below
            errors.append(error)

    assert adapter.reconcile(run_id) == {"src"}  # the start job is now queued twice
    thread = threading.Thread(target=keep_reconciling)
    adapter.start()
    thread.start()
    try:
        result = adapter.wait_for_result(run_id, timeout=30)
    finally:
        done.set()
        thread.join(10)
        adapter.stop(timeout=10)
    assert errors == []
    assert reconciled, "reconcile never ran"
    assert_same_result(result, expected)
    adapter.drain()  # the duplicates reconcile enqueued are dropped without effect
    assert adapter.wait_for_result(run_id, timeout=5).context == expected.context
    assert_effectively_once(adapter)


# =================================================================================================
# Worker lifecycle and client API
# =================================================================================================


def test_start_and_stop_a_background_worker() -> None:
    adapter = InMemoryAdapter(make_runtime(_chain()), poll_timeout=0.05)
    before = set(threading.enumerate())
    adapter.start()
    workers = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert [t.name for t in workers if t.name == "flowcraft-worker"] == ["flowcraft-worker"]  # and its committer
    run_id = adapter.start_workflow("chain", {"start": 4})
    result = adapter.wait_for_result(run_id, timeout=30)
    assert result.status == "completed"
    assert result.context["store"] == ["value=8", 4]
    adapter.stop(timeout=10)
    assert not any(t.is_alive() for t in workers)

    idle = adapter.start_workflow("chain", {"start": 5})  # nobody works any more
    assert adapter.get_status(idle).status == "running"
    assert adapter.queue.pending == 1
    adapter.drain()
    assert adapter.get_status(idle).status == "completed"


def test_client_api_on_unknown_and_unfinished_runs() -> None:
    adapter = InMemoryAdapter(make_runtime(_chain()))
    assert adapter.get_status("no-such-run") is None
    run_id = adapter.start_workflow("chain", {"start": 1}, run_id="my-run")
    assert run_id == "my-run"
    status = adapter.get_status(run_id)
    assert status.status == "running"
    assert status.result is None
    with pytest.raises(TimeoutError):
        adapter.wait_for_result(run_id, timeout=0)
    adapter.drain()
    status = adapter.get_status(run_id)
    assert status.status == "completed"
    assert status.result["status"] == "completed"
    assert status.updated_at > 0


def test_starting_the_same_run_id_twice_does_not_run_it_twice() -> None:
    adapter = InMemoryAdapter(make_runtime(_chain()))
    adapter.start_workflow("chain", {"start": 1}, run_id="once")
    with pytest.raises(ValueError, match="'once' exists already"):  # never someone else's run
        adapter.start_workflow("chain", {"start": 1}, run_id="once")
    adapter.drain()
    assert adapter.wait_for_result("once", timeout=5).context["store"] == ["value=2", 1]
    assert_effectively_once(adapter)


# =================================================================================================
# Raw cycles (no loop controller): capped, the same way in memory and distributed
# =================================================================================================


def test_raw_cycle_cap_is_the_runtime_option_in_both_engines() -> None:
    flows = _raw_cycle()
    expected = flows[0].run(FlowRuntime(max_cycle_iterations=7))
    assert expected.status == "failed"
    assert expected.context["a"] == 7  # seven laps of a -> b, then b's back edge fails
    assert "7 iterations" in expected.errors[0].message and "'b'" in expected.errors[0].message
    runtime = FlowRuntime(max_cycle_iterations=7)
    runtime.add_blueprint(_raw_cycle()[0])
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow("raw-cycle")
    adapter.drain()
    assert_same_result(adapter.wait_for_result(run_id, timeout=5), expected)
    assert sorted(it for (r, node, it) in adapter.store.completions if node == "a") == list(range(7))


# =================================================================================================
# Awaiting subflows: the same details in memory and distributed (SPEC 5)
# =================================================================================================


def _gated() -> List[Flow]:
    child = (
        create_flow("gated-child")
        .node("c1", lambda ctx: 1)
        .wait("gate", why="sign-off")
        .node("c2", lambda ctx: {"c2": ctx.input})
        .edge("c1", "gate")
        .edge("gate", "c2")
    )
    parent = (
        create_flow("gated-parent")
        .node("p0", lambda ctx: 0)
        .subflow("sub", "gated-child", outputs={"out": "c2"})
        .node("p2", lambda ctx: ctx.input)
        .edge("p0", "sub")
        .edge("sub", "p2")
    )
    return [parent, child]


def test_awaiting_subflow_context_is_the_same_in_memory_and_distributed() -> None:
    parent, child = _gated()
    runtime = make_runtime([parent, child])
    paused_in_memory = parent.run(runtime, run_id="r1")
    adapter = InMemoryAdapter(make_runtime(_gated()))
    adapter.start_workflow("gated-parent", run_id="r1")
    adapter.drain()
    paused = adapter.wait_for_result("r1", timeout=5)
    assert paused.status == paused_in_memory.status == "awaiting"
    assert paused.context == paused_in_memory.context
    details = paused.context["_awaitingDetails"]["sub"]
    assert details["childRunId"] == "r1.sub.0"  # the lap is part of a child's run id
    assert details["childAwaiting"] == ["gate"]
    assert "childContext" not in details  # engine state, kept out of the run's context

    expected = parent.resume(runtime, paused_in_memory.serialized_context, output="ok")
    adapter.resume_with_action("r1", None, output="ok")
    adapter.drain()
    result = adapter.wait_for_result("r1", timeout=5)
    assert_same_result(result, expected)
    assert result.context["p2"] == {"out": {"c2": "ok"}}
    assert adapter.get_status("r1.sub.0").status == "completed"


# =================================================================================================
# A failed or cancelled run: the final context is the in-memory one (SPEC 5)
# =================================================================================================


def _failing_branch(bad_first: bool) -> Flow:
    flow = create_flow("failing-branch").node("s", lambda ctx: 1).node("bad", _raises_key_error)
    flow.node("ok", lambda ctx: ctx.input + 1).node("after", lambda ctx: ctx.input * 10).node("last", lambda ctx: 0)
    branches = [("s", "bad"), ("s", "ok")] if bad_first else [("s", "ok"), ("s", "bad")]
    for source, target in branches + [("ok", "after"), ("after", "last")]:
        flow.edge(source, target)
    return flow


@pytest.mark.parametrize("bad_first", [True, False], ids=["bad-branch-first", "ok-branch-first"])
def test_failed_run_with_a_parallel_branch_has_the_in_memory_context(bad_first: bool) -> None:
    expected = _failing_branch(bad_first).run()
    assert expected.status == "failed"
    flow = _failing_branch(bad_first)
    adapter = InMemoryAdapter(make_runtime([flow]))
    run_id = adapter.start_workflow(flow.id)
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert_same_result(result, expected)  # the whole context: no input of a node that never started
    assert "_inputs.bad" in result.context  # the failed node did start
    scheduled = "_inputs.ok" if bad_first else "_inputs.after"
    assert scheduled in adapter.store.read_all_context(run_id) and scheduled not in result.context


def test_cancelled_run_drops_inputs_of_nodes_it_never_started() -> None:
    fan = create_flow("fan").node("s", lambda ctx: 5).node("a", lambda ctx: 1).node("b", lambda ctx: 2)
    fan.edge("s", "a").edge("s", "b")
    adapter = InMemoryAdapter(make_runtime([fan]))
    run_id = adapter.start_workflow("fan")
    assert adapter.work(max_jobs=1) == 1  # s ran; a and b are scheduled
    assert adapter.store.read_all_context(run_id)["_inputs.a"] == 5
    adapter.cancel(run_id)
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "cancelled"
    assert result.context == {"_outputs.s": 5, "s": 5}  # what an in-memory run cancelled after s holds


# =================================================================================================
# Events (SPEC 6) from workers
# =================================================================================================


def _logged(flows: Sequence[Flow], **options: Any) -> Tuple[InMemoryAdapter, InMemoryEventLogger]:
    log = InMemoryEventLogger()
    runtime = FlowRuntime(event_bus=log)
    for flow in flows:
        runtime.add_blueprint(flow)
    return InMemoryAdapter(runtime, **options), log


def _assert_snake_case_payloads(log: InMemoryEventLogger) -> None:
    for event in log.events:
        assert all(key == key.lower() and "-" not in key for key in event.payload), event


@pytest.mark.parametrize("fetch_batch", [1, 4], ids=["handle", "handle_batch"])
def test_a_chain_emits_job_node_and_workflow_events(fetch_batch: int) -> None:
    adapter, log = _logged(_chain(), fetch_batch=fetch_batch)
    run_id = adapter.start_workflow("chain", {"start": 21})
    adapter.drain()
    nodes = ["load", "double", "describe", "store"]
    assert log.types()[0] == "workflow:start"
    assert log.events[0].payload == {"run_id": run_id, "blueprint_id": "chain", "initial_context": {"start": 21}}
    assert log.types()[-1] == "job:processed"
    for kind in ("job:enqueued", "job:processed", "node:start", "node:finish"):
        events = log.of_type(kind)
        assert [e.payload["node_id"] for e in events] == nodes, kind
        assert all(e.payload["run_id"] == run_id and e.payload["blueprint_id"] == "chain" for e in events)
    for event in log.of_type("job:enqueued") + log.of_type("job:processed"):
        assert event.payload["job_key"] == f"{run_id}:{event.payload['node_id']}:0"
        assert (event.payload["kind"], event.payload["iteration"], event.payload["attempt"]) == ("node", 0, 1)
    for node in nodes:  # each job: enqueued, started, finished, processed, in that order
        seen = [e.type for e in log.events if e.payload.get("node_id") == node and e.type.startswith(("job:", "node:"))]
        assert seen == ["job:enqueued", "node:start", "node:finish", "job:processed"], node
    (finish,) = log.of_type("workflow:finish")
    assert finish.payload["status"] == "completed" and finish.payload["errors"] == []
    # the same outputs, in the same order, as an in-memory run reports
    in_memory = InMemoryEventLogger()
    assert _chain()[0].run(FlowRuntime(event_bus=in_memory), {"start": 21}).status == "completed"

    def outputs(logger: InMemoryEventLogger) -> List[Tuple[str, Any]]:
        return [(e.payload["node_id"], e.payload["output"]) for e in logger.of_type("node:finish")]

    assert outputs(log) == outputs(in_memory)
    assert log.find("edge:evaluate", source="load", target="double", taken=True) is not None
    assert log.of_type("job:failed") == []
    _assert_snake_case_payloads(log)


def test_branching_run_events_report_skips_batches_and_failures() -> None:
    adapter, log = _logged(_diamond())
    adapter.start_workflow("diamond", {"n": 4})
    adapter.drain()
    assert [e.payload["node_id"] for e in log.of_type("node:skipped")] == ["odd"]
    assert log.find("edge:evaluate", source="decide", target="odd", taken=False) is not None

    adapter, log = _logged(_batch())
    adapter.start_workflow("batching")
    adapter.drain()
    assert log.find("batch:start", node_id="square_scatter", items=BATCH_SIZE) is not None
    assert log.find("batch:finish", node_id="square_scatter", items=BATCH_SIZE) is not None
    items = [e for e in log.of_type("job:processed") if e.payload["kind"] == "item"]
    assert sorted(e.payload["index"] for e in items) == list(range(BATCH_SIZE))

    adapter, log = _logged(_not_json())
    adapter.start_workflow("not-json")
    adapter.drain()
    error = log.find("node:error", node_id="b")
    assert error is not None and error.payload["type"] == "SerializationError"
    assert log.of_type("workflow:finish")[-1].payload["status"] == "failed"
    _assert_snake_case_payloads(log)


def test_wait_and_resume_emit_pause_and_resume_events() -> None:
    adapter, log = _logged(_wait())
    run_id = adapter.start_workflow("approval")
    adapter.drain()
    pause = log.find("workflow:pause", node_id="approve")
    assert pause is not None and pause.payload["details"]["type"] == "wait"
    assert log.of_type("workflow:finish") == []  # awaiting is no end
    adapter.resume_with_action(run_id, "approve", output=1)
    adapter.drain()
    assert log.find("workflow:resume", node_id="approve", action="approve") is not None
    assert log.of_type("workflow:finish")[-1].payload["status"] == "completed"


def test_a_malformed_job_emits_job_failed_with_the_reason() -> None:
    adapter, log = _logged(_chain())
    adapter.queue.push_raw(b"{not json")
    run_id = adapter.start_workflow("chain", {"start": 3})
    adapter.queue.push_raw(json.dumps({"runId": run_id, "blueprintId": "chain", "nodeId": "ghost"}).encode())
    adapter.drain()
    unreadable, ghost = log.of_type("job:failed")
    assert unreadable.payload["run_id"] is None and unreadable.payload["dead_lettered"] is True
    assert "malformed job" in unreadable.payload["reason"] and "json" in unreadable.payload["reason"].lower()
    assert (ghost.payload["run_id"], ghost.payload["node_id"]) == (run_id, "ghost")
    assert "unknown node" in ghost.payload["reason"] and ghost.payload["dead_lettered"] is True
    finish = log.of_type("workflow:finish")[-1]
    assert finish.payload["run_id"] == run_id and finish.payload["status"] == "completed"  # a ghost job fails no run
    _assert_snake_case_payloads(log)


def test_a_version_mismatch_emits_job_failed_without_dead_lettering() -> None:
    calls: List[Tuple[str, str]] = []
    v1 = InMemoryAdapter(make_runtime([_versioned("1", calls)]), version_mismatch_delay=0.01)
    log = InMemoryEventLogger()
    runtime = FlowRuntime(event_bus=log)
    runtime.add_blueprint(_versioned("2", calls))
    v2 = DistributedAdapter(runtime, v1.queue, v1.store, v1.coordination, version_mismatch_delay=0.01)
    run_id = v1.start_workflow("versioned")
    assert v2.work(max_jobs=1) == 1
    (failed,) = log.of_type("job:failed")
    assert failed.payload["dead_lettered"] is False and "version mismatch" in failed.payload["reason"]
    assert failed.payload["run_id"] == run_id and failed.payload["retry_in"] == 0.01
    (put_back,) = log.of_type("job:enqueued")
    assert put_back.payload["node_id"] == "first" and put_back.payload["delay"] == 0.01
    assert log.of_type("job:processed") == [] and calls == []


def test_queue_retries_emit_node_retry_and_the_enqueued_retry() -> None:
    attempts: List[Tuple[int, str]] = []
    adapter, log = _logged([_flaky_flow(attempts, fail_until=3, max_retries=3)], retry_mode="queue")
    adapter.start_workflow("flaky")
    adapter.drain()
    assert [e.payload["attempt"] for e in log.of_type("node:retry")] == [1, 2]
    enqueued = [e.payload["attempt"] for e in log.of_type("job:enqueued") if e.payload["node_id"] == "flaky"]
    assert enqueued == [1, 2, 3]
    assert log.of_type("workflow:finish")[-1].payload["status"] == "completed"


def test_without_an_event_bus_a_worker_builds_no_events() -> None:
    adapter = InMemoryAdapter(make_runtime(_chain()))
    seen: List[Any] = []
    derive = adapter._derive_commit

    def spy(prepared: Any) -> Any:
        commit = derive(prepared)
        seen.append(prepared.events)
        return commit

    adapter._derive_commit = spy  # type: ignore[method-assign]
    adapter.start_workflow("chain", {"start": 1})
    adapter.drain()
    assert seen == [None] * 4


def test_an_unreachable_cycle_stalls_as_in_memory_and_says_so() -> None:
    flow = (
        create_flow("island").node("a", lambda ctx: 1).node("b", lambda ctx: 2).edge("a", "b")
        .node("x", lambda ctx: 3).node("y", lambda ctx: 4).edge("x", "y").edge("y", "x")
    )
    expected = flow.run(make_runtime([flow]))
    assert expected.status == "stalled" and sorted(expected.stalled) == ["x", "y"]
    adapter, log = _logged([flow])
    run_id = adapter.start_workflow("island")
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert_same_result(result, expected)
    assert sorted(result.stalled) == ["x", "y"]
    (stall,) = log.of_type("workflow:stall")
    assert sorted(stall.payload["stalled"]) == ["x", "y"]
    assert log.of_type("workflow:finish")[-1].payload["status"] == "stalled"


# === whole loads ==================================================================================


@pytest.mark.parametrize("fetch_batch", [1, 8], ids=["handle", "handle_batch"])
def test_start_and_only_sink_load_the_whole_run_so_no_job_reads_the_store_again(fetch_batch: int) -> None:
    """A start node (reading the initial context) and the graph's only sink (ending the run) load
    the whole run with their job: no lazy read of a context key, no read of all states or of the
    whole context for the result; the result is the in-memory one."""
    flows = _chain()
    adapter = InMemoryAdapter(make_runtime(flows), fetch_batch=fetch_batch)
    store = adapter.store
    reads: Counter = Counter()
    for name in ("read_context", "read_all_context", "read_states", "read_all_states"):
        original = getattr(store, name)
        setattr(store, name, (lambda n, f: lambda *a, **k: (reads.update([n]), f(*a, **k))[1])(name, original))
    run_ids = [adapter.start_workflow("chain", {"start": i}) for i in range(3)]
    adapter.drain()
    for i, run_id in enumerate(run_ids):
        result = adapter.wait_for_result(run_id, timeout=5)
        expected = flows[0].run(make_runtime(_chain()), {"start": i})
        assert result.status == "completed" and result.context == expected.context
    assert reads == Counter(), reads


def test_without_whole_loads_a_store_is_asked_only_for_named_states_and_keys() -> None:
    """A store without `whole_loads` never gets None in a load request; the run ends the same."""
    flows = _chain()
    adapter = InMemoryAdapter(make_runtime(flows), fetch_batch=8)
    store = adapter.store
    store.whole_loads = False  # type: ignore[misc]
    adapter._whole_loads = False
    asked: List[Any] = []
    load_many = store.load_many
    store.load_many = lambda requests: (asked.extend(requests), load_many(requests))[1]  # type: ignore[method-assign]
    run_id = adapter.start_workflow("chain", {"start": 2})
    adapter.drain()
    assert adapter.wait_for_result(run_id, timeout=5).context == flows[0].run(make_runtime(_chain()), {"start": 2}).context
    assert asked and all(nodes is not None and keys is not None for _, nodes, keys in asked)


def test_batch_items_of_one_run_are_committed_together_and_a_redelivered_copy_waits_for_a_later_wave() -> None:
    """Item jobs of one run fetched together are one wave segment, so one commit (not one per item);
    a second copy of an item in the same fetch is not run in that segment: it waits for a later wave,
    where the store shows the item done. The result is the in-memory one, each item committed once."""
    flows = _batch()
    adapter = InMemoryAdapter(make_runtime(flows), fetch_batch=BATCH_SIZE * 2)
    store, queue = adapter.store, adapter.queue
    run_id = adapter.start_workflow("batching", {})
    adapter.work(burst=True, max_jobs=1)  # the producer node
    adapter.work(burst=True, max_jobs=1)  # the scatter: BATCH_SIZE item jobs are queued now
    duplicate = next(d for d in queue.fetch(max_jobs=1) if d.job is not None and d.job.kind == "item")
    queue.enqueue([duplicate.job, duplicate.job])  # two more copies of one item behind the others
    queue.ack([duplicate])
    before = store.commits
    adapter.work(burst=True, max_jobs=BATCH_SIZE + 1)
    item_commits = store.commits - before
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert_same_result(result, run_in_memory(SCENARIOS["batch"]))
    assert_effectively_once(adapter)
    assert item_commits < BATCH_SIZE / 4, item_commits
