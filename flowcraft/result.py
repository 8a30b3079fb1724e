"""What a run returns: `WorkflowResult` and its `WorkflowError` items."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import attrs

COMPLETED, FAILED, AWAITING, CANCELLED, STALLED, RUNNING = (
    "completed", "failed", "awaiting", "cancelled", "stalled", "running",
)
FINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED, STALLED})
LIVE_STATUSES = (RUNNING, AWAITING)  # a run that commits still apply to (stores' scripts and SQL use these too)


@attrs.frozen
class WorkflowError:
    node_id: Optional[str]
    message: str
    type: str = "Error"

    def to_dict(self) -> Dict[str, Any]:
        return {"node_id": self.node_id, "message": self.message, "type": self.type}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "WorkflowError":
        return cls(data.get("node_id"), str(data.get("message", "")), str(data.get("type", "Error")))

    @classmethod
    def from_exception(cls, node_id: Optional[str], error: BaseException) -> "WorkflowError":
        return cls(node_id, str(error) or type(error).__name__, type(error).__name__)


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
