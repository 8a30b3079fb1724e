"""How a worker turns one node outcome into one `Commit`: `CommitPlan` runs the pure `graph.Traversal`
over node states (`LazyStates`) and a context view (`LazyContext`) loaded on first use, and collects
the context patch, node states, batch items, jobs and events of the commit; with the helpers it
shares with `distributed` (batch item jobs and fields, `job:*` events, a failed run's final context).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, MutableMapping, Optional, Protocol, Sequence, Set, Tuple

from ..builtins import Await
from ..errors import LoopLimitError, SerializationError
from ..events import Event
from ..execution import FallbackResult, NodeFailure, item_failure
from ..graph import PENDING, Activation, CompiledGraph, GraphNode, NodeState, RoutingError, Traversal, counted_joins
from .. import outcome as outcome_of
from ..node import NodeResult
from ..ports import Commit, Counter, Job, RunRecord, RunSnapshot, RunStore, copy_record, item_field, job_node_id
from ..result import AWAITING, COMPLETED, FAILED, FINAL_STATUSES, RUNNING, STALLED, WorkflowResult
from ..runtime import FlowRuntime
from ..serializer import DEFAULT_MAX_VALUE_BYTES, check_json
from ._worker_context import WithDelta


class PlanAdapter(Protocol):
    """What a `CommitPlan` uses of the `DistributedAdapter` it works for (that module imports this one)."""

    runtime: FlowRuntime
    store: RunStore
    clock: Callable[[], float]
    worker_name: str

    def _wanted_for(self, job: Job, node: GraphNode) -> Tuple[List[str], List[str]]: ...

    def _final_result(self, run_id: str, record: RunRecord, delta: Mapping[str, Any], deleted: Iterable[str],
                      states: Optional[Mapping[str, NodeState]] = None, graph: Optional[CompiledGraph] = None,
                      stored: Optional[Mapping[str, Any]] = None) -> WorkflowResult: ...

    def _parent_jobs(self, record: RunRecord) -> List[Job]: ...


class CommitPlan:
    """Turns one outcome into one `Commit`, using the pure traversal over lazily loaded states."""

    def __init__(self, adapter: PlanAdapter, job: Job, graph: CompiledGraph, snap: RunSnapshot) -> None:
        self.adapter = adapter
        self.job = job
        self.graph = graph
        self.snap = snap
        self.record = copy_record(snap.record)
        wanted_states, wanted_keys = adapter._wanted_for(job, graph.nodes[job_node_id(job)])
        loader = _no_states if snap.whole else functools.partial(adapter.store.read_states, job.run_id)
        self.states = LazyStates(snap.states, loader, absent=set(wanted_states) - set(snap.states))
        self.items: Dict[str, Any] = {}
        self.unset_items: List[str] = []
        self.counters: Dict[str, Counter] = {}
        self.traversal = Traversal(graph, self.states, snap.record.outstanding, StoreArrivals(self))
        self.context = LazyContext(adapter.store, job.run_id, snap.context, absent=set(wanted_keys) - set(snap.context),
                                   whole=snap.whole)
        self._stored_states: Optional[Dict[str, NodeState]] = (
            {k: NodeState.from_dict(v) for k, v in snap.states.items()} if snap.whole else None)
        self.jobs: List[Job] = []
        self.delayed: List[Tuple[Job, float]] = []
        self.commit: Optional[Commit] = None
        self.events: Optional[List[Event]] = [] if adapter.runtime.event_bus is not None else None
        self.history: List[Dict[str, Any]] = []  # the run's durable history: what this commit did
        self.duration_ms: Optional[float] = None  # how long the node code ran (set by the driver)
        self.run_commit = False  # make a run commit whatever it changes (an operator's action on the run)

    def apply(self, node: GraphNode, outcome: Any) -> None:
        delta: Dict[str, Any] = {}
        deleted: List[str] = []
        if type(outcome) is WithDelta:
            delta, deleted = outcome.delta, outcome.deleted
            outcome = outcome.outcome
        self.context.overlay(delta, deleted)
        job = self.job
        if job.kind == "node" and node.id in counted_joins(self.graph) and self.traversal.state(node.id).status == PENDING:
            activation, ready, skipped = self.traversal.resolve(node.id)  # this job is the join's resolution
            if activation is None:
                self._skipped(ready, skipped)
                return self._finish()
            if node.inputs is None:
                self.context.set(node.inputs_key, activation.input)
        if type(outcome) is Gather:
            self._gather(node)
        elif type(outcome) is NodeFailure and job.kind == "item":
            assert job.index is not None  # an item job has one (`Job.from_dict` requires it)
            self.traversal.item_done(node.id)
            self._failed(node, item_failure(job.index, job.node_id, outcome.cause))
        elif type(outcome) is NodeFailure:
            self._failed(node, outcome.cause)
        elif job.kind == "item":
            self._item_done(node, outcome)
        elif type(outcome) is not FallbackResult and type(outcome.output) is Await:
            self._park(node, outcome.output.details)
        elif type(outcome) is not FallbackResult and outcome.dynamic_nodes is not None:
            self._expand(node, outcome.dynamic_nodes)
        else:
            self.record.awaiting.pop(node.id, None)
            try:
                self._complete(node, job.iteration, outcome)
            except (SerializationError, RoutingError, LoopLimitError) as error:
                self._failed(node, error)
        self._finish()

    # --- transitions ---------------------------------------------------------------------------

    def _complete(self, node: GraphNode, iteration: int, outcome: Any) -> None:
        fallback = outcome.node if type(outcome) is FallbackResult else None
        done = outcome_of.complete(self.graph, self.traversal, self.context, node, iteration, outcome,
                                   self.adapter.runtime.max_value_bytes)
        result, _, ready, skipped = done
        if fallback is not None:
            self._record("node:finish", fallback.id, output=result.output, action=result.action, fallback_for=node.id)
        self._record("node:finish", node.id, output=result.output, action=result.action)
        for skipped_id in skipped:
            self.history.append({"type": "node:skipped", "payload": {"node_id": skipped_id}})
        if self.events is not None:
            for kind, payload in outcome_of.completion_events(node, done):
                self._event(kind, **payload)
        self._schedule(ready, stored=True)

    def _skipped(self, ready: List[Activation], skipped: List[str]) -> None:
        for skipped_id in skipped:
            self.history.append({"type": "node:skipped", "payload": {"node_id": skipped_id}})
        if self.events is not None:
            for skipped_id in skipped:
                self._event("node:skipped", node_id=skipped_id)
        self._schedule(ready)

    def _schedule(self, ready: List[Activation], stored: bool = False) -> None:
        """Jobs for the activations made ready (their inputs stored unless `stored` already)."""
        if not stored:
            outcome_of.store_inputs(self.graph, ready, self.context)
        blueprint_id = self.graph.blueprint.id
        self.jobs.extend(Job(self.job.run_id, blueprint_id, a.node_id, a.iteration) for a in ready)

    def _record(self, kind: str, node_id: str, **payload: Any) -> None:
        """A history event of this commit's node execution (`Commit.history`)."""
        job = self.job
        payload.update(node_id=node_id, iteration=job.iteration, attempt=job.attempt, worker=self.adapter.worker_name,
                       timestamp=self.adapter.clock(), duration_ms=self.duration_ms)
        self.history.append({"type": kind, "payload": payload})

    def _event(self, kind: str, **payload: Any) -> None:
        """Record an event; called only when the runtime has an event bus (`self.events` is a list)."""
        assert self.events is not None
        self.events.append(Event(kind, {"run_id": self.job.run_id, "blueprint_id": self.graph.blueprint.id, **payload}))

    def _failed(self, node: GraphNode, error: BaseException) -> None:
        failure, event = outcome_of.fail(self.traversal, node, error)
        self.record.status = FAILED
        self.record.errors.append(failure.to_dict())
        self._record("node:error", node.id, message=failure.message, error=failure.message, type=failure.type,
                     traceback=getattr(failure, "traceback", None))
        if self.events is not None:
            self._event("node:error", **event)

    def _park(self, node: GraphNode, details: Dict[str, Any]) -> None:
        kind = details.get("type")
        self.record.awaiting[node.id] = dict(details, iteration=self.job.iteration)
        self._record("workflow:pause", node.id, details=details)
        if self.events is not None and (kind == "wait" or details.get("childAwaiting")):
            self._event("workflow:pause", node_id=node.id, details=details)  # a running child or a timer is no pause
        if kind == "sleep":
            job = Job(self.job.run_id, self.graph.blueprint.id, node.id, self.job.iteration, kind="timer")
            self.delayed.append((job, float(details.get("duration") or 0)))

    def _expand(self, node: GraphNode, specs: List[Dict[str, Any]]) -> None:
        if not specs:
            return self._complete(node, self.job.iteration, NodeResult(output=[]))
        iteration = self.job.iteration
        try:
            fields = batch_fields(node.id, iteration, specs, self.adapter.runtime.max_value_bytes)
        except SerializationError as error:
            return self._failed(node, error)
        self.traversal.expand(node.id, len(specs))
        self.items.update(fields)
        self._record("batch:start", node.id, items=len(specs))
        if self.events is not None:
            self._event("batch:start", node_id=node.id, items=len(specs))
        run_id, blueprint_id = self.job.run_id, self.graph.blueprint.id
        self.jobs.extend(item_job(run_id, blueprint_id, node.id, iteration, i, spec.get("id")) for i, spec in enumerate(specs))

    def _item_done(self, parent: GraphNode, outcome: Any) -> None:
        """A batch item's result: its own field (which must not be stored yet: committed once), and
        one more on the batch's count of finished items; the count reaching the batch's size makes
        the batch's gathering job (`_gather`). The batch's state does not change per item."""
        job = self.job
        try:
            check_json(outcome.output, job.node_id, self.adapter.runtime.max_value_bytes)
        except SerializationError as error:
            return self._failed(parent, error)
        assert job.index is not None  # an item job has one (`Job.from_dict` requires it)
        field = item_field(parent.id, job.iteration, job.index)
        self.items[field] = {"v": outcome.output}
        self.unset_items.append(field)
        self._record("node:finish", job.node_id, parent=parent.id, index=job.index)
        self.traversal.outstanding -= 1
        size = self.traversal.state(parent.id).pending
        self.count(done_field(parent.id, job.iteration), size,
                   Job(job.run_id, self.graph.blueprint.id, parent.id, job.iteration), reserve=0)

    def _gather(self, parent: GraphNode) -> None:
        """Every item of the batch finished: the batch completes with their results, in order."""
        iteration = self.job.iteration
        header = self.adapter.store.read_items(self.job.run_id, [spec_field(parent.id, iteration)])[0]
        fields = [item_field(parent.id, iteration, i) for i in range(batch_size(header))]
        results = [(found or {}).get("v") for found in self.read_fields(fields)]
        self.traversal.state(parent.id).pending = 0
        self.history.append({"type": "batch:finish", "payload": {"node_id": parent.id, "items": len(results),
                                                                 "timestamp": self.adapter.clock()}})
        if self.events is not None:
            self._event("batch:finish", node_id=parent.id, items=len(results))
        try:
            self._complete(parent, iteration, NodeResult(output=results))
        except (SerializationError, RoutingError, LoopLimitError) as error:
            self._failed(parent, error)

    def count(self, field: str, threshold: int, job: Job, reserve: int) -> None:
        """Add one to counter `field` with this commit (see `ports.Counter`)."""
        counter = self.counters.get(field)
        if counter is None:
            self.counters[field] = Counter(field, 1, threshold, job, reserve)
        else:
            counter.delta += 1

    def read_fields(self, fields: Sequence[str]) -> List[Any]:
        """Item fields as this commit will leave them: its own writes, then those of the commits
        before it in its wave segment (`RunSnapshot.pending_items`), then the store (one read, of
        the fields neither holds, kept in the snapshot). Only for fields that no commit can write any
        more: a join's arrivals once all arrived, a batch's results once all finished."""
        own, wave = self.items, self.snap.pending_items
        unread = [f for f in fields if f not in own and f not in wave]
        stored = dict(zip(unread, self.adapter.store.read_items(self.job.run_id, unread))) if unread else {}
        wave.update(stored)  # read once per snapshot: fields are read once no commit can write them any more
        return [own.get(f) or wave.get(f) or stored.get(f) for f in fields]

    # --- the commit ----------------------------------------------------------------------------

    def _finish(self, settling: bool = False) -> None:
        """Make the commit: a node commit when the run's record is left as it is (see `Commit`),
        else a run commit, which also decides the run's status (unless counters it adds to may
        reserve more work: the driver then settles the run once the commit is in)."""
        record, loaded = self.record, self.snap.record
        record.updated_at = self.adapter.clock()
        record.outstanding = self.traversal.outstanding
        changes_record = (settling or self.run_commit or record.status != loaded.status or record.awaiting != loaded.awaiting
                          or len(record.errors) != len(loaded.errors))
        if not changes_record and (self.counters or not due_to_settle(RUNNING, record.awaiting, record.outstanding)):
            return self._node_commit()
        if record.status == RUNNING or record.status == AWAITING:
            if self.counters:
                record.status = RUNNING
            else:
                self._settle_status()
        changed_states = self.states.changed()
        result = None
        if record.status in FINAL_STATUSES:
            all_states = self._all_states()
            result = self.adapter._final_result(self.job.run_id, record, self.context.delta, self.context.deleted,
                                                all_states, self.graph, self.snap.context if self.snap.whole else None)
            record.result = result.to_dict()
            self.jobs.extend(self.adapter._parent_jobs(record))
        elif record.status == AWAITING and loaded.status != AWAITING:
            self.jobs.extend(self.adapter._parent_jobs(record))
        self._job_events()
        history = self._history()
        if record.status in FINAL_STATUSES:
            history.append({"type": "workflow:finish", "payload": {"status": record.status, "errors": list(record.errors),
                                                                   "timestamp": record.updated_at}})
        if self.events is not None:
            if record.status == STALLED and result is not None:
                self._event("workflow:stall", stalled=result.stalled)
            if record.status in FINAL_STATUSES:
                self._event("workflow:finish", status=record.status, errors=list(record.errors))
        self.commit = Commit(
            self.job.run_id, loaded.version, record, context_set=dict(self.context.delta),
            context_delete=list(self.context.deleted), states=changed_states, items=self.items,
            jobs=self.jobs, delayed=self.delayed, counters=list(self.counters.values()), history=history,
        )

    def _history(self) -> List[Dict[str, Any]]:
        """This commit's history: its node's events, then the context keys it changes that they do not say."""
        said = {e["payload"]["node_id"] for e in self.history if e["type"] == "node:finish" and "parent" not in e["payload"]}
        said |= {"_outputs." + node_id for node_id in said}
        changes = [{"type": "context:change", "payload": {"key": key, "value": value, "op": "set"}}
                   for key, value in self.context.delta.items() if key not in said]
        changes += [{"type": "context:change", "payload": {"key": key, "op": "delete"}} for key in self.context.deleted]
        if self.job.kind == "resume":
            changes.insert(0, {"type": "workflow:resume", "payload": {"node_id": self.job.node_id,
                                                                      "timestamp": self.record.updated_at}})
        return changes[:1] + self.history + changes[1:] if self.job.kind == "resume" else self.history + changes

    def _settle_status(self) -> None:
        """The status of a run whose record this run commit changes, from its outstanding work."""
        record = self.record
        if record.outstanding <= 0 and not record.awaiting and self.graph.fallback_only_ids:
            ready, _ = self.traversal.settle()
            self._schedule(ready)
            record.outstanding = self.traversal.outstanding
            if self.counters:  # skipping unused fallbacks reached counted joins: settled once it is in
                record.status = RUNNING
                return
        if record.outstanding <= 0 and not record.awaiting:
            record.status = STALLED if Traversal(self.graph, dict(self._all_states())).unfinished() else COMPLETED
        elif due_to_settle(RUNNING, record.awaiting, record.outstanding):
            record.status = AWAITING
        else:
            record.status = RUNNING

    def _node_commit(self) -> None:
        changed = self.states.changed()
        original = self.states.original
        self._job_events()
        self.commit = Commit(
            self.job.run_id, None, self.record, context_set=dict(self.context.delta),
            context_delete=list(self.context.deleted), states=changed, items=self.items, jobs=self.jobs,
            delayed=self.delayed, guards={k: original(k) for k in changed}, unset_items=self.unset_items,
            counters=list(self.counters.values()), history=self._history(),
            outstanding_delta=self.traversal.outstanding - self.snap.record.outstanding,
        )

    def settle(self) -> None:
        """The run commit that settles a run nothing but parked nodes is left outstanding in."""
        self._finish(settling=True)

    def _job_events(self) -> None:
        if self.events is not None:
            self.events.extend(job_event("job:enqueued", job, delay=0.0) for job in self.jobs)
            self.events.extend(job_event("job:enqueued", job, delay=delay) for job, delay in self.delayed)

    def _all_states(self) -> Dict[str, NodeState]:
        if self._stored_states is None:  # read once per commit: only a run's last commit needs them
            self._stored_states = {
                k: NodeState.from_dict(v) for k, v in self.adapter.store.read_all_states(self.job.run_id).items()
            }
        merged = dict(self._stored_states)
        merged.update(self.states.current())
        return merged


class StoreArrivals:
    """The `graph.ArrivalStore` of a commit: an arrival at a counted join adds one to the join's
    counter (`count_field`), and a taken one's value is an item field of its own (`arrival_field`);
    the count reaching the join's in-degree makes the join's job, which reads the values once
    (through `CommitPlan.read_fields`) and resolves it."""

    __slots__ = ("plan",)

    def __init__(self, plan: CommitPlan) -> None:
        self.plan = plan

    def arrive(self, node_id: str, iteration: int, edge_index: int, taken: bool, value: Any) -> None:
        plan = self.plan
        if taken:
            plan.items[arrival_field(node_id, iteration, edge_index)] = {"v": value}
        job = Job(plan.job.run_id, plan.graph.blueprint.id, node_id, iteration)
        plan.count(count_field(node_id, iteration), plan.graph.nodes[node_id].in_count, job, reserve=1)

    def taken(self, node_id: str, iteration: int, edge_indices: Sequence[int]) -> List[Tuple[int, Any]]:
        fields = self.plan.read_fields([arrival_field(node_id, iteration, i) for i in edge_indices])
        return [(index, found["v"]) for index, found in zip(edge_indices, fields)
                if isinstance(found, Mapping) and "v" in found]


class Gather:
    """The outcome of a batch's gathering job: no node code runs, the items' results are read."""


GATHER = Gather()


def due_to_settle(status: str, awaiting: Mapping[str, Any], outstanding: int) -> bool:
    """Whether a `running` run has nothing outstanding but parked nodes that wait for someone
    else (a `wait`, a child awaiting): it is to end, or to await (`CommitPlan.settle`)."""
    if status != RUNNING:
        return False
    if not awaiting:
        return outstanding <= 0
    blocking = sum(1 for d in awaiting.values() if d.get("type") == "wait" or d.get("childAwaiting"))
    return blocking == len(awaiting) and outstanding <= blocking


class LazyStates(MutableMapping):
    """Node states loaded on first use; remembers which ones the transition changed."""

    def __init__(self, loaded: Mapping[str, Dict[str, Any]], loader: Callable[[List[str]], Dict[str, Dict[str, Any]]],
                 absent: Iterable[str] = ()) -> None:
        self._original: Dict[str, Optional[Dict[str, Any]]] = dict(loaded)
        self._states: Dict[str, Optional[NodeState]] = {k: NodeState.from_dict(v) for k, v in loaded.items()}
        for key in absent:  # asked for and not stored: known to be pending, no need to ask again
            self._original[key] = None
            self._states[key] = None
        self._loader = loader

    def _fetch(self, key: str) -> Optional[NodeState]:
        if key not in self._states:
            found = self._loader([key]).get(key)
            self._original[key] = found
            self._states[key] = NodeState.from_dict(found) if found is not None else None
        return self._states[key]

    def __getitem__(self, key: str) -> NodeState:
        state = self._fetch(key)
        if state is None:
            raise KeyError(key)
        return state

    def get(self, key: str, default: Any = None) -> Any:
        state = self._fetch(key)
        return default if state is None else state

    def __setitem__(self, key: str, value: NodeState) -> None:
        self._fetch(key)
        self._states[key] = value

    def __delitem__(self, key: str) -> None:
        self._states[key] = None

    def __iter__(self) -> Iterator[str]:
        return (k for k, v in self._states.items() if v is not None)

    def __len__(self) -> int:
        return sum(1 for v in self._states.values() if v is not None)

    def changed(self) -> Dict[str, Dict[str, Any]]:
        out = {}
        for key, state in self._states.items():
            if state is None:
                continue
            now = state.to_dict()
            if now != self._original.get(key):
                out[key] = now
        return out

    def original(self, key: str) -> Optional[Dict[str, Any]]:
        """The state `key` as loaded (None: not stored)."""
        return self._original.get(key)

    def current(self) -> Dict[str, NodeState]:
        return {k: v for k, v in self._states.items() if v is not None}


class LazyContext(MutableMapping):
    """The run's context as conditions see it: loaded keys, this commit's changes, then the store."""

    def __init__(self, store: RunStore, run_id: str, loaded: Mapping[str, Any], absent: Iterable[str] = (),
                 whole: bool = False) -> None:
        self._store = store
        self._run_id = run_id
        self._cache: Dict[str, Any] = dict(loaded)
        self._absent: Set[str] = set(absent)
        self._whole = whole  # `loaded` is the whole stored context: never read the store
        self.delta: Dict[str, Any] = {}
        self.deleted: Set[str] = set()

    def overlay(self, delta: Mapping[str, Any], deleted: Iterable[str]) -> None:
        for key in deleted:
            self.delete(key)
        for key, value in delta.items():
            self.set(key, value)

    def set(self, key: str, value: Any) -> None:
        self.delta[key] = value
        self.deleted.discard(key)

    def delete(self, key: str) -> None:
        self.delta.pop(key, None)
        self.deleted.add(key)

    __setitem__ = set

    def __delitem__(self, key: str) -> None:
        self.delete(key)

    def __getitem__(self, key: str) -> Any:
        if key in self.delta:
            return self.delta[key]
        if key in self.deleted or key in self._absent or (self._whole and key not in self._cache):
            raise KeyError(key)
        if key not in self._cache:
            found = self._store.read_context(self._run_id, [key])
            if key not in found:
                self._absent.add(key)
                raise KeyError(key)
            self._cache[key] = found[key]
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def _all(self) -> Dict[str, Any]:
        data = dict(self._cache) if self._whole else self._store.read_all_context(self._run_id)
        data.update(self.delta)
        for key in self.deleted:
            data.pop(key, None)
        return data


def _no_states(node_ids: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    return {}  # a whole snapshot has every stored state already


def spec_field(parent: str, iteration: int) -> str:
    """The store field of a batch's header: its size and the definition its items share."""
    return f"spec:{parent}:{iteration}"


def arrival_field(node_id: str, iteration: int, edge_index: int) -> str:
    """The store field of the value edge `edge_index` carried into join `node_id` at `iteration`
    (see `StoreArrivals`)."""
    return f"arr:{node_id}:{iteration}:{edge_index}"


def count_field(node_id: str, iteration: int) -> str:
    """The store field counting the arrivals at counted join `node_id` at `iteration`."""
    return f"cnt:{node_id}:{iteration}"


def done_field(parent: str, iteration: int) -> str:
    """The store field counting the finished items of batch `parent` at `iteration`."""
    return f"done:{parent}:{iteration}"


def input_field(parent: str, iteration: int, index: int) -> str:
    """The store field of batch item `index`'s input (and of its definition, where it has its own)."""
    return f"in:{parent}:{iteration}:{index}"


_SPEC_KEYS = ("uses", "params", "id")


def batch_fields(parent: str, iteration: int, specs: Sequence[Mapping[str, Any]],
                 max_value_bytes: Optional[int] = DEFAULT_MAX_VALUE_BYTES) -> Dict[str, Any]:
    """The item fields a batch's expansion commits: one header, then one field per item holding its
    input, so an item job reads its own item and nothing of the others (a batch of n items costs
    O(n), not O(n^2)). The header holds the definition the items share (a `batch-scatter`'s are all
    alike); an item whose `uses`, `params` or `id` differ carries its own in its field. Item jobs
    carry none of it: a worker runs what these committed fields say, never what a job says."""
    first = specs[0]
    header = {"n": len(specs), "uses": first.get("uses"), "params": first.get("params")}
    check_json(header["params"], f"{parent} item params", max_value_bytes)
    fields: Dict[str, Any] = {spec_field(parent, iteration): header}
    for i, spec in enumerate(specs):
        where = f"{parent} item input [{i}]"
        value = spec.get("input")
        check_json(value, where, max_value_bytes)
        own: Dict[str, Any] = {"input": value}
        for key in _SPEC_KEYS:
            mine = spec.get(key)
            if key == "id" and (mine is None or mine == f"{parent}.{i}"):
                continue
            if key != "id" and mine == header[key]:
                continue
            check_json(mine, f"{where}.{key}", max_value_bytes)
            own[key] = mine
        fields[input_field(parent, iteration, i)] = own
    return fields


def batch_size(header: Any) -> int:
    """How many items the batch of this header has (a list: the whole specs, as stored before
    item inputs were stored per item)."""
    if isinstance(header, list):
        return len(header)
    if isinstance(header, Mapping) and type(header.get("n")) is int:
        return max(0, header["n"])
    return 0


def batch_item(parent: str, index: int, header: Any, own: Any) -> Optional[Dict[str, Any]]:
    """Item `index`'s definition and input (`id`, `uses`, `params`, `input`) from the committed
    header and item field; None when the batch has no such item."""
    if type(index) is not int or not 0 <= index < batch_size(header):
        return None
    if isinstance(header, list):  # stored before item inputs were stored per item
        spec = header[index]
        return {"id": spec.get("id") or f"{parent}.{index}", "uses": spec.get("uses"), "params": spec.get("params"),
                "input": spec.get("input")}
    if not isinstance(own, Mapping):
        return None
    return {"id": own.get("id") or f"{parent}.{index}", "uses": own.get("uses", header.get("uses")),
            "params": own.get("params", header.get("params")), "input": own.get("input")}


def item_definition(node_id: str, spec: Mapping[str, Any]) -> Any:
    from ..blueprint import NodeDefinition

    return NodeDefinition(id=node_id, uses=spec.get("uses") or "", params=spec.get("params"))


def item_job(run_id: str, blueprint_id: str, parent: str, iteration: int, index: int, item_id: Optional[str] = None) -> Job:
    """The job of batch item `index`: its identity only (what it runs and its input are committed)."""
    return Job(run_id, blueprint_id, item_id or f"{parent}.{index}", iteration, kind="item", parent=parent, index=index)


def job_event(kind: str, job: Job, **extra: Any) -> Event:
    """A `job:*` event: the job's identity (snake_case) plus `extra`."""
    payload: Dict[str, Any] = {"run_id": job.run_id, "blueprint_id": job.blueprint_id, "node_id": job.node_id,
                               "iteration": job.iteration, "kind": job.kind, "attempt": job.attempt, "job_key": job.key}
    if job.parent is not None:
        payload["parent"] = job.parent
        payload["index"] = job.index
    payload.update(extra)
    return Event(kind, payload)
