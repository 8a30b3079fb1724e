"""How a node's outcome moves its run on: one home for the in-memory runtime and the distributed driver.

Both drivers (`runtime._Run` and `plan.CommitPlan`) call these, and differ only in where the effects
go: the runtime writes a dict and emits events as they happen, a worker collects them into one
`Commit`. A completed node's output is stored, its edges are routed, the traversal moves on (a
fallback node that ran in its place completes too) and each node made ready with a value gets it as
`_inputs.<id>` when it is scheduled; a run that fails or is cancelled drops the inputs of the nodes
it scheduled but never started, so that its final context holds only what ran.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, MutableMapping, Optional, Tuple

from .execution import FallbackResult
from .graph import READY, Activation, CompiledGraph, Decision, GraphNode, NodeState, Traversal
from .node import NodeResult
from .result import WorkflowError
from .serializer import check_json

# What completing a node changed: its result, its routing, what became ready, what was skipped. A
# plain tuple: this is on every node's path, and a NamedTuple costs a Python-level __new__ per node.
Completion = Tuple[NodeResult, List[Decision], List[Activation], List[str]]


def complete(graph: CompiledGraph, traversal: Traversal, data: MutableMapping[str, Any], node: GraphNode,
             iteration: int, outcome: Any, max_value_bytes: Optional[int],
             charge: Optional[Callable[[str, str, int], None]] = None) -> Completion:
    """Complete `node` with `outcome` (a `NodeResult`, or a `FallbackResult`: the result of the
    fallback node that ran in its place): its output (and the fallback's) stored in `data` (the
    run's context; `charge(outputs_key, node_id, size)` counts it against the context's bound), its edges routed
    over `data`, the traversal moved on, and the inputs of the nodes made ready stored as their
    `_inputs.<id>` when they are scheduled (a worker must: the value travels in the store; a node
    with `inputs` reads the context instead).
    Raises `SerializationError`, `RoutingError` or `LoopLimitError`: the caller fails the node."""
    fallback = None
    if type(outcome) is FallbackResult:
        fallback, outcome = outcome.node, outcome.result
    output = outcome.output
    size = check_json(output, node.outputs_key, max_value_bytes)
    if charge is not None:
        charge(node.outputs_key, node.id, size)
    data[node.outputs_key] = output
    data[node.id] = output
    decisions = graph.route(node.id, outcome, data)
    ready, skipped = traversal.complete(node.id, iteration, decisions)
    if fallback is not None:
        if charge is not None:
            charge(fallback.outputs_key, fallback.id, size)
        data[fallback.outputs_key] = output
        data[fallback.id] = output
        more, more_skipped = traversal.complete(fallback.id, traversal.state(fallback.id).iteration,
                                                graph.route(fallback.id, outcome, data), counted=False)
        ready += more
        skipped += more_skipped
    nodes = graph.nodes
    for activation in ready:  # inline `store_inputs`: this is every node's path
        if activation.has_input and activation.parent is None:
            target = nodes[activation.node_id]
            if target.inputs is None:
                data[target.inputs_key] = activation.input
    return outcome, decisions, ready, skipped


def completion_events(node: GraphNode, done: Completion) -> List[Tuple[str, Dict[str, Any]]]:
    """The events of a completion, in order: `node:finish`, one `edge:evaluate` per routed edge, one
    `node:skipped` per node its dead edges skipped."""
    result, decisions, _, skipped = done
    events: List[Tuple[str, Dict[str, Any]]] = [
        ("node:finish", {"node_id": node.id, "output": result.output, "action": result.action})]
    events.extend(("edge:evaluate", {"source": edge.source, "target": edge.target, "taken": taken})
                  for edge, taken, _ in decisions)
    events.extend(("node:skipped", {"node_id": skipped_id}) for skipped_id in skipped)
    return events


def store_inputs(graph: CompiledGraph, ready: Iterable[Activation], data: MutableMapping[str, Any]) -> None:
    """Store the value each scheduled node was given as its `_inputs.<id>` (see `complete`)."""
    nodes = graph.nodes
    for activation in ready:
        if activation.has_input and activation.parent is None:
            target = nodes[activation.node_id]
            if target.inputs is None:
                data[target.inputs_key] = activation.input


def fail(traversal: Traversal, node: GraphNode, error: BaseException, *, counted: bool = True) -> Tuple[WorkflowError, Dict[str, Any]]:
    """The node failed: its state ends; return its `WorkflowError` and the `node:error` event payload."""
    traversal.fail(node.id, counted=counted)
    return WorkflowError.from_exception(node.id, error), {"node_id": node.id, "error": str(error),
                                                          "type": type(error).__name__}


def drop_unstarted_inputs(context: MutableMapping[str, Any], states: Mapping[str, NodeState],
                          awaiting: Mapping[str, Any]) -> None:
    """A failed or cancelled run drops the `_inputs.<id>` of the nodes it scheduled and never
    started. Parked nodes (wait, sleep, subflow) and expanded ones (a batch with items out) did start."""
    for node_id, state in states.items():
        if state.status == READY and not state.pending and node_id not in awaiting:
            context.pop("_inputs." + node_id, None)


__all__ = ["Completion", "complete", "completion_events", "drop_unstarted_inputs", "fail", "store_inputs"]
