"""SPEC section 11 on PostgreSQL: the run list (`list_runs`, over the status table's indexes, see
schema.py) and `prune`, mixed into `PostgresRunStore`. Every name is a `psycopg2.sql.Identifier`,
every value a parameter."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

from psycopg2 import sql

from flowcraft.operations import RunPage, RunSummary, check_list_args, decode_cursor, encode_cursor

from .schema import context_keys_table_name, history_table_name, items_table_name, node_states_table_name


class PostgresOperations:
    """`list_runs` and `prune` for a store with `context_table`, `status_table`, `runs_table`,
    `outbox_table` and `_run(operation)`."""

    context_table: str
    status_table: str
    runs_table: str
    outbox_table: str

    def _run(self, operation: Any, reject: Any = None) -> Any: ...

    def list_runs(self, status: Optional[str] = None, blueprint_id: Optional[str] = None, since: Optional[float] = None,
                  until: Optional[float] = None, limit: int = 50, cursor: Optional[str] = None) -> RunPage:
        """Newest first by the status row's `updated_at` (one index scan: the status index when
        `status` is given); `blueprint_id` filters the rows read (the record's)."""
        check_list_args(status, limit)
        after = decode_cursor(cursor)
        where: List[sql.Composable] = []
        params: List[Any] = []
        if status is not None:
            where.append(sql.SQL("s.status = %s"))
            params.append(status)
        if since is not None:
            where.append(sql.SQL("s.updated_at >= to_timestamp(%s)"))
            params.append(float(since))
        if until is not None:
            where.append(sql.SQL("s.updated_at <= to_timestamp(%s)"))
            params.append(float(until))
        if after is not None:
            where.append(sql.SQL("(s.updated_at, s.run_id) < (%s::timestamptz, %s)"))
            params += [str(after[0]), after[1]]
        if blueprint_id is not None:
            where.append(sql.SQL("r.record->>'blueprint_id' = %s"))
            params.append(blueprint_id)
        query = sql.SQL(
            "SELECT s.run_id, s.status, extract(epoch FROM s.updated_at)::float8,"
            " extract(epoch FROM coalesce(s.created_at, s.updated_at))::float8,"
            " r.record->>'blueprint_id', r.record->>'blueprint_version', r.record->'errors'->0->>'message',"
            " s.updated_at::text FROM {st} AS s LEFT JOIN {runs} AS r ON r.run_id = s.run_id {where}"
            " ORDER BY s.updated_at DESC, s.run_id DESC LIMIT %s"
        ).format(st=sql.Identifier(self.status_table), runs=sql.Identifier(self.runs_table),
                 where=sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""))
        params.append(limit + 1)

        def op(cur: Any) -> List[Any]:
            cur.execute(query, params)
            return list(cur.fetchall())

        rows = self._run(op)
        runs = [RunSummary(r[0], r[4], r[5], r[1], r[3], r[2], r[6]) for r in rows[:limit]]
        more = len(rows) > limit
        # the cursor keeps the exact timestamp, as PostgreSQL writes it (a float would round it)
        return RunPage(runs, encode_cursor(rows[limit - 1][7], rows[limit - 1][0]) if more else None)

    def prune(self, updated_before: float, statuses: Sequence[str]) -> int:
        """Delete the runs of `statuses` whose status row was updated before `updated_before`:
        their rows in every table, in one transaction per 1,000 runs."""
        ident = sql.Identifier
        tables = [self.context_table, self.runs_table, items_table_name(self.runs_table),
                  node_states_table_name(self.runs_table), context_keys_table_name(self.runs_table), self.outbox_table,
                  history_table_name(self.runs_table)]
        pick = sql.SQL("SELECT run_id FROM {} WHERE status = ANY(%s) AND updated_at < to_timestamp(%s)"
                       " LIMIT 1000 FOR UPDATE SKIP LOCKED").format(ident(self.status_table))
        deletes = [sql.SQL("DELETE FROM {} WHERE run_id = ANY(%s)").format(ident(t)) for t in tables]
        delete_status = sql.SQL("DELETE FROM {} WHERE run_id = ANY(%s)").format(ident(self.status_table))
        total = 0
        while True:
            def op(cur: Any) -> int:
                cur.execute("BEGIN")
                try:
                    cur.execute(pick, (list(statuses), float(updated_before)))
                    ids = [r[0] for r in cur.fetchall()]
                    if ids:
                        for statement in deletes:
                            cur.execute(statement, (ids,))
                        cur.execute(delete_status, (ids,))
                    cur.execute("COMMIT")
                    return len(ids)
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise

            done = self._run(op)
            total += done
            if done < 1000:
                return total
