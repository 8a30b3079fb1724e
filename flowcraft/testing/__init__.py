"""Test helpers: an event logger, a tracing runner, a step-by-step runner, the distributed fakes, and
(in `flowcraft.testing.conformance`) the adapter conformance kit every backend passes."""
from .event_logger import InMemoryEventLogger
from .fakes import CRASH_POINTS, InMemoryAdapter, InMemoryCoordinationStore, InMemoryQueue, InMemoryRunStore
from .stepper import Stepper
from .trace import format_trace, run_with_trace

__all__ = [
    "CRASH_POINTS", "InMemoryAdapter", "InMemoryCoordinationStore", "InMemoryEventLogger", "InMemoryQueue",
    "InMemoryRunStore", "Stepper", "format_trace", "run_with_trace",
]
