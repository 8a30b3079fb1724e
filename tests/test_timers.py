"""The in-memory timer scheduler (flowcraft.timers), mirroring Flowcraft TS's WorkflowScheduler
(packages/core/src/runtime/scheduler.ts; test/runtime/runtime.test.ts "FlowRuntime - Scheduler")."""
import threading
import time

import pytest

from flowcraft import FlowRuntime, create_flow


def _sleepy(duration="50ms"):
    flow = create_flow("sleepy")
    flow.node("a", lambda ctx: 1)
    flow.sleep("nap", duration=duration)
    flow.node("b", lambda ctx: (ctx.input or 0) + 41)
    flow.edge("a", "nap").edge("nap", "b")
    return flow


def _add(runtime, flow):
    runtime.registry.update(flow.registry)
    return (flow.to_blueprint(),)


def test_a_sleeping_run_resumes_by_itself_when_due():
    """TS runtime.ts run(): an awaiting run with a timer is registered with the scheduler, whose
    interval check resumes it once `wakeUpAt` has passed (scheduler.ts checkAndResumeWorkflows)."""
    runtime = FlowRuntime()
    done = threading.Event()
    seen = []
    scheduler = runtime.start_scheduler(interval=0.01, on_result=lambda r: (seen.append(r), done.set()))
    try:
        result = runtime.run(*_add(runtime, _sleepy()))
        assert result.status == "awaiting"
        assert [r.run_id for r in scheduler.sleeping()] == [result.run_id]
        assert done.wait(5), "the scheduler never resumed the run"
        resumed = scheduler.result(result.run_id)
        assert resumed is seen[0]
        assert resumed.status == "completed" and resumed.context["b"] == 42
        assert resumed.run_id == result.run_id
        assert scheduler.sleeping() == []  # a finished run is unregistered
    finally:
        runtime.stop_scheduler()
    assert not scheduler.running


def test_check_resumes_only_due_timers_and_stop_keeps_them():
    """scheduler.ts: only workflows whose wake-up time is <= now are resumed; stop() clears the
    interval without forgetting registered workflows (runtime.test.ts 'should start and stop scheduler')."""
    runtime = FlowRuntime()
    scheduler = runtime.start_scheduler(interval=60)
    runtime.stop_scheduler()
    assert not scheduler.running
    later = runtime.run(*_add(runtime, _sleepy("1h")))
    soon = runtime.run(*_add(runtime, _sleepy("1ms")))
    time.sleep(0.01)
    results = scheduler.check()
    assert [r.run_id for r in results] == [soon.run_id] and results[0].status == "completed"
    assert [r.run_id for r in scheduler.sleeping()] == [later.run_id]
    assert scheduler.result(later.run_id) is None


def test_runs_without_a_scheduler_are_not_tracked_and_a_wait_is_not_a_timer():
    """TS registers only awaiting nodes whose reason is a timer; a `wait` stays for its caller."""
    runtime = FlowRuntime()
    assert runtime.scheduler is None
    runtime.run(*_add(runtime, _sleepy()))  # no scheduler: nothing holds on to the run
    scheduler = runtime.start_scheduler(interval=60)
    try:
        flow = create_flow("waits")
        flow.wait("approve")
        assert runtime.run(*_add(runtime, flow)).status == "awaiting"
        assert scheduler.sleeping() == []
    finally:
        runtime.stop_scheduler()


def test_new_interval_makes_a_new_scheduler():
    """runtime.test.ts 'should create new scheduler with custom interval'."""
    runtime = FlowRuntime()
    first = runtime.start_scheduler()
    second = runtime.start_scheduler(interval=0.5)
    try:
        assert second is not first and second.interval == 0.5 and not first.running and second.running
        with pytest.raises(ValueError, match="interval"):
            runtime.start_scheduler(interval=0)
    finally:
        runtime.stop_scheduler()
