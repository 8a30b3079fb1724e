"""In-memory fakes of the three distributed ports, and `InMemoryAdapter` with fault injection.

The fakes behave like the real services where it matters for correctness: messages are JSON bytes,
unacknowledged deliveries come back when a worker dies, stored values are copies (a JSON round
trip), and a commit is all-or-nothing under a version check. They also count what tests need to
prove the guarantees: how often each node execution was committed and each node made ready.
"""
from __future__ import annotations

import copy
import heapq
import itertools
import json
import random
import threading
import time
from collections import Counter, deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import attrs

from ..distributed import DistributedAdapter, WorkerCrash
from ..errors import StoreRejected
from ..operations import DeadLetter, RunPage, list_in_memory
from ..ports import HISTORY_CAP, Commit, Delivery, Job, RunRecord, RunSnapshot, WorkerInfo, counter_reached

CRASH_POINTS = ("before_execute", "after_execute", "after_commit", "after_publish", "before_ack")


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


class InMemoryQueue:
    """A job queue with delays, unacknowledged deliveries and a dead-letter list.

    It holds named queues (SPEC 14 routing): a job goes to the one its `queue` names (None: the
    default, `queue_name`); `fetch` takes from `queues`, in that priority order. `serve(queues)`
    is a view on the same queues for a worker serving others (the fakes' workers share one queue)."""

    def __init__(self, *, duplicate_rate: float = 0.0, reorder: bool = False, seed: int = 0,
                 clock: Callable[[], float] = time.time, queues: Optional[Sequence[str]] = None) -> None:
        self.queue_name = "in-memory"
        self._ready: Dict[str, Deque[Tuple[bytes, bool]]] = {}
        self._delayed: List[Tuple[float, int, bytes, str]] = []
        self._unacked: Dict[int, Tuple[bytes, str]] = {}
        self._tags = itertools.count(1)
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._rng = random.Random(seed)
        self.duplicate_rate = duplicate_rate
        self.reorder = reorder
        self.clock = clock
        self.dead: List[Tuple[bytes, str]] = []
        self._dead_meta: List[Tuple[str, float]] = []  # (id, dead_at) of each entry of `dead`, aligned
        self._dead_ids = itertools.count(1)
        self.delivered = 0
        self.live_window = 10.0  # a thread that fetched this recently counts as a live worker
        # (thread name, queues served) -> when it last fetched: one thread may play workers of several queues
        self._fetchers: Dict[Tuple[str, Tuple[str, ...]], float] = {}
        self.queues: Tuple[str, ...] = _served(queues, self.queue_name)

    def serve(self, queues: Sequence[str]) -> "InMemoryQueue":
        """A view of this queue (the same jobs, deliveries and dead letters) that fetches from `queues`."""
        view = copy.copy(self)
        view.queues = _served(queues, self.queue_name)
        return view

    def _list(self, name: Optional[str]) -> Deque[Tuple[bytes, bool]]:
        return self._ready.setdefault(name or self.queue_name, deque())

    def enqueue(self, jobs: Sequence[Job], delay: float = 0.0) -> None:
        with self._cond:
            for job in jobs:
                self._put(job.to_json().encode(), delay, job.queue)
            self._cond.notify_all()

    def push_raw(self, body: bytes, queue: Optional[str] = None) -> None:
        """Publish a raw message, as a foreign client (or a broken one) would."""
        with self._cond:
            self._put(body, 0.0, queue)
            self._cond.notify_all()

    def _put(self, body: bytes, delay: float, queue: Optional[str]) -> None:
        name = queue or self.queue_name
        if delay > 0:
            heapq.heappush(self._delayed, (self.clock() + delay, next(self._seq), body, name))
        else:
            self._list(name).append((body, False))

    def _promote_due(self) -> None:
        now = self.clock()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, body, name = heapq.heappop(self._delayed)
            self._list(name).append((body, False))

    def _first_ready(self) -> Optional[Tuple[str, Deque[Tuple[bytes, bool]]]]:
        for name in self.queues:
            ready = self._ready.get(name)
            if ready:
                return name, ready
        return None

    def fetch(self, max_jobs: int = 1, timeout: float = 1.0) -> List[Delivery]:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._fetchers[(threading.current_thread().name, self.queues)] = self.clock()
            while True:
                self._promote_due()
                found = self._first_ready()
                if found is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                if self._delayed:
                    remaining = min(remaining, max(0.001, self._delayed[0][0] - self.clock()))
                self._cond.wait(remaining)
            name, ready = found
            if self.reorder and len(ready) > 1:
                items = list(ready)
                self._rng.shuffle(items)
                ready.clear()
                ready.extend(items)
            out: List[Delivery] = []
            while len(out) < max_jobs and found is not None:
                name, ready = found
                body, redelivered = ready.popleft()
                tag = next(self._tags)
                self._unacked[tag] = (body, name)
                out.append(Delivery.parse(body, tag, redelivered))
                if self.duplicate_rate and self._rng.random() < self.duplicate_rate:
                    ready.append((body, True))  # the broker delivers this message once more
                found = self._first_ready()
            self.delivered += len(out)
            return out

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        with self._cond:
            for delivery in deliveries:
                self._unacked.pop(delivery.tag, None)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        with self._cond:
            self.dead.append((delivery.body, reason))
            self._dead_meta.append((str(next(self._dead_ids)), self.clock()))
            self._unacked.pop(delivery.tag, None)

    def _put_back(self, entries: List[Tuple[bytes, str]]) -> None:
        for body, name in reversed(entries):
            self._list(name).appendleft((body, True))
        self._cond.notify_all()

    def give_back(self, deliveries: Sequence[Delivery]) -> None:
        """Unacknowledged deliveries the worker will not start: back at the head of their queue."""
        with self._cond:
            self._put_back([self._unacked.pop(d.tag) for d in deliveries if d.tag in self._unacked])

    def list_dead_letters(self, limit: Optional[int] = 100) -> List[DeadLetter]:
        """The dead letters, oldest first (at most `limit`; None: all)."""
        with self._cond:
            entries = list(zip(self.dead, self._dead_meta))[:limit]
        return [DeadLetter(i, body, reason, Delivery.parse(body, None).run_id_hint(), at)
                for (body, reason), (i, at) in entries]

    def remove_dead_letter(self, dead_letter_id: str, publish: bool = True, queue: Optional[str] = None) -> bool:
        """Take a dead letter out (and publish its body again, on `queue`, when `publish`); False if unknown."""
        with self._cond:
            for n, (i, _) in enumerate(self._dead_meta):
                if i == dead_letter_id:
                    body, _ = self.dead.pop(n)
                    del self._dead_meta[n]
                    if publish:
                        self._put(body, 0.0, queue)
                        self._cond.notify_all()
                    return True
            return False

    def purge_dead_letters(self) -> int:
        with self._cond:
            count = len(self.dead)
            self.dead.clear()
            self._dead_meta.clear()
            return count

    def live_workers(self, queues: Sequence[str] = ()) -> List[WorkerInfo]:
        """The threads that fetched within `live_window` seconds (the fakes' workers are threads)."""
        now = self.clock()
        with self._cond:
            return [WorkerInfo(name, queues[0], seen, "fetched recently", queues)
                    for (name, queues), seen in sorted(self._fetchers.items()) if now - seen <= self.live_window]

    def forget_workers(self) -> None:
        """No thread fetched yet (as when the workers that did are gone)."""
        with self._cond:
            self._fetchers.clear()

    def requeue_unacked(self) -> int:
        """What a broker does when a worker dies: its unacknowledged deliveries come back first."""
        with self._cond:
            entries = list(self._unacked.values())
            self._unacked.clear()
            self._put_back(entries)
            return len(entries)

    def close(self) -> None:
        return None

    @property
    def pending(self) -> int:
        """Jobs not done with: ready on any queue, delayed, or unacknowledged."""
        with self._cond:
            return sum(len(r) for r in self._ready.values()) + len(self._delayed) + len(self._unacked)

    def depth(self, queue: Optional[str] = None) -> int:
        """Jobs ready to be taken now on `queue` (default: the default queue; not delayed, not in a
        worker's hands): the queue's depth."""
        with self._cond:
            return len(self._ready.get(queue or self.queue_name, ()))

    def queue_name_problem(self, name: str) -> Optional[str]:
        return None  # any name is a queue here

    @property
    def next_due_in(self) -> Optional[float]:
        with self._cond:
            return max(0.0, self._delayed[0][0] - self.clock()) if self._delayed else None


def _served(queues: Optional[Sequence[str]], default: str) -> Tuple[str, ...]:
    """The queues a worker serves, checked: a non-empty list of names (None: the default queue)."""
    if queues is None:
        return (default,)
    if isinstance(queues, str) or not queues or not all(isinstance(q, str) and q for q in queues):
        raise ValueError(f"queues must be a non-empty list of queue names, not {queues!r}")
    return tuple(dict.fromkeys(queues))


@attrs.define
class _StoredRun:
    record: RunRecord
    context: Dict[str, Any] = attrs.field(factory=dict)
    states: Dict[str, Dict[str, Any]] = attrs.field(factory=dict)
    items: Dict[str, Any] = attrs.field(factory=dict)
    outbox: List[Tuple[Job, float]] = attrs.field(factory=list)
    history: Deque[List[Dict[str, Any]]] = attrs.field(factory=lambda: deque(maxlen=HISTORY_CAP))  # a list per commit
    created_at: float = 0.0


class InMemoryRunStore:
    """Runs in a dict, changed only by version-checked commits under one lock.

    `reject_marker`: a string this store cannot hold, as a real store cannot hold some values (a
    NUL in PostgreSQL, a value past a size bound): a commit (or a new run) carrying it anywhere is
    refused with `StoreRejected` naming what holds it, and nothing of it is written."""

    whole_loads = True

    def __init__(self, clock: Callable[[], float] = time.time, *, reject_marker: Optional[str] = None) -> None:
        self.reject_marker = reject_marker
        self._runs: Dict[str, _StoredRun] = {}
        self._lock = threading.RLock()
        self.clock = clock
        self.completions: Counter = Counter()  # (run, node, iteration) -> commits that marked it done
        self.activations: Counter = Counter()  # (run, node, iteration) -> commits that made it ready
        self.commits = 0

    def seed_run(self, run_id: str, context: Mapping[str, Any]) -> None:
        """A run as a seed client creates it: a context and a `running` status, nothing else."""
        with self._lock:
            now = self.clock()
            self._runs[run_id] = _StoredRun(RunRecord(run_id, updated_at=now), _copy(dict(context)), created_at=now)

    def _refuse(self, run_id: str, parts: Iterable[Tuple[str, Any]]) -> None:
        marker = self.reject_marker
        if marker is None:
            return
        for name, value in parts:
            if marker in json.dumps(value, ensure_ascii=False):
                raise StoreRejected(f"run {run_id}: the store cannot hold {name}", run_id)

    def _refuse_commit(self, commit: Commit) -> None:
        if self.reject_marker is None:
            return
        record = commit.record
        self._refuse(commit.run_id, [*((f"the value of {k!r}", v) for k, v in commit.context_set.items()),
                                     *((f"the item {k!r}", v) for k, v in commit.items.items()),
                                     ("the run's errors", record.errors), ("the run's result", record.result),
                                     ("a job", [j.to_dict() for j in commit.jobs]),
                                     ("a job", [j.to_dict() for j, _ in commit.delayed])])

    def create_run(self, record: RunRecord, context: Mapping[str, Any], states: Mapping[str, Dict[str, Any]], jobs: Sequence[Job],
                   history: Sequence[Dict[str, Any]] = ()) -> bool:
        self._refuse(record.run_id, [(f"the value of {k!r}", v) for k, v in context.items()])
        with self._lock:
            if record.run_id in self._runs:
                return False
            self._runs[record.run_id] = _StoredRun(_copy_record(record), _copy(dict(context)), _copy(dict(states)),
                                                   outbox=[(j, 0.0) for j in jobs], created_at=record.updated_at)
            if history:
                self._runs[record.run_id].history.append(_copy(list(history)))
            for node_id, state in states.items():
                if state.get("st") == "ready":
                    self.activations[(record.run_id, node_id, state.get("it", 0))] += 1
            return True

    def load(self, run_id: str, node_ids: Optional[Iterable[str]], context_keys: Optional[Iterable[str]]) -> Optional[RunSnapshot]:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None
            if node_ids is None and context_keys is None:
                return RunSnapshot(_copy_record(run.record), _copy(run.states), _copy(run.context), whole=True)
            states = {n: _copy(run.states[n]) for n in node_ids or () if n in run.states}
            context = {k: _copy(run.context[k]) for k in context_keys or () if k in run.context}
            return RunSnapshot(_copy_record(run.record), states, context)

    def load_many(self, requests: Sequence[Tuple[str, Optional[Sequence[str]], Optional[Sequence[str]]]]) -> List[Optional[RunSnapshot]]:
        return [self.load(run_id, node_ids, keys) for run_id, node_ids, keys in requests]

    def read_states(self, run_id: str, node_ids: Iterable[str]) -> Dict[str, Dict[str, Any]]:
        with self._lock:
            run = self._runs[run_id]
            return {n: _copy(run.states[n]) for n in node_ids if n in run.states}

    def read_all_states(self, run_id: str) -> Dict[str, Dict[str, Any]]:
        with self._lock:
            return _copy(self._runs[run_id].states)

    def read_context(self, run_id: str, keys: Iterable[str]) -> Dict[str, Any]:
        with self._lock:
            context = self._runs[run_id].context
            return {k: _copy(context[k]) for k in keys if k in context}

    def read_all_context(self, run_id: str) -> Dict[str, Any]:
        with self._lock:
            return _copy(self._runs[run_id].context)

    def read_history(self, run_id: str) -> List[Dict[str, Any]]:
        with self._lock:
            run = self._runs.get(run_id)
            return [_copy(event) for events in run.history for event in events] if run is not None else []

    def read_items(self, run_id: str, fields: Sequence[str]) -> List[Any]:
        with self._lock:
            items = self._runs[run_id].items
            return [_copy(items[f]) if f in items else None for f in fields]

    def commit(self, commit: Commit) -> bool:
        self._refuse_commit(commit)
        with self._lock:
            run = self._runs.get(commit.run_id)
            if run is None or not self._checks_hold(run, commit):
                return False
            for node_id, state in commit.states.items():
                before = run.states.get(node_id, {})
                key = (commit.run_id, node_id, state.get("it", 0))
                if state.get("st") == "done" and (before.get("st") != "done" or before.get("it") != state.get("it")):
                    self.completions[key] += 1
                if state.get("st") == "ready" and (before.get("st") != "ready" or before.get("it") != state.get("it")):
                    self.activations[key] += 1
            if commit.node_commit:  # the record is the stored one: its updated_at, version and count change
                record = run.record
                record.version += 1
                record.updated_at = commit.record.updated_at
                record.outstanding += commit.outstanding_delta
            else:
                record = _copy_record(commit.record)
                record.version = commit.expected_version + 1  # type: ignore[operator]  # a run commit has one
                run.record = record
            run.context.update(_copy(commit.context_set))
            for name in commit.context_delete:
                run.context.pop(name, None)
            run.states.update(_copy(commit.states))
            run.items.update(_copy(commit.items))
            run.outbox.extend((j, 0.0) for j in commit.jobs)
            run.outbox.extend(commit.delayed)
            if commit.history:
                run.history.append(_copy(commit.history))
            for counter in commit.counters:
                count = int(run.items.get(counter.field) or 0)
                run.items[counter.field] = count + counter.delta
                if counter_reached(count, count + counter.delta, counter.threshold):
                    commit.reached.append(counter)
                    record.outstanding += counter.reserve
                    if counter.job is not None:
                        run.outbox.append((counter.job, 0.0))
                        if counter.reserve:  # the job that resolves a join: it is made ready
                            self.activations[(commit.run_id, counter.job.node_id, counter.job.iteration)] += 1
            commit.outstanding_after = record.outstanding
            commit.awaiting_after = _copy(record.awaiting)
            self.commits += 1
            return True

    @staticmethod
    def _checks_hold(run: "_StoredRun", commit: Commit) -> bool:
        if not commit.node_commit:
            return run.record.version == commit.expected_version
        if run.record.status not in ("running", "awaiting"):
            return False
        if any(run.states.get(node_id) != guard for node_id, guard in commit.guards.items()):
            return False
        return not any(field in run.items for field in commit.unset_items)

    def commit_many(self, commits: Sequence[Commit]) -> List[bool]:
        for commit in commits:  # all refused, nothing written, when one cannot be held
            self._refuse_commit(commit)
        return [self.commit(c) for c in commits]

    def publish_outbox(self, run_id: str, queue: Any) -> int:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or not run.outbox:
                return 0
            entries, run.outbox = run.outbox, []
        for job, delay in entries:
            queue.enqueue([job], delay)
        return len(entries)

    def publish_outboxes(self, run_ids: Sequence[str], queue: Any) -> int:
        return sum(self.publish_outbox(run_id, queue) for run_id in run_ids)

    def get_record(self, run_id: str) -> Optional[RunRecord]:
        with self._lock:
            run = self._runs.get(run_id)
            return _copy_record(run.record) if run is not None else None

    def touch(self, run_id: str, updated_at: float) -> None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None and run.record.status == "running":
                run.record.updated_at = updated_at

    def idle_runs(self, idle_seconds: float, limit: int = 1000) -> Tuple[int, List[str]]:
        with self._lock:
            now = self.clock()
            runs = list(self._runs.values())
            idle = [r.record.run_id for r in runs if r.record.status == "running" and now - r.record.updated_at >= idle_seconds]
            return len(runs), idle[:limit]

    def list_runs(self, status: Optional[str] = None, blueprint_id: Optional[str] = None, since: Optional[float] = None,
                  until: Optional[float] = None, limit: int = 50, cursor: Optional[str] = None) -> RunPage:
        with self._lock:
            return list_in_memory(((r.record, r.created_at) for r in self._runs.values()), status, blueprint_id,
                                  since, until, limit, cursor)

    def prune(self, updated_before: float, statuses: Sequence[str]) -> int:
        """Delete the runs in `statuses` last updated before `updated_before`; return how many."""
        with self._lock:
            doomed = [k for k, r in self._runs.items()
                      if r.record.status in statuses and r.record.updated_at < updated_before]
            for run_id in doomed:
                del self._runs[run_id]
            return len(doomed)

    def run_ids(self) -> List[str]:
        with self._lock:
            return list(self._runs)


def _copy_record(record: RunRecord) -> RunRecord:
    return RunRecord(**_copy(attrs.asdict(record)))


class InMemoryCoordinationStore:
    """Counters and markers with a TTL (the Flowcraft TS coordination methods)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._data: Dict[str, Tuple[str, Optional[float]]] = {}
        self._lock = threading.Lock()
        self.clock = clock

    def _live(self, key: str) -> Optional[Tuple[str, Optional[float]]]:
        entry = self._data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= self.clock():
            del self._data[key]
            return None
        return entry

    def _expiry(self, ttl: Optional[float]) -> Optional[float]:
        return self.clock() + ttl if ttl else None

    def increment(self, key: str, ttl: float) -> int:
        with self._lock:
            entry = self._live(key)
            value = int(entry[0]) + 1 if entry else 1
            self._data[key] = (str(value), self._expiry(ttl))
            return value

    def set_if_not_exist(self, key: str, value: str, ttl: float) -> bool:
        with self._lock:
            if self._live(key) is not None:
                return False
            self._data[key] = (str(value), self._expiry(ttl))
            return True

    def extend_ttl(self, key: str, ttl: float) -> bool:
        with self._lock:
            entry = self._live(key)
            if entry is None:
                return False
            self._data[key] = (entry[0], self._expiry(ttl))
            return True

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def get(self, key: str) -> Optional[str]:
        with self._lock:
            entry = self._live(key)
            return entry[0] if entry else None


class InMemoryAdapter(DistributedAdapter):
    """A `DistributedAdapter` over the in-memory fakes, with fault injection for tests.

    `crash_at` names crash points (`CRASH_POINTS`); at each, the worker "dies" with probability
    `crash_rate` (seeded): the job in hand is not acknowledged, the broker hands it back, and a
    fresh worker carries on. `duplicate_rate` makes the queue deliver messages twice, `reorder`
    shuffles deliveries.
    """

    queue: InMemoryQueue

    def __init__(
        self, runtime: Any, *, crash_at: Iterable[str] = (), crash_rate: float = 1.0, max_crashes: Optional[int] = None,
        duplicate_rate: float = 0.0, reorder: bool = False, seed: int = 0, queues: Optional[Sequence[str]] = None,
        **options: Any,
    ) -> None:
        unknown = set(crash_at) - set(CRASH_POINTS)
        if unknown:
            raise ValueError(f"unknown crash point(s) {sorted(unknown)}; known: {CRASH_POINTS}")
        queue = InMemoryQueue(duplicate_rate=duplicate_rate, reorder=reorder, seed=seed, queues=queues)
        super().__init__(runtime, queue, InMemoryRunStore(), InMemoryCoordinationStore(), **options)
        self.crash_at: Set[str] = set(crash_at)
        self.crash_rate = crash_rate
        self.max_crashes = max_crashes
        self.crashes: Counter = Counter()
        self._rng = random.Random(seed)

    def _fault(self, point: str) -> None:
        if point not in self.crash_at:
            return
        if self.max_crashes is not None and sum(self.crashes.values()) >= self.max_crashes:
            return
        if self._rng.random() < self.crash_rate:
            self.crashes[point] += 1
            raise WorkerCrash(point)

    def work(self, burst: bool = False, max_jobs: Optional[int] = None) -> int:
        """Like `DistributedAdapter.work`, but a simulated crash only restarts the worker."""
        processed = 0
        while True:
            try:
                return processed + super().work(burst=burst, max_jobs=None if max_jobs is None else max_jobs - processed)
            except WorkerCrash:
                processed += 1
                self.queue.requeue_unacked()

    def drain(self, timeout: float = 30.0) -> int:
        """Work until no job is left, waiting for delayed ones; return how many deliveries ran."""
        processed = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            processed += self.work(burst=True)
            due = self.queue.next_due_in
            if due is None and self.queue.pending == 0:
                return processed
            time.sleep(min(due or 0.001, 0.05))
        raise TimeoutError(f"jobs still pending after {timeout}s")
