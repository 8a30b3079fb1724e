"""Flowcraft for Python: a synchronous, minimal-dependency workflow engine."""
from .blueprint import EdgeDefinition, NodeConfig, NodeDefinition, WorkflowBlueprint, sanitize_blueprint
from .cancel import CancelToken
from .context import Context, DictContext
from .errors import (
    BlueprintError,
    CancelledError,
    DeadlineExceeded,
    ExpressionError,
    FlowcraftError,
    LoopLimitError,
    NodeTimeoutError,
    SerializationError,
    StoreRejected,
    UnknownNodeError,
    ValueTooLarge,
)
from .events import CallbackEventBus, Event, EventBus
from .builtins import parse_duration
from .flow import Flow, create_flow
from .middleware import LoggingMiddleware, Middleware
from .node import BaseNode, NodeContext, NodeResult, Registry
from .result import WorkflowError, WorkflowResult
from .runtime import FlowRuntime

__version__ = "0.1.0"

__all__ = [
    "BaseNode", "BlueprintError", "CallbackEventBus", "CancelToken", "CancelledError", "Context", "DeadlineExceeded",
    "DictContext", "EdgeDefinition", "Event", "EventBus", "ExpressionError", "Flow", "FlowRuntime",
    "FlowcraftError", "LoopLimitError", "NodeConfig", "NodeContext", "NodeDefinition",
    "NodeResult",
    "NodeTimeoutError", "Registry", "SerializationError", "StoreRejected", "UnknownNodeError", "ValueTooLarge", "WorkflowBlueprint",
    "WorkflowError", "WorkflowResult", "create_flow", "LoggingMiddleware", "Middleware", "parse_duration",
    "sanitize_blueprint",
    "analyze_blueprint", "lint_blueprint", "generate_mermaid", "generate_mermaid_for_run",
]


def __getattr__(name: str):
    # tooling is imported on first use, keeping `import flowcraft` light
    if name in ("analyze_blueprint", "lint_blueprint"):
        from . import analysis

        return getattr(analysis, name)
    if name in ("generate_mermaid", "generate_mermaid_for_run"):
        from . import mermaid

        return getattr(mermaid, name)
    raise AttributeError(f"module 'flowcraft' has no attribute {name!r}")
