"""What the concurrency-limit tests share (SPEC 14): a 1 -> width -> 1 fan whose middle nodes have
a concurrency key, and the spans their node code records, to count how many ran at once."""
from __future__ import annotations

import threading
import time
from typing import Any, List, Optional, Tuple

from flowcraft import NodeContext, create_flow


class Spans:
    """(start, end) of each execution of the recorded node code (monotonic seconds), and the
    attempts it saw; shared by every worker thread of this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: List[Tuple[float, float]] = []
        self.attempts: List[int] = []

    def body(self, seconds: float) -> Any:
        def limited(ctx: NodeContext) -> int:
            began = time.monotonic()
            time.sleep(seconds)
            with self.lock:
                self.spans.append((began, time.monotonic()))
                self.attempts.append(ctx.attempt)
            return 1

        return limited

    def peak(self) -> int:
        """The most executions that overlapped (an end at the instant of a start does not overlap)."""
        with self.lock:
            edges = sorted([(end, -1) for _, end in self.spans] + [(start, 1) for start, _ in self.spans])
        running = peak = 0
        for _, step in edges:
            running += step
            peak = max(peak, running)
        return peak


def _total(ctx: NodeContext) -> int:
    return sum(ctx.input.values()) if isinstance(ctx.input, dict) else ctx.input  # (one predecessor: its value)


def limited_fan(name: str, width: int, body: Any, key: str = "'payments'", limit: int = 2,
                free: Optional[Any] = None, **options: Any) -> Any:
    """start -> m0..m{width-1} (concurrency key `key`, maxConcurrency `limit`, node `options`) ->
    end; `free`: one more middle node without a limit."""
    flow = create_flow(name).node("start", lambda ctx: 0).node("end", _total)
    for i in range(width):
        flow.node(f"m{i}", body, concurrency_key=key, max_concurrency=limit, **options).edge("start", f"m{i}").edge(f"m{i}", "end")
    if free is not None:
        flow.node("free", free).edge("start", "free").edge("free", "end")
    return flow
