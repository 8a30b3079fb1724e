"""Hostile values and forged batch items (issue 11, items 7, 9, 10 and NaN of 11), in memory
(`FlowRuntime.run`) and on the fakes (`InMemoryAdapter`, several jobs fetched at once).

Each hostile case runs in a child process with a memory cap and a timeout (`run_bounded`); the child
prints one JSON line of what it saw and the test asserts on it here.
"""
from __future__ import annotations

import json
from typing import Any, Dict

from bounded import run_bounded

from flowcraft import FlowRuntime, create_flow
from flowcraft.distributed._plan import input_field, spec_field
from flowcraft.ports import item_field
from flowcraft.serializer import ValueTooLarge, check_json
from flowcraft.testing import InMemoryAdapter

import pytest

PRELUDE = '''
import json, os
from flowcraft import FlowRuntime, create_flow
from flowcraft.testing import InMemoryAdapter

EVIL = []

def evil(ctx):  # a registered node no blueprint of these runs uses: a forged job would name it
    EVIL.append(ctx.input)
    return "FORGED"

def batch_flow():
    return (create_flow("items").node("make", lambda ctx: [1, 2, 3])
            .batch("each", lambda ctx: ctx.input * 10, input_key="make", output_key="out")
            .edge("make", "each"))

def plain_flow():
    return create_flow("plain").node("p", lambda ctx: "fine")

def runtime(*flows, **settings):
    rt = FlowRuntime(**settings)
    for flow in flows:
        rt.add_blueprint(flow)
    rt.registry["evil"] = evil
    return rt

def report(**values):
    print("RESULT " + json.dumps(values))
'''


def bounded(code: str, timeout: float = 60, memory_mb: int = 768) -> Dict[str, Any]:
    result = run_bounded(PRELUDE + code, timeout=timeout, memory_mb=memory_mb)
    assert result.ok, result.describe()
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.describe()
    return json.loads(lines[-1][len("RESULT "):])


# === item 7: forged batch items ================================================================


def test_forged_item_jobs_run_nothing_of_the_attackers() -> None:
    seen = bounded('''
rt = runtime(batch_flow(), plain_flow())
ad = InMemoryAdapter(rt, fetch_batch=8)
run_id = ad.start_workflow("items")
others = [ad.start_workflow("plain") for _ in range(3)]
ad.work(max_jobs=1)  # "make": the scatter's job is queued next
base = {"runId": run_id, "blueprintId": "items", "kind": "item", "parent": "each_scatter"}
forged = [
    dict(base, nodeId="each_scatter.0", index=0, uses="evil", input="FORGED", params={"x": 1}),  # a real item, other code
    dict(base, nodeId="each_scatter.1", index=1, input=99),                                      # a real item, other input
    dict(base, nodeId="each_scatter.99", index=99, uses="evil", input="FORGED"),                 # no such item
    # (a negative index is a malformed job carrying the run's identity: it fails the run by design,
    # see tests/test_hostile_jobs.py; it has no place among forgeries that must change nothing)
    dict(base, nodeId="evil-node", index=2, uses="evil"),                                        # not the item's id
    dict(base, nodeId="make.0", parent="make", index=0, uses="evil"),                            # not a batch
]
for body in forged:
    ad.queue.push_raw(json.dumps(body).encode())
processed = ad.work(burst=True)
result = ad.wait_for_result(run_id, timeout=5)
report(status=result.status, errors=[e.message for e in result.errors], out=result.context.get("out"), evil=EVIL, processed=processed,
       others=[ad.wait_for_result(r, timeout=5).status for r in others], pending=ad.queue.pending,
       dead=[reason for _, reason in ad.queue.dead])
''')
    assert seen["evil"] == []
    assert seen["status"] == "completed", seen
    assert seen["out"] == [10, 20, 30]  # the legitimate batch output, not ["FORGED", 990, ...]
    assert seen["others"] == ["completed"] * 3  # the worker served the other runs' jobs too
    assert seen["pending"] == 0


def test_old_item_jobs_and_old_stored_specs_still_work() -> None:
    """Item jobs carrying `uses`/`input` (as before) run what is committed; a batch committed with
    the whole spec list in one field (as before) finishes too."""
    rt = FlowRuntime()
    flow = (create_flow("old").node("make", lambda ctx: [1, 2, 3])
            .batch("each", lambda ctx: ctx.input + 1, input_key="make", output_key="out").edge("make", "each"))
    rt.add_blueprint(flow)
    ad = InMemoryAdapter(rt, fetch_batch=4)
    run_id = ad.start_workflow("old")
    ad.work(max_jobs=2)  # make, then the scatter: 3 item jobs queued
    items = ad.store._runs[run_id].items
    header = items.pop(spec_field("each_scatter", 0))
    uses = header["uses"]
    items[spec_field("each_scatter", 0)] = [
        {"id": f"each_scatter.{i}", "uses": uses, "params": None, "input": items.pop(input_field("each_scatter", 0, i))["input"]}
        for i in range(3)]
    while ad.queue.pending:  # the queued jobs, put back in the old form with uses and input
        for d in ad.queue.fetch(10, timeout=0):
            ad.queue.ack([d])
            ad.queue.push_raw(json.dumps(dict(d.job.to_dict(), uses=uses, input=d.job.index * 100)).encode())
        break
    ad.work(burst=True)
    result = ad.wait_for_result(run_id, timeout=5)
    assert result.status == "completed", result.errors
    assert result.context["out"] == [2, 3, 4]  # the committed inputs, not the jobs' 0, 100, 200


def test_item_jobs_read_only_their_own_item() -> None:
    """The per-item cost does not grow with the batch: an item job loads no context value (not the
    input list) and reads its own three item fields; the items fetched together (10 here) share one
    load, one read of their fields and one commit."""
    n = 300
    rt = FlowRuntime()
    rt.add_blueprint(create_flow("cost").node("make", lambda ctx: list(range(n)))
                     .batch("each", lambda ctx: ctx.input * 2, input_key="make", output_key="out").edge("make", "each"))
    ad = InMemoryAdapter(rt, fetch_batch=10)
    run_id = ad.start_workflow("cost")
    ad.work(max_jobs=2)
    store = ad.store
    loads, reads = [], []
    load_many, read_items = store.load_many, store.read_items
    store.load_many = lambda requests: (loads.extend(requests), load_many(requests))[1]
    store.read_items = lambda rid, fields: (reads.append(list(fields)), read_items(rid, fields))[1]
    ad.work(burst=True)
    result = ad.wait_for_result(run_id, timeout=5)
    assert result.context["out"] == [2 * i for i in range(n)]
    item_loads = [(nodes, keys) for _, nodes, keys in loads if nodes and nodes[0] == "each_scatter"]
    # one a fetch, then the batch's gathering job (a job of its scatter node, which loads the node's
    # input key too) and the gather's
    item_keys = ["blueprintId", "blueprintVersion"]
    assert len([k for _, k in item_loads if k == item_keys]) == n // 10 and len(loads) == n // 10 + 2, item_loads[:3]
    own = [r for r in reads if len(r) == 30]  # the 10 items fetched together read their fields in one read
    assert own == [[f for i in range(w, w + 10) for f in (item_field("each_scatter", 0, i), spec_field("each_scatter", 0),
                                                          input_field("each_scatter", 0, i))]
                   for w in range(0, n, 10)]
    # plus, once, the gathering job's check of the count, the header and the n results for the batch's output
    assert len(reads) == n // 10 + 3
    assert set(store._runs[run_id].items) >= {input_field("each_scatter", 0, i) for i in range(n)}
    assert item_field("each_scatter", 0, n - 1) in store._runs[run_id].items


# === item 9: sizes ===============================================================================


def test_oversized_value_fails_its_run_naming_the_key_and_the_worker_goes_on() -> None:
    seen = bounded('''
def big(ctx):
    ctx.context.set("huge", "x" * (17 * 1024 * 1024))  # over the default 16 MiB
rt = runtime(create_flow("big").node("a", big).node("b", lambda ctx: "after").edge("a", "b"), plain_flow())
memory = rt.run("big")
ad = InMemoryAdapter(rt, fetch_batch=5)
runs = [ad.start_workflow("big"), ad.start_workflow("plain"), ad.start_workflow("big"), ad.start_workflow("plain")]
ad.work(burst=True)
results = [ad.wait_for_result(r, timeout=5) for r in runs]
report(memory=[memory.status, [e.message for e in memory.errors]],
       statuses=[r.status for r in results], errors=[[e.message for e in r.errors] for r in results],
       stored=[("huge" in r.context) for r in results], dead=len(ad.queue.dead), pending=ad.queue.pending)
''', memory_mb=1024)
    status, errors = seen["memory"]
    assert status == "failed" and "'huge'" in errors[0] and "max_value_bytes" in errors[0]
    assert seen["statuses"] == ["failed", "completed", "failed", "completed"]
    assert "'huge'" in seen["errors"][0][0] and "max_value_bytes" in seen["errors"][0][0]
    assert seen["stored"] == [False] * 4 and seen["dead"] == 0 and seen["pending"] == 0


@pytest.mark.parametrize("where", ["output", "context"])
def test_size_bounds_are_runtime_settings(where: str) -> None:
    def node(ctx: Any) -> Any:
        if where == "context":
            ctx.context.set("k", "y" * 2000)
        return "y" * 2000 if where == "output" else "small"

    flow = create_flow("sized").node("a", node)
    key = {"output": "'_outputs.a'", "context": "'k'"}[where]
    for bound, expected in ((1000, "failed"), (5000, "completed")):
        rt = FlowRuntime(max_value_bytes=bound)
        rt.add_blueprint(flow)
        ad = InMemoryAdapter(rt, fetch_batch=3)
        run_ids = [ad.start_workflow("sized") for _ in range(2)]
        ad.work(burst=True)
        for result in [rt.run("sized")] + [ad.wait_for_result(r, timeout=5) for r in run_ids]:
            assert result.status == expected, (bound, result.errors)
            if expected == "failed":
                assert key in result.errors[0].message and "max_value_bytes" in result.errors[0].message


def test_max_context_bytes_bounds_what_a_run_writes() -> None:
    flow = (create_flow("ctx").node("a", lambda ctx: ctx.context.set("one", "a" * 600))
            .node("b", lambda ctx: ctx.context.set("two", "b" * 600)).edge("a", "b"))
    rt = FlowRuntime(max_context_bytes=1000)
    rt.add_blueprint(flow)
    result = rt.run("ctx")
    assert result.status == "failed"
    assert "'two'" in result.errors[0].message and "max_context_bytes" in result.errors[0].message
    assert FlowRuntime(max_context_bytes=None).run(flow.to_blueprint(), registry=flow.registry).status == "completed"


def test_max_context_bytes_bounds_a_distributed_runs_final_context() -> None:
    """A worker bounds each node's writes; a run that gathers more over several nodes fails at its
    end, and its result leaves the largest values out, naming them."""
    flow = (create_flow("gather").node("a", lambda ctx: ctx.context.set("one", "a" * 1500))
            .node("b", lambda ctx: ctx.context.set("two", "b" * 1400)).node("c", lambda ctx: "done")
            .edge("a", "b").edge("b", "c"))
    rt = FlowRuntime(max_context_bytes=2500)
    rt.add_blueprint(flow)
    ad = InMemoryAdapter(rt, fetch_batch=4)
    run_ids = [ad.start_workflow("gather") for _ in range(2)]
    ad.work(burst=True)
    for run_id in run_ids:
        result = ad.wait_for_result(run_id, timeout=5)
        assert result.status == "failed"
        assert "max_context_bytes" in result.errors[-1].message and "'one'" in result.errors[-1].message
        assert "one" not in result.context and result.context["_outputs.c"] == "done"
        assert ad.get_status(run_id).status == "failed"


def test_check_json_sizes_and_bounds() -> None:
    assert check_json("abc", "k") == 5
    text = {"a": ["x" * 100, 1, None, True, 2.5], "b": {"c": "y" * 50}}
    assert abs(check_json(text, "k") - len(json.dumps(text, separators=(",", ":")))) < 30
    with pytest.raises(ValueTooLarge, match="'k'.*max_value_bytes"):
        check_json(["x" * 600, "y" * 600], "k", 1000)
    check_json(["x" * 600, "y" * 600], "k", None)


# === NaN / Infinity ==============================================================================


def test_nan_from_a_transform_fails_the_runs_not_the_worker() -> None:
    seen = bounded('''
bp = {"id": "nan", "nodes": [{"id": "a", "uses": "src"}, {"id": "b", "uses": "echo"}],
      "edges": [{"source": "a", "target": "b", "transform": "float('nan')"}]}
rt = runtime(plain_flow())
rt.registry.update({"src": lambda ctx: 1, "echo": lambda ctx: ctx.input})
rt.add_blueprint(bp)
memory = rt.run("nan")
ad = InMemoryAdapter(rt, fetch_batch=5)
runs = [ad.start_workflow("nan") for _ in range(3)] + [ad.start_workflow("plain")]
ad.work(burst=True)
results = [ad.wait_for_result(r, timeout=5) for r in runs]
report(memory=[memory.status, [e.message for e in memory.errors]], statuses=[r.status for r in results],
       errors=[[e.message for e in r.errors] for r in results], dead=len(ad.queue.dead))
''')
    assert seen["memory"][0] == "failed" and "NaN" in seen["memory"][1][0] and "'a' -> 'b'" in seen["memory"][1][0]
    assert seen["statuses"] == ["failed"] * 3 + ["completed"]
    assert all("NaN" in errors[0] for errors in seen["errors"][:3])
    assert seen["dead"] == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), {"deep": [1, {"x": float("nan")}]}])
def test_nan_or_infinity_in_a_node_output_fails_the_node(value: Any) -> None:
    flow = create_flow("nanout").node("a", lambda ctx: value).node("b", lambda ctx: "after").edge("a", "b")
    rt = FlowRuntime()
    rt.add_blueprint(flow)
    ad = InMemoryAdapter(rt, fetch_batch=4)
    run_ids = [ad.start_workflow("nanout") for _ in range(2)]
    ad.work(burst=True)
    for result in [rt.run("nanout")] + [ad.wait_for_result(r, timeout=5) for r in run_ids]:
        assert result.status == "failed"
        assert result.errors[0].node_id == "a" and "JSON cannot hold" in result.errors[0].message
        assert "_outputs.b" not in result.context
    assert ad.queue.dead == []
