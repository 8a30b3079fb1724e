"""`RqAdapter`: Flowcraft's distributed driver with RQ (python-rq) as its job queue.

Run state, the commit protocol, coordination and the reconciler are those of `RedisAdapter`
(`RedisRunStore`, `RedisCoordinationStore`, `create_redis_reconciler`); only the queue differs:
every Flowcraft job is an RQ job, executed by `RqAdapter.work()` or by a stock ``rq worker``::

    FLOWCRAFT_APP=myapp.workflows:runtime rq worker -w rq.worker.SimpleWorker \\
        --serializer rq.serializers.JSONSerializer --with-scheduler flowcraft-queue

RQ jobs
    ``flowcraft_redis.rq_jobs.run_node("<job JSON>")`` on the RQ queue `queue_name`, serialized
    with ``rq.serializers.JSONSerializer`` (never pickle): the one argument is the Flowcraft wire
    payload ``{"runId", "blueprintId", "nodeId", ...}``. Options: ``result_ttl=0`` (nothing to
    keep), ``job_timeout=-1`` (node timeouts belong to the blueprint), ``failure_ttl`` = the state
    TTL, ``retry=Retry(max=len(retry_intervals), interval=retry_intervals)`` (infrastructure
    failures, below) and ``meta={"flowcraft": {...}}``: the settings of the adapter that enqueued
    the job (key prefix, state TTL, retry mode, these job options), which any worker follows (a
    job without them, from a foreign client, gets the defaults: prefix "", ...).
    The RQ job id is deterministic, ``fc-<queue>-<hash of prefix, kind, run, node, iteration,
    item, attempt>``: enqueueing a job whose RQ job is still waiting (queued, scheduled or
    deferred) does nothing, since that job reads the run's state after the enqueuer's commit
    anyway; when the id belongs to a job that is running or over, a suffixed id is used.

Jobs of a commit (the outbox)
    `RedisRunStore` commits a node's completion and its successors' jobs in one Lua script, which
    cannot create RQ jobs; its commits push the job bodies onto an outbox (``<prefix><queue>.outbox``
    list, ``<prefix><queue>.outbox:delayed`` zset for timers). `publish_outbox`, which the core calls
    right after every commit, claims them atomically (into ``<prefix><queue>.outbox:claims`` with
    the claim time), then creates their RQ jobs and drops the claims in one MULTI/EXEC. Claims
    older than `reclaim_after` seconds (their publisher died in between) are put back and
    published by the next publisher, whoever it is. Per node job that is 5 Redis round trips of
    ours (load, commit, claim, status check, publish) next to RQ's own (about 30 per job in RQ 2.12).

Delays
    Timers (sleep nodes), version-mismatch put-backs and `reconcile`'s pending timers are RQ
    scheduled jobs (`Queue.enqueue_at`, as ``enqueue_in``), due at the delay rounded UP to the
    whole second (RQ's scheduled registry has one-second resolution: a timer never fires early).
    They need an RQ scheduler: ``rq worker --with-scheduler``, or `RqAdapter.work()`, which moves due
    jobs itself while it holds RQ's per-queue scheduler lock (so one scheduler per queue does it).

Retries
    ``retry_mode="in-process"`` (default): all attempts of a node run inside one RQ job.
    ``retry_mode="queue"``: when an attempt fails and attempts remain, the job function returns
    ``rq.Retry(max=<retries so far> + 1, interval=<the retry delay rounded up to whole seconds,
    plus one>)`` (RQ truncates the due time to the second: the extra second keeps the retry from
    coming early; a zero delay stays 0, an immediate re-enqueue). RQ re-runs the SAME RQ job
    after the interval and counts ``number_of_retries``; the re-run executes attempt
    ``<payload attempt> + number_of_retries``. The attempt limit is the blueprint's ``maxRetries``,
    enforced by the engine; RQ is asked for one more retry at a time. (The core asks its queue for
    the job at ``attempt + 1`` after the delay; `RqQueue` recognises that request while it runs the
    RQ job and answers it with the returned `Retry` instead of a new job.)
    Infrastructure failures: when the job function raises (Redis unreachable, a bug outside node
    code, a crash), RQ's ``Retry`` on the job re-runs it after ``retry_intervals[i]`` seconds. The
    commit is idempotent: a re-run whose completion was already committed only finishes publishing.

Acknowledgement and dead letters
    RQ finishes a job when its function returns: after the commit and the publication of the
    successors. A malformed job (bad JSON, a missing field, an unknown blueprint or node, bad meta)
    is dead-lettered: the function raises `DeadLettered(reason)` with RQ retries turned off, so RQ
    files it in its FailedJobRegistry (``rq:failed:<queue>``) with the reason as the exception (and
    in ``meta["flowcraft_dead_letter"]``; `RqQueue.dead_letters()` lists them); the run, if known,
    is failed with that reason; the worker goes on.

A SIGKILLed ``rq worker``
    Nothing committed is lost or committed twice; recovery is not immediate:

    - the job in hand stays in RQ's StartedJobRegistry; once its heartbeat expires (SimpleWorker:
      the job timeout + 60 s, 420 s with ``job_timeout=-1``) the next registry maintenance of any
      worker of the queue (at its start, then every ``--maintenance-interval``, default 600 s)
      finds it abandoned and, retries being left, re-runs it. A forking ``Worker`` whose work horse
      alone is killed notices at once;
    - a job taken from the queue but not started yet goes back with the same maintenance (RQ's
      intermediate queue);
    - successors committed but not yet published stay in the outbox and go out with the next
      publication by any worker or client (claims are taken back after `reclaim_after` seconds);
    - once RQ's retries are spent (the job is in FailedJobRegistry), the reconciler
      (`create_redis_reconciler(adapter).run()`, ``flowcraft reconcile --backend rq``) re-enqueues
      the frontier of runs idle longer than its threshold, under fresh RQ job ids;
    - node code may run again (at-least-once); ``ctx.idempotency_key`` de-duplicates side effects.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple

import attrs
import redis
from rq import Queue, Retry
from rq.exceptions import StopRequested
from rq.job import Job as RqJob
from rq.job import JobStatus
from rq.registry import ScheduledJobRegistry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from flowcraft.distributed import DistributedAdapter
from flowcraft.ports import Delivery, Job, MalformedJob

from . import rq_jobs
from ._util import connect, to_text, translate_errors
from .coordination import RedisCoordinationStore
from .keys import QueueKeys, validate_prefix, validate_simple
from .store import RedisRunStore

logger = logging.getLogger("flowcraft.redis.rq")

RUN_NODE = f"{rq_jobs.run_node.__module__}.{rq_jobs.run_node.__qualname__}"
META_KEY = "flowcraft"
DEAD_LETTER_META_KEY = "flowcraft_dead_letter"
DEFAULT_RETRY_INTERVALS = (1, 5, 30, 60, 300)
RETRY_MODES = ("in-process", "queue")
_WAITING = frozenset(s.value for s in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED))
_MAX_RETRY_INTERVALS = 25

#: An outbox entry to publish: (job body, the parsed job or None if unreadable, due time or None).
Entry = Tuple[str, Optional[Job], Optional[datetime]]


class DeadLettered(Exception):
    """Raised by the RQ job function for a dead-lettered job: RQ files it as failed, never retries it."""


def dead_letter_rq_job(rq_job: Any, reason: str) -> NoReturn:
    """End the running RQ job as a dead letter: failed with `reason`, RQ retries turned off."""
    rq_job.retries_left = 0  # the worker decides on a retry from this very object
    rq_job.meta[DEAD_LETTER_META_KEY] = reason
    rq_job.save_meta()
    raise DeadLettered(reason)


def due_at(timestamp: float) -> datetime:
    """The UTC datetime of `timestamp` rounded up to the second (RQ schedules by whole seconds)."""
    return datetime.fromtimestamp(math.ceil(timestamp), tz=timezone.utc)


def retry_interval(delay: float) -> int:
    """The `rq.Retry` interval (whole seconds) that never re-runs a job before `delay` seconds:
    RQ schedules ``now + interval`` truncated to the second, so one second is added."""
    return 0 if delay <= 0 else int(math.ceil(delay)) + 1


# --- settings ---------------------------------------------------------------------------------


def _whole(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, not {value!r}")
    return value


@attrs.frozen
class RqSettings:
    """Where a job's run lives and how its RQ jobs are made: the settings of the adapter that
    enqueued it, carried in the RQ job's ``meta["flowcraft"]`` so that every worker follows them."""

    prefix: str = ""
    state_ttl_seconds: int = 86400
    retry_mode: str = "in-process"
    job_timeout: int = -1
    failure_ttl: Optional[int] = None
    retry_intervals: Tuple[int, ...] = attrs.field(default=DEFAULT_RETRY_INTERVALS, converter=tuple)

    def __attrs_post_init__(self) -> None:
        validate_prefix(self.prefix)
        _whole("state_ttl_seconds", self.state_ttl_seconds, 0)
        if self.retry_mode not in RETRY_MODES:
            raise ValueError(f"retry_mode must be one of {RETRY_MODES}, not {self.retry_mode!r}")
        if self.job_timeout != -1:
            _whole("job_timeout (-1 = none)", self.job_timeout, 1)
        if self.failure_ttl is not None:
            _whole("failure_ttl", self.failure_ttl, 1)
        if len(self.retry_intervals) > _MAX_RETRY_INTERVALS:
            raise ValueError(f"at most {_MAX_RETRY_INTERVALS} retry intervals, not {len(self.retry_intervals)}")
        for interval in self.retry_intervals:
            _whole("a retry interval", interval, 0)

    @property
    def effective_failure_ttl(self) -> Optional[int]:
        """How long RQ keeps a failed job: `failure_ttl`, else the state TTL (0 = RQ's default)."""
        return self.failure_ttl if self.failure_ttl is not None else (self.state_ttl_seconds or None)

    def to_meta(self) -> Dict[str, Any]:
        return {"prefix": self.prefix, "state_ttl_seconds": self.state_ttl_seconds, "retry_mode": self.retry_mode,
                "job_timeout": self.job_timeout, "failure_ttl": self.failure_ttl,
                "retry_intervals": list(self.retry_intervals)}

    @classmethod
    def from_meta(cls, meta: Any) -> "RqSettings":
        """The settings in an RQ job's meta (defaults when it has none); ValueError when invalid."""
        data = (meta or {}).get(META_KEY) if isinstance(meta, dict) else None
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"must be an object, not {type(data).__name__}")
        unknown = sorted(set(data) - set(attrs.fields_dict(cls)))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}")
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(str(error)) from None

    def adapter_options(self) -> Dict[str, Any]:
        """These settings as `RqAdapter` keyword arguments."""
        return {"state_ttl_seconds": self.state_ttl_seconds, "retry_mode": self.retry_mode, "prefix": self.prefix,
                "job_timeout": self.job_timeout, "failure_ttl": self.failure_ttl,
                "retry_intervals": self.retry_intervals}


@attrs.define
class _InFlight:
    """The RQ job a thread is running, and what the core asked of the queue while running it."""

    rq_job: Any
    delivery: Delivery
    retry_delay: Optional[float] = None
    dead_reason: Optional[str] = None


# --- the queue port ---------------------------------------------------------------------------


class RqQueue:
    """The `JobQueue` port on an RQ queue: each job becomes the RQ job ``run_node(<job JSON>)``.

    Consuming is RQ's business (`RqAdapter.work()` runs an RQ worker), so `fetch` is not offered,
    `ack` does nothing (RQ finishes a job when its function returns) and `dead_letter` marks the
    running RQ job for RQ's FailedJobRegistry (see the module doc)."""

    def __init__(self, client: Any, queue_name: str = "flowcraft-queue", settings: RqSettings = RqSettings()) -> None:
        self.client = client
        self.queue_name = validate_simple("queue name", queue_name)
        self.settings = settings
        self.rq = Queue(queue_name, connection=client, serializer=JSONSerializer)
        self._slug = re.sub(r"[^A-Za-z0-9_-]", "_", queue_name)[:64]
        intervals = list(settings.retry_intervals)
        self._retry = Retry(max=len(intervals), interval=intervals) if intervals else None
        self._local = threading.local()

    def job_id(self, job: Job) -> str:
        """The deterministic RQ job id of a Flowcraft job (the same for every enqueue of it)."""
        fields = (self.settings.prefix, job.kind, job.run_id, job.node_id, job.iteration, job.index, job.attempt)
        identity = "\x00".join("" if f is None else str(f) for f in fields)
        return f"fc-{self._slug}-{hashlib.sha1(identity.encode()).hexdigest()}"

    # --- producing ------------------------------------------------------------------------

    def enqueue(self, jobs: Sequence[Job], delay: float = 0.0) -> None:
        if not jobs or self._answers_retry(jobs, delay):
            return
        due = due_at(time.time() + float(delay)) if delay and delay > 0 else None
        self.publish([(j.to_json(), j, due) for j in jobs])

    @translate_errors
    def publish(self, entries: Sequence[Entry], then: Optional[Callable[[Any], None]] = None) -> int:
        """Create the RQ jobs of `entries` in one transaction, except those whose RQ job is still
        waiting (or repeated within `entries`); return how many were created. `then(pipeline)` adds
        commands to the same transaction."""
        if not entries and then is None:
            return 0
        ids = [self.job_id(job) if job is not None else None for _, job, _ in entries]
        statuses = self._statuses([i for i in ids if i is not None])
        pipe = self.client.pipeline(transaction=True)
        seen: set = set()
        made = 0
        for (body, job, due), job_id in zip(entries, ids):
            if job_id is None:  # unreadable: a worker will dead-letter it
                job_id = f"fc-{self._slug}-x{os.urandom(8).hex()}"
            else:
                status = statuses.get(job_id)
                if status in _WAITING or job_id in seen:
                    logger.debug("job %s is already waiting as RQ job %s", job.key, job_id)
                    continue
                seen.add(job_id)
                if status is not None:  # running or over: this is a redelivery
                    job_id = f"{job_id}-{os.urandom(4).hex()}"
            self._create(body, job, due, job_id, pipe)
            made += 1
        if then is not None:
            then(pipe)
        if len(pipe):
            pipe.execute()
        return made

    def _statuses(self, job_ids: List[str]) -> Dict[str, Optional[str]]:
        if not job_ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(RqJob.key_for(job_id), "status")
        return {i: (None if s is None else to_text(s)) for i, s in zip(job_ids, pipe.execute())}

    def _create(self, body: str, job: Optional[Job], due: Optional[datetime], job_id: str, pipe: Any) -> None:
        options = {
            "job_id": job_id, "result_ttl": 0, "failure_ttl": self.settings.effective_failure_ttl,
            "job_timeout": self.settings.job_timeout, "retry": self._retry,
            "meta": {META_KEY: self.settings.to_meta()}, "description": _describe(job), "pipeline": pipe,
        }
        if due is None:
            self.rq.enqueue(RUN_NODE, body, **options)
        else:
            self.rq.enqueue_at(due, RUN_NODE, body, **options)

    # --- the RQ job being run -------------------------------------------------------------

    @contextlib.contextmanager
    def handling(self, inflight: _InFlight) -> Iterator[_InFlight]:
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
        registry = self.rq.failed_job_registry
        out = []
        for rq_job in RqJob.fetch_many(registry.get_job_ids(), connection=self.client, serializer=JSONSerializer):
            reason = (rq_job.meta or {}).get(DEAD_LETTER_META_KEY) if rq_job is not None else None
            if reason is not None:
                out.append({"body": rq_job.args[0] if rq_job.args else None, "reason": reason, "rqJobId": rq_job.id})
        return out

    @translate_errors
    def pending(self) -> int:
        """RQ jobs queued, scheduled or running."""
        return self.rq.count + self.rq.scheduled_job_registry.count + self.rq.started_job_registry.count


def _describe(job: Optional[Job]) -> str:
    if job is None:
        return "flowcraft job (unreadable)"
    where = f"{job.run_id}/{job.node_id}@{job.iteration}"
    attempt = f" attempt {job.attempt}" if job.attempt != 1 else ""
    return f"flowcraft {job.kind} {where}{attempt}"


# --- the run store with an outbox -------------------------------------------------------------

# Claim outbox entries for one publisher, after putting back the claims of dead publishers.
# KEYS: 1 outbox list, 2 outbox delayed zset, 3 claims zset
# ARGV: 1 now, 2 claims older than this are put back, 3 most entries per kind, 4 claim token (16 hex)
# Returns {more (1 when a kind hit the limit), claim member...}; a member is
# "<token>:<n>:<due or empty>:<body>". Delayed outbox members are "<16 chars>:<body>".
_CLAIM_LUA = """
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[2], 'LIMIT', 0, 1000)
for i, m in ipairs(stale) do
  redis.call('ZREM', KEYS[3], m)
  local a = string.find(m, ':', 1, true)
  local b = string.find(m, ':', a + 1, true)
  local c = string.find(m, ':', b + 1, true)
  local due = string.sub(m, b + 1, c - 1)
  local body = string.sub(m, c + 1)
  if due == '' then
    redis.call('RPUSH', KEYS[1], body)
  else
    redis.call('ZADD', KEYS[2], due, string.format('%08x', i) .. string.sub(m, 1, 8) .. ':' .. body)
  end
end
local limit = tonumber(ARGV[3])
local out = {0}
local n = 0
local ready = redis.call('RPOP', KEYS[1], limit)
if ready then
  if #ready >= limit then out[1] = 1 end
  for _, body in ipairs(ready) do
    n = n + 1
    local member = ARGV[4] .. ':' .. n .. '::' .. body
    redis.call('ZADD', KEYS[3], ARGV[1], member)
    out[#out + 1] = member
  end
end
local due = redis.call('ZPOPMIN', KEYS[2], limit)
if #due >= 2 * limit then out[1] = 1 end
for i = 1, #due, 2 do
  n = n + 1
  local member = ARGV[4] .. ':' .. n .. ':' .. due[i + 1] .. ':' .. string.sub(due[i], 18)
  redis.call('ZADD', KEYS[3], ARGV[1], member)
  out[#out + 1] = member
end
return out
"""


class RqRunStore(RedisRunStore):
    """A `RedisRunStore` whose commits push jobs onto an outbox that `publish_outbox` turns into
    RQ jobs (see the module doc)."""

    def __init__(self, client: Any, prefix: str = "", state_ttl_seconds: int = 86400, *,
                 queue_name: str = "flowcraft-queue", clock: Any = time.time, claim_limit: int = 500,
                 reclaim_after: float = 60.0) -> None:
        outbox = validate_simple("queue name", queue_name) + ".outbox"
        super().__init__(client, prefix, state_ttl_seconds, queue_name=outbox, clock=clock)
        self.outbox = QueueKeys(outbox, prefix)
        self.claims_key = self.outbox.ready + ":claims"
        self.claim_limit = max(1, int(claim_limit))
        self.reclaim_after = float(reclaim_after)
        self._claim = client.register_script(_CLAIM_LUA)

    def publish_outbox(self, run_id: str, queue: Any) -> int:
        """Publish every job in the outbox (any run's: the outbox is the queue's); return how many."""
        return self.drain_outbox(queue)

    def publish_outboxes(self, run_ids: Sequence[str], queue: Any) -> int:
        return self.drain_outbox(queue)

    @translate_errors
    def drain_outbox(self, queue: Any, max_rounds: int = 1000) -> int:
        published = 0
        for _ in range(max_rounds):
            now = time.time()
            reply = self._claim(keys=[self.outbox.ready, self.outbox.delayed, self.claims_key],
                                args=[repr(now), repr(now - self.reclaim_after), self.claim_limit, os.urandom(8).hex()])
            more, members = int(reply[0]), list(reply[1:])
            if members:
                queue.publish([_entry(m) for m in members], then=functools.partial(self._unclaim, members))
                published += len(members)
            if not more:
                break
        return published

    def _unclaim(self, members: List[bytes], pipe: Any) -> None:
        """Drop the claims, in the transaction that creates their RQ jobs."""
        for start in range(0, len(members), 1000):
            pipe.zrem(self.claims_key, *members[start:start + 1000])

    @translate_errors
    def outbox_size(self) -> int:
        """Jobs committed and not yet published (waiting or claimed)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.outbox.ready)
        pipe.zcard(self.outbox.delayed)
        pipe.zcard(self.claims_key)
        return sum(pipe.execute())


def _entry(member: bytes) -> Entry:
    _token, _n, due, body = member.split(b":", 3)
    text = body.decode("utf-8", "replace")
    try:
        job: Optional[Job] = Job.from_json(text)
    except MalformedJob:
        job = None
    return text, job, due_at(float(due)) if due else None


# --- the adapter ------------------------------------------------------------------------------


class RqAdapter(DistributedAdapter):
    """A worker and client whose jobs are RQ jobs, and whose runs live in Redis (see the module doc).

    Options beyond the spec's: `prefix` (our key prefix; RQ's own keys are RQ's, under ``rq:``),
    `job_timeout` (seconds an RQ job may run, -1 = unbounded), `failure_ttl` (how long RQ keeps a
    failed or dead-lettered job; default: the state TTL), `retry_intervals` (seconds between RQ's
    re-runs of a job whose function raised; one re-run per entry), `reclaim_after` (seconds before
    an outbox claim of a dead publisher is taken back), `reconnect_backoff` ((first, max) seconds
    between restarts of `work()`'s RQ worker after a Redis outage), `poll_timeout` (seconds `work()`
    blocks on an empty queue between checks for `stop()` and due scheduled jobs); the rest go to
    `DistributedAdapter`.
    """

    def __init__(self, runtime: Any, redis_url_or_client: Any, queue_name: str = "flowcraft-queue",
                 state_ttl_seconds: int = 86400, retry_mode: str = "in-process", *, prefix: str = "",
                 job_timeout: int = -1, failure_ttl: Optional[int] = None,
                 retry_intervals: Sequence[int] = DEFAULT_RETRY_INTERVALS, reclaim_after: float = 60.0,
                 reconnect_backoff: Tuple[float, float] = (0.1, 5.0), **options: Any) -> None:
        client = connect(redis_url_or_client)
        settings = RqSettings(prefix, int(state_ttl_seconds), retry_mode, job_timeout, failure_ttl,
                              tuple(retry_intervals))
        queue = RqQueue(client, queue_name, settings)
        store = RqRunStore(client, prefix, state_ttl_seconds, queue_name=queue_name,
                           clock=options.get("clock", time.time), reclaim_after=reclaim_after)
        super().__init__(runtime, queue, store, RedisCoordinationStore(client, prefix), retry_mode=retry_mode,
                         **options)
        self.redis = client
        self.queue_name = queue_name
        self.settings = settings
        self.reconnect_backoff = reconnect_backoff
        self._sibling_options = dict(options, reclaim_after=reclaim_after, reconnect_backoff=reconnect_backoff)
        self._siblings: Dict[Tuple[str, RqSettings], "RqAdapter"] = {}
        self._siblings_lock = threading.Lock()

    # --- running RQ jobs ------------------------------------------------------------------

    def with_settings(self, queue_name: str, settings: RqSettings) -> "RqAdapter":
        """This adapter if it has these settings, else one with the same runtime and Redis that has
        (built once): a job always runs against the run store its enqueuer used."""
        if queue_name == self.queue_name and settings == self.settings:
            return self
        with self._siblings_lock:
            sibling = self._siblings.get((queue_name, settings))
            if sibling is None:
                sibling = RqAdapter(self.runtime, self.redis, queue_name, **settings.adapter_options(),
                                    **self._sibling_options)
                self._siblings[(queue_name, settings)] = sibling
        return sibling

    def run_rq_job(self, rq_job: Any, body: Any) -> Optional[Retry]:
        """Process the Flowcraft job `body` of the running RQ job `rq_job` (see `rq_jobs.run_node`)."""
        if isinstance(body, (dict, list)):  # a client that passed the payload as a JSON value
            body = json.dumps(body)
        retries = int(rq_job.number_of_retries or 0)
        delivery = Delivery.parse(body, rq_job.id)
        if delivery.job is not None and retries:
            delivery.job = delivery.job.with_(attempt=delivery.job.attempt + retries)
        inflight = _InFlight(rq_job, delivery)
        with self.queue.handling(inflight):
            self.handle(delivery)
        if inflight.dead_reason is not None:
            dead_letter_rq_job(rq_job, inflight.dead_reason)
        if inflight.retry_delay is not None:
            return Retry(max=retries + 1, interval=retry_interval(inflight.retry_delay))
        return None

    # --- worker ---------------------------------------------------------------------------

    def work(self, burst: bool = False, max_jobs: Optional[int] = None) -> int:
        """Run an RQ `SimpleWorker` on this adapter's queue in this thread (its jobs run with this
        adapter; due scheduled jobs are moved to the queue as by ``--with-scheduler``) until
        `stop()` (or, with `burst`, until the queue is empty); return how many RQ jobs it ran.

        Signals are left to the caller (the ``flowcraft worker`` command turns SIGTERM into
        `stop()`). After a Redis outage the RQ worker is restarted with backoff. A `stop()` that
        comes before `work()` starts is not lost: `work()` then returns at once."""
        try:
            return self._work_rq(burst, max_jobs)
        finally:
            self._stop.clear()

    def _work_rq(self, burst: bool, max_jobs: Optional[int]) -> int:
        processed = 0
        backoff = 0.0
        if max_jobs is not None and max_jobs <= 0:
            return 0
        while not self._stop.is_set():
            worker: Optional[_InProcessWorker] = None
            failure: Optional[BaseException] = None
            try:
                self.store.publish_outbox("", self.queue)  # jobs a crashed worker committed and never published
                worker = _InProcessWorker(self)
                worker.work(burst=burst, max_jobs=None if max_jobs is None else max_jobs - processed)
                failure = worker.error
            except (ConnectionError, OSError, redis.RedisError) as error:
                failure = error
            finally:
                if worker is not None:
                    processed += worker.executed
                    worker.close()
            if max_jobs is not None and processed >= max_jobs:
                break
            if failure is None:
                if burst:
                    break
                continue
            backoff = min(max(backoff * 2, self.reconnect_backoff[0]), self.reconnect_backoff[1])
            logger.warning("rq worker on %r stopped on %s: %s; restarting in %.1fs", self.queue_name,
                           type(failure).__name__, failure, backoff)
            if self._stop.wait(backoff):
                break
        return processed

    def stopping(self) -> bool:
        """Has `stop()` (or the ``flowcraft worker`` command's stop signal) been asked for?"""
        return self._stop.is_set()

    def close(self) -> None:
        self.stop()
        self.queue.close()


# --- the embedded RQ worker -------------------------------------------------------------------

# RQ's per-queue scheduler lock, as rq.scripts does it: take it or refresh it if ours; release if ours.
_ACQUIRE_LOCK_LUA = """
local owner = redis.call('GET', KEYS[1])
if not owner then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1 end
if owner == ARGV[1] then redis.call('EXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_RELEASE_LOCK_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def _clone(client: Any) -> Any:
    """A client with its own connection pool to the same server (RQ renames and re-times the
    connections of its worker; the adapter's stay as they are)."""
    pool = client.connection_pool
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class,
                                                            **pool.connection_kwargs))


def _worker_name(queue_name: str) -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "host"
    return f"flowcraft-{queue_name}-{host}-{os.getpid()}-{os.urandom(4).hex()}"


class _InProcessWorker(SimpleWorker):
    """The RQ worker inside `RqAdapter.work()`: jobs run with the adapter bound; no signal handlers,
    no log handlers, no pub/sub thread, no process title; it checks the adapter's stop event and
    moves due scheduled jobs between short blocking dequeues."""

    death_penalty_class = TimerDeathPenalty  # no SIGALRM: works off the main thread
    promote_interval = 0.5
    lock_ttl = 10

    def __init__(self, adapter: RqAdapter) -> None:
        self.adapter = adapter
        self.executed = 0
        self.error: Optional[BaseException] = None
        self._poll = max(0.05, float(adapter.poll_timeout))  # read by BaseWorker.__init__
        self._next_promote = 0.0
        self._holds_lock = False
        connection = _clone(adapter.redis)
        self._queue = Queue(adapter.queue_name, connection=connection, serializer=JSONSerializer)
        super().__init__([self._queue], name=_worker_name(adapter.queue_name), connection=connection,
                         serializer=JSONSerializer)
        self._lock_key = RQScheduler.get_locking_key(adapter.queue_name)
        self._acquire = connection.register_script(_ACQUIRE_LOCK_LUA)
        self._release = connection.register_script(_RELEASE_LOCK_LUA)

    @property
    def dequeue_timeout(self) -> float:  # type: ignore[override]
        return self._poll

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        self.register_birth()
        self.set_state(WorkerStatus.STARTED)

    def _install_signal_handlers(self) -> None:
        """The application owns the signals."""

    def procline(self, message: str) -> None:
        """The application owns its process title."""

    def dequeue_job_and_maintain_ttl(self, timeout: Any, max_idle_time: Any = None) -> Any:
        try:
            while True:
                if self._stop_requested or self.adapter.stopping():
                    raise StopRequested()
                self._promote_due_jobs()
                if timeout is None:  # burst: one non-blocking look
                    return super().dequeue_job_and_maintain_ttl(None)
                result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time=timeout)
                if result is not None:
                    return result
        except StopRequested:
            raise
        except Exception as error:
            self.error = error
            raise

    def execute_job(self, job: Any, queue: Any) -> None:
        token = rq_jobs.bind(self.adapter)
        try:
            self.executed += 1
            super().execute_job(job, queue)
        except Exception as error:  # outside the job function (RQ handles those): Redis, mostly
            self.error = error
            raise
        finally:
            rq_jobs.unbind(token)

    def _promote_due_jobs(self) -> None:
        """Move due scheduled jobs to the queue, as RQ's scheduler does, if we hold its lock."""
        now = time.monotonic()
        if now < self._next_promote:
            return
        self._next_promote = now + self.promote_interval
        self._holds_lock = bool(self._acquire(keys=[self._lock_key], args=[self.name, self.lock_ttl]))
        if not self._holds_lock:
            return
        registry = ScheduledJobRegistry(queue=self._queue)
        job_ids = registry.get_jobs_to_schedule(int(time.time()))
        if not job_ids:
            return
        jobs = RqJob.fetch_many(job_ids, connection=self.connection, serializer=self.serializer)
        with self.connection.pipeline() as pipe:
            for job in jobs:
                if job is not None:
                    self._queue.enqueue_job(job, pipeline=pipe)
            for job_id in job_ids:
                registry.remove(job_id, pipeline=pipe)
            pipe.execute()

    def close(self) -> None:
        """Give back the scheduler lock and the connections."""
        try:
            if self._holds_lock:
                self._release(keys=[self._lock_key], args=[self.name])
        except redis.RedisError:
            pass  # it expires within lock_ttl
        self.connection.connection_pool.disconnect()


__all__ = ["DEFAULT_RETRY_INTERVALS", "DeadLettered", "RqAdapter", "RqQueue", "RqRunStore", "RqSettings", "RUN_NODE"]
