"""A live one-line progress view of an in-memory run, drawn on a terminal from the runtime's events."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Iterator, Optional, Set, TextIO

from ..events import CallbackEventBus, Event
from ..runtime import FlowRuntime

_CLEAR = "\r\x1b[K"  # back to the start of the line, erase it


class Progress:
    """Counts a run's nodes done (finished or skipped) out of the blueprint's, and shows the one
    running. Redraws at most every `interval` seconds, so a fast run is not slowed by the terminal."""

    def __init__(self, stream: TextIO, blueprint_id: str, total: int, *, interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.blueprint_id = blueprint_id
        self.total = total
        self.interval = interval
        self.clock = clock
        self.done: Set[str] = set()
        self.skipped: Set[str] = set()
        self.current: Optional[str] = None
        self.started = clock()
        self._drawn_at: Optional[float] = None
        self._lock = threading.Lock()  # events come from pool threads at --concurrency > 1

    def __call__(self, event: Event) -> None:
        payload = event.payload
        if payload.get("blueprint_id") != self.blueprint_id:
            return  # a subflow's child run
        with self._lock:
            self._count(event.type, payload.get("node_id"))
            now = self.clock()
            if self._drawn_at is None or now - self._drawn_at >= self.interval:
                self._drawn_at = now
                self.stream.write(_CLEAR + self.line())
                self.stream.flush()

    def _count(self, kind: str, node_id: Any) -> None:
        if kind == "node:start":
            self.current = node_id
        elif kind in ("node:finish", "node:error"):
            self.done.add(node_id)
        elif kind == "node:skipped":
            self.done.add(node_id)
            self.skipped.add(node_id)

    def line(self) -> str:
        running = f" | running {self.current}" if self.current else ""
        return f"{self.blueprint_id}: {min(len(self.done), self.total)}/{self.total} nodes{running}"

    def finish(self, status: str) -> None:
        """Replace the live line with a summary of the run."""
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        elapsed = self.clock() - self.started
        self.stream.write(f"{_CLEAR}{self.blueprint_id}: {status}, {min(len(self.done), self.total)}/{self.total} "
                          f"nodes{skipped} in {elapsed:.2f}s\n")
        self.stream.flush()


@contextlib.contextmanager
def watching(runtime: FlowRuntime, progress: Optional[Progress]) -> Iterator[None]:
    """Subscribe `progress` to the runtime's events for the block, keeping any bus the app set."""
    if progress is None:
        yield
        return
    previous = runtime.event_bus
    bus = CallbackEventBus(progress)
    if previous is not None:
        bus.subscribe(previous.emit)
    runtime.event_bus = bus
    try:
        yield
    finally:
        runtime.event_bus = previous
