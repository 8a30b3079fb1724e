"""Observability: events emitted by the runtimes to an event bus."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Protocol

import attrs

logger = logging.getLogger("flowcraft.events")

EVENT_TYPES = (
    "workflow:start", "workflow:finish", "workflow:stall", "workflow:pause", "workflow:resume",
    "node:start", "node:finish", "node:error", "node:retry", "node:fallback", "node:skipped",
    "edge:evaluate", "context:change", "batch:start", "batch:finish",
    "job:enqueued", "job:processed", "job:failed",
)


@attrs.frozen
class Event:
    type: str
    payload: Dict[str, Any] = attrs.field(factory=dict)


class EventBus(Protocol):
    def emit(self, event: Event) -> None: ...


class CallbackEventBus:
    """An event bus that calls each subscriber; a failing subscriber is logged, never fatal."""

    def __init__(self, *subscribers: Callable[[Event], None]) -> None:
        self.subscribers: List[Callable[[Event], None]] = list(subscribers)

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        self.subscribers.append(callback)

    def emit(self, event: Event) -> None:
        for callback in self.subscribers:
            try:
                callback(event)
            except Exception:  # an observer must never break a run
                logger.exception("event subscriber failed on %s", event.type)
