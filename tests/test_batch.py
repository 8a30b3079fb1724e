"""Batch: `Flow.batch(...)` and the raw `batch-scatter` / `batch-gather` wire form (SPEC §5 "Batch")."""
from __future__ import annotations

import threading
import time
from typing import Any, List

from flowcraft import CancelToken, FlowRuntime, create_flow
from flowcraft.testing import InMemoryEventLogger


def test_batch_builder_wires_scatter_and_gather():
    flow = (
        create_flow("wire")
        .node("load", lambda ctx: None)
        .batch("bt", lambda ctx: ctx.input, input_key="items", output_key="out")
        .node("after", lambda ctx: ctx.input)
        .edge("load", "bt")
        .edge("bt", "after")
    )
    bp = flow.to_blueprint()
    nodes = {n.id: n for n in bp.nodes}
    assert nodes["bt_scatter"].uses == "batch-scatter"
    assert nodes["bt_scatter"].params["inputKey"] == "items"
    assert nodes["bt_scatter"].params["gatherNodeId"] == "bt_gather"
    assert nodes["bt_scatter"].params["workerUsesKey"] in flow.registry
    assert nodes["bt_gather"].uses == "batch-gather"
    assert nodes["bt_gather"].params["outputKey"] == "out"
    edges = {(e.source, e.target) for e in bp.edges}
    assert ("load", "bt_scatter") in edges  # edges into the batch go to its scatter
    assert ("bt_gather", "after") in edges  # edges out of it leave from its gather
    assert ("bt_scatter", "bt_gather") in edges
    assert "bt" not in nodes


def test_batch_results_in_item_order_with_varying_sleeps():
    delays = [0.03, 0.0, 0.02, 0.01, 0.0, 0.03, 0.01, 0.02, 0.0, 0.01, 0.02, 0.0]

    def work(ctx):
        time.sleep(delays[ctx.input])
        return ctx.input * 10

    flow = (
        create_flow("order")
        .node("load", lambda ctx: ctx.context.set("items", list(range(len(delays)))))
        .batch("bt", work, input_key="items", output_key="out")
        .node("total", lambda ctx: sum(ctx.input))
        .edge("load", "bt")
        .edge("bt", "total")
    )
    result = flow.run(concurrency=4)
    assert result.status == "completed", result.errors
    assert result.context["out"] == [i * 10 for i in range(len(delays))]
    assert result.context["total"] == sum(i * 10 for i in range(len(delays)))
    assert result.context["_outputs.bt_gather"] == result.context["out"]


def test_batch_order_is_by_item_not_by_completion():
    # Items finish in reverse order (each waits for the next one to finish), deterministically.
    n = 4
    finished = [threading.Event() for _ in range(n)]
    completion: List[int] = []
    lock = threading.Lock()

    def work(ctx):
        i = ctx.input
        if i + 1 < n:
            assert finished[i + 1].wait(10), "items did not run concurrently"
        with lock:
            completion.append(i)
        finished[i].set()
        return f"item-{i}"

    flow = create_flow("reverse").batch("bt", work, input_key="items", output_key="out")
    result = flow.run(initial_context={"items": list(range(n))}, concurrency=4)
    assert result.status == "completed", result.errors
    assert completion == [3, 2, 1, 0]
    assert result.context["out"] == ["item-0", "item-1", "item-2", "item-3"]


def test_batch_output_key_defaults_to_batch_id():
    flow = create_flow("default-key").batch("doubled", lambda ctx: ctx.input * 2, input_key="nums")
    result = flow.run(initial_context={"nums": [1, 2, 3]})
    assert result.status == "completed"
    assert result.context["doubled"] == [2, 4, 6]


def test_batch_worker_params():
    def work(ctx):
        return ctx.input * ctx.params["factor"]

    flow = create_flow("params").batch("bt", work, input_key="nums", output_key="out", params={"factor": 3})
    result = flow.run(initial_context={"nums": [1, 2]})
    assert result.status == "completed", result.errors
    assert result.context["out"] == [3, 6]


def test_empty_batch_completes_with_empty_list_and_successor_runs():
    calls: List[Any] = []

    def work(ctx):
        calls.append(ctx.input)
        return ctx.input

    flow = (
        create_flow("empty")
        .batch("bt", work, input_key="items", output_key="out")
        .node("after", lambda ctx: {"n": len(ctx.input)})
        .edge("bt", "after")
    )
    result = flow.run(initial_context={"items": []})
    assert result.status == "completed", result.errors
    assert calls == []
    assert result.context["out"] == []
    assert result.context["after"] == {"n": 0}


def test_worker_failing_on_item_three_fails_run_naming_the_index():
    calls: List[int] = []

    def work(ctx):
        calls.append(ctx.input)
        if ctx.input == 3:
            raise ValueError("cannot process three")
        return ctx.input

    flow = (
        create_flow("fail")
        .batch("bt", work, input_key="items", output_key="out")
        .node("after", lambda ctx: "never")
        .edge("bt", "after")
    )
    result = flow.run(initial_context={"items": [0, 1, 2, 3, 4, 5]})
    assert result.status == "failed"
    assert len(result.errors) == 1
    error = result.errors[0]
    assert "3" in error.message and "item" in error.message
    assert "cannot process three" in error.message
    assert error.type == "ValueError"
    assert error.node_id.startswith("bt")
    assert "after" not in result.context
    assert "out" not in result.context
    assert calls == [0, 1, 2, 3]  # serial: no new item starts once one failed


def test_worker_failure_under_concurrency_still_names_item():
    def work(ctx):
        if ctx.input == 3:
            raise KeyError("missing")
        return ctx.input

    flow = create_flow("fail-pool").batch("bt", work, input_key="items", output_key="out")
    result = flow.run(initial_context={"items": list(range(8))}, concurrency=4)
    assert result.status == "failed"
    assert len(result.errors) == 1
    assert "item 3" in result.errors[0].message


def test_non_list_input_fails_clearly():
    flow = create_flow("non-list").batch("bt", lambda ctx: ctx.input, input_key="items", output_key="out")
    result = flow.run(initial_context={"items": "abc"})
    assert result.status == "failed"
    message = result.errors[0].message
    assert "items" in message
    assert "list" in message
    assert "str" in message


def test_missing_input_key_fails_clearly():
    flow = create_flow("missing").batch("bt", lambda ctx: ctx.input, input_key="items", output_key="out")
    result = flow.run(initial_context={})
    assert result.status == "failed"
    assert "items" in result.errors[0].message
    assert "list" in result.errors[0].message


def test_ten_thousand_items_complete():
    flow = (
        create_flow("big")
        .batch("bt", lambda ctx: ctx.input + 1, input_key="items", output_key="out")
        .node("check", lambda ctx: {"n": len(ctx.input), "sum": sum(ctx.input)})
        .edge("bt", "check")
    )
    items = list(range(10_000))
    result = flow.run(initial_context={"items": items})
    assert result.status == "completed", result.errors
    assert result.context["out"] == [i + 1 for i in items]
    assert result.context["check"] == {"n": 10_000, "sum": sum(items) + 10_000}


def test_ten_thousand_items_complete_on_a_pool():
    flow = create_flow("big-pool").batch("bt", lambda ctx: ctx.input * 2, input_key="items", output_key="out")
    items = list(range(10_000))
    result = flow.run(initial_context={"items": items}, concurrency=4)
    assert result.status == "completed", result.errors
    assert result.context["out"] == [i * 2 for i in items]


def test_raw_json_batch():
    blueprint = {
        "id": "raw-batch",
        "nodes": [
            {"id": "s", "uses": "batch-scatter",
             "params": {"inputKey": "nums", "workerUsesKey": "double", "gatherNodeId": "g"}},
            {"id": "g", "uses": "batch-gather", "params": {"outputKey": "doubled"}},
            {"id": "tot", "uses": "total"},
        ],
        "edges": [{"source": "s", "target": "g"}, {"source": "g", "target": "tot"}],
    }
    runtime = FlowRuntime(registry={"double": lambda ctx: ctx.input * 2, "total": lambda ctx: sum(ctx.input)})
    result = runtime.run(blueprint, {"nums": [1, 2, 3]})
    assert result.status == "completed", result.errors
    assert result.context["doubled"] == [2, 4, 6]
    assert result.context["tot"] == 12


def test_batch_events():
    log = InMemoryEventLogger()
    flow = create_flow("ev").batch("bt", lambda ctx: ctx.input, input_key="items", output_key="out")
    result = flow.run(FlowRuntime(event_bus=log), {"items": [5, 6, 7]})
    assert result.status == "completed"
    start = log.of_type("batch:start")
    finish = log.of_type("batch:finish")
    assert len(start) == 1 and len(finish) == 1
    assert start[0].payload["items"] == 3
    assert finish[0].payload["items"] == 3
    assert start[0].payload["node_id"] == "bt_scatter"
    types = log.types()
    assert types.index("batch:start") < types.index("batch:finish")
    item_inputs = [e.payload["input"] for e in log.of_type("node:start") if e.payload["node_id"].startswith("bt_scatter.")]
    assert item_inputs == [5, 6, 7]


def test_cancel_during_batch_stops_new_items():
    token = CancelToken()
    calls: List[int] = []

    def work(ctx):
        calls.append(ctx.input)
        if ctx.input == 2:
            token.cancel("enough")
        return ctx.input

    flow = (
        create_flow("cancel-batch")
        .batch("bt", work, input_key="items", output_key="out")
        .node("after", lambda ctx: "never")
        .edge("bt", "after")
    )
    result = flow.run(initial_context={"items": list(range(10))}, cancel=token)
    assert result.status == "cancelled"
    assert calls == [0, 1, 2]
    assert "after" not in result.context
    assert "out" not in result.context


def test_batch_inside_a_loop_runs_each_lap():
    def prepare(ctx):
        lap = ctx.context.get("lap", 0) + 1
        ctx.context.set("lap", lap)
        ctx.context.set("items", [lap] * lap)

    def record(ctx):
        laps = ctx.context.get("sums", [])
        ctx.context.set("sums", laps + [sum(ctx.context.get("out"))])

    flow = (
        create_flow("batch-loop")
        .node("prep", prepare)
        .batch("bt", lambda ctx: ctx.input * 10, input_key="items", output_key="out")
        .node("rec", record)
        .edge("prep", "bt")
        .edge("bt", "rec")
        .loop("lp", start_node_id="prep", end_node_id="rec", condition="lap < 3")
    )
    result = flow.run()
    assert result.status == "completed", result.errors
    assert result.context["sums"] == [10, 40, 90]
    assert result.context["out"] == [30, 30, 30]


def test_non_json_worker_output_fails_naming_the_item():
    flow = create_flow("non-json").batch("bt", lambda ctx: object(), input_key="items", output_key="out")
    result = flow.run(initial_context={"items": [1, 2]})
    assert result.status == "failed"
    assert "bt_scatter.0" in result.errors[0].message
    assert "JSON" in result.errors[0].message


def test_class_worker():
    from flowcraft import BaseNode

    class Triple(BaseNode):
        def prep(self, ctx):
            return ctx.input

        def exec(self, prep_result, ctx):
            return prep_result * 3

    flow = create_flow("class-worker").batch("bt", Triple, input_key="items", output_key="out")
    result = flow.run(initial_context={"items": [1, 2, 3]})
    assert result.status == "completed", result.errors
    assert result.context["out"] == [3, 6, 9]


def test_ts_builder_shaped_raw_batch():
    # Flowcraft TS's builder puts the input key in the scatter's `inputs`, not in params.inputKey
    blueprint = {
        "id": "ts-batch",
        "nodes": [
            {"id": "bt_scatter", "uses": "batch-scatter", "inputs": "items",
             "params": {"workerUsesKey": "w", "outputKey": "out", "gatherNodeId": "bt_gather"}},
            {"id": "bt_gather", "uses": "batch-gather", "params": {"outputKey": "out", "gatherNodeId": "bt_gather"},
             "config": {"joinStrategy": "all"}},
        ],
        "edges": [{"source": "bt_scatter", "target": "bt_gather"}],
    }
    result = FlowRuntime(registry={"w": lambda ctx: ctx.input * 2}).run(blueprint, {"items": [1, 2, 3]})
    assert result.status == "completed", result.errors
    assert result.context["out"] == [2, 4, 6]
