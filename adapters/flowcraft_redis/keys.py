"""The Redis key layout of the adapter, with every name validated before it becomes a key.

With the default prefix "" the keys are exactly the seed's (`workflow:state:<runId>`,
`workflow:status:<runId>`) plus the adapter's own:

=====================================  ==========  ================================================
key                                    type        holds
=====================================  ==========  ================================================
``<p>workflow:state:<runId>``          hash        the run's context, one JSON value per field
``<p>workflow:status:<runId>``         string      JSON ``{"status", "result"}`` once the run ended (the
                                                   only copy of the result: the record has none)
``<p>flowcraft:run:<runId>``           hash        the run record (version, status, outstanding...)
``<p>flowcraft:states:<runId>``        hash        node states, JSON per node id
``<p>flowcraft:items:<runId>``         hash        batch headers, each item's input and result, JSON
                                                   per field (an item job reads only its own)
``<p>flowcraft:runs:all``               zset        the run list index: every run created by
                                                   `create_run`, score = its creation time, then
                                                   its `updated_at` once ended (or retried)
``<p>flowcraft:runs:active``            zset        runs running or awaiting, score = creation time
``<p>flowcraft:runs:<status>``          zset        ended runs of that status, score = `updated_at`
``<p><queue>``                         list        ready jobs (LPUSH in, taken from the right)
``<p><queue>:processing:<workerId>``   list        jobs a worker holds until it acks them
``<p><queue>:delayed``                 zset        delayed jobs, score = due time (unix seconds)
``<p><queue>:dead``                    list        dead letters, JSON ``{"body", "reason", "at"}``
``<p><queue>:workers``                 set         worker ids that own a processing list
``<p><queue>:worker:<workerId>``       string      a worker's heartbeat (expires when it dies)
``<p><queue>:clients``                 hash        worker id -> CLIENT ID of its own connection
``<p><queue>:queues``                  hash        worker id -> JSON list of the queues it serves,
                                                   for workers serving more than this one
                                                   (routing: every worker registers under the
                                                   default queue's keys)
``<c><key>``                           string      coordination counters and markers: the key
                                                   as given, as Flowcraft TS's (``<c>``: the
                                                   coordination store's prefix, default none)
=====================================  ==========  ================================================

Coordination keys share the Redis namespace with everything else there, as in Flowcraft TS (so a
TS and a Python service share locks by name); neither the core nor the adapters use coordination
keys of their own.
"""
from __future__ import annotations

import functools

import re
import unicodedata
from typing import Any, Dict, NamedTuple, Optional

MAX_NAME_LENGTH = 512
_SIMPLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
_PRINTABLE_ASCII = re.compile(r"[!-~]*")  # no space, no control character: the common case, checked fast


def _check_text(kind: str, name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{kind} must be a string, not {type(name).__name__}: {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{kind} {name[:40]!r}... is longer than {MAX_NAME_LENGTH} characters")
    if _PRINTABLE_ASCII.fullmatch(name):
        return name
    for ch in name:
        if ch.isspace() or unicodedata.category(ch)[0] in ("C", "Z"):
            raise ValueError(f"{kind} {name!r} contains a space or control character ({ch!r})")
    return name


def validate_prefix(prefix: Any) -> str:
    """A key prefix: empty, or printable text without spaces (e.g. ``"myapp:"``)."""
    return _check_text("key prefix", prefix)


def validate_name(kind: str, name: Any) -> str:
    """A run id or coordination key: non-empty printable text without spaces or control characters."""
    _check_text(kind, name)
    if not name:
        raise ValueError(f"{kind} must not be empty")
    return name


def validate_simple(kind: str, name: Any) -> str:
    """A queue name or worker id: letters, digits, ``_ . @ -`` (no ``:``, so keys cannot collide)."""
    _check_text(kind, name)
    if not _SIMPLE.match(name):
        raise ValueError(f"{kind} {name!r} must match {_SIMPLE.pattern} (letters, digits, '_', '.', '@', '-')")
    return name


def queue_name_problem(name: Any) -> Optional[str]:
    """Why `name` cannot name a queue of the Redis backends (None: it can). The same names serve
    RQ: a queue name is in its keys, in its workers' comma-separated queue lists and in job ids."""
    try:
        validate_simple("queue name", name)
    except ValueError as error:
        return str(error)
    return None


def glob_escape(text: str) -> str:
    """``text`` with the glob characters of SCAN MATCH escaped."""
    return "".join("\\" + ch if ch in "*?[]\\^-" else ch for ch in text)


class RunKeySet(NamedTuple):
    """Every key of one run."""

    record: str
    context: str
    states: str
    items: str
    status: str


class RunKeys:
    """The keys of runs under one prefix."""

    CACHE_SIZE = 4096  # run ids whose keys `of` remembers: a worker's runs in flight

    STATE = "workflow:state:"
    STATUS = "workflow:status:"
    RECORD = "flowcraft:run:"
    STATES = "flowcraft:states:"
    ITEMS = "flowcraft:items:"
    HISTORY = "flowcraft:history:"  # a list, one JSON array of events per commit

    INDEX = "flowcraft:runs:"

    def __init__(self, prefix: str = "") -> None:
        self.prefix = validate_prefix(prefix)
        self._cache: Dict[str, RunKeySet] = {}
        self.index = self.prefix + self.INDEX  # `<index>all`, `<index>active`, `<index><status>`

    def of(self, run_id: str) -> RunKeySet:
        """The keys of one run, the run id validated once (ValueError if it is not a valid one)."""
        found = self._cache.get(run_id) if type(run_id) is str else None
        if found is None:
            validate_name("run id", run_id)
            p = self.prefix
            found = RunKeySet(p + self.RECORD + run_id, p + self.STATE + run_id, p + self.STATES + run_id,
                              p + self.ITEMS + run_id, p + self.STATUS + run_id)
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            self._cache[run_id] = found
        return found

    def context(self, run_id: str) -> str:
        return self.prefix + self.STATE + validate_name("run id", run_id)

    def status(self, run_id: str) -> str:
        return self.prefix + self.STATUS + validate_name("run id", run_id)

    def record(self, run_id: str) -> str:
        return self.prefix + self.RECORD + validate_name("run id", run_id)

    def states(self, run_id: str) -> str:
        return self.prefix + self.STATES + validate_name("run id", run_id)

    def items(self, run_id: str) -> str:
        return self.prefix + self.ITEMS + validate_name("run id", run_id)

    def history(self, run_id: str) -> str:
        return self.prefix + self.HISTORY + validate_name("run id", run_id)

    def all_of(self, run_id: str) -> list:
        """Every key of one run (for EXPIRE): the status key next to last, the history last."""
        return [self.context(run_id), self.record(run_id), self.states(run_id), self.items(run_id), self.status(run_id),
                self.history(run_id)]

    @property
    def record_pattern(self) -> str:
        """SCAN MATCH pattern of every run record under this prefix."""
        return glob_escape(self.prefix + self.RECORD) + "*"

    def run_id_of_record(self, key: Any) -> str:
        text = key.decode() if isinstance(key, bytes) else key
        return text[len(self.prefix + self.RECORD):]


class QueueKeys:
    """The keys of one queue under one prefix."""

    def __init__(self, queue_name: str, prefix: str = "") -> None:
        self.prefix = validate_prefix(prefix)
        self.name = validate_simple("queue name", queue_name)
        base = self.prefix + queue_name
        self.ready = base
        self.delayed = base + ":delayed"
        self.dead = base + ":dead"
        self.workers = base + ":workers"
        self.clients = base + ":clients"  # worker id -> the CLIENT ID of its registered connection
        self.queues = base + ":queues"  # worker id -> JSON list of the queues it serves (absent: this one)

    def processing(self, worker_id: str) -> str:
        return f"{self.ready}:processing:{validate_simple('worker id', worker_id)}"

    def heartbeat(self, worker_id: str) -> str:
        return f"{self.ready}:worker:{validate_simple('worker id', worker_id)}"


@functools.lru_cache(maxsize=1024)
def keys_of_queue(queue_name: str, prefix: str = "") -> QueueKeys:
    """The keys of queue `queue_name` under `prefix`, built (and validated) once per name."""
    return QueueKeys(queue_name, prefix)


def coordination_key(prefix: str, key: str) -> str:
    """`key` as given, under `prefix` verbatim (no namespace of ours: Flowcraft TS uses keys as given)."""
    return validate_prefix(prefix) + validate_name("coordination key", key)
