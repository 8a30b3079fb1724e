"""A join's arrivals in a distributed run (issue 12): each adds one to the join's counter
(`plan.count_field`) and each taken arrival's value is a store field of its own
(`plan.arrival_field`); the join's state does not change until the job the count reaching its
in-degree makes resolves it, reading the values once. Edges a loop can deliver more than once stay
in the state. Also: batch item jobs never load the whole run, and the driver counts its conflicts.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import pytest

from flowcraft import FlowRuntime, NodeContext, create_flow
from flowcraft.graph import DEAD, NodeState
from flowcraft.distributed._plan import arrival_field, count_field
from flowcraft.ports import Commit
from flowcraft.testing import InMemoryAdapter

WIDTH = 60
PAD = "x" * 1000  # each arrival carries about 1 KB: a state holding the values would be ~60 KB


def _worker(i: int) -> Any:
    return lambda ctx: {"i": ctx.input + i, "pad": PAD}


def fan(width: int = WIDTH) -> Any:
    flow = create_flow(f"arrivals-fan-{width}").node("src", lambda ctx: 1)
    for i in range(width):
        flow.node(f"w{i}", _worker(i)).edge("src", f"w{i}").edge(f"w{i}", "join")
    flow.node("join", lambda ctx: {"keys": list(ctx.input), "total": sum(v["i"] for v in ctx.input.values())})
    return flow


def adapter_for(*flows: Any, **options: Any) -> InMemoryAdapter:
    runtime = FlowRuntime()
    for flow in flows:
        runtime.add_blueprint(flow)
    return InMemoryAdapter(runtime, **options)


def run(adapter: InMemoryAdapter, flow: Any, context: Optional[Dict[str, Any]] = None) -> Any:
    run_id = adapter.start_workflow(flow.id, dict(context or {}))
    adapter.drain()
    return run_id, adapter.wait_for_result(run_id, timeout=5)


def expected(flow: Any, context: Optional[Dict[str, Any]] = None) -> Any:
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    result = flow.run(runtime, dict(context or {}))
    assert result.status == "completed", result.errors
    return result


@pytest.mark.parametrize("fetch_batch", [1, 20], ids=["one-by-one", "waves"])
def test_a_join_state_stays_small_and_its_input_is_the_in_memory_one(fetch_batch: int) -> None:
    flow = fan()
    adapter = adapter_for(flow, fetch_batch=fetch_batch)
    written: List[int] = []
    commit = adapter.store.commit

    def recording(c: Commit) -> bool:
        if "join" in c.states:
            written.append(len(json.dumps(c.states["join"])))
        return commit(c)

    adapter.store.commit = recording  # commit_many (waves) calls commit per run
    run_id, result = run(adapter, flow)
    memory = expected(flow)
    assert result.status == "completed", result.errors
    assert result.context == memory.context
    assert result.context["_outputs.join"]["keys"] == [f"w{i}" for i in range(WIDTH)]  # edge order
    assert len(written) == 1 and max(written) < 100, written  # once, by its own job, never the 1 KB values
    stored = adapter.store.read_all_states(run_id)["join"]
    assert stored == {"it": 0, "st": "done"}, stored
    assert adapter.store.read_items(run_id, [count_field("join", 0)]) == [WIDTH]
    fields = [arrival_field("join", 0, e.index) for e in adapter.runtime.graph(flow.to_blueprint()).nodes["join"].incoming]
    values = adapter.store.read_items(run_id, fields)
    assert [v["v"]["i"] for v in values] == [1 + i for i in range(WIDTH)]


def test_the_arrival_values_are_read_once_when_the_join_is_ready() -> None:
    flow = fan()
    adapter = adapter_for(flow)
    reads: List[List[str]] = []
    read_items = adapter.store.read_items

    def recording(run_id: str, fields: Any) -> List[Any]:
        if any(f.startswith("arr:") for f in fields):
            reads.append(list(fields))
        return read_items(run_id, fields)

    adapter.store.read_items = recording
    _, result = run(adapter, flow)
    assert result.status == "completed", result.errors
    assert len(reads) == 1 and len(reads[0]) == WIDTH, reads  # by the join's own job


def test_dead_arrivals_are_counted_and_an_all_dead_join_is_skipped_by_its_job() -> None:
    flow = (create_flow("arrivals-dead").node("src", lambda ctx: 1)
            .node("a", lambda ctx: 1).node("b", lambda ctx: 2).node("join", lambda ctx: ctx.input)
            .node("after", lambda ctx: "ran")
            .edge("src", "a", condition="result.output > 5").edge("src", "b", condition="result.output > 5")
            .edge("a", "join").edge("b", "join").edge("join", "after"))
    adapter = adapter_for(flow)
    reads: List[Any] = []
    read_items = adapter.store.read_items
    adapter.store.read_items = lambda run_id, fields: reads.append(fields) or read_items(run_id, fields)
    run_id, result = run(adapter, flow)
    memory = expected(flow)
    assert result.context == memory.context and sorted(result.skipped) == sorted(memory.skipped)
    assert "join" in result.skipped and "after" in result.skipped
    assert [f for f in reads if any(x.startswith("arr:") for x in f)] == [[arrival_field("join", 0, 2),
                                                                            arrival_field("join", 0, 3)]]
    assert adapter.store.activations[(run_id, "join", 0)] == 1  # its job, made once


def _lapping(ctx: NodeContext) -> Any:
    laps = ctx.context.get("laps", 0) + 1
    ctx.context.set("laps", laps)
    return laps


def test_an_edge_out_of_a_cycle_arrives_once_per_lap_and_counts_once() -> None:
    """`a` runs once per lap of the raw cycle a -> b -> a and feeds the join on every lap: the join
    must count that edge once (its arrivals stay in its state, a lap's replacing the last)."""
    flow = (create_flow("arrivals-cycle").node("s", lambda ctx: 0).node("a", _lapping).node("b", lambda ctx: ctx.input)
            .node("join", lambda ctx: ctx.input)
            .edge("s", "a").edge("a", "b").edge("b", "a", condition="result.output < 3").edge("a", "join"))
    previous = "s"
    for i in range(8):  # the join's other input arrives after a's later laps
        flow.node(f"x{i}", lambda ctx: "late").edge(previous, f"x{i}")
        previous = f"x{i}"
    flow.edge(previous, "join")
    memory = expected(flow)
    for fetch_batch in (1, 20):
        adapter = adapter_for(flow, fetch_batch=fetch_batch)
        run_id, result = run(adapter, flow)
        assert result.status == memory.status and result.context == memory.context, (fetch_batch, result.errors)
        fired = {k: n for k, n in adapter.store.activations.items() if k[1] == "join"}
        assert list(fired.values()) == [1], fired


def test_node_state_round_trips() -> None:
    state = NodeState(2, "pending", {3: "v", 4: DEAD}, laps=1, pending=5)
    data = state.to_dict()
    assert data == {"it": 2, "st": "pending", "arr": [[3, True, "v"], [4, False, None]], "laps": 1, "pending": 5}
    back = NodeState.from_dict(data)
    assert (back.arrivals, back.laps, back.pending) == ({3: "v", 4: DEAD}, 1, 5)


def test_in_memory_runs_keep_the_arrivals_in_the_state() -> None:
    flow = fan(3)
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    from flowcraft.graph import Traversal

    traversal = Traversal(runtime.graph(flow.to_blueprint()))
    assert traversal.arrival_store is None
    assert flow.run(runtime, {}).context == expected(flow).context


@pytest.mark.parametrize("items", [20, 200])
def test_batch_item_jobs_never_load_the_whole_run(items: int) -> None:
    """A batch that is a start node: its scatter job (a start node) and its gather job (the only
    sink) load the whole run, its items never do, however many."""
    flow = create_flow(f"arrivals-batch-{items}").batch("each", lambda ctx: ctx.input * 2, input_key="xs",
                                                         output_key="out")
    adapter = adapter_for(flow, fetch_batch=20)
    whole: List[Any] = []
    load_many = adapter.store.load_many

    def recording(requests: Any) -> Any:
        whole.extend(r for r in requests if r[1] is None and r[2] is None)
        return load_many(requests)

    adapter.store.load_many = recording
    _, result = run(adapter, flow, {"xs": list(range(items))})
    assert result.status == "completed" and result.context["out"] == [2 * i for i in range(items)], result.errors
    assert len(whole) == 3, whole  # each_scatter's job, its gathering job (a start node's), and each_gather's


def test_node_commits_conflict_only_on_the_states_they_touch() -> None:
    """Another commit of the run (the version moves on) does not conflict with a node's commit;
    one that changed a state the node's commit changes does: it is derived again, once."""
    flow = (create_flow("arrivals-conflict").node("a", lambda ctx: 1).node("b", lambda ctx: ctx.input + 1)
            .node("c", lambda ctx: ctx.input + 1).edge("a", "b").edge("b", "c"))
    adapter = adapter_for(flow)
    commit = adapter.store.commit
    raced: List[str] = []

    def racing(c: Commit) -> bool:
        if c.node_commit and len(raced) < 2:
            record = adapter.store.get_record(c.run_id)
            node = "a" if not raced else "b"  # a's commit: a version bump only; b's: b's state changes
            states = {} if not raced else {"b": {"it": 0, "st": "ready", "laps": 0, "pending": 0}}
            raced.append(node)
            assert c.states[node]["st"] == "done"
            assert commit(Commit(c.run_id, record.version, record, states=states))  # another worker commits first
        return commit(c)

    adapter.store.commit = racing
    run_id, result = run(adapter, flow)
    assert raced == ["a", "b"]
    assert result.status == "completed" and result.context["c"] == 3, result.errors
    assert adapter.conflicts == 1
