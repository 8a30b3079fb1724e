"""`PostgresRunStore`: the `RunStore` port on PostgreSQL JSONB (same semantics as `InMemoryRunStore`).

* A commit is ONE SQL statement (data-modifying CTEs, autocommit): the version-checked update of the
  runs row, the JSONB patch of the context (`(context_data || set) - deleted`), the status row
  (`updated_at = now()`, `result` when final) and the outbox rows. No matching version, no change.
* `load` is one SELECT: the record, the requested node states and the requested context keys
  (extracted server side, key by key).
* Jobs committed with a node's completion go to the outbox table; `publish_outbox` publishes them
  (with publisher confirms) under `SELECT ... FOR UPDATE SKIP LOCKED` and deletes them.
* A dropped connection (PostgreSQL restart, `pg_terminate_backend`) is replaced with exponential
  backoff, and the failed operation is retried once on the new connection. Every operation is safe
  to retry: a commit is a single statement (applied or not; a retry of an applied one fails its
  version check and the core reloads), the others are reads or idempotent.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import attrs
import psycopg2
import psycopg2.extras
from psycopg2 import sql

from flowcraft.ports import Commit, Job, RunRecord, RunSnapshot

from .schema import DEFAULT_CONTEXT_TABLE, DEFAULT_STATUS_TABLE, default_table_names, ensure_schema, validate_identifier

logger = logging.getLogger("flowcraft.rabbitmq.store")

_FINAL = ("completed", "failed", "cancelled", "stalled")
_CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)


class StoreUnavailable(ConnectionError):
    """PostgreSQL could not be reached again within the reconnect timeout."""


def _json(value: Any) -> psycopg2.extras.Json:
    return psycopg2.extras.Json(value, dumps=lambda v: json.dumps(v, separators=(",", ":")))


def _record_from(data: Mapping[str, Any]) -> RunRecord:
    fields = {f.name for f in attrs.fields(RunRecord)}
    return RunRecord(**{k: v for k, v in data.items() if k in fields})


class PostgresRunStore:
    """Runs in PostgreSQL; see the module docstring. Thread-safe (one connection behind a lock)."""

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
        max_backoff: float = 5.0,
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
        if create_schema:
            ensure_schema(self.conn, self.context_table, self.status_table, self.runs_table, self.outbox_table)
        self._prepare()
        self._build_queries()

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
                logger.warning("PostgreSQL unreachable (%s); retrying in %.2fs", error, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)

    def _run(self, operation: Callable[[Any], Any]) -> Any:
        """Run `operation(cursor)`; after a dropped connection, reconnect and run it once more."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    with self.conn.cursor() as cur:
                        return operation(cur)
                except _CONNECTION_ERRORS as error:
                    if attempt == 2:
                        raise StoreUnavailable(f"PostgreSQL operation failed after reconnecting: {error}") from error
                    logger.warning("PostgreSQL connection lost (%s): reconnecting", error)
                    self._reconnect()
                except BaseException:
                    self._abort()
                    raise

    def _abort(self) -> None:
        """Roll back a transaction left open by a failed multi-statement operation (autocommit
        mode: psycopg2's own `rollback()` would not send anything)."""
        try:
            if not self.conn.closed and self.conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                with self.conn.cursor() as cur:
                    cur.execute("ROLLBACK")
        except _CONNECTION_ERRORS:
            pass

    def close(self) -> None:
        with self._lock:
            if not self.conn.closed:
                self.conn.close()

    # --- queries ---------------------------------------------------------------------------------

    def _build_queries(self) -> None:
        ids = {"ctx": sql.Identifier(self.context_table), "st": sql.Identifier(self.status_table),
               "runs": sql.Identifier(self.runs_table), "outbox": sql.Identifier(self.outbox_table)}
        q = lambda text: sql.SQL(text).format(**ids)  # noqa: E731
        status_upsert = (
            " INSERT INTO {st} (run_id, status, updated_at, result) SELECT run_id, %(status)s, now(), %(result)s FROM r"
            " ON CONFLICT (run_id) DO UPDATE SET status = EXCLUDED.status, updated_at = now(), result = EXCLUDED.result"
        )
        outbox_insert = (
            " INSERT INTO {outbox} (run_id, body, delay_ms) SELECT r.run_id, u.body, u.delay_ms FROM r,"
            " unnest(%(bodies)s::text[], %(delays)s::int[]) WITH ORDINALITY AS u(body, delay_ms, ord) ORDER BY u.ord"
        )
        tail = (
            ", c AS (UPDATE {ctx} SET context_data = (context_data || %(ctx_set)s::jsonb) - %(ctx_del)s::text[]"
            "        WHERE %(has_ctx)s AND run_id IN (SELECT run_id FROM r))"
            ", s AS (" + status_upsert + ")"
            ", o AS (" + outbox_insert + ")"
            " SELECT count(*) FROM r"
        )
        self._q_commit = q(
            "WITH r AS (UPDATE {runs} SET record = %(record)s, states = states || %(states)s::jsonb,"
            "           items = items || %(items)s::jsonb"
            "           WHERE run_id = %(run_id)s AND (record->>'version')::int = %(expected)s RETURNING run_id)" + tail
        )
        # Version 0: a run started by a seed client (a context row, no runs row) being adopted.
        self._q_adopt = q(
            "WITH r AS (INSERT INTO {runs} (run_id, record, states, items)"
            "           SELECT run_id, %(record)s, %(states)s, %(items)s FROM {ctx} WHERE run_id = %(run_id)s"
            "           ON CONFLICT (run_id) DO NOTHING RETURNING run_id)" + tail
        )
        self._q_create = q(
            "WITH r AS (INSERT INTO {ctx} (run_id, context_data) VALUES (%(run_id)s, %(context)s)"
            "           ON CONFLICT (run_id) DO NOTHING RETURNING run_id)"
            ", n AS (INSERT INTO {runs} (run_id, record, states) SELECT run_id, %(record)s, %(states)s FROM r"
            "        ON CONFLICT (run_id) DO NOTHING)"
            ", s AS (" + status_upsert + ")"
            ", o AS (" + outbox_insert + ")"
            " SELECT count(*) FROM r"
        )
        pick = ("(SELECT jsonb_object_agg(k, {col} -> k) FROM unnest(%({param})s::text[]) AS k WHERE {col} ? k)")
        # One row per requested run, in the order asked; node ids and context keys travel as one
        # JSON array per run, so any number of runs is one statement.
        pick_json = "(SELECT jsonb_object_agg(k, {col} -> k) FROM jsonb_array_elements_text(q.{param}) AS k WHERE {col} ? k)"
        self._q_load = q(
            "SELECT c.run_id IS NOT NULL, r.record, "
            + pick_json.format(col="r.states", param="nodes") + ", "
            + pick_json.format(col="c.context_data", param="keys") + ", "
            "s.status, extract(epoch FROM s.updated_at)::float8"
            " FROM unnest(%(run_ids)s::text[], %(nodes)s::jsonb[], %(keys)s::jsonb[]) WITH ORDINALITY AS q(run_id, nodes, keys, ord)"
            " LEFT JOIN {ctx} AS c ON c.run_id = q.run_id"
            " LEFT JOIN {runs} AS r ON r.run_id = q.run_id"
            " LEFT JOIN {st} AS s ON s.run_id = q.run_id"
            " ORDER BY q.ord"
        )
        self._q_states = q("SELECT " + pick.format(col="states", param="nodes") + " FROM {runs} WHERE run_id = %(run_id)s")
        self._q_all_states = q("SELECT states FROM {runs} WHERE run_id = %(run_id)s")
        self._q_context = q("SELECT " + pick.format(col="context_data", param="keys") + " FROM {ctx} WHERE run_id = %(run_id)s")
        self._q_all_context = q("SELECT context_data FROM {ctx} WHERE run_id = %(run_id)s")
        self._q_items = q(
            "SELECT (SELECT jsonb_agg(items -> u.f ORDER BY u.i) FROM unnest(%(fields)s::text[]) WITH ORDINALITY AS u(f, i))"
            " FROM {runs} WHERE run_id = %(run_id)s"
        )
        self._q_outbox_lock = q(
            "BEGIN; SET LOCAL synchronous_commit TO OFF;"
            " SELECT id, body, delay_ms FROM {outbox} WHERE run_id = ANY(%(run_ids)s::text[]) ORDER BY id FOR UPDATE SKIP LOCKED"
        )
        self._q_outbox_delete = q("DELETE FROM {outbox} WHERE id = ANY(%(ids)s::bigint[]); COMMIT")
        self._q_idle = q(
            "SELECT (SELECT count(*) FROM {st} WHERE status = 'running'),"
            " array(SELECT run_id FROM {st} WHERE status = 'running'"
            "       AND updated_at <= now() - make_interval(secs => %(idle)s) ORDER BY updated_at LIMIT %(limit)s)"
        )
        self._q_touch = q("UPDATE {st} SET updated_at = now() WHERE run_id = %(run_id)s AND status = 'running'")
        self._q_set_key = q(
            "UPDATE {ctx} SET context_data = context_data || jsonb_build_object(%(key)s::text, %(value)s::jsonb)"
            " WHERE run_id = %(run_id)s"
        )
        self._q_delete_key = q("UPDATE {ctx} SET context_data = context_data - %(key)s::text WHERE run_id = %(run_id)s")
        self._q_run_ids = q("SELECT run_id FROM {ctx} ORDER BY run_id")

    # --- RunStore ------------------------------------------------------------------------------

    @staticmethod
    def _outbox_params(entries: Sequence[Tuple[Job, float]]) -> Dict[str, Any]:
        return {"bodies": [job.to_json() for job, _ in entries],
                "delays": [max(0, int(round(delay * 1000))) for _, delay in entries]}

    def create_run(self, record: RunRecord, context: Mapping[str, Any], states: Mapping[str, Dict[str, Any]], jobs: Sequence[Job]) -> bool:
        params = {"run_id": record.run_id, "context": _json(dict(context)), "record": _json(attrs.asdict(record)),
                  "states": _json(dict(states)), "status": record.status, "result": _json(record.result)
                  if record.result is not None else None}
        params.update(self._outbox_params([(j, 0.0) for j in jobs]))

        def op(cur: Any) -> bool:
            cur.execute(self._q_create, params)
            return cur.fetchone()[0] == 1

        return self._run(op)

    def load(self, run_id: str, node_ids: Iterable[str], context_keys: Iterable[str]) -> Optional[RunSnapshot]:
        return self.load_many([(run_id, list(node_ids), list(context_keys))])[0]

    def load_many(self, requests: Sequence[Tuple[str, Sequence[str], Sequence[str]]]) -> List[Optional[RunSnapshot]]:
        if not requests:
            return []
        params = {"run_ids": [run_id for run_id, _, _ in requests],
                  "nodes": [json.dumps(list(nodes)) for _, nodes, _ in requests],
                  "keys": [json.dumps(list(keys)) for _, _, keys in requests]}

        def op(cur: Any) -> List[Any]:
            cur.execute(self._q_load, params)
            return cur.fetchall()

        return [self._snapshot(run_id, row) for (run_id, _, _), row in zip(requests, self._run(op))]

    def _snapshot(self, run_id: str, row: Sequence[Any]) -> Optional[RunSnapshot]:
        has_context, record, states, context, status, updated_at = row
        if record is not None:
            return RunSnapshot(_record_from(record), states or {}, context or {})
        if not has_context:
            return None
        return RunSnapshot(self._seed_record(run_id, status, updated_at), {}, context or {})

    @staticmethod
    def _seed_record(run_id: str, status: Optional[str], updated_at: Optional[float]) -> RunRecord:
        """A run started by a seed client: a context (and a status) row, never initialised."""
        return RunRecord(run_id, status=status or "running", version=0, updated_at=updated_at or 0.0)

    def _select_one(self, query: Any, params: Mapping[str, Any]) -> Any:
        def op(cur: Any) -> Any:
            cur.execute(query, params)
            row = cur.fetchone()
            return None if row is None else row[0]

        return self._run(op)

    def read_states(self, run_id: str, node_ids: Iterable[str]) -> Dict[str, Dict[str, Any]]:
        return self._select_one(self._q_states, {"run_id": run_id, "nodes": list(node_ids)}) or {}

    def read_all_states(self, run_id: str) -> Dict[str, Dict[str, Any]]:
        return self._select_one(self._q_all_states, {"run_id": run_id}) or {}

    def read_context(self, run_id: str, keys: Iterable[str]) -> Dict[str, Any]:
        return self._select_one(self._q_context, {"run_id": run_id, "keys": list(keys)}) or {}

    def read_all_context(self, run_id: str) -> Dict[str, Any]:
        return self._select_one(self._q_all_context, {"run_id": run_id}) or {}

    def read_items(self, run_id: str, fields: Sequence[str]) -> List[Any]:
        fields = list(fields)
        if not fields:
            return []
        found = self._select_one(self._q_items, {"run_id": run_id, "fields": fields})
        return list(found) if found else [None] * len(fields)

    def commit(self, commit: Commit) -> bool:
        return self._commit_one(commit)

    def _commit_one(self, commit: Commit) -> bool:
        query, params = self._commit_statement(commit)

        def op(cur: Any) -> bool:
            cur.execute(query, params)
            return cur.fetchone()[0] == 1

        return self._run(op)

    def commit_many(self, commits: Sequence[Commit]) -> List[bool]:
        """All in one transaction, so one WAL flush serves them all (group commit). Each statement
        is still version-checked on its own; rows are locked in run-id order so that two workers
        committing overlapping batches cannot deadlock."""
        if len(commits) <= 1:
            return [self._commit_one(c) for c in commits]
        order = sorted(range(len(commits)), key=lambda i: commits[i].run_id)
        statements = [(i, *self._commit_statement(commits[i])) for i in order]

        def op(cur: Any) -> List[bool]:
            results = [False] * len(commits)
            cur.execute("BEGIN")
            for i, query, params in statements:
                cur.execute(query, params)
                results[i] = cur.fetchone()[0] == 1
            cur.execute("COMMIT")
            return results

        return self._run(op)

    def _commit_statement(self, commit: Commit) -> Tuple[Any, Dict[str, Any]]:
        record = attrs.asdict(commit.record)
        record["version"] = commit.expected_version + 1
        has_ctx = bool(commit.context_set or commit.context_delete)
        params = {
            "run_id": commit.run_id, "expected": commit.expected_version, "record": _json(record),
            "states": _json(commit.states), "items": _json(commit.items),
            "ctx_set": _json(commit.context_set), "ctx_del": list(commit.context_delete), "has_ctx": has_ctx,
            "status": commit.record.status,
            "result": _json(commit.record.result) if commit.record.status in _FINAL and commit.record.result is not None else None,
        }
        params.update(self._outbox_params([(j, 0.0) for j in commit.jobs] + list(commit.delayed)))
        return (self._q_adopt if commit.expected_version == 0 else self._q_commit), params

    def publish_outbox(self, run_id: str, queue: Any) -> int:
        return self.publish_outboxes([run_id], queue)

    def publish_outboxes(self, run_ids: Sequence[str], queue: Any) -> int:
        """Lock the runs' outbox rows, publish them (confirmed), delete them. The delete is
        committed without waiting for its WAL flush: should it be lost in a crash, the jobs are
        published again, and a duplicate job is dropped by the worker that takes it."""
        def op(cur: Any) -> int:
            cur.execute(self._q_outbox_lock, {"run_ids": list(run_ids)})
            rows = cur.fetchall()
            if not rows:
                cur.execute("ROLLBACK")
                return 0
            try:
                self._publish_rows(rows, queue)
            except BaseException:
                self._abort()
                raise
            cur.execute(self._q_outbox_delete, {"ids": [row[0] for row in rows]})
            return len(rows)

        return self._run(op)

    @staticmethod
    def _publish_rows(rows: Sequence[Tuple[int, str, int]], queue: Any) -> None:
        by_delay: Dict[int, List[Job]] = {}
        for _, body, delay_ms in rows:
            by_delay.setdefault(max(0, int(delay_ms)), []).append(Job.from_json(body))
        for delay_ms, jobs in by_delay.items():
            queue.enqueue(jobs, delay_ms / 1000.0)

    def get_record(self, run_id: str) -> Optional[RunRecord]:
        snap = self.load(run_id, (), ())
        return None if snap is None else snap.record

    def touch(self, run_id: str, updated_at: float) -> None:
        """The status row's `updated_at` is the database's clock, as in every commit."""
        self._run(lambda cur: cur.execute(self._q_touch, {"run_id": run_id}))

    def idle_runs(self, idle_seconds: float, limit: int = 1000) -> Tuple[int, List[str]]:
        """`(running runs scanned, ids of those whose status row is older than idle_seconds)`."""
        def op(cur: Any) -> Tuple[int, List[str]]:
            cur.execute(self._q_idle, {"idle": float(idle_seconds), "limit": int(limit)})
            scanned, ids = cur.fetchone()
            return int(scanned), list(ids)

        return self._run(op)

    # --- helpers (PostgresContext, tests) --------------------------------------------------------

    def set_key(self, run_id: str, key: str, value: Any) -> None:
        """Patch one context key in place (`context_data || {key: value}`)."""
        def op(cur: Any) -> None:
            cur.execute(self._q_set_key, {"run_id": run_id, "key": key, "value": _json(value)})

        self._run(op)

    def delete_key(self, run_id: str, key: str) -> None:
        def op(cur: Any) -> None:
            cur.execute(self._q_delete_key, {"run_id": run_id, "key": key})

        self._run(op)

    def run_ids(self) -> List[str]:
        def op(cur: Any) -> List[str]:
            cur.execute(self._q_run_ids)
            return [row[0] for row in cur.fetchall()]

        return self._run(op)


_ABSENT = object()


class PostgresContext:
    """One run's context in its `context_data` JSONB column, read and patched key by key.

    `get`/`has` read one key (`context_data -> key`), `set`/`delete` patch one key in place
    (never rewriting the document), `to_dict` reads the whole document. Changes made here are
    outside any node commit: use it from clients and tools, not from node code (node code gets a
    context whose changes commit with the node's completion)."""

    def __init__(self, store: PostgresRunStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    def get(self, key: str, default: Any = None) -> Any:
        found = self.store.read_context(self.run_id, [key])
        return found.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.store.read_context(self.run_id, [key])

    def set(self, key: str, value: Any) -> None:
        self.store.set_key(self.run_id, key, value)

    def delete(self, key: str) -> None:
        self.store.delete_key(self.run_id, key)

    def to_dict(self) -> Dict[str, Any]:
        return self.store.read_all_context(self.run_id)

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _ABSENT)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.has(key)
