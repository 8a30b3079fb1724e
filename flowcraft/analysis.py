"""Static tooling for blueprints: structural analysis and lint.

`analyze_blueprint(bp)` describes a *valid* blueprint: its start and terminal nodes, its cycles
(a loop's `continue` edge closes one) and whether it is a DAG. `lint_blueprint(bp, registry=None)`
is the tool for blueprints that may be broken: it reads the JSON form defensively, never raises,
and reports every problem as a `LintIssue` with a stable `code`:

========================  ========  ===============================================================
code                      severity  meaning
========================  ========  ===============================================================
``BAD_SHAPE``             error     the document, a list or a field has the wrong JSON type
``MISSING_FIELD``         error     blueprint without id/nodes, node without id/uses, edge without
                                    source/target
``DUPLICATE_ID``          error     two nodes share an id
``UNKNOWN_USES``          error     (registry given) a node's `uses` is neither registered nor a
                                    built-in
``UNKNOWN_BATCH_WORKER``  error     (registry given) a batch's `params.workerUsesKey` is neither
                                    registered nor a built-in
``UNKNOWN_SUBFLOW``       error     (blueprints given) a subflow's `params.blueprintId` is not among
                                    them
``BAD_JOIN_STRATEGY``     error     `config.joinStrategy` is not "all" or "any"
``BAD_CONFIG``            error     config is not an object, or a bad maxRetries/retryDelay/timeout/
                                    fallback value
``UNKNOWN_FALLBACK``      error     `config.fallback` names no node
``LOOP_WITHOUT_CONTINUE`` error     a `loop-controller` node has no outgoing `continue` edge
``DANGLING_EDGE``         error     an edge's source or target is not a node id
``BAD_EXPRESSION``        error     an edge condition/transform (or a loop controller's
                                    `params.condition`) the evaluator refuses
``NO_START_NODE``         error     a non-empty blueprint where every node has an incoming edge; a
                          (warning) warning when it has a cycle, where a non-strict run starts (TS)
``ORPHAN_NODE``           warning   a node unreachable from every start node (following edges and
                                    fallbacks)
``UNBOUNDED_CYCLE``       warning   a reachable cycle with no loop controller on it: it runs until the
                                    runtime's `max_cycle_iterations` (default 1000) fails the run
``UNKNOWN_NAME``          warning   an expression reads a top-level name that is neither `result`,
                          (error)   `input`, `context`, a node id, a key some node's `inputs` names
                                    (or a batch's `outputKey`, a subflow's `outputs`), nor one of
                                    `context_keys=`; an error when `context_keys` is given (the
                                    caller listed every key), a warning otherwise (nodes may write
                                    keys lint cannot see)
========================  ========  ===============================================================

`LintResult.is_valid` is False when any issue is an error. A blueprint that lints valid (without a
registry) loads with `WorkflowBlueprint.from_dict`. Issues come in a deterministic order: the
blueprint's own fields, then each node in order, then each edge in order, then the references
between them (fallbacks, loop `continue` edges, node by node), then the names expressions read
(nodes' loop conditions, then edges), then the graph-wide checks.
"""
from __future__ import annotations

import difflib
import json
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import attrs

if TYPE_CHECKING:  # typing.TypeGuard is Python 3.10+
    from typing_extensions import TypeGuard

from .errors import BlueprintError
from .blueprint import EdgeDefinition, NodeConfig, NodeDefinition, WorkflowBlueprint, as_blueprint
from .graph import LOOP_CONTROLLER, cycle_entry_ids, start_node_ids

__all__ = [
    "BUILTIN_USES", "BlueprintAnalysis", "ERROR", "LintIssue", "LintResult", "WARNING",
    "analyze_blueprint", "lint_blueprint",
]

ERROR, WARNING = "error", "warning"

#: `uses` keys the engine implements itself; never reported as UNKNOWN_USES.
BUILTIN_USES = frozenset({LOOP_CONTROLLER, "batch-scatter", "batch-gather", "wait", "webhook", "sleep", "subflow"})

BAD_SHAPE = "BAD_SHAPE"
MISSING_FIELD = "MISSING_FIELD"
DUPLICATE_ID = "DUPLICATE_ID"
UNKNOWN_USES = "UNKNOWN_USES"
UNKNOWN_BATCH_WORKER = "UNKNOWN_BATCH_WORKER"
UNKNOWN_SUBFLOW = "UNKNOWN_SUBFLOW"
BAD_JOIN_STRATEGY = "BAD_JOIN_STRATEGY"
BAD_CONFIG = "BAD_CONFIG"
UNKNOWN_FALLBACK = "UNKNOWN_FALLBACK"
LOOP_WITHOUT_CONTINUE = "LOOP_WITHOUT_CONTINUE"
DANGLING_EDGE = "DANGLING_EDGE"
BAD_EXPRESSION = "BAD_EXPRESSION"
NO_START_NODE = "NO_START_NODE"
ORPHAN_NODE = "ORPHAN_NODE"
UNBOUNDED_CYCLE = "UNBOUNDED_CYCLE"
UNKNOWN_NAME = "UNKNOWN_NAME"

_WARNING_CODES = frozenset({ORPHAN_NODE, UNBOUNDED_CYCLE})
#: names every expression may read (SPEC 5 "Strict expressions"), and the keys the engine writes
_ALWAYS_KNOWN = frozenset({"result", "input", "context", "_awaitingNodeIds", "_awaitingDetails"})


# ================================================================================================
# Analysis
# ================================================================================================
@attrs.frozen
class BlueprintAnalysis:
    """The structure of a valid blueprint. Node ids are listed in blueprint order."""

    start_node_ids: Tuple[str, ...]
    terminal_node_ids: Tuple[str, ...]
    cycles: List[List[str]] = attrs.field(hash=False)  # each in traversal order, e.g. [a, b, c] for a->b->c->a
    is_dag: bool
    node_count: int
    edge_count: int

    def to_dict(self) -> Dict[str, Any]:
        return {
            "start_node_ids": list(self.start_node_ids),
            "terminal_node_ids": list(self.terminal_node_ids),
            "cycles": [list(c) for c in self.cycles],
            "is_dag": self.is_dag,
            "node_count": self.node_count,
            "edge_count": self.edge_count,
        }


_as_blueprint = as_blueprint


def analyze_blueprint(bp: Any) -> BlueprintAnalysis:
    """Start and terminal nodes, cycles and DAG-ness of a valid blueprint.

    `bp` is a `WorkflowBlueprint`, its dict (or JSON) form — loaded with `from_dict`, so an invalid
    one raises `BlueprintError` (use `lint_blueprint` for those) — or a `Flow`.
    """
    blueprint = _as_blueprint(bp)
    node_ids = _unique([n.id for n in blueprint.nodes])
    known = set(node_ids)
    edges = [(e.source, e.target) for e in blueprint.edges if e.source in known and e.target in known]

    has_out = {s for s, _ in edges}
    has_edge = has_out | {t for _, t in edges}
    fallbacks = {n.settings.fallback for n in blueprint.nodes if n.settings.fallback}
    terminal = tuple(
        n for n in node_ids if n not in has_out and not (n in fallbacks and n not in has_edge)
    )
    starts = tuple(_unique(start_node_ids(blueprint)))
    cycles = _find_cycles(node_ids, edges, starts)
    return BlueprintAnalysis(
        start_node_ids=starts,
        terminal_node_ids=terminal,
        cycles=cycles,
        is_dag=not cycles,
        node_count=len(blueprint.nodes),
        edge_count=len(blueprint.edges),
    )


def _unique(items: Iterable[Any]) -> List[Any]:
    seen: Set[Any] = set()
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _find_cycles(node_ids: List[str], edges: List[Tuple[str, str]], roots: Iterable[str]) -> List[List[str]]:
    """One cycle per back edge of an iterative depth-first search (no recursion limit).

    The search starts at the start nodes, then at any node not yet visited, in blueprint order;
    successors are followed in edge order. A back edge u -> v yields the DFS path v ... u. Each
    distinct cycle (as a node sequence) is reported once, in discovery order, so the result is
    deterministic for a given blueprint.
    """
    successors: Dict[str, List[str]] = {n: [] for n in node_ids}
    for source, target in edges:
        successors[source].append(target)

    WHITE, GREY, BLACK = 0, 1, 2
    colour = {n: WHITE for n in node_ids}
    cycles: List[List[str]] = []
    found: Set[Tuple[str, ...]] = set()
    for root in list(roots) + node_ids:
        if colour.get(root, BLACK) != WHITE:
            continue
        path: List[str] = [root]
        position = {root: 0}
        colour[root] = GREY
        stack = [iter(successors[root])]
        while stack:
            advanced = False
            for nxt in stack[-1]:
                state = colour[nxt]
                if state == WHITE:
                    colour[nxt] = GREY
                    position[nxt] = len(path)
                    path.append(nxt)
                    stack.append(iter(successors[nxt]))
                    advanced = True
                    break
                if state == GREY:  # back edge: the path from nxt to the top closes a cycle
                    cycle = tuple(path[position[nxt]:])
                    if cycle not in found:
                        found.add(cycle)
                        cycles.append(list(cycle))
            if not advanced:
                stack.pop()
                done = path.pop()
                del position[done]
                colour[done] = BLACK
    return cycles


# ================================================================================================
# Lint
# ================================================================================================
@attrs.frozen
class LintIssue:
    """One problem. `node_id` is the node at fault (for an edge: its source, when a string);
    `edge_index` is the edge's position in `edges`, for edge problems."""

    code: str
    message: str
    node_id: Optional[str] = None
    severity: str = ERROR
    edge_index: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "code": self.code, "severity": self.severity, "message": self.message,
            "node_id": self.node_id, "edge_index": self.edge_index,
        }

    def __str__(self) -> str:
        return f"{self.severity} {self.code}: {self.message}"


@attrs.frozen
class LintResult:
    is_valid: bool
    issues: Tuple[LintIssue, ...] = ()

    @property
    def errors(self) -> Tuple[LintIssue, ...]:
        return tuple(i for i in self.issues if i.severity == ERROR)

    @property
    def warnings(self) -> Tuple[LintIssue, ...]:
        return tuple(i for i in self.issues if i.severity == WARNING)

    @property
    def codes(self) -> Tuple[str, ...]:
        """The codes of the issues, in issue order (with repeats)."""
        return tuple(i.code for i in self.issues)

    def to_dict(self) -> Dict[str, Any]:
        return {"is_valid": self.is_valid, "issues": [i.to_dict() for i in self.issues]}


def _label(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_name(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and value != ""


def _type_name(value: Any) -> str:
    return type(value).__name__


def _raw_form(bp: Any) -> Any:
    """The dict form of whatever was given, without validating it."""
    if isinstance(bp, WorkflowBlueprint):
        return _blueprint_dict(bp)
    if isinstance(bp, (str, bytes, bytearray)):
        return json.loads(bp)  # a ValueError is reported by the caller
    to_blueprint = getattr(bp, "to_blueprint", None)  # a `Flow`: use its parts, valid or not
    if callable(to_blueprint) and not isinstance(bp, Mapping):
        nodes, edges = getattr(bp, "_nodes", None), getattr(bp, "_edges", None)
        if isinstance(nodes, list) and isinstance(edges, list):
            # the Flow's parts as they are, valid or not: the lint reports what is wrong with them
            return _blueprint_dict(WorkflowBlueprint(getattr(bp, "id", None), nodes, edges,  # type: ignore[arg-type]
                                                     getattr(bp, "metadata", None)))
        return _blueprint_dict(to_blueprint())
    return bp


def _blueprint_dict(bp: WorkflowBlueprint) -> Dict[str, Any]:
    try:
        return bp.to_dict()
    except Exception:  # built by hand with odd values: convert piece by piece
        def node(n: Any) -> Any:
            if not isinstance(n, NodeDefinition):
                return n
            out: Dict[str, Any] = {"id": n.id, "uses": n.uses}
            for key in ("params", "inputs"):
                if getattr(n, key) is not None:
                    out[key] = getattr(n, key)
            if n.config is not None:
                out["config"] = n.config.to_dict() if isinstance(n.config, NodeConfig) else n.config
            return out

        def edge(e: Any) -> Any:
            return e.to_dict() if isinstance(e, EdgeDefinition) else e

        return {"id": bp.id, "nodes": [node(n) for n in bp.nodes], "edges": [edge(e) for e in bp.edges]}


def _registry_keys(registry: Any) -> Any:
    if registry is None:
        return None
    if not isinstance(registry, Mapping) and hasattr(registry, "registry"):  # a FlowRuntime or a Flow
        registry = registry.registry
    return registry


def _in_registry(registry: Any, key: Any) -> bool:
    try:
        return key in registry
    except Exception:
        return False


class _Linter:
    def __init__(self, registry: Any, evaluator: Any, context_keys: Optional[Iterable[str]] = None,
                 blueprints: Any = None) -> None:
        self.issues: List[LintIssue] = []
        self.registry = _registry_keys(registry)
        if blueprints is None and isinstance(getattr(registry, "blueprints", None), Mapping):
            blueprints = registry.blueprints  # a FlowRuntime: its blueprints
        self.blueprints: Optional[Set[str]] = None if blueprints is None else {
            b if isinstance(b, str) else str(getattr(b, "id", "")) for b in blueprints}
        self.context_keys = None if context_keys is None else {k for k in context_keys if isinstance(k, str)}
        self._evaluator = evaluator
        self._evaluator_loaded = evaluator is not None

    def add(self, code: str, message: str, node_id: Any = None, edge_index: Optional[int] = None,
            severity: Optional[str] = None) -> None:
        self.issues.append(LintIssue(
            code=code,
            message=message,
            node_id=node_id if isinstance(node_id, str) else None,
            severity=severity or (WARNING if code in _WARNING_CODES else ERROR),
            edge_index=edge_index,
        ))

    # --- expressions -----------------------------------------------------------------------------
    @property
    def evaluator(self) -> Any:
        if not self._evaluator_loaded:
            self._evaluator_loaded = True
            from .evaluator import default_evaluator  # lazily: lint must import without it

            self._evaluator = default_evaluator()
        return self._evaluator

    def expression_problem(self, source: Any) -> Optional[str]:
        """Why `source` is not an acceptable expression, or None."""
        if not isinstance(source, str):
            return f"must be a string expression, not {_type_name(source)}"
        from .errors import ExpressionError

        try:
            self.evaluator.compile(source)
        except ExpressionError as exc:
            return str(exc) or "cannot be parsed"
        except Exception as exc:  # lint never raises, even on an evaluator bug
            return f"the evaluator failed on it: {type(exc).__name__}: {exc}"
        return None

    # --- the passes ------------------------------------------------------------------------------
    def run(self, data: Any) -> None:
        if not isinstance(data, Mapping):
            self.add(BAD_SHAPE, f"a blueprint must be a JSON object, not {_type_name(data)}")
            return
        self.check_blueprint_fields(data)
        nodes = self.entries(data, "nodes", required=True)
        node_ids = self.check_nodes(nodes)
        edges = self.entries(data, "edges", required=False)
        self.check_edges(edges, node_ids)
        self.check_references(nodes, edges, node_ids)
        self.check_names(nodes, edges, node_ids)
        metadata = data.get("metadata")
        self.check_graph(nodes, edges, node_ids, dict(metadata) if isinstance(metadata, Mapping) else None)

    def check_blueprint_fields(self, data: Mapping[str, Any]) -> None:
        if "id" not in data or data["id"] is None or data["id"] == "":
            self.add(MISSING_FIELD, "the blueprint has no 'id'")
        elif not isinstance(data["id"], str):
            self.add(BAD_SHAPE, f"the blueprint 'id' must be a string, not {_label(data['id'])}")
        metadata = data.get("metadata")
        if metadata is not None and not isinstance(metadata, Mapping):
            self.add(BAD_SHAPE, f"'metadata' must be an object, not {_type_name(metadata)}")

    def entries(self, data: Mapping[str, Any], key: str, *, required: bool) -> List[Tuple[int, Any]]:
        """(index, entry) for each object in data[key]; reports a missing or non-list value."""
        items = data.get(key)
        if items is None:
            if required:
                self.add(MISSING_FIELD, f"the blueprint has no '{key}' list")
            return []
        if not isinstance(items, list):
            self.add(BAD_SHAPE, f"'{key}' must be a list, not {_type_name(items)}")
            return []
        out = []
        kind = key[:-1]
        for index, entry in enumerate(items):
            if isinstance(entry, Mapping):
                out.append((index, entry))
            else:
                self.add(BAD_SHAPE, f"{kind} #{index} must be an object, not {_type_name(entry)}",
                         edge_index=index if key == "edges" else None)
        return out

    def check_nodes(self, nodes: List[Tuple[int, Mapping[str, Any]]]) -> Set[str]:
        ids: Set[str] = set()
        for index, node in nodes:
            node_id = node.get("id")
            where = f"node {node_id!r}" if _is_name(node_id) else f"node #{index}"
            if node_id is None or node_id == "":
                self.add(MISSING_FIELD, f"{where} has no 'id'")
            elif not isinstance(node_id, str):
                self.add(BAD_SHAPE, f"{where}: 'id' must be a string, not {_label(node_id)}")
            elif node_id in ids:
                self.add(DUPLICATE_ID, f"{where}: duplicate node id (node #{index})", node_id)
            else:
                ids.add(node_id)

            uses = node.get("uses")
            if uses is None or uses == "":
                self.add(MISSING_FIELD, f"{where} has no 'uses'", node_id)
            elif not isinstance(uses, str):
                self.add(BAD_SHAPE, f"{where}: 'uses' must be a string, not {_label(uses)}", node_id)
            elif (self.registry is not None and uses not in BUILTIN_USES
                  and not _in_registry(self.registry, uses)):
                self.add(UNKNOWN_USES, f"{where}: uses {uses!r}, which is neither in the registry nor a built-in",
                         node_id)

            params = node.get("params")
            if isinstance(params, Mapping) and uses == "batch-scatter" and self.registry is not None:
                worker = params.get("workerUsesKey")
                if isinstance(worker, str) and worker and worker not in BUILTIN_USES and not _in_registry(self.registry, worker):
                    self.add(UNKNOWN_BATCH_WORKER, f"{where}: batch worker uses {worker!r}, which is neither in the "
                                                   "registry nor a built-in", node_id)
            if isinstance(params, Mapping) and uses == "subflow" and self.blueprints is not None:
                child = params.get("blueprintId")
                if isinstance(child, str) and child and child not in self.blueprints:
                    known = ", ".join(sorted(self.blueprints)) or "none"
                    self.add(UNKNOWN_SUBFLOW, f"{where}: subflow blueprintId {child!r} is not among the runtime's "
                                              f"blueprints (known: {known})", node_id)
            if params is not None and not isinstance(params, Mapping):
                self.add(BAD_SHAPE, f"{where}: 'params' must be an object, not {_type_name(params)}", node_id)
            inputs = node.get("inputs")
            if not (inputs is None or isinstance(inputs, str) or (
                isinstance(inputs, Mapping)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in inputs.items())
            )):
                self.add(BAD_SHAPE, f"{where}: 'inputs' must be a context key or an object of name -> key",
                         node_id)
            self.check_config(node, where, node_id)
            if uses == LOOP_CONTROLLER and isinstance(params, Mapping) and "condition" in params:
                problem = self.expression_problem(params["condition"])
                if problem:
                    self.add(BAD_EXPRESSION, f"{where}: loop condition {_label(params['condition'])}: {problem}",
                             node_id)
        return ids

    def check_config(self, node: Mapping[str, Any], where: str, node_id: Any) -> None:
        config = node.get("config")
        if config is None:
            return
        if not isinstance(config, Mapping):
            self.add(BAD_CONFIG, f"{where}: 'config' must be an object, not {_type_name(config)}", node_id)
            return
        join = config.get("joinStrategy")
        if join is not None and join not in ("all", "any"):
            self.add(BAD_JOIN_STRATEGY, f"{where}: joinStrategy must be 'all' or 'any', not {_label(join)}",
                     node_id)
        retries = config.get("maxRetries")
        if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool) or retries < 1):
            self.add(BAD_CONFIG, f"{where}: maxRetries must be a whole number >= 1, not {_label(retries)}",
                     node_id)
        for key in ("retryDelay", "timeout"):
            value = config.get(key)
            if value is not None and (
                not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0
            ):
                self.add(BAD_CONFIG, f"{where}: {key} must be a non-negative number of milliseconds, "
                                     f"not {_label(value)}", node_id)
        fallback = config.get("fallback")
        if fallback is not None and not isinstance(fallback, str):
            self.add(BAD_CONFIG, f"{where}: fallback must be a node id, not {_label(fallback)}", node_id)

    def check_edges(self, edges: List[Tuple[int, Mapping[str, Any]]], node_ids: Set[str]) -> None:
        for index, edge in edges:
            source, target = edge.get("source"), edge.get("target")
            where = f"edge #{index} ({source!r} -> {target!r})"
            for end, value in (("source", source), ("target", target)):
                if value is None or value == "":
                    self.add(MISSING_FIELD, f"{where} has no '{end}'", source, index)
                elif not isinstance(value, str):
                    self.add(BAD_SHAPE, f"{where}: '{end}' must be a node id, not {_label(value)}", source, index)
                elif value not in node_ids:
                    self.add(DANGLING_EDGE, f"{where}: {end} {value!r} is not a node id", source, index)
            action = edge.get("action")
            if action is not None and not isinstance(action, str):
                self.add(BAD_SHAPE, f"{where}: 'action' must be a string, not {_label(action)}", source, index)
            for kind in ("condition", "transform"):
                if edge.get(kind) is None or edge.get(kind) == "":  # "" is no expression, as in TS
                    continue
                problem = self.expression_problem(edge[kind])
                if problem:
                    self.add(BAD_EXPRESSION, f"{where}: {kind} {_label(edge[kind])}: {problem}", source, index)

    def check_references(self, nodes: List[Tuple[int, Mapping[str, Any]]],
                         edges: List[Tuple[int, Mapping[str, Any]]], node_ids: Set[str]) -> None:
        continues = {
            e.get("source") for _, e in edges
            if e.get("action") == "continue" and isinstance(e.get("source"), str)
        }
        reported: Set[str] = set()
        for index, node in nodes:
            node_id = node.get("id")
            where = f"node {node_id!r}" if _is_name(node_id) else f"node #{index}"
            config = node.get("config")
            fallback = config.get("fallback") if isinstance(config, Mapping) else None
            if isinstance(fallback, str) and fallback not in node_ids:
                self.add(UNKNOWN_FALLBACK, f"{where}: fallback {fallback!r} is not a node id", node_id)
            if node.get("uses") == LOOP_CONTROLLER and _is_name(node_id) and node_id not in reported:
                reported.add(node_id)
                if node_id not in continues:
                    self.add(LOOP_WITHOUT_CONTINUE,
                             f"{where}: loop controller has no outgoing edge with action 'continue'", node_id)

    def check_names(self, nodes: List[Tuple[int, Mapping[str, Any]]],
                    edges: List[Tuple[int, Mapping[str, Any]]], node_ids: Set[str]) -> None:
        """UNKNOWN_NAME: a top-level name an expression reads that nothing is known to provide."""
        known = self.known_keys(nodes, node_ids)
        for index, node in nodes:
            params = node.get("params")
            if node.get("uses") == LOOP_CONTROLLER and isinstance(params, Mapping):
                node_id = node.get("id")
                where = f"node {node_id!r}" if _is_name(node_id) else f"node #{index}"
                self.check_expression_names(known, f"{where}: loop condition", params.get("condition"), node_id, None)
        for index, edge in edges:
            where = f"edge #{index} ({edge.get('source')!r} -> {edge.get('target')!r})"
            for kind in ("condition", "transform"):
                self.check_expression_names(known, f"{where}: {kind}", edge.get(kind), edge.get("source"), index)

    def known_keys(self, nodes: List[Tuple[int, Mapping[str, Any]]], node_ids: Set[str]) -> Set[str]:
        known = set(_ALWAYS_KNOWN) | set(node_ids) | set(self.context_keys or ())
        for node_id in node_ids:
            known.update(("_outputs." + node_id, "_inputs." + node_id))
        for _, node in nodes:
            inputs = node.get("inputs")
            if isinstance(inputs, str):
                known.add(inputs)
            elif isinstance(inputs, Mapping):
                known.update(v for v in inputs.values() if isinstance(v, str))
            params = node.get("params")
            if not isinstance(params, Mapping):
                continue
            if node.get("uses") == "batch-scatter" or node.get("uses") == "batch-gather":
                if isinstance(params.get("outputKey"), str):
                    known.add(params["outputKey"])
            if node.get("uses") == "subflow" and isinstance(params.get("outputs"), Mapping):
                known.update(k for k in params["outputs"] if isinstance(k, str))
        return known

    def check_expression_names(self, known: Set[str], where: str, source: Any, node_id: Any,
                               edge_index: Optional[int]) -> None:
        if not isinstance(source, str) or self.expression_problem(source):
            return  # not an expression: BAD_EXPRESSION says so
        from .errors import ExpressionError
        from .evaluator import top_level_names

        try:
            names = top_level_names(source)
        except ExpressionError:
            return
        for name in names:
            if name in known or any(k.startswith(name + ".") for k in known):
                continue  # a dotted key (`_outputs.a`, `order.total`) is read through its head
            hint = difflib.get_close_matches(name, sorted(k for k in known - _ALWAYS_KNOWN if not k.startswith("_")), n=1)
            self.add(
                UNKNOWN_NAME,
                f"{where} {_label(source)} reads {name!r}, which is not a node id, a key some node's "
                f"inputs name, nor in context_keys" + (f" (did you mean {hint[0]!r}?)" if hint else ""),
                node_id, edge_index, severity=ERROR if self.context_keys is not None else WARNING,
            )

    def check_graph(self, nodes: List[Tuple[int, Mapping[str, Any]]],
                    edges: List[Tuple[int, Mapping[str, Any]]], node_ids: Set[str],
                    metadata: Optional[Dict[str, Any]] = None) -> None:
        """NO_START_NODE, ORPHAN_NODE and UNBOUNDED_CYCLE, on the well-formed part of the blueprint."""
        definitions: List[NodeDefinition] = []
        seen: Set[str] = set()
        for _, node in nodes:
            node_id = node.get("id")
            if not _is_name(node_id) or node_id in seen:
                continue
            seen.add(node_id)
            config = node.get("config")
            fallback = config.get("fallback") if isinstance(config, Mapping) else None
            definitions.append(NodeDefinition(
                id=node_id,
                uses=node.get("uses"),  # type: ignore[arg-type]  # unchecked here: MISSING_FIELD reports a bad one
                config=NodeConfig(fallback=fallback if _is_name(fallback) and fallback in node_ids else None),
            ))
        links = [
            EdgeDefinition(e["source"], e["target"], e.get("action") if isinstance(e.get("action"), str) else None)
            for _, e in edges
            if isinstance(e.get("source"), str) and e["source"] in node_ids
            and isinstance(e.get("target"), str) and e["target"] in node_ids
        ]
        if not definitions:
            return
        # as TS's lint, an edge from an unknown node still enters its target: not a start node
        entering = [EdgeDefinition(str(e.get("source")), e["target"]) for _, e in edges
                    if not (isinstance(e.get("source"), str) and e["source"] in node_ids)
                    and isinstance(e.get("target"), str) and e["target"] in node_ids]
        starts = _unique(start_node_ids(WorkflowBlueprint("lint", definitions, links)))
        if not starts:
            starts = list(cycle_entry_ids(WorkflowBlueprint("lint", definitions, links, metadata=metadata)))
            if not starts:
                self.add(NO_START_NODE, "no start node: every node has an incoming edge "
                                        "(a run would have nowhere to begin)")
                return
            self.add(NO_START_NODE, "no start node: a run starts at each cycle's entry "
                                    f"({', '.join(map(repr, starts))}; `metadata.cycleEntryPoints` or the "
                                    "cycle's first node), and a strict runtime refuses it", severity=WARNING)
        if entering:
            starts = _unique(start_node_ids(WorkflowBlueprint("lint", definitions, links + entering)))
        successors: Dict[str, List[str]] = {d.id: [] for d in definitions}
        for link in links:
            successors[link.source].append(link.target)
        for definition in definitions:
            if definition.config is not None and definition.config.fallback:
                successors[definition.id].append(definition.config.fallback)
        reached = set(starts)
        todo = list(starts)
        while todo:
            for nxt in successors[todo.pop()]:
                if nxt not in reached:
                    reached.add(nxt)
                    todo.append(nxt)
        for definition in definitions:
            if definition.id not in reached:
                self.add(ORPHAN_NODE, f"node {definition.id!r} is unreachable from every start node "
                                      f"({', '.join(map(repr, starts))})", definition.id)
        uses = {d.id: d.uses for d in definitions}
        for cycle in _find_cycles([d.id for d in definitions], [(l.source, l.target) for l in links], starts):
            if cycle[0] in reached and not any(uses.get(n) == LOOP_CONTROLLER for n in cycle):  # orphans never run
                path = " -> ".join(map(repr, cycle + cycle[:1]))
                self.add(UNBOUNDED_CYCLE, f"the cycle {path} has no loop controller: it runs until "
                                          f"max_cycle_iterations (default 1000) fails the run; "
                                          f"use a loop (`.loop(...)`) with a condition", cycle[-1])


def _check_loadable(linter: "_Linter", data: Any) -> None:
    """What the loader alone refuses (bounds on ids, nesting, numbers), as BAD_SHAPE errors: lint
    never calls valid what `WorkflowBlueprint.from_dict` refuses, and the rules have one home."""
    try:
        WorkflowBlueprint.from_dict(data)
    except BlueprintError as exc:
        for problem in exc.problems:
            linter.add(BAD_SHAPE, problem)
    except Exception as exc:  # lint never raises on bad input
        linter.add(BAD_SHAPE, f"cannot load the blueprint: {type(exc).__name__}: {exc}")


def lint_blueprint(bp: Any, registry: Any = None, *, evaluator: Any = None,
                   context_keys: Optional[Iterable[str]] = None, blueprints: Any = None) -> LintResult:
    """Every problem with `bp`, which may be invalid; never raises on bad input.

    `bp` is a blueprint dict (read as is: never through `from_dict`), a `WorkflowBlueprint`, a JSON
    string, or a `Flow`. With a `registry` (a mapping of `uses` keys, a `Registry`, or anything with
    a `.registry` such as a `FlowRuntime`), nodes whose `uses` is neither registered nor a built-in
    are reported. `evaluator` checks expressions (default: the safe default evaluator; one with
    only `evaluate` is accepted too). `context_keys` are the context keys a run has besides node
    ids and `inputs` keys (the initial context, what nodes write): an expression reading a name
    that is none of them is an UNKNOWN_NAME error; without `context_keys`, a warning. With a
    registry, a batch whose worker `uses` is unknown is UNKNOWN_BATCH_WORKER; with `blueprints` (ids,
    blueprints, or a mapping of id -> blueprint; default: a `FlowRuntime` registry's), a subflow whose
    `blueprintId` is not among them is UNKNOWN_SUBFLOW.
    """
    if evaluator is not None:
        from .evaluator import as_evaluator

        try:
            evaluator = as_evaluator(evaluator)
        except TypeError:
            pass  # reported on each expression as "the evaluator failed on it"
    linter = _Linter(registry, evaluator, context_keys, blueprints)
    try:
        data = _raw_form(bp)
    except ValueError as exc:
        linter.add(BAD_SHAPE, f"not valid JSON: {exc}")
    except Exception as exc:
        linter.add(BAD_SHAPE, f"cannot read the blueprint: {type(exc).__name__}: {exc}")
    else:
        linter.run(data)
        if not any(i.severity == ERROR for i in linter.issues):
            _check_loadable(linter, data)
    issues = tuple(linter.issues)
    return LintResult(is_valid=not any(i.severity == ERROR for i in issues), issues=issues)
