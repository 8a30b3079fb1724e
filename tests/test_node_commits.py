"""Node commits (issue 12): what one node execution touches, checked by its own guards, so commits
of different nodes of one run never conflict; a run left with nothing outstanding is settled by
whoever finds it so (the worker right after, a redelivery after a crash, the reconciler); a join's
or a batch's job lost outside the engine is found again by the reconciler."""
from __future__ import annotations

import time
from typing import Any, List, Tuple

import pytest

from flowcraft import FlowRuntime, create_flow
from flowcraft.distributed import WorkerCrash
from flowcraft.distributed._plan import count_field, done_field
from flowcraft.ports import Commit, Delivery
from flowcraft.testing import InMemoryAdapter
from flowcraft.testing.fakes import InMemoryQueue, InMemoryRunStore


def _adapter(flow: Any, **options: Any) -> InMemoryAdapter:
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    return InMemoryAdapter(runtime, **options)


def _two_sinks() -> Any:
    return (create_flow("two-sinks").node("src", lambda ctx: 1).node("a", lambda ctx: ctx.input + 1)
            .node("b", lambda ctx: ctx.input + 2).edge("src", "a").edge("src", "b"))


def _prepare_both(adapter: InMemoryAdapter) -> Tuple[List[Any], List[Delivery]]:
    """src done; then a's and b's jobs loaded and run before either commits (two workers at once)."""
    adapter.work(burst=True, max_jobs=1)
    deliveries = adapter.queue.fetch(2, timeout=1)
    assert sorted(d.job.node_id for d in deliveries) == ["a", "b"]  # type: ignore[union-attr]
    prepared = []
    for delivery in deliveries:
        graph, node = adapter._resolve(delivery)  # type: ignore[misc]
        prepared.append(adapter._prepare(delivery, graph, node, adapter._load(delivery.job, graph, node)))  # type: ignore[arg-type]
    return prepared, deliveries


def _commit(adapter: InMemoryAdapter, p: Any) -> None:
    adapter._commit_outcome(p.job, p.graph, p.node, p.snap, p.outcome, p.delivery)


def test_sibling_commits_derived_from_one_snapshot_both_apply_and_the_last_settles_the_run() -> None:
    flow = _two_sinks()
    adapter = _adapter(flow)
    run_id = adapter.start_workflow(flow.id)
    (pa, pb), deliveries = _prepare_both(adapter)
    commits: List[Commit] = []
    commit = adapter.store.commit
    adapter.store.commit = lambda c: (commits.append(c), commit(c))[1]  # type: ignore[method-assign]
    _commit(adapter, pa)
    _commit(adapter, pb)  # derived over the snapshot a's commit changed: no conflict
    adapter.queue.ack(deliveries)
    assert adapter.conflicts == 0
    assert [c.node_commit for c in commits] == [True, True, False]  # a, b, then b's worker settles the run
    assert [c.outstanding_after for c in commits[:2]] == [1, 0]
    result = adapter.wait_for_result(run_id, timeout=1)
    assert result.status == "completed" and result.context == flow.run(adapter.runtime).context
    assert all(n == 1 for n in adapter.store.completions.values())


def test_a_settling_lost_in_a_crash_is_done_by_the_redelivered_job() -> None:
    flow = _two_sinks()
    adapter = _adapter(flow)
    run_id = adapter.start_workflow(flow.id)
    (pa, pb), deliveries = _prepare_both(adapter)
    _commit(adapter, pa)
    adapter.queue.ack([pa.delivery])
    settle = adapter._settle

    def crash(*args: Any) -> None:
        raise WorkerCrash("before settling")

    adapter._settle = crash  # type: ignore[method-assign]
    with pytest.raises(WorkerCrash):
        _commit(adapter, pb)
    assert adapter.store.get_record(run_id).status == "running"  # type: ignore[union-attr]
    assert adapter.store.get_record(run_id).outstanding == 0  # type: ignore[union-attr]
    adapter._settle = settle  # type: ignore[method-assign]
    adapter.queue.requeue_unacked()  # the broker hands b's job back
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=1)
    assert result.status == "completed" and result.context == flow.run(adapter.runtime).context
    assert adapter.store.completions[(run_id, "b", 0)] == 1


def test_the_reconciler_settles_a_run_left_with_nothing_outstanding() -> None:
    flow = _two_sinks()
    adapter = _adapter(flow)
    run_id = adapter.start_workflow(flow.id)
    (pa, pb), deliveries = _prepare_both(adapter)
    _commit(adapter, pa)
    adapter._settle = lambda *args: None  # type: ignore[method-assign]  # b's worker dies before settling...
    _commit(adapter, pb)
    adapter.queue.ack(deliveries)  # ...and its job is gone too (lost outside the engine)
    assert adapter.store.get_record(run_id).status == "running"  # type: ignore[union-attr]
    del adapter._settle  # the class's again
    assert adapter.reconcile(run_id) == set()
    assert adapter.wait_for_result(run_id, timeout=1).status == "completed"


def test_a_lost_join_job_and_a_lost_gathering_job_are_found_by_the_reconciler() -> None:
    join = (create_flow("lost-join").node("src", lambda ctx: 1).node("x", lambda ctx: ctx.input).node("y", lambda ctx: 2)
            .node("j", lambda ctx: sorted(ctx.input)).edge("src", "x").edge("src", "y").edge("x", "j").edge("y", "j"))
    batch = create_flow("lost-gather").node("make", lambda ctx: [1, 2, 3]).batch(
        "each", lambda ctx: ctx.input * 10, input_key="make", output_key="out").edge("make", "each")
    for flow, node, field in ((join, "j", count_field("j", 0)), (batch, "each_scatter", done_field("each_scatter", 0))):
        adapter = _adapter(flow)
        run_id = adapter.start_workflow(flow.id)
        while True:  # work until the counter is full, then lose the job it made
            adapter.work(burst=True, max_jobs=1)
            if adapter.store.read_items(run_id, [field])[0] == (2 if flow is join else 3):
                break
        waiting = adapter.queue.fetch(10, timeout=0.1)
        assert [d.job.node_id for d in waiting] == [node]  # type: ignore[union-attr]
        adapter.queue.ack(waiting)
        assert adapter.reconcile(run_id) == {node}
        adapter.drain()
        result = adapter.wait_for_result(run_id, timeout=1)
        assert result.status == "completed" and result.context == flow.run(adapter.runtime).context, flow.id
        assert adapter.store.activations[(run_id, node, 0)] <= 1


@pytest.mark.parametrize("shape", ["fan", "batch"])
def test_workers_sharing_a_run_do_not_conflict(shape: str) -> None:
    """Three worker threads over one queue and store, nodes that wait 5 ms: every node committed
    once, the run as in memory, and no commit's checks ever failed."""
    flow = create_flow(f"shared-{shape}").node("src", lambda ctx: list(range(30)))
    if shape == "fan":
        for i in range(30):
            flow.node(f"w{i}", lambda ctx, i=i: (time.sleep(0.005), ctx.input[i] * 2)[1]).edge("src", f"w{i}").edge(f"w{i}", "join")
        flow.node("join", lambda ctx: sum(ctx.input.values()))
    else:
        flow.batch("each", lambda ctx: (time.sleep(0.005), ctx.input * 2)[1], input_key="src", output_key="out").edge("src", "each")
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    queue, store = InMemoryQueue(), InMemoryRunStore()
    from flowcraft.distributed import DistributedAdapter

    workers = [DistributedAdapter(runtime, queue, store, poll_timeout=0.05) for _ in range(3)]
    ran: List[int] = []
    for number, worker in enumerate(workers):
        execute = worker._execute
        worker._execute = lambda *args, execute=execute, number=number: (ran.append(number), execute(*args))[1]  # type: ignore[method-assign]
    run_id = workers[0].start_workflow(flow.id)
    for worker in workers:
        worker.start()
    try:
        result = workers[0].wait_for_result(run_id, timeout=30)
    finally:
        for worker in workers:
            worker.stop(timeout=5)
    assert result.status == "completed" and result.context == flow.run(runtime).context
    assert len(set(ran)) == 3, ran  # every worker ran some of it
    assert sum(w.conflicts for w in workers) == 0
    assert all(n == 1 for n in store.completions.values()), store.completions
