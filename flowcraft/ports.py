"""The ports the distributed driver needs; adapters implement them for one technology each.

- `JobQueue`: at-least-once delivery of `Job`s, acknowledged after the commit, with delays and a
  dead-letter queue.
- `RunStore`: a run's context, its traversal state and its status, changed only by atomic,
  version-checked `Commit`s. Every orchestration decision is made by the core; the store applies
  what it is told, all or nothing.
- `CoordinationStore`: small shared counters and markers with a TTL (the Flowcraft TS methods).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

import attrs

# What a job on the wire may be (see `Job`); "resume" jobs never travel, a client makes them in process.
JOB_KINDS = ("node", "timer", "child", "item", "deadline")
_JOB_FIELDS = {"runId", "blueprintId", "nodeId", "iteration", "attempt", "input", "parent", "index", "kind", "firstSeen",
               "queue"}

# Bounds on what a queue message may be (anyone who can write to the queue can write anything):
MAX_JOB_BYTES = 16 * 1024 * 1024  # a larger body is malformed (only a batch item's input rides in its job)
MAX_JOB_DEPTH = 128  # containers nested deeper than this (the job object is level 1) make a job malformed
MAX_ID_LENGTH = 512  # runId, blueprintId, nodeId, parent: characters (as the Redis adapter's keys; a subflow child's run id grows per level)
MAX_JOB_NUMBER = 2 ** 53  # iteration, attempt and index are whole numbers in [0, MAX_JOB_NUMBER]
# A job identity field holds no control character (C0, DEL, C1) and no lone surrogate: they break
# stores, headers and logs (a NUL in a RabbitMQ header, a surrogate in UTF-8).
_BAD_ID_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class MalformedJob(ValueError):
    """A queue message that is not a valid job; the message says what is wrong."""


def identity_problem(value: Any) -> Optional[str]:
    """What is wrong with `value` as a job identity (a run, blueprint or node id); None if nothing.

    An identity is a non-empty string of at most `MAX_ID_LENGTH` characters without control
    characters or lone surrogates. O(len(value))."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID_LENGTH:
        return f"is {len(value)} characters long, more than {MAX_ID_LENGTH}"
    bad = None if value.isprintable() else _BAD_ID_CHAR.search(value)  # printable: no control character
    if bad is not None:
        return f"contains the control character {bad.group()!r} at position {bad.start()}"
    return None


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` holds lists/dicts nested more than `limit` deep (`value` itself is level 1
    when it is one). Iterative, O(number of containers): safe on any depth."""
    stack = [(value, 1)] if type(value) in (dict, list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if type(item) is dict else item
        stack.extend((child, depth + 1) for child in children if type(child) in (dict, list))
    return False


def _reject_constant(name: str) -> Any:
    raise MalformedJob(f"{name} is not a JSON number")


# Only C-speed checks on every job: a Python hook called per value would double the cost of a job
# with an input. A number that overflows to infinity is refused where the worker reads one (firstSeen).
_decode_job = json.JSONDecoder(parse_constant=_reject_constant).decode  # built once: jobs are parsed per delivery
_IDENTITY_KEYS = ('"runId"', '"blueprintId"', '"nodeId"', '"parent"', '"kind"')


def _top_level_duplicate(text: str) -> Optional[str]:
    """A key the job object itself holds twice (parsers disagree on which one counts), if any."""
    duplicates: List[Optional[str]] = []

    def pairs_hook(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        seen: set = set()
        duplicates.append(next((k for k, _ in pairs if k in seen or seen.add(k)), None))
        return dict(pairs)

    json.JSONDecoder(object_pairs_hook=pairs_hook).decode(text)
    return duplicates[-1] if duplicates else None  # the outermost object is built last


def load_job_json(body: Any) -> Any:
    """Parse a queue message's JSON, within the bounds above; raise only `MalformedJob`.

    Bytes must be UTF-8; NaN/Infinity literals and a job identity field given twice are refused; nesting is bounded before anything recurses on the value (a deep enough document
    makes the parser itself raise RecursionError, turned into `MalformedJob` here). O(len(body))."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        if len(body) > MAX_JOB_BYTES:
            raise MalformedJob(f"the body is {len(body)} bytes, more than {MAX_JOB_BYTES}")
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedJob(f"not valid JSON: not UTF-8: {exc}") from None
    elif isinstance(body, str):
        text = body
        if len(text) > MAX_JOB_BYTES:
            raise MalformedJob(f"the body is {len(text)} characters, more than {MAX_JOB_BYTES}")
    else:
        raise MalformedJob(f"a job body must be bytes or text, not {type(body).__name__}")
    try:
        data = _decode_job(text)
    except MalformedJob as exc:
        raise MalformedJob(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedJob(f"not valid JSON: nested deeper than {MAX_JOB_DEPTH} levels") from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise MalformedJob(f"not valid JSON: {exc}") from None
    # the count of opening brackets bounds the depth: the walk is needed only for bodies with many
    if text.count("[") + text.count("{") > MAX_JOB_DEPTH and nesting_exceeds(data, MAX_JOB_DEPTH):
        raise MalformedJob(f"nested deeper than {MAX_JOB_DEPTH} levels")
    if isinstance(data, dict) and any(text.count(key) > 1 for key in _IDENTITY_KEYS):  # given twice?
        duplicate = _top_level_duplicate(text)
        if duplicate is not None:
            raise MalformedJob(f"not valid JSON: duplicate key {duplicate[:80]!r}")
    return data


def _whole_number(name: str, value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_JOB_NUMBER:
        raise MalformedJob(f"field {name!r} must be a whole number in [0, {MAX_JOB_NUMBER}], not {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


_compact_json = json.JSONEncoder(separators=(",", ":")).encode  # built once: jobs are encoded per node execution


@attrs.frozen
class Job:
    """One unit of work: execute (or finish) node `node_id` of run `run_id` at `iteration`.

    `kind` is "node" (execute), "timer" (a sleep's wake-up), "child" (a subflow's child finished)
    or "item" (a batch item: `parent` and `index` name it, `input` carries the item). `queue` names
    the queue it goes to when its node is routed (`flowcraft.routing`; None: the adapter's default
    queue); it rides in the job (only when set) so that stores publishing later (an outbox) and
    redeliveries keep it.
    """

    run_id: str
    blueprint_id: str
    node_id: str
    iteration: int = 0
    attempt: int = 1
    kind: str = "node"
    parent: Optional[str] = None
    index: Optional[int] = None
    input: Any = None
    first_seen: Optional[float] = None  # when a worker first had to put it back (version mismatch)
    extra: Dict[str, Any] = attrs.field(factory=dict)
    queue: Optional[str] = None

    @property
    def key(self) -> str:
        """The identity of the node execution this job is for (the same for every redelivery)."""
        base = f"{self.run_id}:{self.node_id}:{self.iteration}"
        return base if self.index is None else f"{base}:{self.index}"

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"runId": self.run_id, "blueprintId": self.blueprint_id, "nodeId": self.node_id}
        if self.iteration:
            out["iteration"] = self.iteration
        if self.attempt != 1:
            out["attempt"] = self.attempt
        if self.kind != "node":
            out["kind"] = self.kind
        if self.parent is not None:
            out["parent"] = self.parent
            out["index"] = self.index
            out["input"] = self.input
        if self.first_seen is not None:
            out["firstSeen"] = self.first_seen
        if self.queue is not None:
            out["queue"] = self.queue
        out.update(self.extra)
        return out

    def to_json(self) -> str:
        return _compact_json(self.to_dict())

    @classmethod
    def from_json(cls, body: Any) -> "Job":
        """Parse a queue message; raise `MalformedJob` (and nothing else) saying what is wrong.

        Bounded by `MAX_JOB_BYTES` and `MAX_JOB_DEPTH`; see `load_job_json` and `from_dict`."""
        return cls.from_dict(load_job_json(body))

    @classmethod
    def from_dict(cls, data: Any) -> "Job":
        """Check every field: identities (`identity_problem`), whole numbers, the kind, and
        `firstSeen` (a finite number >= 0; one in the future is taken as now by the worker)."""
        if not isinstance(data, Mapping):
            raise MalformedJob(f"a job must be a JSON object, not {type(data).__name__}")
        missing = [k for k in ("runId", "blueprintId", "nodeId") if not isinstance(data.get(k), str) or not data.get(k)]
        if missing:
            raise MalformedJob(f"missing or empty field(s) {missing}")
        for name in ("runId", "blueprintId", "nodeId", "parent", "queue"):
            problem = identity_problem(data[name]) if data.get(name) is not None else None
            if problem is not None:
                raise MalformedJob(f"field {name!r} {problem}")
        iteration = _whole_number("iteration", data.get("iteration", 0))
        attempt = _whole_number("attempt", data.get("attempt", 1))
        index = data.get("index")
        if index is not None:
            _whole_number("index", index)
        kind = data.get("kind", "node")
        if kind not in JOB_KINDS:
            raise MalformedJob(f"unknown job kind {_short(kind)}")
        if kind == "item" and (data.get("parent") is None or index is None):
            raise MalformedJob("an item job needs 'parent' and a whole-number 'index'")
        first_seen = data.get("firstSeen")
        if first_seen is not None and (type(first_seen) not in (int, float) or not 0 <= first_seen < math.inf):
            raise MalformedJob(f"field 'firstSeen' must be a finite number of seconds >= 0, not {_short(first_seen)}")
        return cls(
            run_id=data["runId"], blueprint_id=data["blueprintId"], node_id=data["nodeId"], iteration=iteration,
            attempt=max(1, attempt), kind=kind, parent=data.get("parent"), index=index, input=data.get("input"),
            first_seen=data.get("firstSeen"), extra={k: v for k, v in data.items() if k not in _JOB_FIELDS},
            queue=data.get("queue"),
        )

    def with_(self, **changes: Any) -> "Job":
        return attrs.evolve(self, **changes)


def job_node_id(job: Job) -> str:
    """The graph node a job is for: a batch item's `parent` (the batch node), else its `node_id`."""
    if job.kind == "item" and job.parent is not None:  # `Job.from_dict` requires the parent of an item
        return job.parent
    return job.node_id


@attrs.define
class Delivery:
    """A message taken from the queue: its `job`, or the `error` that made it unreadable."""

    body: bytes
    tag: Any
    job: Optional[Job] = None
    error: Optional[str] = None
    redelivered: bool = False
    acked: bool = False  # acknowledged already, by the commit that carried it (see `RunStore.acks_in_commit`)

    @classmethod
    def parse(cls, body: Any, tag: Any, redelivered: bool = False) -> "Delivery":
        """A delivery of `body`; never raises: an unreadable body gives a delivery with an `error`."""
        if isinstance(body, (bytes, bytearray, memoryview)):
            raw = bytes(body)
        elif isinstance(body, str):
            raw = body.encode("utf-8", "surrogatepass")  # a lone surrogate then fails as invalid UTF-8
        else:
            return cls(b"", tag, None, f"a job body must be bytes or text, not {type(body).__name__}", redelivered)
        try:
            return cls(raw, tag, Job.from_json(raw), None, redelivered)
        except MalformedJob as exc:
            return cls(raw, tag, None, str(exc), redelivered)

    def identity_hint(self) -> Optional[Tuple[str, str, str]]:
        """(runId, blueprintId, nodeId) of an unreadable message when all three can still be read
        out of it as valid identities (`nodeId` is `parent` for an item job); else None."""
        try:
            data = load_job_json(self.body)
        except MalformedJob:
            return None
        if not isinstance(data, dict):
            return None
        node_field = "parent" if data.get("kind") == "item" else "nodeId"
        found = tuple(data.get(k) for k in ("runId", "blueprintId", node_field))
        return found if all(identity_problem(v) is None for v in found) else None  # type: ignore[return-value]

    def run_id_hint(self) -> Optional[str]:
        """The run id of an unreadable message, when one can still be read out of it."""
        try:
            data = load_job_json(self.body)
        except MalformedJob:
            return None
        run_id = data.get("runId") if isinstance(data, dict) else None
        return run_id if identity_problem(run_id) is None else None


@attrs.frozen
class WorkerInfo:
    """A live worker as its queue can tell it: an id (a broker that names none numbers its
    consumers), the queue (its first), when it was last seen (epoch seconds, None: unknown), a
    detail, and every queue it serves in its priority order (empty: just `queue`)."""

    id: str
    queue: str
    last_seen: Optional[float] = None
    detail: str = ""
    queues: Tuple[str, ...] = ()

    @property
    def served(self) -> Tuple[str, ...]:
        return self.queues or (self.queue,)

    def to_dict(self) -> Dict[str, Any]:
        return attrs.asdict(self)


class JobQueue(Protocol):
    """A queue may also offer ``requeue(jobs, delay=0.0)``: `enqueue` for the reconciler, which
    must not trust a belief that a job already waits without checking it (default: `enqueue`),
    ``depth(queue=None)`` (jobs ready on a queue, default: the default one), ``live_workers(queues=())
    -> list of WorkerInfo`` (every worker of the backend, whatever queues it serves, as far as it
    can tell; `queues`: names to look at too, for a broker that only counts consumers per queue)
    and ``queue_name_problem(name) -> str or None`` (why the backend cannot use a queue name).

    Routing (SPEC 14): `enqueue` puts each job on the queue its `queue` names (None: the default
    queue, the attribute ``queue_name``); `fetch` takes from the queues the worker serves (the
    attribute ``queues``, in priority order: a job of an earlier one first).

    What a worker uses when the queue offers it (the core's `DistributedAdapter` asks for each;
    an adapter wires its ports and subclasses nothing): ``give_back(deliveries)`` (unstarted
    deliveries back to the front), ``hold(count, commits_take)`` (the next fetch asks for
    `count`: take no more ahead of it, in a prefetch window or with commits), ``release()`` (the
    worker loop ends: give back what was taken ahead and not handed out), ``recover()`` (the
    service answers again after an outage: give back what this worker held), ``lane()`` (the
    same queue for another worker thread, when its client is not thread-safe; closed with
    `close()`), ``take_abandoned()`` and ``reconcile_pass()`` (see `distributed.Reconciler`)."""

    def enqueue(self, jobs: Sequence[Job], delay: float = 0.0) -> None:
        """Make jobs deliverable now, or after `delay` seconds. Durable once it returns."""

    def fetch(self, max_jobs: int = 1, timeout: float = 1.0) -> List[Delivery]:
        """Take up to `max_jobs` deliveries, waiting up to `timeout` seconds for the first."""

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """The deliveries are done with; they are never delivered again."""

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a delivery to the dead-letter queue with the reason (and ack it)."""

    def close(self) -> None: ...


# --- the run store --------------------------------------------------------------------------


@attrs.define
class RunRecord:
    """A run's metadata and traversal bookkeeping (everything but its context)."""

    run_id: str
    blueprint_id: Optional[str] = None
    blueprint_version: Optional[str] = None
    status: str = "running"
    version: int = 0  # bumped by every commit; 0 = never initialised by a worker
    outstanding: int = 0
    awaiting: Dict[str, Any] = attrs.field(factory=dict)
    errors: List[Dict[str, Any]] = attrs.field(factory=list)
    parent: Optional[Dict[str, Any]] = None  # for a subflow's child run: the parent's run, node, iteration
    updated_at: float = 0.0
    result: Optional[Dict[str, Any]] = None
    # `blueprint_digest` of the blueprint the run started with; None: not recorded (a seed client's
    # run, or one started before digests were recorded), and then not checked
    blueprint_digest: Optional[str] = None
    # the W3C trace context current when the run started (SPEC 13), opaque to the core; jobs carry
    # it as `traceparent`, and jobs made from the record alone (reconcile, resume) take it from here
    traceparent: Optional[str] = None
    # when (epoch seconds) the run fails with `DeadlineExceeded` unless it ended (SPEC 14; `deadlines`)
    deadline_at: Optional[float] = None


def copy_record(record: RunRecord) -> RunRecord:
    """A copy whose `awaiting` and `errors` can change without touching `record` (a worker copies
    the loaded record once per node execution; this is cheaper than `attrs.evolve`)."""
    return RunRecord(record.run_id, record.blueprint_id, record.blueprint_version, record.status, record.version,
                     record.outstanding, dict(record.awaiting), list(record.errors), record.parent, record.updated_at,
                     record.result, record.blueprint_digest, record.traceparent, record.deadline_at)


@attrs.define
class RunSnapshot:
    """What a worker loaded for one decision: the record, some node states, some context keys."""

    record: RunRecord
    states: Dict[str, Dict[str, Any]] = attrs.field(factory=dict)
    context: Dict[str, Any] = attrs.field(factory=dict)
    whole: bool = False  # states and context hold all of the run's (a load that asked for everything)
    # item fields written by earlier commits of the same wave segment, not yet in the store
    # (`batching.advance`); a store's load leaves it empty
    pending_items: Dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class Counter:
    """A count a commit adds `delta` to, atomically (an item field of its own): a join's arrivals, a
    batch's finished items. The commit whose add makes it reach `threshold` (below it before, at or
    above it after: exactly one commit does) also adds `reserve` to the run's outstanding count and
    makes `job` deliverable, in the same atomic step."""

    field: str
    delta: int
    threshold: int
    job: Optional[Job] = None
    reserve: int = 0


@attrs.define
class Commit:
    """Everything one decision changes in a run, applied atomically, or not at all.

    Two kinds, as the core decides (`plan.CommitPlan`):

    - a *run commit* (`expected_version` set) changes the run's record (status, awaiting, errors,
      result) and applies iff the run's version is still `expected_version`;
    - a *node commit* (`expected_version` None) is what one node execution touches: it applies iff
      the run is still running or awaiting, every node state in `guards` is still as loaded (None:
      not stored) and no item field of `unset_items` is stored. It writes none of the record but
      `updated_at`, adds `outstanding_delta` to the run's outstanding count and bumps the version,
      without checking it: node commits of one run never conflict unless they touch the same node.

    Both kinds apply their `counters`. `jobs` become durable with the commit (in the queue, or an
    outbox the driver publishes from right after). A store that applies a commit sets
    `outstanding_after` and `awaiting_after`: the run's outstanding count and awaiting nodes as the
    commit left them (the driver settles the run when nothing but parked nodes is outstanding),
    and `reached`."""

    run_id: str
    expected_version: Optional[int]
    record: RunRecord  # the new record (status, outstanding, awaiting, errors, result...)
    context_set: Dict[str, Any] = attrs.field(factory=dict)
    context_delete: List[str] = attrs.field(factory=list)
    states: Dict[str, Dict[str, Any]] = attrs.field(factory=dict)
    items: Dict[str, Any] = attrs.field(factory=dict)  # batch item results and inputs, join arrivals, by field name
    jobs: List[Job] = attrs.field(factory=list)
    delayed: List[Tuple[Job, float]] = attrs.field(factory=list)
    ack: List[Delivery] = attrs.field(factory=list)  # deliveries a store may ack within the commit
    guards: Dict[str, Optional[Dict[str, Any]]] = attrs.field(factory=dict)
    unset_items: List[str] = attrs.field(factory=list)
    counters: List[Counter] = attrs.field(factory=list)
    outstanding_delta: int = 0
    # the run's history events this commit appends (`{"type", "payload"}`, JSON), in the same atomic step
    history: List[Dict[str, Any]] = attrs.field(factory=list)
    outstanding_after: Optional[int] = None
    awaiting_after: Optional[Dict[str, Any]] = None
    reached: List[Counter] = attrs.field(factory=list)  # set by the store: the counters this commit made reach

    def made_jobs(self) -> List[Job]:
        """The jobs an applied commit made deliverable now: its own and those of the counters it made reach."""
        return self.jobs + [c.job for c in self.reached if c.job is not None]

    @property
    def node_commit(self) -> bool:
        return self.expected_version is None


def counter_reached(before: int, after: int, threshold: int) -> bool:
    """Whether a count going from `before` to `after` reaches `threshold` (the rule every store applies)."""
    return before < threshold <= after


# How many commits' history a store keeps per run (the newest; see `RunStore.read_history`).
HISTORY_CAP = 10_000


class RunStore(Protocol):
    """A store whose attribute `acks_in_commit` is true removes the deliveries in a commit's `ack`
    from the queue inside the commit, when it can, and then sets their `acked` (the driver does not
    acknowledge them again); other stores get no deliveries in `ack`.

    Optional, as for `JobQueue`: ``lane()`` (the same store for another worker thread),
    ``worker_session(queue)`` (a context manager around a worker loop on `queue`),
    ``sweep_outbox(threshold, queue, limit)`` (see `distributed.Reconciler`) and ``close()``."""

    def create_run(self, record: RunRecord, context: Mapping[str, Any], states: Mapping[str, Dict[str, Any]], jobs: Sequence[Job],
                   history: Sequence[Dict[str, Any]] = ()) -> bool:
        """Create a run with its first jobs (and the first events of its history); False (and
        nothing written) if the run exists."""

    def read_history(self, run_id: str) -> List[Dict[str, Any]]:
        """The run's history events in commit order: those of its newest `HISTORY_CAP` commits."""

    def load(self, run_id: str, node_ids: Iterable[str], context_keys: Iterable[str]) -> Optional[RunSnapshot]:
        """The run's record with the given node states and context keys; None for an unknown run.

        A run whose context exists but was never initialised (started by a seed client) comes back
        with `record.version == 0`."""

    def load_many(self, requests: Sequence[Tuple[str, Optional[Sequence[str]], Optional[Sequence[str]]]]) -> List[Optional[RunSnapshot]]:
        """`load` for several `(run_id, node_ids, context_keys)` at once (one round trip where the
        store can), in the order asked.

        A store whose attribute `whole_loads` is true also takes None for both node_ids and
        context_keys: every node state and the whole context, in a snapshot with `whole` set (a
        worker asks so for the jobs likely to end a run, which need all of it)."""

    def read_states(self, run_id: str, node_ids: Iterable[str]) -> Dict[str, Dict[str, Any]]: ...

    def read_all_states(self, run_id: str) -> Dict[str, Dict[str, Any]]: ...

    def read_context(self, run_id: str, keys: Iterable[str]) -> Dict[str, Any]: ...

    def read_all_context(self, run_id: str) -> Dict[str, Any]: ...

    def read_items(self, run_id: str, fields: Sequence[str]) -> List[Any]:
        """Item fields in the order asked (None where missing)."""

    def commit(self, commit: Commit) -> bool:
        """Apply atomically iff its checks hold (see `Commit`); False otherwise (nothing written).
        An applied commit gets `outstanding_after` and `awaiting_after` set.

        Raises `flowcraft.errors.StoreRejected` (nothing written) when the store cannot hold what
        the commit carries; `ConnectionError` only for outages."""

    def commit_many(self, commits: Sequence[Commit]) -> List[bool]:
        """`commit` each, in order (each atomic on its own; one round trip where the store can).

        Raises `StoreRejected` (nothing written) when one of them cannot be held; the driver then
        commits them one by one to find the run at fault."""

    def publish_outbox(self, run_id: str, queue: JobQueue) -> int:
        """Publish jobs committed but not yet in the queue; return how many (0 where the store
        enqueues within the commit)."""

    def publish_outboxes(self, run_ids: Sequence[str], queue: JobQueue) -> int:
        """`publish_outbox` for several runs (one publish round where the store can)."""

    def get_record(self, run_id: str) -> Optional[RunRecord]: ...

    def touch(self, run_id: str, updated_at: float) -> None:
        """Refresh a `running` run's `updated_at` without a new version, so that bookkeeping such
        as reconciling never makes a worker's commit conflict."""

    def idle_runs(self, idle_seconds: float, limit: int = 1000) -> Tuple[int, List[str]]:
        """(how many runs were looked at, the ids of those still `running` whose record was not
        updated for `idle_seconds`)."""


class CoordinationStore(Protocol):
    """The Flowcraft TS coordination methods."""

    def increment(self, key: str, ttl: float) -> int: ...

    def set_if_not_exist(self, key: str, value: str, ttl: float) -> bool: ...

    def extend_ttl(self, key: str, ttl: float) -> bool: ...

    def delete(self, key: str) -> None: ...

    def get(self, key: str) -> Optional[str]: ...


@attrs.frozen
class RunStatus:
    run_id: str
    status: str
    updated_at: float
    result: Optional[Dict[str, Any]] = None


def item_field(parent: str, iteration: int, index: int) -> str:
    """The store field of batch item `index` of `parent` at `iteration`."""
    return f"item:{parent}:{iteration}:{index}"
