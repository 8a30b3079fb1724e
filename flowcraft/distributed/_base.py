"""The state every part of the distributed driver shares (one constructor), and its events."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, List, Optional, Sequence, Set, Tuple, cast

from .. import limits, routing
from ..events import Event
from ..execution import NodeRunner
from ..middleware import hooks
from ._plan import job_event
from ..ports import CoordinationStore, Delivery, Job, JobQueue, RunRecord, RunStore
from ..result import FINAL_STATUSES
from ..runtime import FlowRuntime
from ._worker_pool import DEFAULT_FETCH_BUDGET, Committer, FetchPace, Handoff, LanePool
from ._common import _OUTAGES

if TYPE_CHECKING:
    from . import DistributedAdapter

logger = logging.getLogger("flowcraft.distributed")


class _DriverBase:
    """The ports, options and per-thread state of a `DistributedAdapter`; its events."""

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
        # the jobs, from 1 up to `max_fetch` (see `_worker_pool.FetchPace`)
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
        self._lanes: List[Any] = []  # the threads (`_WorkerLoop` lanes) of a running `work(threads > 1)`  # the threads of a running `work(threads > 1)`
        self._conflicts = 0
        self._pool: Optional[LanePool] = None  # what the lanes of a running `work()` share
        self._running: Optional[LanePool] = None  # on the adapter whose `work()` runs lanes: their pool
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
    def _adapter(self) -> "DistributedAdapter":
        """This object as the adapter it is a part of (`DistributedAdapter` mixes in every part)."""
        return cast("DistributedAdapter", self)

    @property
    def conflicts(self) -> int:
        """Version conflicts of this worker's commits, its threads' included."""
        return self._conflicts + sum(lane._conflicts for lane in list(self._lanes))

    @conflicts.setter
    def conflicts(self, value: int) -> None:
        self._conflicts = value - sum(lane._conflicts for lane in list(self._lanes))

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

    def _tell_applied(self, events: Optional[List[Event]], record: RunRecord) -> None:
        """An applied commit: its events to the event bus, and the run-finished hooks if it ended the run."""
        if events:
            self._emit_all(events)
        if self._finish_hooks and record.status in FINAL_STATUSES:
            self._run_finished(record)

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
