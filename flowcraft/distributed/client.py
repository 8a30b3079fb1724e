"""The client side: starting runs, reading them, resuming, cancelling, reconciling one run, and
the operations of SPEC section 11."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import attrs

from .. import deadlines, operations, routing
from ..events import Event
from ..graph import PENDING, READY, CompiledGraph, NodeState, Traversal, check_resume_action, counted_joins
from ..middleware import start_traceparent
from ..node import NodeResult
from ._plan import batch_item, batch_size, count_field, due_to_settle, input_field, item_job, spec_field
from ..ports import (
    Commit,
    Delivery,
    Job,
    JobQueue,
    RunRecord,
    RunStatus,
    RunStore,
    WorkerInfo,
    identity_problem,
    item_field,
    job_node_id,
)
from ..result import AWAITING, CANCELLED, COMPLETED, FINAL_STATUSES, RUNNING, WorkflowResult
from ..runtime import FlowRuntime, awaiting_node, new_run_id, subflow_depth_error
from ..serializer import check_values
from ._common import _MAX_CONFLICTS, TRACEPARENT, _finish_event, _same_parent, _traced
from ._jobs import _JobHandling

logger = logging.getLogger("flowcraft.distributed")


class _Operations:
    """SPEC section 11 on a `DistributedAdapter` (mixed in): the orchestration is in
    `flowcraft.operations`; stores offer `list_runs` and `prune`, queues the dead letters."""

    runtime: FlowRuntime
    router: routing.Router
    store: RunStore
    queue: JobQueue
    clock: Callable[[], float]

    def list_runs(self, status: Optional[str] = None, blueprint_id: Optional[str] = None, since: Optional[float] = None,
                  until: Optional[float] = None, limit: int = 50, cursor: Optional[str] = None) -> "operations.RunPage":
        """Runs newest first (by `updated_at`; `since`/`until` bound it), `limit` per page."""
        operations.check_list_args(status, limit)
        return self.store.list_runs(status, blueprint_id, since, until, limit, cursor)  # type: ignore[attr-defined]

    def retry(self, run_id: str, node_ids: Optional[Sequence[str]] = None) -> Set[str]:
        return operations.retry(self, run_id, node_ids)  # type: ignore[arg-type]

    def restart_from(self, run_id: str, node_id: str) -> Set[str]:
        return operations.restart_from(self, run_id, node_id)  # type: ignore[arg-type]

    def skip(self, run_id: str, node_id: str, output: Any = None) -> Set[str]:
        return operations.skip(self, run_id, node_id, output)  # type: ignore[arg-type]

    def patch_context(self, run_id: str, set: Optional[Mapping[str, Any]] = None, delete: Optional[Iterable[str]] = None) -> None:
        operations.patch_context(self, run_id, set, delete)  # type: ignore[arg-type]

    def dead_letters(self, limit: int = 100) -> List["operations.DeadLetter"]:
        return list(self.queue.list_dead_letters(limit))  # type: ignore[attr-defined]

    def requeue_dead_letter(self, dead_letter_id: str) -> bool:
        """Put a dead letter back in the queue; True if it was there. When its run failed because
        of it, the run is retried (back to `running`, the node's job enqueued) instead."""
        found = [d for d in self.queue.list_dead_letters(None) if d.id == dead_letter_id]  # type: ignore[attr-defined]
        if not found:
            return False
        delivery = Delivery.parse(found[0].body, None)
        failed = operations.failed_by(self, delivery)  # type: ignore[arg-type]
        if failed is not None:
            self.retry(*failed)
            return bool(self.queue.remove_dead_letter(dead_letter_id, publish=False))  # type: ignore[attr-defined]
        queue = self.router.queue_for(delivery.job) if delivery.job is not None else None
        if queue is not None:  # its node is routed: to that queue (a malformed body goes to the default one)
            return bool(self.queue.remove_dead_letter(dead_letter_id, publish=True, queue=queue))  # type: ignore[attr-defined]
        return bool(self.queue.remove_dead_letter(dead_letter_id, publish=True))  # type: ignore[attr-defined]

    def purge_dead_letters(self) -> int:
        return int(self.queue.purge_dead_letters())  # type: ignore[attr-defined]

    def live_workers(self) -> Optional[List[WorkerInfo]]:
        """The workers the queue serves now, as far as its backend can tell; None if it cannot."""
        read = getattr(self.queue, "live_workers", None)
        return None if read is None else list(read())

    def prune(self, older_than_seconds: float, statuses: Sequence[str] = operations.PRUNABLE) -> int:
        """Delete the runs in `statuses` last updated more than `older_than_seconds` ago (context,
        states, items, status, index entries); return how many."""
        if older_than_seconds < 0:
            raise ValueError(f"older_than_seconds must be >= 0, not {older_than_seconds!r}")
        unknown = [s for s in statuses if s not in FINAL_STATUSES]
        if unknown:
            raise ValueError(f"only ended runs can be pruned, not {unknown}")
        return int(self.store.prune(self.clock() - older_than_seconds, tuple(statuses)))  # type: ignore[attr-defined]


class _ClientCalls(_Operations, _JobHandling):
    """What a client calls: `start_workflow`, `get_status`, `wait_for_result`, `resume_with_action`, ..."""

    # === client ==================================================================================

    def start_workflow(self, blueprint_or_id: Any, initial_context: Optional[Mapping[str, Any]] = None,
                       run_id: Optional[str] = None, *, parent: Optional[Dict[str, Any]] = None,
                       traceparent: Optional[str] = None, deadline: Optional[float] = None) -> str:
        """Create a run and enqueue its start nodes; return its id.

        `traceparent` (a W3C trace context, opaque here) defaults to the one a telemetry middleware
        of the runtime gives (`middleware.start_traceparent`): the record keeps it and every job of
        the run carries it (SPEC 13).

        `run_id` must be a valid identity (`ports.identity_problem`) of no existing run: naming an
        existing one raises `ValueError` (it is never handed back, nor its context). `parent` is
        for a subflow's child (started twice by a redelivered parent job, it is the same run).

        `deadline` (seconds; default the blueprint's `metadata.deadline`): the run fails with
        `DeadlineExceeded` if it has not ended by then (see `flowcraft.deadlines`)."""
        blueprint = self.runtime.blueprint(blueprint_or_id)
        seconds = deadlines.run_deadline(blueprint, deadline)
        graph = self.runtime.graph(blueprint)
        if self.runtime.registry:  # a pure client (blueprints, no node code) cannot check: its workers will
            self.runtime.check_registry(blueprint)  # before anything is stored: a run no worker can finish never starts
        if blueprint.id not in self.runtime.blueprints:
            self.runtime.add_blueprint(blueprint)
        run_id = run_id or new_run_id()
        problem = identity_problem(run_id)
        if problem is not None:
            raise ValueError(f"run id {run_id!r} {problem}")
        if parent is not None:
            parent = self._child_parent(parent)
        context = dict(initial_context or {})
        check_values(context, "initial context", self.runtime.max_value_bytes)  # as FlowRuntime.run
        traversal = Traversal(graph, {})
        if traceparent is None and self.runtime.middleware:
            traceparent = start_traceparent(self.runtime.middleware)
        self._check_routes(graph)
        jobs = self.router.jobs(_traced([Job(run_id, blueprint.id, a.node_id, a.iteration) for a in traversal.start()],
                                        traceparent))
        record = RunRecord(run_id, blueprint.id, blueprint.version, RUNNING, 1, traversal.outstanding,
                           parent=parent, updated_at=self.clock(), blueprint_digest=graph.digest, traceparent=traceparent)
        states = {k: v.to_dict() for k, v in traversal.states.items()}
        if not jobs:
            record.status = COMPLETED
            record.outstanding = 0
        elif seconds is not None:
            record.deadline_at = record.updated_at + seconds
        history = [{"type": "workflow:start", "payload": {"initial_context": context, "blueprint_id": blueprint.id,
                                                          "timestamp": record.updated_at}}]
        if not self.store.create_run(record, context, states, jobs, history):
            existing = self.store.get_record(run_id)
            if parent is None or existing is None or not _same_parent(existing.parent, parent):
                raise ValueError(f"run {run_id!r} exists already: start a new run with another run id")
            self.store.publish_outbox(run_id, self.queue)  # a subflow's child started twice: make sure its jobs went out
            return run_id
        if record.status == COMPLETED:
            record.result = WorkflowResult(COMPLETED, context, run_id=run_id).to_dict()
            self.store.commit(Commit(run_id, 1, attrs.evolve(record), jobs=self.router.jobs(self._parent_jobs(record)),
                                     history=[_finish_event(record)]))
        if record.deadline_at is not None:  # lost if this process dies right now: the reconciler fails it when overdue
            self.queue.enqueue([deadlines.deadline_job(run_id, blueprint.id)], seconds or 0.0)
        self.store.publish_outbox(run_id, self.queue)
        if self.runtime.event_bus is not None:
            self._emit_all([Event("workflow:start", {"run_id": run_id, "blueprint_id": blueprint.id,
                                                     "initial_context": context})])
            self._emit_jobs(jobs)
            if record.status == COMPLETED:
                self._emit_ended(record, self._parent_jobs(record))
        return run_id

    def _check_routes(self, graph: CompiledGraph) -> None:
        """A graph routing a node to a queue name the backend cannot use fails its first start,
        naming the node (`routing.RoutingError`)."""
        if id(graph) not in self._routes_checked:
            routing.check_names(graph, getattr(self.queue, "queue_name_problem", None))
            self._routes_checked.add(id(graph))

    def _child_parent(self, parent: Dict[str, Any]) -> Dict[str, Any]:
        """A subflow child's parent reference with the child's depth (its parent's + 1); raises
        `SubflowError` past the runtime's `max_subflow_depth`, as in memory."""
        above = self.store.get_record(parent["runId"])
        depth = 1 + int(((above.parent if above is not None else None) or {}).get("depth", 0))
        limit = self.runtime.max_subflow_depth
        if limit is not None and depth > limit:
            raise subflow_depth_error(parent["nodeId"], depth, limit)
        return dict(parent, depth=depth)

    def get_history(self, run_id: str) -> List[Event]:
        """The run's durable history (SPEC 11), in commit order: written by the same atomic commits
        as the states it describes (`Commit.history`), the newest `ports.HISTORY_CAP` commits' worth.
        `runtime.replay(blueprint, adapter.get_history(run_id))` rebuilds a finished run's context."""
        return [Event(e["type"], e.get("payload") or {}) for e in self.store.read_history(run_id)]

    def get_status(self, run_id: str) -> Optional[RunStatus]:
        record = self.store.get_record(run_id)
        if record is None:
            return None
        return RunStatus(run_id, record.status, record.updated_at, record.result)

    def wait_for_result(self, run_id: str, timeout: Optional[float] = None, poll_interval: float = 0.01) -> WorkflowResult:
        """Block until the run is completed, failed, cancelled, stalled or awaiting."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll_interval
        while True:
            record = self.store.get_record(run_id)
            if record is None:
                raise KeyError(f"unknown run {run_id!r}")
            if record.status in FINAL_STATUSES and record.result is not None:
                return WorkflowResult.from_dict(record.result)
            if record.status == AWAITING:
                return self._final_result(run_id, record, {}, ())
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} still {record.status} after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def resume_with_action(self, run_id: str, action: Optional[str], output: Any = None, node_id: Optional[str] = None) -> Set[str]:
        """Complete an awaiting `wait` node with `action`/`output`; return the ids of the nodes enqueued."""
        check_values({"output": output}, "resume", self.runtime.max_value_bytes)  # refused before the run changes, as in memory
        record = self.store.get_record(run_id)
        if record is None:
            raise KeyError(f"unknown run {run_id!r}")
        if record.status not in (RUNNING, AWAITING):
            raise ValueError(f"run {run_id} is {record.status}: there is nothing to resume")
        waiting = {n: d for n, d in record.awaiting.items() if d.get("type") in ("wait", "subflow")}
        try:
            node_id = awaiting_node(waiting, node_id)
        except ValueError as error:
            raise ValueError(f"run {run_id}: {error}") from None
        details = waiting[node_id]
        if details.get("type") == "subflow":
            return self.resume_with_action(details["childRunId"], action, output)
        graph = self.runtime.graph(self.runtime.blueprint(record.blueprint_id))  # type: ignore[arg-type]  # a stored run's record names its blueprint
        node = graph.nodes[node_id]
        try:
            check_resume_action(node, action)  # before anything changes: a misspelt action ends nothing
        except ValueError as error:
            raise ValueError(f"run {run_id}: {error}") from None
        job = Job(run_id, graph.blueprint.id, node_id, int(details.get("iteration", 0)), kind="resume",
                  extra={TRACEPARENT: record.traceparent} if record.traceparent else {})
        snap = self._load(job, graph, node)
        if self.runtime.event_bus is not None:
            self._emit_all([Event("workflow:resume", {"run_id": run_id, "blueprint_id": graph.blueprint.id,
                                                      "node_id": node_id, "action": action})])
        enqueued = self._commit_outcome(job, graph, node, snap, NodeResult(output=output, action=action), None)
        self.store.publish_outbox(run_id, self.queue)
        return enqueued

    def cancel(self, run_id: str) -> None:
        """Cancel a run: it ends `cancelled` and workers drop its remaining jobs."""
        for _ in range(_MAX_CONFLICTS):
            record = self.store.get_record(run_id)
            if record is None:
                raise KeyError(f"unknown run {run_id!r}")
            if record.status in FINAL_STATUSES:
                return
            new = attrs.evolve(record, status=CANCELLED, updated_at=self.clock())
            new.result = self._final_result(run_id, new, {}, ()).to_dict()
            jobs = self.router.jobs(self._parent_jobs(new))
            history = [{"type": "run:cancel", "payload": {"timestamp": new.updated_at}}, _finish_event(new)]
            if self.store.commit(Commit(run_id, record.version, new, jobs=jobs, history=history)):
                self.store.publish_outbox(run_id, self.queue)
                self._emit_ended(new, jobs)
                return

    def reconcile(self, run_id: str) -> Set[str]:
        """Re-enqueue the frontier of a running run (ready nodes, due timers, unfinished batch items).

        Safe at any time: a job for work already done or queued is dropped by the worker that takes
        it, and no completion is ever committed twice."""
        record = self.store.get_record(run_id)
        if record is None or record.status != RUNNING or record.version == 0:
            return set()  # unknown, finished, or started by a seed client and not yet adopted by a worker
        if record.deadline_at is not None and record.deadline_at <= self.clock():  # its deadline job was lost
            deadlines.fail_overdue(self._adapter, record)
            return set()
        self.store.publish_outbox(run_id, self.queue)
        graph = self.runtime.graph(self.runtime.blueprint(record.blueprint_id))  # type: ignore[arg-type]  # a stored run's record names its blueprint
        if due_to_settle(record.status, record.awaiting, record.outstanding):  # its settling was lost in a crash
            self._settle(Job(run_id, graph.blueprint.id, next(iter(graph.nodes))), graph)
            record = self.store.get_record(run_id)
            if record is None or record.status != RUNNING:
                return set()
        states = {k: NodeState.from_dict(v) for k, v in self.store.read_all_states(run_id).items()}
        jobs: List[Tuple[Job, float]] = []
        for node_id in counted_joins(graph):  # a join all of whose edges arrived waits for its own job
            state = states.get(node_id) or NodeState()
            if state.status == PENDING and self._count(run_id, count_field(node_id, state.iteration)) >= graph.nodes[node_id].in_count:
                jobs.append((Job(run_id, graph.blueprint.id, node_id, state.iteration), 0.0))
        for node_id, state in states.items():
            if state.status != READY or node_id not in graph.nodes:
                continue
            parked = record.awaiting.get(node_id) or {}
            kind = parked.get("type")
            if kind == "wait":
                continue
            if kind == "sleep":
                jobs.append((Job(run_id, graph.blueprint.id, node_id, state.iteration, kind="timer"), self._remaining(parked)))
            elif state.pending > 0:
                missing = self._missing_items(run_id, graph, node_id, state.iteration)
                jobs.extend((j, 0.0) for j in missing or [Job(run_id, graph.blueprint.id, node_id, state.iteration)])
            else:
                jobs.append((Job(run_id, graph.blueprint.id, node_id, state.iteration), 0.0))
        # `requeue` (optional on a queue): an enqueue that checks the queue's own bookkeeping of jobs
        # it believes waiting, where a plain enqueue trusts it (RqQueue: an RQ job hash left behind)
        requeue = getattr(self.queue, "requeue", self.queue.enqueue)
        if record.traceparent:
            jobs = [(_traced([job], record.traceparent)[0], delay) for job, delay in jobs]
        jobs = [(self.router.job(job), delay) for job, delay in jobs]
        for job, delay in jobs:
            requeue([job], delay)
            self._emit_jobs([job], delay)
        self.store.touch(run_id, self.clock())
        return {job_node_id(j) for j, _ in jobs}

    def _missing_items(self, run_id: str, graph: CompiledGraph, parent: str, iteration: int) -> List[Job]:
        header = self.store.read_items(run_id, [spec_field(parent, iteration)])[0]
        size = batch_size(header)
        done = self.store.read_items(run_id, [item_field(parent, iteration, i) for i in range(size)])
        missing = [i for i, result in enumerate(done) if result is None]
        own = self.store.read_items(run_id, [input_field(parent, iteration, i) for i in missing])
        items = [(i, batch_item(parent, i, header, o)) for i, o in zip(missing, own)]
        return [item_job(run_id, graph.blueprint.id, parent, iteration, i, spec["id"]) for i, spec in items if spec]

    def _remaining(self, details: Mapping[str, Any]) -> float:
        import datetime as _dt

        wake_at = details.get("wake_at")
        if not wake_at:
            return 0.0
        return max(0.0, _dt.datetime.fromisoformat(wake_at).timestamp() - self.clock())
