"""A layered layout of a graph, computed in Python, in time linear in nodes and edges (per sweep).

Layers by longest path over the forward edges (back edges, which close loops, are left out and
drawn apart), an order within each layer by barycentric sweeps (a node goes near the mean position
of its neighbours in the layers above, then below), then x coordinates: each node as near as it
can be to the mean x of its predecessors, keeping a minimum gap between neighbours of a layer.
"""
from __future__ import annotations

from collections import deque
from typing import AbstractSet, Any, Dict, List, Sequence, Set, Tuple

import attrs

__all__ = ["Layout", "layered_layout"]

Node = Any  # any hashable node id


@attrs.frozen
class Layout:
    """Node centres (`x`, `y`), the layer of each node, and the edges found to close a cycle."""

    x: Dict[Node, float]
    y: Dict[Node, float]
    layer: Dict[Node, int]
    back: Set[Tuple[Node, Node]]
    width: float
    height: float


def _layers(nodes: Sequence[Node], forward: Sequence[Tuple[Node, Node]]) -> Tuple[Dict[Node, int], Set[Tuple[Node, Node]]]:
    """Longest-path layers (Kahn's order); edges left in a cycle the caller did not mark are back edges."""
    succ: Dict[Node, List[Node]] = {n: [] for n in nodes}
    indegree: Dict[Node, int] = {n: 0 for n in nodes}
    for s, t in forward:
        succ[s].append(t)
        indegree[t] += 1
    layer = {n: 0 for n in nodes}
    ready = deque(n for n in nodes if indegree[n] == 0)
    placed: Set[Node] = set()
    back: Set[Tuple[Node, Node]] = set()
    pending = deque(nodes)
    while len(placed) < len(nodes):
        if not ready:  # a cycle of forward edges: break it at the first unplaced node
            while pending[0] in placed:
                pending.popleft()
            ready.append(pending[0])
        node = ready.popleft()
        if node in placed:
            continue
        placed.add(node)
        for t in succ[node]:
            if t in placed:
                back.add((node, t))
                continue
            layer[t] = max(layer[t], layer[node] + 1)
            indegree[t] -= 1
            if indegree[t] == 0:
                ready.append(t)
    return layer, back


def _order(rows: List[List[Node]], preds: Dict[Node, List[Node]], succs: Dict[Node, List[Node]], sweeps: int) -> None:
    """Barycentric ordering, in place: down sweeps use predecessors, up sweeps successors."""
    position: Dict[Node, float] = {}

    def index(row: List[Node]) -> None:
        middle = (len(row) - 1) / 2
        for i, n in enumerate(row):
            position[n] = i - middle

    for row in rows:
        index(row)
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        neighbours = preds if down else succs
        for row in (rows[1:] if down else reversed(rows[:-1])):
            if len(row) > 1:
                keys = {n: (sum(position[m] for m in neighbours[n]) / len(neighbours[n]) if neighbours[n]
                            else position[n]) for n in row}
                row.sort(key=keys.__getitem__)
            index(row)


def _place(row: List[Node], desired: List[float], gap: float) -> List[float]:
    """x of a layer's nodes, in order, each as near its desired x as a `gap` between neighbours allows."""
    left = list(desired)
    for i in range(1, len(left)):
        left[i] = max(left[i], left[i - 1] + gap)
    right = list(desired)
    for i in range(len(right) - 2, -1, -1):
        right[i] = min(right[i], right[i + 1] - gap)
    return [(a + b) / 2 for a, b in zip(left, right)]


def layered_layout(nodes: Sequence[Node], edges: Sequence[Tuple[Node, Node]], back: AbstractSet[Tuple[Node, Node]] = frozenset(),
                   *, node_width: float = 170.0, node_height: float = 46.0, gap_x: float = 36.0,
                   gap_y: float = 64.0, margin: float = 24.0, sweeps: int = 4) -> Layout:
    """Lay out `nodes` top to bottom; `back` names the edges (source, target) known to close a cycle."""
    nodes = list(dict.fromkeys(nodes))
    known = set(nodes)
    forward = [(s, t) for s, t in dict.fromkeys(edges) if s in known and t in known and s != t and (s, t) not in back]
    layer, found = _layers(nodes, forward)
    forward = [e for e in forward if e not in found]
    preds: Dict[Node, List[Node]] = {n: [] for n in nodes}
    succs: Dict[Node, List[Node]] = {n: [] for n in nodes}
    for s, t in forward:
        preds[t].append(s)
        succs[s].append(t)
    rows: List[List[Node]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for n in nodes:
        rows[layer[n]].append(n)
    _order(rows, preds, succs, sweeps)

    step = node_width + gap_x
    x: Dict[Node, float] = {}
    for row in rows:
        middle = (len(row) - 1) / 2
        desired = []
        for i, n in enumerate(row):
            near = [x[p] for p in preds[n] if p in x]
            desired.append(sum(near) / len(near) if near else (i - middle) * step)
        for n, value in zip(row, _place(row, desired, step)):
            x[n] = value
    shift = margin + node_width / 2 - min(x.values(), default=0.0)
    x = {n: v + shift for n, v in x.items()}
    y = {n: margin + node_height / 2 + layer[n] * (node_height + gap_y) for n in nodes}
    width = max(x.values(), default=0.0) + node_width / 2 + margin
    height = margin * 2 + len(rows) * node_height + max(0, len(rows) - 1) * gap_y
    loops = {(s, t) for s, t in edges if s == t and s in known}
    return Layout(x, y, layer, (set(back) & set(edges)) | found | loops, width, height)
