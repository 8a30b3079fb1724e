"""The RQ worker inside `RqAdapter.work()`: a `SimpleWorker` that runs Flowcraft jobs with its
adapter bound, leaves signals, logging and the process title to the application, and moves due
scheduled jobs to the queue itself (as ``rq worker --with-scheduler`` does) while it holds RQ's
per-queue scheduler lock.
"""
from __future__ import annotations

import os
import re
import socket
import time
from typing import Any, Optional

import redis
from rq import Queue
from rq.exceptions import StopRequested
from rq.job import Job as RqJob
from rq.registry import ScheduledJobRegistry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from . import rq_jobs


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


class InProcessWorker(SimpleWorker):
    """The RQ worker inside `RqAdapter.work()`: jobs run with the adapter bound; no signal handlers,
    no log handlers, no pub/sub thread, no process title; it checks the adapter's stop event and
    moves due scheduled jobs between short blocking dequeues."""

    death_penalty_class = TimerDeathPenalty  # no SIGALRM: works off the main thread
    promote_interval = 0.5
    lock_ttl = 10

    def __init__(self, adapter: Any) -> None:
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


__all__ = ["InProcessWorker"]
