"""The context and engine node code sees in a worker: `StoreContext` (reads go to the run store,
writes are kept as a delta for the node's commit), `WithDelta` (an outcome with that delta) and
`WorkerEngine` (the `builtins.Engine` of a worker: loop laps, exit conditions, child runs).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Set

from ..builtins import child_run_id
from ..context import DictContext
from ..graph import CompiledGraph, NodeState
from ..ports import Job, RunSnapshot, RunStore
from ..result import AWAITING, FINAL_STATUSES, WorkflowResult
from ..runtime import FlowRuntime


class EngineAdapter(Protocol):
    """What a `WorkerEngine` uses of the `DistributedAdapter` it runs in (that module imports this one)."""

    runtime: FlowRuntime
    store: RunStore

    def start_workflow(self, blueprint_or_id: Any, initial_context: Optional[Mapping[str, Any]] = None,
                       run_id: Optional[str] = None, *, parent: Optional[Dict[str, Any]] = None) -> str: ...


class StoreContext(DictContext):
    """The `Context` node code sees in a worker: reads go to the store (once per key), writes are
    kept as a delta and committed with the node's completion."""

    def __init__(self, store: RunStore, run_id: str, loaded: Mapping[str, Any], absent: Iterable[str] = (),
                 whole: bool = False) -> None:
        super().__init__(dict(loaded), track=True)
        self._store = store
        self._run_id = run_id
        self._absent: Set[str] = set(absent)
        self._complete = whole  # `loaded` is the whole stored context

    def _load(self, key: str) -> None:
        if key in self.data or key in self._absent or key in self._deleted or self._complete:
            return
        found = self._store.read_context(self._run_id, [key])
        if key in found:
            self.data[key] = found[key]
        else:
            self._absent.add(key)

    def get(self, key: str, default: Any = None) -> Any:
        self._load(key)
        return self.data.get(key, default)

    def has(self, key: str) -> bool:
        self._load(key)
        return key in self.data

    def __getitem__(self, key: str) -> Any:
        self._load(key)
        return self.data[key]

    def __contains__(self, key: object) -> bool:
        return self.has(key)  # type: ignore[arg-type]

    def to_dict(self) -> Dict[str, Any]:
        if not self._complete:
            stored = self._store.read_all_context(self._run_id)
            stored.update({k: v for k, v in self.data.items() if k in self._changed or k not in stored})
            for key in self._deleted:
                stored.pop(key, None)
            self.data = stored
            self._complete = True
        return dict(self.data)


class WithDelta:
    """An outcome together with the context changes node code made while producing it."""

    __slots__ = ("outcome", "delta", "deleted")

    def __init__(self, outcome: Any, context: "StoreContext") -> None:
        self.outcome = outcome
        self.delta, deleted = context.take_delta()
        self.deleted = list(deleted)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.outcome, name)


class WorkerEngine:
    """What built-ins see when they run in a worker."""

    wait_timers = False

    def __init__(self, adapter: EngineAdapter, job: Job, graph: CompiledGraph, context: StoreContext, snap: RunSnapshot) -> None:
        self.adapter = adapter
        self.job = job
        self.graph = graph
        self.context = context
        self.snap = snap
        self.evaluator = adapter.runtime.evaluator

    def laps(self, node_id: str) -> int:
        state = self.snap.states.get(node_id)
        return NodeState.from_dict(state).laps if state else 0

    def exit_conditions(self, node_id: str) -> List[Callable[[Mapping[str, Any]], Any]]:
        return self.graph.exit_conditions(node_id)

    def context_names(self) -> Mapping[str, Any]:
        return _ContextNames(self.context)

    def child_blueprint(self, blueprint_id: str) -> Any:
        return self.adapter.runtime.blueprint(blueprint_id)

    def run_child(self, blueprint_id: str, context: Dict[str, Any], parent_node_id: str, iteration: int = 0) -> Any:
        """Start the child run (once) and report its state: finished, awaiting or still running."""
        child_id = child_run_id(self.job.run_id, parent_node_id, self.job.iteration)
        parent = {"runId": self.job.run_id, "blueprintId": self.graph.blueprint.id, "nodeId": parent_node_id,
                  "iteration": self.job.iteration}
        record = self.adapter.store.get_record(child_id)
        if record is None:
            self.adapter.start_workflow(blueprint_id, context, child_id, parent=parent)
            record = self.adapter.store.get_record(child_id)
        if record is not None and record.status in FINAL_STATUSES and record.result is not None:
            return WorkflowResult.from_dict(record.result)
        if record is not None and record.status == AWAITING:
            return _ChildRunning(child_id, True, sorted(record.awaiting))
        return _ChildRunning(child_id, False, [])


class _ChildRunning:
    """A child run that has not finished: the subflow node parks until it does."""

    def __init__(self, run_id: str, awaiting: bool, awaiting_ids: List[str]) -> None:
        self.run_id = run_id
        self.status = "awaiting"  # finish_subflow parks the node on this
        self.awaiting = awaiting_ids
        self.child_awaiting = awaiting
        self.serialized_context = None


class _ContextNames(Mapping):
    """A `StoreContext` seen as a read-only mapping (for a loop condition)."""

    def __init__(self, context: StoreContext) -> None:
        self.context = context

    def __getitem__(self, key: str) -> Any:
        if not self.context.has(key):
            raise KeyError(key)
        return self.context.get(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self.context.get(key, default)

    def __contains__(self, key: object) -> bool:
        return self.context.has(key)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        return iter(self.context.to_dict())

    def __len__(self) -> int:
        return len(self.context.to_dict())
