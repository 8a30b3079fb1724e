"""Operating runs (SPEC section 11): run lists, retry / restart / skip / patch, dead letters, pruning.

The value types (`RunSummary`, `RunPage`, `DeadLetter`) and the orchestration of the operator
actions on a distributed run. Every action reads the run (`read_all_states`, `read_all_context`),
builds the new state with the pure `Traversal` (or a `CommitPlan`, for a skip, which routes like a
completion), and writes it with ONE version-checked `Commit` (`expected_version` = the version it
read), then publishes the run's outbox. A lost version race reads again and decides again.
"""
from __future__ import annotations

import base64
import heapq
import json
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import attrs

from .graph import DONE, PENDING, READY, SKIPPED, CompiledGraph, NodeState, counted_joins
from .node import NodeResult
from .ports import Commit, Delivery, Job, RunRecord, RunSnapshot, copy_record, job_node_id
from .result import AWAITING, CANCELLED, COMPLETED, FAILED, RUNNING, STALLED
from .timetravel import apply_patch, descendants

if TYPE_CHECKING:  # the adapter imports this module
    from .distributed import DistributedAdapter

_MAX_CONFLICTS = 50
PRUNABLE = (COMPLETED, FAILED, CANCELLED)
RETRYABLE = (FAILED, CANCELLED, STALLED)


@attrs.frozen
class RunSummary:
    """One line of a run list (times: epoch seconds; `error`: the first error's message or None)."""

    run_id: str
    blueprint_id: Optional[str]
    blueprint_version: Optional[str]
    status: str
    created_at: float
    updated_at: float
    error: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def of(cls, record: RunRecord, created_at: Optional[float] = None) -> "RunSummary":
        first = record.errors[0] if record.errors else None
        return cls(record.run_id, record.blueprint_id, record.blueprint_version, record.status,
                   float(created_at if created_at is not None else record.updated_at), float(record.updated_at),
                   None if first is None else str(first.get("message", "")))


@attrs.frozen
class RunPage:
    """A page of `list_runs`, newest first; `next_cursor` gives the next page (None: the last)."""

    runs: List[RunSummary]
    next_cursor: Optional[str] = None


@attrs.frozen
class DeadLetter:
    """A message the queue gave up on: its `id` (for `requeue_dead_letter`), raw `body`, `reason`,
    the run it names (when it can be read out of it) and when it died (epoch seconds)."""

    id: str
    body: bytes
    reason: str
    run_id: Optional[str]
    dead_at: float

    def to_dict(self) -> Dict[str, Any]:
        return {"id": self.id, "body": self.body.decode("utf-8", "replace"), "reason": self.reason,
                "run_id": self.run_id, "dead_at": self.dead_at}


# --- cursors: (updated_at, run_id) of the last run of a page, opaque to callers ---------------


def encode_cursor(position: Any, run_id: str) -> str:
    """An opaque cursor: a store's position of the last run of a page (epoch seconds, or a
    store's exact time text) and its run id."""
    return base64.urlsafe_b64encode(json.dumps([position, run_id]).encode()).decode()


def decode_cursor(cursor: Optional[str]) -> Optional[Tuple[Any, str]]:
    """(position, run id) of a cursor (the position as `encode_cursor` got it); ValueError if
    it is not one."""
    if not cursor:
        return None
    try:
        position, run_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, TypeError) as error:
        raise ValueError(f"not a run list cursor: {cursor!r}") from error
    if not isinstance(run_id, str) or not isinstance(position, (int, float, str)) or isinstance(position, bool):
        raise ValueError(f"not a run list cursor: {cursor!r}")
    return position, run_id


def _float_position(after: Optional[Tuple[Any, str]], cursor: Optional[str]) -> Optional[Tuple[float, str]]:
    if after is None:
        return None
    try:
        return float(after[0]), after[1]
    except ValueError:
        raise ValueError(f"not a run list cursor of this store: {cursor!r}") from None


def float_cursor(cursor: Optional[str]) -> Optional[Tuple[float, str]]:
    """A cursor whose position is epoch seconds (the fakes', Redis's)."""
    return _float_position(decode_cursor(cursor), cursor)


def check_list_args(status: Optional[str], limit: int) -> None:
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a whole number >= 1, not {limit!r}")
    if status is not None and status not in (RUNNING, AWAITING, COMPLETED, FAILED, CANCELLED, STALLED):
        raise ValueError(f"unknown run status {status!r}")


def page_of(rows: Iterable[Tuple[float, str, RunSummary]], limit: int) -> RunPage:
    """A page from rows (updated_at, run_id, summary) already ordered newest first and past the
    cursor, of which at most `limit + 1` are read."""
    runs: List[RunSummary] = []
    more = False
    for _, _, summary in rows:
        if len(runs) == limit:
            more = True
            break
        runs.append(summary)
    last = runs[-1] if runs and more else None
    return RunPage(runs, encode_cursor(last.updated_at, last.run_id) if last is not None else None)


def list_in_memory(runs: Iterable[Tuple[RunRecord, float]], status: Optional[str], blueprint_id: Optional[str],
                   since: Optional[float], until: Optional[float], limit: int, cursor: Optional[str]) -> RunPage:
    """`list_runs` over (record, created_at) pairs in memory (the fakes): one pass keeping the newest
    `limit + 1` (a heap, O(n log limit)); summaries are made for those only."""
    check_list_args(status, limit)
    after = _float_position(decode_cursor(cursor), cursor)
    chosen = heapq.nlargest(limit + 1, (
        (r.updated_at, r.run_id, r, created) for r, created in runs
        if (status is None or r.status == status) and (blueprint_id is None or r.blueprint_id == blueprint_id)
        and (since is None or r.updated_at >= since) and (until is None or r.updated_at <= until)
        and (after is None or (r.updated_at, r.run_id) < after)))  # run ids are unique: no tie reaches r
    return page_of(((u, i, RunSummary.of(r, c)) for u, i, r, c in chosen), limit)


# --- operator actions on a distributed run ----------------------------------------------------


def _graph(adapter: "DistributedAdapter", record: RunRecord) -> CompiledGraph:
    return adapter.runtime.graph(adapter.runtime.blueprint(record.blueprint_id or ""))


def _record(adapter: "DistributedAdapter", run_id: str) -> RunRecord:
    record = adapter.store.get_record(run_id)
    if record is None:
        raise KeyError(f"unknown run {run_id!r}")
    if record.version == 0:
        raise ValueError(f"run {run_id} was never started by a worker: there is nothing to change yet")
    return record


def _node_ids(graph: CompiledGraph, node_ids: Iterable[str]) -> List[str]:
    out = list(dict.fromkeys(node_ids))
    unknown = [n for n in out if n not in graph.nodes]
    if unknown:
        raise ValueError(f"unknown node(s) {unknown} in blueprint {graph.blueprint.id!r} (its nodes: {sorted(graph.nodes)})")
    return out


def _frontier_jobs(adapter: "DistributedAdapter", run_id: str, graph: CompiledGraph, record: RunRecord,
                   states: Mapping[str, NodeState]) -> List[Job]:
    """A job for every ready node that is not parked (as the reconciler finds them); a batch's
    unfinished items."""
    jobs: List[Job] = []
    for node_id, state in states.items():
        if state.status != READY or node_id not in graph.nodes:
            continue
        if (record.awaiting.get(node_id) or {}).get("type") in ("wait", "sleep"):
            continue
        if state.pending > 0:
            jobs.extend(adapter._missing_items(run_id, graph, node_id, state.iteration))
        else:
            jobs.append(Job(run_id, graph.blueprint.id, node_id, state.iteration))
    return jobs


def _reindex(adapter: "DistributedAdapter", run_id: str, before: str) -> None:
    """A store whose run list index follows final statuses only (Redis: `reindex`) is told that
    an ended run runs again."""
    reindex = getattr(adapter.store, "reindex", None)
    if reindex is not None and before not in (RUNNING, AWAITING):
        reindex(run_id)


def _outstanding(states: Mapping[str, NodeState]) -> int:
    """Activations not yet completed: each ready node, and each unfinished item of a batch."""
    return sum(1 + max(0, s.pending) for s in states.values() if s.status == READY)


def _recount_joins(graph: CompiledGraph, states: Mapping[str, NodeState], reset: Mapping[str, NodeState]) -> Dict[str, Any]:
    """The item fields that make the counted joins put back to pending count again (see
    `graph.counted_joins`): their counter holds the arrivals from the nodes that do not run again,
    and the arrivals of the edges from those that do are cleared (arriving again, they count)."""
    from .distributed._plan import arrival_field, count_field  # (the distributed package imports this module)

    fields: Dict[str, Any] = {}
    counted = counted_joins(graph)
    for node_id, state in reset.items():
        if node_id not in counted or state.status != PENDING:
            continue
        arrived = 0
        for edge in graph.nodes[node_id].incoming:
            source = states.get(edge.source)
            if edge.source not in reset and source is not None and source.status in (DONE, SKIPPED):
                arrived += 1
            else:
                fields[arrival_field(node_id, state.iteration, edge.index)] = {}
        fields[count_field(node_id, state.iteration)] = arrived
    return fields


def _rerun(adapter: "DistributedAdapter", run_id: str, choose: Any, forget_outputs: bool) -> Set[str]:
    """Put the nodes `choose(graph, record, states)` returns (reset: node id -> new state) back and
    the run to `running`, in one version-checked commit; return the ids of the nodes enqueued."""
    for _ in range(_MAX_CONFLICTS):
        record = _record(adapter, run_id)
        graph = _graph(adapter, record)
        states = {k: NodeState.from_dict(v) for k, v in adapter.store.read_all_states(run_id).items()}
        reset: Dict[str, NodeState] = choose(graph, record, states)
        states.update(reset)
        new = copy_record(record)
        new.status = RUNNING
        new.errors = []
        new.result = None
        new.deadline_at = None  # a run an operator runs again is not held to the deadline it had
        for node_id in reset:
            new.awaiting.pop(node_id, None)
        new.outstanding = _outstanding(states)
        new.updated_at = adapter.clock()
        delete: List[str] = []
        if forget_outputs:
            context = adapter.store.read_all_context(run_id)
            delete = [k for n in reset for k in (n, "_outputs." + n) if k in context]
        jobs = adapter.router.jobs(_frontier_jobs(adapter, run_id, graph, new, states))
        if not jobs and not new.awaiting:
            raise ValueError(f"run {run_id}: no node would run again")
        commit = Commit(run_id, record.version, new, context_delete=delete,
                        states={k: v.to_dict() for k, v in reset.items()}, jobs=jobs,
                        items=_recount_joins(graph, states, reset),
                        history=[{"type": "run:restart" if forget_outputs else "run:retry",
                                  "payload": {"node_ids": sorted(reset), "timestamp": new.updated_at}}])
        if adapter.store.commit(commit):
            _reindex(adapter, run_id, record.status)
            adapter.store.publish_outbox(run_id, adapter.queue)
            return {job_node_id(j) for j in jobs}
    raise RuntimeError(f"run {run_id}: could not commit after {_MAX_CONFLICTS} version conflicts")


def retry(adapter: "DistributedAdapter", run_id: str, node_ids: Optional[Sequence[str]] = None) -> Set[str]:
    """A failed, cancelled or stalled run runs again from its failed nodes (or `node_ids`), with
    fresh attempts; the nodes that completed do not run again."""
    record = _record(adapter, run_id)
    if record.status not in RETRYABLE:
        raise ValueError(f"run {run_id} is {record.status}: only a failed, cancelled or stalled run can be retried")

    def choose(graph: CompiledGraph, rec: RunRecord, states: Dict[str, NodeState]) -> Dict[str, NodeState]:
        if rec.status not in RETRYABLE:
            raise ValueError(f"run {run_id} is {rec.status}: only a failed, cancelled or stalled run can be retried")
        wanted = _node_ids(graph, node_ids if node_ids else
                           [e["node_id"] for e in rec.errors if e.get("node_id") in graph.nodes])
        reset = {}
        for node_id in wanted:
            old = states.get(node_id) or NodeState()
            reset[node_id] = NodeState(old.iteration, READY, old.arrivals, old.laps, 0)
        return reset

    return _rerun(adapter, run_id, choose, forget_outputs=False)


def restart_from(adapter: "DistributedAdapter", run_id: str, node_id: str) -> Set[str]:
    """`node_id` and every node downstream of it run again (their outputs are forgotten); the rest
    of the run stays as it is. A join downstream keeps the arrivals of edges from nodes that are
    not run again only where its state holds them (see `NodeState`)."""
    def choose(graph: CompiledGraph, rec: RunRecord, states: Dict[str, NodeState]) -> Dict[str, NodeState]:
        if rec.status == RUNNING:
            raise ValueError(f"run {run_id} is running: cancel it or wait for it to end before restarting it")
        _node_ids(graph, [node_id])
        again = descendants(graph, node_id) - {node_id}
        reset = {}
        start = states.get(node_id) or NodeState()
        reset[node_id] = NodeState(start.iteration, READY)
        for other in again:
            old = states.get(other) or NodeState()
            arrivals = None
            if old.arrivals:  # arrivals from nodes that are not run again stay
                sources = {e.index: e.source for e in graph.edges}
                arrivals = {i: v for i, v in old.arrivals.items() if sources.get(i) not in again | {node_id}} or None
            reset[other] = NodeState(old.iteration, PENDING, arrivals)
        return reset

    return _rerun(adapter, run_id, choose, forget_outputs=True)


def skip(adapter: "DistributedAdapter", run_id: str, node_id: str, output: Any = None) -> Set[str]:
    """A failed or awaiting node counts as completed with `output`, and the run goes on (routed as
    a completion, in one commit)."""
    from .distributed._plan import CommitPlan

    for _ in range(_MAX_CONFLICTS):
        # the record first: whatever commit lands after it makes this one's version check fail
        snap = RunSnapshot(_record(adapter, run_id), adapter.store.read_all_states(run_id),
                           adapter.store.read_all_context(run_id), whole=True)
        record = snap.record
        graph = _graph(adapter, record)
        _node_ids(graph, [node_id])
        failed_here = record.status in RETRYABLE and any(e.get("node_id") == node_id for e in record.errors)
        if not failed_here and node_id not in record.awaiting:
            raise ValueError(f"run {run_id}: node {node_id!r} has neither failed nor awaits: there is nothing to skip")
        state = NodeState.from_dict(snap.states.get(node_id) or {})
        ready = copy_record(record)
        if failed_here:  # as if it were ready again: the run running, its errors cleared
            ready.status = RUNNING
            ready.errors = [e for e in ready.errors if e.get("node_id") != node_id]
            ready.result = None
            ready.outstanding += 1
            state.status = READY
        ready.awaiting.pop(node_id, None)
        snap.states[node_id] = state.to_dict()
        snap.record = ready  # same version: the commit is checked against the version read
        job = Job(run_id, graph.blueprint.id, node_id, state.iteration)
        plan = CommitPlan(adapter, job, graph, snap)
        plan.run_commit = True  # checked against the version read, as the run's record changes
        plan.apply(graph.nodes[node_id], NodeResult(output=output))
        commit = plan.commit
        if commit is None:
            return set()
        adapter.router.commit(commit)
        commit.history.insert(0, {"type": "node:skip", "payload": {"node_id": node_id, "output": output,
                                                                  "timestamp": ready.updated_at}})
        if adapter.store.commit(commit):
            _reindex(adapter, run_id, record.status)
            adapter.store.publish_outbox(run_id, adapter.queue)
            return {job_node_id(j) for j in commit.made_jobs()}
    raise RuntimeError(f"run {run_id}: could not commit after {_MAX_CONFLICTS} version conflicts")


def patch_context(adapter: "DistributedAdapter", run_id: str, set: Optional[Mapping[str, Any]] = None,
                  delete: Optional[Iterable[str]] = None) -> None:
    """Change a run's context (between node executions: a version-checked commit that changes
    nothing else)."""
    set = dict(set or {})
    delete = list(delete or ())
    apply_patch({}, set, delete, adapter.runtime.max_value_bytes)  # the checks: ValueError, nothing changed
    for _ in range(_MAX_CONFLICTS):
        record = _record(adapter, run_id)
        new = copy_record(record)
        new.updated_at = adapter.clock()
        history = [{"type": "context:patch", "payload": {"set": set, "delete": delete, "timestamp": new.updated_at}}]
        history += [{"type": "context:change", "payload": {"key": k, "value": v, "op": "set"}} for k, v in set.items()]
        history += [{"type": "context:change", "payload": {"key": k, "op": "delete"}} for k in delete]
        if adapter.store.commit(Commit(run_id, record.version, new, context_set=set, context_delete=delete,
                                       history=history)):
            return
    raise RuntimeError(f"run {run_id}: could not commit after {_MAX_CONFLICTS} version conflicts")


def failed_by(adapter: "DistributedAdapter", delivery: Delivery) -> Optional[Tuple[str, List[str]]]:
    """(run id, [node id]) when the delivery's run failed because of it (an error of the node it
    names, read out of it even when it is malformed): requeuing it then retries the run from that
    node (back to `running`, the node's job enqueued by the retry); else None."""
    if delivery.job is not None:
        run_id, node_id = delivery.job.run_id, job_node_id(delivery.job)
    else:
        hint = delivery.identity_hint()
        if hint is None:
            return None
        run_id, node_id = hint[0], hint[2]
    record = adapter.store.get_record(run_id)
    if record is not None and record.status == FAILED and any(e.get("node_id") == node_id for e in record.errors):
        return run_id, [node_id]
    return None


__all__ = ["DeadLetter", "RunPage", "RunSummary", "patch_context", "restart_from", "retry", "skip"]
