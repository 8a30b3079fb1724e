"""A resume whose action no edge of the waiting node names is refused, the run unchanged (SPEC 11).

Issue 17 item 1: `resume --action aprove` used to complete the run with everything downstream
skipped. Each case makes that mistake as a user would, in memory (`runtime.resume`) and on the
fakes (`InMemoryAdapter.resume_with_action`), and checks the one-line `ValueError` naming the
actions that work, that nothing changed, and that the right action still resumes the run.
"""
from __future__ import annotations

import json
from typing import Any, Dict

import attrs
import pytest

from flowcraft import FlowRuntime, create_flow
from flowcraft.testing import InMemoryAdapter


def approval():
    """submit -> decide (wait) --approve--> pay, --reject--> refuse; no edge without an action."""
    return (
        create_flow("approval")
        .node("submit", lambda ctx: {"amount": 10})
        .wait("decide")
        .node("pay", lambda ctx: {"paid": ctx.input})
        .node("refuse", lambda ctx: {"refused": ctx.input})
        .edge("submit", "decide")
        .edge("decide", "pay", action="approve")
        .edge("decide", "refuse", action="reject")
    )


def with_default():
    """decide --approve--> pay, and an edge without an action to `log`."""
    return (
        create_flow("defaulted")
        .wait("decide")
        .node("pay", lambda ctx: "paid")
        .node("log", lambda ctx: "logged")
        .edge("decide", "pay", action="approve")
        .edge("decide", "log")
    )


def plain():
    """decide --> next: no edge names an action, so any action is accepted (only recorded)."""
    return create_flow("plain").wait("decide").node("next", lambda ctx: ctx.input).edge("decide", "next")


def gated():
    """parent: p0 -> sub (child: gate (wait) --go--> c2, --stop--> c3) -> p2."""
    child = (create_flow("gate-child").wait("gate").node("c2", lambda ctx: "went").node("c3", lambda ctx: "stopped")
             .edge("gate", "c2", action="go").edge("gate", "c3", action="stop"))
    parent = (create_flow("gate-parent").node("p0", lambda ctx: 0).subflow("sub", "gate-child")
              .node("p2", lambda ctx: "after").edge("p0", "sub").edge("sub", "p2"))
    return parent, child


def runtime_of(*flows) -> FlowRuntime:
    runtime = FlowRuntime()
    for flow in flows:
        runtime.add_blueprint(flow)
    return runtime


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- in memory ----------------------------------------------------------------------------------


def test_a_misspelt_action_is_refused_in_memory_and_the_paused_run_still_resumes():
    runtime = runtime_of(approval())
    paused = runtime.run("approval")
    saved = paused.serialized_context
    with pytest.raises(ValueError) as error:
        runtime.resume("approval", saved, action="aprove")
    message = one_line(error)
    assert "node 'decide' has no outgoing edge with action 'aprove'" in message
    assert "'approve', 'reject'" in message
    assert paused.serialized_context == saved  # nothing consumed: the same context resumes
    done = runtime.resume("approval", saved, action="approve", output="ok")
    assert (done.status, done.context["pay"], done.skipped) == ("completed", {"paid": "ok"}, ["refuse"])


def test_no_action_is_refused_when_every_edge_names_one():
    runtime = runtime_of(approval())
    paused = runtime.run("approval")
    with pytest.raises(ValueError) as error:
        runtime.resume("approval", paused.serialized_context, output="ok")
    assert "node 'decide' needs an action to resume" in one_line(error)
    assert "'approve', 'reject'" in one_line(error)


def test_no_action_takes_the_edges_without_one_and_a_wrong_action_says_so():
    runtime = runtime_of(with_default())
    paused = runtime.run("defaulted")
    with pytest.raises(ValueError) as error:
        runtime.resume("defaulted", paused.serialized_context, action="aprove")
    assert "give one of 'approve' (or no action, for its edges without one)" in one_line(error)
    done = runtime.resume("defaulted", paused.serialized_context)
    assert (done.status, done.context.get("log"), done.skipped) == ("completed", "logged", ["pay"])
    done = runtime.resume("defaulted", paused.serialized_context, action="approve")
    assert (done.status, done.context.get("pay"), done.skipped) == ("completed", "paid", ["log"])


def test_any_action_is_accepted_when_no_edge_names_one():
    runtime = runtime_of(plain())
    paused = runtime.run("plain")
    done = runtime.resume("plain", paused.serialized_context, action="whatever", output=5)
    assert (done.status, done.context["next"]) == ("completed", 5)


def test_a_misspelt_action_for_an_awaiting_subflow_is_refused_before_the_child_resumes():
    parent, child = gated()
    runtime = runtime_of(parent, child)
    paused = runtime.run("gate-parent")
    assert paused.awaiting == ["sub"]
    with pytest.raises(ValueError) as error:
        runtime.resume("gate-parent", paused.serialized_context, action="og")
    assert "node 'gate' has no outgoing edge with action 'og': give one of 'go', 'stop'" in one_line(error)
    done = runtime.resume("gate-parent", paused.serialized_context, action="go")
    assert (done.status, done.context["p2"]) == ("completed", "after")


def test_an_ambiguous_or_unknown_node_says_what_to_pass():
    flow = (create_flow("two").wait("w1").wait("w2").node("j", lambda ctx: 1)
            .edge("w1", "j", action="ok").edge("w2", "j", action="ok"))
    runtime = runtime_of(flow)
    paused = runtime.run("two")
    with pytest.raises(ValueError) as error:
        runtime.resume("two", paused.serialized_context, action="ok")
    assert "2 nodes await ['w1', 'w2']: say which with node_id= (flowcraft resume --node ID)" in one_line(error)
    with pytest.raises(ValueError) as error:
        runtime.resume("two", paused.serialized_context, action="ok", node_id="w3")
    assert "node 'w3' is not awaiting: give one of ['w1', 'w2'] as node_id=" in one_line(error)


# --- distributed, on the fakes ------------------------------------------------------------------


def stored(adapter: Any, run_id: str) -> Dict[str, Any]:
    """Everything the store and queue hold of a run."""
    record = adapter.store.get_record(run_id)
    return {"record": json.dumps(attrs.asdict(record), sort_keys=True), "states": adapter.store.read_all_states(run_id),
            "context": adapter.store.read_all_context(run_id), "queued": adapter.queue.pending}


def paused_on_fakes(*flows) -> Any:
    adapter = InMemoryAdapter(runtime_of(*flows))
    run_id = adapter.start_workflow(flows[0].id)
    adapter.drain()
    assert adapter.get_status(run_id).status == "awaiting"
    return adapter, run_id


@pytest.mark.parametrize("action, expected", [
    ("aprove", "node 'decide' has no outgoing edge with action 'aprove': give one of 'approve', 'reject'"),
    (None, "node 'decide' needs an action to resume: every edge out of it names one; give one of 'approve', 'reject'"),
])
def test_a_misspelt_or_missing_action_is_refused_on_the_fakes(action, expected):
    adapter, run_id = paused_on_fakes(approval())
    before = stored(adapter, run_id)
    with pytest.raises(ValueError) as error:
        adapter.resume_with_action(run_id, action, output="ok")
    assert one_line(error) == f"run {run_id}: {expected}"
    assert stored(adapter, run_id) == before
    assert adapter.resume_with_action(run_id, "approve", output="ok") == {"pay"}
    adapter.drain()
    result = adapter.wait_for_result(run_id, timeout=5)
    assert (result.status, result.context["pay"], result.skipped) == ("completed", {"paid": "ok"}, ["refuse"])


def test_an_awaiting_subflow_refuses_a_misspelt_action_on_the_fakes():
    parent, child = gated()
    adapter, run_id = paused_on_fakes(parent, child)
    child_run = adapter.store.get_record(run_id).awaiting["sub"]["childRunId"]
    before = (stored(adapter, run_id), stored(adapter, child_run))
    with pytest.raises(ValueError) as error:
        adapter.resume_with_action(run_id, "og")
    assert one_line(error) == f"run {child_run}: node 'gate' has no outgoing edge with action 'og': give one of 'go', 'stop'"
    assert (stored(adapter, run_id), stored(adapter, child_run)) == before
    assert adapter.resume_with_action(run_id, "stop") == {"c3"}
    adapter.drain()
    assert adapter.wait_for_result(run_id, timeout=5).status == "completed"


def test_an_ambiguous_node_on_the_fakes_says_what_to_pass():
    flow = (create_flow("two").wait("w1").wait("w2").node("j", lambda ctx: 1)
            .edge("w1", "j").edge("w2", "j"))
    adapter, run_id = paused_on_fakes(flow)
    with pytest.raises(ValueError) as error:
        adapter.resume_with_action(run_id, None)
    assert one_line(error) == (f"run {run_id}: 2 nodes await ['w1', 'w2']: say which with node_id= "
                               f"(flowcraft resume --node ID)")
    with pytest.raises(ValueError) as error:
        adapter.resume_with_action(run_id, None, node_id="j")
    assert "node 'j' is not awaiting: give one of ['w1', 'w2']" in one_line(error)
