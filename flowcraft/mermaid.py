"""Mermaid flowcharts of a blueprint, and of one run of it.

`generate_mermaid(bp)` draws the graph: one line per node (its id, and its `uses` on a second
line), one line per edge (labelled with its action and/or condition), then one dashed
`fallback` link per node with a `config.fallback`. Loop controllers are rhombi, `wait` nodes
stadiums, `sleep` nodes hexagons, subflows subroutines, batch scatter/gather trapezoids; a loop's
`continue` edges are dashed.

`generate_mermaid_for_run(bp, result_or_events)` adds the run: classes `executed` (green),
`skipped` (grey, dashed) and `failed` (red) (plus `awaiting`, amber, for a paused run), and a
`linkStyle` highlighting every edge between two executed nodes.

Node ids may contain `-` and `.`, which Mermaid ids may not: each node gets a safe id (other
characters replaced by `_`, Mermaid keywords such as `end` suffixed, and `_2`, `_3`... added when
two would collide). The mapping is deterministic: an id that is already safe keeps itself.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from .blueprint import WorkflowBlueprint, as_blueprint
from .events import Event
from .graph import LOOP_CONTROLLER
from .result import WorkflowResult

__all__ = ["CLASS_DEFS", "generate_mermaid", "generate_mermaid_for_run", "link_taken", "mermaid_ids", "node_classes",
           "run_states"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
_SAFE = re.compile(r"^[A-Za-z0-9_]+$")
# Words the flowchart grammar reads as keywords at the start of a statement or as a node id.
_KEYWORDS = frozenset({
    "end", "graph", "flowchart", "subgraph", "style", "classdef", "class", "click", "linkstyle",
    "direction", "default", "call", "href", "interpolate", "callback", "flowchart-elk",
})

#: `classDef` lines for the run classes.
CLASS_DEFS = {
    "executed": "fill:#c8e6c9,stroke:#2e7d32,stroke-width:2px,color:#1b5e20",
    "skipped": "fill:#eeeeee,stroke:#9e9e9e,stroke-width:1px,stroke-dasharray:5 5,color:#757575",
    "failed": "fill:#ffcdd2,stroke:#c62828,stroke-width:2px,color:#b71c1c",
    "awaiting": "fill:#fff3cd,stroke:#f9a825,stroke-width:2px,color:#6d4c00",
}
_EXECUTED_LINK = "stroke:#2e7d32,stroke-width:3px"

# uses -> (opening, closing) of the node's shape
_SHAPES = {
    LOOP_CONTROLLER: ("{", "}"),  # rhombus
    "wait": ("([", "])"),  # stadium
    "sleep": ("{{", "}}"),  # hexagon
    "subflow": ("[[", "]]"),  # subroutine
    "batch-scatter": ("[/", "\\]"),  # trapezoid
    "batch-gather": ("[\\", "/]"),  # inverted trapezoid
}
_DEFAULT_SHAPE = ("[", "]")


_as_blueprint = as_blueprint


_ENTITY_LIKE = re.compile(r"#(?=[A-Za-z0-9]+;)")


def _escape(text: Any) -> str:
    """Text for inside a double-quoted Mermaid label: `"` -> `#quot;`, `<` -> `#lt;` (no HTML), a
    `#` that would start an entity code -> `#35;`, line breaks -> spaces. Everything else (`>`,
    `|`, `&&`...) is legal inside quotes and kept readable."""
    text = _ENTITY_LIKE.sub("#35;", str(text))
    text = text.replace('"', "#quot;").replace("<", "#lt;")
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text


def _usable(candidate: str) -> bool:
    return bool(_SAFE.match(candidate)) and candidate.lower() not in _KEYWORDS


def mermaid_ids(node_ids: Iterable[Any]) -> Dict[Any, str]:
    """A unique, Mermaid-safe id for each node id (deterministic; safe ids map to themselves)."""
    ordered = list(dict.fromkeys(node_ids))
    out: Dict[Any, str] = {}
    taken: Set[str] = set()
    for node_id in ordered:  # first pass: ids that are already safe keep themselves
        if isinstance(node_id, str) and _usable(node_id):
            out[node_id] = node_id
            taken.add(node_id)
    for node_id in ordered:
        if node_id in out:
            continue
        base = _UNSAFE.sub("_", str(node_id)) or "node"
        if base.lower() in _KEYWORDS:
            base += "_"
        candidate, suffix = base, 2
        while candidate in taken:
            candidate = f"{base}_{suffix}"
            suffix += 1
        out[node_id] = candidate
        taken.add(candidate)
    return out


def _edge_label(action: Optional[str], condition: Optional[str]) -> str:
    parts = [str(p) for p in (action, condition) if p is not None and p != ""]
    return " / ".join(parts)


def _render(blueprint: WorkflowBlueprint) -> Tuple[List[str], List[Tuple[Any, Any]], Dict[Any, str]]:
    """The diagram's lines, the (source, target) of each emitted link in order, and the id map."""
    endpoints = [n.id for n in blueprint.nodes]
    for edge in blueprint.edges:  # an unvalidated blueprint may reference unknown nodes
        endpoints.extend((edge.source, edge.target))
    ids = mermaid_ids(endpoints)

    lines = ["flowchart TD"]
    drawn: Set[Any] = set()
    for node in blueprint.nodes:
        if node.id in drawn:
            continue
        drawn.add(node.id)
        opening, closing = _SHAPES.get(node.uses, _DEFAULT_SHAPE) if isinstance(node.uses, str) else _DEFAULT_SHAPE
        label = _escape(node.id)
        if node.uses is not None and node.uses != "":
            label += "<br/>" + _escape(node.uses)
        lines.append(f'    {ids[node.id]}{opening}"{label}"{closing}')

    links: List[Tuple[Any, Any]] = []
    for edge in blueprint.edges:
        arrow = "-.->" if edge.action == "continue" else "-->"
        label = _edge_label(edge.action, edge.condition)
        text = f'|"{_escape(label)}"|' if label else ""
        lines.append(f"    {ids[edge.source]} {arrow}{text} {ids[edge.target]}")
        links.append((edge.source, edge.target))
    for node in blueprint.nodes:
        fallback = node.settings.fallback
        if fallback and fallback in ids:
            lines.append(f'    {ids[node.id]} -.->|"fallback"| {ids[fallback]}')
            links.append((node.id, fallback))
    return lines, links, ids


def generate_mermaid(bp: Any) -> str:
    """A Mermaid `flowchart TD` of a blueprint (a `WorkflowBlueprint`, its dict/JSON form, or a `Flow`)."""
    lines, _, _ = _render(_as_blueprint(bp))
    return "\n".join(lines)


def run_states(result_or_events: Any, node_ids: Sequence[Any]) -> Dict[str, Set[Any]]:
    """The node ids of a run by class (`executed`, `skipped`, `failed`, `awaiting`; plus the
    `evaluated` and `taken` (source, target) pairs of `edge:evaluate` events), from a result or
    events as `generate_mermaid_for_run` takes them."""
    states: Dict[str, Set[Any]] = {"executed": set(), "skipped": set(), "failed": set(), "awaiting": set()}
    if isinstance(result_or_events, Mapping) and "status" in result_or_events:
        result_or_events = WorkflowResult.from_dict(dict(result_or_events))  # a result's JSON form
    if isinstance(result_or_events, WorkflowResult):
        result = result_or_events
        context = result.context or {}
        states["executed"] = {n for n in node_ids if isinstance(n, str) and "_outputs." + n in context}
        states["skipped"] = set(result.skipped or ())
        states["failed"] = {e.node_id for e in result.errors or () if e.node_id is not None}
        states["awaiting"] = set(result.awaiting or ())
        return states
    if result_or_events is None:
        return states
    kinds = {"node:finish": "executed", "node:skipped": "skipped", "node:error": "failed"}
    kind: Any
    payload: Any
    for event in result_or_events:
        if isinstance(event, Event):
            kind, payload = event.type, event.payload
        elif isinstance(event, Mapping):  # an event's JSON form
            kind, payload = event.get("type"), event.get("payload")
        else:
            continue
        if kind == "edge:evaluate" and isinstance(payload, Mapping):
            states.setdefault("evaluated", set()).add((payload.get("source"), payload.get("target")))
            if payload.get("taken"):
                states.setdefault("taken", set()).add((payload.get("source"), payload.get("target")))
            continue
        if kind not in kinds or not isinstance(payload, Mapping):
            continue
        node_id = payload.get("node_id", payload.get("nodeId"))
        if node_id is not None:
            states[kinds[kind]].add(node_id)
    return states


def node_classes(node_ids: Sequence[Any], states: Mapping[str, Set[Any]]) -> Dict[Any, str]:
    """One class per node of `run_states`: failed over awaiting over executed over skipped (a
    node can run and be skipped in different loop iterations); nodes in none are left out."""
    assigned: Dict[Any, str] = {}
    for cls in ("failed", "awaiting", "executed", "skipped"):
        for node_id in node_ids:
            if node_id in states[cls] and node_id not in assigned:
                assigned[node_id] = cls
    return assigned


def link_taken(states: Mapping[str, Set[Any]], source: Any, target: Any) -> bool:
    """Whether the link source -> target was taken in the run of `run_states`."""
    if (source, target) in states.get("evaluated", ()):  # as TS: an edge:evaluate event says so
        return (source, target) in states.get("taken", ())
    executed = states["executed"]  # a fallback link, or no edge events (a result): both ends ran
    return source in executed and target in executed


def generate_mermaid_for_run(bp: Any, result_or_events: Any) -> str:
    """The diagram of `bp` with one run drawn on it.

    `result_or_events` is a `WorkflowResult` (or its `to_dict()` form): executed nodes are those
    with an `_outputs.<id>` context key, skipped ones `result.skipped`, failed ones the node ids of
    `result.errors`, awaiting ones `result.awaiting`; or an iterable of `Event`s (or their dict
    form): `node:finish`, `node:skipped` and `node:error` events, and `edge:evaluate` events: an
    edge they name is drawn as taken only if one says it was taken (else when both ends ran). A node is drawn in one class only:
    failed over awaiting over executed over skipped (a node can run and be skipped in different
    loop iterations). Nodes outside the blueprint (dynamic batch workers) are ignored.
    """
    blueprint = _as_blueprint(bp)
    lines, links, ids = _render(blueprint)
    node_ids = list(dict.fromkeys(n.id for n in blueprint.nodes))
    states = run_states(result_or_events, node_ids)
    assigned = node_classes(node_ids, states)
    used = {cls for cls in assigned.values()}
    for cls in ("executed", "skipped", "failed", "awaiting"):
        if cls != "awaiting" or "awaiting" in used:
            lines.append(f"    classDef {cls} {CLASS_DEFS[cls]}")
    for cls in ("executed", "skipped", "failed", "awaiting"):
        members = [ids[n] for n in node_ids if assigned.get(n) == cls]
        if members:
            lines.append(f"    class {','.join(members)} {cls}")

    for index, (source, target) in enumerate(links):
        if link_taken(states, source, target):
            lines.append(f"    linkStyle {index} {_EXECUTED_LINK}")
    return "\n".join(lines)
