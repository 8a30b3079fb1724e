"""`RqAdapter`: Flowcraft's distributed driver with RQ (python-rq) as its job queue.

Run state, the commit protocol, coordination and the reconciler are those of `RedisAdapter`
(`RedisRunStore`, `RedisCoordinationStore`, `create_redis_reconciler`); only the queue differs:
every Flowcraft job is an RQ job, executed by `RqAdapter.work()` or by RQ's command line with our
worker class (`rq_worker.FlowcraftWorker`)::

    FLOWCRAFT_APP=myapp.workflows:runtime rq worker -w flowcraft_redis.rq_worker.FlowcraftWorker \\
        --serializer rq.serializers.JSONSerializer --with-scheduler flowcraft-queue

Both run Flowcraft jobs only: an RQ job that is not exactly ``run_node(<one string>)`` (another
function, callbacks, an unreadable hash...) is dead-lettered before RQ imports anything it names.
RQ's own worker classes run Flowcraft jobs too, but they run ANY job of the queue: RQ trusts its
queue, so whoever can write its Redis keys runs code in such a worker.

Modules: `rq_settings` (the settings a job carries), `rq_queue` (`RqQueue`, the making of RQ
jobs), `rq_store` (`RqRunStore`, commits with their publication), `rq_worker` (`FlowcraftWorker`,
which refuses foreign jobs, and the RQ worker of `work()`), `rq_jobs` (the job function).

RQ jobs
    ``flowcraft_redis.rq_jobs.run_node("<job JSON>")`` on the RQ queue `queue_name` (a job of a
    routed node: on the RQ queue its `Job.queue` names, with ``meta["flowcraft_queue"]`` =
    `queue_name`, where its unrouted successors go), serialized
    with ``rq.serializers.JSONSerializer`` (never pickle): the one argument is the Flowcraft wire
    payload ``{"runId", "blueprintId", "nodeId", ...}``. Options: ``result_ttl`` (60 s: RQ expires
    finished jobs; 0 would delete each at once, which costs RQ about nine more round trips a job),
    ``job_timeout=-1`` (node timeouts belong to the blueprint), ``failure_ttl`` = the state TTL,
    ``retry=Retry(max=len(retry_intervals), interval=retry_intervals)`` (infrastructure failures,
    below) and ``meta={"flowcraft": {...}}``: the settings of the adapter that enqueued the job (key
    prefix, state TTL, retry mode, these job options), which any worker follows (a job without
    them, from a foreign client, gets the defaults: prefix "", ...).
    The RQ job id is deterministic, ``fc-<its queue>-<hash of prefix, kind, run, node, iteration,
    item, attempt>``: enqueueing a job whose RQ job is still waiting (queued, scheduled or
    deferred) does nothing, since that job reads the run's state after the enqueuer's commit
    anyway; when the id belongs to a job that is running or over, a suffixed id is used. The
    reconciler does not trust the hash's status: it skips a job only if RQ really has it waiting
    (in the queue list or being taken, in the scheduled or deferred registry) or running (started,
    heartbeat not expired); a lost job (its id removed from the queue, its hash left) is enqueued
    again (`RqQueue.requeue`; the queue-list check is one scan per reconciler pass).
    The RQ job hash is RQ's own ``Job.to_dict()``; a Lua script checks the id, writes the hash and
    pushes the id onto RQ's queue (or its scheduled registry) atomically, as RQ's
    ``enqueue(unique=True)`` does.

Jobs of a commit (the outbox)
    `RedisRunStore` commits a node's completion and its successors' jobs in one Lua script, which
    puts the job bodies on an outbox (``<prefix><queue>.outbox`` list, ``...outbox:delayed`` zset
    for timers). `RqRunStore.commit` sends that script and the publish script in one pipelined
    round trip: the publish script takes the commit's entries off the outbox and makes their RQ
    jobs. Entries a dead worker left behind (and timers) are published by `drain_outbox`, which
    runs when a commit sees a non-empty outbox, when a redelivered job finds its node done, and at
    the start of `work()`; each entry is taken by exactly one publish call. Per node execution
    that is 2 Redis round trips of ours (load; commit + publish) next to RQ's own (about 18 per job
    in RQ 2.12 with a `SimpleWorker`; a raw RQ ``depends_on`` chain job takes about 24 in all).

Delays
    Timers (sleep nodes), version-mismatch and concurrency-limit put-backs and `reconcile`'s
    pending timers are RQ scheduled jobs (as ``enqueue_at``) of the job's queue, scored with their
    due time rounded UP to the millisecond. They need an RQ scheduler: ``rq worker
    --with-scheduler`` (RQ's compares scores with the whole second: a job moves up to a second
    late, never early), or `RqAdapter.work()`, which moves due jobs itself while it holds RQ's
    per-queue scheduler lock (one scheduler per queue does it): between jobs, when the next one is
    due, and at least every 0.1 s (jobs other workers scheduled), so a 0.1 s concurrency put-back
    comes back in about that time.

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
    is failed with that reason; the worker goes on. An RQ job that is not a Flowcraft job at all
    (another function, callbacks, an unreadable hash) never reaches the job function:
    `FlowcraftWorker` files it there itself, its reason starting with "refused: " (see `rq_worker`).

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
      drain by any worker (see above) or client;
    - once RQ's retries are spent (the job is in FailedJobRegistry), or the job's heartbeat has
      expired in StartedJobRegistry, the reconciler
      (`create_redis_reconciler(adapter).run()`, ``flowcraft reconcile --backend rq``) re-enqueues
      the frontier of runs idle longer than its threshold, under fresh RQ job ids;
    - node code may run again (at-least-once); ``ctx.idempotency_key`` de-duplicates side effects.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import redis
from rq import Retry

from flowcraft.distributed import DistributedAdapter
from flowcraft.execution import NodeFailure
from flowcraft.ports import Delivery, Job
from flowcraft.result import format_traceback

from ._util import connect
from .coordination import RedisCoordinationStore
from .rq_queue import RUN_NODE, InFlight, RqQueue
from .rq_settings import (DEFAULT_RESULT_TTL, DEFAULT_RETRY_INTERVALS, DeadLettered, RqSettings, dead_letter_rq_job, fail_rq_job,
                          retry_interval)
from .rq_store import RqRunStore
from .rq_worker import InProcessWorker

logger = logging.getLogger("flowcraft.redis.rq")


class RqAdapter(DistributedAdapter):
    """A worker and client whose jobs are RQ jobs, and whose runs live in Redis (see the module doc).

    Options beyond the spec's: `prefix` (our key prefix; RQ's own keys are RQ's, under ``rq:``),
    `job_timeout` (seconds an RQ job may run, -1 = unbounded), `failure_ttl` (how long RQ keeps a
    failed or dead-lettered job; default: the state TTL), `retry_intervals` (seconds between RQ's
    re-runs of a job whose function raised; one re-run per entry), `result_ttl` (seconds RQ keeps a
    finished job), `reconnect_backoff` ((first, max) seconds between restarts of `work()`'s RQ
    worker after a Redis outage), `poll_timeout` (seconds `work()` blocks on an empty queue between
    checks for `stop()` and due scheduled jobs), `queues` (the RQ queues `work()` serves, in
    priority order; default: `queue_name`); the rest go to `DistributedAdapter`.
    """

    queue: RqQueue
    store: RqRunStore

    def __init__(self, runtime: Any, redis_url_or_client: Any, queue_name: str = "flowcraft-queue",
                 state_ttl_seconds: int = 86400, retry_mode: str = "in-process", *, prefix: str = "",
                 job_timeout: int = -1, failure_ttl: Optional[int] = None, result_ttl: int = DEFAULT_RESULT_TTL,
                 retry_intervals: Sequence[int] = DEFAULT_RETRY_INTERVALS,
                 reconnect_backoff: Tuple[float, float] = (0.1, 5.0), queues: Optional[Sequence[str]] = None,
                 **options: Any) -> None:
        if int(options.get("threads", 1)) != 1:
            raise ValueError("RqAdapter does not take threads: its jobs run in RQ worker processes (`rq worker`, "
                             "or RqAdapter.work()), one job at a time each; for N at once run N of them "
                             "(`rq worker-pool -n N`, or `flowcraft worker --backend rq --concurrency N`)")
        client = connect(redis_url_or_client)
        settings = RqSettings(prefix, int(state_ttl_seconds), retry_mode, job_timeout, failure_ttl, result_ttl,
                              tuple(retry_intervals))
        queue = RqQueue(client, queue_name, settings, queues)
        store = RqRunStore(client, queue, state_ttl_seconds, clock=options.get("clock", time.time))
        super().__init__(runtime, queue, store, RedisCoordinationStore(client, prefix), retry_mode=retry_mode,
                         **options)
        self.redis = client
        self.queue_name = queue_name
        self.settings = settings
        self.reconnect_backoff = reconnect_backoff
        self._sibling_options = dict(options, reconnect_backoff=reconnect_backoff)
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

    def node_failed(self, job: Job, failure: NodeFailure) -> None:
        super().node_failed(job, failure)
        inflight = getattr(self.queue._local, "inflight", None)
        if inflight is not None and inflight.delivery.job is not None and inflight.delivery.job.key == job.key:
            cause = failure.cause
            text = format_traceback(cause) or ""
            inflight.node_failure = f"node {failure.node_id!r} failed: {type(cause).__name__}: {cause}\n{text}"

    def run_rq_job(self, rq_job: Any, body: Any) -> Optional[Retry]:
        """Process the Flowcraft job `body` of the running RQ job `rq_job` (see `rq_jobs.run_node`)."""
        if isinstance(body, (dict, list)):  # a client that passed the payload as a JSON value
            body = json.dumps(body)
        retries = int(rq_job.number_of_retries or 0)
        delivery = Delivery.parse(body, rq_job.id)
        if delivery.job is not None and retries:
            delivery.job = delivery.job.with_(attempt=delivery.job.attempt + retries)
        inflight = InFlight(rq_job, delivery)
        with self.queue.handling(inflight):
            self.handle(delivery)
        if inflight.dead_reason is not None:
            dead_letter_rq_job(rq_job, inflight.dead_reason)
        if inflight.node_failure is not None:  # committed: the RQ job fails too (SPEC 11)
            fail_rq_job(rq_job, inflight.node_failure)
        if inflight.retry_delay is not None:
            return Retry(max=retries + 1, interval=retry_interval(inflight.retry_delay))
        return None

    # --- worker ---------------------------------------------------------------------------

    def work(self, burst: bool = False, max_jobs: Optional[int] = None) -> int:
        """Run an RQ `SimpleWorker` on this adapter's queues (`queues`, in order) in this thread (its jobs run with this
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
            worker: Optional[InProcessWorker] = None
            failure: Optional[BaseException] = None
            try:
                self.store.publish_outbox("", self.queue)  # jobs a crashed worker committed and never published
                worker = InProcessWorker(self)
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
            logger.warning("rq worker on %s stopped on %s: %s; restarting in %.1fs", ", ".join(self.queue.queues),
                           type(failure).__name__, failure, backoff)
            if self._stop.wait(backoff):
                break
        return processed

    def stopping(self) -> bool:
        """Has `stop()` (or the ``flowcraft worker`` command's stop signal) been asked for?"""
        return self._stop.is_set()


__all__ = ["DEFAULT_RETRY_INTERVALS", "DeadLettered", "RqAdapter", "RqQueue", "RqRunStore", "RqSettings", "RUN_NODE"]
