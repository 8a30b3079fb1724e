"""The compiled graph of a blueprint and the pure traversal state of one run.

`CompiledGraph` is built once per blueprint: adjacency, join sizes, start nodes, back edges (the
edges that close a cycle, such as a loop's `continue`) and the body each back edge re-runs, plus the
compiled edge expressions. It also decides routing: which outgoing edges a result takes (a loop
controller's true conditional exits exclusively), and evaluates loop controllers' conditions, so
both drivers evaluate every expression here: `strict_expressions` and its once-per-edge warnings
(logger "flowcraft.expressions") live in one place.

`Traversal` is the state machine of one run, with no I/O: which edges have arrived at each node,
which nodes are ready, done or skipped, and how many activations are outstanding. The in-memory
runtime drives it for a whole run; the distributed driver loads the few node states a completion
touches, applies the same transition, and commits what changed. Node states are plain data
(`NodeState.to_dict`) so they can be persisted.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, MutableMapping, Optional, Protocol, Sequence, Set, Tuple

from .blueprint import EdgeDefinition, NodeConfig, NodeDefinition, WorkflowBlueprint, blueprint_digest
from .errors import BlueprintError, ExpressionError, LoopLimitError
from .evaluator import UNORDERABLE, ExpressionProblem, WatchedNames
from .node import NodeResult
from .serializer import DEFAULT_MAX_VALUE_BYTES, check_json

PENDING, READY, DONE, SKIPPED = "pending", "ready", "done", "skipped"
LOOP_CONTROLLER = "loop-controller"
MAX_CYCLE_ITERATIONS = 1000  # the default cap of a cycle that no loop controller governs

logger = logging.getLogger("flowcraft.expressions")


class _Dead:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DEAD"


DEAD: Any = _Dead()  # the value an arrival records for an edge that was not taken


class RoutingError(ExpressionError):
    """An edge's condition or transform failed while routing a node's result."""


class Edge:
    __slots__ = ("index", "source", "target", "action", "condition", "transform", "definition", "back")

    def __init__(self, index: int, definition: EdgeDefinition, evaluator: Any) -> None:
        self.index = index
        self.definition = definition
        self.source = definition.source
        self.target = definition.target
        self.action = definition.action
        self.condition: Optional[Callable[[Mapping[str, Any]], Any]] = (
            evaluator.compile(definition.condition) if definition.condition not in (None, "") else None  # "": absent, as TS
        )
        self.transform: Optional[Callable[[Mapping[str, Any]], Any]] = (
            evaluator.compile(definition.transform) if definition.transform not in (None, "") else None
        )
        self.back = False

    def __repr__(self) -> str:
        return f"Edge({self.source!r} -> {self.target!r})"


class GraphNode:
    __slots__ = (
        "id", "definition", "uses", "params", "inputs", "config", "join_any", "incoming", "in_count",
        "outgoing", "by_action", "default_edges", "simple_edge", "outputs_key", "inputs_key",
        "back_edges_out", "plain",
    )

    def __init__(self, definition: NodeDefinition) -> None:
        self.id = definition.id
        self.definition = definition
        self.uses = definition.uses
        self.params: Dict[str, Any] = dict(definition.params or {})
        self.inputs = definition.inputs
        self.config: NodeConfig = definition.settings
        self.join_any = self.config.join == "any"
        self.plain = self.config.max_retries is None and self.config.timeout is None  # one attempt, no timer
        self.incoming: Tuple[Edge, ...] = ()  # forward edges only
        self.in_count = 0
        self.outgoing: Tuple[Edge, ...] = ()  # every outgoing edge, in blueprint order
        self.by_action: Dict[str, Tuple[Edge, ...]] = {}
        self.default_edges: Tuple[Edge, ...] = ()
        self.simple_edge: Optional[Edge] = None  # the only edge, unconditional: the fast path
        self.back_edges_out: Tuple[Edge, ...] = ()
        self.outputs_key = "_outputs." + self.id
        self.inputs_key = "_inputs." + self.id


class Activation:
    """A node made ready: run `node_id` at `iteration` with `input` (when `has_input`).

    A dynamic node (a batch item) has `parent` set: the node that spawned it, and its `index`.
    """

    __slots__ = ("node_id", "iteration", "input", "has_input", "parent", "index", "definition")

    def __init__(
        self, node_id: str, iteration: int = 0, input: Any = None, has_input: bool = False,
        parent: Optional[str] = None, index: int = 0, definition: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.node_id = node_id
        self.iteration = iteration
        self.input = input
        self.has_input = has_input
        self.parent = parent
        self.index = index
        self.definition = definition

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"nodeId": self.node_id, "iteration": self.iteration}
        if self.has_input:
            out["input"] = self.input
        return out

    def __repr__(self) -> str:
        return f"Activation({self.node_id!r}, iteration={self.iteration})"


Decision = Tuple[Edge, bool, Any]  # (edge, taken, value carried)


class _Watch(WatchedNames):
    """What an expression's names do with a read that finds nothing or a comparison that cannot
    order (SPEC 5 "Strict expressions"): strict, raise; else keep them for a warning."""

    __slots__ = ()
    strict: bool  # slots of each subclass
    problems: Optional[List[ExpressionProblem]]

    def expression_problem(self, problem: ExpressionProblem) -> None:
        if self.strict:
            raise ExpressionError(problem.message())
        if self.problems is None:
            self.problems = [problem]  # type: ignore[misc]  # a slot of each subclass, which mypy cannot see here
        else:
            self.problems.append(problem)


class _ConditionNames(_Watch, Mapping):
    """The names a condition sees: the context's keys plus `result`, without copying the context."""

    __slots__ = ("context", "result", "strict", "problems")

    def __init__(self, context: Mapping[str, Any], result: Dict[str, Any], strict: bool = False) -> None:
        self.context = context
        self.result = result
        self.strict = strict
        self.problems: Optional[List[ExpressionProblem]] = None

    def __getitem__(self, key: str) -> Any:
        if key == "result":
            return self.result
        if key == "context" and key not in self.context:
            return self.context  # the TS spelling `context.total > 0`
        return self.context[key]

    def __contains__(self, key: object) -> bool:
        return key in ("result", "context") or key in self.context

    def get(self, key: str, default: Any = None) -> Any:
        if key == "result":
            return self.result
        if key == "context" and key not in self.context:
            return self.context
        return self.context.get(key, default)

    def __iter__(self):
        yield "result"
        yield from (k for k in self.context if k != "result")

    def __len__(self) -> int:
        return len(self.context) + (0 if "result" in self.context else 1)


class _LoopNames(_Watch, Mapping):
    """The names a loop controller's own condition sees: the context's keys, and `context` itself
    when no key has that name (the TS spelling `context.i < 5`)."""

    __slots__ = ("context", "strict", "problems")

    def __init__(self, context: Mapping[str, Any], strict: bool = False) -> None:
        self.context = context
        self.strict = strict
        self.problems: Optional[List[ExpressionProblem]] = None

    def __getitem__(self, key: str) -> Any:
        if key == "context" and key not in self.context:
            return self.context
        return self.context[key]

    def get(self, key: str, default: Any = None) -> Any:
        if key == "context" and key not in self.context:
            return self.context
        return self.context.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key == "context" or key in self.context

    def __iter__(self):
        return iter(self.context)

    def __len__(self) -> int:
        return len(self.context)


class _TransformNames(_Watch, dict):
    """The names a transform sees: `input` and `context`."""

    __slots__ = ("strict", "problems")

    def __init__(self, input: Any, context: Mapping[str, Any], strict: bool = False) -> None:
        dict.__init__(self, input=input, context=context)
        self.strict = strict
        self.problems: Optional[List[ExpressionProblem]] = None


def entered_loops(blueprint: WorkflowBlueprint) -> FrozenSet[str]:
    """The loop controllers with an entry edge: an edge into the controller from outside its loop
    (a node its `continue` targets cannot reach without passing through it, or through another
    loop's `continue`). Such a loop tests its condition before its body runs (while); a loop whose
    only way in is its body's start node (TS's builder wiring) runs the body first."""
    uses = {n.id: n.uses for n in blueprint.nodes}
    outgoing: Dict[str, List[str]] = {}
    for edge in blueprint.edges:
        if not (uses.get(edge.source) == LOOP_CONTROLLER and edge.action == "continue"):
            outgoing.setdefault(edge.source, []).append(edge.target)
    found: Set[str] = set()
    for node_id, used in uses.items():
        if used != LOOP_CONTROLLER:
            continue
        inside = {e.target for e in blueprint.edges if e.source == node_id and e.action == "continue"}
        todo = [n for n in inside if n != node_id]
        while todo:
            for nxt in outgoing.get(todo.pop(), ()):
                if nxt not in inside:
                    inside.add(nxt)
                    if nxt != node_id:
                        todo.append(nxt)
        if node_id in inside and any(e.target == node_id and e.source not in inside for e in blueprint.edges):
            found.add(node_id)
    return frozenset(found)


def start_node_ids(blueprint: WorkflowBlueprint) -> Tuple[str, ...]:
    """The nodes a run starts with: no incoming edge (a loop's `continue` edge does not count,
    unless the loop has an entry edge: `entered_loops`), and not a node that only serves as another
    node's fallback."""
    uses = {n.id: n.uses for n in blueprint.nodes}
    entered: Set[str] = set()
    targeted: Set[str] = set()
    tested_first = entered_loops(blueprint)
    for edge in blueprint.edges:
        targeted.add(edge.target)
        if not (uses.get(edge.source) == LOOP_CONTROLLER and edge.action == "continue") or edge.source in tested_first:
            entered.add(edge.target)
    fallbacks = {n.settings.fallback for n in blueprint.nodes if n.settings.fallback}
    return tuple(
        n.id for n in blueprint.nodes
        if n.id not in entered and not (n.id in fallbacks and n.id not in targeted)
    )


def input_value(ref: str, get: Callable[[str], Any], has: Callable[[str], bool]) -> Any:
    """The value a node's `inputs` reference names, as TS `resolveInputValue`: `_key` is a context
    key; `node.a.b` is the path `a.b` into node `node`'s output (a context key spelled so wins);
    `node` is that node's output, else the context key `node`."""
    if ref.startswith("_"):
        return get(ref)
    base, dot, path = ref.partition(".")
    if dot:
        if has(ref):
            return get(ref)
        current = get("_outputs." + base) if has("_outputs." + base) else None
        for part in path.split("."):
            if isinstance(current, Mapping):
                current = current.get(part)
            elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
                current = current[int(part)]
            else:
                return None
        return current
    return get("_outputs." + ref) if has("_outputs." + ref) else get(ref)


def input_keys(ref: str) -> Tuple[str, ...]:
    """The context keys `input_value(ref, ...)` may read (what a worker loads for a job)."""
    if ref.startswith("_"):
        return (ref,)
    base, dot, _ = ref.partition(".")
    return (ref, "_outputs." + base) if dot else ("_outputs." + ref, ref)


def check_resume_action(node: "GraphNode", action: Optional[str]) -> None:
    """Raise `ValueError` if resuming the awaiting `node` with `action` would follow none of the
    edges the blueprint gives it for actions (SPEC section 11): when some of its outgoing edges name
    an action, `action` must be one of those, or None ("no action": its edges without one) when it
    has such edges. Routing would otherwise fall back to the edges without an action, or to none,
    and skip everything downstream: a misspelt action would end the run for good. A node none of
    whose edges names an action takes any action (it is only recorded)."""
    named = sorted(node.by_action)
    if not named or (action in node.by_action if action is not None else bool(node.default_edges)):
        return
    choices = ", ".join(repr(a) for a in named)
    if node.default_edges:
        choices += " (or no action, for its edges without one)"
    if action is None:
        raise ValueError(f"node {node.id!r} needs an action to resume: every edge out of it names one; "
                         f"give one of {choices}")
    raise ValueError(f"node {node.id!r} has no outgoing edge with action {action!r}: give one of {choices}")


def cycle_entry_ids(blueprint: WorkflowBlueprint) -> Tuple[str, ...]:
    """Where a blueprint without a start node (a pure cycle, a self-loop) starts when not strict, as
    TS's GraphTraverser: each cycle's node named in `metadata.cycleEntryPoints`, else its first node."""
    from .analysis import analyze_blueprint  # analysis imports this module

    entries = set((blueprint.metadata or {}).get("cycleEntryPoints") or ())
    found: List[str] = []
    for cycle in analyze_blueprint(blueprint).cycles:
        if cycle:
            entry = next((n for n in cycle if n in entries), cycle[0])
            if entry not in found:
                found.append(entry)
    return tuple(found)


class CompiledGraph:
    """A blueprint prepared for execution. Build once per blueprint and reuse for every run."""

    def __init__(
        self, blueprint: WorkflowBlueprint, evaluator: Any = None, *, strict: bool = False,
        max_cycle_iterations: Optional[int] = MAX_CYCLE_ITERATIONS, max_value_bytes: Optional[int] = DEFAULT_MAX_VALUE_BYTES,
        strict_expressions: bool = False,
    ) -> None:
        if evaluator is None:
            from .evaluator import default_evaluator

            evaluator = default_evaluator()
        blueprint.validate(evaluator)
        self.blueprint = blueprint
        self.max_value_bytes = max_value_bytes  # the bound on an edge's transformed value (see FlowRuntime)
        self.evaluator = evaluator
        # SPEC 5 "Strict expressions": a read that finds nothing (or an ordering of values that cannot
        # be ordered) fails the edge's source node; without it, it is logged once per edge
        self.strict_expressions = bool(strict_expressions)
        self._warned: Set[Tuple[str, Any]] = set()
        self._loop_conditions: Dict[str, Callable[[Mapping[str, Any]], Any]] = {}
        self.nodes: Dict[str, GraphNode] = {n.id: GraphNode(n) for n in blueprint.nodes}
        self.edges: Tuple[Edge, ...] = tuple(Edge(i, e, evaluator) for i, e in enumerate(blueprint.edges))
        self.fallback_ids: FrozenSet[str] = frozenset(
            n.config.fallback for n in self.nodes.values() if n.config.fallback
        )
        self._link()
        self._check_loops()
        # loops entered at their controller: the condition is tested before the body runs (SPEC 5)
        self.entered_loops: FrozenSet[str] = entered_loops(blueprint)
        self.start_ids: Tuple[str, ...] = self._find_start_ids(strict)
        targeted = {e.target for e in self.edges}
        self.fallback_only_ids: Tuple[str, ...] = tuple(n for n in self.nodes if n in self.fallback_ids and n not in targeted)
        self._mark_back_edges()
        self._index_edges()
        self.cycle_bodies: Dict[int, FrozenSet[str]] = {
            e.index: self._cycle_body(e) for e in self.edges if e.back
        }
        self._nest_entered_loops()
        # back edge index -> most iterations of its cycle, for cycles no loop controller closes
        # (a loop controller enforces its own `maxIterations`); None: uncapped
        self.cycle_caps: Dict[int, int] = {} if max_cycle_iterations is None else {
            e.index: self._cycle_cap(e, max_cycle_iterations)
            for e in self.edges if e.back and self.nodes[e.source].uses != LOOP_CONTROLLER
        }
        if strict:
            cycles = [e for e in self.edges if e.back and self.nodes[e.source].uses != LOOP_CONTROLLER]
            if cycles:
                raise BlueprintError(
                    [f"strict mode: edge {e.source!r} -> {e.target!r} closes a cycle" for e in cycles],
                    blueprint.id,
                )

    @functools.cached_property
    def digest(self) -> str:
        """`blueprint_digest` of the blueprint, computed once per compiled graph."""
        return blueprint_digest(self.blueprint)

    # --- compilation ---------------------------------------------------------------------------

    def _link(self) -> None:
        outgoing: Dict[str, List[Edge]] = {n: [] for n in self.nodes}
        for edge in self.edges:
            outgoing[edge.source].append(edge)
        for node_id, edges in outgoing.items():
            self.nodes[node_id].outgoing = tuple(edges)

    def _check_loops(self) -> None:
        """Refuse a loop controller without a `continue` edge, as TS's GraphTraverser does."""
        lost = [n.id for n in self.nodes.values()
                if n.uses == LOOP_CONTROLLER and not any(e.action == "continue" for e in n.outgoing)]
        if lost:
            raise BlueprintError([f"loop {n!r} has no outgoing 'continue' edge to the start of its body" for n in lost],
                                 self.blueprint.id)

    def _find_start_ids(self, strict: bool) -> Tuple[str, ...]:
        starts = start_node_ids(self.blueprint)
        if starts or strict:
            return starts
        return cycle_entry_ids(self.blueprint)

    def _mark_back_edges(self) -> None:
        """Depth-first from the start nodes (then any unreached node): an edge to a node on the stack is a back edge."""
        state: Dict[str, int] = {}  # 1 on stack, 2 finished
        # A loop entered at its controller: its `continue` edges close the cycle (the controller runs
        # first, and each lap re-runs the body from there), whatever order the search meets them in.
        for edge in self.edges:
            if edge.source in self.entered_loops and edge.action == "continue":
                edge.back = True
        roots = list(self.start_ids) + [n for n in self.nodes if n not in self.start_ids]
        for root in roots:
            if root in state:
                continue
            state[root] = 1
            stack = [(root, iter(self.nodes[root].outgoing))]
            while stack:
                node_id, edges = stack[-1]
                for edge in edges:
                    if edge.back:
                        continue
                    seen = state.get(edge.target)
                    if seen == 1:
                        edge.back = True
                    elif seen is None:
                        state[edge.target] = 1
                        stack.append((edge.target, iter(self.nodes[edge.target].outgoing)))
                        break
                else:
                    state[node_id] = 2
                    stack.pop()

    def _index_edges(self) -> None:
        incoming: Dict[str, List[Edge]] = {n: [] for n in self.nodes}
        for edge in self.edges:
            if not edge.back:
                incoming[edge.target].append(edge)
        for node in self.nodes.values():
            node.incoming = tuple(incoming[node.id])
            node.in_count = len(node.incoming)
            by_action: Dict[str, List[Edge]] = {}
            defaults = []
            for edge in node.outgoing:
                if edge.action is None:
                    defaults.append(edge)
                else:
                    by_action.setdefault(edge.action, []).append(edge)
            node.by_action = {a: tuple(es) for a, es in by_action.items()}
            node.default_edges = tuple(defaults)
            node.back_edges_out = tuple(e for e in node.outgoing if e.back)
            only = node.outgoing[0] if len(node.outgoing) == 1 else None
            if only is not None and only.action is None and only.condition is None and only.transform is None:
                node.simple_edge = only

    def _cycle_body(self, back: Edge) -> FrozenSet[str]:
        """The nodes on forward paths from the back edge's target to its source (both included)."""
        forward = self._reach(back.target, lambda n: (e.target for e in self.nodes[n].outgoing if not e.back))
        backward = self._reach(back.source, lambda n: (e.source for e in self.nodes[n].incoming))
        return frozenset((forward & backward) | {back.target, back.source})

    def _nest_entered_loops(self) -> None:
        """A loop entered at its controller inside another cycle: its body is reached only through
        its `continue` (a back edge), so the enclosing body takes it in explicitly (a new lap of the
        outer cycle starts the inner loop over)."""
        inner = [e for e in self.edges if e.back and e.source in self.entered_loops]
        changed = bool(inner)
        while changed:
            changed = False
            for index, body in self.cycle_bodies.items():
                extra = frozenset().union(*(self.cycle_bodies[e.index] for e in inner
                                            if e.index != index and e.source in body)) - body
                if extra:
                    self.cycle_bodies[index] = body | extra
                    changed = True

    def _cycle_cap(self, back: Edge, limit: int) -> int:
        """The iteration cap of a raw cycle: `limit`, or more if a loop controller inside it allows
        more (a TS-shaped loop whose back edge leaves the body, not the controller)."""
        cap = limit
        for node_id in self.cycle_bodies[back.index]:
            node = self.nodes[node_id]
            if node.uses == LOOP_CONTROLLER:
                try:
                    cap = max(cap, int(node.params.get("maxIterations", limit)))
                except (TypeError, ValueError):
                    pass
        return cap

    @staticmethod
    def _reach(start: str, step: Callable[[str], Iterable[str]]) -> Set[str]:
        seen = {start}
        todo = [start]
        while todo:
            for nxt in step(todo.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    # --- routing -------------------------------------------------------------------------------

    def route(self, node_id: str, result: NodeResult, context: Mapping[str, Any]) -> List[Decision]:
        """Decide, for every outgoing edge of `node_id`, whether `result` takes it, and what it carries."""
        node = self.nodes[node_id]
        action = result.action
        if node.simple_edge is not None and action is None:
            return [(node.simple_edge, True, result.output)]
        if not node.outgoing:
            return []
        candidates = node.by_action.get(action) if action is not None else None
        if candidates is None:
            candidates = node.default_edges
        if node.uses == LOOP_CONTROLLER and action != "continue":
            return self._route_loop_exit(node, result, context, candidates)
        decisions: List[Decision] = []
        names: Optional[_ConditionNames] = None
        chosen = {id(c) for c in candidates}  # one set per route: a wide fan must not compare edges pairwise
        for edge in node.outgoing:
            taken = False
            if id(edge) in chosen:
                taken = True
                if edge.condition is not None:
                    if names is None:
                        names = self._condition_names(context, result)
                    taken = bool(self._evaluate(edge, "condition", edge.condition, names))
            value = result.output
            if taken and edge.transform is not None:
                value = self._transform(edge, result.output, context)
            decisions.append((edge, taken, value if taken else None))
        return decisions

    def _route_loop_exit(self, node: GraphNode, result: NodeResult, context: Mapping[str, Any],
                         candidates: Tuple[Edge, ...]) -> List[Decision]:
        """SPEC 5 "Loops": a loop leaving through a true conditional exit takes the true conditional
        exits only; its unconditional exits are taken only when it breaks by its own condition."""
        names = self._condition_names(context, result)
        taken: Dict[int, bool] = {}
        for edge in candidates:
            if edge.condition is not None:
                taken[edge.index] = bool(self._evaluate(edge, "condition", edge.condition, names))
        by_condition = any(taken.values())
        for edge in candidates:
            if edge.condition is None:
                taken[edge.index] = not by_condition
        decisions: List[Decision] = []
        for edge in node.outgoing:
            if taken.get(edge.index, False):
                value = result.output if edge.transform is None else self._transform(edge, result.output, context)
                decisions.append((edge, True, value))
            else:
                decisions.append((edge, False, None))
        return decisions

    def loop_exits(self, node_id: str, context: Mapping[str, Any], output: Any) -> bool:
        """True when one of a loop controller's conditional exit edges holds (they are evaluated
        before the loop's own condition, with the names `route` gives them when the loop breaks)."""
        names: Optional[_ConditionNames] = None
        for edge in self.nodes[node_id].outgoing:
            if edge.action != "continue" and edge.condition is not None:
                if names is None:
                    names = self._condition_names(context, NodeResult(output=output, action="break"))
                if self._evaluate(edge, "condition", edge.condition, names):
                    return True
        return False

    def loop_continues(self, node_id: str, context: Mapping[str, Any]) -> bool:
        """Whether a loop controller's own `params.condition` holds (no condition: it does not)."""
        source = self.nodes[node_id].params.get("condition")
        if not source:
            return False
        compiled = self._loop_conditions.get(node_id)
        if compiled is None:
            compiled = self._loop_conditions[node_id] = self.evaluator.compile(source)
        names = _LoopNames(context, self.strict_expressions)
        try:
            value = compiled(names)
        except ExpressionError as exc:
            raise ExpressionError(f"loop {node_id!r}: condition {source!r} failed: {_detail(exc, source)}") from exc
        if names.problems:
            self._warn(("loop", node_id), f"loop {node_id!r}: condition {source!r}", names.problems)
        return bool(value)

    def exit_conditions(self, node_id: str) -> List[Callable[[Mapping[str, Any]], Any]]:
        """The compiled conditions of a loop controller's exit edges (evaluated before its own)."""
        return [e.condition for e in self.nodes[node_id].outgoing if e.action != "continue" and e.condition is not None]

    def _condition_names(self, context: Mapping[str, Any], result: NodeResult) -> _ConditionNames:
        return _ConditionNames(context, {"output": result.output, "action": result.action, "error": result.error},
                               self.strict_expressions)

    def _transform(self, edge: Edge, output: Any, context: Mapping[str, Any]) -> Any:
        if edge.transform is None:
            return output
        value = self._evaluate(edge, "transform", edge.transform, _TransformNames(output, context, self.strict_expressions))
        check_json(value, f"transform of edge {edge.source!r} -> {edge.target!r}", self.max_value_bytes)
        return value

    def _evaluate(self, edge: Edge, kind: str, compiled: Callable[[Mapping[str, Any]], Any], names: Any) -> Any:
        try:
            value = compiled(names)
        except ExpressionError as exc:
            source = getattr(edge.definition, kind)
            raise RoutingError(
                f"edge {edge.source!r} -> {edge.target!r}: {kind} {source!r} failed: {_detail(exc, source)}"
            ) from exc
        if names.problems:  # lenient: what strict mode would refuse, logged once per edge
            problems, names.problems = names.problems, None
            self._warn((kind, edge.index), f"edge {edge.source!r} -> {edge.target!r}: {kind} "
                                           f"{getattr(edge.definition, kind)!r}", problems)
        return value

    def _warn(self, key: Tuple[str, Any], where: str, problems: List[ExpressionProblem]) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        seen: List[str] = []
        unknown = any(p.kind != UNORDERABLE for p in problems)
        for problem in problems:
            if unknown and problem.kind == UNORDERABLE and None in problem.operands:
                continue  # the None an unknown name read: already said
            text = problem.message() + ("; it is false" if problem.kind == UNORDERABLE else "; it reads as None")
            if text not in seen:
                seen.append(text)
        logger.warning("blueprint %r: %s: %s (strict_expressions=True makes this an error; logged once per edge)",
                       self.blueprint.id, where, "; ".join(seen))


def _detail(exc: ExpressionError, source: str) -> str:
    """An evaluation error's message without the "cannot evaluate '<source>': " its caller repeats."""
    text = str(exc)
    prefix = f"cannot evaluate {source!r}: "
    return text[len(prefix):] if text.startswith(prefix) else text


class NodeState:
    """One node's traversal state at its current iteration.

    A join's arrivals are in `arrivals` (edge index -> carried value, or DEAD), except those of the
    counted joins of a traversal with an `ArrivalStore` (a worker's): they are counted and kept
    there, and the join's state does not change until it is resolved."""

    __slots__ = ("iteration", "status", "arrivals", "laps", "pending")

    def __init__(
        self, iteration: int = 0, status: str = PENDING, arrivals: Optional[Dict[int, Any]] = None,
        laps: int = 0, pending: int = 0,
    ) -> None:
        self.iteration = iteration
        self.status = status
        self.arrivals = arrivals  # edge index -> carried value, or DEAD
        self.laps = laps  # times this node took a back edge since its loop was (re-)entered
        self.pending = pending  # dynamic nodes (batch items) it waits for (a worker: it expanded into)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"it": self.iteration, "st": self.status}
        if self.arrivals:
            out["arr"] = [[i, v is not DEAD, None if v is DEAD else v] for i, v in self.arrivals.items()]
        if self.laps:
            out["laps"] = self.laps
        if self.pending:
            out["pending"] = self.pending
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NodeState":
        arrivals = {int(i): (v if taken else DEAD) for i, taken, v in data.get("arr", ())} or None
        return cls(
            int(data.get("it", 0)), data.get("st", PENDING), arrivals, int(data.get("laps", 0)), int(data.get("pending", 0)),
        )

    def __repr__(self) -> str:
        return (f"NodeState(iteration={self.iteration}, status={self.status!r}, arrivals={self.arrivals!r}, "
                f"laps={self.laps}, pending={self.pending})")


class ArrivalStore(Protocol):
    """Where a traversal counts the arrivals of its *counted joins* (`counted_joins`), instead of in
    their states (a worker: an atomic counter of the run store, and each taken value a field of its
    own, written with the commit; the join is resolved by the job the count reaching its in-degree
    makes, see `Traversal.resolve`)."""

    def arrive(self, node_id: str, iteration: int, edge_index: int, taken: bool, value: Any) -> None:
        """Edge `edge_index` arrived at counted join `node_id` at `iteration` (taken, carrying `value`, or not)."""

    def taken(self, node_id: str, iteration: int, edge_indices: Sequence[int]) -> List[Tuple[int, Any]]:
        """(edge index, value) of those of `edge_indices` taken into `node_id` at `iteration`."""


@functools.lru_cache(maxsize=256)
def _repeatable_edges(graph: CompiledGraph) -> FrozenSet[int]:
    """The forward edges that can arrive more than once at one iteration of their target: those
    whose source is in a cycle body their target is not in (the source runs once per lap, the
    target once). An `ArrivalStore` only counts arrivals, so their arrivals stay in `arrivals`,
    where a later lap's replaces an earlier one's."""
    bodies = list(graph.cycle_bodies.values())
    return frozenset(e.index for e in graph.edges
                     if not e.back and any(e.source in body and e.target not in body for body in bodies))


@functools.lru_cache(maxsize=256)
def counted_joins(graph: CompiledGraph) -> FrozenSet[str]:
    """The joins whose arrivals an `ArrivalStore` counts: every node waiting for all of several
    edges, none of which can arrive twice at one iteration (`_repeatable_edges`). Their states do not
    change per arrival, so the predecessors of one join commit without touching one another."""
    repeatable = _repeatable_edges(graph)
    return frozenset(node.id for node in graph.nodes.values()
                     if node.in_count > 1 and not node.join_any and not any(e.index in repeatable for e in node.incoming))


class Traversal:
    """The pure state machine of one run over a `CompiledGraph`.

    `states` may be any mutable mapping of node id -> `NodeState`; a node missing from it is pending
    at iteration 0. `outstanding` counts activations handed out and not yet completed: the run has
    no more work when it reaches zero. With an `arrival_store`, a join's arrivals are counted in
    its state and their values put there (see `NodeState`); without one, they are in its state.
    """

    __slots__ = ("graph", "states", "outstanding", "arrival_store")

    def __init__(self, graph: CompiledGraph, states: Optional[MutableMapping[str, NodeState]] = None, outstanding: int = 0,
                 arrival_store: Optional[ArrivalStore] = None) -> None:
        self.graph = graph
        self.states: MutableMapping[str, NodeState] = states if states is not None else {}
        self.outstanding = outstanding
        self.arrival_store = arrival_store

    def state(self, node_id: str) -> NodeState:
        st = self.states.get(node_id)
        if st is None:
            st = self.states[node_id] = NodeState()
        return st

    def start(self) -> List[Activation]:
        """Activate the start nodes."""
        ready = []
        for node_id in self.graph.start_ids:
            st = self.state(node_id)
            st.status = READY
            ready.append(Activation(node_id, st.iteration))
        self.outstanding += len(ready)
        return ready

    def complete(
        self, node_id: str, iteration: int, decisions: List[Decision], *, counted: bool = True
    ) -> Tuple[List[Activation], List[str]]:
        """Record that `node_id` finished with these routing decisions; return (newly ready, newly skipped)."""
        if counted:
            self.outstanding -= 1
        st = self.states.get(node_id)
        if st is None:
            st = self.states[node_id] = NodeState()
        ready: List[Activation] = []
        skipped: List[str] = []
        if st.iteration != iteration or st.status == DONE:
            return ready, skipped  # a stale or repeated completion changes nothing
        loops_back = self.graph.nodes[node_id].back_edges_out
        if loops_back and self.graph.cycle_caps:
            error = self._cycle_limit(decisions)
            if error is not None:
                if counted:
                    self.outstanding += 1  # unchanged: the caller fails the node, which counts it
                raise error
        st.status = DONE
        if not loops_back:
            nodes, states = self.graph.nodes, self.states
            for edge, taken, value in decisions:
                target = nodes[edge.target]
                if taken and (target.in_count == 1 or target.join_any):  # inline: the common case
                    tst = states.get(target.id)
                    if tst is None:
                        tst = states[target.id] = NodeState()
                    elif tst.status != PENDING:
                        continue
                    tst.status = READY
                    ready.append(Activation(target.id, tst.iteration, value, True))
                else:
                    self._arrive(edge, taken, value, ready, skipped)
        else:
            self._complete_with_back_edges(decisions, ready, skipped)
        self.outstanding += len(ready)
        return ready, skipped

    def _cycle_limit(self, decisions: List[Decision]) -> Optional[LoopLimitError]:
        """The error to fail with if a taken back edge would run its raw cycle past its cap."""
        caps = self.graph.cycle_caps
        for edge, taken, _ in decisions:
            cap = caps.get(edge.index) if taken and edge.back else None
            if cap is not None and self.state(edge.source).laps + 1 >= cap:
                return LoopLimitError(
                    f"node {edge.source!r}: its cycle back to {edge.target!r} has run {cap} iterations, the most a "
                    f"cycle without a loop controller may run (max_cycle_iterations); use .loop(...) with a "
                    f"condition and max_iterations"
                )
        return None

    def _complete_with_back_edges(self, decisions: List[Decision], ready: List[Activation], skipped: List[str]) -> None:
        took_back = any(taken for edge, taken, _ in decisions if edge.back)
        for edge, taken, value in decisions:
            if edge.back or (took_back and not taken):
                continue  # a node that loops back decides its other edges on its next lap
            self._arrive(edge, taken, value, ready, skipped)
        for edge, taken, value in decisions:
            if edge.back and taken:
                self._reenter(edge, value, ready)
            elif edge.back and not took_back and edge.source in self.graph.entered_loops:
                self._skip_unentered(edge, ready, skipped)

    def expand(self, node_id: str, count: int) -> None:
        """`node_id` spawned `count` dynamic nodes; it completes once they all have."""
        self.state(node_id).pending = count
        self.outstanding += count

    def item_done(self, node_id: str) -> bool:
        """One dynamic node of `node_id` finished; True when it was the last."""
        self.outstanding -= 1
        st = self.state(node_id)
        st.pending -= 1
        return st.pending == 0

    def snapshot(self) -> Dict[str, Any]:
        """The whole state as JSON data (for a paused run)."""
        return {"states": {k: v.to_dict() for k, v in self.states.items()}, "outstanding": self.outstanding}

    @classmethod
    def restore(cls, graph: CompiledGraph, data: Mapping[str, Any]) -> "Traversal":
        states = {k: NodeState.from_dict(v) for k, v in (data.get("states") or {}).items()}
        unknown = [k for k in states if k not in graph.nodes]
        if unknown:
            raise BlueprintError([f"the saved run state names unknown node(s) {unknown}"], graph.blueprint.id)
        return cls(graph, states, int(data.get("outstanding", 0)))

    def fail(self, node_id: str, *, counted: bool = True) -> None:
        if counted:
            self.outstanding -= 1
        self.state(node_id).status = DONE

    def _arrive(self, edge: Edge, taken: bool, value: Any, ready: List[Activation], skipped: List[str]) -> None:
        nodes = self.graph.nodes
        target = nodes[edge.target]
        if taken and (target.in_count == 1 or target.join_any):  # the common case, without the work list
            st = self.states.get(target.id)
            if st is None:
                st = self.states[target.id] = NodeState()
            elif st.status != PENDING:
                return
            st.status = READY
            ready.append(Activation(target.id, st.iteration, value, True))
            return
        store = self.arrival_store
        counted = counted_joins(self.graph) if store is not None else frozenset()
        work = [(edge, taken, value)]
        while work:
            edge, taken, value = work.pop()
            target = nodes[edge.target]
            st = self.states.get(target.id)
            if target.id in counted:  # its state is left as it is: only its own job resolves it
                if st is None or st.status == PENDING:
                    store.arrive(target.id, st.iteration if st is not None else 0, edge.index, taken, value)  # type: ignore[union-attr]  # counted: a store
                continue
            if st is None:
                st = self.states[target.id] = NodeState()
            elif st.status != PENDING:
                continue
            if taken and (target.in_count == 1 or target.join_any):
                st.status = READY
                ready.append(Activation(target.id, st.iteration, value, True))
                continue
            if st.arrivals is None:
                st.arrivals = {}
            st.arrivals[edge.index] = value if taken else DEAD
            if (len(st.arrivals) if st.arrivals else 0) < target.in_count:
                continue
            self._join_ready(target, st, ready, skipped, work)

    def _join_ready(self, target: GraphNode, st: NodeState, ready: List[Activation], skipped: List[str],
                    work: List[Tuple[Edge, bool, Any]]) -> bool:
        """All of a join's edges arrived: it is ready with the taken values, or skipped (its
        outgoing edges then arrive not taken, through `work`). True when it is ready."""
        taken_values = self._taken_values(target, st) if not target.join_any else ()
        if taken_values:
            st.status = READY
            if len(taken_values) == 1:
                joined = taken_values[0][1]
            else:
                edges = self.graph.edges
                joined = {edges[i].source: v for i, v in taken_values}
            ready.append(Activation(target.id, st.iteration, joined, True))
            return True
        st.status = SKIPPED
        skipped.append(target.id)
        work.extend((e, False, None) for e in reversed(target.outgoing) if not e.back)
        return False

    def resolve(self, node_id: str) -> Tuple[Optional[Activation], List[Activation], List[str]]:
        """Resolve counted join `node_id`, all of whose edges arrived (its count reached its
        in-degree, which reserved it one outstanding activation): (its activation, None when it is
        skipped; what its skip made ready; what was skipped). The reservation becomes its activation,
        or is released when it is skipped."""
        target = self.graph.nodes[node_id]
        st = self.state(node_id)
        ready: List[Activation] = []
        skipped: List[str] = []
        work: List[Tuple[Edge, bool, Any]] = []
        if self._join_ready(target, st, ready, skipped, work):
            return ready[0], [], []
        self.outstanding -= 1
        for edge, taken, value in work:
            self._arrive(edge, taken, value, ready, skipped)
        self.outstanding += len(ready)
        return None, ready, skipped

    def _skip_unentered(self, edge: Edge, ready: List[Activation], skipped: List[str]) -> None:
        """A loop tested first broke before its `continue` was ever taken at this iteration: the
        body's start node, which only that edge reaches, is skipped (and so is what only it leads to)."""
        target = self.graph.nodes[edge.target]
        st = self.state(target.id)
        if st.status != PENDING or target.in_count:
            return
        st.status = SKIPPED
        skipped.append(target.id)
        for out in target.outgoing:
            if not out.back:
                self._arrive(out, False, None, ready, skipped)

    def _taken_values(self, target: GraphNode, st: NodeState) -> List[Tuple[int, Any]]:
        """(edge index, value) of the taken edges into a join all of whose edges arrived, in edge order."""
        found = [(i, v) for i, v in st.arrivals.items() if v is not DEAD] if st.arrivals else []
        if self.arrival_store is not None and target.id in counted_joins(self.graph):
            found += self.arrival_store.taken(target.id, st.iteration, [e.index for e in target.incoming])
        found.sort(key=lambda pair: pair[0])
        return found

    def _reenter(self, edge: Edge, value: Any, ready: List[Activation]) -> None:
        """A back edge was taken: reset its cycle body to a fresh iteration and run its target again."""
        laps = self.state(edge.source).laps + 1
        for node_id in self.graph.cycle_bodies[edge.index]:  # inner loops start over: their laps reset too
            old = self.states.get(node_id)
            self.states[node_id] = NodeState(iteration=(old.iteration + 1) if old is not None else 1)
        self.state(edge.source).laps = laps
        target = self.state(edge.target)
        target.status = READY
        ready.append(Activation(edge.target, target.iteration, value, True))

    def settle(self) -> Tuple[List[Activation], List[str]]:
        """Called when nothing is outstanding: fallback-only nodes that were never needed are
        skipped, so their own successors resolve too. Returns what became ready and skipped."""
        ready: List[Activation] = []
        skipped: List[str] = []
        for node_id in self.graph.fallback_only_ids:
            st = self.state(node_id)
            if st.status != PENDING:
                continue
            st.status = SKIPPED  # not reported: an unused fallback is not part of the flow
            for edge in self.graph.nodes[node_id].outgoing:
                if not edge.back:
                    self._arrive(edge, False, None, ready, skipped)
        self.outstanding += len(ready)
        return ready, skipped

    def unfinished(self) -> List[str]:
        """Nodes neither done nor skipped (ignoring fallback-only nodes that never had to run)."""
        stuck = []
        for node_id, node in self.graph.nodes.items():
            st = self.states.get(node_id)
            status = st.status if st is not None else PENDING
            if status in (DONE, SKIPPED):
                continue
            if status == PENDING and node_id in self.graph.fallback_ids and node.in_count == 0:
                continue
            stuck.append(node_id)
        return stuck
