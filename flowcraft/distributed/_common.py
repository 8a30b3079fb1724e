"""What the parts of the distributed driver share: limits, failure reasons and logs, the records
of a wave's executions, the trace context carried in jobs."""
from __future__ import annotations

import functools
import logging
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

import attrs

from .. import limits
from ..events import Event
from ..execution import NodeFailure
from ..graph import CompiledGraph, GraphNode
from ._plan import input_field, spec_field
from ..ports import Commit, Delivery, Job, RunRecord, RunSnapshot, item_field

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


@functools.lru_cache(maxsize=256)
def _whole_load_ids(graph: CompiledGraph) -> FrozenSet[str]:
    """The nodes whose jobs load the whole run (see `DistributedAdapter._load_request`)."""
    sinks = [node_id for node_id, node in graph.nodes.items() if not node.outgoing]
    return frozenset(graph.start_ids) | frozenset(sinks if len(sinks) == 1 else ())


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
