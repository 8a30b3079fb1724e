"""Wait and sleep nodes, pause and resume (SPEC §5 "Wait / sleep", §6 `resume`)."""
from __future__ import annotations

import datetime as dt
import json
import time

import pytest

import threading

from flowcraft import CancelToken, FlowRuntime, create_flow, parse_duration


def approval_flow():
    return (
        create_flow("approval")
        .node("a", lambda ctx: "A")
        .wait("approve")
        .node("yes", lambda ctx: {"approved": ctx.input})
        .node("no", lambda ctx: {"rejected": ctx.input})
        .edge("a", "approve")
        .edge("approve", "yes", action="approve")
        .edge("approve", "no", action="reject")
    )


# --- wait -------------------------------------------------------------------------------------------


def test_wait_pauses_run_with_awaiting_details():
    result = approval_flow().run()
    assert result.status == "awaiting"
    assert result.awaiting == ["approve"]
    assert result.errors == []
    assert result.context["_awaitingNodeIds"] == ["approve"]
    details = result.context["_awaitingDetails"]
    assert set(details) == {"approve"}
    assert details["approve"]["type"] == "wait"
    assert result.context["a"] == "A"
    assert "yes" not in result.context and "no" not in result.context
    assert result.to_dict()["awaiting"] == ["approve"]
    # the serialized context is JSON and carries the awaiting ids
    assert json.loads(result.serialized_context)["_awaitingNodeIds"] == ["approve"]


def test_wait_details_from_builder_kwargs():
    result = create_flow("d").wait("w", reason="manager sign-off").run()
    assert result.context["_awaitingDetails"]["w"]["reason"] == "manager sign-off"


def test_resume_with_approve_action_takes_approve_branch():
    flow = approval_flow()
    paused = flow.run()
    done = flow.resume(None, paused.serialized_context, action="approve", output={"by": "alice"})
    assert done.status == "completed", done.errors
    assert done.context["approve"] == {"by": "alice"}
    assert done.context["_outputs.approve"] == {"by": "alice"}
    assert done.context["yes"] == {"approved": {"by": "alice"}}
    assert "no" not in done.context
    assert done.skipped == ["no"]
    assert "_awaitingNodeIds" not in done.context
    assert "_awaitingDetails" not in done.context
    assert done.awaiting == []
    assert done.run_id == paused.run_id


def test_resume_with_reject_action_takes_reject_branch():
    flow = approval_flow()
    paused = flow.run()
    done = flow.resume(None, paused.serialized_context, action="reject")
    assert done.status == "completed", done.errors
    assert done.context["no"] == {"rejected": None}
    assert "yes" not in done.context
    assert done.skipped == ["yes"]


def test_resume_with_output_only_stores_output_and_follows_default_edge():
    flow = create_flow("out").wait("w").node("n", lambda ctx: {"got": ctx.input}).edge("w", "n")
    paused = flow.run()
    done = flow.resume(None, paused.serialized_context, output={"x": 1})
    assert done.status == "completed"
    assert done.context["w"] == {"x": 1}
    assert done.context["_outputs.w"] == {"x": 1}
    assert done.context["n"] == {"got": {"x": 1}}


def test_resume_through_runtime_with_dict_context():
    flow = approval_flow()
    runtime = FlowRuntime()
    paused = runtime.run(flow.to_blueprint(), registry=flow.registry)
    done = runtime.resume(flow.to_blueprint(), json.loads(paused.serialized_context), action="approve",
                          registry=flow.registry)
    assert done.status == "completed"
    assert "yes" in done.context


def test_wait_beside_a_running_branch():
    flow = (
        create_flow("side")
        .node("s", lambda ctx: 1)
        .wait("w")
        .node("x", lambda ctx: "x ran")
        .edge("s", "w")
        .edge("s", "x")
    )
    result = flow.run()
    assert result.status == "awaiting"
    assert result.awaiting == ["w"]
    assert result.context["x"] == "x ran"


def parallel_waits():
    return (
        create_flow("pw")
        .node("s", lambda ctx: 1)
        .wait("w1")
        .wait("w2")
        .node("j", lambda ctx: ctx.input)
        .edge("s", "w1")
        .edge("s", "w2")
        .edge("w1", "j")
        .edge("w2", "j")
    )


def test_two_concurrent_waits_resumed_one_by_one():
    flow = parallel_waits()
    paused = flow.run()
    assert paused.status == "awaiting"
    assert sorted(paused.awaiting) == ["w1", "w2"]
    assert sorted(paused.context["_awaitingNodeIds"]) == ["w1", "w2"]

    first = flow.resume(None, paused.serialized_context, output="one", node_id="w1")
    assert first.status == "awaiting"
    assert first.awaiting == ["w2"]
    assert first.context["_awaitingNodeIds"] == ["w2"]
    assert first.context["w1"] == "one"
    assert "j" not in first.context

    second = flow.resume(None, first.serialized_context, output="two", node_id="w2")
    assert second.status == "completed", second.errors
    assert second.context["j"] == {"w1": "one", "w2": "two"}
    assert second.awaiting == []


def test_resume_without_node_id_when_two_await_is_a_clear_error():
    flow = parallel_waits()
    paused = flow.run()
    with pytest.raises(ValueError) as info:
        flow.resume(None, paused.serialized_context, output=1)
    message = str(info.value)
    assert "w1" in message and "w2" in message
    assert "node_id" in message


def test_resume_unknown_node_id_is_a_clear_error():
    flow = approval_flow()
    paused = flow.run()
    with pytest.raises(ValueError) as info:
        flow.resume(None, paused.serialized_context, node_id="yes")
    assert "yes" in str(info.value) and "approve" in str(info.value)


def test_resume_a_completed_context_is_a_clear_error():
    flow = approval_flow()
    done = flow.resume(None, flow.run().serialized_context, action="approve")
    with pytest.raises(ValueError):
        flow.resume(None, done.serialized_context, action="approve")


def test_wait_inside_loop_awaits_each_lap():
    def inc(ctx):
        i = ctx.context.get("i", 0) + 1
        ctx.context.set("i", i)
        return i

    flow = (
        create_flow("wl")
        .node("body", inc)
        .wait("ok")
        .edge("body", "ok")
        .loop("lp", start_node_id="body", end_node_id="ok", condition="i < 3")
        .node("after", lambda ctx: ctx.input)
        .edge("lp", "after")
    )
    result = flow.run()
    statuses = [result.status]
    for lap in range(5):
        if result.status != "awaiting":
            break
        result = flow.resume(None, result.serialized_context, output=f"lap{lap}")
        statuses.append(result.status)
    assert statuses == ["awaiting", "awaiting", "awaiting", "completed"]
    assert result.context["i"] == 3
    assert result.context["after"] == "lap2"


# --- durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [(5, 5.0), (0.5, 0.5), (0, 0.0), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0), ("45", 45.0)],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("bad", ["soon", "5x", "-5s", -1, "", None])
def test_parse_duration_rejects_bad_values(bad):
    with pytest.raises((ValueError, TypeError)):
        parse_duration(bad)


# --- sleep ----------------------------------------------------------------------------------------


def sleep_flow(duration, flow_id="sl"):
    return (
        create_flow(flow_id)
        .node("a", lambda ctx: "A")
        .sleep("nap", duration=duration)
        .node("b", lambda ctx: {"b_input": ctx.input})
        .edge("a", "nap")
        .edge("nap", "b")
    )


@pytest.mark.parametrize("duration, seconds", [("5m", 300), (120, 120), ("2h", 7200), ("1d", 86400)])
def test_sleep_in_memory_awaits_with_wake_at(duration, seconds):
    before = dt.datetime.now(dt.timezone.utc)
    result = sleep_flow(duration).run()
    after = dt.datetime.now(dt.timezone.utc)
    assert result.status == "awaiting"
    assert result.awaiting == ["nap"]
    details = result.context["_awaitingDetails"]["nap"]
    wake_at = dt.datetime.fromisoformat(details["wake_at"])
    assert wake_at.tzinfo is not None and wake_at.utcoffset() == dt.timedelta(0)  # UTC
    assert before + dt.timedelta(seconds=seconds) <= wake_at <= after + dt.timedelta(seconds=seconds)
    assert "b" not in result.context


def test_sleep_resumed_before_wake_up_keeps_awaiting():
    flow = sleep_flow("5m")
    paused = flow.run()
    again = flow.resume(None, paused.serialized_context)
    assert again.status == "awaiting"
    assert again.awaiting == ["nap"]
    assert again.context["_awaitingDetails"]["nap"]["wake_at"] == paused.context["_awaitingDetails"]["nap"]["wake_at"]
    assert "b" not in again.context


def test_short_sleep_resumed_after_wake_up_completes():
    flow = sleep_flow(0.05)
    paused = flow.run()
    assert paused.status == "awaiting"
    time.sleep(0.1)
    done = flow.resume(None, paused.serialized_context)
    assert done.status == "completed", done.errors
    assert "b" in done.context
    assert done.awaiting == []
    assert "_awaitingDetails" not in done.context


def test_early_resume_then_later_resume_completes():
    flow = sleep_flow(0.05)
    paused = flow.run()
    early = flow.resume(None, paused.serialized_context)
    assert early.status == "awaiting"
    time.sleep(0.1)
    done = flow.resume(None, early.serialized_context)
    assert done.status == "completed"
    assert "b" in done.context


def test_sleep_with_wait_timers_completes_inline():
    result = sleep_flow(0.05).run(wait_timers=True)
    assert result.status == "completed", result.errors
    assert result.awaiting == []
    assert "_awaitingDetails" not in result.context
    assert "b" in result.context


def test_cancel_during_inline_sleep():
    token = CancelToken()

    class CancelWhenNapStarts:
        def emit(self, event):
            if event.type == "node:start" and event.payload["node_id"] == "nap":
                threading.Thread(target=token.cancel).start()

    flow = sleep_flow("3s", "cancel-nap")  # short: a regression can only slow the test, not hang it
    result = flow.run(FlowRuntime(event_bus=CancelWhenNapStarts()), wait_timers=True, cancel=token)
    assert result.status == "cancelled"
    assert "b" not in result.context


def test_sleep_wire_form_number_is_milliseconds():
    bp = {
        "id": "raw-sleep",
        "nodes": [{"id": "nap", "uses": "sleep", "params": {"duration": 60000}}],
        "edges": [],
    }
    before = dt.datetime.now(dt.timezone.utc)
    result = FlowRuntime().run(bp)
    assert result.status == "awaiting"
    wake_at = dt.datetime.fromisoformat(result.context["_awaitingDetails"]["nap"]["wake_at"])
    assert before + dt.timedelta(seconds=59) <= wake_at <= before + dt.timedelta(seconds=120)


def test_sleep_successor_input_same_inline_and_resumed():
    # SPEC is silent on a sleep's output; a user expects the same blueprint to hand its successor the
    # same input whether the timer was waited inline or durably (awaiting + resume).
    flow = sleep_flow(0.01, "consistent")
    inline = flow.run(wait_timers=True)
    paused = flow.run()
    time.sleep(0.05)
    resumed = flow.resume(None, paused.serialized_context)
    assert inline.status == resumed.status == "completed"
    assert inline.context["b"] == resumed.context["b"]
    assert inline.context["nap"] == resumed.context["nap"]


# --- raw JSON ---------------------------------------------------------------------------------------


RAW_APPROVAL = {
    "id": "raw-approval",
    "nodes": [
        {"id": "ask", "uses": "ask"},
        {"id": "gate", "uses": "wait", "params": {"reason": "manager sign-off"}},
        {"id": "yes", "uses": "mark"},
        {"id": "no", "uses": "mark"},
    ],
    "edges": [
        {"source": "ask", "target": "gate"},
        {"source": "gate", "target": "yes", "action": "approve"},
        {"source": "gate", "target": "no", "action": "reject"},
    ],
}
RAW_REGISTRY = {"ask": lambda ctx: {"amount": 10}, "mark": lambda ctx: {"decided": ctx.input}}


@pytest.mark.parametrize("action, taken, skipped", [("approve", "yes", "no"), ("reject", "no", "yes")])
def test_raw_json_wait_pauses_and_resumes_by_action(action, taken, skipped):
    runtime = FlowRuntime(registry=RAW_REGISTRY)
    paused = runtime.run(RAW_APPROVAL)
    assert paused.status == "awaiting" and paused.awaiting == ["gate"]
    details = paused.context["_awaitingDetails"]["gate"]
    assert details == {"type": "wait", "reason": "manager sign-off", "iteration": 0}
    assert paused.context["_inputs.gate"] == {"amount": 10}
    done = runtime.resume(RAW_APPROVAL, paused.serialized_context, output={"by": "ann"}, action=action)
    assert done.status == "completed", done.errors
    assert done.context["gate"] == {"by": "ann"}
    assert done.context[taken] == {"decided": {"by": "ann"}}
    assert done.skipped == [skipped] and skipped not in done.context
    assert "_awaitingNodeIds" not in done.context


def test_raw_json_wait_runs_the_same_distributed():
    from flowcraft.testing import InMemoryAdapter

    expected_paused = FlowRuntime(registry=RAW_REGISTRY).run(RAW_APPROVAL, run_id="raw")
    expected = FlowRuntime(registry=RAW_REGISTRY).resume(RAW_APPROVAL, expected_paused.serialized_context,
                                                         output=1, action="approve")
    adapter = InMemoryAdapter(FlowRuntime(registry=RAW_REGISTRY, blueprints=[RAW_APPROVAL]))
    adapter.start_workflow("raw-approval", run_id="raw")
    adapter.drain()
    assert adapter.wait_for_result("raw", timeout=5).context == expected_paused.context
    assert adapter.resume_with_action("raw", "approve", output=1) == {"yes"}
    adapter.drain()
    result = adapter.wait_for_result("raw", timeout=5)
    assert (result.status, result.context, result.skipped) == (expected.status, expected.context, expected.skipped)
