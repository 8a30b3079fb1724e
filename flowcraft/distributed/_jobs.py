"""Handling jobs: one delivery, or a batch in waves (load, node code, commit round, acks), and
the commits that turn an outcome into the run's next state."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import attrs

from .. import deadlines, limits
from . import _batching as batching
from ..cancel import CancelToken
from ..errors import FlowcraftError, StoreRejected
from ..events import Event
from ..execution import NodeFailure, NodeRunner, RetryLater, resolve_impl
from ..graph import (
    PENDING,
    READY,
    SKIPPED,
    CompiledGraph,
    GraphNode,
    NodeState,
    Traversal,
    counted_joins,
    input_keys,
    input_value,
)
from ..node import NodeContext, NodeResult
from ..outcome import drop_unstarted_inputs
from ._plan import GATHER, CommitPlan, batch_item, count_field, done_field, due_to_settle, item_definition, job_event
from ..ports import Commit, Delivery, Job, RunRecord, RunSnapshot, job_node_id
from ..result import AWAITING, CANCELLED, FAILED, FINAL_STATUSES, RUNNING, STALLED, WorkflowError, WorkflowResult
from ..runtime import AWAITING_DETAILS_KEY, AWAITING_IDS_KEY
from ..serializer import check_json
from ._worker_context import StoreContext, WithDelta, WorkerEngine
from ._base import _DriverBase
from ._common import (
    _MAX_CONFLICTS,
    _OUTAGES,
    _UNLOADED,
    CLOCK_SKEW,
    TRACEPARENT,
    Identity,
    _carry_traceparent,
    _finish_event,
    _identity,
    _item_fields,
    _Prepared,
    _Wave,
    _whole_load_ids,
    log_node_failure,
    log_run_failure,
    safe_reason,
)

logger = logging.getLogger("flowcraft.distributed")


class _JobHandling(_DriverBase):
    """Turning deliveries into node executions and commits (steps 1-6 of the package docstring)."""

    def handle(self, delivery: Delivery) -> None:
        """Process one delivery; errors in node code (or in the worker) never escape, infrastructure
        errors (`ConnectionError`, `OSError`) do."""
        try:
            self._guarded(delivery, self._process, delivery)
        except _OUTAGES:
            raise
        except Exception:  # the guard's own handling failed: drop the delivery rather than die on it
            logger.exception("worker: could not even dead-letter a delivery; dropping it")
            self._ack_quietly([delivery])

    def _handle_batch_guarded(self, deliveries: Sequence[Delivery]) -> None:
        """`handle_batch`; should a bug escape it, each delivery is handled again on its own (a
        delivery already done is found done and only acknowledged): the worker never dies of one."""
        try:
            self.handle_batch(deliveries)
        except _OUTAGES:
            raise
        except Exception:
            logger.exception("worker: a batch of %d deliveries failed; handling them one by one", len(deliveries))
            for delivery in deliveries:
                self.handle(delivery)

    def handle_batch(self, deliveries: Sequence[Delivery]) -> None:
        """Process several deliveries with one load and one commit round per wave (see
        `_batching`); the semantics are those of `handle` applied in order."""
        pending = list(deliveries)
        while pending:
            wave, later = batching.first_wave(pending)
            pending = self._handle_wave(wave) + later

    def _handle_wave(self, segments: List[List[Delivery]]) -> List[Delivery]:
        """One load, node code, one commit round, acks; returns the deliveries left for the next wave."""
        wave, deferred = self._run_wave(segments)
        self._finish_wave(wave)
        self._ack_quietly([p.delivery for p in wave.prepared])  # type: ignore[misc]  # a wave's jobs come with their deliveries
        return deferred

    def _run_wave(self, segments: List[List[Delivery]]) -> Tuple["_Wave", List[Delivery]]:
        """One load and the node code of a wave: what is left to commit, and the deliveries left
        for the next wave."""
        resolved = [items for segment in segments
                    for items in [[(d, r) for d in segment for r in [self._guarded(d, self._resolve, d)] if r is not None]]
                    if items]
        snaps = self._load_wave(resolved)
        self._read_wave_items(resolved)
        self._take_wave_slots(resolved, snaps)
        try:
            return self._run_loaded_wave(resolved, snaps)
        finally:
            left, self._local.wave_slots = getattr(self._local, "wave_slots", {}), {}
            self._release([slot for _, slot in left.values()])  # taken for jobs that did not run

    def _run_loaded_wave(self, resolved: List[List[Tuple[Delivery, Tuple[CompiledGraph, GraphNode]]]],
                         snaps: List[Any]) -> Tuple["_Wave", List[Delivery]]:
        prepared: List[_Prepared] = []
        chains: List[List[Tuple[_Prepared, Commit]]] = []
        late: List[_Prepared] = []  # executed; its commit is derived again once its segment's is in
        deferred: List[Delivery] = []
        for items, snap in zip(resolved, snaps):
            if snap is _UNLOADED:
                continue
            chain: List[Tuple[_Prepared, Commit]] = []
            for i, (d, (graph, node)) in enumerate(items):
                p = self._guarded(d, self._prepare, d, graph, node, snap)
                if p is None:
                    continue
                prepared.append(p)
                commit = self._guarded(d, self._derive_commit, p)
                if commit is None:
                    continue
                if chain and commit.record.status in FINAL_STATUSES:  # its result must see the segment's writes
                    late.append(p)
                    deferred.extend(d for d, _ in items[i + 1:])
                    break
                chain.append((p, commit))
                snap = batching.advance(p.snap, commit)
                if commit.context_delete:  # later jobs' lazy reads would find the key in the store
                    deferred.extend(d for d, _ in items[i + 1:])
                    break
            if chain:
                chains.append(chain)
        self._local.wave_items = {}  # read before these commits: a commit derived again reads the store
        return _Wave(prepared, chains, late), deferred

    def _take_wave_slots(self, resolved: List[List[Tuple[Delivery, Tuple[CompiledGraph, GraphNode]]]],
                         snaps: List[Any]) -> None:
        """Take the concurrency slots of a wave's limited jobs in one call (`_take_slot` uses them
        when the key it evaluates is the same; a key that cannot be had is left to it)."""
        self._local.wave_slots = {}
        if self.slots is None:
            return
        wanted: List[Tuple[Delivery, str, int]] = []
        for items, snap in zip(resolved, snaps):
            if snap is _UNLOADED or snap is None:
                continue
            for delivery, (graph, node) in items:
                limit = limits.node_limit(graph, node.id) if delivery.job.kind == "node" else None  # type: ignore[union-attr]  # resolved deliveries have jobs
                if limit is None:
                    continue
                try:
                    wanted.append((delivery, limit.key(self._key_lookup(delivery.job, snap), self._input(node, snap.context)),  # type: ignore[arg-type]
                                   limit.max))
                except limits.ConcurrencyKeyError:
                    continue
        if len(wanted) < 2:
            return  # one job: `_take_slot` takes its slot, in as many calls
        taken = self.slots.acquire_many([(key, limit) for _, key, limit in wanted])
        self._local.wave_slots = {id(d): (key, slot) for (d, key, _), slot in zip(wanted, taken)}

    def _finish_waves(self, waves: Sequence["_Wave"]) -> None:
        """The commit rounds of waves of several worker threads as one (the `Committer`'s)."""
        self._finish_wave(_Wave([p for w in waves for p in w.prepared], [c for w in waves for c in w.chains],
                                [p for w in waves for p in w.late]))

    def _finish_wave(self, wave: "_Wave") -> None:
        """A wave's commit round: commit, events, publish; the caller acknowledges its deliveries.
        The concurrency slots of its node executions are given back once their commits are in."""
        try:
            self._commit_round(wave)
        finally:
            self._release([p.slot for p in wave.prepared])

    def _release(self, slots: Sequence[Optional[limits.Slot]]) -> None:
        if self.slots is not None and any(slots):
            self.slots.release(slots)

    def _commit_round(self, wave: "_Wave") -> None:
        prepared, chains, late = wave.prepared, wave.chains, wave.late
        applied = self._commit_wave(chains)
        for chain, (ok, merged) in zip(chains, applied):
            for p, c in chain:
                if ok is None:
                    break  # the store refused it: its run failed
                if not ok:
                    if p is chain[0][0]:
                        self.conflicts += 1  # one merged commit lost the race
                    self._guarded(p.delivery, self._recommit, p)  # type: ignore[arg-type]  # a wave's jobs come with their deliveries
                else:
                    self._tell_applied(p.events, c.record)
            if ok:
                self._emit_reached(merged)
                first = chain[0][0]
                self._guarded(first.delivery, self._settle_if_due, first, merged)  # type: ignore[arg-type]  # a wave's jobs come with their deliveries
        for p in late:
            self._guarded(p.delivery, self._recommit, p)  # type: ignore[arg-type]  # a wave's jobs come with their deliveries
        for _ in prepared:
            self._fault("after_commit")
        self._publish_wave(list(dict.fromkeys(p.job.run_id for p in prepared)))
        for _ in prepared:
            self._fault("after_publish")
            self._fault("before_ack")
        self._report_failed_runs(prepared)
        if self.runtime.event_bus is not None:
            self._emit_all([job_event("job:processed", p.job) for p in prepared])

    # Each step of a wave that touches the store for several runs at once falls back, when it
    # fails other than by an outage, to one run at a time: the run at fault fails (or its
    # deliveries are dead-lettered), the other jobs of the batch go on.

    def _load_wave(self, resolved: List[List[Tuple[Delivery, Tuple[CompiledGraph, GraphNode]]]]) -> List[Any]:
        requests = [self._load_request(items[0][0].job.run_id, [r for _, r in items], [d.job for d, _ in items])  # type: ignore[union-attr, misc]  # resolved deliveries have jobs (`_resolve`)
                    for items in resolved]
        try:
            return self.store.load_many(requests)
        except _OUTAGES:
            raise
        except Exception:
            logger.exception("worker: loading %d runs at once failed; loading them one by one", len(requests))
        snaps: List[Any] = []
        for items, request in zip(resolved, requests):
            try:
                snaps.append(self.store.load_many([request])[0])
            except _OUTAGES:
                raise
            except Exception as error:
                for delivery, _ in items:
                    self._reject(delivery, f"worker error: cannot load run {request[0]!r}: {type(error).__name__}: {error}",
                                 _identity(delivery.job))  # type: ignore[arg-type]  # resolved deliveries have jobs (`_resolve`)
                snaps.append(_UNLOADED)
        return snaps

    def _read_wave_items(self, resolved: List[List[Tuple[Delivery, Tuple[CompiledGraph, GraphNode]]]]) -> None:
        """Read the item fields of a wave's batch item jobs in one read per run (not one per item);
        a read that fails leaves each item to read its own."""
        self._local.wave_items = {}
        for items in resolved:
            jobs = [(d.job, node) for d, (_, node) in items if d.job is not None and d.job.kind == "item"]
            if len(jobs) < 2:
                continue
            run_id = jobs[0][0].run_id
            fields = [f for job, node in jobs for f in _item_fields(job, node.id)]
            try:
                values = self.store.read_items(run_id, fields)
            except _OUTAGES:
                raise
            except Exception:
                logger.exception("worker: reading the items of run %s failed; reading them one by one", run_id)
                continue
            self._local.wave_items.update(((run_id, f), v) for f, v in zip(fields, values))

    def _commit_wave(self, chains: List[List[Tuple["_Prepared", Commit]]]) -> List[Tuple[Optional[bool], Commit]]:
        """Apply each chain's merged commit: (True, False (its checks failed) or None (refused: the
        run failed), the merged commit)."""
        commits = [batching.merge([c for _, c in chain]) for chain in chains]
        try:
            return list(zip(self.store.commit_many(commits), commits))
        except _OUTAGES:
            raise
        except StoreRejected:
            pass  # one of them cannot be held: find it
        except Exception:
            logger.exception("worker: committing %d runs at once failed; committing them one by one", len(commits))
        return [(self._commit_alone(chain[0][0], commit), commit) for chain, commit in zip(chains, commits)]

    def _commit_alone(self, prepared: "_Prepared", commit: Commit) -> Optional[bool]:
        try:
            return self.store.commit(commit)
        except _OUTAGES:
            raise
        except StoreRejected as error:
            self._fail_refused(prepared, str(error), "StoreRejected")
        except Exception as error:
            logger.exception("worker: committing run %s failed", commit.run_id)
            self._fail_refused(prepared, f"worker error: {type(error).__name__}: {error}", "WorkerError")
        return None

    def _fail_refused(self, prepared: "_Prepared", reason: str, error_type: str) -> None:
        """A commit the store refused: fail the run with a commit that carries none of its values
        (the deliveries are acknowledged by the caller)."""
        logger.error("run %s failed: the store refused the commit of %s: %s", prepared.job.run_id, prepared.job.key, reason)
        self._fail_quietly(prepared.job.run_id, WorkflowError(prepared.node.id, safe_reason(reason), error_type))

    def _publish_wave(self, run_ids: List[str]) -> None:
        try:
            self.store.publish_outboxes(run_ids, self.queue)
            return
        except _OUTAGES:
            raise
        except Exception:
            logger.exception("worker: publishing the jobs of %d runs failed; publishing them one by one", len(run_ids))
        for run_id in run_ids:
            try:
                self.store.publish_outbox(run_id, self.queue)
            except _OUTAGES:
                raise
            except Exception as error:
                logger.exception("worker: publishing the jobs of run %s failed", run_id)
                self._fail_quietly(run_id, WorkflowError(None, safe_reason(
                    f"worker error: cannot publish the run's jobs: {type(error).__name__}: {error}"), "WorkerError"))

    def _ack_quietly(self, deliveries: List[Delivery]) -> None:
        """Acknowledge (but those their commit did); a delivery the queue cannot acknowledge (other
        than by an outage) is logged."""
        deliveries = [d for d in deliveries if not d.acked]
        if not deliveries:
            return
        try:
            self.queue.ack(deliveries)
            return
        except _OUTAGES:
            raise
        except Exception:
            if len(deliveries) == 1:
                logger.exception("worker: acknowledging a delivery failed")
                return
        for delivery in deliveries:
            self._ack_quietly([delivery])

    def _fail_quietly(self, run_id: str, error: WorkflowError) -> None:
        """`_fail_run`, where a failure to record the failure is logged, never raised (but outages)."""
        try:
            self._fail_run(run_id, error)
        except _OUTAGES:
            raise
        except Exception:
            logger.exception("worker: could not record the failure of run %s", run_id)

    def _guarded(self, delivery: Delivery, step: Callable[..., Any], *args: Any) -> Any:
        """Run one step of a delivery's processing; a bug or an unreadable run dead-letters the
        delivery (never retried forever) and gives None, infrastructure errors escape."""
        try:
            return step(*args)
        except _OUTAGES:
            raise
        except Exception as error:
            logger.exception("job %s failed in the worker", delivery.job.key if delivery.job else delivery.body[:80])
            identity = _identity(delivery.job) if delivery.job else delivery.identity_hint()
            self._reject(delivery, f"worker error: {type(error).__name__}: {error}", identity)
            return None

    def node_failed(self, job: Job, failure: NodeFailure) -> None:
        """A node failed for good (after its retries, without a fallback that saved it): logged at
        WARNING with its traceback; adapters may also report it to their queue (RQ: a failed job)."""
        log_node_failure(job, failure)

    def _report_failed_runs(self, prepared: Sequence["_Prepared"]) -> None:
        """Log at ERROR each run a node failure of `prepared` failed (one record read per failure)."""
        for run_id in dict.fromkeys(p.job.run_id for p in prepared if type(p.outcome) is NodeFailure):
            try:
                record = self.store.get_record(run_id)
            except _OUTAGES:
                raise
            except Exception:
                logger.exception("worker: could not read run %s after a node failure", run_id)
                continue
            if record is not None and record.status == FAILED:
                log_run_failure(record)

    def _give_back(self, delivery: Delivery) -> None:
        """Hand a fetched delivery back to the queue unstarted (`JobQueue.give_back`, optional)."""
        self.queue.give_back([delivery])  # type: ignore[attr-defined]  # only set up when the queue has it
        self._given_back += 1
        logger.debug("worker: gave job %s back (its batch is slow)", delivery.job.key if delivery.job else "?")

    def _fault(self, point: str) -> None:
        """A hook for fault injection; does nothing here."""

    # === one job =================================================================================

    def _process(self, delivery: Delivery) -> None:
        resolved = self._resolve(delivery)
        if resolved is None:
            return
        graph, node = resolved
        job = delivery.job
        assert job is not None  # `_resolve` dead-lettered a delivery without one
        prepared = self._prepare(delivery, graph, node, self._load(job, graph, node))
        if prepared is None:
            return
        try:
            self._commit_outcome(prepared.job, graph, node, prepared.snap, prepared.outcome, delivery, prepared.duration_ms)
        finally:
            self._release([prepared.slot])
        self._fault("after_commit")
        self.store.publish_outbox(prepared.job.run_id, self.queue)
        self._fault("after_publish")
        self._fault("before_ack")
        if not delivery.acked:
            self.queue.ack([delivery])
        self._report_failed_runs([prepared])
        if self.runtime.event_bus is not None:
            self._emit_all([job_event("job:processed", prepared.job)])

    def _resolve(self, delivery: Delivery) -> Optional[Tuple[CompiledGraph, GraphNode]]:
        """The graph and node a delivery is for; None once a malformed delivery is dead-lettered."""
        job = delivery.job
        if job is None:
            return self._reject(delivery, f"malformed job: {delivery.error}", delivery.identity_hint())
        if job.kind == deadlines.DEADLINE_KIND:  # no node runs: the run fails if its record says it is due
            deadlines.expire_run(self._adapter, job)
            return self.queue.ack([delivery])
        blueprint = self.runtime.blueprints.get(job.blueprint_id)
        if blueprint is None:  # not a job of any run this worker can serve: someone else's run is not failed
            return self._reject(delivery, f"unknown blueprint {job.blueprint_id!r}", None)
        graph = self.runtime.graph(blueprint)
        node_id = job_node_id(job)
        node = graph.nodes.get(node_id)
        if node is None:
            return self._reject(delivery, f"unknown node {node_id!r} in blueprint {job.blueprint_id!r}", None)
        return graph, node

    def _prepare(self, delivery: Delivery, graph: CompiledGraph, node: GraphNode, snap: Optional[RunSnapshot]) -> Optional["_Prepared"]:
        """Check the job against the loaded run and run the node code; None when the delivery was
        dealt with already (dropped as stale, put back, dead-lettered or retried later)."""
        job = delivery.job
        assert job is not None  # `_resolve` dead-lettered a delivery without one
        if snap is None:
            return self._reject(delivery, f"unknown run {job.run_id!r}", None)
        if snap.record.version == 0:
            snap = self._adopt(job, graph, node, snap)
        record = snap.record
        if record.blueprint_id != graph.blueprint.id:  # not a job of this run: dead-letter it only
            return self._reject(delivery, f"run {job.run_id!r} is a run of blueprint {record.blueprint_id!r}, "
                                          f"not of {job.blueprint_id!r}", None)
        if record.blueprint_version != graph.blueprint.version or (
                record.blueprint_digest is not None and record.blueprint_digest != graph.digest):
            return self._version_mismatch(delivery, job, record, graph)
        if record.status not in (RUNNING, AWAITING) or not self._executable(job, graph, node, snap):
            self.store.publish_outbox(job.run_id, self.queue)  # a crash may have left committed jobs unpublished
            if due_to_settle(record.status, record.awaiting, record.outstanding):  # a crash before its settling
                self._settle(job, graph)
                self.store.publish_outbox(job.run_id, self.queue)
            return self.queue.ack([delivery])
        if self._batch_deadline is not None and time.monotonic() > self._batch_deadline:
            return self._give_back(delivery)  # a slow batch: the jobs not started go to idle workers
        state = snap.states.get(node.id)
        if state is not None and state.get("pending") and job.kind == "node":
            return _Prepared(delivery, job, graph, node, snap, GATHER)  # every item finished: no node code runs
        if node.id in counted_joins(graph) and job.kind == "node" and (state or {}).get("st", PENDING) == PENDING:
            activation, _, _ = CommitPlan(self, job, graph, snap).traversal.resolve(node.id)
            if activation is None:
                return _Prepared(delivery, job, graph, node, snap, None)  # skipped: its commit says so
            if node.inputs is None:
                snap = attrs.evolve(snap, context=dict(snap.context, **{node.inputs_key: activation.input}))
        limit = limits.node_limit(graph, node.id) if job.kind == "node" else None
        slot = None
        if limit is not None:
            try:
                slot = self._take_slot(delivery, job, node, snap, limit)
            except limits.ConcurrencyKeyError as error:
                failure = NodeFailure(node.id, error)
                self.node_failed(job, failure)
                return _Prepared(delivery, job, graph, node, snap, failure)
            if slot is None:
                return None  # over its limit: put back
        try:
            self._fault("before_execute")
            started = time.perf_counter()
            outcome = self._execute(job, graph, node, snap)
            duration_ms = round((time.perf_counter() - started) * 1000, 3)
            self._fault("after_execute")
        except BaseException:
            self._release([slot])
            raise
        if type(outcome) is NodeFailure:
            self.node_failed(job, outcome)
        if type(outcome) is RetryLater:
            self._release([slot])
            retry = self.router.job(job.with_(attempt=job.attempt + 1))
            self.queue.enqueue([retry], outcome.delay)
            self._emit_jobs([retry], outcome.delay)
            return self.queue.ack([delivery])
        return _Prepared(delivery, job, graph, node, snap, outcome, duration_ms=duration_ms, slot=slot)

    def _key_lookup(self, job: Job, snap: RunSnapshot) -> Callable[[str], Any]:
        """How a concurrency key reads the context: the loaded keys, else the store."""
        context = snap.context

        def lookup(name: str) -> Any:
            if name in context or snap.whole:
                return context.get(name)
            return self.store.read_context(job.run_id, [name]).get(name)  # a key the load did not read

        return lookup

    def _take_slot(self, delivery: Delivery, job: Job, node: GraphNode, snap: RunSnapshot,
                   limit: limits.Limit) -> Optional[limits.Slot]:
        """A slot of the node's concurrency key, or None once the job is put back (every slot is
        taken: it comes back after a jittered delay, the same attempt, neither failed nor
        dead-lettered). Raises `ConcurrencyKeyError` when the key cannot be had."""
        if self.slots is None:
            raise limits.ConcurrencyKeyError(f"node {node.id!r} has a concurrencyKey, and this worker has no "
                                             f"coordination store to hold its slots", node_id=node.id)
        key = limit.key(self._key_lookup(job, snap), self._input(node, snap.context))
        wave = getattr(self._local, "wave_slots", None)
        taken = wave.pop(id(delivery), None) if wave else None
        if taken is not None and taken[0] != key:  # the wave's earlier commits changed the key
            self._release([taken[1]])
            taken = None
        slot = taken[1] if taken is not None else self.slots.acquire(key, limit.max)
        if slot is not None:
            return slot
        delay = limits.retry_delay(self.concurrency_retry_delay)
        logger.debug("job %s: concurrency key %r is at its limit of %d; put back for %.3fs", job.key, key, limit.max, delay)
        self.queue.enqueue([job], delay)
        self.queue.ack([delivery])
        if self.runtime.event_bus is not None:
            self._emit_jobs([job], delay)
        return None

    @staticmethod
    def _wanted(node: GraphNode) -> Tuple[List[str], List[str]]:
        """The node states and context keys a job for `node` needs: read in one load."""
        node_ids = [node.id] + [e.target for e in node.outgoing]
        keys = ["blueprintId", "blueprintVersion", *limits.key_names(node.config.concurrency_key)]
        if node.inputs is None:
            keys.append(node.inputs_key)
        elif isinstance(node.inputs, str):
            keys.extend(input_keys(node.inputs))
        else:
            for ref in node.inputs.values():
                keys.extend(input_keys(ref))
        return node_ids, keys

    @classmethod
    def _wanted_for(cls, job: Job, node: GraphNode) -> Tuple[List[str], List[str]]:
        """`_wanted` of a job; a batch item (`node` is its parent) needs its parent's state, not
        the parent's input (the whole list): the item's own input is a field of its own."""
        if job.kind == "item":
            return [node.id] + [e.target for e in node.outgoing], ["blueprintId", "blueprintVersion"]
        return cls._wanted(node)

    def _load(self, job: Job, graph: CompiledGraph, node: GraphNode) -> Optional[RunSnapshot]:
        return self.store.load_many([self._load_request(job.run_id, [(graph, node)], [job])])[0]

    def _load_request(self, run_id: str, nodes: Sequence[Tuple[CompiledGraph, GraphNode]], jobs: Sequence[Job]
                      ) -> Tuple[str, Optional[List[str]], Optional[List[str]]]:
        """What to load for `jobs` (for `nodes`) of one run: the whole run for a start node (it often
        reads the initial context) or the graph's only sink (its commit usually ends the run, and the
        result needs everything), else just the node states and context keys the jobs need. A batch
        item never loads the whole run (that would cost the batch's size per item)."""
        if self._whole_loads and any(node.id in _whole_load_ids(graph) and job.kind != "item"
                                     for (graph, node), job in zip(nodes, jobs)):
            return run_id, None, None
        return (run_id, *batching.wanted_union([self._wanted_for(job, node) for (_, node), job in zip(nodes, jobs)]))

    def _adopt(self, job: Job, graph: CompiledGraph, node: GraphNode, snap: RunSnapshot) -> RunSnapshot:
        """A run started by a seed client (context only): initialise its traversal, adopting this
        worker's blueprint id and version unless the context recorded its own."""
        record = snap.record
        traversal = Traversal(graph, {})
        traversal.start()  # the seed client already published the start jobs
        new = attrs.evolve(
            record, blueprint_id=snap.context.get("blueprintId", graph.blueprint.id),
            blueprint_version=snap.context.get("blueprintVersion", graph.blueprint.version),
            status=RUNNING, outstanding=traversal.outstanding, updated_at=self.clock(),
        )
        states = {k: v.to_dict() for k, v in traversal.states.items()}
        self.store.commit(Commit(job.run_id, 0, new, states=states))  # losing this race is fine: someone adopted
        return self._load(job, graph, node) or snap

    def _executable(self, job: Job, graph: CompiledGraph, node: GraphNode, snap: RunSnapshot) -> bool:
        state = NodeState.from_dict(snap.states[node.id]) if node.id in snap.states else NodeState()
        if state.iteration != job.iteration:
            return False
        if state.status == PENDING:  # a counted join: its job, once all of its edges arrived
            return (job.kind == "node" and node.id in counted_joins(graph)
                    and self._count(job.run_id, count_field(node.id, job.iteration)) >= node.in_count)
        if state.status != READY:
            return False
        parked = snap.record.awaiting.get(node.id)
        if job.kind == "item":
            return state.pending > 0 and self._item_to_run(job, node) is not None
        if job.kind == "timer":
            return parked is not None and parked.get("type") == "sleep"
        if parked is not None and parked.get("type") in ("wait", "sleep"):
            return False  # only a resume (wait) or its timer (sleep) finishes it
        if state.pending > 0:  # expanded: its gathering job, once every item finished (never run again)
            return self._count(job.run_id, done_field(node.id, job.iteration)) >= state.pending
        return True

    def _count(self, run_id: str, field: str) -> int:
        """A counter's value (see `ports.Counter`): 0 when never added to."""
        value = self.store.read_items(run_id, [field])[0]
        return value if type(value) is int else 0

    def _item_to_run(self, job: Job, node: GraphNode) -> Optional[Dict[str, Any]]:
        """What batch item `job.index` of `node` runs and its input, read from the run's committed
        item fields in one read (never from the job: a queue writer could name anything there);
        None when the item is done already or the job names no item of the batch (then dropped)."""
        assert job.index is not None  # an item job has one (`Job.from_dict` requires it)
        fields = _item_fields(job, node.id)
        wave = getattr(self._local, "wave_items", None) or {}
        if all((job.run_id, f) in wave for f in fields):
            done, header, own = (wave[(job.run_id, f)] for f in fields)
        else:
            done, header, own = self.store.read_items(job.run_id, fields)
        if done is not None:
            return None
        spec = batch_item(node.id, job.index, header, own)
        if spec is None or spec["id"] != job.node_id:
            logger.warning("dropping job %s: batch %r of run %s has no item %r at index %r", job.key, node.id,
                           job.run_id, job.node_id, job.index)
            return None
        self._local.item_spec = (job.key, spec)
        return spec

    def _version_mismatch(self, delivery: Delivery, job: Job, record: RunRecord, graph: CompiledGraph) -> None:
        now = self.clock()
        first_seen = job.first_seen
        if first_seen is None or first_seen > now + CLOCK_SKEW:  # from the future: a forged or broken clock
            first_seen = now
        theirs = f"{record.blueprint_id}@{record.blueprint_version}"
        ours = f"{graph.blueprint.id}@{graph.blueprint.version}"
        if record.blueprint_version == graph.blueprint.version:  # same version, edited blueprint: say so
            theirs += f" (digest {record.blueprint_digest})"
            ours += (f" (digest {graph.digest}: the blueprint differs, edited without a new metadata.version "
                     f"or built with other uses keys, e.g. node functions defined in a script run as __main__)")
        if now - first_seen >= self.version_mismatch_ttl:
            reason = f"version mismatch: run {job.run_id} needs {theirs}, no worker with it took the job in {self.version_mismatch_ttl:g}s"
            return self._reject(delivery, reason, _identity(job))  # the job is gone: the run cannot finish
        logger.warning("job %s needs blueprint %s, this worker has %s: put back", job.key, theirs, ours)
        put_back = self.router.job(job.with_(first_seen=first_seen))
        self.queue.enqueue([put_back], self.version_mismatch_delay)
        self.queue.ack([delivery])
        if self.runtime.event_bus is not None:
            delay = self.version_mismatch_delay
            reason = f"version mismatch: run {job.run_id} needs {theirs}, this worker has {ours}: put back"
            self._emit_all([job_event("job:failed", job, reason=reason, dead_lettered=False, retry_in=delay),
                            job_event("job:enqueued", put_back, delay=delay)])

    def _reject(self, delivery: Delivery, reason: str, identity: Optional[Identity]) -> None:
        """Dead-letter a job that can never succeed; fail its run too when `identity` is that of
        the run (the run exists, is of that blueprint, which has that node): a job naming a run
        with a blueprint or node it does not have is only dead-lettered, failing nobody's run."""
        reason = safe_reason(reason)
        logger.error("dead-lettering a job: %s", reason)
        try:
            self.queue.dead_letter(delivery, reason)
        except _OUTAGES:
            raise
        except Exception:  # a queue that cannot take it as a dead letter: never redeliver it forever
            logger.exception("worker: dead-lettering a delivery failed; dropping it")
            self._ack_quietly([delivery])
        if self.runtime.event_bus is not None:
            if delivery.job is not None:
                event = job_event("job:failed", delivery.job, reason=reason, dead_lettered=True)
            else:
                event = Event("job:failed", {"run_id": identity[0] if identity else None, "blueprint_id": None,
                                             "node_id": None, "reason": reason, "dead_lettered": True})
            self._emit_all([event])
        if self._dead_letter_hooks:
            job = delivery.job
            ids = (job.run_id, job.blueprint_id, job.node_id) if job is not None else (identity[0] if identity else None, None, None)
            for hook in self._dead_letter_hooks:
                try:
                    hook(*ids, reason)
                except Exception:  # an observer must never break a worker
                    logger.exception("a middleware's job_dead_lettered hook failed")
        if identity is not None and self._names_its_run(identity):
            self._fail_quietly(identity[0], WorkflowError(identity[2], reason, "InvalidJob"))

    def _names_its_run(self, identity: Identity) -> bool:
        run_id, blueprint_id, node_id = identity
        record = self.store.get_record(run_id)
        if record is None or record.blueprint_id not in (blueprint_id, None):  # None: seeded, not adopted yet
            return False
        blueprint = self.runtime.blueprints.get(blueprint_id)
        return blueprint is not None and node_id in self.runtime.graph(blueprint).nodes

    # === executing ===============================================================================

    def _execute(self, job: Job, graph: CompiledGraph, node: GraphNode, snap: RunSnapshot) -> Any:
        if job.kind == "timer":
            return NodeResult(output=snap.context.get(node.inputs_key))
        context = StoreContext(self.store, job.run_id, snap.context,
                               absent=set(self._wanted_for(job, node)[1]) - set(snap.context), whole=snap.whole)
        context.max_value_bytes = self.runtime.max_value_bytes  # and what one node writes (see FlowRuntime)
        context.max_context_bytes = self.runtime.max_context_bytes
        if job.kind == "item":  # what it runs and its input as committed; the job's own fields are ignored
            last: Tuple[str, Dict[str, Any]] = getattr(self._local, "item_spec", None) or ("", {})
            key, spec = last
            if key != job.key:
                spec = self._item_to_run(job, node) or {}
            run_node = GraphNode(item_definition(job.node_id, spec))
            node_input = spec.get("input")
        else:
            run_node = node
            node_input = self._input(node, snap.context)
        engine = WorkerEngine(self._adapter, job, graph, context, snap)
        impl = self._impl(run_node, engine)
        if impl is None:
            return NodeFailure(run_node.id, FlowcraftError(f"node {run_node.id!r} uses {run_node.uses!r}, which is not in the registry"))
        ctx = NodeContext(
            context, node_input, run_node.params, self.runtime.dependencies, run_node.id, job.run_id, job.attempt,
            job.key, CancelToken(), graph.blueprint.id, job.iteration,
            job.extra.get(TRACEPARENT) or snap.record.traceparent,
        )
        fallback = graph.nodes.get(node.config.fallback) if node.config.fallback and job.kind != "item" else None
        fallback_impl = self._impl(fallback, engine) if fallback is not None else None
        queue_retry = self.retry_mode == "queue"
        runner = self.runner
        emit = None if self.runtime.event_bus is None else self.runtime._emitter(job.run_id, graph.blueprint.id)
        if emit is not None:  # a runner that reports retries and fallbacks of this run
            runner = NodeRunner(self.runtime.middleware, emit)
            emit("node:start", {"node_id": run_node.id, "input": node_input, "iteration": job.iteration,
                                "attempt": job.attempt})
        try:
            outcome = runner.run_or_fall_back(run_node, impl, ctx, fallback, fallback_impl, queue_retry=queue_retry)
        except RetryLater as retry:
            if emit is not None:
                emit("node:retry", {"node_id": run_node.id, "attempt": job.attempt, "error": str(retry.cause),
                                    "delay": retry.delay})
            return retry
        if type(outcome) is not NodeFailure:
            outcome = WithDelta(outcome, context)
        return outcome

    def _impl(self, node: GraphNode, engine: "WorkerEngine") -> Any:
        return resolve_impl(self.runtime.registry, node, engine)

    @staticmethod
    def _input(node: GraphNode, context: Mapping[str, Any]) -> Any:
        if node.inputs is None:
            return context.get(node.inputs_key)
        if isinstance(node.inputs, str):
            return input_value(node.inputs, context.get, context.__contains__)
        return {name: input_value(key, context.get, context.__contains__) for name, key in node.inputs.items()}

    # === committing ==============================================================================

    def _commit_outcome(self, job: Job, graph: CompiledGraph, node: GraphNode, snap: Optional[RunSnapshot], outcome: Any,
                        delivery: Optional[Delivery], duration_ms: Optional[float] = None) -> Set[str]:
        """Derive the commit for an outcome from the loaded state and apply it; when its checks
        fail reload and derive again. Returns the ids of the nodes whose jobs it enqueued."""
        prepared = _Prepared(delivery, job, graph, node, snap, outcome, duration_ms=duration_ms)
        for _ in range(_MAX_CONFLICTS):
            commit = self._derive_commit(prepared)
            if commit is None:
                return set()
            try:
                applied = self.store.commit(commit)
            except StoreRejected as error:
                self._fail_refused(prepared, str(error), "StoreRejected")
                return set()
            if applied:
                self._tell_applied(prepared.events, commit.record)
                self._emit_reached(commit)
                self._settle_if_due(prepared, commit)
                return {job_node_id(j) for j in commit.made_jobs()}
            self.conflicts += 1
            prepared.snap = self._reload(prepared)
        raise RuntimeError(f"run {job.run_id}: could not commit after {_MAX_CONFLICTS} version conflicts")

    def _emit_reached(self, commit: Commit) -> None:
        if self.runtime.event_bus is not None and commit.reached:
            self._emit_jobs([c.job for c in commit.reached if c.job is not None])

    def _settle_if_due(self, prepared: "_Prepared", commit: Commit) -> None:
        """After an applied commit: settle the run if nothing but parked nodes is left outstanding."""
        status = RUNNING if commit.node_commit else commit.record.status
        if commit.outstanding_after is not None and due_to_settle(status, commit.awaiting_after or {}, commit.outstanding_after):
            self._settle(prepared.job, prepared.graph)

    def _settle(self, job: Job, graph: CompiledGraph) -> None:
        """End the run, or make it await, with a run commit over its state as it is now: the run
        commits of node executions do that themselves, but a node commit leaves it to whoever
        finds the run with nothing but parked nodes outstanding (its worker, right after; a
        redelivery of its job after a crash; the reconciler)."""
        node = graph.nodes[job_node_id(job)]
        for _ in range(_MAX_CONFLICTS):
            request = (job.run_id, None, None) if self._whole_loads else self._load_request(job.run_id, [(graph, node)], [job])
            snap = self.store.load_many([request])[0]
            if snap is None or not due_to_settle(snap.record.status, snap.record.awaiting, snap.record.outstanding):
                return
            plan = CommitPlan(self, job, graph, snap)
            plan.settle()
            commit = plan.commit
            assert commit is not None  # `settle` always makes one
            self.router.commit(commit)
            try:
                applied = self.store.commit(commit)
            except StoreRejected as error:
                self._fail_refused(_Prepared(None, job, graph, node, snap, None), str(error), "StoreRejected")
                return
            if applied:
                self._tell_applied(plan.events, commit.record)
                self._emit_reached(commit)
                if not due_to_settle(commit.record.status, commit.awaiting_after or {}, commit.outstanding_after or 0):
                    return
            else:
                self.conflicts += 1
        raise RuntimeError(f"run {job.run_id}: could not settle after {_MAX_CONFLICTS} version conflicts")

    def _derive_commit(self, prepared: "_Prepared") -> Optional[Commit]:
        """The commit of an outcome over the state in `prepared.snap`; None if nothing is to be written."""
        snap = prepared.snap
        if snap is None or snap.record.status not in (RUNNING, AWAITING):
            return None  # the run ended meanwhile (cancelled, failed): nothing more is written
        plan = CommitPlan(self, prepared.job, prepared.graph, snap)
        plan.duration_ms = prepared.duration_ms
        plan.apply(prepared.node, prepared.outcome)
        prepared.events = plan.events
        if plan.commit is not None and prepared.delivery is not None and self._acks_in_commit:
            plan.commit.ack.append(prepared.delivery)
        if plan.commit is not None:
            _carry_traceparent(plan.commit, prepared.job.extra.get(TRACEPARENT) or snap.record.traceparent)
            self.router.commit(plan.commit)
        return plan.commit

    def _reload(self, prepared: "_Prepared") -> Optional[RunSnapshot]:
        """The run's state after a version conflict; None if the outcome no longer applies to it."""
        job, graph, node = prepared.job, prepared.graph, prepared.node
        snap = self._load(job, graph, node)
        if snap is None or snap.record.status not in (RUNNING, AWAITING) or not self._still_applicable(job, graph, node, snap):
            return None
        return snap

    def _recommit(self, prepared: "_Prepared") -> None:
        """A batched commit lost a version race: derive it again from the reloaded state."""
        snap = self._reload(prepared)
        if snap is not None:
            self._commit_outcome(prepared.job, prepared.graph, prepared.node, snap, prepared.outcome, prepared.delivery,
                                 prepared.duration_ms)

    def _still_applicable(self, job: Job, graph: CompiledGraph, node: GraphNode, snap: RunSnapshot) -> bool:
        if job.kind == "resume":
            return node.id in snap.record.awaiting
        return self._executable(job, graph, node, snap)

    def _fail_run(self, run_id: str, error: WorkflowError, event: Optional[Dict[str, Any]] = None) -> bool:
        """Fail a run with `error` in one version-checked run commit; its history gets `event`
        (default: a `node:error` of `error`) and `workflow:finish`. True if this call failed it."""
        for _ in range(_MAX_CONFLICTS):
            record = self.store.get_record(run_id)
            if record is None or record.status in FINAL_STATUSES:
                return False
            new = attrs.evolve(record, status=FAILED, errors=record.errors + [error.to_dict()], updated_at=self.clock())
            try:
                new.result = self._final_result(run_id, new, {}, ()).to_dict()
            except _OUTAGES:
                raise
            except Exception:  # an unreadable context must not stop the run from failing
                logger.exception("run %s: its context cannot be read; it fails with an empty result context", run_id)
                new.result = None
            if new.result is None:
                new.result = WorkflowResult(FAILED, {}, [WorkflowError.from_dict(e) for e in new.errors], run_id).to_dict()
            jobs = self.router.jobs(self._parent_jobs(new))
            history = [event or {"type": "node:error", "payload": dict(error.to_dict(), node_id=error.node_id,
                                                                       worker=self.worker_name, timestamp=new.updated_at)},
                       _finish_event(new)]
            try:
                applied = self.store.commit(Commit(run_id, record.version, new, jobs=jobs, history=history))
            except StoreRejected:  # the result's context cannot be held again: fail with none of it
                if not new.result.get("context"):
                    raise
                new.result = WorkflowResult(FAILED, {}, [WorkflowError.from_dict(e) for e in new.errors], run_id).to_dict()
                applied = self.store.commit(Commit(run_id, record.version, new, jobs=jobs, history=history))
            if applied:
                self.store.publish_outbox(run_id, self.queue)
                self._emit_ended(new, jobs)
                return True
        return False

    def _final_result(self, run_id: str, record: RunRecord, delta: Mapping[str, Any], deleted: Iterable[str],
                      states: Optional[Mapping[str, NodeState]] = None, graph: Optional[CompiledGraph] = None,
                      stored: Optional[Mapping[str, Any]] = None) -> WorkflowResult:
        """The run's result over its stored context (`stored`: already loaded whole) and this commit's changes."""
        context = dict(stored) if stored is not None else self.store.read_all_context(run_id)
        context.update(delta)
        for key in deleted:
            context.pop(key, None)
        for key in ("blueprintId", "blueprintVersion"):
            context.pop(key, None)
        if record.status == FAILED or record.status == CANCELLED:
            if states is None:
                states = {k: NodeState.from_dict(v) for k, v in self.store.read_all_states(run_id).items()}
            drop_unstarted_inputs(context, states, record.awaiting)
        skipped: List[str] = []
        stalled: List[str] = []
        if states is not None and graph is not None:
            skipped = [n for n, s in states.items() if s.status == SKIPPED]
            if record.status == STALLED:
                stalled = Traversal(graph, dict(states)).unfinished()
        if record.status == AWAITING:
            context[AWAITING_IDS_KEY] = sorted(record.awaiting)
            context[AWAITING_DETAILS_KEY] = record.awaiting
        elif record.status in FINAL_STATUSES:
            self._bound_context(record, context)
        return WorkflowResult(
            status=record.status, context=context, errors=[WorkflowError.from_dict(e) for e in record.errors],
            run_id=run_id, awaiting=sorted(record.awaiting) if record.status == AWAITING else [], skipped=skipped, stalled=stalled,
        )

    def _bound_context(self, record: RunRecord, context: Dict[str, Any]) -> None:
        """A worker bounds what each node writes (`max_context_bytes`), not what a run gathers over
        many nodes: a finished run's context over the bound fails the run (`record` changes), and
        its result leaves out the largest values, named in the error, rather than carry them."""
        bound = self.runtime.max_context_bytes
        if bound is None:
            return
        sizes = {key: check_json(value, key, None) for key, value in context.items()}
        total = sum(sizes.values())
        if total <= bound:
            return
        dropped = []
        for key in sorted(sizes, key=sizes.__getitem__, reverse=True):
            if total <= bound:
                break
            total -= sizes[key]
            dropped.append(key)
            del context[key]
        message = (f"the run's context is at least {sum(sizes.values())} bytes as JSON, over the bound of {bound} "
                   f"(max_context_bytes); left out of the result: {dropped}")
        if record.status != CANCELLED:
            record.status = FAILED
        record.errors.append(WorkflowError(None, message, "ValueTooLarge").to_dict())

    @staticmethod
    def _parent_jobs(record: RunRecord) -> List[Job]:
        """A subflow's child tells its parent node when it finishes or starts to await."""
        parent = record.parent
        if not parent:
            return []
        return [Job(parent["runId"], parent["blueprintId"], parent["nodeId"], int(parent.get("iteration", 0)), kind="child")]
