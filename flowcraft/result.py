"""What a run returns: `WorkflowResult` and its `WorkflowError` items."""
from __future__ import annotations

import traceback as _traceback
from typing import Any, Callable, Dict, List, Optional

import attrs

COMPLETED, FAILED, AWAITING, CANCELLED, STALLED, RUNNING = (
    "completed", "failed", "awaiting", "cancelled", "stalled", "running",
)
FINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED, STALLED})
LIVE_STATUSES = (RUNNING, AWAITING)  # a run that commits still apply to (stores' scripts and SQL use these too)
MAX_TRACEBACK_CHARS = 8000  # a longer traceback keeps its last lines (where the error was raised)


def format_traceback(error: BaseException) -> Optional[str]:
    """The formatted traceback of `error` (with its causes), bounded by `MAX_TRACEBACK_CHARS`;
    None when it was never raised."""
    if error.__traceback__ is None and error.__cause__ is None and error.__context__ is None:
        return None
    text = "".join(_traceback.format_exception(type(error), error, error.__traceback__))
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "...\n" + text[-MAX_TRACEBACK_CHARS:]
    return text


@attrs.frozen
class WorkflowError:
    node_id: Optional[str]
    message: str
    type: str = "Error"
    # the formatted traceback of the node's last exception; None when there is none (not compared)
    traceback: Optional[str] = attrs.field(default=None, eq=False, repr=False)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"node_id": self.node_id, "message": self.message, "type": self.type}
        if self.traceback is not None:  # stored errors without one (older runs) load as before
            out["traceback"] = self.traceback
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "WorkflowError":
        tb = data.get("traceback")
        return cls(data.get("node_id"), str(data.get("message", "")), str(data.get("type", "Error")),
                   tb if isinstance(tb, str) else None)

    @classmethod
    def from_exception(cls, node_id: Optional[str], error: BaseException) -> "WorkflowError":
        return cls(node_id, str(error) or type(error).__name__, type(error).__name__, format_traceback(error))


@attrs.define(eq=False)
class WorkflowResult:
    """The outcome of a run. `serialized_context` (the context as JSON) is computed on first use."""

    status: str
    context: Dict[str, Any]
    errors: List[WorkflowError] = attrs.field(factory=list)
    run_id: str = ""
    awaiting: List[str] = attrs.field(factory=list)
    skipped: List[str] = attrs.field(factory=list)
    stalled: List[str] = attrs.field(factory=list)
    _serialized: Optional[str] = attrs.field(default=None, alias="serialized_context")
    _dumps: Optional[Callable[[Dict[str, Any]], str]] = attrs.field(default=None, repr=False, alias="dumps")

    @property
    def serialized_context(self) -> str:
        if self._serialized is None:
            if self._dumps is not None:
                self._serialized = self._dumps(self.context)
            else:
                import json

                self._serialized = json.dumps(self.context, separators=(",", ":"))
        return self._serialized

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED

    def to_dict(self) -> Dict[str, Any]:
        return {
            "status": self.status,
            "run_id": self.run_id,
            "context": self.context,
            "errors": [e.to_dict() for e in self.errors],
            "awaiting": list(self.awaiting),
            "skipped": list(self.skipped),
            "stalled": list(self.stalled),
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "WorkflowResult":
        return cls(
            status=data["status"],
            context=dict(data.get("context") or {}),
            errors=[WorkflowError.from_dict(e) for e in data.get("errors") or ()],
            run_id=data.get("run_id", ""),
            awaiting=list(data.get("awaiting") or ()),
            skipped=list(data.get("skipped") or ()),
            stalled=list(data.get("stalled") or ()),
        )
