"""Cancellation, the event bus, and middleware (SPEC §5 "Cancellation", §6 observability/middleware)."""
from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, List

import pytest

import flowcraft
from flowcraft import (
    BaseNode,
    CallbackEventBus,
    CancelledError,
    CancelToken,
    FlowRuntime,
    LoggingMiddleware,
    NodeResult,
    create_flow,
)
from flowcraft.testing import InMemoryEventLogger

SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


# --- cancellation ---------------------------------------------------------------------------------


def test_cancel_from_another_thread_while_node_polls_token():
    token = CancelToken()
    started = threading.Event()
    ran: List[str] = []
    log = InMemoryEventLogger()

    def slow(ctx):
        ran.append("slow")
        started.set()
        deadline = time.monotonic() + 10
        while not ctx.cancel.cancelled:
            if time.monotonic() > deadline:
                return "never cancelled"
            time.sleep(0.005)
        return "stopped early"

    def later(ctx):
        ran.append("later")

    canceller = threading.Thread(target=lambda: started.wait(10) and token.cancel("user asked"))
    canceller.start()
    flow = create_flow("c").node("slow", slow).node("later", later).edge("slow", "later")
    result = flow.run(FlowRuntime(event_bus=log), cancel=token)
    canceller.join(10)
    assert result.status == "cancelled"
    assert ran == ["slow"]
    assert "later" not in result.context
    assert not [e for e in log.of_type("node:start") if e.payload["node_id"] == "later"]
    assert log.of_type("workflow:finish")[-1].payload["status"] == "cancelled"
    assert token.cancelled
    assert token.reason == "user asked"


def test_cancel_from_another_thread_with_a_pool():
    token = CancelToken()
    started = threading.Event()
    ran: List[str] = []

    def slow(ctx):
        ran.append(ctx.node_id)
        started.set()
        deadline = time.monotonic() + 10
        while not ctx.cancel.cancelled and time.monotonic() < deadline:
            time.sleep(0.005)
        return "stopped"

    canceller = threading.Thread(target=lambda: started.wait(10) and token.cancel())
    canceller.start()
    flow = create_flow("cp").node("slow", slow).node("later", lambda ctx: ran.append("later")).edge("slow", "later")
    result = flow.run(cancel=token, concurrency=3)
    canceller.join(10)
    assert result.status == "cancelled"
    assert ran == ["slow"]


def test_cancelled_before_run_runs_nothing():
    token = CancelToken()
    token.cancel()
    ran: List[str] = []
    log = InMemoryEventLogger()
    flow = create_flow("pre").node("a", lambda ctx: ran.append("a")).node("b", lambda ctx: ran.append("b")).edge("a", "b")
    result = flow.run(FlowRuntime(event_bus=log), initial_context={"k": 1}, cancel=token)
    assert result.status == "cancelled"
    assert ran == []
    assert result.context == {"k": 1}
    assert log.of_type("node:start") == []


def test_raise_if_cancelled_unit():
    token = CancelToken()
    assert token.cancelled is False
    token.raise_if_cancelled()  # no-op while not cancelled
    token.cancel("shutting down")
    assert token.cancelled is True
    with pytest.raises(CancelledError, match="shutting down"):
        token.raise_if_cancelled()
    assert issubclass(CancelledError, flowcraft.FlowcraftError)


def test_node_calling_raise_if_cancelled_gives_cancelled_not_failed():
    token = CancelToken()
    started = threading.Event()
    ran: List[str] = []

    def worker(ctx):
        ran.append("worker")
        started.set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ctx.cancel.raise_if_cancelled()
            time.sleep(0.005)
        return "timed out"

    canceller = threading.Thread(target=lambda: started.wait(10) and token.cancel())
    canceller.start()
    flow = create_flow("r").node("worker", worker).node("next", lambda ctx: ran.append("next")).edge("worker", "next")
    result = flow.run(cancel=token)
    canceller.join(10)
    assert result.status == "cancelled"
    assert ran == ["worker"]
    assert all(e.type == "CancelledError" for e in result.errors)


def test_cancel_token_is_the_one_given_to_nodes():
    token = CancelToken()
    seen: List[Any] = []
    flow = create_flow("tok").node("a", lambda ctx: seen.append(ctx.cancel.cancelled) or token.cancel()).node(
        "b", lambda ctx: seen.append("b")).edge("a", "b")
    result = flow.run(cancel=token)
    assert result.status == "cancelled"
    assert seen == [False]


# --- events ---------------------------------------------------------------------------------------


def _payloads(log, kind, **match):
    return [e.payload for e in log.of_type(kind) if all(e.payload.get(k) == v for k, v in match.items())]


def test_run_emits_core_events_with_snake_case_payloads():
    log = InMemoryEventLogger()
    flow = create_flow("ev").node("a", lambda ctx: "A").node("b", lambda ctx: ctx.input + "B").edge("a", "b")
    result = flow.run(FlowRuntime(event_bus=log), initial_context={"seed": 1})
    assert result.status == "completed"
    types = log.types()
    assert types[0] == "workflow:start"
    assert types[-1] == "workflow:finish"
    for kind in ("node:start", "node:finish", "edge:evaluate"):
        assert kind in types
    for event in log.events:
        assert event.payload["run_id"] == result.run_id
        assert event.payload["blueprint_id"] == "ev"
        for key in event.payload:
            assert SNAKE.match(key), f"{event.type} payload key {key!r} is not snake_case"
    assert log.of_type("workflow:start")[0].payload["initial_context"] == {"seed": 1}
    assert [p["node_id"] for p in _payloads(log, "node:start")] == ["a", "b"]
    assert [p["node_id"] for p in _payloads(log, "node:finish")] == ["a", "b"]
    assert _payloads(log, "node:finish", node_id="b")[0]["output"] == "AB"
    assert _payloads(log, "edge:evaluate") [0]["source"] == "a"
    assert _payloads(log, "edge:evaluate")[0]["target"] == "b"
    assert _payloads(log, "edge:evaluate")[0]["taken"] is True
    assert log.of_type("workflow:finish")[0].payload["status"] == "completed"
    # ordering within a node: start before finish
    assert types.index("node:start") < types.index("node:finish")


def test_node_skipped_event_for_dead_branch():
    log = InMemoryEventLogger()
    flow = (
        create_flow("skip")
        .node("a", lambda ctx: 1)
        .node("b", lambda ctx: "b")
        .node("c", lambda ctx: "c")
        .node("after_c", lambda ctx: "after c")
        .edge("a", "b", condition="result.output > 0")
        .edge("a", "c", condition="result.output < 0")
        .edge("c", "after_c")
    )
    result = flow.run(FlowRuntime(event_bus=log))
    assert result.status == "completed"
    assert sorted(result.skipped) == ["after_c", "c"]
    assert sorted(p["node_id"] for p in _payloads(log, "node:skipped")) == ["after_c", "c"]
    assert _payloads(log, "edge:evaluate", target="c")[0]["taken"] is False


def test_node_retry_events():
    log = InMemoryEventLogger()
    attempts = {"n": 0}

    def flaky(ctx):
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise ValueError(f"flaky {attempts['n']}")
        return "ok"

    result = create_flow("retry").node("f", flaky, max_retries=3).run(FlowRuntime(event_bus=log))
    assert result.status == "completed"
    retries = _payloads(log, "node:retry", node_id="f")
    assert [p["attempt"] for p in retries] == [1, 2]
    assert retries[0]["error"] == "flaky 1"
    assert len(_payloads(log, "node:finish", node_id="f")) == 1


def test_node_fallback_event_for_class_fallback():
    class Fragile(BaseNode):
        def exec(self, prep_result, ctx):
            raise ValueError("nope")

        def fallback(self, error, ctx):
            return "class-fallback"

    log = InMemoryEventLogger()
    result = create_flow("fb-class").node("k", Fragile).run(FlowRuntime(event_bus=log))
    assert result.status == "completed"
    assert result.context["k"] == "class-fallback"
    fallbacks = _payloads(log, "node:fallback", node_id="k")
    assert len(fallbacks) == 1
    assert fallbacks[0]["error"] == "nope"


def test_node_fallback_event_for_fallback_node():
    def broken(ctx):
        raise RuntimeError("primary down")

    log = InMemoryEventLogger()
    flow = (
        create_flow("fb-node")
        .node("x", broken, fallback="fb")
        .node("fb", lambda ctx: "from fallback")
        .node("after", lambda ctx: {"got": ctx.input})
        .edge("x", "after")
    )
    result = flow.run(FlowRuntime(event_bus=log))
    fallbacks = _payloads(log, "node:fallback", node_id="x")
    assert len(fallbacks) == 1
    assert fallbacks[0]["fallback"] == "fb"
    # SPEC §5: the fallback runs in the failed node's place and x's outgoing edges follow its result
    assert result.status == "completed", result.errors
    assert result.context["after"] == {"got": "from fallback"}


def test_node_error_event():
    def bad(ctx):
        raise RuntimeError("bad thing")

    log = InMemoryEventLogger()
    result = create_flow("err").node("x", bad).run(FlowRuntime(event_bus=log))
    assert result.status == "failed"
    errors = _payloads(log, "node:error", node_id="x")
    assert len(errors) == 1
    assert errors[0]["error"] == "bad thing"
    assert errors[0]["type"] == "RuntimeError"
    finish = log.of_type("workflow:finish")[0].payload
    assert finish["status"] == "failed"
    assert [{k: v for k, v in e.items() if k != "traceback"} for e in finish["errors"]] == [
        {"node_id": "x", "message": "bad thing", "type": "RuntimeError"}]
    assert "raise RuntimeError" in finish["errors"][0]["traceback"]


def test_context_change_event_on_set_and_delete():
    def writer(ctx):
        ctx.context.set("greeting", {"text": "hi"})
        ctx.context.delete("temp")
        return None

    log = InMemoryEventLogger()
    result = create_flow("cc").node("w", writer).run(FlowRuntime(event_bus=log), {"temp": 1})
    assert result.status == "completed"
    changes = log.of_type("context:change")
    sets = [e.payload for e in changes if e.payload.get("op") == "set"]
    deletes = [e.payload for e in changes if e.payload.get("op") == "delete"]
    assert {"key": "greeting", "value": {"text": "hi"}} == {k: sets[0][k] for k in ("key", "value")}
    assert deletes[0]["key"] == "temp"
    assert "temp" not in result.context


def test_batch_events_start_and_finish():
    log = InMemoryEventLogger()
    flow = create_flow("bt").batch("bt", lambda ctx: ctx.input, input_key="items", output_key="out")
    flow.run(FlowRuntime(event_bus=log), {"items": [1, 2]})
    assert len(log.of_type("batch:start")) == 1
    assert len(log.of_type("batch:finish")) == 1
    assert log.of_type("batch:start")[0].payload["items"] == 2


def test_pause_and_resume_events():
    log = InMemoryEventLogger()
    runtime = FlowRuntime(event_bus=log)
    flow = create_flow("pr").wait("w").node("n", lambda ctx: ctx.input).edge("w", "n")
    paused = flow.run(runtime)
    pause = _payloads(log, "workflow:pause", node_id="w")
    assert len(pause) == 1
    assert log.of_type("workflow:finish")[-1].payload["status"] == "awaiting"
    log.clear()
    done = flow.resume(runtime, paused.serialized_context, output=3)
    assert done.status == "completed"
    assert log.types()[0] == "workflow:resume"
    assert log.of_type("workflow:resume")[0].payload["node_id"] == "w"
    assert log.of_type("workflow:resume")[0].payload["run_id"] == paused.run_id
    assert _payloads(log, "node:finish", node_id="w")[0]["output"] == 3
    assert log.of_type("workflow:finish")[-1].payload["status"] == "completed"


def test_stall_event():
    # x and y only feed each other: no start reaches them, so the run has unfinished work it can't do
    blueprint = {
        "id": "stall",
        "nodes": [{"id": "a", "uses": "n"}, {"id": "x", "uses": "n"}, {"id": "y", "uses": "n"}],
        "edges": [{"source": "x", "target": "y"}, {"source": "y", "target": "x"}],
    }
    log = InMemoryEventLogger()
    result = FlowRuntime(event_bus=log, registry={"n": lambda ctx: 1}).run(blueprint)
    assert result.status == "stalled"
    assert sorted(result.stalled) == ["x", "y"]
    stall = log.of_type("workflow:stall")
    assert len(stall) == 1
    assert sorted(stall[0].payload["stalled"]) == ["x", "y"]
    assert log.of_type("workflow:finish")[-1].payload["status"] == "stalled"


def test_raising_subscriber_in_callback_bus_does_not_break_run(caplog):
    seen: List[str] = []

    def broken(event):
        raise RuntimeError("observer broke")

    bus = CallbackEventBus(broken, lambda e: seen.append(e.type))
    flow = create_flow("cb").node("a", lambda ctx: 1).node("b", lambda ctx: ctx.input + 1).edge("a", "b")
    with caplog.at_level(logging.ERROR, logger="flowcraft"):
        result = flow.run(FlowRuntime(event_bus=bus))
    assert result.status == "completed"
    assert result.context["b"] == 2
    assert seen[0] == "workflow:start" and seen[-1] == "workflow:finish"
    assert seen.count("node:finish") == 2
    assert any("observer broke" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_callback_bus_subscribe():
    seen: List[str] = []
    bus = CallbackEventBus()
    bus.subscribe(lambda e: seen.append(e.type))
    create_flow("sub").node("a", lambda ctx: 1).run(FlowRuntime(event_bus=bus))
    assert seen == ["workflow:start", "node:start", "node:finish", "workflow:finish"]


# --- middleware -----------------------------------------------------------------------------------


class Recorder:
    def __init__(self, name: str, calls: List[str]) -> None:
        self.name = name
        self.calls = calls

    def before(self, ctx):
        self.calls.append(f"{self.name}.before:{ctx.node_id}")

    def around(self, ctx, call_next):
        self.calls.append(f"{self.name}.in:{ctx.node_id}")
        result = call_next()
        self.calls.append(f"{self.name}.out:{ctx.node_id}")
        return result

    def after(self, ctx, result):
        self.calls.append(f"{self.name}.after:{ctx.node_id}")


def test_middleware_order_first_is_outermost():
    calls: List[str] = []
    flow = create_flow("mw").node("a", lambda ctx: calls.append("node:a") or "A")
    result = flow.run(FlowRuntime(middleware=[Recorder("m1", calls), Recorder("m2", calls)]))
    assert result.status == "completed"
    assert calls == [
        "m1.before:a", "m1.in:a",
        "m2.before:a", "m2.in:a",
        "node:a",
        "m2.out:a", "m2.after:a",
        "m1.out:a", "m1.after:a",
    ]


def test_middleware_runs_for_every_node():
    calls: List[str] = []
    flow = create_flow("mw2").node("a", lambda ctx: 1).node("b", lambda ctx: 2).edge("a", "b")
    flow.run(FlowRuntime(middleware=[Recorder("m", calls)]))
    assert [c for c in calls if c.startswith("m.in")] == ["m.in:a", "m.in:b"]


def test_after_replacing_result_changes_stored_output():
    class Shout:
        def after(self, ctx, result):
            return NodeResult(output=f"{result.output}!")

    flow = create_flow("shout").node("a", lambda ctx: "A").node("b", lambda ctx: ctx.input).edge("a", "b")
    result = flow.run(FlowRuntime(middleware=[Shout()]))
    assert result.status == "completed"
    assert result.context["a"] == "A!"
    assert result.context["_outputs.a"] == "A!"
    assert result.context["_inputs.b"] == "A!"  # successors see the replaced output
    assert result.context["b"] == "A!!"


def test_after_returning_none_keeps_result():
    class Observe:
        def after(self, ctx, result):
            return None

    result = create_flow("keep").node("a", lambda ctx: "A").run(FlowRuntime(middleware=[Observe()]))
    assert result.context["a"] == "A"


def test_around_can_replace_result_and_action():
    class Router:
        def around(self, ctx, call_next):
            result = call_next()
            if ctx.node_id == "a":
                return NodeResult(output=result.output, action="right")
            return result

    flow = (
        create_flow("route")
        .node("a", lambda ctx: "A")
        .node("left", lambda ctx: "L")
        .node("right", lambda ctx: "R")
        .edge("a", "left", action="left")
        .edge("a", "right", action="right")
    )
    result = flow.run(FlowRuntime(middleware=[Router()]))
    assert result.context["right"] == "R"
    assert "left" in result.skipped


class Transaction:
    """Begin before each node, commit when it returns, roll back when it raises."""

    def __init__(self) -> None:
        self.log: List[tuple] = []

    def around(self, ctx, call_next):
        self.log.append(("begin", ctx.node_id))
        try:
            result = call_next()
        except Exception:
            self.log.append(("rollback", ctx.node_id))
            raise
        self.log.append(("commit", ctx.node_id))
        return result


def test_transaction_middleware_success():
    tx = Transaction()
    flow = create_flow("tx-ok").node("a", lambda ctx: 1).node("b", lambda ctx: 2).edge("a", "b")
    result = flow.run(FlowRuntime(middleware=[tx]))
    assert result.status == "completed"
    assert tx.log == [("begin", "a"), ("commit", "a"), ("begin", "b"), ("commit", "b")]


def test_transaction_middleware_failure_rolls_back():
    tx = Transaction()

    def bad(ctx):
        raise ValueError("constraint violated")

    flow = (
        create_flow("tx-bad")
        .node("a", lambda ctx: 1)
        .node("b", bad)
        .node("c", lambda ctx: 3)
        .edge("a", "b")
        .edge("b", "c")
    )
    result = flow.run(FlowRuntime(middleware=[tx]))
    assert result.status == "failed"
    assert result.errors[0].node_id == "b"
    assert result.errors[0].message == "constraint violated"
    assert tx.log == [("begin", "a"), ("commit", "a"), ("begin", "b"), ("rollback", "b")]
    assert "c" not in result.context


def test_around_sees_the_nodes_own_exception():
    # SPEC is silent; a Python user writing `except IntegrityError: rollback()` in a middleware
    # expects call_next() to raise the node's own exception, not an internal wrapper type.
    seen: List[BaseException] = []

    class Catch:
        def around(self, ctx, call_next):
            try:
                return call_next()
            except Exception as error:
                seen.append(error)
                raise

    def bad(ctx):
        raise KeyError("row 7")

    result = create_flow("own-exc").node("b", bad).run(FlowRuntime(middleware=[Catch()]))
    assert result.status == "failed"
    assert result.errors[0].type == "KeyError"
    assert len(seen) == 1
    assert isinstance(seen[0], KeyError), f"middleware saw {type(seen[0]).__module__}.{type(seen[0]).__name__}"


def test_logging_middleware_logs_to_flowcraft_nodes(caplog):
    def bad(ctx):
        raise ValueError("kaput")

    caplog.set_level(logging.INFO, logger="flowcraft.nodes")
    flow = create_flow("lm").node("alpha", lambda ctx: 1).node("beta", bad).edge("alpha", "beta")
    result = flow.run(FlowRuntime(middleware=[LoggingMiddleware()]))
    assert result.status == "failed"
    records = [r for r in caplog.records if r.name == "flowcraft.nodes"]
    messages = [r.getMessage() for r in records]
    assert any("alpha" in m and "start" in m for m in messages)
    assert any("alpha" in m and "finish" in m for m in messages)
    assert any("beta" in m and "fail" in m and "kaput" in m for m in messages)
    assert all(r.levelno == logging.INFO for r in records)
