"""The fluent builder: `create_flow(id).node(...).edge(...)` -> a blueprint and its registry."""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Mapping, Optional, Union

from .blueprint import EdgeDefinition, NodeConfig, NodeDefinition, WorkflowBlueprint
from .builtins import BATCH_GATHER, BATCH_SCATTER, LOOP_CONTROLLER, SLEEP, SUBFLOW, WAIT, WEBHOOK, parse_duration
from .errors import BlueprintError
from .limits import CONCURRENCY_KEY, MAX_CONCURRENCY
from .node import Registry

_CONFIG_KWARGS = ("max_retries", "retry_delay", "timeout", "fallback", "join_strategy")
# keywords whose setting the wire keeps in the config's `extra` (keyword -> wire key; see
# `NodeConfig.concurrency_key`)
_EXTRA_KWARGS = {"concurrency_key": CONCURRENCY_KEY, "max_concurrency": MAX_CONCURRENCY, "queue": "queue"}


def uses_key(flow_id: str, node_id: str, impl: Any) -> str:
    """A deterministic registry key: `module.qualname`, or `<flow id>.<node id>` for lambdas and closures."""
    qualname = getattr(impl, "__qualname__", None)
    module = getattr(impl, "__module__", None)
    if not qualname or not module or "<lambda>" in qualname or "<locals>" in qualname:
        return f"{flow_id}.{node_id}"
    if module == "__main__":
        # under `python -m package.module` the module has a real name a worker can import too
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name:
            module = spec.name
    return f"{module}.{qualname}"


def _config(config: Union[NodeConfig, Mapping[str, Any], None], kwargs: Dict[str, Any]) -> Optional[NodeConfig]:
    unknown = set(kwargs) - set(_CONFIG_KWARGS) - set(_EXTRA_KWARGS)
    if unknown:
        raise TypeError(f"unknown node option(s) {sorted(unknown)}; expected some of "
                        f"{list(_CONFIG_KWARGS) + list(_EXTRA_KWARGS)}")
    if isinstance(config, Mapping):
        config = NodeConfig.from_dict(config)  # the camelCase wire form, milliseconds
    if config is None and not kwargs:
        return None
    base = config or NodeConfig()
    extra = {**base.extra, **{_EXTRA_KWARGS[k]: kwargs.pop(k) for k in list(kwargs) if k in _EXTRA_KWARGS}}
    return NodeConfig(**{**{k: getattr(base, k) for k in _CONFIG_KWARGS}, **kwargs, "extra": extra})


class Flow:
    """Builds a `WorkflowBlueprint` and the registry of the functions and classes it uses."""

    def __init__(self, flow_id: str, *, metadata: Optional[Mapping[str, Any]] = None) -> None:
        self.id = flow_id
        self.metadata: Optional[Dict[str, Any]] = dict(metadata) if metadata is not None else None
        self.registry = Registry()
        self._nodes: List[NodeDefinition] = []
        self._edges: List[EdgeDefinition] = []
        self._blueprint: Optional[WorkflowBlueprint] = None
        self._loops: Dict[str, Dict[str, str]] = {}  # loop id -> its start and end node ids
        self._batches: Dict[str, str] = {}  # batch id -> its gather node id
        self._internal: set = set()  # indexes of the edges the builder itself added (never rewired)

    def node(
        self,
        node_id: str,
        impl: Any,
        *,
        params: Optional[Mapping[str, Any]] = None,
        inputs: Union[str, Mapping[str, str], None] = None,
        config: Union[NodeConfig, Mapping[str, Any], None] = None,
        **config_kwargs: Any,
    ) -> "Flow":
        """Add a node. `impl` is a function of `NodeContext`, a `BaseNode` subclass, or a registry key."""
        if isinstance(impl, str):
            uses = impl
        else:
            uses = uses_key(self.id, node_id, impl)
            self.registry.register(uses, impl)
        return self._add_node(NodeDefinition(
            id=node_id, uses=uses, params=dict(params) if params is not None else None,
            inputs=dict(inputs) if isinstance(inputs, Mapping) else inputs,
            config=_config(config, config_kwargs),
        ))

    def edge(
        self,
        source: str,
        target: str,
        *,
        action: Optional[str] = None,
        condition: Optional[str] = None,
        transform: Optional[str] = None,
    ) -> "Flow":
        self._edges.append(EdgeDefinition(source, target, action, condition, transform))
        self._blueprint = None
        return self

    def _wired(self, edge: EdgeDefinition) -> EdgeDefinition:
        """An edge as the blueprint holds it: edges naming a batch or a loop by its id are rewired."""
        source, target, action = edge.source, edge.target, edge.action
        if source in self._batches:
            source = self._batches[source]  # edges out of a batch leave from its gather
        if target in self._batches:
            target = f"{target}_scatter"  # edges into a batch go to its scatter
        # an edge into a loop's id reaches its controller, which tests the condition before the body
        # runs (SPEC 5 "Loops"); an edge into the body's start node enters there, as TS's builder does
        for loop_id, ends in self._loops.items():
            if source == ends["end"] and target not in (loop_id, ends["start"]):
                source = loop_id  # an edge out of a loop's end node leaves the loop, as in TS
        if source in self._loops and target != self._loops[source]["start"] and action is None:
            action = "break"  # every other edge out of a loop controller is an exit
        if (source, target, action) == (edge.source, edge.target, edge.action):
            return edge
        return EdgeDefinition(source, target, action, edge.condition, edge.transform, dict(edge.extra))

    def loop(
        self, loop_id: str, *, start_node_id: str, end_node_id: str, condition: str, max_iterations: int = 1000
    ) -> "Flow":
        """Repeat `start_node_id` .. `end_node_id` while `condition` (over the context) holds."""
        self._add_node(NodeDefinition(
            id=loop_id, uses=LOOP_CONTROLLER, params={"condition": condition, "maxIterations": max_iterations},
            config=NodeConfig(join_strategy="any"),
        ))
        self._internal.update((len(self._edges), len(self._edges) + 1))
        self._edges.append(EdgeDefinition(end_node_id, loop_id))
        self._edges.append(EdgeDefinition(loop_id, start_node_id, action="continue"))
        self._loops[loop_id] = {"start": start_node_id, "end": end_node_id}
        return self

    def batch(
        self, batch_id: str, worker: Any, *, input_key: str, output_key: Optional[str] = None,
        params: Optional[Mapping[str, Any]] = None, queue: Optional[str] = None,
    ) -> "Flow":
        """Run `worker` once per item of the list at `input_key`; results, in item order, go to `output_key`.
        `queue` routes the batch (its items and its gathering) to that queue (SPEC 14)."""
        if isinstance(worker, str):
            uses = worker
        else:
            uses = uses_key(self.id, f"{batch_id}_worker", worker)
            self.registry.register(uses, worker)
        scatter, gather = f"{batch_id}_scatter", f"{batch_id}_gather"
        scatter_params: Dict[str, Any] = {"inputKey": input_key, "workerUsesKey": uses, "gatherNodeId": gather}
        if params is not None:
            scatter_params["workerParams"] = dict(params)
        routed = _config(None, {"queue": queue}) if queue is not None else None
        self._add_node(NodeDefinition(id=scatter, uses=BATCH_SCATTER, params=scatter_params, config=routed))
        self._add_node(NodeDefinition(id=gather, uses=BATCH_GATHER, params={"outputKey": output_key or batch_id},
                                      config=routed))
        self._internal.add(len(self._edges))
        self._edges.append(EdgeDefinition(scatter, gather))
        self._batches[batch_id] = gather
        return self

    def wait(self, node_id: str, **details: Any) -> "Flow":
        """A node that pauses the run until `resume(...)` completes it."""
        return self._add_node(NodeDefinition(id=node_id, uses=WAIT, params=dict(details) or None))

    def webhook(self, node_id: str, **details: Any) -> "Flow":
        """A node that pauses the run until an HTTP POST to its webhook (see `flowcraft.webhooks`)
        or a `resume(...)` completes it; the POST's JSON body is its output."""
        return self._add_node(NodeDefinition(id=node_id, uses=WEBHOOK, params=dict(details) or None))

    def sleep(self, node_id: str, *, duration: Any) -> "Flow":
        """A durable timer: seconds, or a string such as "30s", "5m", "2h", "1d"."""
        seconds = parse_duration(duration)
        wire = duration if isinstance(duration, str) else round(seconds * 1000)  # the TS wire form is ms
        return self._add_node(NodeDefinition(id=node_id, uses=SLEEP, params={"duration": wire}))

    def subflow(
        self, node_id: str, blueprint_id: str, *, inputs: Optional[Mapping[str, str]] = None,
        outputs: Optional[Mapping[str, str]] = None,
    ) -> "Flow":
        """Run another blueprint as a child run; `inputs` maps child key -> parent key, `outputs` parent key -> child key."""
        params: Dict[str, Any] = {"blueprintId": blueprint_id}
        if inputs:
            params["inputs"] = dict(inputs)
        if outputs:
            params["outputs"] = dict(outputs)
        return self._add_node(NodeDefinition(id=node_id, uses=SUBFLOW, params=params))

    def _add_node(self, definition: NodeDefinition) -> "Flow":
        self._nodes.append(definition)
        self._blueprint = None
        return self

    def to_blueprint(self) -> WorkflowBlueprint:
        """The validated blueprint (built once until the flow changes)."""
        if self._blueprint is None:
            if not self._nodes:  # as TS's toBlueprint
                raise BlueprintError([f"flow {self.id!r} has no nodes: a blueprint needs at least one"], self.id)
            edges = [e if i in self._internal else self._wired(e) for i, e in enumerate(self._edges)]
            self._blueprint = WorkflowBlueprint(self.id, self._nodes, edges, self.metadata).validate()
        return self._blueprint

    def run(self, runtime: Any = None, initial_context: Optional[Mapping[str, Any]] = None, **options: Any) -> Any:
        """Run in memory (a new `FlowRuntime` unless one is given) with this flow's registry."""
        from .runtime import FlowRuntime

        runtime = runtime if runtime is not None else FlowRuntime()
        return runtime.run(self.to_blueprint(), initial_context, registry=self.registry, **options)

    def resume(self, runtime: Any = None, serialized_context: Any = None, **options: Any) -> Any:
        """Resume an awaiting run of this flow (see `FlowRuntime.resume`)."""
        from .runtime import FlowRuntime

        runtime = runtime if runtime is not None else FlowRuntime()
        return runtime.resume(self.to_blueprint(), serialized_context, registry=self.registry, **options)


def create_flow(flow_id: str, *, metadata: Optional[Mapping[str, Any]] = None) -> Flow:
    return Flow(flow_id, metadata=metadata)
