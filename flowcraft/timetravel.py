"""Time travel and debugging for in-memory runs: the Python side of Flowcraft TS's
`FlowRuntime.executeNodes`, `patchContext`, `markNodeCompleted`, `rollbackExecution` and
`replayFrom` (packages/core/src/runtime/runtime.ts).

Each works on a recorded event history (what an `InMemoryEventLogger`, or an adapter's
`get_history`, holds) or, where said, on a serialized context. The state a history describes is
folded once (`fold_history`), and a run is continued by `continue_run`: the blueprint is traversed
from its start nodes, but a node whose result is in `recorded` gives that result without running
(its routing, joins and skipped paths are decided exactly as in a run), and every other node runs.
That one mechanism is replay-from (ancestors recorded), mark-completed (the history's nodes plus
the marked one recorded) and, for the operations of SPEC section 11 (`retry`, `restart_from`,
`skip`), the same with the failed, restarted or skipped nodes left out of, or put in, `recorded`.
`apply_patch` is the one home of a context patch (`patch_context`, here and distributed).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from .errors import FlowcraftError
from .events import Event
from .graph import Activation
from .node import NodeResult
from .replay import replay_events
from .result import COMPLETED, FAILED, RUNNING, WorkflowResult
from .serializer import check_values

RESERVED_KEYS = frozenset({"_traversal", "_awaitingNodeIds", "_awaitingDetails"})


class History:
    """What a recorded history says: the initial context, the final context, and the last result
    (output and action) of every node that finished, in the order they first finished."""

    __slots__ = ("initial", "context", "finished", "status", "run_id")

    def __init__(self, initial: Dict[str, Any], context: Dict[str, Any], finished: Dict[str, NodeResult],
                 status: str, run_id: str) -> None:
        self.initial = initial
        self.context = context
        self.finished = finished
        self.status = status
        self.run_id = run_id


def fold_history(events: Iterable[Event]) -> History:
    """Fold a run's events (`workflow:start` .. `workflow:finish`) into a `History`."""
    events = list(events)
    replayed = replay_events(events)
    initial: Dict[str, Any] = {}
    finished: Dict[str, NodeResult] = {}
    for event in events:
        if event.type == "workflow:start" and not initial:
            initial = dict(event.payload.get("initial_context") or {})
        elif event.type == "node:finish" and "node_id" in event.payload:
            finished[event.payload["node_id"]] = NodeResult(output=event.payload.get("output"),
                                                            action=event.payload.get("action"))
    return History(initial, dict(replayed.context), finished, replayed.status, replayed.run_id)


def ancestors(graph: Any, node_id: str) -> Set[str]:
    """Every node from which `node_id` can be reached (not `node_id` itself, unless on a cycle)."""
    incoming: Dict[str, List[str]] = {}
    for edge in graph.edges:
        incoming.setdefault(edge.target, []).append(edge.source)
    found: Set[str] = set()
    todo = list(incoming.get(node_id, ()))
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(incoming.get(current, ()))
    return found


def descendants(graph: Any, node_id: str) -> Set[str]:
    """Every node reachable from `node_id` (not `node_id` itself, unless on a cycle)."""
    found: Set[str] = set()
    todo = [e.target for e in graph.nodes[node_id].outgoing]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(e.target for e in graph.nodes[current].outgoing)
    return found


def forget(data: Dict[str, Any], node_ids: Iterable[str]) -> None:
    """Remove what the nodes wrote as nodes (`<id>`, `_outputs.<id>`, `_inputs.<id>`) from `data`."""
    for node_id in node_ids:
        for key in (node_id, "_outputs." + node_id, "_inputs." + node_id):
            data.pop(key, None)


def apply_patch(data: Dict[str, Any], set: Optional[Mapping[str, Any]] = None,
                delete: Optional[Iterable[str]] = None, max_value_bytes: Optional[int] = None) -> List[Tuple[str, Any, bool]]:
    """Set then delete keys of a run's context `data`; return the changes as (key, value,
    deleted). `ValueError` (nothing changed) for a key the engine keeps its own state in, a key
    that is not a string, or a value that is not JSON or is too large."""
    set = dict(set or {})
    delete = list(delete or ())
    for key in list(set) + delete:
        if not isinstance(key, str):
            raise ValueError(f"a context key must be a string, not {key!r}")
        if key in RESERVED_KEYS:
            raise ValueError(f"context key {key!r} holds the engine's own state of the run: it cannot be patched")
    try:
        check_values(set, "patch", max_value_bytes)
    except FlowcraftError as error:
        raise ValueError(str(error)) from None
    changes: List[Tuple[str, Any, bool]] = []
    for key, value in set.items():
        data[key] = value
        changes.append((key, value, False))
    for key in delete:
        data.pop(key, None)
        changes.append((key, None, True))
    return changes


def _node(graph: Any, node_id: str) -> Any:
    node = graph.nodes.get(node_id)
    if node is None:
        raise FlowcraftError(f"node {node_id!r} not found in blueprint {graph.blueprint.id!r} "
                             f"(its nodes: {sorted(graph.nodes)})")
    return node


def continue_run(runtime: Any, blueprint: Any, data: Dict[str, Any], recorded: Mapping[str, NodeResult], *,
                 registry: Optional[Mapping[str, Any]] = None, run_id: Optional[str] = None, **options: Any) -> WorkflowResult:
    """Run `blueprint` over `data`, every node in `recorded` giving its recorded result without
    running (see the module doc); the other nodes run as in `runtime.run`."""
    from .runtime import _Run, new_run_id

    graph = runtime.graph(blueprint, strict=options.pop("strict", False))
    runtime.check_registry(graph.blueprint, registry)
    check_values(data, "context", runtime.max_value_bytes)
    run = _Run(runtime, graph, data, runtime._registry_for(registry), run_id or new_run_id(), options.pop("cancel", None),
               options.pop("concurrency", 1), options.pop("wait_timers", False))
    if options:
        raise TypeError(f"unexpected option(s) {sorted(options)}")
    run.recorded = dict(recorded)
    run.emit_event("workflow:start", {"initial_context": dict(data), "recorded": sorted(recorded)})
    return runtime._settled(graph.blueprint, run.execute(run.traversal.start()), registry, 0)


def retry_run(runtime: Any, blueprint: Any, serialized_context: Union[str, Mapping[str, Any]],
              node_ids: Optional[Sequence[str]] = None, **options: Any) -> WorkflowResult:
    """`runtime.retry`: continue a run from its serialized context, every node whose output it
    holds (`_outputs.<id>`) giving that output without running, but `node_ids` (they and what
    their new results reach run). A completed node's `action` is not in a context: a node whose
    outgoing edges name actions is routed as if it returned none (run it again with `node_ids`)."""
    graph = runtime.graph(blueprint)
    again = [_node(graph, n).id for n in node_ids or ()]
    data = runtime.serializer.loads(serialized_context) if isinstance(serialized_context, (str, bytes)) \
        else dict(serialized_context)
    for key in ("_awaitingNodeIds", "_awaitingDetails", "_traversal"):
        data.pop(key, None)
    recorded = {n: NodeResult(output=data["_outputs." + n]) for n in graph.nodes
                if "_outputs." + n in data and n not in again}
    forget(data, again)
    return continue_run(runtime, blueprint, data, recorded, **options)


def replay_from(runtime: Any, blueprint: Any, events: Iterable[Event], node_id: str, *,
                input_overrides: Optional[Mapping[str, Any]] = None, **options: Any) -> WorkflowResult:
    """Run `node_id` and what follows it again, every ancestor of `node_id` giving the output
    (and action) the history recorded for it, with `input_overrides` (context keys) set first."""
    graph = runtime.graph(blueprint)
    _node(graph, node_id)
    history = fold_history(events)
    before = ancestors(graph, node_id) - {node_id} - descendants(graph, node_id)
    data = dict(history.context)
    forget(data, [n for n in graph.nodes if n not in before])
    for key in ("_awaitingNodeIds", "_awaitingDetails"):
        data.pop(key, None)
    if input_overrides:
        apply_patch(data, input_overrides, max_value_bytes=runtime.max_value_bytes)
    recorded = {n: r for n, r in history.finished.items() if n in before}
    return continue_run(runtime, blueprint, data, recorded, **options)


def mark_node_completed(runtime: Any, blueprint: Any, events: Iterable[Event], node_id: str, output: Any = None, *,
                        action: Optional[str] = None, **options: Any) -> WorkflowResult:
    """Count `node_id` as completed with `output` (and `action`), without running it, and go on:
    the nodes the history recorded as finished give their recorded results, the rest run."""
    graph = runtime.graph(blueprint)
    _node(graph, node_id)
    check_values({"output": output}, "mark_node_completed", runtime.max_value_bytes)
    history = fold_history(events)
    data = dict(history.context)
    for key in ("_awaitingNodeIds", "_awaitingDetails"):
        data.pop(key, None)
    recorded = dict(history.finished)
    recorded[node_id] = NodeResult(output=output, action=action)
    forget(data, [n for n in graph.nodes if n not in recorded])
    return continue_run(runtime, blueprint, data, recorded, **options)


def rollback_execution(runtime: Any, blueprint: Any, events: Iterable[Event], node_id: str) -> WorkflowResult:
    """The run as it stood right after `node_id` completed: what every node downstream of it
    wrote as a node is removed (a soft rollback: side effects are not undone). Status `running`
    (an unfinished run); `replay_from` a successor continues it."""
    graph = runtime.graph(blueprint)
    _node(graph, node_id)
    history = fold_history(events)
    if node_id not in history.finished:
        raise FlowcraftError(f"cannot roll back to node {node_id!r}: it has not completed in this history")
    data = dict(history.context)
    forget(data, descendants(graph, node_id) - {node_id})
    return WorkflowResult(status=RUNNING, context=data, run_id=history.run_id, dumps=runtime.serializer.dumps)


def patch_context(runtime: Any, blueprint: Any, source: Union[str, Mapping[str, Any], Sequence[Event]], *,
                  set: Optional[Mapping[str, Any]] = None, delete: Optional[Iterable[str]] = None,
                  run_id: Optional[str] = None) -> WorkflowResult:
    """Change a run's context between node executions. `source` is a serialized context (an
    awaiting run's stays resumable: its engine state is kept) or an event history. Emits
    `context:change` for each change."""
    graph = runtime.graph(blueprint)
    if isinstance(source, (str, bytes, Mapping)):
        data = runtime.serializer.loads(source) if not isinstance(source, Mapping) else dict(source)
        snapshot = data.get("_traversal")
        run_id = run_id or (snapshot or {}).get("runId") or ""
        status = "awaiting" if snapshot is not None and data.get("_awaitingDetails") else COMPLETED
    else:
        history = fold_history(source)
        data, status, run_id = history.context, history.status, run_id or history.run_id
    changes = apply_patch(data, set, delete, runtime.max_value_bytes)
    emit = runtime._emitter(run_id, graph.blueprint.id)
    if emit is not None:
        for key, value, deleted in changes:
            emit("context:change", {"key": key, "value": value, "op": "delete" if deleted else "set"})
    serialized = runtime.serializer.dumps(data)
    shown = {k: v for k, v in data.items() if k != "_traversal"}
    return WorkflowResult(status=status, context=shown, run_id=run_id, serialized_context=serialized)


def execute_nodes(runtime: Any, blueprint: Any, node_ids: Sequence[str], events: Iterable[Event], *,
                  input_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
                  registry: Optional[Mapping[str, Any]] = None, run_id: Optional[str] = None) -> WorkflowResult:
    """Run just `node_ids`, in that order, over the context the history describes (a node's
    `input_overrides[node_id]` set as context keys first); each one's output is stored as in a run,
    and the inputs its taken edges carry as its successors' `_inputs.<id>`. Nothing downstream runs. A node that fails stops there: status `failed`, the error in `errors`."""
    from .runtime import _Run, new_run_id

    graph = runtime.graph(blueprint)
    nodes = [_node(graph, n) for n in node_ids]
    history = fold_history(events)
    run = _Run(runtime, graph, dict(history.context), runtime._registry_for(registry),
               run_id or history.run_id or new_run_id(), None, 1)
    for node in nodes:
        overrides = (input_overrides or {}).get(node.id)
        if overrides:
            for key, value, _ in apply_patch(run.data, overrides, max_value_bytes=runtime.max_value_bytes):
                run.emit_event("context:change", {"key": key, "value": value, "op": "set"})
        stored = node.inputs_key in run.data
        activation = Activation(node.id, 0, run.data.get(node.inputs_key), stored)
        ready: Deque[Activation] = deque()
        outcome = run._execute(activation)
        run.traversal.state(node.id).status = "ready"
        run.traversal.outstanding += 1
        run._finish(activation, outcome, ready)
        for successor in ready:  # the successors' inputs, as TS's applyEdgeTransform stores them
            if successor.has_input and successor.parent is None:
                run.data["_inputs." + successor.node_id] = successor.input
        if run.errors:
            break
        if run.awaiting:
            raise FlowcraftError(f"node {node.id!r} pauses its run ({run.awaiting[node.id].get('type')}): "
                                 f"execute_nodes runs nodes that complete; resume the run instead")
    return WorkflowResult(status=FAILED if run.errors else COMPLETED, context=run.data, errors=run.errors,
                          run_id=run.run_id, dumps=runtime.serializer.dumps)


def park_paused(run: Any, ready: Deque[Activation]) -> None:
    """A run that `request_pause` stopped: each activation it would have run next waits as a
    `pause` (its input kept as `_inputs.<id>`), so the serialized context can resume it."""
    while ready:
        activation = ready.popleft()
        if activation.has_input:
            run.data["_inputs." + activation.node_id] = activation.input
        run.awaiting[activation.node_id] = {"type": "pause", "iteration": activation.iteration,
                                            "hasInput": activation.has_input}
    run.emit_event("workflow:pause", {"node_ids": sorted(run.awaiting), "details": {"type": "pause"}})


def unpark_paused(run: Any, node_ids: Sequence[str]) -> List[Activation]:
    """The activations `park_paused` parked for `node_ids`, taken out of the awaiting nodes."""
    activations = []
    for node_id in node_ids:
        details = run.awaiting.pop(node_id)
        has_input = bool(details.get("hasInput"))
        activations.append(Activation(node_id, int(details.get("iteration", 0)),
                                      run.data.get("_inputs." + node_id) if has_input else None, has_input))
    return activations
