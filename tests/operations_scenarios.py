"""Operator scenarios (SPEC section 11) shared by the fakes' tests and each real backend's.

Each scenario takes `make(runtime) -> adapter` and `drain(adapter)` (work until the queue is
empty) and asserts real behaviour: which nodes ran (counted), statuses, contexts, what is listed.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any, Callable, Dict

from flowcraft import FlowRuntime, create_flow

Make = Callable[[FlowRuntime], Any]
Drain = Callable[[Any], None]


class Flaky:
    """A dependency that fails while `broken` is set; counts the calls of every node."""

    def __init__(self) -> None:
        self.broken = True
        self.calls: Counter = Counter()

    def node(self, name: str, value: Any) -> Callable[[Any], Any]:
        def run(ctx: Any) -> Any:
            self.calls[name] += 1
            if name == "charge" and self.broken:
                raise ConnectionError("payment service unavailable")
            return value

        return run


def _chain(flaky: Flaky) -> Any:
    return (create_flow("ops-chain")
            .node("load", flaky.node("load", 1))
            .node("charge", flaky.node("charge", 2))
            .node("ship", flaky.node("ship", 3))
            .edge("load", "charge").edge("charge", "ship"))


def _runtime(flow: Any) -> FlowRuntime:
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    return runtime


def _wait_status(adapter: Any, run_id: str, drain: Drain) -> str:
    drain(adapter)
    status = adapter.get_status(run_id)
    assert status is not None
    return str(status.status)


def retry_after_transient_failure(make: Make, drain: Drain) -> None:
    flaky = Flaky()
    adapter = make(_runtime(_chain(flaky)))
    run_id = adapter.start_workflow("ops-chain", {})
    assert _wait_status(adapter, run_id, drain) == "failed"
    result = adapter.wait_for_result(run_id, timeout=10)
    assert result.errors[0].node_id == "charge"
    assert result.errors[0].type == "ConnectionError"
    assert "payment service unavailable" in (result.errors[0].traceback or "")
    assert "Traceback (most recent call last)" in (result.errors[0].traceback or "")
    failed = adapter.list_runs(status="failed")
    assert [s.run_id for s in failed.runs] == [run_id]
    assert failed.runs[0].error == "payment service unavailable"
    assert failed.runs[0].blueprint_id == "ops-chain"
    flaky.broken = False
    assert adapter.retry(run_id) == {"charge"}
    assert _wait_status(adapter, run_id, drain) == "completed"
    result = adapter.wait_for_result(run_id, timeout=10)
    assert result.context["ship"] == 3 and not result.errors
    assert flaky.calls == Counter({"load": 1, "charge": 2, "ship": 1})  # load did not run again
    assert adapter.list_runs(status="failed").runs == []
    assert [s.run_id for s in adapter.list_runs(status="completed").runs] == [run_id]
    try:
        adapter.retry(run_id)
    except ValueError as error:
        assert "completed" in str(error)
    else:
        raise AssertionError("a completed run was retried")


def restart_from_runs_node_and_downstream(make: Make, drain: Drain) -> None:
    flaky = Flaky()
    flaky.broken = False
    adapter = make(_runtime(_chain(flaky)))
    run_id = adapter.start_workflow("ops-chain", {})
    assert _wait_status(adapter, run_id, drain) == "completed"
    assert adapter.restart_from(run_id, "charge") == {"charge"}
    assert adapter.get_status(run_id).status == "running"
    assert _wait_status(adapter, run_id, drain) == "completed"
    assert flaky.calls == Counter({"load": 1, "charge": 2, "ship": 2})
    assert adapter.wait_for_result(run_id, timeout=10).context["ship"] == 3


def skip_and_patch_finish_a_stuck_run(make: Make, drain: Drain) -> None:
    flaky = Flaky()
    flow = (create_flow("ops-patch")
            .node("load", flaky.node("load", 1))
            .node("charge", flaky.node("charge", 2))
            .node("ship", lambda ctx: ctx.context.get("address"))
            .edge("load", "charge").edge("charge", "ship"))
    adapter = make(_runtime(flow))
    run_id = adapter.start_workflow("ops-patch", {})
    assert _wait_status(adapter, run_id, drain) == "failed"
    adapter.patch_context(run_id, set={"address": "Main St 1"}, delete=["nothing-here"])
    assert adapter.skip(run_id, "charge", output={"paid": "by hand"}) == {"ship"}
    assert _wait_status(adapter, run_id, drain) == "completed"
    result = adapter.wait_for_result(run_id, timeout=10)
    assert result.context["charge"] == {"paid": "by hand"}
    assert result.context["ship"] == "Main St 1"
    assert flaky.calls["charge"] == 1  # skipped, not run again

    waiting = (create_flow("ops-wait").node("a", lambda ctx: 1).wait("approve")
               .node("b", lambda ctx: ctx.input).edge("a", "approve").edge("approve", "b"))
    adapter2 = make(_runtime(waiting))
    run2 = adapter2.start_workflow("ops-wait", {})
    assert _wait_status(adapter2, run2, drain) == "awaiting"
    assert adapter2.skip(run2, "approve", output="ok") == {"b"}
    assert _wait_status(adapter2, run2, drain) == "completed"
    assert adapter2.wait_for_result(run2, timeout=10).context["b"] == "ok"


def prune_deletes_exactly_the_old_ended_runs(make: Make, drain: Drain) -> None:
    flaky = Flaky()
    adapter = make(_runtime(_chain(flaky)))
    failed = adapter.start_workflow("ops-chain", {})
    drain(adapter)
    flaky.broken = False
    done = adapter.start_workflow("ops-chain", {})
    drain(adapter)
    waiting = (create_flow("ops-wait2").node("a", lambda ctx: 1).wait("approve").edge("a", "approve"))
    adapter.runtime.add_blueprint(waiting)
    paused = adapter.start_workflow("ops-wait2", {})
    drain(adapter)
    assert {adapter.get_status(r).status for r in (failed, done, paused)} == {"failed", "completed", "awaiting"}
    assert adapter.prune(3600) == 0  # nothing is that old
    time.sleep(0.05)
    assert adapter.prune(0.01, statuses=("failed",)) == 1
    assert adapter.get_status(failed) is None
    assert adapter.get_status(done).status == "completed"
    assert adapter.prune(0.01) == 1
    assert adapter.get_status(done) is None
    assert adapter.get_status(paused).status == "awaiting"  # not an ended run
    assert [s.run_id for s in adapter.list_runs().runs] == [paused]


def dead_letter_listed_and_requeued(make: Make, drain: Drain, push_raw: Callable[[Any, bytes], None]) -> None:
    flaky = Flaky()
    flaky.broken = False
    adapter = make(_runtime(_chain(flaky)))
    adapter.purge_dead_letters()
    push_raw(adapter, b"not json at all")
    drain(adapter)
    dead = adapter.dead_letters()
    assert len(dead) == 1 and dead[0].body == b"not json at all" and "malformed" in dead[0].reason
    assert dead[0].run_id is None
    # a job that names a run which does not exist yet is dead-lettered; once the run exists it runs
    run_id = adapter.start_workflow("ops-chain", {})
    drain(adapter)
    job = json.dumps({"runId": run_id + "-x", "blueprintId": "ops-chain", "nodeId": "load"}).encode()
    push_raw(adapter, job)
    drain(adapter)
    letters = {d.body: d for d in adapter.dead_letters()}
    assert job in letters and "unknown run" in letters[job].reason and letters[job].run_id == run_id + "-x"
    adapter.start_workflow("ops-chain", {}, run_id=run_id + "-x")
    drain(adapter)
    before = flaky.calls["load"]
    assert adapter.requeue_dead_letter(letters[job].id) is True
    assert adapter.requeue_dead_letter(letters[job].id) is False
    drain(adapter)
    assert flaky.calls["load"] == before  # the run had done it already: the requeued job is dropped
    assert job not in {d.body for d in adapter.dead_letters()}
    assert adapter.purge_dead_letters() == 1
    assert adapter.dead_letters() == []


def list_runs_pages_newest_first(make: Make, drain: Drain) -> None:
    flaky = Flaky()
    flaky.broken = False
    adapter = make(_runtime(_chain(flaky)))
    ids = []
    for _ in range(5):
        ids.append(adapter.start_workflow("ops-chain", {}))
        drain(adapter)
        time.sleep(0.002)
    first = adapter.list_runs(limit=2)
    assert [s.run_id for s in first.runs] == ids[::-1][:2]
    second = adapter.list_runs(limit=2, cursor=first.next_cursor)
    assert [s.run_id for s in second.runs] == ids[::-1][2:4]
    third = adapter.list_runs(limit=2, cursor=second.next_cursor)
    assert [s.run_id for s in third.runs] == ids[:1] and third.next_cursor is None
    assert adapter.list_runs(blueprint_id="nope").runs == []
    newest = adapter.list_runs(limit=1).runs[0]
    assert newest.created_at <= newest.updated_at
    assert [s.run_id for s in adapter.list_runs(since=newest.updated_at).runs] == [ids[-1]]
    assert ids[-1] not in [s.run_id for s in adapter.list_runs(until=newest.updated_at - 1e-6).runs]


SCENARIOS: Dict[str, Callable[..., None]] = {
    "retry": retry_after_transient_failure,
    "restart": restart_from_runs_node_and_downstream,
    "skip_patch": skip_and_patch_finish_a_stuck_run,
    "prune": prune_deletes_exactly_the_old_ended_runs,
    "list": list_runs_pages_newest_first,
}


def requeued_dead_letter_retries_the_run_it_failed(make: Make, drain: Drain, push_raw: Callable[[Any, bytes], None]) -> None:
    """A job refused as malformed (its identity still readable) fails its run; requeuing it puts
    the run back to running, and the run completes."""
    flaky = Flaky()
    flaky.broken = False
    adapter = make(_runtime(_chain(flaky)))
    adapter.purge_dead_letters()
    run_id = adapter.start_workflow("ops-chain", {})
    bad = json.dumps({"runId": run_id, "blueprintId": "ops-chain", "nodeId": "charge", "iteration": "one"}).encode()
    push_raw(adapter, bad)
    drain(adapter)
    assert adapter.get_status(run_id).status == "failed"
    letter = next(d for d in adapter.dead_letters() if d.body == bad)
    assert letter.run_id == run_id and "iteration" in letter.reason
    assert adapter.requeue_dead_letter(letter.id) is True
    assert adapter.get_status(run_id).status == "running"
    drain(adapter)
    assert adapter.get_status(run_id).status == "completed"
    assert adapter.wait_for_result(run_id, timeout=10).context["ship"] == 3
    assert bad not in {d.body for d in adapter.dead_letters()}
