"""Exceptions raised by Flowcraft. Every one derives from `FlowcraftError`."""
from __future__ import annotations

from typing import Iterable, List, Optional


class FlowcraftError(Exception):
    """Base class of every Flowcraft exception.

    As TS's `FlowcraftError(message, {cause, nodeId, blueprintId, executionId, isFatal})`, it may
    carry structured fields: `node_id`, `blueprint_id`, `run_id`, `cause` (also `__cause__`), and
    `fatal`: a node raising a fatal error is not retried, whatever its `maxRetries`."""

    node_id: Optional[str] = None
    blueprint_id: object = None
    run_id: Optional[str] = None
    cause: Optional[BaseException] = None
    fatal: bool = False

    def __init__(self, *args: object, node_id: Optional[str] = None, blueprint_id: object = None,
                 run_id: Optional[str] = None, cause: Optional[BaseException] = None, fatal: bool = False) -> None:
        super().__init__(*args)
        if node_id is not None:
            self.node_id = node_id
        if blueprint_id is not None:
            self.blueprint_id = blueprint_id
        if run_id is not None:
            self.run_id = run_id
        if cause is not None:
            self.cause = cause
            self.__cause__ = cause
        self.fatal = bool(fatal)


class BlueprintError(FlowcraftError, ValueError):
    """A blueprint is invalid; `problems` lists every problem found, not just the first."""

    def __init__(self, problems: Iterable[str], blueprint_id: object = None) -> None:
        self.problems: List[str] = list(problems) or ["invalid blueprint"]
        self.blueprint_id = blueprint_id
        where = f"blueprint {blueprint_id!r}" if blueprint_id else "blueprint"
        if len(self.problems) == 1:
            message = f"invalid {where}: {self.problems[0]}"
        else:
            listed = "\n".join(f"  - {p}" for p in self.problems)
            message = f"invalid {where} ({len(self.problems)} problems):\n{listed}"
        super().__init__(message)


class ExpressionError(FlowcraftError, ValueError):
    """An expression could not be parsed, or failed while evaluated."""


class NodeTimeoutError(FlowcraftError, TimeoutError):
    """One attempt of a node ran longer than its `timeout`."""


class CancelledError(FlowcraftError):
    """The run was cancelled; raised by `CancelToken.raise_if_cancelled()`."""


class DeadlineExceeded(FlowcraftError, TimeoutError):
    """A run was not finished by its deadline (`deadline=` seconds, or `metadata.deadline`)."""


class LoopLimitError(FlowcraftError):
    """A loop ran more than its `maxIterations`, or a cycle without a loop controller more than the
    runtime's `max_cycle_iterations`."""


class SerializationError(FlowcraftError, TypeError):
    """A value is not JSON-serialisable; the message names the key at fault."""


class ValueTooLarge(SerializationError):
    """A value (or a run's context) is larger than its bound; the node, and so the run, fails."""


class UnknownNodeError(FlowcraftError, LookupError):
    """A node's `uses` key is not in the registry."""


class ServiceUnavailable(FlowcraftError, ConnectionError):
    """A store or queue cannot be reached. Never a node's fault: workers back off and retry."""


class StoreRejected(FlowcraftError, ValueError):
    """A store refused to hold what a commit carries (a value too large for it, a character it
    cannot store). Never an outage: the run at fault fails with this message; `run_id` names it."""

    def __init__(self, message: str, run_id: "str | None" = None) -> None:
        super().__init__(message)
        self.run_id = run_id
