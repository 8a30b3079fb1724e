"""`RqQueue`: the `JobQueue` port on an RQ queue (the design is in `rq_adapter`'s module doc).

Every Flowcraft job becomes the RQ job ``run_node("<job JSON>")``. RQ jobs are created by one
server-side script, `lua/rq_publish.lua`, from the hash fields RQ's own ``Job.to_dict()`` gives (the way
RQ's ``enqueue(..., unique=True)`` does it): it checks the deterministic job id, takes the entry
off the outbox when it comes from there, writes the job hash and pushes the id onto RQ's queue (or
its scheduled registry) atomically, in one round trip, which the run store can pipeline with a
commit.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from enum import Enum
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import attrs
from rq import Queue, Retry
from rq.executions import ExecutionRegistry
from rq.job import Job as RqJob
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now

from flowcraft.operations import DeadLetter
from flowcraft.ports import Delivery, Job, WorkerInfo

from . import rq_jobs
from ._util import load_script, to_text, translate_errors
from .keys import QueueKeys, queue_name_problem, validate_simple
from .queue import served_queues
from .rq_settings import DEAD_LETTER_META_KEY, META_KEY, QUEUE_META_KEY, RqSettings, due_score

logger = logging.getLogger("flowcraft.redis.rq")

SCAN_CHUNK = 10_000  # ids per LRANGE when the reconciler scans RQ's queue list

RUN_NODE = f"{rq_jobs.run_node.__module__}.{rq_jobs.run_node.__qualname__}"


class Entry(NamedTuple):
    """A Flowcraft job to publish as an RQ job."""

    body: str
    job: Optional[Job]  # None: unreadable (a worker dead-letters it)
    due: Optional[float] = None  # unix time it is due at; None: now
    source: str = "-"  # "-": not from the outbox, "L": an outbox list value, "Z": an outbox delayed member
    member: Any = ""  # that outbox value or member


@attrs.define
class InFlight:
    """The RQ job a thread is running, and what the core asked of the queue while running it."""

    rq_job: Any
    delivery: Delivery
    retry_delay: Optional[float] = None
    dead_reason: Optional[str] = None
    node_failure: Optional[str] = None  # "<type>: <message>" and the traceback of the node that failed


class RqQueue:
    """The `JobQueue` port on an RQ queue: each job becomes the RQ job ``run_node(<job JSON>)``.

    Consuming is RQ's business (`RqAdapter.work()` runs an RQ worker), so `fetch` is not offered,
    `ack` does nothing (RQ finishes a job when its function returns) and `dead_letter` marks the
    running RQ job for RQ's FailedJobRegistry. `outbox` names the keys where the run store's
    commits leave their jobs (`RqRunStore`)."""

    def __init__(self, client: Any, queue_name: str = "flowcraft-queue", settings: RqSettings = RqSettings(),
                 queues: Optional[Sequence[str]] = None) -> None:
        self.client = client
        self.queue_name = validate_simple("queue name", queue_name)
        self.queues = served_queues(queues, queue_name)  # what a worker serves, in priority order
        self.settings = settings
        self._rq: Dict[str, Queue] = {}
        self.rq = self.rq_queue(queue_name)
        self.outbox = QueueKeys(f"{queue_name}.outbox", settings.prefix)
        intervals = list(settings.retry_intervals)
        self._retry = Retry(max=len(intervals), interval=intervals) if intervals else None
        self._meta = {META_KEY: settings.to_meta()}
        # a routed job's RQ job also names the queue its unrouted successors go to (its origin does not)
        self._routed_meta = dict(self._meta, **{QUEUE_META_KEY: queue_name})
        self._fixed_keys = [self.outbox.ready, self.outbox.delayed, self.rq.redis_queues_keys]
        self._publish = load_script(client, "rq_publish.lua")
        self._local = threading.local()

    def rq_queue(self, name: Optional[str]) -> Queue:
        """RQ's queue `name` (None: the default one)."""
        name = self.queue_name if name is None else name
        found = self._rq.get(name)
        if found is None:
            found = self._rq[name] = Queue(name, connection=self.client, serializer=JSONSerializer)
        return found

    def served(self) -> List[Queue]:
        """RQ's queues this worker serves (the default one first when it serves it too)."""
        return [self.rq_queue(name) for name in dict.fromkeys((self.queue_name, *self.queues))]

    def queue_name_problem(self, name: str) -> Optional[str]:
        return queue_name_problem(name)

    def job_id(self, job: Job) -> str:
        """The deterministic RQ job id of a Flowcraft job (the same for every enqueue of it)."""
        fields = (self.settings.prefix, job.kind, job.run_id, job.node_id, job.iteration, job.index, job.attempt)
        identity = "\x00".join("" if f is None else str(f) for f in fields)
        return f"fc-{_slug(job.queue or self.queue_name)}-{hashlib.sha1(identity.encode()).hexdigest()}"

    # --- producing ------------------------------------------------------------------------

    def enqueue(self, jobs: Sequence[Job], delay: float = 0.0) -> None:
        if not jobs or self._answers_retry(jobs, delay):
            return
        due = time.time() + float(delay) if delay and delay > 0 else None
        self.publish([Entry(j.to_json(), j, due) for j in jobs])

    @translate_errors
    def publish(self, entries: Sequence[Entry]) -> Tuple[int, int]:
        """Create the RQ jobs of `entries` in one script call (see `lua/rq_publish.lua`); return (RQ jobs
        created, entries left in the outbox)."""
        if not entries:
            return 0, 0
        keys, args = self.publish_call(entries)
        created, left, _ = self._publish(keys=keys, args=args)
        return int(created), int(left)

    # --- the reconciler's enqueue ---------------------------------------------------------

    def requeue(self, jobs: Sequence[Job], delay: float = 0.0) -> None:
        """`enqueue` for the reconciler (the core's optional `JobQueue.requeue`): a job whose RQ job
        hash says it waits is skipped only if it really waits or runs: in RQ's queue (or being
        taken from it), in the scheduled or deferred registry, or started with a heartbeat that has
        not expired. Otherwise (its id was taken off the queue, say, leaving the hash) it is
        enqueued anew under its own id.

        The costly check, that an id is in the queue list, is batched: within `reconcile_pass()`
        the queued-looking jobs of every run are collected and looked up by ONE chunked scan of the
        queue at the end of the pass, then an atomic LPOS confirms only the few the scan did not
        see. Outside a pass (one `adapter.reconcile(run_id)`), LPOS checks them at once. (Measured
        on a 100 000-id queue: an LPOS that misses blocks Redis 11.6 ms; the whole chunked scan
        takes 126 ms, in 10 short LRANGEs: cheaper from about 11 idle runs a pass.)"""
        if not jobs:
            return
        due = time.time() + float(delay) if delay and delay > 0 else None
        entries = [Entry(j.to_json(), j, due) for j in jobs]
        collected = getattr(self._local, "reconciling", None)
        unchecked = self._publish_checked(entries, "L" if collected is None else "R")
        if collected is not None:
            collected.extend(unchecked)

    @contextlib.contextmanager
    def reconcile_pass(self) -> Iterator[None]:
        """Within it (on this thread), `requeue` defers the queue-list check of queued-looking jobs
        to one scan at the end (see `requeue`)."""
        outer = getattr(self._local, "reconciling", None)
        if outer is not None:  # nested: the outer pass checks them
            yield
            return
        collected: List[Entry] = []
        self._local.reconciling = collected
        try:
            yield
        finally:
            self._local.reconciling = None
        if collected:
            lists = [q for e in collected if e.job is not None for q in [self.rq_queue(e.job.queue)]]
            seen = self._ids_in_lists({self.job_id(e.job) for e in collected if e.job is not None},
                                      [k for q in {q.name: q for q in lists}.values()
                                       for k in (q.key, q.intermediate_queue_key)])
            missing = [e for e in collected if e.job is not None and self.job_id(e.job) not in seen]
            if missing:  # lost, or moved while the scan ran: LPOS decides, atomically with the enqueue
                self._publish_checked(missing, "L")

    @translate_errors
    def take_abandoned(self) -> List[str]:
        """The run ids of the started RQ jobs of this queue whose RQ worker is gone, each such job
        taken off RQ's StartedJobRegistry and filed failed (abandoned), so that the reconciler
        enqueues its node again at once instead of waiting for the job's heartbeat (the job
        timeout + 60 s, 420 s with no timeout) and a registry maintenance (every 600 s).

        An RQ worker names its Redis connection after itself (``CLIENT SETNAME``, at its start): a
        worker is gone when no connection of that name is left (`CLIENT LIST`) and, when it ran on
        this host, its process no longer exists (a live worker whose connection was re-opened has
        lost its name, but not its process). A worker of another host that lost its connection
        while it lives is taken for gone: its job runs again (at-least-once), never commits twice."""
        run_ids: List[str] = []
        for rq in self.served():
            run_ids += self._take_abandoned(rq)
        return list(dict.fromkeys(run_ids))

    def _take_abandoned(self, rq: Queue) -> List[str]:
        members = [to_text(m) for m in self.client.zrange(rq.started_job_registry.key, 0, -1)]
        if not members:
            return []
        job_ids = {m.rsplit(":", 1)[0]: m for m in members}
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(RqJob.key_for(job_id), "worker_name")
        names = dict(zip(job_ids, (to_text(n) if n else None for n in pipe.execute())))
        try:
            connected = {entry.get("name") for entry in self.client.client_list()}
        except Exception:  # CLIENT not allowed: RQ's heartbeats decide
            return []
        gone: Dict[str, bool] = {}
        host = socket.gethostname()
        for worker in {n for n in names.values() if n}:
            if worker in connected:
                gone[worker] = False
                continue
            hostname, pid = self.client.hmget(f"rq:worker:{worker}", "hostname", "pid")
            gone[worker] = not (hostname is not None and to_text(hostname) == host and pid and _alive(int(pid)))
        run_ids: List[str] = []
        for job_id, name in names.items():
            if not name or not gone.get(name):
                continue
            if not self.client.zrem(rq.started_job_registry.key, job_ids[job_id]):
                continue  # finished or taken meanwhile
            try:
                rq_job = RqJob.fetch(job_id, connection=self.client, serializer=JSONSerializer)
                payload = json.loads(rq_job.args[0]) if rq_job.args and isinstance(rq_job.args[0], str) else {}
                rq.failed_job_registry.add(rq_job, ttl=self.settings.failure_ttl or None,
                                           exc_string=f"abandoned: RQ worker {name} is gone")
            except Exception as error:  # the hash is gone or unreadable: nothing to run again
                logger.warning("abandoned RQ job %s of worker %s: %s", job_id, name, error)
                continue
            run_id = payload.get("runId") if isinstance(payload, dict) else None
            if isinstance(run_id, str):
                logger.warning("RQ worker %s is gone: its job %s (run %s) is enqueued again", name, job_id, run_id)
                run_ids.append(run_id)
        return run_ids

    @translate_errors
    def _publish_checked(self, entries: Sequence[Entry], check: str) -> List[Entry]:
        keys, args = self.publish_call(entries, check)
        _, _, unchecked = self._publish(keys=keys, args=args)
        return [entries[int(i) - 1] for i in unchecked]

    @translate_errors
    def _ids_in_lists(self, wanted: set, lists: Sequence[str], chunk: int = SCAN_CHUNK) -> set:
        """Which of `wanted` are in the Redis `lists`: one pass over each, `chunk` ids per LRANGE
        (memory O(chunk), never the whole list at once). A list that moves while it is read may
        hide an id from this scan, never show one that is not there: the caller confirms misses."""
        seen: set = set()
        for name in lists:
            start = 0
            while len(seen) < len(wanted):
                ids = self.client.lrange(name, start, start + chunk - 1)
                seen.update(i for i in map(to_text, ids) if i in wanted)
                if len(ids) < chunk:
                    break
                start += chunk
        return seen

    @property
    def publish_script(self) -> Any:
        """The registered `lua/rq_publish.lua` (its ``sha`` for EVALSHA in a pipeline)."""
        return self._publish

    def publish_call(self, entries: Sequence[Entry], check: str = "") -> Tuple[List[Any], List[Any]]:
        """The KEYS and ARGV of the `lua/rq_publish.lua` call that publishes `entries` (`check`: see
        the script; "" trusts the status of an existing RQ job hash)."""
        keys: List[Any] = list(self._fixed_keys)
        numbers: Dict[str, int] = {}
        for entry in entries:  # the RQ queues they go to (routing: the one its job names)
            numbers.setdefault(self._queue_of(entry), len(numbers))
        for name in numbers:
            rq = self.rq_queue(name)
            keys += (rq.key, rq.scheduled_job_registry.key, rq.intermediate_queue_key, rq.deferred_job_registry.key,
                     rq.started_job_registry.key)
        args: List[Any] = [len(entries), len(numbers), check, time.time()]
        for entry in entries:
            name = self._queue_of(entry)
            job_id = self.job_id(entry.job) if entry.job is not None else f"fc-{_slug(name)}-x{os.urandom(8).hex()}"
            spare = f"{job_id}-{os.urandom(4).hex()}"
            fields = self._hash_fields(entry, job_id, name)
            keys += (RqJob.key_for(job_id), RqJob.key_for(spare), ExecutionRegistry.key_template.format(job_id))
            args += (numbers[name], entry.source, entry.member, job_id, spare,
                     "" if entry.due is None else due_score(entry.due), len(fields) // 2, *fields)
        return keys, args

    def _queue_of(self, entry: Entry) -> str:
        return entry.job.queue if entry.job is not None and entry.job.queue is not None else self.queue_name

    def _hash_fields(self, entry: Entry, job_id: str, queue_name: str) -> List[Any]:
        """The RQ job hash of `entry` on RQ's queue `queue_name`, as RQ's ``enqueue`` / ``enqueue_at``
        would write it."""
        scheduled = entry.due is not None
        rq_job = self.rq_queue(queue_name).create_job(
            RUN_NODE, args=(entry.body,), job_id=job_id, timeout=self.settings.job_timeout,
            result_ttl=self.settings.result_ttl, failure_ttl=self.settings.effective_failure_ttl, retry=self._retry,
            meta=self._meta if queue_name == self.queue_name else self._routed_meta, description=_describe(entry.job),
            status=JobStatus.SCHEDULED if scheduled else JobStatus.QUEUED)
        if not scheduled:
            rq_job.enqueued_at = rq_now()
        flat: List[Any] = []
        for name, value in rq_job.to_dict().items():
            if value is not None:
                flat += (name, value.value if isinstance(value, Enum) else value)
        return flat

    # --- the RQ job being run -------------------------------------------------------------

    @contextlib.contextmanager
    def handling(self, inflight: InFlight) -> Iterator[InFlight]:
        """Mark `inflight` as the RQ job this thread runs (for `enqueue` and `dead_letter`)."""
        previous = getattr(self._local, "inflight", None)
        self._local.inflight = inflight
        try:
            yield inflight
        finally:
            self._local.inflight = previous

    def _answers_retry(self, jobs: Sequence[Job], delay: float) -> bool:
        """Is this the core asking for the next attempt of the job in hand (`RetryLater`)? Then
        the RQ job will return `rq.Retry` instead: no new RQ job."""
        inflight = getattr(self._local, "inflight", None)
        if inflight is None or inflight.delivery.job is None or len(jobs) != 1 or inflight.retry_delay is not None:
            return False
        asked, held = jobs[0], inflight.delivery.job
        same_job = (asked.key, asked.kind, asked.first_seen) == (held.key, held.kind, held.first_seen)
        if not same_job or asked.attempt != held.attempt + 1:
            return False
        inflight.retry_delay = max(0.0, float(delay or 0.0))
        return True

    # --- the JobQueue port, consumer side -------------------------------------------------

    def fetch(self, max_jobs: int = 1, timeout: float = 1.0) -> List[Delivery]:
        raise NotImplementedError("RQ jobs are taken by an RQ worker: RqAdapter.work() or `rq worker`")

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Nothing to do: RQ finishes the job when the job function returns."""

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        inflight = getattr(self._local, "inflight", None)
        if inflight is not None and inflight.delivery is delivery:
            inflight.dead_reason = reason
        else:  # DistributedAdapter only dead-letters the delivery in hand
            logger.error("dead letter outside of its RQ job (%s): %s", to_text(delivery.body)[:200], reason)

    def close(self) -> None:
        """Nothing to release: the Redis client belongs to the adapter."""

    # --- inspection -----------------------------------------------------------------------

    @translate_errors
    def dead_letters(self) -> List[Dict[str, Any]]:
        """The dead-lettered jobs in RQ's FailedJobRegistry: ``{"body", "reason", "rqJobId"}``."""
        from .rq_worker import FlowcraftJob  # reads any hash without raising or importing

        job_ids = list(self._failed_ids())
        out = []
        for rq_job in FlowcraftJob.fetch_many(job_ids, connection=self.client, serializer=JSONSerializer):
            if rq_job is None:
                continue
            reason = (rq_job.meta or {}).get(DEAD_LETTER_META_KEY)
            if isinstance(reason, str):
                out.append({"body": rq_job.args[0] if rq_job.args else None, "reason": reason, "rqJobId": rq_job.id})
        return out

    # --- dead letters (SPEC 11): the dead-lettered jobs of RQ's FailedJobRegistry, by RQ job id -

    @translate_errors
    def list_dead_letters(self, limit: Optional[int] = 100) -> List[DeadLetter]:
        """The dead letters (failed RQ jobs a worker dead-lettered; a failed node's RQ job is not one)."""
        from .rq_worker import FlowcraftJob

        job_ids = list(self._failed_ids())
        out: List[DeadLetter] = []
        for rq_job in FlowcraftJob.fetch_many(job_ids, connection=self.client, serializer=JSONSerializer):
            if rq_job is None:
                continue
            reason = (rq_job.meta or {}).get(DEAD_LETTER_META_KEY)
            if not isinstance(reason, str):
                continue
            raw = rq_job.args[0] if rq_job.args else ""
            body = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else json.dumps(raw).encode()
            ended = rq_job.ended_at.timestamp() if rq_job.ended_at is not None else 0.0
            out.append(DeadLetter(rq_job.id, body, reason, Delivery.parse(body, None).run_id_hint(), ended))
            if limit is not None and len(out) >= limit:
                break
        return out

    @translate_errors
    def remove_dead_letter(self, dead_letter_id: str, publish: bool = True) -> bool:
        """Take a dead letter out of the FailedJobRegistry; when `publish`, its body goes out as a
        new RQ job (its id is the job's: `job_id`), else the RQ job is deleted."""
        letters = [d for d in self.list_dead_letters(None) if d.id == dead_letter_id]
        if not letters:
            return False
        self._failed_ids()[dead_letter_id].remove(dead_letter_id, delete_job=True)
        if publish:
            delivery = Delivery.parse(letters[0].body, None)
            if delivery.job is not None:
                self.enqueue([delivery.job])
            else:  # still unreadable: back as it is, for a worker to dead-letter again
                self.rq.enqueue(RUN_NODE, letters[0].body.decode("utf-8", "replace"))
        return True

    @translate_errors
    def purge_dead_letters(self) -> int:
        letters = self.list_dead_letters(None)
        registries = self._failed_ids()
        for letter in letters:
            registries[letter.id].remove(letter.id, delete_job=True)
        return len(letters)

    def _failed_ids(self) -> Dict[str, Any]:
        """RQ job id -> the FailedJobRegistry holding it, over the queues this worker serves."""
        from .rq_worker import is_job_id

        found: Dict[str, Any] = {}
        for rq in self.served():
            registry = rq.failed_job_registry
            found.update((job_id, registry) for job_id in registry.get_job_ids() if is_job_id(job_id))
        return found

    @translate_errors
    def depth(self, queue: Optional[str] = None) -> int:
        """RQ jobs queued on RQ's queue `queue` (None: the default one), ready to be taken (not
        scheduled, not running): its depth."""
        return int(self.rq_queue(queue).count)

    @translate_errors
    def live_workers(self, queues: Sequence[str] = ()) -> List[WorkerInfo]:
        """Every RQ worker of this Redis (RQ's worker registry, with their heartbeats), whatever
        queues it serves: RQ's registry is not under our prefix (`queues` adds none)."""
        from rq.worker import Worker

        out = []
        for worker in Worker.all(connection=self.client):
            beat = worker.last_heartbeat
            served = tuple(worker.queue_names())
            out.append(WorkerInfo(str(worker.name), served[0] if served else "", beat.timestamp() if beat else None,
                                  f"rq worker, {worker.get_state()}", served))
        return sorted(out, key=lambda w: w.id)

    @translate_errors
    def pending(self) -> int:
        """RQ jobs queued, scheduled or running on the queues this worker serves."""
        return sum(rq.count + rq.scheduled_job_registry.count + rq.started_job_registry.count for rq in self.served())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _slug(queue_name: str) -> str:
    """A queue name as RQ job ids may carry it (RQ's `JOB_ID_PATTERN`)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", queue_name)[:64]


def _describe(job: Optional[Job]) -> str:
    if job is None:
        return "flowcraft job (unreadable)"
    where = f"{job.run_id}/{job.node_id}@{job.iteration}"
    attempt = f" attempt {job.attempt}" if job.attempt != 1 else ""
    return f"flowcraft {job.kind} {where}{attempt}"


__all__ = ["Entry", "InFlight", "RUN_NODE", "RqQueue"]
