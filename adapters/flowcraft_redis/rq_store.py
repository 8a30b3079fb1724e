"""`RqRunStore`: `RedisRunStore` whose commits hand their jobs to RQ through an outbox.

commit.lua writes a commit's successor jobs to the outbox (``<prefix><queue>.outbox`` list,
``<prefix><queue>.outbox:delayed`` zset for timers); a Lua commit cannot make RQ jobs by itself,
since their hash is RQ's `Job.to_dict()`, made in Python. So `commit` prepares the RQ jobs of the
commit's jobs first, then sends commit.lua and the queue's publish script in ONE pipelined round
trip: the publish script takes exactly those entries off the outbox and creates their RQ jobs, if
the commit put them there (a commit that did not apply left nothing to take).

Entries can stay in the outbox: timers (their zset members are made inside `RedisRunStore`), the
jobs of `create_run` and `commit_many`, and those of a commit whose publish script failed (Redis
lost its scripts, or died between the two). `drain_outbox` (read, then the same publish script)
publishes whatever is there; any publisher may run it, since each entry is taken by exactly one
script call. It runs from `publish_outbox`, unless the commit just before, on this thread and for
that run, saw an empty outbox, and at the start of `RqAdapter.work()`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional, Sequence

import redis

from flowcraft.ports import Commit, Job, MalformedJob

from ._util import translate_errors
from .rq_queue import Entry, RqQueue
from .store import RedisRunStore

logger = logging.getLogger("flowcraft.redis.rq")


class RqRunStore(RedisRunStore):
    routes_jobs = False  # every job goes to the outbox; its publisher puts each on its RQ queue
    """Runs in Redis as `RedisRunStore` keeps them; committed jobs become RQ jobs of `rq_queue`."""

    def __init__(self, client: Any, rq_queue: RqQueue, state_ttl_seconds: int = 86400, *, clock: Any = time.time,
                 drain_limit: int = 500) -> None:
        super().__init__(client, rq_queue.settings.prefix, state_ttl_seconds, queue_name=rq_queue.outbox.name,
                         clock=clock)
        self.rq_queue = rq_queue
        self.outbox = rq_queue.outbox
        self.drain_limit = max(1, int(drain_limit))
        self._local = threading.local()
        self._commit = _CommitThenPublish(self, self._commit)

    # --- commits with their publication ---------------------------------------------------------

    @translate_errors
    def commit(self, commit: Commit) -> bool:
        """`RedisRunStore.commit`, with the publication of the commit's jobs in the same round trip
        (see the module doc). Commits with timers publish through `drain_outbox`."""
        self._local.clean_run = None
        if commit.delayed:  # timers' outbox members are random: drained
            return super().commit(commit)
        entries = [Entry(body, job, None, "L", body) for job in commit.jobs for body in [job.to_json()]]
        self._local.publish = self.rq_queue.publish_call(entries)
        self._local.left = None
        try:
            applied = super().commit(commit)  # its commit.lua call goes through _CommitThenPublish
        finally:
            self._local.publish = None
        if self._local.left == 0:
            self._local.clean_run = commit.run_id  # nothing left behind by anyone: no drain needed
        return applied

    def _load_scripts(self) -> None:
        for script in (self._commit.script, self.rq_queue.publish_script):
            self.client.script_load(script.script)

    # --- the outbox -----------------------------------------------------------------------------

    def publish_outbox(self, run_id: str, queue: Any = None) -> int:
        """Publish what is in the outbox (any run's), unless this thread's last commit, of this
        run, found it empty; return how many RQ jobs were created."""
        clean, self._local.clean_run = getattr(self._local, "clean_run", None), None
        if run_id and clean == run_id:
            return 0
        return self.drain_outbox()

    def publish_outboxes(self, run_ids: Sequence[str], queue: Any = None) -> int:
        self._local.clean_run = None
        return self.drain_outbox()

    @translate_errors
    def drain_outbox(self, max_rounds: int = 100) -> int:
        """Publish every entry of the outbox, oldest first; return how many RQ jobs were created."""
        created = 0
        limit = self.drain_limit
        for _ in range(max_rounds):
            pipe = self.client.pipeline(transaction=False)
            pipe.lrange(self.outbox.ready, -limit, -1)  # LPUSHed in: the oldest are at the tail
            pipe.zrange(self.outbox.delayed, 0, limit - 1, withscores=True)
            ready, delayed = pipe.execute()
            if not ready and not delayed:
                break
            entries = [_entry(value, "L", value) for value in reversed(ready)]
            entries += [_entry(member[17:], "Z", member, due) for member, due in delayed]  # "<16 hex>:<body>"
            made, left = self.rq_queue.publish(entries)
            created += made
            if not left:
                break
        return created

    @translate_errors
    def outbox_size(self) -> int:
        """Jobs committed and not yet published."""
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.outbox.ready)
        pipe.zcard(self.outbox.delayed)
        return sum(pipe.execute())


class _CommitThenPublish:
    """commit.lua as `RedisRunStore` calls it; while `RqRunStore.commit` has a publication pending
    on this thread, the call sends commit.lua and the publish script in one pipeline."""

    def __init__(self, store: RqRunStore, script: Any) -> None:
        self.store = store
        self.script = script

    @property
    def sha(self) -> str:
        return self.script.sha

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
        local = self.store._local
        publish = getattr(local, "publish", None)
        if publish is None or client is not None:
            return self.script(keys=keys, args=args, client=client)
        local.publish = None  # one publication per commit
        publish_keys, publish_args = publish
        for attempt in (1, 2):
            pipe = self.store.client.pipeline(transaction=False)
            pipe.evalsha(self.script.sha, len(keys), *keys, *args)
            pipe.evalsha(self.store.rq_queue.publish_script.sha, len(publish_keys), *publish_keys, *publish_args)
            committed, published = pipe.execute(raise_on_error=False)
            if attempt == 1 and isinstance(committed, redis.exceptions.NoScriptError):
                self.store._load_scripts()  # Redis lost its scripts (a restart): the commit wrote nothing
                continue
            break
        if isinstance(committed, Exception):
            raise committed
        if isinstance(published, Exception):  # the commit stands; its jobs wait in the outbox
            logger.warning("publishing the jobs of a commit failed (%s); they wait for a drain", published)
            if isinstance(published, redis.exceptions.NoScriptError):
                self.store._load_scripts()
        else:
            local.left = int(published[1])
        return committed


def _entry(body: bytes, source: str, member: bytes, due: Optional[float] = None) -> Entry:
    text = body.decode("utf-8", "replace")
    try:
        job: Optional[Job] = Job.from_json(text)
    except MalformedJob:
        job = None
    return Entry(text, job, due, source, member)


__all__ = ["RqRunStore"]
