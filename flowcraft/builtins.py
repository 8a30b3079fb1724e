"""The built-in node types behind the builder's primitives, usable from raw JSON by their `uses` key.

Built-ins need more than a `NodeContext` (the evaluator, the loop's lap count, the runtime for a
subflow), so each is called as `builtin(ctx, engine)` with an `Engine` the driver provides.
"""
from __future__ import annotations

import datetime as _dt
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Union

from .analysis import analyze_blueprint
from .errors import FlowcraftError, LoopLimitError
from .node import NodeContext, NodeResult

LOOP_CONTROLLER = "loop-controller"
BATCH_SCATTER = "batch-scatter"
BATCH_GATHER = "batch-gather"
WAIT = "wait"
SLEEP = "sleep"
SUBFLOW = "subflow"
WEBHOOK = "webhook"


class SubflowError(FlowcraftError):
    """A subflow's child run failed; the message carries the child's errors."""


class Await:
    """Returned by a built-in to pause its node: the run awaits until the node is resumed.

    `details` go to the run's context (`_awaitingDetails`); `child_context` (an awaiting subflow's
    serialized child run, in memory) is engine state: it is saved with the traversal, not shown."""

    __slots__ = ("details", "child_context")

    def __init__(self, details: Dict[str, Any], child_context: Optional[str] = None) -> None:
        self.details = details
        self.child_context = child_context


class Engine(Protocol):
    """What a driver offers built-ins."""

    evaluator: Any
    graph: Any  # the run's CompiledGraph
    wait_timers: bool

    def laps(self, node_id: str) -> int: ...

    def exit_conditions(self, node_id: str) -> List[Callable[[Mapping[str, Any]], Any]]: ...

    def context_names(self) -> Mapping[str, Any]: ...

    def run_child(self, blueprint_id: str, context: Dict[str, Any], parent_node_id: str, iteration: int = 0) -> Any: ...

    def child_blueprint(self, blueprint_id: str) -> Any: ...  # the runtime's blueprint of that id


def child_run_id(run_id: str, node_id: str, iteration: int) -> str:
    """The run id of the child a subflow node starts: the same in memory and distributed, and
    distinct for each lap of a loop."""
    return f"{run_id}.{node_id}.{iteration}"


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h|d)?\s*$")


def parse_duration(value: Union[int, float, str]) -> float:
    """Seconds from a number of seconds or a string such as "500ms", "30s", "5m", "2h", "1d"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value!r}")
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"bad duration {value!r}: use seconds or a string like '30s', '5m', '2h', '1d'")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def sleep_seconds(params: Mapping[str, Any]) -> float:
    """A sleep node's duration: `params.duration` is milliseconds when a number (the TS wire form)."""
    duration = params.get("duration")
    if duration is None:  # as TS's SleepNode: a duration is required
        raise ValueError("a sleep node needs params.duration (milliseconds, or a string like '30s', '5m')")
    if isinstance(duration, (int, float)) and not isinstance(duration, bool):
        return parse_duration(duration / 1000)
    return parse_duration(duration)


# --- the built-ins --------------------------------------------------------------------------------


def loop_controller(ctx: NodeContext, engine: Engine) -> NodeResult:
    """`continue` while `params.condition` holds (exit edges with a true condition win), else `break`."""
    # The graph evaluates both (one home for conditions: strict_expressions, warnings, routing).
    names = engine.context_names()
    if engine.graph.loop_exits(ctx.node_id, names, ctx.input):
        return NodeResult(output=ctx.input, action="break")
    if not engine.graph.loop_continues(ctx.node_id, names):
        return NodeResult(output=ctx.input, action="break")
    limit = int(ctx.params.get("maxIterations", 1000))
    # laps: the `continue`s taken so far; a loop entered at its body ran the body once more than that
    runs = engine.laps(ctx.node_id) + (0 if ctx.node_id in engine.graph.entered_loops else 1)
    if runs >= limit:
        raise LoopLimitError(f"loop {ctx.node_id!r} reached maxIterations={limit} and its condition still holds")
    return NodeResult(output=ctx.input, action="continue")


def batch_scatter(ctx: NodeContext, engine: Engine) -> NodeResult:
    """One dynamic worker node per item of the list at `params.inputKey`."""
    key = ctx.params.get("inputKey")
    items = ctx.context.get(key) if key else ctx.input
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"batch {ctx.node_id!r}: context key {key!r} must hold a list, not {type(items).__name__}")
    worker = ctx.params.get("workerUsesKey")
    if not worker:
        raise ValueError(f"batch {ctx.node_id!r}: params.workerUsesKey is missing")
    worker_params = ctx.params.get("workerParams")
    return NodeResult(output=None, dynamic_nodes=[
        {"id": f"{ctx.node_id}.{i}", "uses": worker, "input": item, "params": worker_params} for i, item in enumerate(items)
    ])


def batch_gather(ctx: NodeContext, engine: Engine) -> Any:
    """Store the workers' results (in item order) at `params.outputKey`; they are also its output."""
    key = ctx.params.get("outputKey")
    if key:
        ctx.context.set(key, ctx.input)
    return ctx.input


def wait(ctx: NodeContext, engine: Engine) -> Await:
    details = {"type": "wait"}
    details.update({k: v for k, v in ctx.params.items() if k != "type"})
    return Await(details)


def webhook(ctx: NodeContext, engine: Engine) -> Await:
    """Pause like `wait`, with what a caller needs to resume the run from an HTTP POST: the
    `webhook` details hold the path (`/<run id>/<node id>`, under wherever `flowcraft.webhooks`
    is mounted), a fresh secret `token` (only the holder of the URL can resume) and the TS
    `event` name (`webhook:<run id>:<node id>`). The details' type stays "wait", so both drivers
    treat it as one (a resume completes it with the POST's body as its output)."""
    from .webhooks import webhook_details

    details = wait(ctx, engine).details
    details["webhook"] = webhook_details(ctx.run_id, ctx.node_id)
    return Await(details)


def sleep(ctx: NodeContext, engine: Engine) -> Any:
    seconds = sleep_seconds(ctx.params)
    if engine.wait_timers:
        if ctx.cancel.wait(seconds):
            ctx.cancel.raise_if_cancelled()
        return ctx.input
    wake_at = utc_now() + _dt.timedelta(seconds=seconds)
    return Await({"type": "sleep", "wake_at": wake_at.isoformat(), "duration": seconds})


def subflow(ctx: NodeContext, engine: Engine) -> Any:
    """Run the blueprint `params.blueprintId` as a child run, mapping inputs in and outputs out."""
    blueprint_id = ctx.params.get("blueprintId")
    if not blueprint_id:
        raise ValueError(f"subflow {ctx.node_id!r}: params.blueprintId is missing")
    inputs = ctx.params.get("inputs")
    if inputs:
        child_context = {child: ctx.context.get(parent) for child, parent in inputs.items()}
    elif ctx.input is not None:  # as TS: the node's input goes to every start node of the child
        child_context = {"_inputs." + s: ctx.input for s in analyze_blueprint(engine.child_blueprint(blueprint_id)).start_node_ids}
    else:
        child_context = {}
    return finish_subflow(ctx, engine.run_child(blueprint_id, child_context, ctx.node_id, ctx.iteration), engine)


def finish_subflow(ctx: NodeContext, child: Any, engine: Engine) -> Any:
    """Turn a child run's result into the subflow node's outcome: with `params.outputs`, those keys
    (also set in the parent's context); without, as TS, the output of the child's single terminal
    node, or a dict terminal node id -> output when it has several."""
    if child.status == "awaiting":
        return Await({
            "type": "subflow", "blueprintId": ctx.params.get("blueprintId"), "childRunId": child.run_id,
            "childAwaiting": sorted(child.awaiting),
        }, child.serialized_context)
    if child.status != "completed":
        reasons = "; ".join(f"{e.node_id}: {e.message}" for e in child.errors) or child.status
        raise SubflowError(f"subflow {ctx.node_id!r} ({ctx.params.get('blueprintId')!r}) {child.status}: {reasons}")
    outputs = ctx.params.get("outputs") or {}
    for parent_key, child_key in outputs.items():
        ctx.context.set(parent_key, child.context.get(child_key))
    if outputs:
        return {parent_key: child.context.get(child_key) for parent_key, child_key in outputs.items()}
    terminals = analyze_blueprint(engine.child_blueprint(ctx.params["blueprintId"])).terminal_node_ids
    if len(terminals) == 1:
        return child.context.get("_outputs." + terminals[0])
    return {t: child.context.get("_outputs." + t) for t in terminals}


class Builtin(Protocol):
    """A built-in node's function: called with the node's context and, by keyword, the engine."""

    def __call__(self, ctx: NodeContext, engine: Engine) -> Any: ...


BUILTINS: Dict[str, Builtin] = {
    LOOP_CONTROLLER: loop_controller,
    BATCH_SCATTER: batch_scatter,
    BATCH_GATHER: batch_gather,
    WAIT: wait,
    WEBHOOK: webhook,
    SLEEP: sleep,
    SUBFLOW: subflow,
}
