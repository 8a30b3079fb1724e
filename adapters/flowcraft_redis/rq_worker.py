"""The RQ workers of Flowcraft: `FlowcraftWorker`, a `SimpleWorker` that runs Flowcraft jobs and
nothing else, and `InProcessWorker`, the one inside `RqAdapter.work()`.

RQ trusts its queue: a stock worker imports and calls whatever function an RQ job names (and its
success/failure callbacks), so anyone who can write to the queue's Redis keys runs code in it.
`FlowcraftWorker` reads every RQ job as a `FlowcraftJob`, which checks the job hash BEFORE
anything is imported: the job must be exactly what `RqQueue` writes, ``run_node(<one string>)``
(`rq_jobs.run_node`, no instance, no keyword arguments, no callbacks, webhooks or repeats, its RQ
numbers in range, its data at most `MAX_JOB_BYTES`). Anything else, and any hash RQ cannot even
read (a bad field, JSON nested too deep, ...), is refused: dead-lettered in RQ's FailedJobRegistry
of its queue with the reason (``meta["flowcraft_dead_letter"]`` and the exception text), never
retried, and the worker goes on. Queue entries that are not job ids are dropped with an error log.
The check costs no Redis round trip: it parses the job's data once, which RQ would do anyway.

Use it with RQ's own command line (it always reads jobs with the JSON serializer, never pickle)::

    FLOWCRAFT_APP=myapp.workflows:runtime rq worker -w flowcraft_redis.rq_worker.FlowcraftWorker \\
        --serializer rq.serializers.JSONSerializer --with-scheduler flowcraft-queue

`InProcessWorker` is a `FlowcraftWorker` that runs jobs with its adapter bound, leaves signals,
logging and the process title to the application, and moves due scheduled jobs to the queue
itself (as ``rq worker --with-scheduler`` does) while it holds RQ's per-queue scheduler lock.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
from typing import Any, List, Optional, Sequence

import redis
from rq import Queue
from rq.exceptions import StopRequested
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.job import JOB_ID_PATTERN, JobStatus
from rq.job import Job as RqJob
from rq.registry import ScheduledJobRegistry
from rq.results import Result
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty
from rq.utils import now as rq_now
from rq.worker import SimpleWorker, WorkerStatus

from . import rq_jobs
from ._util import to_text
from .rq_queue import RUN_NODE
from .rq_settings import DEAD_LETTER_META_KEY, RqSettings

logger = logging.getLogger("flowcraft.redis.rq")

MAX_JOB_BYTES = 16 * 1024 * 1024  # the largest RQ job data (the Flowcraft job JSON, in RQ's envelope) we read
_MAX_SECONDS = 10 ** 9  # RQ numbers (TTLs, timeouts, intervals, retries): beyond, RQ's date arithmetic overflows
_MAX_INTERVALS = 100
_NUMBERS = ("timeout", "result_ttl", "failure_ttl", "ttl", "retries_left", "number_of_retries")
_EMPTY_DATA = JSONSerializer.dumps([None, None, [], {}])
PROMOTE_CHUNK = 1000  # scheduled jobs moved per registry read


class FlowcraftJob(RqJob):
    """An RQ job as a Flowcraft worker reads it: `restore` never raises for what the hash holds and
    never imports anything; `refusal` is None for a Flowcraft job, else why it is not one (the job
    is then disarmed: no function, arguments, callbacks or webhooks)."""

    max_data_bytes = MAX_JOB_BYTES
    refusal: Optional[str] = None

    def restore(self, raw_data: Any) -> None:
        self.refusal = None
        try:
            super().restore(raw_data)
        except Exception as error:  # a bad number or date, JSON nested too deep, no data field...
            self._disarm(f"its RQ job hash is malformed ({type(error).__name__}: {_short(str(error))})")
            return
        if self.description is not None and len(self.description) > 500:
            self.description = self.description[:500] + "..."  # RQ logs it
        reason = self._check()
        if reason is not None:
            self._disarm(reason)

    @property
    def func(self) -> Any:
        """`rq_jobs.run_node`, for a Flowcraft job only (RQ imports ``func_name``; we never do)."""
        if self.refusal is not None or self.func_name != RUN_NODE:
            raise RefusedJob(self.refusal or f"refused: {self.func_name!r} is not {RUN_NODE}")
        return rq_jobs.run_node

    def _check(self) -> Optional[str]:
        """Why this restored job is not one `RqQueue` wrote (None: it is); on success the parsed
        data is kept, so RQ does not parse it again."""
        data = self._data
        if not isinstance(data, bytes):
            return "its data is missing"
        if len(data) > self.max_data_bytes:
            return f"its data is {len(data)} bytes, over the limit of {self.max_data_bytes}"
        try:
            loaded = self.serializer.loads(data)
        except Exception as error:  # RecursionError for JSON nested too deep, UnicodeDecodeError...
            return f"its data is not readable JSON ({type(error).__name__})"
        if not isinstance(loaded, list) or len(loaded) != 4:
            return "its data is not [function, instance, args, kwargs]"
        func_name, instance, args, kwargs = loaded
        if func_name != RUN_NODE:
            return f"it names the function {_short(repr(func_name))}, not {RUN_NODE}"
        if instance is not None or kwargs != {}:
            return f"{RUN_NODE} takes no instance and no keyword arguments"
        if not isinstance(args, list) or len(args) != 1 or not isinstance(args[0], str):
            return f"{RUN_NODE} takes exactly one string argument (the Flowcraft job JSON)"
        extras = [name for name, value in (("success_callback", self._success_callback_name),
                                           ("failure_callback", self._failure_callback_name),
                                           ("stopped_callback", self._stopped_callback_name),
                                           ("webhooks", self.webhooks), ("repeats", self.repeats_left),
                                           ("repeat_intervals", self.repeat_intervals)) if value]
        if extras:
            return f"it has {', '.join(extras)}, which Flowcraft jobs never have"
        if not isinstance(self.meta, dict) or isinstance(self.meta.get("unserialized"), bytes):
            return "its meta is not a readable JSON object"  # RQ's mark of unreadable meta: 'unserialized'
        reason = self._check_numbers()
        if reason is not None:
            return reason
        self._func_name, self._instance, self._args, self._kwargs = func_name, None, args, {}
        return None

    def _check_numbers(self) -> Optional[str]:
        for name in _NUMBERS:
            value = getattr(self, name)
            if value is not None and not _in_range(value):
                return f"its {name} {_short(repr(value))} is out of range"
        intervals = self.retry_intervals
        if intervals is not None and (not isinstance(intervals, list) or len(intervals) > _MAX_INTERVALS
                                      or not all(_in_range(i) for i in intervals)):
            return "its retry_intervals are not a short list of whole seconds"
        return None

    def _disarm(self, reason: str) -> None:
        self.refusal = f"refused: {reason}; nothing it names was imported or run"
        # RQ declares these without None; None is what makes the job import and call nothing
        self._func_name, self._instance, self._args, self._kwargs = None, None, (), {}  # type: ignore[assignment]
        self._success_callback_name = self._failure_callback_name = self._stopped_callback_name = None
        self._success_callback = self._failure_callback = self._stopped_callback = None  # type: ignore[assignment]
        self.webhooks = []
        self.repeats_left = self.repeat_intervals = None
        self.retries_left = 0


class RefusedJob(Exception):
    """A job that is not a Flowcraft job was about to be run (`FlowcraftJob.func`)."""


class FlowcraftQueue(Queue):
    """RQ's queue, whose dequeue drops entries that are not RQ job ids (RQ would crash on them)."""

    job_class = FlowcraftJob

    @classmethod
    def lmove(cls, connection: Any, queue_key: str, timeout: Any) -> Any:
        while True:
            result = super().lmove(connection, queue_key, timeout)
            if result is None or is_job_id(result[1]):
                return result
            connection.lrem(cls._intermediate_key(queue_key), 1, result[1])
            _log_dropped(queue_key, result[1])

    @classmethod
    def lpop(cls, queue_keys: Sequence[str], timeout: Any, connection: Any = None) -> Any:
        while True:
            result = super().lpop(queue_keys, timeout, connection=connection)
            if result is None or is_job_id(result[1]):
                return result
            _log_dropped(result[0], result[1])

    @staticmethod
    def _intermediate_key(queue_key: str) -> str:
        from rq.intermediate_queue import IntermediateQueue

        return IntermediateQueue.get_intermediate_queue_key(queue_key)


class FlowcraftWorker(SimpleWorker):
    """A `SimpleWorker` that runs Flowcraft jobs only: every other RQ job is dead-lettered with the
    reason, before RQ imports anything it names (see the module doc). It always reads jobs with
    RQ's `JSONSerializer`, as `FlowcraftJob` through `FlowcraftQueue`; a failure of RQ's own
    handling of one job dead-letters that job instead of stopping the worker."""

    job_class = FlowcraftJob
    queue_class = FlowcraftQueue
    refused_failure_ttl = RqSettings().effective_failure_ttl

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["job_class"] = _ours(kwargs.get("job_class"), FlowcraftJob, RqJob)
        kwargs["queue_class"] = _ours(kwargs.get("queue_class"), FlowcraftQueue, Queue)
        serializer = kwargs.get("serializer")
        if serializer not in (None, JSONSerializer, "rq.serializers.JSONSerializer", "json"):
            logger.warning("FlowcraftWorker reads RQ jobs with rq.serializers.JSONSerializer only (never pickle); "
                           "serializer %r ignored", serializer)
        kwargs["serializer"] = JSONSerializer
        names = [queues] if isinstance(queues, (str, Queue)) else list(queues or ())
        super().__init__([q if isinstance(q, str) else q.name for q in names], *args, **kwargs)

    def execute_job(self, job: Any, queue: Any) -> None:
        refusal = job.refusal if isinstance(job, FlowcraftJob) else "refused: not read as a FlowcraftJob"
        if refusal is not None:
            self.refuse(job, queue, refusal)
            return
        try:
            super().execute_job(job, queue)
        except (redis.RedisError, OSError):
            raise  # an outage: the caller restarts the worker; RQ's maintenance re-runs the job
        except Exception as error:  # RQ's own handling of this job failed (the job function's are RQ's)
            self.log.exception("Worker %s: handling RQ job %s failed", self.name, job.id)
            self.refuse(job, queue, f"the worker failed while handling it ({type(error).__name__}: "
                                    f"{_short(str(error))})")

    def _start_scheduler(self, burst: bool = False, logging_level: Optional[str] = "INFO",
                         date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
                         log_format: str = DEFAULT_LOGGING_FORMAT) -> None:
        """RQ's own (``--with-scheduler``), with a `FlowcraftScheduler` instead of an `RQScheduler`."""
        level = logging_level if logging_level is not None else self.log.level
        self.scheduler = FlowcraftScheduler(self.queues, connection=self.connection, serializer=self.serializer,
                                            logging_level=level, date_format=date_format, log_format=log_format)
        self.scheduler.acquire_locks()
        if not self.scheduler.acquired_locks:
            return
        if not burst:
            self.scheduler.start()
            return
        try:
            self.scheduler.register_birth()
            self.scheduler.enqueue_scheduled_jobs()
        finally:
            self.scheduler.release_locks()
            self.scheduler.register_death()

    def refuse(self, job: Any, queue: Any, reason: str) -> None:
        """Dead-letter `job` (taken from `queue`): a clean failed RQ job under its id, in the queue's
        FailedJobRegistry, with `reason`; what the hash held besides its data is dropped."""
        self.log.error("Worker %s: dead-lettered RQ job %s of %s: %s", self.name, job.id, queue.name, reason)
        ttl = self.refused_failure_ttl
        dead = FlowcraftJob(job.id, connection=self.connection, serializer=self.serializer)
        raw = job._data
        dead.data = raw if isinstance(raw, bytes) and len(raw) <= FlowcraftJob.max_data_bytes else _EMPTY_DATA
        dead.origin, dead.description, dead.worker_name = queue.name, "refused RQ job", self.name
        dead.meta = {DEAD_LETTER_META_KEY: reason}
        dead.retries_left, dead.failure_ttl, dead.ended_at = 0, ttl, rq_now()
        dead._status = JobStatus.FAILED
        with self.connection.pipeline() as pipe:
            if len(self.queues) == 1:  # RQ's dequeue moved the id to the intermediate queue
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            if self.execution is not None:
                self.cleanup_execution(job, pipeline=pipe)
            pipe.delete(dead.key)
            queue.failed_job_registry.add(dead, ttl=ttl, exc_string=reason, pipeline=pipe)
            pipe.hset(dead.key, "meta", self.serializer.dumps(dead.meta))
            Result.create_failure(dead, ttl, reason, worker_name=self.name, pipeline=pipe)  # job.latest_result()
            self.increment_failed_job_count(pipe)
            pipe.execute()


def promote_due_jobs(queue: Any) -> Optional[float]:
    """Move the due jobs of `queue`'s scheduled registry to the queue, as RQ's scheduler does, but
    read as `FlowcraftJob`s (RQ's scheduler stops on a hash it cannot read): a job that is not ours
    is pushed as it is, for the worker to dead-letter; an entry that is not a job id is dropped.
    Due means a score up to the time itself (RQ's: up to the whole second). Returns when the next
    job left is due (None: none is)."""
    registry = ScheduledJobRegistry(queue=queue)
    now = time.time()
    with queue.connection.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(registry.key, 0, now, start=0, num=PROMOTE_CHUNK)
        pipe.zrangebyscore(registry.key, f"({now}", "+inf", start=0, num=1, withscores=True)
        due, later = pipe.execute()
    job_ids = [to_text(job_id) for job_id in due]
    next_due = float(later[0][1]) if later else None
    if len(job_ids) == PROMOTE_CHUNK:
        next_due = now  # more are due
    if not job_ids:
        return next_due
    valid = [job_id for job_id in job_ids if is_job_id(job_id)]
    jobs = FlowcraftJob.fetch_many(valid, connection=queue.connection, serializer=JSONSerializer)
    with queue.connection.pipeline() as pipe:
        for job_id, job in zip(valid, jobs):
            if isinstance(job, FlowcraftJob) and job.refusal is None:
                queue.enqueue_job(job, pipeline=pipe)
            elif job is not None:
                pipe.rpush(queue.key, job_id)
        for job_id in job_ids:
            registry.remove(job_id, pipeline=pipe)
        pipe.execute()
    if len(valid) < len(job_ids):
        _log_dropped(registry.key, [job_id for job_id in job_ids if not is_job_id(job_id)])
    return next_due


class FlowcraftScheduler(RQScheduler):
    """RQ's scheduler (``rq worker --with-scheduler``) with the promotion of `promote_due_jobs`."""

    def enqueue_scheduled_jobs(self) -> None:
        self._status = self.Status.WORKING
        if not self._scheduled_job_registries and self._acquired_locks:
            self.prepare_registries()
        for registry in self._scheduled_job_registries:
            promote_due_jobs(FlowcraftQueue(registry.name, connection=self.connection, serializer=JSONSerializer))
        self._status = self.Status.STARTED


def _ours(given: Any, ours: type, rq_default: type) -> type:
    """`ours` unless `given` is a subclass of it; RQ's default class is replaced, anything else refused."""
    if isinstance(given, str):
        from rq.utils import import_attribute

        given = import_attribute(given)
    if given is None or given is rq_default:
        return ours
    if isinstance(given, type) and issubclass(given, ours):
        return given
    raise TypeError(f"FlowcraftWorker needs a subclass of {ours.__module__}.{ours.__qualname__}, not {given!r}")


def _in_range(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -1 <= value <= _MAX_SECONDS


def is_job_id(raw: Any) -> bool:
    """Is `raw` (a queue or registry entry) an RQ job id? RQ raises on anything else."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return False
    return isinstance(text, str) and JOB_ID_PATTERN.fullmatch(text) is not None


def _log_dropped(queue_key: Any, raw: Any) -> None:
    logger.error("dropped an entry of RQ queue %s that is not a job id: %s", queue_key, _short(repr(raw)))


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


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


class InProcessWorker(FlowcraftWorker):
    """The RQ worker inside `RqAdapter.work()`: a `FlowcraftWorker` whose jobs run with the adapter
    bound; no signal handlers,
    no log handlers, no pub/sub thread, no process title; it checks the adapter's stop event and
    moves due scheduled jobs between short blocking dequeues."""

    death_penalty_class = TimerDeathPenalty  # no SIGALRM: works off the main thread
    lock_interval = 0.5  # seconds between takes (or refreshes) of the queues' scheduler locks
    lock_ttl = 10
    promote_interval = 0.1  # the holder's longest wait between looks at the scheduled registries

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.executed = 0
        self.error: Optional[BaseException] = None
        self._poll = max(0.05, float(adapter.poll_timeout))  # read by BaseWorker.__init__
        self._next_lock = 0.0  # (monotonic) when to take or refresh the scheduler locks
        self._next_promote = 0.0  # (monotonic) when the holder looks at the scheduled registries next
        self._held: List[str] = []  # the queues whose scheduler lock this worker holds
        connection = _clone(adapter.redis)
        served = list(adapter.queue.queues)  # in priority order: RQ's dequeue takes from the first first
        super().__init__(served, name=_worker_name(served[0]), connection=connection)
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
                # the holder of a scheduler lock wakes when the next scheduled job is due
                wait = min(timeout, max(0.01, self._next_promote - time.monotonic())) if self._held else timeout
                result = super().dequeue_job_and_maintain_ttl(wait, max_idle_time=wait)
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
        """Move due scheduled jobs to their queues, as RQ's scheduler does, for each queue whose
        scheduler lock we hold (one pipeline takes or refreshes the locks of all); the holder looks
        again when the next job is due, or after `promote_interval` (jobs scheduled meanwhile)."""
        now = time.monotonic()
        if now >= self._next_lock:
            self._next_lock = now + self.lock_interval
            with self.connection.pipeline(transaction=False) as pipe:
                for queue in self.queues:
                    self._acquire(keys=[RQScheduler.get_locking_key(queue.name)], args=[self.name, self.lock_ttl],
                                  client=pipe)
                held = pipe.execute()
            self._held = [queue.name for queue, ok in zip(self.queues, held) if ok]
        if not self._held or now < self._next_promote:
            return
        next_due = time.time() + self.promote_interval
        for queue in self.queues:
            if queue.name in self._held:
                due = promote_due_jobs(queue)
                if due is not None:
                    next_due = min(next_due, due)
        self._next_promote = time.monotonic() + max(0.0, next_due - time.time())

    def close(self) -> None:
        """Give back the scheduler locks and the connections."""
        try:
            for name in self._held:
                self._release(keys=[RQScheduler.get_locking_key(name)], args=[self.name])
        except redis.RedisError:
            pass  # they expire within lock_ttl
        self.connection.connection_pool.disconnect()


__all__ = ["FlowcraftJob", "FlowcraftQueue", "FlowcraftScheduler", "FlowcraftWorker", "InProcessWorker", "MAX_JOB_BYTES",
           "RefusedJob", "is_job_id", "promote_due_jobs"]
