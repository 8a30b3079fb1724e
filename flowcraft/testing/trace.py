"""`run_with_trace`: run a blueprint and print a readable event trace when it does not complete."""
from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Mapping, Optional, TextIO

from ..events import CallbackEventBus, Event
from ..result import COMPLETED, WorkflowResult
from .event_logger import InMemoryEventLogger


def format_trace(events: Iterable[Event]) -> str:
    """One line per event: its type and its payload, without the run and blueprint ids."""
    lines = []
    for index, event in enumerate(events):
        payload = {k: v for k, v in event.payload.items() if k not in ("run_id", "blueprint_id")}
        lines.append(f"{index:4d} {event.type:<16} {json.dumps(payload, default=repr, sort_keys=True)}")
    return "\n".join(lines)


def run_with_trace(
    runtime: Any,
    blueprint: Any,
    initial_context: Optional[Mapping[str, Any]] = None,
    *,
    stream: Optional[TextIO] = None,
    **options: Any,
) -> WorkflowResult:
    """Run like `runtime.run`; if the run does not complete, write its event trace to `stream` (stdout)."""
    from ..runtime import FlowRuntime

    logger = InMemoryEventLogger()
    bus = logger if runtime.event_bus is None else CallbackEventBus(runtime.event_bus.emit, logger.emit)
    traced = FlowRuntime(
        registry=runtime.registry, blueprints=runtime.blueprints, dependencies=runtime.dependencies,
        event_bus=bus, middleware=runtime.middleware, evaluator=runtime.evaluator, serializer=runtime.serializer,
    )
    result = traced.run(blueprint, initial_context, **options)
    if result.status != COMPLETED:
        out = stream if stream is not None else sys.stdout
        out.write(f"run {result.run_id} ended {result.status}; errors: {[e.to_dict() for e in result.errors]}\n")
        out.write(format_trace(logger.events) + "\n")
    return result
