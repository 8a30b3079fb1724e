"""What the dashboard shows, as plain data (the JSON API serves it as is; the pages render it)."""
from __future__ import annotations

import datetime as _dt
import json
import logging
from typing import Any, Dict, List, Optional, Set, Tuple

from ..graph import NodeState
from ..inspection import describe_run
from ..mermaid import link_taken, run_states
from ..result import AWAITING, CANCELLED, COMPLETED, FAILED, RUNNING, STALLED
from .svg import render_graph, states_of

logger = logging.getLogger("flowcraft.dashboard")

RUN_STATUSES = (RUNNING, AWAITING, COMPLETED, FAILED, CANCELLED, STALLED)
COUNT_CAP = 1000  # runs counted per status on the overview (the run list has no count): "1000+"
MAX_VALUE_CHARS = 4000  # a context value shown longer than this is cut (the API has it whole)
MAX_CONTEXT_ROWS = 1000  # context keys shown on a run's page (the API has them all)


class BadRequest(ValueError):
    """A request parameter that is not valid."""


def parse_time(text: Optional[str], name: str) -> Optional[float]:
    """Epoch seconds from epoch seconds or an ISO date-time (UTC when it names no zone)."""
    if text is None or text.strip() == "":
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{name}: not a time (epoch seconds or YYYY-MM-DDTHH:MM): {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


def run_list(adapter: Any, status: Optional[str], blueprint_id: Optional[str], since: Optional[float],
             until: Optional[float], limit: int, cursor: Optional[str]) -> Dict[str, Any]:
    page = adapter.list_runs(status=status, blueprint_id=blueprint_id, since=since, until=until, limit=limit,
                             cursor=cursor)
    return {"runs": [s.to_dict() for s in page.runs], "next_cursor": page.next_cursor}


def _safely(what: str, read: Any) -> Any:
    """`read()`, or None when the backend cannot tell (logged): the overview shows what it can."""
    try:
        return read()
    except Exception:
        logger.warning("dashboard: %s unavailable", what, exc_info=True)
        return None


def overview(adapter: Any) -> Dict[str, Any]:
    """Runs by status (counted up to `COUNT_CAP`), queue depth, dead letters, live workers."""
    counts: Dict[str, Any] = {}
    for status in RUN_STATUSES:
        page = _safely(f"runs {status}", lambda s=status: adapter.list_runs(status=s, limit=COUNT_CAP))
        counts[status] = None if page is None else {"count": len(page.runs), "more": page.next_cursor is not None}
    depth = getattr(adapter.queue, "depth", None)
    queue_name = str(getattr(adapter.queue, "queue_name", None) or type(adapter.queue).__name__)
    letters = _safely("dead letters", lambda: adapter.dead_letters(limit=COUNT_CAP))
    workers = _safely("live workers", adapter.live_workers)
    return {
        "runs": counts,
        "queues": [{"name": queue_name, "depth": None if depth is None else _safely("queue depth", depth)}],
        "dead_letters": None if letters is None else {"count": len(letters), "more": len(letters) >= COUNT_CAP,
                                                       "latest": [d.to_dict() for d in letters[:5]]},
        "workers": None if workers is None else [w.to_dict() for w in workers],
        "recent": run_list(adapter, None, None, None, None, 10, None)["runs"],
    }


def resume_choices(graph: Any, node_id: str) -> List[str]:
    """The actions the outgoing edges of a waiting node name (what `resume_with_action` accepts)."""
    node = graph.nodes.get(node_id)
    if node is None:
        return []
    return list(dict.fromkeys(e.action for e in node.outgoing if e.action not in (None, "")))


def _shown(value: Any) -> str:
    try:  # a scalar takes the C encoder's fast path; a list or an object is indented
        text = json.dumps(value, ensure_ascii=False, indent=2 if isinstance(value, (dict, list)) else None)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "\n\u2026 (cut; the API has it whole)"


def _graph(adapter: Any, blueprint_id: Optional[str]) -> Any:
    try:
        return adapter.runtime.graph(adapter.runtime.blueprint(blueprint_id or ""))
    except Exception:  # a run of a blueprint this app does not know (or no longer has)
        logger.info("dashboard: no graph for blueprint %r", blueprint_id, exc_info=True)
        return None


def run_view(adapter: Any, run_id: str, *, with_svg: bool = True) -> Dict[str, Any]:
    """A run's description (`describe_run`), its context, the drawn node states, the edges taken
    and, for each waiting node, the actions it can be resumed with; KeyError for an unknown run."""
    history = adapter.get_history(run_id)
    info = describe_run(adapter, run_id, history)
    graph = _graph(adapter, info["blueprint_id"])
    drawn = states_of(info["nodes"], info["errors"], info["awaiting"], info["status"])
    info["drawn_states"] = drawn
    info["context"] = adapter.store.read_all_context(run_id) if info["version"] else {}
    info["resume_choices"] = {n: resume_choices(graph, n) if graph is not None else []
                              for n in info["awaiting"]}
    taken: Set[Tuple[str, str]] = set()
    if graph is not None:
        states = run_states(history, list(graph.nodes))
        taken = {(e.source, e.target) for e in graph.edges
                 if link_taken(states, e.source, e.target) or _reached(drawn, e.source, e.target)}
        info["node_ids"] = list(graph.nodes)
    info["taken_edges"] = sorted([list(e) for e in taken])
    if with_svg:
        info["svg"] = render_graph(graph, drawn, taken) if graph is not None else None
        info["shown_context"] = [(k, _shown(info["context"][k])) for k in _shown_keys(info["context"])]
    return info


def _shown_keys(context: Dict[str, Any]) -> List[str]:
    """The context keys a run's page shows: the run's own keys first, then the engine's
    (`_outputs.*`, `_inputs.*`), at most `MAX_CONTEXT_ROWS`."""
    keys = sorted(context, key=lambda k: (k.startswith("_"), k))
    return keys[:MAX_CONTEXT_ROWS]


def _reached(drawn: Dict[str, str], source: str, target: str) -> bool:
    """An edge from a completed node to one that is waiting, failed or running now was taken
    (`link_taken` counts only nodes that completed)."""
    return drawn.get(source) == "completed" and drawn.get(target) in ("awaiting", "failed", "running")


def live_view(adapter: Any, run_id: str) -> Dict[str, Any]:
    """What a run's page polls while the run is live: its status, version and drawn node states
    (the record and the node states only, not the history or the context); KeyError if unknown."""
    record = adapter.store.get_record(run_id)
    if record is None:
        raise KeyError(run_id)
    states = adapter.store.read_all_states(run_id) if record.version else {}
    nodes = {n: {"status": NodeState.from_dict(raw).status} for n, raw in states.items()}
    return {"run_id": run_id, "status": record.status, "version": record.version,
            "drawn_states": states_of(nodes, record.errors, record.awaiting, record.status)}


def blueprint_list(adapter: Any) -> List[Dict[str, Any]]:
    return [{"id": bp.id, "nodes": len(bp.nodes), "edges": len(bp.edges)}
            for _, bp in sorted(adapter.runtime.blueprints.items())]
