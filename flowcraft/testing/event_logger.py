"""An event bus that remembers every event, for assertions in tests."""
from __future__ import annotations

import threading
from typing import Any, List, Optional

from ..events import Event


class InMemoryEventLogger:
    """Collects events in order; thread-safe, so it works with `concurrency > 1` and workers."""

    def __init__(self) -> None:
        self.events: List[Event] = []
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of_type(self, kind: str) -> List[Event]:
        return [e for e in self.events if e.type == kind]

    def types(self) -> List[str]:
        return [e.type for e in self.events]

    def find(self, kind: str, **payload: Any) -> Optional[Event]:
        """The first event of `kind` whose payload has these values."""
        for event in self.events:
            if event.type == kind and all(event.payload.get(k) == v for k, v in payload.items()):
                return event
        return None

    def clear(self) -> None:
        with self._lock:
            self.events.clear()
