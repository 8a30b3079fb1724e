"""`PostgresRunStore`: the `RunStore` port on PostgreSQL (JSONB values, a row per node state and context key) (same semantics as `InMemoryRunStore`).

* A commit is ONE SQL statement (data-modifying CTEs, autocommit), and so is a group commit of
  every job of a prefetch window (`commit_many`): the wave travels as one JSON document, the runs
  rows whose version still matches are locked in run-id order (two workers committing overlapping
  waves cannot deadlock), then, as set operations, the runs rows are updated (the record: small
  bookkeeping only), the changed node state rows, the written context key rows and the batch item
  rows upserted and the deleted key rows deleted (never a run's whole document), the seed's
  `context_data` set to the final context when the run ends, the status rows upserted
  (`updated_at = now()`, `result` when final) and the outbox rows inserted. The statement returns
  which runs it applied and the outbox rows it wrote; a run whose version did not match is left
  untouched and reported as not applied. One WAL flush serves the whole wave.
* `load`/`load_many` is one SELECT: the records, the requested node state rows and the requested
  context key rows (a seed client's run no worker adopted yet: the keys of its `context_data`).
* The hot statements (wave commit, wave load) are server-side prepared (`PREPARE`, once per
  connection): no parse or plan per wave.
* Jobs committed with a node's completion go to the outbox table. `publish_outboxes` publishes the
  rows the calling thread's own commits returned, without reading the table again, then deletes
  them: while a worker loop runs (`defer_deletes`), in its next commit statement (or once it is
  idle, or stops: `flush_published`), else at once, in both cases without waiting for the WAL
  flush of the delete. A delete lost in a crash only means the jobs are published again if the run's
  outbox is read again, and a duplicate job is dropped by the worker that takes it. For a run this
  thread did not just commit (a redelivered job whose commit crashed before its publish, a retried
  start, `reconcile`), it reads the run's outbox rows under `SELECT ... FOR UPDATE SKIP LOCKED`, as
  a crashed worker's rows must still go out.
* What PostgreSQL refuses to hold is the run's fault, never an outage: a data error (class 22:
  the JSON escape of NUL in a JSONB string, NaN, ...), a program limit (class 54: a JSONB string
  or document over 256 MB, a run id too long for the primary key index, a string buffer over
  1 GB), "invalid memory alloc request size", psycopg2's refusal of NUL in a text parameter, or a
  value `json.dumps` cannot encode. The statement is rolled back (nothing written, the connection
  stays usable), never retried, and `flowcraft.errors.StoreRejected` is raised, naming the run
  (when the commit is of one) and, where it can be found, the context key, node state or item at
  fault. An id holding NUL cannot be in PostgreSQL: reads of one find nothing and commits of its
  run do not apply, without asking the server; error messages (which quote hostile ids) are stored
  with NUL escaped. So recording a hostile job's failure never raises again.
* A dropped connection (PostgreSQL restart, `pg_terminate_backend`) is replaced with exponential
  backoff, and the failed operation is retried once on the new connection (statements are prepared
  again). Every operation is safe to retry: a commit is a single statement or one transaction
  (applied or not; a retry of an applied one fails its version check and the core reloads, and its
  outbox rows are then found by the table read), the others are reads or idempotent.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import attrs
import psycopg2
import psycopg2.errors
import psycopg2.extras
from psycopg2 import sql

from flowcraft.errors import StoreRejected
from flowcraft.ports import HISTORY_CAP, Commit, Job, RunRecord, RunSnapshot
from flowcraft.result import FINAL_STATUSES, RUNNING

from .operations import PostgresOperations
from .queries import Queries
from .schema import DEFAULT_CONTEXT_TABLE, DEFAULT_STATUS_TABLE, default_table_names, ensure_schema, validate_identifier

logger = logging.getLogger("flowcraft.rabbitmq.store")

_FINAL = FINAL_STATUSES
_CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)
_MAX_DEFERRED_DELETES = 5000  # published outbox rows whose delete may wait for the next commit
# SQLSTATE classes of a statement's values refused: data exception, program limit exceeded
_REFUSED_CLASSES = ("22", "54")
_MAX_STATEMENT = (1 << 30) - 1  # PostgreSQL holds no value (nor statement) of 1 GB or more: not sent
_MAX_WHY = 500  # characters of PostgreSQL's own explanation kept (its details may quote a token)


class StoreUnavailable(ConnectionError):
    """PostgreSQL could not be reached again within the reconnect timeout."""


class _Unencodable(ValueError):
    """`json.dumps` failed on a value to be stored (the message says why)."""


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError, MemoryError) as error:
        raise _Unencodable(f"not encodable as JSON: {type(error).__name__}: {error}") from None


def _json(value: Any) -> psycopg2.extras.Json:
    return psycopg2.extras.Json(value, dumps=_dumps)


def _refusal(error: BaseException) -> Optional[str]:
    """Why PostgreSQL (or psycopg2) refused what a statement carries, or None when `error` is not
    such a refusal (a lost connection, a deadlock, a bug). Never the statement's text: PostgreSQL's
    `LINE 1: ...` echoes the values."""
    if isinstance(error, psycopg2.Error):
        code = error.pgcode or ""
        primary = getattr(error.diag, "message_primary", None) or str(error).split("\n", 1)[0]
        if (code[:2] in _REFUSED_CLASSES or isinstance(error, psycopg2.DataError)
                or (code == "XX000" and primary.startswith("invalid memory alloc request size"))):
            detail = getattr(error.diag, "message_detail", None)
            return (f"{primary} ({detail})" if detail else primary)[:_MAX_WHY]
        return None
    if isinstance(error, _Unencodable):
        return str(error)
    if isinstance(error, ValueError) and "cannot contain NUL" in str(error):  # psycopg2, before sending
        return "a text value holds a NUL character"
    if isinstance(error, MemoryError):  # building the statement or reading its rows
        return "out of memory: the statement or its result is too large for this worker"
    return None


def _rejected_read(why: str) -> StoreRejected:
    return StoreRejected(f"PostgreSQL refused a read: {why}")


def _short(name: Any, limit: int = 120) -> str:
    """`repr(name)`, cut to `limit` characters: names of things at fault come from blueprints and jobs."""
    text = repr(name)
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def _nul(item: Any) -> bool:
    return isinstance(item, str) and "\x00" in item


def _not_finite(item: Any) -> bool:
    return isinstance(item, float) and not math.isfinite(item)


def _holds(value: Any, test: Callable[[Any], bool]) -> bool:
    """Whether a JSON value holds a scalar or key passing `test` (iterative: values may be deep)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if test(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def _culprit(commit: Commit, why: str) -> str:
    """What in `commit` PostgreSQL refused, for the message: the first part holding NUL (when that
    is why), else the first one `json.dumps` cannot encode, else the largest. Only on the error path."""
    if why.startswith("index row"):  # only ids are indexed
        return "the run id, too long for the primary key index"
    parts: List[Tuple[str, Any]] = [("the run id", commit.run_id)]
    parts += [(f"context key {_short(k)}", {k: v}) for k, v in commit.context_set.items()]
    parts += [(f"the state of node {_short(n)}", {n: v}) for n, v in commit.states.items()]
    parts += [(f"batch item {_short(f)}", {f: v}) for f, v in commit.items.items()]
    parts += [("the run's record", attrs.asdict(commit.record, recurse=False))]
    # job bodies are stored as text: NUL and NaN come in them escaped or quoted, never refused
    test = _nul if ("NUL" in why or "Unicode escape" in why) else _not_finite if "NaN" in why or "Infinity" in why else None
    if test is not None:
        return next((label for label, value in parts if _holds(value, test)), "")
    parts += [(f"job {job.key}", job.input) for job in list(commit.jobs) + [j for j, _ in commit.delayed]]
    largest, size = "", -1
    for label, value in parts:
        try:
            length = len(_dumps(value))
        except _Unencodable:
            return label
        if length > size:
            largest, size = f"{label} (the largest part, {length:,} bytes of JSON)", length
    return largest


def _rejected_commits(commits: Sequence[Commit], why: str) -> StoreRejected:
    """The `StoreRejected` of commits PostgreSQL refused: naming the run (and the part at fault)
    when they are of one run; for a wave of several, the core commits them one by one to find it."""
    run_ids = {c.run_id for c in commits}
    if len(run_ids) > 1:
        return StoreRejected(f"PostgreSQL refused a group commit of {len(run_ids)} runs: {why}")
    run_id = commits[0].run_id
    culprit = next((found for c in commits for found in [_culprit(c, why)] if found), "")
    at = f" (at fault: {culprit})" if culprit else ""
    return StoreRejected(f"PostgreSQL cannot store the commit of run {_short(run_id)}{at}: {why}", run_id)


def _storable(value: Any) -> Any:
    """Error entries (small) with NUL and lone surrogates in their strings escaped as repr does."""
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "\\x00")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable(v) for v in value]
    return value


def _has_nul(*ids: Optional[str]) -> bool:
    """An id PostgreSQL cannot hold (TEXT and JSONB strings never contain NUL)."""
    return any(isinstance(i, str) and "\x00" in i for i in ids)


def _without_nul(names: Optional[Iterable[str]]) -> Optional[List[str]]:
    """Node ids or context keys to look up, less those holding NUL (no JSONB key can)."""
    return None if names is None else [n for n in names if "\x00" not in n]


def _listed(names: Optional[Iterable[str]]) -> Optional[List[str]]:
    return None if names is None else list(names)


def _record_from(data: Mapping[str, Any]) -> RunRecord:
    fields = {f.name for f in attrs.fields(RunRecord)}
    return RunRecord(**{k: v for k, v in data.items() if k in fields})


class PostgresRunStore(PostgresOperations):
    """Runs in PostgreSQL; see the module docstring. Thread-safe (one connection behind a lock)."""

    whole_loads = True  # load_many takes None for "all node states" and "the whole context"

    def __init__(
        self,
        conn_or_dsn: Any,
        context_table_name: str = DEFAULT_CONTEXT_TABLE,
        status_table_name: str = DEFAULT_STATUS_TABLE,
        runs_table_name: Optional[str] = None,
        outbox_table_name: Optional[str] = None,
        *,
        create_schema: bool = True,
        reconnect_timeout: float = 60.0,
        max_backoff: float = 1.0,
        connect_timeout: int = 5,
    ) -> None:
        self.context_table = validate_identifier(context_table_name, "context table name")
        self.status_table = validate_identifier(status_table_name, "status table name")
        self.runs_table, self.outbox_table = default_table_names(self.context_table, runs_table_name, outbox_table_name)
        self.reconnect_timeout = reconnect_timeout
        self.max_backoff = max_backoff
        if isinstance(conn_or_dsn, str):
            dsn = conn_or_dsn
            self._connect: Callable[[], Any] = lambda: psycopg2.connect(dsn, connect_timeout=connect_timeout)
            self.conn = self._connect()
        else:
            # A ready connection: to replace it after a drop we reuse its DSN (psycopg2 hides a
            # password in `conn.dsn`; pass a DSN, or `connect=`, when the server needs one).
            self.conn = conn_or_dsn
            dsn = conn_or_dsn.dsn
            self._connect = lambda: psycopg2.connect(dsn, connect_timeout=connect_timeout)
        self._lock = threading.RLock()
        # Per thread: the outbox rows of the runs this thread just committed, until it publishes them.
        self._local = threading.local()
        # Ids of outbox rows published and not deleted yet. While `defer_deletes` is set (a worker
        # loop runs), they are deleted by the next commit statement instead of a transaction of
        # their own, and when the worker goes idle or stops (`flush_published`).
        self._published: List[int] = []
        self.defer_deletes = False
        self._prepared_on: Any = None  # the connection the hot statements are prepared on
        if create_schema:
            ensure_schema(self.conn, self.context_table, self.status_table, self.runs_table, self.outbox_table)
        self.sql = Queries(self.context_table, self.status_table, self.runs_table, self.outbox_table)
        self._prepare()

    def _prepare(self) -> None:
        if not self.conn.autocommit:
            self.conn.rollback()
        self.conn.autocommit = True  # every commit is one statement; multi-statement work uses BEGIN

    # --- connection handling -------------------------------------------------------------------

    @property
    def backend_pid(self) -> int:
        return self.conn.get_backend_pid()

    def _reconnect(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                self.conn = self._connect()
                self._prepare()
                logger.warning("reconnected to PostgreSQL")
                return
            except _CONNECTION_ERRORS as error:
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(f"PostgreSQL unreachable for {self.reconnect_timeout:g}s: {error}") from error
                wait = delay * random.uniform(0.5, 1.0)  # jittered: a fleet of workers does not retry in step
                logger.warning("PostgreSQL unreachable (%s); retrying in %.2fs", error, wait)
                time.sleep(wait)
                delay = min(delay * 2, self.max_backoff)

    def _run(self, operation: Callable[[Any], Any], reject: Optional[Callable[[str], StoreRejected]] = None) -> Any:
        """Run `operation(cursor)`; after a dropped connection, reconnect and run it once more.
        What PostgreSQL refuses to hold (`_refusal`) is rolled back and raised as `reject(why)`
        (a `StoreRejected`), never retried: psycopg2 files some refusals (program limits) under
        `OperationalError`, as it does a lost connection."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    with self.conn.cursor() as cur:
                        if self._prepared_on is not self.conn:
                            self._prepare_statements(cur)
                        return operation(cur)
                except BaseException as error:
                    why = _refusal(error)
                    if why is None and isinstance(error, _CONNECTION_ERRORS):
                        if attempt == 2:
                            raise StoreUnavailable(f"PostgreSQL operation failed after reconnecting: {error}") from error
                        logger.warning("PostgreSQL connection lost (%s): reconnecting", error)
                        self._reconnect()
                        continue
                    self._abort()
                    if why is None:
                        raise
                    raise (reject or _rejected_read)(why) from None

    def _prepare_statements(self, cur: Any) -> None:
        """PREPARE the hot statements on the current connection (lazily: the tables must exist)."""
        for name, (types, text) in self.sql.prepared.items():
            try:
                cur.execute(sql.SQL("PREPARE {} ({}) AS ").format(sql.Identifier(name), sql.SQL(types)) + text)
            except psycopg2.errors.DuplicatePreparedStatement:
                pass  # another store with the same tables on this connection prepared the same text
        self._prepared_on = self.conn

    def _abort(self) -> None:
        """Roll back a transaction left open by a failed multi-statement operation (autocommit
        mode: psycopg2's own `rollback()` would not send anything)."""
        try:
            if not self.conn.closed and self.conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                with self.conn.cursor() as cur:
                    cur.execute("ROLLBACK")
        except _CONNECTION_ERRORS:
            pass

    @contextlib.contextmanager
    def worker_session(self, queue: Any) -> Iterator[None]:
        """While a worker loop runs on `queue`: published outbox rows are deleted by the next
        commit, or once the queue is idle (`queue.on_idle`), instead of by a transaction of their
        own per batch; what is left is deleted when the loop ends."""
        self.defer_deletes = True
        queue.on_idle = self.flush_published
        try:
            yield
        finally:
            self.defer_deletes = False
            queue.on_idle = None
            try:
                self.flush_published()
            except Exception as error:  # PostgreSQL is down: the rows are deleted by the next flush
                logger.warning("could not delete published outbox rows: %s", error)

    def lane(self) -> "PostgresRunStore":
        """The same store on a connection of its own, for another worker thread (a psycopg2
        connection serialises its users and holds one transaction at a time)."""
        other = copy.copy(self)
        other._lock = threading.RLock()
        other._local = threading.local()
        other._published = []
        other.defer_deletes = False
        other._prepared_on = None
        other.conn = self._connect()
        other._prepare()
        return other

    def close(self) -> None:
        with self._lock:
            if not self.conn.closed:
                try:
                    self.flush_published()
                except Exception as error:  # closing anyway: the rows are only published twice if read again
                    logger.warning("could not delete %d published outbox rows: %s", len(self._published), error)
                self.conn.close()

    # --- queries ---------------------------------------------------------------------------------

    # --- RunStore ------------------------------------------------------------------------------

    @staticmethod
    def _jobs_json(commit_jobs: Sequence[Job], delayed: Sequence[Tuple[Job, float]] = ()) -> List[List[Any]]:
        """The outbox rows of a commit as [body, delay_ms] pairs, in order."""
        return ([[job.to_json(), 0] for job in commit_jobs]
                + [[job.to_json(), max(0, int(round(delay * 1000)))] for job, delay in delayed])

    def create_run(self, record: RunRecord, context: Mapping[str, Any], states: Mapping[str, Dict[str, Any]], jobs: Sequence[Job],
                   history: Sequence[Dict[str, Any]] = ()) -> bool:
        params = {"run_id": record.run_id, "context": _json(dict(context)), "record": _json(attrs.asdict(record)),
                  "states": _json(dict(states)), "status": record.status, "result": _json(record.result)
                  if record.result is not None else None, "jobs": _json(self._jobs_json(jobs)),
                  "history": _json(list(history))}

        def op(cur: Any) -> List[Any]:
            cur.execute(self.sql.create, params)
            return cur.fetchall()

        def reject(why: str) -> StoreRejected:
            as_commit = Commit(record.run_id, 0, record, context_set=dict(context), states=dict(states), jobs=list(jobs))
            return _rejected_commits([as_commit], why)

        return record.run_id in self._remember(self._run(op, reject))

    def load(self, run_id: str, node_ids: Optional[Iterable[str]], context_keys: Optional[Iterable[str]]) -> Optional[RunSnapshot]:
        return self.load_many([(run_id, node_ids, context_keys)])[0]

    def load_many(self, requests: Sequence[Tuple[str, Optional[Iterable[str]], Optional[Iterable[str]]]]) -> List[Optional[RunSnapshot]]:
        """One statement for all the runs asked (None for node ids and context keys: the whole run)."""
        if not requests:
            return []
        requests = [(run_id, _listed(nodes), _listed(keys)) for run_id, nodes, keys in requests]
        wanted = json.dumps(requests, separators=(",", ":"))
        if "\\u0000" in wanted and any(_has_nul(r, *(n or ()), *(k or ())) for r, n, k in requests):
            return self._load_without_nul(requests)  # a hostile job's ids: JSONB would refuse the request

        def op(cur: Any) -> List[Any]:
            cur.execute(self.sql.exec_load, (wanted,))
            return cur.fetchall()

        return [self._snapshot(run_id, row, nodes is None and keys is None)
                for (run_id, nodes, keys), row in zip(requests, self._run(op))]

    def _load_without_nul(self, requests: Sequence[Tuple[str, Optional[Iterable[str]], Optional[Iterable[str]]]]
                          ) -> List[Optional[RunSnapshot]]:
        """`load_many` of requests some of whose ids hold NUL: those runs are unknown, those node
        ids and keys absent."""
        requests = [(run_id, _without_nul(nodes), _without_nul(keys)) for run_id, nodes, keys in requests]
        found = iter(self.load_many([r for r in requests if not _has_nul(r[0])]))
        return [None if _has_nul(run_id) else next(found) for run_id, _, _ in requests]

    def _snapshot(self, run_id: str, row: Sequence[Any], whole: bool) -> Optional[RunSnapshot]:
        has_context, record, states, context, status, updated_at = row
        if record is not None:
            return RunSnapshot(_record_from(record), states or {}, context or {}, whole)
        if not has_context:
            return None
        return RunSnapshot(self._seed_record(run_id, status, updated_at), {}, context or {}, whole)

    @staticmethod
    def _seed_record(run_id: str, status: Optional[str], updated_at: Optional[float]) -> RunRecord:
        """A run started by a seed client: a context (and a status) row, never initialised."""
        return RunRecord(run_id, status=status or RUNNING, version=0, updated_at=updated_at or 0.0)

    def _select_one(self, query: Any, params: Mapping[str, Any]) -> Any:
        def op(cur: Any) -> Any:
            cur.execute(query, params)
            row = cur.fetchone()
            return None if row is None else row[0]

        return self._run(op)

    # Reads of an id holding NUL find nothing without asking: PostgreSQL could hold no such thing
    # (and psycopg2 refuses to send it), so recording a hostile job's failure never raises.

    def read_states(self, run_id: str, node_ids: Iterable[str]) -> Dict[str, Dict[str, Any]]:
        if _has_nul(run_id):
            return {}
        return self._select_one(self.sql.states, {"run_id": run_id, "nodes": _without_nul(node_ids)}) or {}

    def read_all_states(self, run_id: str) -> Dict[str, Dict[str, Any]]:
        return {} if _has_nul(run_id) else self._select_one(self.sql.all_states, {"run_id": run_id}) or {}

    def read_context(self, run_id: str, keys: Iterable[str]) -> Dict[str, Any]:
        if _has_nul(run_id):
            return {}
        return self._select_one(self.sql.context, {"run_id": run_id, "keys": _without_nul(keys)}) or {}

    def read_all_context(self, run_id: str) -> Dict[str, Any]:
        return {} if _has_nul(run_id) else self._select_one(self.sql.all_context, {"run_id": run_id}) or {}

    def read_history(self, run_id: str) -> List[Dict[str, Any]]:
        if _has_nul(run_id):
            return []

        def op(cur: Any) -> List[Any]:
            cur.execute(self.sql.history, {"run_id": run_id})
            return [event for (events,) in cur.fetchall() for event in events]

        return self._run(op)

    def read_items(self, run_id: str, fields: Sequence[str]) -> List[Any]:
        fields = list(fields)
        if not fields:
            return []
        if _has_nul(run_id):
            return [None] * len(fields)
        if _has_nul(*fields):  # asked as "" (no item field is empty), read as absent
            found = self.read_items(run_id, ["" if _has_nul(f) else f for f in fields])
            return [None if _has_nul(f) else value for f, value in zip(fields, found)]
        found = self._select_one(self.sql.items, {"run_id": run_id, "fields": fields})
        return list(found) if found else [None] * len(fields)

    # --- commits --------------------------------------------------------------------------------

    def commit(self, commit: Commit) -> bool:
        return self._commit_all([commit])[0]

    def commit_many(self, commits: Sequence[Commit]) -> List[bool]:
        """Apply commits of different runs together: one statement, one WAL flush (see the module
        docstring). Each is version-checked on its own: a stale one is reported False and leaves
        its run untouched, the others apply."""
        return self._commit_all(commits)

    def _commit_all(self, commits: Sequence[Commit]) -> List[bool]:
        if not commits:
            return []
        if any("\x00" in c.run_id for c in commits):  # no such run can exist: stale, as an unknown run's
            kept = iter(self._commit_all([c for c in commits if not _has_nul(c.run_id)]))
            return [False if _has_nul(c.run_id) else next(kept) for c in commits]
        if any(c.expected_version == 0 for c in commits) or len({c.run_id for c in commits}) < len(commits):
            return self._commit_each(commits)
        wave = self._wave(commits)
        lock = [c.run_id for c in commits] if any(c.node_commit for c in commits) else None

        def op(cur: Any) -> List[Any]:
            published = list(self._published)  # under the store's lock, as every change of the list
            if lock is None:
                cur.execute(self.sql.exec_commit, (wave, published, HISTORY_CAP))
                rows = cur.fetchall()
            else:
                cur.execute(self.sql.lock_runs + self.sql.exec_commit, (lock, wave, published, HISTORY_CAP))
                rows = cur.fetchall()
                cur.execute("COMMIT")
            del self._published[:len(published)]
            return rows

        rows = self._run(op, lambda why: _rejected_commits(commits, why))
        applied = self._remember(rows)
        self._note_applied(commits, rows)
        return [c.run_id in applied for c in commits]

    def _commit_each(self, commits: Sequence[Commit]) -> List[bool]:
        """Adoptions of seed-protocol runs (version 0), or several commits of one run: one
        statement per commit, in run-id order (the lock order of the wave statement), in one
        transaction that locks the runs rows first."""
        order = sorted(range(len(commits)), key=lambda i: commits[i].run_id)

        def op(cur: Any) -> List[List[Any]]:
            rows: List[List[Any]] = [[] for _ in commits]
            cur.execute(self.sql.lock_runs, ([c.run_id for c in commits],))
            for i in order:
                if commits[i].expected_version == 0:
                    cur.execute(self.sql.adopt, self._adopt_params(commits[i]))
                else:
                    cur.execute(self.sql.exec_commit, (self._wave([commits[i]]), [], HISTORY_CAP))
                rows[i] = cur.fetchall()
            cur.execute("COMMIT")
            return rows

        results = self._run(op, lambda why: _rejected_commits(commits, why))
        for commit, rows in zip(commits, results):
            self._note_applied([commit], rows)
        return [c.run_id in self._remember(rows) for c, rows in zip(commits, results)]

    @staticmethod
    def _note_applied(commits: Sequence[Commit], rows: Sequence[Sequence[Any]]) -> None:
        """Set `outstanding_after`, `awaiting_after` and `reached` of the applied commits (one per run)."""
        by_run = {c.run_id: c for c in commits}
        for kind, run_id, _, awaiting, number in rows:
            commit = by_run.get(run_id)
            if commit is None:
                continue
            if kind == "r" and number is not None:
                commit.outstanding_after = int(number)
                commit.awaiting_after = json.loads(awaiting) if awaiting else {}
            elif kind == "c":
                commit.reached.append(commit.counters[int(number) - 1])

    @staticmethod
    def _new_record(commit: Commit) -> Tuple[Dict[str, Any], Any]:
        if commit.node_commit:  # the stored record is kept: only its version, count and updated_at change
            return {}, None
        record = attrs.asdict(commit.record, recurse=False)  # its values are JSON already
        record["version"] = commit.expected_version + 1  # type: ignore[operator]  # a run commit has one
        # Errors quote what failed, a hostile job's ids too: what JSONB cannot hold is escaped, so
        # that recording a failure never fails in turn.
        if record["errors"]:
            record["errors"] = _storable(record["errors"])
        if record["result"] and record["result"].get("errors"):
            record["result"] = dict(record["result"], errors=_storable(record["result"]["errors"]))
        final = commit.record.status in _FINAL and commit.record.result is not None
        result = record["result"] if final else None
        if final:
            record["result"] = None  # stored once, in the status row (get_record reads it from there)
        return record, result

    def _wave(self, commits: Sequence[Commit]) -> str:
        """The JSON document the wave statement reads with `jsonb_to_recordset` (`StoreRejected`
        when a value cannot be encoded)."""
        entries = []
        for commit in commits:
            record, result = self._new_record(commit)
            entries.append({
                "run_id": commit.run_id, "expected": commit.expected_version, "record": record,
                "states": commit.states, "items": commit.items, "ctx_set": commit.context_set,
                "ctx_del": list(commit.context_delete), "status": commit.record.status, "result": result,
                "jobs": self._jobs_json(commit.jobs, commit.delayed),
                "final": not commit.node_commit and commit.record.status in _FINAL,
                "node": commit.node_commit, "guards": commit.guards, "unset": list(commit.unset_items),
                "counters": [[c.field, c.delta, c.threshold, c.reserve, c.job.to_json() if c.job is not None else None]
                             for c in commit.counters],
                "delta": commit.outstanding_delta, "updated_at": float(commit.record.updated_at),
                "history": commit.history,
            })
        try:
            wave = _dumps(entries)
        except _Unencodable as error:
            raise _rejected_commits(commits, str(error)) from None
        if len(wave) >= _MAX_STATEMENT:  # ASCII (`ensure_ascii`): characters are bytes
            raise _rejected_commits(commits, f"{len(wave):,} bytes of JSON, over PostgreSQL's 1 GB for any value")
        return wave

    def _adopt_params(self, commit: Commit) -> Dict[str, Any]:
        record, result = self._new_record(commit)
        return {
            "run_id": commit.run_id, "record": _json(record), "states": _json(commit.states), "items": _json(commit.items),
            "ctx_set": _json(commit.context_set), "ctx_del": list(commit.context_delete),
            "final": commit.record.status in _FINAL, "status": commit.record.status,
            "result": _json(result) if result is not None else None,
            "jobs": _json(self._jobs_json(commit.jobs, commit.delayed)),
        }

    # --- the outbox ------------------------------------------------------------------------------

    def _unpublished(self) -> Dict[str, List[Tuple[int, str, int]]]:
        pending = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = {}
        return pending

    def _remember(self, rows: Sequence[Sequence[Any]]) -> Dict[str, List[Tuple[int, str, int]]]:
        """Keep the outbox rows a commit statement returned, for this thread's next publish;
        returns them by applied run (a run without jobs maps to an empty list)."""
        applied: Dict[str, List[Tuple[int, str, int]]] = {}
        for kind, run_id, row_id, body, delay_ms in rows:
            jobs = applied.setdefault(run_id, [])
            if kind == "o":
                jobs.append((row_id, body, delay_ms))
        pending = self._unpublished()
        for run_id, jobs in applied.items():
            pending.setdefault(run_id, []).extend(jobs)
        return applied

    def publish_outbox(self, run_id: str, queue: Any) -> int:
        return self.publish_outboxes([run_id], queue)

    def publish_outboxes(self, run_ids: Sequence[str], queue: Any) -> int:
        """Publish (confirmed) and delete the runs' outbox rows: those this thread's commits
        returned as they are, those of other runs read from the table (see the module docstring)."""
        pending = self._unpublished()
        run_ids = list(dict.fromkeys(run_ids))
        known = {run_id for run_id in run_ids if run_id in pending}
        # Taken out before publishing: should the publish fail, the rows stay in the table, the
        # deliveries stay unacknowledged, and their redelivery publishes the rows from the table.
        rows = [row for run_id in run_ids if run_id in known for row in pending.pop(run_id)]
        # (an id holding NUL has no rows, and psycopg2 would refuse to send it)
        others = [run_id for run_id in run_ids if run_id not in known and "\x00" not in run_id]
        if others:
            return self._publish_from_table(others, rows, queue)
        if not rows:
            return 0
        self._publish_rows(rows, queue)
        with self._lock:
            self._published.extend(row[0] for row in rows)
            if self.defer_deletes and len(self._published) < _MAX_DEFERRED_DELETES:
                return len(rows)
        self.flush_published()
        return len(rows)

    def flush_published(self) -> None:
        """Delete the outbox rows published and not deleted yet (`synchronous_commit` off)."""
        def op(cur: Any) -> None:
            published = list(self._published)
            if published:
                cur.execute(self.sql.outbox_forget, {"ids": published})
                del self._published[:len(published)]

        if self._published:
            self._run(op)

    def sweep_outbox(self, older_than_seconds: float, queue: Any, limit: int = 1000) -> int:
        """Publish again and delete outbox rows older than `older_than_seconds` (any run's): what a
        killed worker left behind. Publishing a job twice is harmless (the duplicate is dropped)."""
        return self._publish_locked(self.sql.outbox_stale, {"age": float(older_than_seconds), "limit": int(limit)},
                                    (), queue)

    def _publish_from_table(self, run_ids: Sequence[str], rows: Sequence[Tuple[int, str, int]], queue: Any) -> int:
        """Lock the runs' outbox rows, publish them with `rows`, delete them all."""
        return self._publish_locked(self.sql.outbox_lock, {"run_ids": list(run_ids)}, rows, queue)

    def _publish_locked(self, lock_query: Any, params: Mapping[str, Any], rows: Sequence[Tuple[int, str, int]],
                        queue: Any) -> int:
        """Lock outbox rows with `lock_query` (it opens a transaction), publish them with `rows`,
        delete them all."""
        def op(cur: Any) -> int:
            cur.execute(lock_query, params)
            ids = {row[0] for row in rows}
            todo = list(rows) + [row for row in cur.fetchall() if row[0] not in ids]
            if not todo:
                cur.execute("ROLLBACK")
                return 0
            try:
                self._publish_rows(todo, queue)
            except BaseException:
                self._abort()
                raise
            cur.execute(self.sql.outbox_delete, {"ids": [row[0] for row in todo]})
            return len(todo)

        return self._run(op)

    @staticmethod
    def _publish_rows(rows: Sequence[Tuple[int, str, int]], queue: Any) -> None:
        serialized = getattr(queue, "enqueue_serialized", None)
        if serialized is not None:  # the bodies are the jobs' JSON already: no parse and re-dump
            return serialized([(body, max(0, int(delay_ms)) / 1000.0) for _, body, delay_ms in rows])
        by_delay: Dict[int, List[Job]] = {}
        for _, body, delay_ms in rows:
            by_delay.setdefault(max(0, int(delay_ms)), []).append(Job.from_json(body))
        for delay_ms, jobs in by_delay.items():
            queue.enqueue(jobs, delay_ms / 1000.0)

    def get_record(self, run_id: str) -> Optional[RunRecord]:
        """The run's record: one primary-key read (status polls call this in a loop); a run with
        no runs row (unknown, or started by a seed client) goes through `load`."""
        if _has_nul(run_id):
            return None  # no such run can exist (see the reads above)

        def op(cur: Any) -> Any:
            cur.execute(self.sql.exec_record, (run_id,))
            row = cur.fetchone()
            return None if row is None else row[0]

        record = self._run(op)
        if record is not None:
            return _record_from(record)
        snap = self.load(run_id, (), ())
        return None if snap is None else snap.record

    def touch(self, run_id: str, updated_at: float) -> None:
        """The status row's `updated_at` is the database's clock, as in every commit."""
        if not _has_nul(run_id):
            self._run(lambda cur: cur.execute(self.sql.touch, {"run_id": run_id}))

    def idle_runs(self, idle_seconds: float, limit: int = 1000) -> Tuple[int, List[str]]:
        """`(running runs scanned, ids of those whose status row is older than idle_seconds)`."""
        def op(cur: Any) -> Tuple[int, List[str]]:
            cur.execute(self.sql.idle, {"idle": float(idle_seconds), "limit": int(limit)})
            scanned, ids = cur.fetchone()
            return int(scanned), list(ids)

        return self._run(op)

    # --- helpers (PostgresContext, tests) --------------------------------------------------------

    def set_key(self, run_id: str, key: str, value: Any) -> None:
        """Patch one context key: its key row (an adopted run's) and `context_data`."""
        def op(cur: Any) -> None:
            cur.execute(self.sql.set_key, {"run_id": run_id, "key": key, "value": _json(value)})

        self._run(op, lambda why: StoreRejected(f"PostgreSQL cannot store context key {_short(key)} of run "
                                                f"{_short(run_id)}: {why}", run_id))

    def delete_key(self, run_id: str, key: str) -> None:
        def op(cur: Any) -> None:
            cur.execute(self.sql.delete_key, {"run_id": run_id, "key": key})

        self._run(op)

    def run_ids(self) -> List[str]:
        def op(cur: Any) -> List[str]:
            cur.execute(self.sql.run_ids)
            return [row[0] for row in cur.fetchall()]

        return self._run(op)
