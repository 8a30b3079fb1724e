"""`RedisQueue`: the `JobQueue` port as a reliable Redis list queue.

Jobs are JSON bodies LPUSHed onto ``<queue>``; a worker moves them (RIGHT -> LEFT, so FIFO) to its
own ``<queue>:processing:<worker id>`` list and removes them from there when acknowledged (the
threads of one worker share its list).

A dead worker's jobs go back to the ready list within about a second, found by any live worker's
monitor thread (`recover_dead_workers`, every `recover_interval`, 0.5 s by default: two cheap round
trips). Each worker holds one connection of its own for its whole life and registers that
connection's ``CLIENT ID`` in ``<queue>:clients``; when the process dies, its socket closes and
Redis forgets the client at once, so a registered id missing from ``CLIENT LIST ID ...`` means a
dead worker. A host that vanishes without closing its sockets (power loss, a partition) is found by
the fallback, the heartbeat ``<queue>:worker:<id>`` (refreshed on every fetch and by the monitor
thread every `heartbeat_ttl` / 3) expiring. A worker whose connection dropped while it lives (a
Redis restart) registers its new id at its next tick; meanwhile its jobs may be given back and run
again elsewhere, which at-least-once delivery allows (no node is committed twice).
Delayed jobs wait in the ``<queue>:delayed`` ZSET (score = due time) until `fetch` promotes them.
Bytes in, bytes out: nothing is ever unpickled.

Routing (SPEC 14): a job whose `queue` names another queue goes to that queue's lists (its own
``<name>``, ``<name>:delayed``); a worker serving `queues` (default: its `queue_name`) takes from
their ready lists in that order (one script call; then, when all are empty, it blocks on the first
for at most `poll_interval` and looks again) into one processing list per queue,
``<name>:processing:<worker id>``. Workers register (workers set, clients hash, heartbeat) under
the default queue's keys, whatever they serve, with the queues they serve in
``<queue>:queues`` (worker id -> JSON list; absent: the default queue only), so that any live
worker gives a dead one's jobs back to the lists they came from, and `live_workers` knows them
all. Dead letters of every queue go to the default queue's ``<queue>:dead``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import redis

from flowcraft.operations import DeadLetter
from flowcraft.ports import Delivery, Job, WorkerInfo

from ._util import delayed_member, load_script, to_text, translate_errors
from .keys import QueueKeys, keys_of_queue, queue_name_problem, validate_simple

logger = logging.getLogger("flowcraft.redis.queue")


def _own_connection(client: Any) -> Any:
    """A client on one connection of `client`'s pool, held for the worker's life (None when the
    client has no such pool, e.g. a test double: then only heartbeats tell a dead worker)."""
    pool = getattr(client, "connection_pool", None)
    if pool is None or not isinstance(client, redis.Redis):
        return None
    try:
        holder = redis.Redis(connection_pool=pool, single_connection_client=True)
        holder.client_id()
        return holder
    except redis.ResponseError:
        return None


def default_worker_id() -> str:
    host = "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{os.urandom(4).hex()}"


def _simple(worker_id: str) -> bool:
    try:
        validate_simple("worker id", worker_id)
    except ValueError:
        return False
    return True


def served_queues(queues: Optional[Sequence[str]], default: str) -> Tuple[str, ...]:
    """The queues a worker serves, checked (None: the default queue only)."""
    if queues is None:
        return (default,)
    if isinstance(queues, str) or not queues:
        raise ValueError(f"queues must be a non-empty list of queue names, not {queues!r}")
    return tuple(dict.fromkeys(validate_simple("queue name", q) for q in queues))


class RedisQueue:
    """A reliable job queue on Redis lists (see the module doc)."""

    def __init__(self, client: Any, queue_name: str = "flowcraft-queue", worker_id: Optional[str] = None,
                 prefix: str = "", *, heartbeat_ttl: float = 30.0, recover_interval: float = 0.5,
                 promote_limit: int = 1000, clock: Callable[[], float] = time.time,
                 queues: Optional[Sequence[str]] = None, poll_interval: float = 0.1) -> None:
        self.client = client
        self.keys = QueueKeys(queue_name, prefix)
        self.queue_name = queue_name
        self.queues = served_queues(queues, queue_name)
        self.poll_interval = float(poll_interval)
        self.worker_id = validate_simple("worker id", worker_id or default_worker_id())
        self.served_keys = [self.keys_of(q) for q in self.queues]
        self.processing_key = self.served_keys[0].processing(self.worker_id)
        # processing list -> the ready list its jobs go back to
        self._ready_of = {k.processing(self.worker_id): k.ready for k in self.served_keys}
        self.heartbeat_key = self.keys.heartbeat(self.worker_id)
        if heartbeat_ttl <= 0:
            raise ValueError(f"heartbeat_ttl must be > 0, not {heartbeat_ttl!r}")
        self.heartbeat_ttl = float(heartbeat_ttl)
        self.recover_interval = float(recover_interval)
        self.promote_limit = int(promote_limit)
        self.clock = clock
        self._promote = load_script(client, "take.lua", "promote.lua")
        self._take_many = load_script(client, "take_many.lua")
        self._recover = load_script(client, "recover.lua")
        # Jobs a commit took for this worker (see `take_step`), served by the next `fetch`.
        self.prefetch = 0  # how many a commit may take: set while a worker loop runs
        self._stash: List[bytes] = []
        self._lock = threading.Lock()
        self._last_recover = float("-inf")
        self._started = False
        self._start_lock = threading.Lock()
        self._beat_stop = threading.Event()
        self._beat_thread: Optional[threading.Thread] = None
        self._holder: Any = None  # this worker's own connection, whose CLIENT ID it registers
        self._client_id: Optional[str] = None  # the id registered

    def keys_of(self, name: Optional[str]) -> QueueKeys:
        """The keys of queue `name` (None: the default queue), under this queue's prefix."""
        return self.keys if name is None or name == self.keys.name else keys_of_queue(name, self.keys.prefix)

    def queue_name_problem(self, name: str) -> Optional[str]:
        return queue_name_problem(name)

    # --- producing -------------------------------------------------------------------------

    @translate_errors
    def enqueue(self, jobs: Sequence[Job], delay: float = 0.0) -> None:
        if not jobs:
            return
        groups: Dict[Optional[str], List[bytes]] = {}
        for job in jobs:
            groups.setdefault(job.queue, []).append(job.to_json().encode())
        pipe = self.client.pipeline(transaction=False) if len(groups) > 1 else self.client
        for name, bodies in groups.items():
            keys = self.keys_of(name)
            if delay and delay > 0:
                due = self.clock() + float(delay)
                pipe.zadd(keys.delayed, {delayed_member(b): due for b in bodies})
            else:
                pipe.lpush(keys.ready, *bodies)
        if pipe is not self.client:
            pipe.execute()

    @translate_errors
    def push_raw(self, body: Any, queue: Optional[str] = None) -> None:
        """Publish a raw message, as a foreign (or broken) client would."""
        self.client.lpush(self.keys_of(queue).ready, body)

    # --- consuming -------------------------------------------------------------------------

    @translate_errors
    def fetch(self, max_jobs: int = 1, timeout: float = 1.0) -> List[Delivery]:
        """Promote due delayed jobs, refresh the heartbeat and take up to `max_jobs` jobs in one
        script call; when none is ready, block on BLMOVE for up to `timeout` seconds."""
        max_jobs = max(1, int(max_jobs))
        if not self._started:
            self._start()
        with self._lock:
            bodies, self._stash = self._stash[:max_jobs], self._stash[max_jobs:]
        if bodies:
            return [Delivery.parse(b, (self.processing_key, b)) for b in bodies]
        if len(self.queues) > 1:
            return self._fetch_many(max_jobs, timeout)
        keys, args = self.take_step(max_jobs)
        reply = self._promote(keys=keys, args=args)
        next_due, bodies = reply[0], list(reply[1:])
        if not bodies and timeout and timeout > 0:
            wait = float(timeout)
            if next_due:
                wait = min(wait, max(0.0, float(to_text(next_due)) - self.clock()))
            if wait >= 0.01:
                body = self._blocking_move(wait)
                if body is not None:
                    bodies.append(body)
                    if max_jobs > 1:
                        pipe = self.client.pipeline(transaction=False)
                        for _ in range(max_jobs - 1):
                            pipe.lmove(self.served_keys[0].ready, self.processing_key, "RIGHT", "LEFT")
                        bodies += [b for b in pipe.execute() if b is not None]
        return [Delivery.parse(b, (self.processing_key, b)) for b in bodies]

    def _fetch_many(self, max_jobs: int, timeout: float) -> List[Delivery]:
        """`fetch` over several queues: one take_many.lua step; when nothing is ready, a blocking
        move from the first queue for at most `poll_interval`, then the step again, until `timeout`."""
        deadline = time.monotonic() + max(0.0, float(timeout or 0.0))
        keys = [self.heartbeat_key, self.keys.workers]
        for k in self.served_keys:
            keys += [k.delayed, k.ready, k.processing(self.worker_id)]
        while True:
            args = [repr(self.clock()), self.promote_limit, max_jobs, self.worker_id, int(self.heartbeat_ttl * 1000)]
            reply = self._take_many(keys=keys, args=args)
            taken = [(self.served_keys[int(reply[i]) - 1], reply[i + 1]) for i in range(1, len(reply), 2)]
            if taken:
                return [Delivery.parse(b, (k.processing(self.worker_id), b)) for k, b in taken]
            wait = min(deadline - time.monotonic(), self.poll_interval)
            if reply[0]:
                wait = min(wait, max(0.0, float(to_text(reply[0])) - self.clock()))
            if wait < 0.01:
                if time.monotonic() >= deadline:
                    return []
                continue
            body = self._blocking_move(wait)
            if body is not None:
                return [Delivery.parse(body, (self.processing_key, body))]

    def take_step(self, max_jobs: int) -> Tuple[List[str], List[Any]]:
        """The KEYS and ARGV of one fetch step (take.lua) of a worker serving one queue: promote
        due delayed jobs, beat, take jobs."""
        served = self.served_keys[0]
        keys = [served.delayed, served.ready, self.processing_key, self.heartbeat_key, self.keys.workers]
        args = [repr(self.clock()), self.promote_limit, max_jobs, self.worker_id, int(self.heartbeat_ttl * 1000)]
        return keys, args

    def wanted_with_commit(self) -> int:
        """How many jobs a commit made now should take for this worker (0: none; always none for a
        worker serving several queues, whose fetch step is take_many.lua)."""
        if len(self.queues) > 1:
            return 0
        with self._lock:
            return max(0, self.prefetch - len(self._stash)) if self._started else 0

    def hold(self, count: int, commits_take: bool = True) -> None:
        """The worker's next fetch asks for `count` jobs: its commits take up to that many with
        them (none when `commits_take` is False: a committer thread's commits would take jobs
        that wait in the stash while the worker's threads block on the ready list)."""
        self.prefetch = count if commits_take else 0

    def release(self) -> int:
        """The worker loop ends: give back the jobs its commits took and it did not fetch."""
        self.prefetch = 0
        return self.release_stash()

    def recover(self) -> None:
        """Redis answers again after an outage: give back the jobs this worker held (neither
        surely committed nor acknowledged)."""
        self.requeue_own()

    def stash(self, reply: Sequence[Any]) -> None:
        """Keep the jobs a commit's fetch step took (its reply: next due time, bodies) for `fetch`."""
        with self._lock:
            self._stash.extend(reply[1:])

    @translate_errors
    def release_stash(self) -> int:
        """Give back the jobs taken with commits and not fetched yet (the worker loop ends)."""
        with self._lock:
            bodies, self._stash = self._stash, []
        if bodies:
            pipe = self.client.pipeline(transaction=True)
            for body in reversed(bodies):  # the next to be taken again: at the right end, in order
                pipe.lrem(self.processing_key, 1, body)
                pipe.rpush(self.served_keys[0].ready, body)
            pipe.execute()
        return len(bodies)

    @translate_errors
    def give_back(self, deliveries: Sequence[Delivery]) -> None:
        """Deliveries fetched that the worker will not start (its batch turned out slow): back to
        the consuming end of the ready list, in order, for any worker to take next."""
        if not deliveries:
            return
        pipe = self.client.pipeline(transaction=True)
        for d in reversed(deliveries):
            pipe.lrem(d.tag[0], 1, d.tag[1])
            pipe.rpush(self._ready_of.get(d.tag[0], self.served_keys[0].ready), d.tag[1])
        pipe.execute()

    def _blocking_move(self, wait: float) -> Optional[bytes]:
        socket_timeout = self.client.connection_pool.connection_kwargs.get("socket_timeout")
        if socket_timeout:
            wait = min(wait, max(0.01, socket_timeout - 0.5))
        try:
            return self.client.blmove(self.served_keys[0].ready, self.processing_key, round(wait, 3), "RIGHT", "LEFT")
        except redis.TimeoutError:
            return None

    @translate_errors
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        todo = [d for d in deliveries if not d.acked]  # the run store's commit removed those already
        if not todo:
            return
        if len(todo) == 1:
            self.client.lrem(todo[0].tag[0], 1, todo[0].tag[1])
            return
        pipe = self.client.pipeline(transaction=False)
        for d in todo:
            pipe.lrem(d.tag[0], 1, d.tag[1])
        pipe.execute()

    @translate_errors
    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        entry = json.dumps({"body": to_text(delivery.body), "reason": reason, "at": time.time()}, ensure_ascii=False)
        pipe = self.client.pipeline(transaction=True)
        pipe.lpush(self.keys.dead, entry)
        pipe.lrem(delivery.tag[0], 1, delivery.tag[1])
        pipe.execute()

    # --- workers ---------------------------------------------------------------------------

    @translate_errors
    def recover_dead_workers(self) -> int:
        """Give back the jobs of dead workers: those whose registered client connection is gone
        (`CLIENT LIST ID`), and, as the fallback, those whose heartbeat expired; return how many
        jobs came back."""
        self._last_recover = time.monotonic()
        pipe = self.client.pipeline(transaction=False)
        pipe.smembers(self.keys.workers)
        pipe.hgetall(self.keys.clients)
        pipe.hgetall(self.keys.queues)
        members, registered, serving = pipe.execute()
        clients = {to_text(k): to_text(v) for k, v in registered.items()}
        served = {to_text(k): v for k, v in serving.items()}
        others: List[str] = []
        for worker_id in {to_text(m) for m in members} | set(clients):
            if worker_id == self.worker_id:
                continue
            try:
                validate_simple("worker id", worker_id)
            except ValueError:
                self.client.srem(self.keys.workers, worker_id)
                self.client.hdel(self.keys.clients, worker_id)
                self.client.hdel(self.keys.queues, worker_id)
                continue
            others.append(worker_id)
        gone = self._gone_clients([clients[w] for w in others if w in clients])
        moved = 0
        for worker_id in others:
            client_id = clients.get(worker_id)
            mode = "2" if client_id is not None and client_id in gone else "0"
            keys = self._worker_keys(worker_id, self._queues_of(served.get(worker_id)))
            n = self._recover(keys=keys, args=[worker_id, mode, client_id or ""])
            moved += max(0, int(n))
        return moved

    def _gone_clients(self, client_ids: List[str]) -> Set[str]:
        """Which of these client ids Redis no longer has connected (`CLIENT LIST ID`, Redis 6.2+;
        none when it cannot tell, and the heartbeat decides)."""
        wanted = [c for c in client_ids if c.isdigit()]
        if not wanted:
            return set()
        try:
            live = {str(entry.get("id")) for entry in self.client.client_list(client_id=wanted)}
        except redis.ResponseError:  # an older Redis, or CLIENT not allowed to this user
            return set()
        return set(wanted) - live

    def _queues_of(self, entry: Any) -> List[QueueKeys]:
        """The keys of the queues a registered worker serves (its `<queue>:queues` entry; none: the
        default queue; names that are not queue names are skipped)."""
        if entry is None:
            return [self.keys]
        try:
            names = json.loads(entry)
        except ValueError:
            names = None
        if not isinstance(names, list):
            return [self.keys]
        return [self.keys_of(n) for n in names if isinstance(n, str) and _simple(n)] or [self.keys]

    def _worker_keys(self, worker_id: str, queues: Sequence[QueueKeys]) -> List[str]:
        keys = [self.keys.heartbeat(worker_id), self.keys.workers, self.keys.clients, self.keys.queues]
        for k in queues:
            keys += [k.processing(worker_id), k.ready]
        return keys

    @translate_errors
    def requeue_own(self) -> int:
        """Give back every job this worker holds (after it lost track of them, e.g. a lost
        connection in the middle of a job, or a previous process with the same worker id)."""
        n = self._recover(keys=self._worker_keys(self.worker_id, self.served_keys), args=[self.worker_id, "1", ""])
        with self._lock:
            self._stash.clear()
        return int(n)

    def _start(self) -> None:
        with self._start_lock:  # the threads of one worker: one of them starts it
            if self._started:
                return
            self.requeue_own()
            self._holder = _own_connection(self.client)
            self._register()
            self._started = True
            self._beat_stop.clear()
            self._beat_thread = threading.Thread(target=self._monitor, name=f"flowcraft-monitor-{self.worker_id}",
                                                 daemon=True)
            self._beat_thread.start()

    def _register(self) -> None:
        """Register the CLIENT ID of this worker's own connection (again after it reconnected)."""
        holder = self._holder
        if holder is None:
            return
        client_id = str(holder.client_id())
        if client_id != self._client_id:
            pipe = holder.pipeline(transaction=False)
            pipe.hset(self.keys.clients, self.worker_id, client_id)
            pipe.sadd(self.keys.workers, self.worker_id)
            if self.queues != (self.queue_name,):
                pipe.hset(self.keys.queues, self.worker_id, json.dumps(list(self.queues)))
            pipe.execute()
            self._client_id = client_id

    def _monitor(self) -> None:
        """The worker's background thread: every `recover_interval` it checks its own
        registration and gives back dead workers' jobs; every `heartbeat_ttl` / 3 it beats."""
        beat_every = max(0.05, self.heartbeat_ttl / 3)
        tick = max(0.01, min(self.recover_interval, beat_every))
        last_beat = time.monotonic()
        while not self._beat_stop.wait(tick):
            try:
                if time.monotonic() - last_beat >= beat_every:
                    (self._holder or self.client).set(self.heartbeat_key, "1", px=int(self.heartbeat_ttl * 1000))
                    last_beat = time.monotonic()
                self._register()
                if time.monotonic() - self._last_recover >= self.recover_interval:
                    self.recover_dead_workers()
            except (redis.RedisError, ConnectionError, OSError):
                pass  # the worker loop sees the outage and reconnects
            except Exception:  # a monitor must not die of a bug: the heartbeat fallback still holds
                logger.exception("redis worker monitor: tick failed")

    @translate_errors
    def close(self) -> None:
        """Stop the monitor thread and unregister (jobs still held are given back first)."""
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(1.0)
            self._beat_thread = None
        if self._started:
            self._started = False
            self.requeue_own()
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(self.heartbeat_key)
            pipe.srem(self.keys.workers, self.worker_id)
            pipe.hdel(self.keys.clients, self.worker_id)
            pipe.hdel(self.keys.queues, self.worker_id)
            pipe.execute()
        holder, self._holder, self._client_id = self._holder, None, None
        if holder is not None:
            try:
                holder.close()
            except Exception:  # closing a connection that is gone already: nothing is held any more
                logger.debug("closing the worker's own Redis connection failed", exc_info=True)

    # --- inspection ------------------------------------------------------------------------

    @translate_errors
    def dead_letters(self) -> List[dict]:
        return [json.loads(x) for x in self.client.lrange(self.keys.dead, 0, -1)]

    # --- dead letters (SPEC 11): the id of one is the SHA-1 of its entry ---------------------

    @translate_errors
    def list_dead_letters(self, limit: Optional[int] = 100) -> List[DeadLetter]:
        """The dead letters, oldest first (at most `limit`; None: all)."""
        raw = self.client.lrange(self.keys.dead, 0, -1)[::-1]  # LPUSHed: the oldest is last
        out = []
        for entry in raw[:limit]:
            try:
                data = json.loads(entry)
            except ValueError:
                data = {"body": to_text(entry), "reason": "unreadable dead letter"}
            body = str(data.get("body", "")).encode("utf-8", "surrogateescape")
            out.append(DeadLetter(hashlib.sha1(entry).hexdigest(), body, str(data.get("reason", "")),
                                  Delivery.parse(body, None).run_id_hint(), float(data.get("at") or 0.0)))
        return out

    @translate_errors
    def remove_dead_letter(self, dead_letter_id: str, publish: bool = True, queue: Optional[str] = None) -> bool:
        """Take a dead letter out (LREM) and, when `publish`, push its body to the ready list of
        `queue` (None: the default one), in one MULTI; False if no dead letter has that id."""
        ready = self.keys_of(queue).ready
        for entry in self.client.lrange(self.keys.dead, 0, -1):
            if hashlib.sha1(entry).hexdigest() != dead_letter_id:
                continue
            pipe = self.client.pipeline(transaction=True)
            pipe.lrem(self.keys.dead, 1, entry)
            if publish:
                pipe.lpush(ready, json.loads(entry)["body"])
            removed = pipe.execute()[0]
            if not removed and publish:  # someone else took it meanwhile: undo our push
                self.client.lrem(ready, 1, json.loads(entry)["body"])
            return bool(removed)
        return False

    @translate_errors
    def purge_dead_letters(self) -> int:
        pipe = self.client.pipeline(transaction=True)
        pipe.llen(self.keys.dead)
        pipe.delete(self.keys.dead)
        return int(pipe.execute()[0])

    @translate_errors
    def live_workers(self, queues: Sequence[str] = ()) -> List[WorkerInfo]:
        """The registered workers whose heartbeat has not expired, with the queues they serve
        (every worker registers under the default queue: `queues` adds none)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.smembers(self.keys.workers)
        pipe.hkeys(self.keys.clients)
        pipe.hgetall(self.keys.queues)
        members, registered, serving = pipe.execute()
        served = {to_text(k): v for k, v in serving.items()}
        ids = sorted({to_text(m) for m in members} | {to_text(k) for k in registered})
        ids = [w for w in ids if _simple(w)]
        pipe = self.client.pipeline(transaction=False)
        for worker_id in ids:
            pipe.pttl(self.keys.heartbeat(worker_id))
        out = []
        for w, ttl in zip(ids, pipe.execute() if ids else []):
            if int(ttl) > 0:
                names = tuple(k.name for k in self._queues_of(served.get(w)))
                out.append(WorkerInfo(w, names[0], None, f"heartbeat expires in {ttl / 1000:.0f}s", names))
        return out

    @translate_errors
    def depth(self, queue: Optional[str] = None) -> int:
        """Jobs ready to be taken now on `queue` (None: the default queue; not delayed, not in a
        worker's hands): the queue's depth."""
        return int(self.client.llen(self.keys_of(queue).ready))

    @translate_errors
    def pending(self) -> int:
        """Jobs of the served queues not done with: ready, delayed, or held by this worker."""
        pipe = self.client.pipeline(transaction=False)
        for k in self.served_keys:
            pipe.llen(k.ready)
            pipe.zcard(k.delayed)
            pipe.llen(k.processing(self.worker_id))
        return sum(pipe.execute())
