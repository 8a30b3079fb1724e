"""Every `uses` is checked against the registry before anything runs (issue 17 item 3).

A blueprint with a `uses` nobody registered used to run its earlier nodes (side effects included)
and only then fail. Now `FlowRuntime.run` and `start_workflow` refuse it at once with one
`UnknownNodeError` line naming every missing key: of its nodes (fallback nodes included), of its
batches' workers, and of the subflow blueprints it runs, transitively; built-ins are not keys.
"""
from __future__ import annotations

from typing import List

import pytest

from flowcraft import FlowRuntime, UnknownNodeError, create_flow
from flowcraft.testing import InMemoryAdapter


def flows(ran: List[str]):
    """parent: first -> each (batch of 'missing-worker') -> sub (child -> grandchild) -> guarded (fallback 'safety')."""
    grandchild = create_flow("grandchild").node("deep", "missing-deep").wait("pause").edge("deep", "pause")
    child = create_flow("child").node("c1", lambda ctx: 1).subflow("again", "grandchild").edge("c1", "again")
    parent = (
        create_flow("parent")
        .node("first", lambda ctx: ran.append("first") or [1, 2])
        .batch("each", "missing-worker", input_key="first")
        .subflow("sub", "child")
        .node("guarded", lambda ctx: 1, fallback="safety")
        .node("safety", "missing-fallback")
        .edge("first", "each").edge("each", "sub").edge("sub", "guarded")
    )
    return parent, child, grandchild


EXPECTED = ("blueprint 'parent' cannot run, nothing was started: not in the registry: "
            "'missing-worker' (the workers of batch node 'each_scatter'), 'missing-fallback' (node 'safety'), "
            "'missing-deep' (node 'deep' of subflow blueprint 'grandchild')")


def runtime_of(*all_flows) -> FlowRuntime:
    runtime = FlowRuntime()
    for flow in all_flows:
        runtime.add_blueprint(flow)
    return runtime


def test_run_refuses_every_unknown_uses_at_once_and_runs_nothing():
    ran: List[str] = []
    runtime = runtime_of(*flows(ran))
    with pytest.raises(UnknownNodeError) as error:
        runtime.run("parent")
    assert str(error.value) == EXPECTED
    assert ran == []


def test_start_workflow_refuses_it_on_the_fakes_and_stores_nothing():
    ran: List[str] = []
    adapter = InMemoryAdapter(runtime_of(*flows(ran)))
    with pytest.raises(UnknownNodeError) as error:
        adapter.start_workflow("parent", run_id="refused")
    assert str(error.value) == EXPECTED
    assert (adapter.store.get_record("refused"), adapter.queue.pending, ran) == (None, 0, [])


def test_once_registered_the_same_blueprint_runs():
    ran: List[str] = []
    runtime = runtime_of(*flows(ran))
    runtime.registry.update({"missing-worker": lambda ctx: ctx.input, "missing-fallback": lambda ctx: 0,
                             "missing-deep": lambda ctx: 2})
    result = runtime.run("parent")
    assert (result.status, ran) == ("awaiting", ["first"])  # the grandchild's wait


def test_builtins_are_not_registry_keys_and_a_misspelling_gets_a_suggestion():
    runtime = FlowRuntime()
    flow = (create_flow("ok").node("fetch-order", lambda ctx: 1).wait("w").sleep("s", duration=0)
            .edge("fetch-order", "w").edge("w", "s"))
    runtime.add_blueprint(flow)
    assert runtime.registry_problems(runtime.blueprint("ok")) == []
    runtime.registry["fetch-order"] = lambda ctx: 1
    typo = create_flow("typo").node("a", "fetch-ordr").to_blueprint()
    assert runtime.registry_problems(typo) == [
        "not in the registry: 'fetch-ordr' (node 'a'; did you mean 'fetch-order'?)"]


def test_a_registry_changed_after_a_run_is_checked_again():
    """The check is remembered per blueprint and registry, but only while the keys it needed are
    still there: a key removed after a run is refused by the next run, before anything runs."""
    ran: List[str] = []
    flow = create_flow("checked-again").node("a", lambda ctx: ran.append("a")).node("b", lambda ctx: ran.append("b"))
    flow.edge("a", "b")
    blueprint, registry, runtime = flow.to_blueprint(), dict(flow.registry), FlowRuntime()
    assert runtime.run(blueprint, registry=registry).status == "completed"
    del registry[next(n.uses for n in blueprint.nodes if n.id == "b")]
    ran.clear()
    with pytest.raises(UnknownNodeError, match="node 'b'"):
        runtime.run(blueprint, registry=registry)
    assert ran == []
