"""`RedisRunStore`: the `RunStore` port on Redis hashes (see `keys.py` for the layout).

Every commit is ONE `EVALSHA` of `lua/commit.lua` (a wave's commits are one call too): version check, context patch, node states,
batch items, the record, the successor jobs (pushed onto the queue, so they are durable with the
commit and `publish_outbox` has nothing to do), the acknowledgement of the delivery that produced
it and, for a final status, the seed-compatible status key and the TTL of the run's keys.
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from flowcraft.operations import RunPage, RunSummary, check_list_args, encode_cursor, float_cursor
from flowcraft.ports import HISTORY_CAP, Commit, Job, RunRecord, RunSnapshot
from flowcraft.result import FINAL_STATUSES, RUNNING

from ._util import delayed_member, load_script, to_text, translate_errors
from .context import decode, decode_hash, encode
from .keys import QueueKeys, RunKeys, keys_of_queue

_JSON_FIELDS = ("blueprint_id", "blueprint_version", "awaiting", "errors", "parent", "result", "blueprint_digest",
                "traceparent", "deadline_at")


_EMPTY: Dict[str, Any] = {"null": None, "{}": {}, "[]": []}  # the usual record values, parsed without the JSON decoder


def _encode_field(value: Any) -> str:
    if value is None:
        return "null"
    if not value and type(value) in (dict, list):
        return "{}" if type(value) is dict else "[]"
    return encode(value)


def _decode_field(text: str) -> Any:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"' and "\\" not in text and '"' not in text[1:-1]:
        return text[1:-1]  # a plain JSON string (a blueprint id or version): no decoder needed
    if text in _EMPTY:
        empty = _EMPTY[text]
        return type(empty)() if empty is not None else None  # a fresh {} or [] each time
    return decode(text)


def record_fields(record: RunRecord) -> List[Tuple[str, str]]:
    """A record as hash fields (the version is written by the commit script). A finished run's
    result (its whole context) is stored once, in the status key, not in the record too."""
    fields = [("status", record.status), ("outstanding", str(int(record.outstanding))),
              ("updated_at", repr(float(record.updated_at)))]
    final = record.status in FINAL_STATUSES
    fields += [(name, "null" if final and name == "result" else _encode_field(getattr(record, name)))
               for name in _JSON_FIELDS]
    return fields


def record_texts(raw: Mapping[Any, Any]) -> Dict[str, str]:
    """A record hash as read (bytes or text) -> field: text."""
    return {(k.decode() if type(k) is bytes else to_text(k)): (v.decode("utf-8", "replace") if type(v) is bytes else to_text(v))
            for k, v in raw.items()}


def parse_record(run_id: str, raw: Mapping[Any, Any]) -> RunRecord:
    return record_from_texts(run_id, record_texts(raw))


def record_from_texts(run_id: str, data: Mapping[str, str]) -> RunRecord:
    values: Dict[str, Any] = {name: _decode_field(data[name]) for name in _JSON_FIELDS if name in data}
    return RunRecord(
        run_id=run_id, status=data.get("status", RUNNING), version=int(data.get("version", 0)),
        outstanding=int(data.get("outstanding", 0)), updated_at=float(data.get("updated_at", 0.0)),
        blueprint_id=values.get("blueprint_id"), blueprint_version=values.get("blueprint_version"),
        awaiting=values.get("awaiting") or {}, errors=values.get("errors") or [], parent=values.get("parent"),
        result=values.get("result"), blueprint_digest=values.get("blueprint_digest"),
        traceparent=values.get("traceparent"), deadline_at=values.get("deadline_at"),
    )


def _unique(names: Optional[Iterable[str]]) -> Optional[List[str]]:
    return None if names is None else list(dict.fromkeys(names))


def _values(names: Optional[List[str]], raw: Sequence[Any]) -> Dict[str, Any]:
    """Decoded hash values: HMGET's for `names`, or HGETALL's (field, value, ...) for None."""
    if names is None:
        return {to_text(k): decode(v) for k, v in zip(raw[::2], raw[1::2])}
    return {n: decode(v) for n, v in zip(names, raw) if v is not None}


def _flat(pairs: Iterable[Tuple[Any, Any]]) -> List[Any]:
    return [x for pair in pairs for x in pair]


def _encoded(values: Mapping[str, Any]) -> List[Any]:
    """field, JSON, field, JSON, ... of a mapping."""
    return [x for key, value in values.items() for x in (key, encode(value))]


class RedisRunStore:
    """Runs in Redis hashes, changed only by version-checked Lua commits.

    `queue` (a `RedisQueue`) or `queue_name` says where committed jobs go; with a queue, a commit
    also takes the worker's next jobs. The deliveries a commit acknowledges are marked `acked`.
    """

    whole_loads = True  # load_many takes None for "all node states" and "the whole context"
    acks_in_commit = True  # commit.lua removes a commit's deliveries from their processing list (see RunStore)

    def __init__(self, client: Any, prefix: str = "", state_ttl_seconds: int = 86400, *, queue: Any = None,
                 queue_name: str = "flowcraft-queue", clock: Callable[[], float] = time.time, scan_count: int = 100) -> None:
        if state_ttl_seconds is None or int(state_ttl_seconds) < 0:
            raise ValueError(f"state_ttl_seconds must be >= 0 (0 = keep forever), not {state_ttl_seconds!r}")
        self.client = client
        self.keys = RunKeys(prefix)
        self.queue = queue
        self.queue_keys: QueueKeys = queue.keys if queue is not None else QueueKeys(queue_name, prefix)
        self.state_ttl_seconds = int(state_ttl_seconds)
        self.clock = clock
        self.scan_count = scan_count
        self._commit = load_script(client, "take.lua", "commit.lua")
        self._create = load_script(client, "create.lua")
        self._touch = load_script(client, "touch.lua")
        # The record fields of runs in flight as this store last read or wrote them, with their
        # version: a commit expecting that version sends only the fields that changed (a version
        # names one content of the record, so the others are what the script will find).
        self._known: Dict[str, Tuple[int, Dict[str, str]]] = {}
        self._load = load_script(client, "load.lua")

    def _valid(self, run_id: Any) -> bool:
        try:
            self.keys.of(run_id)
            return True
        except ValueError:
            return False

    # --- writing ---------------------------------------------------------------------------

    @translate_errors
    def create_run(self, record: RunRecord, context: Mapping[str, Any], states: Mapping[str, Dict[str, Any]],
                   jobs: Sequence[Job], history: Sequence[Dict[str, Any]] = ()) -> bool:
        run_id = record.run_id
        fields = record_fields(record) + [("version", str(int(record.version)))]
        args: List[Any] = [len(fields), *_flat(fields)]
        args += [len(context), *_encoded(context)]
        args += [len(states), *_encoded(states)]
        plain, routed = self._split(jobs)
        args += [len(plain), *(j.to_json() for j in plain)]
        args += [1, encode(list(history))] if history else [0]
        keys = [self.keys.record(run_id), self.keys.context(run_id), self.keys.states(run_id), self.queue_keys.ready,
                self.keys.history(run_id)]
        lists = self._route_keys(routed, len(keys))
        keys += [k for k, _ in sorted(lists.items(), key=lambda kv: kv[1])]
        args += [len(routed), *(x for j in routed for x in (lists[self._queue_keys(j.queue).ready], j.to_json()))]
        args += [self.keys.index, run_id, repr(float(record.updated_at))]  # the run list index
        return bool(self._create(keys=keys, args=args))

    # --- routing (SPEC 14): jobs whose `queue` names another queue go to its lists -------------

    routes_jobs = True  # False: every job goes to `queue_keys` (RqRunStore: its outbox, whose publisher routes)

    def _queue_keys(self, name: Optional[str]) -> QueueKeys:
        return self.queue_keys if name is None else keys_of_queue(name, self.queue_keys.prefix)

    def _split(self, jobs: Sequence[Job]) -> Tuple[Sequence[Job], List[Job]]:
        """(the jobs for the default queue, the routed ones)."""
        if not self.routes_jobs or all(j.queue is None for j in jobs):
            return jobs, []
        return [j for j in jobs if j.queue is None], [j for j in jobs if j.queue is not None]

    def _route_keys(self, routed: Sequence[Job], first: int, delayed: bool = False) -> Dict[str, int]:
        """Key -> its index in KEYS (from 1, after the `first - 1` keys before it) of the ready
        lists (and, with `delayed`, delayed zsets) the routed jobs go to."""
        out: Dict[str, int] = {}
        for job in routed:
            keys = self._queue_keys(job.queue)
            for key in (keys.ready, keys.delayed) if delayed else (keys.ready,):
                if key not in out:
                    out[key] = first + 1 + len(out)
        return out

    @translate_errors
    def commit(self, commit: Commit) -> bool:
        return self._apply([commit])[0]

    @translate_errors
    def commit_many(self, commits: Sequence[Commit]) -> List[bool]:
        """All the commits in one call of commit.lua: one round trip, each commit checked on its own."""
        return self._apply(commits)

    def _apply(self, commits: Sequence[Commit]) -> List[bool]:
        fields = [dict(record_fields(c.record)) if not c.node_commit else {} for c in commits]
        calls = [self._commit_call(c, f) if self._valid(c.run_id) else None for c, f in zip(commits, fields)]
        replies = iter(self._call_commits([c for c in calls if c is not None]))
        results = []
        for commit, call, written in zip(commits, calls, fields):
            reply: Any = next(replies) if call is not None else 0
            applied = isinstance(reply, list)
            if applied:
                _, outstanding, awaiting, reached, acked = reply
                commit.outstanding_after = int(outstanding)
                commit.awaiting_after = _decode_field(to_text(awaiting))
                commit.reached = [commit.counters[int(i) - 1] for i in reached]
                if acked and call is not None:
                    for delivery in call[2]:
                        delivery.acked = True
            if call is not None:
                self._remember(commit, written if applied and not commit.node_commit else None)
            results.append(applied)
        return results

    def _remember(self, commit: Commit, fields: Optional[Dict[str, str]]) -> None:
        """Note the record a run commit wrote (None: it was not applied, or it was a node commit:
        what is stored is unknown)."""
        if fields is None or commit.record.status in FINAL_STATUSES:
            self._known.pop(commit.run_id, None)
            return
        if len(self._known) >= 4096:
            self._known.clear()
        self._known[commit.run_id] = (commit.expected_version + 1, fields)  # type: ignore[operator]  # a run commit's

    def _call_commits(self, calls: List[Tuple[List[Any], List[Any], List[Any]]]) -> List[Any]:
        """ONE `self._commit(keys=..., args=...)` call for all the commits (RqRunStore wraps
        `self._commit` to send its publish script in the same round trip)."""
        if not calls:
            return []
        keys: List[Any] = []
        args: List[Any] = [len(calls)]
        for call_keys, call_args, _ in calls:
            keys += call_keys
            args += (len(call_keys), len(call_args))
            args += call_args
        take = self.queue.wanted_with_commit() if self.queue is not None else 0
        if not take:
            return self._commit(keys=keys, args=args)
        # A worker loop fetches right after its commits: take its next jobs in the same call.
        take_keys, take_args = self.queue.take_step(take)
        results, taken = self._commit(keys=keys + take_keys, args=args + take_args)
        self.queue.stash(taken)
        return results

    def _commit_call(self, commit: Commit, fields: Optional[Dict[str, str]] = None) -> Tuple[List[Any], List[Any], List[Any]]:
        """The keys, arguments and acknowledged deliveries of one commit.lua call (`fields`: the
        record's, when the caller has them already)."""
        run_id = commit.run_id
        record = commit.record
        final = ""
        if record.status in FINAL_STATUSES:
            final = json.dumps({"status": record.status, "result": record.result}, separators=(",", ":"))
        if commit.node_commit:  # the record is the stored one: only when it was last updated
            changed = [("updated_at", repr(float(record.updated_at)))]
        else:
            fields = fields if fields is not None else dict(record_fields(record))
            known = self._known.get(run_id)
            if known is not None and known[0] == commit.expected_version:
                # updated_at always: a reconciler's touch changes it without a new version
                changed = [(k, v) for k, v in fields.items() if k == "updated_at" or known[1].get(k) != v]
            else:
                changed = list(fields.items())
        expected = "" if commit.expected_version is None else int(commit.expected_version)
        guards = [x for node_id, state in commit.guards.items() for x in (node_id, "" if state is None else encode(state))]
        args: List[Any] = [expected, len(commit.guards), *guards, len(commit.unset_items), *commit.unset_items,
                           self.state_ttl_seconds, final, len(changed), *_flat(changed)]
        args += [len(commit.context_set), *_encoded(commit.context_set)]
        args += [len(commit.context_delete), *commit.context_delete]
        args += [len(commit.states), *_encoded(commit.states)]
        args += [len(commit.items), *_encoded(commit.items)]
        acks = [d for d in commit.ack if isinstance(d.tag, tuple) and len(d.tag) == 2]
        keys = [*self.keys.of(run_id), self.queue_keys.ready, self.queue_keys.delayed, self.keys.history(run_id),
                *(d.tag[0] for d in acks)]
        jobs, routed = self._split(commit.jobs)
        delayed, routed_delayed = self._split_delayed(commit.delayed)
        counted = [c.job for c in commit.counters if c.job is not None]
        _, routed_counted = self._split(counted)
        lists = self._route_keys([*routed, *(j for j, _ in routed_delayed), *routed_counted], len(keys), delayed=True)
        if lists:
            keys += sorted(lists, key=lists.__getitem__)
        args += [len(jobs), *(j.to_json() for j in jobs)]
        # routed jobs: (index of their ready list in this commit's KEYS, body) pairs
        args += [len(routed), *(x for j in routed for x in (lists[self._queue_keys(j.queue).ready], j.to_json()))]
        now = self.clock()
        args += [len(delayed), *_flat((repr(now + max(0.0, float(d))), delayed_member(j.to_json().encode()))
                                      for j, d in delayed)]
        args += [len(routed_delayed), *(x for j, d in routed_delayed for x in (
            lists[self._queue_keys(j.queue).delayed], repr(now + max(0.0, float(d))),
            delayed_member(j.to_json().encode())))]
        args += [len(commit.counters), *(x for c in commit.counters for x in (
            c.field, c.delta, c.threshold, c.reserve, c.job.to_json() if c.job is not None else "",
            lists[self._queue_keys(c.job.queue).ready] if lists and c.job is not None and c.job.queue is not None else 0))]
        args.append(commit.outstanding_delta)
        args += [encode(commit.history) if commit.history else "", HISTORY_CAP]
        args += [len(acks), *(d.tag[1] for d in acks)]
        return keys, args, acks

    def _split_delayed(self, delayed: Sequence[Tuple[Job, float]]) -> Tuple[Sequence[Tuple[Job, float]], List[Tuple[Job, float]]]:
        if not self.routes_jobs or all(j.queue is None for j, _ in delayed):
            return delayed, []
        return [(j, d) for j, d in delayed if j.queue is None], [(j, d) for j, d in delayed if j.queue is not None]

    def publish_outbox(self, run_id: str, queue: Any) -> int:
        """Nothing to publish: commits push their jobs onto the queue atomically."""
        return 0

    def publish_outboxes(self, run_ids: Sequence[str], queue: Any) -> int:
        return 0

    # --- reading ---------------------------------------------------------------------------

    @translate_errors
    def load(self, run_id: str, node_ids: Iterable[str], context_keys: Iterable[str]) -> Optional[RunSnapshot]:
        return self.load_many([(run_id, list(node_ids), list(context_keys))])[0]

    @translate_errors
    def load_many(self, requests: Sequence[Tuple[str, Optional[Sequence[str]], Optional[Sequence[str]]]]) -> List[Optional[RunSnapshot]]:
        """One call of load.lua for all the runs asked: a consistent snapshot in one round trip
        (None for node ids and context keys: the whole run)."""
        asked = [(run_id, _unique(nodes), _unique(keys)) for run_id, nodes, keys in requests]
        wanted = [request for request in asked if self._valid(request[0])]
        keys: List[Any] = []
        args: List[Any] = [len(wanted)]
        for run_id, node_ids, context_keys in wanted:
            keys += self.keys.of(run_id)[:3]
            for names in (node_ids, context_keys):
                args += (-1,) if names is None else (len(names), *names)
        replies = iter(self._load(keys=keys, args=args) if wanted else [])
        return [self._snapshot(run_id, node_ids, context_keys, next(replies)) if self._valid(run_id) else None
                for run_id, node_ids, context_keys in asked]

    def _snapshot(self, run_id: str, node_ids: Optional[List[str]], context_keys: Optional[List[str]],
                  reply: Sequence[Any]) -> Optional[RunSnapshot]:
        flat_record, has_context, states_raw, context_raw = reply
        if flat_record:
            texts = record_texts(dict(zip(flat_record[::2], flat_record[1::2])))
            record = record_from_texts(run_id, texts)
            if len(self._known) >= 4096:
                self._known.clear()
            self._known[run_id] = (record.version, texts)
        elif has_context:
            record = RunRecord(run_id, version=0, updated_at=self.clock())
        else:
            return None
        return RunSnapshot(record, _values(node_ids, states_raw), _values(context_keys, context_raw),
                           whole=node_ids is None and context_keys is None)

    @translate_errors
    def read_states(self, run_id: str, node_ids: Iterable[str]) -> Dict[str, Dict[str, Any]]:
        node_ids = list(node_ids)
        if not node_ids:
            return {}
        raw = self.client.hmget(self.keys.states(run_id), node_ids)
        return {n: decode(v) for n, v in zip(node_ids, raw) if v is not None}

    @translate_errors
    def read_all_states(self, run_id: str) -> Dict[str, Dict[str, Any]]:
        return decode_hash(self.client.hgetall(self.keys.states(run_id)))

    @translate_errors
    def read_context(self, run_id: str, keys: Iterable[str]) -> Dict[str, Any]:
        keys = list(keys)
        if not keys:
            return {}
        raw = self.client.hmget(self.keys.context(run_id), keys)
        return {k: decode(v) for k, v in zip(keys, raw) if v is not None}

    @translate_errors
    def read_all_context(self, run_id: str) -> Dict[str, Any]:
        return decode_hash(self.client.hgetall(self.keys.context(run_id)))

    @translate_errors
    def read_items(self, run_id: str, fields: Sequence[str]) -> List[Any]:
        fields = list(fields)
        if not fields:
            return []
        out: List[Any] = []
        for start in range(0, len(fields), 5000):
            chunk = fields[start:start + 5000]
            out += [None if v is None else decode(v) for v in self.client.hmget(self.keys.items(run_id), chunk)]
        return out

    @translate_errors
    def read_history(self, run_id: str) -> List[Dict[str, Any]]:
        if not self._valid(run_id):
            return []
        return [event for entry in self.client.lrange(self.keys.history(run_id), 0, -1) for event in decode(entry)]

    @translate_errors
    def get_record(self, run_id: str) -> Optional[RunRecord]:
        if not self._valid(run_id):
            return None
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.record(run_id))
        pipe.exists(self.keys.context(run_id))
        pipe.get(self.keys.status(run_id))
        raw, has_context, status = pipe.execute()
        if raw:
            record = parse_record(run_id, raw)
            found = decode(status) if record.result is None and record.status in FINAL_STATUSES else None
            if isinstance(found, dict):
                record.result = found.get("result")  # a finished run's result is stored there only
            return record
        return RunRecord(run_id, version=0, updated_at=self.clock()) if has_context else None

    @translate_errors
    def touch(self, run_id: str, updated_at: float) -> None:
        if self._valid(run_id):
            self._touch(keys=[self.keys.record(run_id)], args=[repr(float(updated_at))])

    @translate_errors
    def idle_runs(self, idle_seconds: float, limit: int = 1000, scan_count: Optional[int] = None) -> Tuple[int, List[str]]:
        """(records scanned, ids of runs `running` whose `updated_at` is older than `idle_seconds`),
        found with SCAN over the record keys (never KEYS)."""
        now = self.clock()
        scanned = 0
        idle: List[str] = []
        batch: List[Any] = []

        def check(keys: List[Any]) -> None:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, ["status", "updated_at"])
            for key, (status, updated) in zip(keys, pipe.execute()):
                if status is None or to_text(status) != RUNNING:
                    continue
                if now - float(to_text(updated or b"0")) >= idle_seconds:
                    idle.append(self.keys.run_id_of_record(key))

        for key in self.client.scan_iter(match=self.keys.record_pattern, count=scan_count or self.scan_count):
            scanned += 1
            batch.append(key)
            if len(batch) >= 500:
                check(batch)
                batch = []
        if batch:
            check(batch)
        return scanned, idle[:limit]

    # --- operations (SPEC 11): the run list index, pruning -------------------------------------
    # The index is sorted sets (keys.py): `all`, `active` (running and awaiting: listing one of
    # them reads the record's status), one per final status. create.lua adds a run to `all` and
    # `active`; commit.lua's final-status write moves it to its status's set with its updated_at
    # (and drops that set's entries older than the TTL: their runs' keys expired); `reindex`
    # moves a run an operator put back to running. An entry whose record is gone (expired) is
    # dropped when a list meets it.

    _SUMMARY_FIELDS = ("status", "updated_at", "created_at", "blueprint_id", "blueprint_version", "errors")

    @translate_errors
    def list_runs(self, status: Optional[str] = None, blueprint_id: Optional[str] = None, since: Optional[float] = None,
                  until: Optional[float] = None, limit: int = 50, cursor: Optional[str] = None) -> RunPage:
        """Newest first by index score (see above), `limit` per page: ZREVRANGEBYSCORE pages of
        the index plus one pipelined HMGET per run shown. `blueprint_id` filters what is read."""
        check_list_args(status, limit)
        key = self.keys.index + ("all" if status is None else "active" if status in ("running", "awaiting") else status)
        after = float_cursor(cursor)
        high: Any = "+inf" if until is None else repr(float(until))
        if after is not None:
            high = repr(after[0]) if until is None else repr(min(after[0], float(until)))
        low: Any = "-inf" if since is None else repr(float(since))
        rows: List[Tuple[float, str, RunSummary]] = []
        offset, chunk = 0, max(limit + 1, 64)
        while len(rows) <= limit:
            found = self.client.zrevrangebyscore(key, high, low, start=offset, num=chunk, withscores=True)
            if not found:
                break
            offset += len(found)
            entries = [(to_text(m), float(score)) for m, score in found]
            if after is not None:
                entries = [(m, sc) for m, sc in entries if (sc, m) < (after[0], after[1])]
            pipe = self.client.pipeline(transaction=False)
            for run_id, _ in entries:
                pipe.hmget(self.keys.record(run_id), self._SUMMARY_FIELDS)
            gone = []
            for (run_id, score), values in zip(entries, pipe.execute()):
                if values[0] is None:
                    gone.append(run_id)
                    continue
                summary = self._summary(run_id, values)
                if (status is not None and summary.status != status) or (
                        blueprint_id is not None and summary.blueprint_id != blueprint_id):
                    continue
                rows.append((score, run_id, summary))
            if gone:
                self.client.zrem(key, *gone)
                self.client.zrem(self.keys.index + "all", *gone)
            if len(found) < chunk:
                break
        page = rows[:limit]
        more = len(rows) > limit
        return RunPage([s for _, _, s in page], encode_cursor(page[-1][0], page[-1][1]) if more and page else None)

    def _summary(self, run_id: str, values: Sequence[Any]) -> RunSummary:
        texts = [None if v is None else to_text(v) for v in values]
        errors = _decode_field(texts[5]) if texts[5] else []
        first = errors[0] if isinstance(errors, list) and errors else None
        updated = float(texts[1] or 0.0)
        return RunSummary(run_id, _decode_field(texts[3]) if texts[3] else None,
                          _decode_field(texts[4]) if texts[4] else None, texts[0] or "running",
                          float(texts[2]) if texts[2] else updated, updated,
                          None if not isinstance(first, dict) else str(first.get("message", "")))

    @translate_errors
    def reindex(self, run_id: str) -> None:
        """Index a run by its record's status now (an operator put an ended run back to running)."""
        values = self.client.hmget(self.keys.record(run_id), ["status", "updated_at", "ix"])
        if values[0] is None or values[2] is None:
            return
        status, updated = to_text(values[0]), float(to_text(values[1] or b"0"))
        pipe = self.client.pipeline(transaction=True)
        for name in ("completed", "failed", "cancelled", "stalled"):
            if name != status:
                pipe.zrem(self.keys.index + name, run_id)
        pipe.zadd(self.keys.index + ("active" if status in ("running", "awaiting") else status), {run_id: updated})
        pipe.zadd(self.keys.index + "all", {run_id: updated})
        keys = self.keys.all_of(run_id)
        for key in keys[:4] + keys[5:]:  # running again: its keys (but the status's) must not expire meanwhile
            pipe.persist(key)
        pipe.execute()

    @translate_errors
    def prune(self, updated_before: float, statuses: Sequence[str]) -> int:
        """Delete every key of the runs of `statuses` last updated before `updated_before`, and
        their index entries; in chunks of 500 (one pipeline each)."""
        deleted = 0
        for status in statuses:
            key = self.keys.index + status
            while True:
                ids = [to_text(m) for m in self.client.zrangebyscore(key, "-inf", f"({updated_before!r}", start=0, num=500)]
                if not ids:
                    break
                pipe = self.client.pipeline(transaction=False)
                for run_id in ids:
                    pipe.hget(self.keys.record(run_id), "status")
                current = [None if v is None else to_text(v) for v in pipe.execute()]
                pipe = self.client.pipeline(transaction=True)
                for run_id, now in zip(ids, current):
                    if now == status:
                        pipe.delete(*self.keys.all_of(run_id))
                        deleted += 1
                pipe.zrem(key, *ids)
                gone = [r for r, now in zip(ids, current) if now in (status, None)]
                if gone:
                    pipe.zrem(self.keys.index + "all", *gone)
                pipe.execute()
        return deleted
