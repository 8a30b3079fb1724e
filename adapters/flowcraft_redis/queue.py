"""`RedisQueue`: the `JobQueue` port as a reliable Redis list queue.

Jobs are JSON bodies LPUSHed onto ``<queue>``; a worker moves them (RIGHT -> LEFT, so FIFO) to its
own ``<queue>:processing:<worker id>`` list and removes them from there when acknowledged. A worker
refreshes its heartbeat ``<queue>:worker:<id>`` on every fetch (and from a background thread while
it runs a long job); the processing list of a worker whose heartbeat expired is moved back to the
ready list by any other worker (`recover_dead_workers`, run from `fetch` every few seconds).
Delayed jobs wait in the ``<queue>:delayed`` ZSET (score = due time) until `fetch` promotes them.
Bytes in, bytes out: nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections import Counter
from typing import Any, Callable, List, Optional, Sequence, Tuple

import redis

from flowcraft.operations import DeadLetter
from flowcraft.ports import Delivery, Job

from ._util import delayed_member, load_script, to_text, translate_errors
from .keys import QueueKeys, validate_simple


def default_worker_id() -> str:
    host = "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{os.urandom(4).hex()}"


class RedisQueue:
    """A reliable job queue on Redis lists (see the module doc)."""

    def __init__(self, client: Any, queue_name: str = "flowcraft-queue", worker_id: Optional[str] = None,
                 prefix: str = "", *, heartbeat_ttl: float = 30.0, recover_interval: float = 5.0,
                 promote_limit: int = 1000, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.keys = QueueKeys(queue_name, prefix)
        self.queue_name = queue_name
        self.worker_id = validate_simple("worker id", worker_id or default_worker_id())
        self.processing_key = self.keys.processing(self.worker_id)
        self.heartbeat_key = self.keys.heartbeat(self.worker_id)
        if heartbeat_ttl <= 0:
            raise ValueError(f"heartbeat_ttl must be > 0, not {heartbeat_ttl!r}")
        self.heartbeat_ttl = float(heartbeat_ttl)
        self.recover_interval = float(recover_interval)
        self.promote_limit = int(promote_limit)
        self.clock = clock
        self._promote = load_script(client, "take.lua", "promote.lua")
        self._recover = load_script(client, "recover.lua")
        self._acked: Counter = Counter()  # tags the store already acknowledged within a commit
        # Jobs a commit took for this worker (see `take_step`), served by the next `fetch`.
        self.prefetch = 0  # how many a commit may take: set while a worker loop runs
        self._stash: List[bytes] = []
        self._lock = threading.Lock()
        self._last_recover = float("-inf")
        self._started = False
        self._beat_stop = threading.Event()
        self._beat_thread: Optional[threading.Thread] = None

    # --- producing -------------------------------------------------------------------------

    @translate_errors
    def enqueue(self, jobs: Sequence[Job], delay: float = 0.0) -> None:
        if not jobs:
            return
        bodies = [j.to_json().encode() for j in jobs]
        if delay and delay > 0:
            due = self.clock() + float(delay)
            self.client.zadd(self.keys.delayed, {delayed_member(b): due for b in bodies})
        else:
            self.client.lpush(self.keys.ready, *bodies)

    @translate_errors
    def push_raw(self, body: Any) -> None:
        """Publish a raw message, as a foreign (or broken) client would."""
        self.client.lpush(self.keys.ready, body)

    # --- consuming -------------------------------------------------------------------------

    @translate_errors
    def fetch(self, max_jobs: int = 1, timeout: float = 1.0) -> List[Delivery]:
        """Promote due delayed jobs, refresh the heartbeat and take up to `max_jobs` jobs in one
        script call; when none is ready, block on BLMOVE for up to `timeout` seconds."""
        max_jobs = max(1, int(max_jobs))
        if not self._started:
            self._start()
        if time.monotonic() - self._last_recover >= self.recover_interval:
            self.recover_dead_workers()
        with self._lock:
            bodies, self._stash = self._stash[:max_jobs], self._stash[max_jobs:]
        if bodies:
            return [Delivery.parse(b, (self.processing_key, b)) for b in bodies]
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
                            pipe.lmove(self.keys.ready, self.processing_key, "RIGHT", "LEFT")
                        bodies += [b for b in pipe.execute() if b is not None]
        return [Delivery.parse(b, (self.processing_key, b)) for b in bodies]

    def take_step(self, max_jobs: int) -> Tuple[List[str], List[Any]]:
        """The KEYS and ARGV of one fetch step (take.lua): promote due delayed jobs, beat, take jobs."""
        keys = [self.keys.delayed, self.keys.ready, self.processing_key, self.heartbeat_key, self.keys.workers]
        args = [repr(self.clock()), self.promote_limit, max_jobs, self.worker_id, int(self.heartbeat_ttl * 1000)]
        return keys, args

    def wanted_with_commit(self) -> int:
        """How many jobs a commit made now should take for this worker (0: none)."""
        with self._lock:
            return max(0, self.prefetch - len(self._stash)) if self._started else 0

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
                pipe.rpush(self.keys.ready, body)
            pipe.execute()
        return len(bodies)

    def _blocking_move(self, wait: float) -> Optional[bytes]:
        socket_timeout = self.client.connection_pool.connection_kwargs.get("socket_timeout")
        if socket_timeout:
            wait = min(wait, max(0.01, socket_timeout - 0.5))
        try:
            return self.client.blmove(self.keys.ready, self.processing_key, round(wait, 3), "RIGHT", "LEFT")
        except redis.TimeoutError:
            return None

    def mark_acked(self, deliveries: Sequence[Delivery]) -> None:
        """Called by the run store: these deliveries were removed from the processing list by a commit."""
        with self._lock:
            for d in deliveries:
                self._acked[d.tag] += 1

    @translate_errors
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        todo = []
        with self._lock:
            for d in deliveries:
                if self._acked.get(d.tag):
                    self._acked[d.tag] -= 1
                    if not self._acked[d.tag]:
                        del self._acked[d.tag]
                else:
                    todo.append(d)
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
        """Move the processing lists of workers whose heartbeat expired back to the ready list;
        return how many jobs came back."""
        self._last_recover = time.monotonic()
        members = [to_text(m) for m in self.client.smembers(self.keys.workers)]
        moved = 0
        for worker_id in members:
            if worker_id == self.worker_id:
                continue
            try:
                validate_simple("worker id", worker_id)
            except ValueError:
                self.client.srem(self.keys.workers, worker_id)
                continue
            n = self._recover(keys=[self.keys.processing(worker_id), self.keys.ready, self.keys.heartbeat(worker_id),
                                    self.keys.workers], args=[worker_id, "0"])
            moved += max(0, int(n))
        return moved

    @translate_errors
    def requeue_own(self) -> int:
        """Give back every job this worker holds (after it lost track of them, e.g. a lost
        connection in the middle of a job, or a previous process with the same worker id)."""
        n = self._recover(keys=[self.processing_key, self.keys.ready, self.heartbeat_key, self.keys.workers],
                          args=[self.worker_id, "1"])
        with self._lock:
            self._acked.clear()
            self._stash.clear()
        return int(n)

    def _start(self) -> None:
        self._started = True
        self.requeue_own()
        self._beat_stop.clear()
        self._beat_thread = threading.Thread(target=self._beat, name=f"flowcraft-heartbeat-{self.worker_id}", daemon=True)
        self._beat_thread.start()

    def _beat(self) -> None:
        interval = max(0.05, self.heartbeat_ttl / 3)
        while not self._beat_stop.wait(interval):
            try:
                self.client.set(self.heartbeat_key, "1", px=int(self.heartbeat_ttl * 1000))
            except redis.RedisError:
                pass  # the worker loop sees the outage and reconnects

    @translate_errors
    def close(self) -> None:
        """Stop heart-beating and unregister (jobs still held are given back first)."""
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
            pipe.execute()

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
    def remove_dead_letter(self, dead_letter_id: str, publish: bool = True) -> bool:
        """Take a dead letter out (LREM) and, when `publish`, push its body to the ready list, in
        one MULTI; False if no dead letter has that id."""
        for entry in self.client.lrange(self.keys.dead, 0, -1):
            if hashlib.sha1(entry).hexdigest() != dead_letter_id:
                continue
            pipe = self.client.pipeline(transaction=True)
            pipe.lrem(self.keys.dead, 1, entry)
            if publish:
                pipe.lpush(self.keys.ready, json.loads(entry)["body"])
            removed = pipe.execute()[0]
            if not removed and publish:  # someone else took it meanwhile: undo our push
                self.client.lrem(self.keys.ready, 1, json.loads(entry)["body"])
            return bool(removed)
        return False

    @translate_errors
    def purge_dead_letters(self) -> int:
        pipe = self.client.pipeline(transaction=True)
        pipe.llen(self.keys.dead)
        pipe.delete(self.keys.dead)
        return int(pipe.execute()[0])

    @translate_errors
    def pending(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.keys.ready)
        pipe.zcard(self.keys.delayed)
        pipe.llen(self.processing_key)
        return sum(pipe.execute())
