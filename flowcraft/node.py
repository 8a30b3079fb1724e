"""What node code sees and returns: `NodeContext`, `NodeResult`, `BaseNode`, and the `Registry`."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, KeysView, List, Mapping, MutableMapping, Optional, Union

import attrs

from .cancel import CancelToken


@attrs.define(slots=True)
class NodeResult:
    """A node's result: `output` is stored in the context, `action` selects the outgoing edges."""

    output: Any = None
    action: Optional[str] = None
    error: Optional[str] = None
    dynamic_nodes: Optional[List[Dict[str, Any]]] = None


def to_result(value: Any) -> NodeResult:
    """A node's return value as a `NodeResult` (a plain value becomes the output)."""
    if type(value) is NodeResult:
        return value
    if value is None:
        return NodeResult()
    if isinstance(value, NodeResult):
        return value
    return NodeResult(output=value)


class NodeContext:
    """Everything one node execution can see."""

    __slots__ = (
        "context", "input", "params", "dependencies", "node_id", "run_id",
        "attempt", "_idempotency_key", "cancel", "blueprint_id", "iteration", "traceparent",
    )

    def __init__(
        self,
        context: Any,
        input: Any = None,
        params: Optional[Mapping[str, Any]] = None,
        dependencies: Optional[Mapping[str, Any]] = None,
        node_id: str = "",
        run_id: str = "",
        attempt: int = 1,
        idempotency_key: str = "",
        cancel: Optional[CancelToken] = None,
        blueprint_id: str = "",
        iteration: int = 0,
        traceparent: Optional[str] = None,
    ) -> None:
        self.context = context
        self.input = input
        self.params = params if params is not None else {}
        self.dependencies = dependencies if dependencies is not None else {}
        self.node_id = node_id
        self.run_id = run_id
        self.attempt = attempt
        self._idempotency_key = idempotency_key
        self.cancel = cancel if cancel is not None else CancelToken()
        self.blueprint_id = blueprint_id
        self.iteration = iteration
        # the W3C trace context (`traceparent`) of the run, opaque to the core: a telemetry
        # middleware parents the node's span on it (SPEC 13); None when the run has none
        self.traceparent = traceparent

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt and redelivery of this node execution: `run:node:iteration`."""
        return self._idempotency_key or f"{self.run_id}:{self.node_id}:{self.iteration}"

    @idempotency_key.setter
    def idempotency_key(self, value: str) -> None:
        self._idempotency_key = value

    def __repr__(self) -> str:
        return f"NodeContext(node_id={self.node_id!r}, run_id={self.run_id!r}, attempt={self.attempt})"


class BaseNode:
    """A class node: `prep` (once) -> `exec` (the retried phase) -> `post`.

    Override `fallback(error, ctx)` to produce a result after the last failed attempt, and
    `recover(error, ctx)` to clean up when the node fails for good.
    """

    def __init__(self, params: Optional[Mapping[str, Any]] = None, node_id: Optional[str] = None) -> None:
        self.params: Mapping[str, Any] = params if params is not None else {}
        self.node_id = node_id

    def prep(self, ctx: NodeContext) -> Any:
        return None

    def exec(self, prep_result: Any, ctx: NodeContext) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement exec()")

    def post(self, exec_result: Any, ctx: NodeContext) -> Any:
        return exec_result

    def fallback(self, error: BaseException, ctx: NodeContext) -> Any:
        raise error

    def recover(self, error: BaseException, ctx: NodeContext) -> None:
        return None

    @classmethod
    def has_fallback(cls) -> bool:
        return cls.fallback is not BaseNode.fallback


NodeImplementation = Union[Callable[[NodeContext], Any], type]


class Registry(MutableMapping[str, NodeImplementation]):
    """`uses` key -> node implementation (a function of `NodeContext`, or a `BaseNode` subclass)."""

    def __init__(self, nodes: Optional[Mapping[str, NodeImplementation]] = None) -> None:
        self._nodes: Dict[str, NodeImplementation] = dict(nodes or {})

    def node(self, key: str) -> Callable[[NodeImplementation], NodeImplementation]:
        """Decorator: `@registry.node("fetch-order")` registers the function or class under `key`."""

        def register(impl: NodeImplementation) -> NodeImplementation:
            self.register(key, impl)
            return impl

        return register

    def register(self, key: str, impl: NodeImplementation) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"a registry key must be a non-empty string, not {key!r}")
        if not callable(impl):
            raise TypeError(f"node {key!r}: implementation must be a function or a BaseNode subclass, not {impl!r}")
        self._nodes[key] = impl

    def __getitem__(self, key: str) -> NodeImplementation:
        return self._nodes[key]

    def get(self, key: str, default: Any = None) -> Any:  # the hot path: skip the abc machinery
        return self._nodes.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._nodes

    def __setitem__(self, key: str, impl: NodeImplementation) -> None:
        self.register(key, impl)

    def __delitem__(self, key: str) -> None:
        del self._nodes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def keys(self) -> KeysView[str]:  # a dict's view: set comparisons run in C (`check_registry`, per run)
        return self._nodes.keys()

    def __repr__(self) -> str:
        return f"Registry({sorted(self._nodes)!r})"


def is_class_node(impl: Any) -> bool:
    return isinstance(impl, type) and issubclass(impl, BaseNode)
