"""Rebuild a run's final context from its recorded events, without running any node code."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List

from .events import Event
from .result import WorkflowError, WorkflowResult


def replay_events(events: Iterable[Event]) -> WorkflowResult:
    """The `WorkflowResult` a recorded event history describes (`workflow:start` to `workflow:finish`)."""
    context: Dict[str, Any] = {}
    status, run_id = "running", ""
    errors: List[WorkflowError] = []
    skipped: List[str] = []
    for event in events:
        payload = event.payload
        kind = event.type
        run_id = payload.get("run_id", run_id)
        if kind == "workflow:start":
            context.update(payload.get("initial_context") or {})
        elif kind == "node:start" and payload.get("stored_input"):
            context["_inputs." + payload["node_id"]] = payload.get("input")
        elif kind == "node:finish" and "parent" not in payload:  # a batch item's is not in the context
            node_id = payload["node_id"]
            context["_outputs." + node_id] = payload.get("output")
            context[node_id] = payload.get("output")
        elif kind == "context:change":
            if payload.get("op") == "delete":
                context.pop(payload["key"], None)
            else:
                context[payload["key"]] = payload.get("value")
        elif kind == "node:skipped":
            skipped.append(payload["node_id"])
        elif kind == "node:error":
            errors.append(WorkflowError(payload.get("node_id"), payload.get("error", ""), payload.get("type", "Error")))
        elif kind == "workflow:finish":
            status = payload.get("status", status)
    return WorkflowResult(status=status, context=context, errors=errors, run_id=run_id, skipped=skipped)
