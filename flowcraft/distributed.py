"""The distributed driver: workers that execute one node per job, over the ports of `ports.py`.

All orchestration lives here, with `plan` (step 5: one outcome into one `Commit`) and
`worker_context` (the context and engine node code sees); adapters only implement the ports.
One job is handled as:

1. parse it, within bounds (`ports.load_job_json`): a malformed job is dead-lettered, and its run
   failed only when the job carries that run's own identity (the run exists, is of the blueprint
   named, which has the node named); a job naming a blueprint or node its run lacks fails nobody;
2. load the run's record, the node's state and its successors' states, and the node's input;
3. skip it if the node is not ready at the job's iteration (a duplicate, or stale after a loop lap);
4. run the node code (the only step that may run twice, after a crash);
5. derive the routing decisions and the traversal transition with `graph.Traversal`, and commit
   context patch, node states, outstanding count, status and successor jobs in ONE version-checked
   `Commit`; on a version conflict, reload and derive again (the node code is not run again);
6. publish any outbox, then acknowledge the delivery.

Every step of every path (one job, or a batch: `handle_batch`) is guarded: an error other than an
outage (`ConnectionError`, `OSError`: the loop backs off) fails that job or its run, never the
worker nor the other jobs of its batch; a commit the store refuses (`StoreRejected`) fails its run
with a commit carrying none of the refused values.

A crash anywhere before 5 redelivers the job and the node runs again; after 5 the redelivered job
finds the node done and only acknowledges. A join fires exactly once because its readiness is part
of the same versioned state; a run completes when its outstanding count reaches zero.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import attrs

from . import batching, deadlines, limits, operations, routing
from .cancel import CancelToken
from .errors import FlowcraftError, StoreRejected
from .events import Event
from .execution import NodeFailure, NodeRunner, RetryLater, resolve_impl
from .graph import (PENDING, READY, SKIPPED, CompiledGraph, GraphNode, NodeState, Traversal, check_resume_action,
                    counted_joins, input_keys, input_value)
from .middleware import hooks, start_traceparent
from .node import NodeContext, NodeResult
from .outcome import drop_unstarted_inputs
from .plan import (GATHER, CommitPlan, batch_item, batch_size, count_field, done_field,
                   due_to_settle, input_field, item_definition, item_job, job_event, spec_field)
from .ports import (Commit, CoordinationStore, Delivery, Job, JobQueue, RunRecord, RunSnapshot, RunStatus, RunStore,
                    WorkerInfo, identity_problem, item_field, job_node_id)
from .result import AWAITING, CANCELLED, COMPLETED, FAILED, FINAL_STATUSES, RUNNING, STALLED, WorkflowError, WorkflowResult
from .runtime import (AWAITING_DETAILS_KEY, AWAITING_IDS_KEY, FlowRuntime, awaiting_node, new_run_id,
                      subflow_depth_error)
from .serializer import check_json, check_values
from .worker_context import StoreContext, WithDelta, WorkerEngine
from .worker_pool import (DEFAULT_FETCH_BUDGET, HANDOFF_AFTER, Committer, FetchPace, Handoff, JobBudget, committer_threads,
                          outage_delays)

logger = logging.getLogger("flowcraft.distributed")

_MAX_CONFLICTS = 1000
_HANDOFF_IDLE = 0.02  # seconds a thread waits for jobs before acknowledging its committed wave
GIVE_BACK_AFTER = 4  # fetch budgets: a batch still running its jobs after that gives the rest back
CLOCK_SKEW = 300.0  # seconds: a job's `firstSeen` further in the future than this is taken as now
_MAX_REASON = 2000  # characters of a failure reason kept in a dead letter or a run's errors
_UNLOADED = object()  # a run whose load failed: its deliveries were dead-lettered
Identity = Tuple[str, str, str]  # (run id, blueprint id, node id) a job names


def safe_reason(text: str) -> str:
    """A failure reason fit for any store, header or log: control characters and lone surrogates
    escaped (the reason often quotes what a hostile job carried), at most `_MAX_REASON` characters."""
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF else repr(ch)[1:-1] for ch in text)
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON - 3] + "..."


def log_node_failure(job: Job, failure: NodeFailure) -> None:
    """A node failed for good: WARNING, with the traceback of its last exception."""
    cause = failure.cause
    logger.warning("run %s: node %s failed (attempt %d): %s: %s", job.run_id, failure.node_id, job.attempt,
                   type(cause).__name__, cause, exc_info=(type(cause), cause, cause.__traceback__))


def log_run_failure(record: RunRecord) -> None:
    """A run failed: ERROR, with its first error (and that error's traceback when it has one)."""
    first = record.errors[0] if record.errors else {}
    tb = first.get("traceback")
    logger.error("run %s (%s) failed: node %s: %s: %s%s", record.run_id, record.blueprint_id, first.get("node_id"),
                 first.get("type"), first.get("message"), f"\n{tb}" if tb else "")


def _identity(job: Job) -> Identity:
    return job.run_id, job.blueprint_id, job.parent if job.kind == "item" and job.parent else job.node_id


class WorkerCrash(BaseException):
    """Raised by fault injection to simulate a worker dying at a given point (tests only)."""


_OUTAGES = (WorkerCrash, ConnectionError, OSError)  # escape every guard: the loop backs off (or the test crashes)


@attrs.frozen
class ReconcileStats:
    scanned: int = 0
    stalled: int = 0
    reconciled: int = 0
    failed: int = 0
    unserved: int = 0  # jobs waiting on a queue no live worker serves (SPEC 14)


@attrs.define
class _Prepared:
    """A delivery whose node code has run, waiting for its commit."""
    delivery: Optional[Delivery]
    job: Job
    graph: CompiledGraph
    node: GraphNode
    snap: Optional[RunSnapshot]
    outcome: Any
    events: Optional[List[Event]] = None  # what its commit does, as events (only with an event bus)
    duration_ms: Optional[float] = None  # how long its node code ran
    slot: Optional[limits.Slot] = None  # its concurrency slot, given back once its commit is in


TRACEPARENT = "traceparent"  # the job field carrying a run's W3C trace context (SPEC 13)


def _carry_traceparent(commit: Commit, traceparent: Optional[str]) -> None:
    """Successor jobs carry the trace context of the job (or run) they follow, unless they have one."""
    if not traceparent:
        return
    commit.jobs[:] = [j if TRACEPARENT in j.extra else j.with_(extra={**j.extra, TRACEPARENT: traceparent})
                      for j in commit.jobs]
    commit.delayed[:] = [(j if TRACEPARENT in j.extra else j.with_(extra={**j.extra, TRACEPARENT: traceparent}), d)
                         for j, d in commit.delayed]
    for counter in commit.counters:  # the job of a join or a batch that a count reaching its threshold makes
        job = counter.job
        if job is not None and TRACEPARENT not in job.extra:
            counter.job = job.with_(extra={**job.extra, TRACEPARENT: traceparent})


def _traced(jobs: List[Job], traceparent: Optional[str]) -> List[Job]:
    if not traceparent:
        return jobs
    return [j.with_(extra={**j.extra, TRACEPARENT: traceparent}) for j in jobs]


@attrs.define
class _Wave:
    """A wave's node executions, executed: what its commit round (`_finish_wave`) has to do."""

    prepared: List[_Prepared]
    chains: List[List[Tuple[_Prepared, Commit]]]
    late: List[_Prepared]  # executed; each commit is derived again once its segment's is in


class _Pool:
    """What the threads (lanes) of one `work()` share."""

    def __init__(self, budget: JobBudget, threads: int) -> None:
        self.budget = budget
        self.threads = threads
        self.lock = threading.Lock()
        self.active = 0  # lanes handling jobs right now
        self.error: Optional[BaseException] = None
        self.recovered_at = float("-inf")  # when a lane last ran `after_outage`
        self.committer: Optional[Committer] = None  # threads > 1: the commit rounds of their waves
        # the lanes' stop request: never cleared, so lanes left behind by a forced stop (an
        # exception in the calling thread) still stop once their jobs in hand are done
        self.stop = threading.Event()

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        with self.lock:
            self.active += 1
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1

    def fail(self, error: BaseException) -> None:
        """A lane died of `error`: every lane stops, and `work()` raises the first such error."""
        with self.lock:
            if self.error is None:
                self.error = error
        self.stop.set()

    def handing(self, delta: int) -> None:
        """A wave handed to the committer (+1) or settled (-1): its commit may enqueue more jobs,
        so its thread counts as active until then."""
        with self.lock:
            self.active += delta

    def idle_done(self) -> bool:
        """A burst lane found the queue empty: done once no other lane is handling jobs (their
        commits may enqueue more); else it waits a moment and looks again."""
        with self.lock:
            if self.active == 0:
                return True
        time.sleep(0.002)
        return False

    def after_outage(self, lane: "DistributedAdapter", failed_at: float) -> None:
        """`lane.after_outage()`, unless another lane ran it since this one failed: the jobs the
        worker held were given back once, not once per thread."""
        with self.lock:
            if self.recovered_at > failed_at:
                return
            lane.after_outage()
            self.recovered_at = time.monotonic()


@functools.lru_cache(maxsize=256)
def _whole_load_ids(graph: CompiledGraph) -> FrozenSet[str]:
    """The nodes whose jobs load the whole run (see `DistributedAdapter._load_request`)."""
    sinks = [node_id for node_id, node in graph.nodes.items() if not node.outgoing]
    return frozenset(graph.start_ids) | frozenset(sinks if len(sinks) == 1 else ())


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


class DistributedAdapter(_Operations):
    """A worker and a client over a job queue and a run store. `coordination` holds the slots of
    concurrency limits (`flowcraft.limits`: a slot outlives a dead holder `concurrency_slot_ttl`
    seconds; a job over its limit comes back after about `concurrency_retry_delay` seconds) and is
    kept for node code and tools that use one; None is fine for blueprints without limits."""

    def __init__(
        self,
        runtime: FlowRuntime,
        queue: JobQueue,
        store: RunStore,
        coordination: Optional[CoordinationStore] = None,
        *,
        retry_mode: str = "in-process",
        version_mismatch_ttl: float = 86400.0,
        version_mismatch_delay: float = 5.0,
        fetch_batch: Optional[int] = None,
        max_fetch: int = 1,
        fetch_budget: float = DEFAULT_FETCH_BUDGET,
        threads: int = 1,
        poll_timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
        concurrency_slot_ttl: float = limits.DEFAULT_SLOT_TTL,
        concurrency_retry_delay: float = limits.DEFAULT_RETRY_DELAY,
    ) -> None:
        if retry_mode not in ("in-process", "queue"):
            raise ValueError(f"retry_mode must be 'in-process' or 'queue', not {retry_mode!r}")
        self.runtime = runtime
        self.queue = queue
        self.store = store
        self.coordination = coordination
        # shared by the worker's threads (a lane is a shallow copy): one renewer per process
        self.slots = None if coordination is None else limits.ConcurrencySlots(coordination, concurrency_slot_ttl)
        self.concurrency_retry_delay = float(concurrency_retry_delay)
        self.retry_mode = retry_mode
        self.version_mismatch_ttl = version_mismatch_ttl
        self.version_mismatch_delay = version_mismatch_delay
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, not {threads!r}")
        self.threads = int(threads)
        # `fetch_batch` given: every fetch asks for that many; else the size adapts to the pace of
        # the jobs, from 1 up to `max_fetch` (see `worker_pool.FetchPace`)
        self.fetch_batch = max(1, int(fetch_batch if fetch_batch is not None else max_fetch))
        self.pace = FetchPace(self.fetch_batch, fetch_budget, fixed=fetch_batch is not None)
        self.poll_timeout = poll_timeout
        self.clock = clock
        self.runner = NodeRunner(runtime.middleware, None)
        self.router = routing.Router(runtime)  # which queue each job goes to (SPEC 14)
        self._routes_checked: Set[int] = set()  # ids of the graphs whose queue names the queue accepted
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._busy = threading.Lock()
        self._whole_loads = bool(getattr(store, "whole_loads", False))  # see RunStore.load_many
        self._acks_in_commit = bool(getattr(store, "acks_in_commit", False))  # see RunStore
        # per worker thread: the last batch item read by `_executable` (`_item_spec`), and the item
        # fields of a wave's item jobs, read for all of them at once (`_wave_items`: (run id, field) -> value)
        self._local = threading.local()
        self._lanes: List[DistributedAdapter] = []  # the threads of a running `work(threads > 1)`
        self._conflicts = 0
        self._pool: Optional[_Pool] = None  # what the lanes of a running `work()` share
        self._running: Optional[_Pool] = None  # on the adapter whose `work()` runs lanes: their pool
        self._own_ports: List[Any] = []  # on a lane: the queue and store it was given of its own
        self._committer: Optional[Committer] = None  # set on the lane that is the pool's committer
        # a worker thread's wave handed to the committer, with its deliveries, to acknowledge once done
        self._handoff: Optional[Tuple[Handoff, List[Delivery]]] = None
        self._handing = False  # this worker thread hands its commit rounds to the committer now
        # while a fetched batch runs: past this (monotonic) time its jobs not started are given
        # back to the queue (`_prepare`), so that a batch that turned out slow goes to idle workers
        self._batch_deadline: Optional[float] = None
        self._given_back = 0
        # commits (one node execution's, or a wave's merged commit of one run) whose checks failed
        # (a run commit: the version moved; a node commit: a state it changes was changed) and were
        # derived again: a measure of contention between workers
        self.conflicts = 0
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"  # who ran a node, in the run's history
        # middleware hooks (see `flowcraft.middleware`): told of finished runs and dead letters
        self._finish_hooks = hooks(runtime.middleware, "run_finished")
        self._dead_letter_hooks = hooks(runtime.middleware, "job_dead_lettered")

    @property
    def conflicts(self) -> int:
        """Version conflicts of this worker's commits, its threads' included."""
        return self._conflicts + sum(lane._conflicts for lane in list(self._lanes))

    @conflicts.setter
    def conflicts(self, value: int) -> None:
        self._conflicts = value - sum(lane._conflicts for lane in list(self._lanes))

    # === worker ==================================================================================

    def work(self, burst: bool = False, max_jobs: Optional[int] = None) -> int:
        """Process jobs until stopped (or, with `burst`, until the queue is empty); return how many.

        `threads` threads each fetch and handle jobs (each with its own queue and store connections
        where the adapter's are not thread-safe: `_lane`), and hand the commit rounds of the jobs
        they ran to committer threads (`worker_pool.Committer`) while they run their next ones;
        the first of them is this thread (with one thread and `burst`, it does it all). A `stop()` that comes before
        `work()` starts is not lost: `work()` then returns at once."""
        try:
            return self._work(burst, max_jobs)
        finally:
            self._stop.clear()  # the request is served; the next `work()` runs

    def _work(self, burst: bool, max_jobs: Optional[int]) -> int:
        pool = _Pool(JobBudget(max_jobs), self.threads)
        if self.threads == 1 and burst:  # (a drain, a test: no committer thread to set up and tear down)
            self._pool = pool
            try:
                with self._worker_session():
                    self._serve(burst)
            finally:
                self._pool = None
            return pool.budget.processed
        lanes = [self._lane(i) for i in range(self.threads)]
        # the commit rounds of the threads' waves, in threads (with connections) of their own
        pool.committer = Committer()
        committers = [self._lane(self.threads + i) for i in range(committer_threads(self.threads))]
        for committer in committers:
            committer._committer = pool.committer
        lanes += committers
        for lane in lanes:
            lane._pool = pool
            lane._stop = pool.stop
        self._lanes = lanes
        self._running = pool
        if self._stop.is_set():  # (`stop()` sets both once `_running` is set: neither order loses it)
            pool.stop.set()
        # the first lane runs in this thread: node code that signals this process (or is
        # interrupted by a signal) runs where the signal's handler does, as with one thread
        threads = [threading.Thread(target=lane._lane_main, args=(burst,), name=f"flowcraft-worker-{i}", daemon=True)
                   for i, lane in enumerate(lanes[1:self.threads], start=1)]
        committing = [threading.Thread(target=lane._lane_main, args=(burst,), name=f"flowcraft-committer-{i}", daemon=True)
                      for i, lane in enumerate(committers)]
        try:
            with self._worker_session():  # the ports the lanes share (lanes with their own: `_lane_main`)
                for thread in committing + threads:
                    thread.start()
                try:
                    lanes[0]._serve(burst)
                except Exception as error:  # a bug: the other lanes stop too (and `work` raises it)
                    pool.fail(error)
                for thread in threads:
                    thread.join()
                pool.committer.close()
                for thread in committing:
                    thread.join()
        except BaseException:
            # this thread was interrupted (a forced stop): leave at once; the lanes are daemon
            # threads, and the jobs in their hands are delivered again
            pool.stop.set()
            raise
        finally:
            self._running = None
        self._conflicts += sum(lane._conflicts for lane in lanes)
        self._lanes = []
        for lane in lanes:
            lane._pool = None
            try:
                lane._close_lane()
            except Exception:
                logger.exception("worker: closing a worker thread's connections failed")
        if pool.error is not None:
            raise pool.error
        return pool.budget.processed

    def _lane(self, index: int) -> "DistributedAdapter":
        """A copy of this adapter that one worker thread runs (`index` > 0: another thread), with
        the same runtime, stop request and fetch pace; a queue or store whose client is not
        thread-safe gives the other threads ports of their own (its optional ``lane()``)."""
        lane = copy.copy(self)
        lane._lanes = []
        lane._running = None
        lane._conflicts = 0
        lane._thread = None
        lane._busy = threading.Lock()
        lane._batch_deadline = None
        lane._given_back = 0
        lane._committer = None
        lane._handoff = None
        lane._handing = False
        lane._own_ports = []
        if index > 0:
            queue_lane, store_lane = getattr(self.queue, "lane", None), getattr(self.store, "lane", None)
            if queue_lane is not None:
                lane.queue = queue_lane()
                lane._own_ports.append(lane.queue)
            if store_lane is not None:
                lane.store = store_lane()
                lane._own_ports.append(lane.store)
        return lane

    def _close_lane(self) -> None:
        """Close the ports this lane was given of its own (see `_lane`)."""
        for port in self._own_ports:
            port.close()

    @contextlib.contextmanager
    def _worker_session(self) -> Iterator[None]:
        """While a worker loop runs on these ports: the store's optional ``worker_session(queue)``
        (what it does only while a worker runs); at the end, the queue's optional ``release()``
        gives back what it took ahead of fetches and did not hand out."""
        session = getattr(self.store, "worker_session", None)
        with session(self.queue) if session is not None else contextlib.nullcontext():
            try:
                yield
            finally:
                release = getattr(self.queue, "release", None)
                if release is not None:
                    try:
                        release()
                    except (ConnectionError, OSError) as error:  # they come back with the broker's own recovery
                        logger.warning("worker: could not give back the jobs held ahead: %s", error)

    def _lane_main(self, burst: bool) -> None:
        pool = self._pool
        assert pool is not None
        try:
            with self._worker_session() if self._own_ports else contextlib.nullcontext():
                self._serve(burst)
        except BaseException as error:  # a bug or a simulated crash: the worker stops (and `work` raises it)
            pool.fail(error)

    def _serve(self, burst: bool) -> None:
        """One worker thread's loop (`_loop`); adapters wrap it with what each thread sets up."""
        self._loop(burst)

    def _loop(self, burst: bool) -> None:
        pool = self._pool
        assert pool is not None
        if self._committer is not None:
            self._committer.serve(self._finish_waves)
            return
        try:
            self._fetch_loop(pool, burst)
        finally:
            self._settle_handoff(quiet=True)

    def _fetch_loop(self, pool: "_Pool", burst: bool) -> None:
        budget = pool.budget
        delays: Optional[Iterator[float]] = None
        while not self._stop.is_set():
            size = self.pace.size()
            self._handing = pool.committer is not None and self._slow_jobs()
            handed = self._handoff is not None
            self._hold(size + handed)  # the wave handed to the committer is not acknowledged yet
            want = budget.reserve(size)
            if want <= 0:
                break
            taken = 0
            try:
                wait = 0.0 if burst else min(self.poll_timeout, _HANDOFF_IDLE) if handed else self.poll_timeout
                deliveries = self.queue.fetch(want, timeout=wait)
                taken = len(deliveries)
                if not deliveries:
                    if handed:
                        self._settle_handoff()
                    elif burst and pool.idle_done():
                        break
                    delays = None
                    continue
                with pool.working(), self._busy:
                    began = time.monotonic()
                    self._given_back = 0
                    if self._handing:
                        self._handle_handing_off(pool.committer, deliveries)  # type: ignore[arg-type]  # `_handing` says there is one
                    else:
                        self._settle_handoff()  # (the jobs turned fast: this thread commits again)
                        if len(deliveries) == 1:
                            self.handle(deliveries[0])
                        else:
                            self._handle_fetched(deliveries)
                    self.pace.record(len(deliveries) - self._given_back, time.monotonic() - began)
                delays = None
            except (ConnectionError, OSError) as error:
                self._settle_handoff(quiet=True)
                # a service is down: the unacknowledged jobs come back; wait (at most about a
                # second, jittered, however long the outage) and go on
                failed_at = time.monotonic()
                delays = delays or outage_delays()
                delay = next(delays)
                logger.warning("worker: %s; retrying in %.2fs", error, delay)
                if self._stop.wait(delay):
                    break
                try:
                    pool.after_outage(self, failed_at)
                except (ConnectionError, OSError):
                    continue
            finally:
                budget.settle(want, taken)
            if budget.spent:
                break

    def _slow_jobs(self) -> bool:
        """Whether jobs take long enough (`HANDOFF_AFTER`, mean) to hand their commit rounds to the
        committer: while they are fast, the thread commits itself (a commit may take its next
        jobs in the same round trip), as a hand-off would only add the wake-ups of two threads."""
        mean = self.pace.mean
        return mean is not None and mean >= HANDOFF_AFTER

    def _handle_fetched(self, deliveries: Sequence[Delivery]) -> None:
        if not self.pace.fixed and hasattr(self.queue, "give_back"):
            self._batch_deadline = time.monotonic() + max(GIVE_BACK_AFTER * self.pace.budget, 0.05)
        try:
            self._handle_batch_guarded(deliveries)
        finally:
            self._batch_deadline = None

    def _handle_handing_off(self, committer: Committer, deliveries: Sequence[Delivery]) -> None:
        """Run the node code of a batch of one wave, then hand its commit round to the committer
        (once the one handed in before is done and acknowledged) and return: the thread fetches
        its next jobs while the committer commits. A batch of several waves is handled here, each
        wave seeing the commits of those before."""
        segments, later = batching.first_wave(deliveries)
        if later:
            self._settle_handoff()
            self._handle_fetched(deliveries)
            return
        if len(deliveries) > 1 and not self.pace.fixed and hasattr(self.queue, "give_back"):
            self._batch_deadline = time.monotonic() + max(GIVE_BACK_AFTER * self.pace.budget, 0.05)
        try:
            wave, deferred = self._run_wave(segments)
        except _OUTAGES:
            raise
        except Exception:
            logger.exception("worker: a batch of %d deliveries failed; handling them one by one", len(deliveries))
            self._settle_handoff()
            for delivery in deliveries:
                self.handle(delivery)
            return
        finally:
            self._batch_deadline = None
        self._settle_handoff()
        if wave.prepared:
            pool = self._pool
            assert pool is not None
            pool.handing(+1)
            self._handoff = (committer.submit(wave), [p.delivery for p in wave.prepared])  # type: ignore[misc]  # a wave's jobs come with their deliveries
        if deferred:  # a segment cut short: its rest waits for this wave's commits
            self._settle_handoff()
            self._handle_fetched(deferred)

    def _settle_handoff(self, quiet: bool = False) -> None:
        """Wait for the wave handed to the committer and acknowledge its deliveries; a bug in its
        commit round: handle them again one by one (those done are found done). `quiet` (the loop
        ends, or an outage): an outage is logged, the deliveries come back unacknowledged."""
        handoff, self._handoff = self._handoff, None
        if handoff is None:
            return
        done, deliveries = handoff
        try:
            try:
                try:
                    done.wait()
                finally:
                    if self._pool is not None:
                        self._pool.handing(-1)
            except _OUTAGES:
                raise
            except Exception:
                logger.exception("worker: committing a wave of %d deliveries failed; handling them one by one",
                                 len(deliveries))
                for delivery in deliveries:
                    self.handle(delivery)
                return
            self._ack_quietly(deliveries)
        except (ConnectionError, OSError) as error:
            if not quiet:
                raise
            logger.warning("worker: %s; %d deliveries come back unacknowledged", error, len(deliveries))

    def _give_back(self, delivery: Delivery) -> None:
        """Hand a fetched delivery back to the queue unstarted (`JobQueue.give_back`, optional)."""
        self.queue.give_back([delivery])  # type: ignore[attr-defined]  # only set up when the queue has it
        self._given_back += 1
        logger.debug("worker: gave job %s back (its batch is slow)", delivery.job.key if delivery.job else "?")

    def _hold(self, size: int) -> None:
        """The next fetch asks for `size` jobs (with those held unacknowledged): a queue that
        takes jobs ahead of a fetch (its optional ``hold(count, commits_take)``: a broker's
        prefetch window, jobs taken with a commit) holds no more than that, nor more than the
        job budget leaves; `commits_take` is False while a committer thread commits this
        thread's jobs (jobs its commits took would wait while this thread waits on the queue)."""
        hold = getattr(self.queue, "hold", None)
        if hold is None:
            return
        left = self._pool.budget.left if self._pool is not None else None
        hold(size if left is None else max(0, min(size, left)), commits_take=not self._handing)

    def close(self) -> None:
        """Stop the worker if one runs (`stop()`), then close the queue and the store (if it has
        `close()`)."""
        if self._thread is not None or self._running is not None or self._pool is not None:
            self.stop()
        self.queue.close()
        close_store = getattr(self.store, "close", None)
        if close_store is not None:
            close_store()

    def start(self) -> None:
        """Run `work()` in a background thread."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.work, name="flowcraft-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish (and acknowledge) the jobs in hand (of every thread), then stop the worker."""
        self._stop.set()
        running = self._running
        if running is not None:
            running.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

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
        `flowcraft.batching`); the semantics are those of `handle` applied in order."""
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
                    if p.events:
                        self._emit_all(p.events)
                    if self._finish_hooks and c.record.status in FINAL_STATUSES:
                        self._run_finished(c.record)
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

    def after_outage(self) -> None:
        """Called once a worker loop retries after a connection error: the queue's optional
        ``recover()`` gives back the jobs this worker held; may raise `ConnectionError` again."""
        recover = getattr(self.queue, "recover", None)
        if recover is not None:
            recover()

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
            deadlines.expire_run(self, job)
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
        engine = WorkerEngine(self, job, graph, context, snap)
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
                if prepared.events:
                    self._emit_all(prepared.events)
                if self._finish_hooks and commit.record.status in FINAL_STATUSES:
                    self._run_finished(commit.record)
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
                if plan.events:
                    self._emit_all(plan.events)
                if self._finish_hooks and commit.record.status in FINAL_STATUSES:
                    self._run_finished(commit.record)
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
            deadlines.fail_overdue(self, record)
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

    # === events ==================================================================================
    # Every emission is behind `runtime.event_bus is not None`: without a bus a job costs no event work.

    def _emit_all(self, events: Iterable[Event]) -> None:
        bus = self.runtime.event_bus
        if bus is not None:
            try:
                for event in events:
                    bus.emit(event)
            except _OUTAGES:
                raise
            except Exception:  # an observer must never break a worker
                logger.exception("worker: the event bus failed")

    def _emit_jobs(self, jobs: Iterable[Job], delay: float = 0.0) -> None:
        if self.runtime.event_bus is not None:
            self._emit_all([job_event("job:enqueued", job, delay=delay) for job in jobs])

    def _run_finished(self, record: RunRecord) -> None:
        for hook in self._finish_hooks:
            try:
                hook(record.run_id, record.blueprint_id, record.status)
            except Exception:  # an observer must never break a worker
                logger.exception("a middleware's run_finished hook failed")

    def _emit_ended(self, record: RunRecord, jobs: Sequence[Job]) -> None:
        """A run ended outside a node's commit (cancelled, failed by a bad job, empty)."""
        if self._finish_hooks and record.status in FINAL_STATUSES:
            self._run_finished(record)
        if self.runtime.event_bus is not None:
            self._emit_jobs(jobs)
            self._emit_all([Event("workflow:finish", {"run_id": record.run_id, "blueprint_id": record.blueprint_id,
                                                      "status": record.status, "errors": list(record.errors)})])


def _finish_event(record: RunRecord) -> Dict[str, Any]:
    return {"type": "workflow:finish", "payload": {"status": record.status, "errors": list(record.errors),
                                                   "timestamp": record.updated_at}}


def _item_fields(job: Job, parent: str) -> List[str]:
    """What a batch item job reads before it runs: its result (set once done), the batch's header, its own input."""
    assert job.index is not None  # an item job has one (`Job.from_dict` requires it)
    return [item_field(parent, job.iteration, job.index), spec_field(parent, job.iteration),
            input_field(parent, job.iteration, job.index)]


def _same_parent(stored: Optional[Mapping[str, Any]], parent: Mapping[str, Any]) -> bool:
    if not stored:
        return False
    return all(stored.get(k) == parent.get(k) for k in ("runId", "nodeId", "iteration"))


class Reconciler:
    """Finds runs idle past a threshold and re-enqueues their frontier (`DistributedAdapter.reconcile`).

    Idleness is the store's (`RunStore.idle_runs`, based on the `updated_at` every commit
    refreshes). A pass also uses what the ports offer beyond that: the store's optional
    ``sweep_outbox(threshold, queue, limit)`` first publishes the outbox rows a killed worker left
    behind; the queue's optional ``take_abandoned()`` names the runs whose jobs a worker that is
    gone held, reconciled at once, idle or not, inside its optional ``reconcile_pass()`` (what
    the queue checks once per pass instead of once per run)."""

    def __init__(self, adapter: DistributedAdapter, stalled_threshold_seconds: float = 300.0, limit: int = 1000) -> None:
        self.adapter = adapter
        self.stalled_threshold_seconds = stalled_threshold_seconds
        self.limit = limit

    def run(self) -> ReconcileStats:
        queue, store = self.adapter.queue, self.adapter.store
        sweep = getattr(store, "sweep_outbox", None)
        if sweep is not None:
            swept = sweep(self.stalled_threshold_seconds, queue, self.limit)
            if swept:
                logger.info("reconciler: published %d outbox row(s) left behind again", swept)
        reconcile_pass = getattr(queue, "reconcile_pass", None)
        with reconcile_pass() if reconcile_pass is not None else contextlib.nullcontext():
            take_abandoned = getattr(queue, "take_abandoned", None)
            abandoned = take_abandoned() if take_abandoned is not None else []
            reconciled, failed = self.reconcile_each(abandoned)
            scanned, idle = store.idle_runs(self.stalled_threshold_seconds, self.limit)
            idle_reconciled, idle_failed = self.reconcile_each(idle)
        return ReconcileStats(scanned=scanned, stalled=len(idle), reconciled=reconciled + idle_reconciled,
                              failed=failed + idle_failed, unserved=self.unserved())

    def unserved(self) -> int:
        """How many jobs wait on a queue no live worker serves (a WARNING names the queues)."""
        try:
            waiting = routing.unserved(self.adapter.queue, self.adapter.runtime)
        except _OUTAGES:
            raise
        except Exception:  # the count is a report: a queue that cannot tell must not stop reconciling
            logger.exception("reconciler: counting the jobs on unserved queues failed")
            return 0
        if waiting:
            logger.warning("reconciler: %d job(s) wait on queue(s) no live worker serves: %s", sum(waiting.values()),
                           ", ".join(f"{name} ({n})" for name, n in waiting.items()))
        return sum(waiting.values())

    def reconcile_each(self, run_ids: Iterable[str]) -> Tuple[int, int]:
        """`adapter.reconcile` each run: (how many had work re-enqueued, how many failed to)."""
        reconciled = failed = 0
        for run_id in run_ids:
            try:
                if self.adapter.reconcile(run_id):
                    reconciled += 1
            except Exception:
                logger.exception("reconciling run %s failed", run_id)
                failed += 1
        return reconciled, failed


__all__ = ["DistributedAdapter", "ReconcileStats", "Reconciler", "StoreContext", "WorkerCrash"]
