"""A blueprint drawn as SVG, optionally with one run's node states and taken edges on it.

Nodes are placed by `layout.layered_layout`; every text is escaped. Shapes tell node kinds apart:
a loop controller is a diamond-ended hexagon, a batch scatter/gather a trapezoid, a `wait` (or
webhook) a pill, a `sleep` a clipped box, a subflow a double-framed box. Back edges (a loop's
`continue`, any edge closing a cycle) leave on the right and curve back up, dashed, each in its own
lane; fallback links are dotted. States are CSS classes (`st-<state>`), styled by the app's CSS.
"""
from __future__ import annotations

from html import escape
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

from ..graph import LOOP_CONTROLLER, CompiledGraph
from .layout import layered_layout

__all__ = ["STATES", "kind_of", "render_graph"]

#: Node states drawn, in legend order.
STATES = ("completed", "running", "awaiting", "failed", "skipped", "pending")

W, H = 170.0, 46.0
_KINDS = {LOOP_CONTROLLER: "loop", "batch-scatter": "batch", "batch-gather": "batch", "wait": "wait",
          "webhook": "wait", "sleep": "sleep", "subflow": "subflow"}
_MAX_LABEL = 22


def kind_of(uses: Any) -> str:
    """The drawing kind of a node's `uses`."""
    return _KINDS.get(uses, "task") if isinstance(uses, str) else "task"


def _short(text: str, size: int = _MAX_LABEL) -> str:
    return text if len(text) <= size else text[: size - 1] + "\u2026"


def _subtitle(blueprint_id: str, node_id: str, uses: Any) -> str:
    """The second line of a node: its built-in (`wait`, `loop-controller`...) or its function's
    name; nothing for the builder's own key of a lambda (`<blueprint>.<node>`)."""
    if not isinstance(uses, str) or uses == f"{blueprint_id}.{node_id}":
        return ""
    return uses if kind_of(uses) != "task" else uses.rsplit(".", 1)[-1]


def _shape(kind: str, uses: Any) -> str:
    hw, hh = W / 2, H / 2
    if kind == "loop":
        return (f'<polygon class="shape" points="{-hw},0 {-hw + 16},{-hh} {hw - 16},{-hh} {hw},0 '
                f'{hw - 16},{hh} {-hw + 16},{hh}"/>')
    if kind == "batch":
        wide, narrow = (hw, hw - 14) if uses == "batch-scatter" else (hw - 14, hw)
        return (f'<polygon class="shape" points="{-narrow},{-hh} {narrow},{-hh} {wide},{hh} {-wide},{hh}"/>')
    if kind == "wait":
        return f'<rect class="shape" x="{-hw}" y="{-hh}" width="{W}" height="{H}" rx="{hh}"/>'
    if kind == "sleep":
        c = 10
        return (f'<polygon class="shape" points="{-hw + c},{-hh} {hw - c},{-hh} {hw},{-hh + c} {hw},{hh - c} '
                f'{hw - c},{hh} {-hw + c},{hh} {-hw},{hh - c} {-hw},{-hh + c}"/>')
    frame = f'<rect class="shape" x="{-hw}" y="{-hh}" width="{W}" height="{H}" rx="6"/>'
    if kind == "subflow":
        frame += f'<rect class="inner" x="{-hw + 5}" y="{-hh + 5}" width="{W - 10}" height="{H - 10}" rx="3"/>'
    return frame


def _edge_label(action: Optional[str], condition: Optional[str]) -> str:
    return " / ".join(str(p) for p in (action, condition) if p not in (None, ""))


def render_graph(graph: CompiledGraph, states: Optional[Mapping[str, str]] = None,
                 taken: Optional[Set[Tuple[str, str]]] = None) -> str:
    """The `<svg>` of `graph`; `states` maps node ids to one of `STATES` (missing: pending; None:
    a blueprint, no run drawn),
    `taken` names the edges (source, target) the run took."""
    node_ids = list(graph.nodes)
    links: List[Tuple[str, str, str, str]] = []  # source, target, label, kind (edge/back/fallback)
    for edge in graph.edges:
        links.append((edge.source, edge.target, _edge_label(edge.action, edge.definition.condition),
                      "back" if edge.back or edge.source == edge.target else "edge"))
    for node in graph.nodes.values():
        if node.config.fallback and node.config.fallback in graph.nodes:
            links.append((node.id, node.config.fallback, "fallback", "fallback"))
    back = {(s, t) for s, t, _, kind in links if kind == "back"}
    layout = layered_layout(node_ids, [(s, t) for s, t, _, k in links if k != "fallback"] +
                            [(s, t) for s, t, _, k in links if k == "fallback"], back,
                            node_width=W, node_height=H)
    back |= layout.back
    taken = taken or set()
    out: List[str] = []
    lanes = 0
    right = layout.width
    for s, t, label, kind in links:
        if (s, t) in back and kind != "fallback":
            kind = "back"
        cls = f"edge {kind}" + (" taken" if (s, t) in taken else "")
        xs, ys, xt, yt = layout.x[s], layout.y[s], layout.x[t], layout.y[t]
        if kind == "back":
            lanes += 1
            lane = max(xs, xt) + W / 2 + 18 + 14 * lanes
            right = max(right, lane + 24)
            path = f"M{xs + W / 2},{ys} C{lane},{ys} {lane},{yt} {xt + W / 2 + 6},{yt}"
            lx, ly = lane + 4, (ys + yt) / 2
            right = max(right, lane + 12 + 6.5 * len(label[:28]))
        else:
            y0, y1 = ys + H / 2, yt - H / 2 - 6
            bend = max(24.0, (y1 - y0) / 2)
            path = f"M{xs},{y0} C{xs},{y0 + bend} {xt},{y1 - bend} {xt},{y1}"
            lx, ly = (xs + xt) / 2, (y0 + y1) / 2
        marker = "taken" if (s, t) in taken else kind
        out.append(f'<g class="{cls}" data-source="{escape(s)}" data-target="{escape(t)}">'
                   f'<path d="{path}" marker-end="url(#arrow-{marker})"/>')
        if label:
            side = " side" if kind == "back" else ""
            out.append(f'<text class="elabel{side}" x="{lx}" y="{ly}">{escape(_short(label, 28))}</text>')
        out.append("</g>")
    for node in graph.nodes.values():
        kind = kind_of(node.uses)
        state = "none" if states is None else states.get(node.id, "pending")
        uses = _subtitle(graph.blueprint.id, node.id, node.uses)
        out.append(
            f'<g class="node kind-{kind} st-{state}" data-node="{escape(node.id)}" '
            f'transform="translate({layout.x[node.id]},{layout.y[node.id]})">'
            f'<title>{escape(node.id)} ({escape(uses or "function")}){"" if states is None else ": " + state}</title>'
            f'{_shape(kind, node.uses)}'
            f'<text class="nid" y="{-3 if uses else 5}">{escape(_short(node.id))}</text>'
            + (f'<text class="nuses" y="13">{escape(_short(uses, 26))}</text>' if uses else "")
            + "</g>")
    width, height = right, layout.height
    defs = "".join(
        f'<marker id="arrow-{m}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" markerHeight="9" '
        f'markerUnits="userSpaceOnUse" orient="auto-start-reverse"><path class="arrow-{m}" d="M0,0 L10,5 L0,10 z"/></marker>'
        for m in ("edge", "back", "fallback", "taken"))
    return (f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="blueprint {escape(graph.blueprint.id)}">'
            f'<defs>{defs}</defs>{"".join(out)}</svg>')


def states_of(node_states: Mapping[str, Mapping[str, Any]], errors: Any, awaiting: Mapping[str, Any],
              run_status: str) -> Dict[str, str]:
    """Each node's drawn state from the run's current node states (`describe_run`'s `nodes`), its
    errors and what it awaits: a node that failed (and was not retried since) is failed, one the
    run waits on awaiting, a ready one running (queued or executing) while the run goes on."""
    failed = {e.get("node_id") for e in errors or ()}
    out: Dict[str, str] = {}
    for node_id, st in node_states.items():
        status = st.get("status")
        if node_id in failed:
            out[node_id] = "failed"
        elif node_id in awaiting:
            out[node_id] = "awaiting"
        elif status == "done":
            out[node_id] = "completed"
        elif status == "skipped":
            out[node_id] = "skipped"
        elif status == "ready" and run_status == "running":
            out[node_id] = "running"
        else:
            out[node_id] = "pending"
    return out
