"""A run records its blueprint's digest; a worker whose blueprint differs treats its jobs as a
version mismatch (issue 17 item 4, SPEC 5 "Versioning"), on the fakes.

The mistake: edit a blueprint, keep its id and `metadata.version`, start a run, while a worker still
has the old graph. It used to run the old graph silently; now the old worker puts the job back
(and dead-letters it after `version_mismatch_ttl`), saying why in its log, and a worker with the
edited blueprint runs it. Runs without a digest (seed clients, older runs) are not checked.
"""
from __future__ import annotations

import logging
from typing import Any, List

from flowcraft import FlowRuntime, WorkflowBlueprint, create_flow
from flowcraft.blueprint import blueprint_digest
from flowcraft.distributed import DistributedAdapter
from flowcraft.ports import Job
from flowcraft.testing import InMemoryAdapter


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def order(edited: bool, calls: List[str]) -> Any:
    """`order` version 1; the edited one ships before it bills (same id, same version)."""
    def bill(ctx: Any) -> Any:
        calls.append(f"bill {'new' if edited else 'old'}")
        return "billed"

    def ship(ctx: Any) -> Any:
        calls.append(f"ship {'new' if edited else 'old'}")
        return "shipped"

    flow = create_flow("order", metadata={"version": "1"}).node("bill", bill).node("ship", ship)
    return flow.edge("ship", "bill") if edited else flow.edge("bill", "ship")


def runtime_of(flow: Any) -> FlowRuntime:
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    return runtime


def test_the_digest_is_stable_across_the_wire_form():
    bp = order(False, []).to_blueprint()
    again = WorkflowBlueprint.from_json(bp.to_json())
    assert blueprint_digest(bp) == blueprint_digest(again)
    assert len(blueprint_digest(bp)) == 16
    assert blueprint_digest(bp) != blueprint_digest(order(True, []).to_blueprint())


def test_an_edited_blueprint_is_never_run_on_the_old_graph(caplog):
    calls: List[str] = []
    clock = Clock()
    new = InMemoryAdapter(runtime_of(order(True, calls)), version_mismatch_delay=0.0)
    old = DistributedAdapter(runtime_of(order(False, calls)), new.queue, new.store, new.coordination,
                             version_mismatch_delay=0.0, version_mismatch_ttl=60, clock=clock)
    run_id = new.start_workflow("order")
    ours, theirs = blueprint_digest(old.runtime.blueprint("order")), blueprint_digest(new.runtime.blueprint("order"))
    assert new.store.get_record(run_id).blueprint_digest == theirs
    with caplog.at_level(logging.WARNING, logger="flowcraft.distributed"):
        assert old.work(max_jobs=1) == 1
    assert calls == [] and new.queue.pending == 1 and new.queue.dead == []
    line = [r.getMessage() for r in caplog.records if "put back" in r.getMessage()][0]
    assert f"needs blueprint order@1 (digest {theirs}), this worker has order@1 (digest {ours}: the blueprint " \
           f"differs, edited without a new metadata.version" in line and line.endswith("put back")
    clock.now += 61  # past version_mismatch_ttl: dead-lettered with the reason, never run
    assert old.work(max_jobs=1) == 1
    assert calls == [] and new.queue.pending == 0
    assert "version mismatch" in new.queue.dead[0][1] and theirs in new.queue.dead[0][1]


def test_a_worker_with_the_edited_blueprint_runs_it():
    calls: List[str] = []
    new = InMemoryAdapter(runtime_of(order(True, calls)), version_mismatch_delay=0.0)
    old = DistributedAdapter(runtime_of(order(False, calls)), new.queue, new.store, new.coordination,
                             version_mismatch_delay=0.0)
    run_id = new.start_workflow("order")
    old.work(max_jobs=2)  # puts the job back twice
    new.drain()
    result = new.wait_for_result(run_id, timeout=5)
    assert (result.status, calls) == ("completed", ["ship new", "bill new"])


def test_a_run_without_a_digest_is_not_checked():
    calls: List[str] = []
    new = InMemoryAdapter(runtime_of(order(True, calls)))
    old = DistributedAdapter(runtime_of(order(False, calls)), new.queue, new.store, new.coordination)
    new.store.seed_run("seeded", {})  # a seed client's run: context and start job only
    new.queue.enqueue([Job("seeded", "order", "bill")])
    old.work(max_jobs=2)
    assert calls == ["bill old", "ship old"]
    assert new.store.get_record("seeded").blueprint_digest is None
