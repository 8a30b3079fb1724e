"""Run deadlines (SPEC 14): a run not finished `deadline` seconds after it started fails with a
`DeadlineExceeded` error naming the nodes still running or waiting, and no new node of it starts.

- In memory (`FlowRuntime.run(..., deadline=)`), `RunDeadline` is checked between nodes and
  bounds every wait for a running node; at the deadline the run's cancel token (a `ChildToken` of
  the caller's, the `ctx.cancel` node code sees) is set: a node running in a thread cannot be
  killed, node code that checks `ctx.cancel` ends early, and whatever it returns is discarded.
- Distributed (`start_workflow(..., deadline=)`), the run's record holds `deadline_at` and a delayed
  job of kind "deadline" (`deadline_job`) fails the run on time (`expire_run`) with a
  version-checked run commit whose history holds a `run:deadline` event and `workflow:finish`.
  From then on the store refuses every node commit of the run (it is no longer running), so a
  node that was running finishes without starting successors. A run whose deadline job was lost
  (its client died right after creating it) is failed by the reconciler once overdue.

`metadata.deadline` (seconds) in a blueprint is the default of both.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional

from .cancel import CancelToken, ChildToken
from .errors import BlueprintError, DeadlineExceeded
from .graph import READY, NodeState
from .ports import Job, RunRecord
from .result import FINAL_STATUSES, WorkflowError

if TYPE_CHECKING:
    from .distributed import DistributedAdapter

logger = logging.getLogger("flowcraft.deadlines")

DEADLINE_KIND = "deadline"  # the kind of the delayed job that fails a run at its deadline
DEADLINE_NODE = "_deadline"  # that job's nodeId: it names no node (its kind says what it is)
DEADLINE_EVENT = "run:deadline"  # the history event of a run failed by its deadline
DEADLINE_KEY = "deadlineAt"  # in an awaiting in-memory run's traversal snapshot: the deadline (epoch seconds)


def check_deadline(value: Any, where: str = "deadline") -> Optional[float]:
    """`value` as seconds (None stays None); `ValueError` unless it is a positive finite number."""
    if value is None:
        return None
    if type(value) is bool or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} must be a positive number of seconds, not {value!r}")
    return float(value)


def metadata_problems(blueprint: Any) -> List[str]:
    """What is wrong with the blueprint's `metadata.deadline`, as sentences (`FlowRuntime.limit_problems`)."""
    metadata = getattr(blueprint, "metadata", None) or {}
    try:
        check_deadline(metadata.get("deadline"), "metadata.deadline")
    except ValueError as error:
        return [str(error)]
    return []


def blueprint_deadline(blueprint: Any) -> Optional[float]:
    """The blueprint's `metadata.deadline` in seconds, or None; `BlueprintError` if it is not a
    positive number."""
    metadata = getattr(blueprint, "metadata", None) or {}
    try:
        return check_deadline(metadata.get("deadline"), "metadata.deadline")
    except ValueError as error:
        raise BlueprintError([str(error)], getattr(blueprint, "id", None)) from None


def run_deadline(blueprint: Any, deadline: Any) -> Optional[float]:
    """The deadline (seconds) of a run of `blueprint`: `deadline` if given, else the blueprint's."""
    given = check_deadline(deadline)
    return given if given is not None else blueprint_deadline(blueprint)


def message(seconds: Optional[float], running: Iterable[str], waiting: Iterable[str], at: Optional[float] = None) -> str:
    """The text of a `DeadlineExceeded` error: the deadline (`seconds` after the start, or the time
    `at`) and the nodes left."""
    running = sorted(set(running))
    waiting = sorted(set(waiting) - set(running))
    within = f" of {seconds:g}s" if seconds is not None else ""
    if at is not None and seconds is None:
        within = " (" + _dt.datetime.fromtimestamp(at, _dt.timezone.utc).isoformat(timespec="milliseconds") + ")"
    parts = [f"still running: {running}" if running else "", f"waiting: {waiting}" if waiting else ""]
    said = "; ".join(p for p in parts if p) or "no node was running"
    return f"the run passed its deadline{within}: {said}"


def deadline_error(seconds: Optional[float], running: Iterable[str], waiting: Iterable[str],
                   at: Optional[float] = None) -> WorkflowError:
    return WorkflowError(None, message(seconds, running, waiting, at), DeadlineExceeded.__name__)


# --- in memory --------------------------------------------------------------------------------


class RunDeadline:
    """The deadline of one in-memory run: `at` (epoch seconds) and the run's token it cancels."""

    def __init__(self, at: float, seconds: Optional[float], token: ChildToken) -> None:
        self.at = at
        self.seconds = seconds
        self.token = token
        self.expired = False

    @classmethod
    def start(cls, seconds: float, cancel: Optional[CancelToken]) -> "RunDeadline":
        return cls(time.time() + seconds, seconds, ChildToken(cancel))

    @classmethod
    def restore(cls, snapshot: Mapping[str, Any], cancel: Optional[CancelToken]) -> Optional["RunDeadline"]:
        """The deadline an awaiting run's snapshot recorded (`snapshot_fields`), or None."""
        at = snapshot.get(DEADLINE_KEY)
        if not isinstance(at, dict) or type(at.get("at")) not in (int, float):
            return None
        seconds = at.get("seconds")
        given = float(seconds) if isinstance(seconds, (int, float)) and type(seconds) is not bool else None
        return cls(float(at["at"]), given, ChildToken(cancel))

    def snapshot_fields(self) -> Dict[str, Any]:
        return {DEADLINE_KEY: {"at": self.at, "seconds": self.seconds}}

    def remaining(self) -> float:
        return self.at - time.time()

    def due(self) -> bool:
        return self.remaining() <= 0

    def expire(self, running: Iterable[str], waiting: Iterable[str]) -> Optional[WorkflowError]:
        """The run's `DeadlineExceeded` error, once (None after the first call); sets the token."""
        if self.expired:
            return None
        self.expired = True
        self.token.cancel(message(self.seconds, running, waiting))
        return deadline_error(self.seconds, running, waiting)


# --- distributed ------------------------------------------------------------------------------


def deadline_job(run_id: str, blueprint_id: str) -> Job:
    """The job that fails run `run_id` at its deadline (delayed by the deadline's seconds)."""
    return Job(run_id, blueprint_id, DEADLINE_NODE, kind=DEADLINE_KIND)


def unfinished(record: RunRecord, states: Mapping[str, Dict[str, Any]]) -> List[str]:
    """The nodes of a run that are running or queued (ready, not parked)."""
    return [node_id for node_id, raw in states.items()
            if NodeState.from_dict(raw).status == READY and node_id not in record.awaiting]


def expire_run(adapter: "DistributedAdapter", job: Job) -> bool:
    """Handle a deadline job: fail its run if its deadline has passed (as its record says: the job
    decides nothing), enqueue it again for the time left if it came early; True if the run failed."""
    record = adapter.store.get_record(job.run_id)
    if record is None or record.status in FINAL_STATUSES or record.deadline_at is None:
        return False  # unknown, ended, or without a deadline (a forged job, or a retried run)
    left = record.deadline_at - adapter.clock()
    if left > 0:
        adapter.queue.enqueue([deadline_job(job.run_id, record.blueprint_id or job.blueprint_id)], left)
        return False
    return fail_overdue(adapter, record)


def fail_overdue(adapter: "DistributedAdapter", record: RunRecord) -> bool:
    """Fail a run whose deadline has passed with `DeadlineExceeded` (one version-checked run commit)."""
    running = unfinished(record, adapter.store.read_all_states(record.run_id))
    waiting = sorted(record.awaiting)
    error = deadline_error(None, running, waiting, at=record.deadline_at)
    event = {"type": DEADLINE_EVENT, "payload": {"timestamp": adapter.clock(), "deadline_at": record.deadline_at,
                                                 "running": sorted(running), "waiting": waiting,
                                                 "message": error.message}}
    failed = adapter._fail_run(record.run_id, error, event)
    if failed:
        logger.error("run %s (%s) failed: %s", record.run_id, record.blueprint_id, error.message)
    return failed
