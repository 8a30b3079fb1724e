"""Run deadlines (SPEC 14) in memory and on the in-memory fakes: a run not finished in time fails
with `DeadlineExceeded` naming what was left; no node of it starts afterwards."""
from __future__ import annotations

import threading
import time
from typing import Any, List

import pytest

from flowcraft import BlueprintError, CancelToken, FlowRuntime, create_flow
from flowcraft.deadlines import DEADLINE_EVENT, check_deadline
from flowcraft.testing import InMemoryAdapter

STARTED: List[str] = []


def _flow(release: threading.Event, flow_id: str = "dl", metadata: Any = None) -> Any:
    def slow(ctx: Any) -> str:
        STARTED.append("slow")
        while not release.is_set() and not ctx.cancel.cancelled:
            release.wait(0.02)
        return "late"

    def after(ctx: Any) -> str:
        STARTED.append("after")
        return "ran"

    return (create_flow(flow_id, metadata=metadata).node("a", lambda ctx: 1).node("slow", slow).node("after", after)
            .edge("a", "slow").edge("slow", "after"))


@pytest.fixture(autouse=True)
def _clear() -> None:
    STARTED.clear()


@pytest.mark.parametrize("concurrency", [1, 3])
def test_in_memory_run_fails_at_its_deadline_and_sets_the_nodes_cancel(concurrency: int) -> None:
    release = threading.Event()
    runtime = FlowRuntime()
    runtime.add_blueprint(_flow(release))
    events: List[Any] = []
    runtime.event_bus = type("Bus", (), {"emit": lambda self, e: events.append(e)})()
    token = CancelToken()
    result = runtime.run("dl", deadline=0.2, concurrency=concurrency, cancel=token)
    assert result.status == "failed"
    assert [(e.node_id, e.type) for e in result.errors] == [(None, "DeadlineExceeded")]
    assert "still running: ['slow']" in result.errors[0].message
    assert "slow" not in result.context  # its late result is not the run's
    assert not token.cancelled  # the caller's token is left alone
    assert any(e.type == DEADLINE_EVENT for e in events)
    time.sleep(0.1)  # the node saw its ctx.cancel and returned; nothing started after it
    assert STARTED == ["slow"]


def test_blueprint_metadata_deadline_is_the_default() -> None:
    release = threading.Event()
    runtime = FlowRuntime()
    runtime.add_blueprint(_flow(release, metadata={"deadline": 0.2}))
    result = runtime.run("dl")
    assert result.status == "failed" and result.errors[0].type == "DeadlineExceeded"
    release.set()
    assert runtime.run("dl", deadline=30).status == "completed"  # the argument wins


@pytest.mark.parametrize("bad", [0, -1, "5", float("nan"), float("inf"), True, [1]])
def test_a_deadline_that_is_not_a_positive_number_is_one_clear_error(bad: Any) -> None:
    runtime = FlowRuntime()
    runtime.add_blueprint(_flow(threading.Event()))
    with pytest.raises(ValueError, match="deadline must be a positive number of seconds"):
        runtime.run("dl", deadline=bad)
    with pytest.raises(BlueprintError, match="metadata.deadline must be a positive number of seconds"):
        runtime.add_blueprint(_flow(threading.Event(), "dl-bad", metadata={"deadline": bad}))
    adapter = InMemoryAdapter(runtime)
    with pytest.raises(ValueError, match="deadline must be a positive number"):
        adapter.start_workflow("dl", deadline=bad)
    assert adapter.list_runs().runs == []  # nothing half-done


def test_check_deadline_accepts_positive_numbers() -> None:
    assert check_deadline(2) == 2.0 and check_deadline(0.5) == 0.5 and check_deadline(None) is None


def test_an_awaiting_in_memory_run_resumed_past_its_deadline_fails() -> None:
    flow = create_flow("dl-wait").node("a", lambda ctx: 1).wait("approve").node("b", lambda ctx: 2)
    flow.edge("a", "approve").edge("approve", "b")
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    paused = runtime.run("dl-wait", deadline=0.05)
    assert paused.status == "awaiting"
    time.sleep(0.1)
    result = runtime.resume("dl-wait", paused.serialized_context, output="ok")
    assert result.status == "failed" and result.errors[0].type == "DeadlineExceeded"
    assert "b" not in result.context


def _distributed(release: threading.Event, **options: Any) -> Any:
    runtime = FlowRuntime()
    runtime.add_blueprint(_flow(release))
    return InMemoryAdapter(runtime, **options)


def test_distributed_run_fails_at_its_deadline_through_a_run_commit() -> None:
    release = threading.Event()
    adapter = _distributed(release, threads=2)
    adapter.start()
    try:
        run_id = adapter.start_workflow("dl", deadline=0.3)
        result = adapter.wait_for_result(run_id, timeout=10)
        assert result.status == "failed"
        assert [e.type for e in result.errors] == ["DeadlineExceeded"]
        assert "still running: ['slow']" in result.errors[0].message
        release.set()  # the node that was running finishes; its commit is refused: no successor
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and adapter.queue.pending:
            time.sleep(0.02)
    finally:
        adapter.stop(timeout=5)
    assert STARTED == ["slow"]
    record = adapter.store.get_record(run_id)
    assert record.status == "failed" and len(record.errors) == 1
    types = [e.type for e in adapter.get_history(run_id)]
    assert types[-2:] == [DEADLINE_EVENT, "workflow:finish"], types
    assert "slow" not in adapter.get_history(run_id)[-2].payload["waiting"]


def test_an_awaiting_distributed_run_past_its_deadline_fails() -> None:
    flow = create_flow("dl-wait").node("a", lambda ctx: 1).wait("approve").edge("a", "approve")
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow("dl-wait", deadline=0.2)
    adapter.work(burst=True)
    assert adapter.get_status(run_id).status == "awaiting"
    time.sleep(0.25)
    adapter.work(burst=True)
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "failed" and "waiting: ['approve']" in result.errors[0].message
    with pytest.raises(ValueError):
        adapter.resume_with_action(run_id, None, output="too late")


def test_an_early_or_forged_deadline_job_fails_nobody() -> None:
    from flowcraft.deadlines import deadline_job

    release = threading.Event()
    release.set()
    adapter = _distributed(release)
    early = adapter.start_workflow("dl", deadline=60)
    plain = adapter.start_workflow("dl")
    adapter.queue.enqueue([deadline_job(early, "dl"), deadline_job(plain, "dl"), deadline_job("nope", "dl")])
    adapter.work(burst=True)
    assert adapter.wait_for_result(early, timeout=5).status == "completed"
    assert adapter.wait_for_result(plain, timeout=5).status == "completed"


def test_the_reconciler_fails_an_overdue_run_whose_deadline_job_was_lost() -> None:
    release = threading.Event()
    adapter = _distributed(release)
    run_id = adapter.start_workflow("dl", deadline=0.05)
    with adapter.queue._cond:  # the start jobs and the deadline job: lost
        adapter.queue._ready.clear()
        adapter.queue._delayed.clear()
    time.sleep(0.1)
    assert adapter.reconcile(run_id) == set()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "failed" and result.errors[0].type == "DeadlineExceeded"


def test_a_retried_run_is_not_held_to_its_old_deadline() -> None:
    release = threading.Event()
    adapter = _distributed(release, threads=2)
    adapter.start()
    try:
        run_id = adapter.start_workflow("dl", deadline=0.2)
        assert adapter.wait_for_result(run_id, timeout=10).status == "failed"
        release.set()
        time.sleep(0.1)
        adapter.retry(run_id)
        result = adapter.wait_for_result(run_id, timeout=10)
        for _ in range(100):
            if result.status != "running":
                break
            time.sleep(0.05)
            result = adapter.wait_for_result(run_id, timeout=10)
    finally:
        adapter.stop(timeout=5)
    assert result.status == "completed", result.errors
    assert result.context["after"] == "ran"


def test_a_node_with_its_own_timeout_sees_the_deadline_on_its_cancel_token() -> None:
    seen: List[bool] = []

    def slow(ctx: Any) -> str:
        seen.append(ctx.cancel.wait(5))  # True: woken by the run's deadline, not by its own 10 s timeout
        return "late"

    flow = create_flow("dl-timeout").node("slow", slow, timeout=10_000, max_retries=3)
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    result = runtime.run("dl-timeout", deadline=0.2)
    assert result.status == "failed" and result.errors[0].type == "DeadlineExceeded"
    for _ in range(100):
        if seen:
            break
        time.sleep(0.02)
    assert seen == [True]  # and it was not retried


def test_batch_items_running_at_the_deadline_are_named_by_their_batch() -> None:
    release = threading.Event()

    def item(ctx: Any) -> Any:
        release.wait(0.05)
        while not ctx.cancel.cancelled:
            time.sleep(0.01)
        return ctx.input

    flow = create_flow("dl-batch").node("make", lambda ctx: list(range(6))).batch(
        "each", item, input_key="make", output_key="out").edge("make", "each")
    runtime = FlowRuntime()
    runtime.add_blueprint(flow)
    result = runtime.run("dl-batch", deadline=0.2, concurrency=2)
    assert result.status == "failed" and "out" not in result.context
    assert result.errors[0].message.endswith("still running: ['each_scatter']")  # its items are not named one by one
