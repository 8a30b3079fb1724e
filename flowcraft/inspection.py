"""What an operator reads about one run (SPEC section 11): `describe_run(adapter, run_id)`.

One home for the run's summary, node states, errors, what it awaits and its node timeline (the
durable history's node executions with their time, duration, attempt and worker), shared by
`flowcraft inspect` and the dashboard.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any, Dict, Iterable, List, Optional

from .events import Event
from .graph import NodeState

__all__ = ["TIMELINE_EVENTS", "describe_run", "format_time", "timeline"]

#: The history events an operator reads (not the context changes).
TIMELINE_EVENTS = ("workflow:start", "node:finish", "node:error", "node:skipped", "node:skip", "workflow:pause",
                   "workflow:resume", "run:retry", "run:restart", "run:cancel", "run:deadline", "context:patch",
                   "workflow:finish")
_KEEP = ("node_id", "iteration", "attempt", "worker", "timestamp", "duration_ms", "index", "parent", "status",
         "message", "type", "node_ids")


def format_time(epoch: Optional[float]) -> str:
    """`YYYY-MM-DD HH:MM:SS` in UTC, or `-` for no time."""
    if not epoch:
        return "-"
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def timeline(history: Iterable[Event]) -> List[Dict[str, Any]]:
    """The timeline entries of a run's history, compact: `{"event": type, <payload keys kept>}`."""
    return [{"event": e.type, **{k: e.payload[k] for k in _KEEP if e.payload.get(k) is not None}}
            for e in history if e.type in TIMELINE_EVENTS]


def describe_run(adapter: Any, run_id: str, history: Optional[List[Event]] = None) -> Dict[str, Any]:
    """The run's record and node states, and its timeline from `history` (default: the adapter's
    `get_history(run_id)`); KeyError for an unknown run."""
    record = adapter.store.get_record(run_id)
    if record is None:
        raise KeyError(run_id)
    states = adapter.store.read_all_states(run_id) if record.version else {}
    nodes = {n: {"status": st.status, "iteration": st.iteration, **({"pending_items": st.pending} if st.pending else {})}
             for n, raw in sorted(states.items()) for st in [NodeState.from_dict(raw)]}
    return {
        "run_id": run_id, "blueprint_id": record.blueprint_id, "blueprint_version": record.blueprint_version,
        "status": record.status, "version": record.version, "updated_at": record.updated_at,
        "outstanding": record.outstanding, "nodes": nodes, "errors": list(record.errors),
        "awaiting": record.awaiting,
        "timeline": timeline(adapter.get_history(run_id) if history is None else history),
    }
