"""The SQL of `PostgresRunStore`, composed once per set of table names: identifiers validated and
quoted with `psycopg2.sql`, every value a query parameter. The hot statements (wave commit, wave
load, record) are server-side prepared: `prepared` maps their names to (argument types, body),
and the `exec_*` statements run them."""
from __future__ import annotations

import hashlib
from typing import Dict, Tuple

from psycopg2 import sql

from flowcraft.result import AWAITING, RUNNING

from .schema import context_keys_table_name, history_table_name, items_table_name, node_states_table_name


class Queries:
    """Every statement the store runs, for one context, status, runs and outbox table."""

    def __init__(self, context_table: str, status_table: str, runs_table: str, outbox_table: str) -> None:
        # the core's run statuses, as literals (one set of constants for Python and SQL)
        ids = {"running": sql.Literal(RUNNING), "awaiting": sql.Literal(AWAITING), "ctx": sql.Identifier(context_table), "st": sql.Identifier(status_table),
               "runs": sql.Identifier(runs_table), "outbox": sql.Identifier(outbox_table),
               "items": sql.Identifier(items_table_name(runs_table)),
               "ns": sql.Identifier(node_states_table_name(runs_table)),
               "ck": sql.Identifier(context_keys_table_name(runs_table)),
               "hist": sql.Identifier(history_table_name(runs_table))}
        q = lambda text: sql.SQL(text).format(**ids)  # noqa: E731
        # Statement names are per table set, so two stores may share a connection.
        tag = hashlib.sha1("|".join((context_table, status_table, runs_table,
                                     outbox_table)).encode()).hexdigest()[:12]
        names = {what: f"flowcraft_{tag}_{what}" for what in ("commit", "load", "record")}
        execute = lambda name: sql.SQL("EXECUTE {} (%s)").format(sql.Identifier(name))  # noqa: E731
        upsert = (" ON CONFLICT (run_id) DO UPDATE SET status = EXCLUDED.status, updated_at = now(),"
                  " result = EXCLUDED.result")
        # What every commit statement returns: a row per applied run ('r': its awaiting nodes and
        # outstanding count as the commit left them, where it says), a row per outbox row ('o'),
        # a row per counter reached ('c': its position in the commit's counters, from 1).
        returning = (" SELECT 'r', run_id, NULL::bigint, NULL::text, NULL::int FROM r"
                     " UNION ALL SELECT 'o', run_id, id, body, delay_ms FROM o")
        wave_returning = (" SELECT 'r', run_id, NULL::bigint, awaiting::text, outstanding FROM r"
                          " UNION ALL SELECT 'o', run_id, id, body, delay_ms FROM o"
                          " UNION ALL SELECT 'c', run_id, NULL::bigint, NULL::text, ord::int FROM rc")
        reserved = "COALESCE((SELECT sum((rc.e->>3)::int) FROM rc WHERE rc.run_id = w.run_id), 0)"
        # The wave commit ($1: a JSON array, one object per commit; see `_wave`). Only runs rows whose
        # version matches are locked, in run-id order, before anything is written; everything
        # else of a run is written only once its runs row is locked by this statement.
        # The wave commit ($1: a JSON array, one object per commit; see `_wave`). The runs rows of
        # the commits whose checks hold (a run commit: its version; a node commit: the run running
        # or awaiting, its guarded node states as loaded, its unset item fields absent; see
        # `flowcraft.ports.Commit`) are locked in run-id order before anything is written (a wave
        # with node commits runs in a transaction that locked them first, so the checks read what
        # the last writer left); everything else of a run is written only once its runs row is
        # locked by this statement.
        wave = (
            "WITH w AS MATERIALIZED (SELECT * FROM jsonb_to_recordset($1) AS w(run_id text, expected int, record jsonb,"
            "         states jsonb, items jsonb, ctx_set jsonb, ctx_del text[], status text, result jsonb, jobs jsonb,"
            "         final boolean, node boolean, guards jsonb, unset text[], counters jsonb, delta int, updated_at float8,"
            "         history jsonb))"
            ", lk AS MATERIALIZED (SELECT t.run_id FROM {runs} AS t JOIN w ON w.run_id = t.run_id"
            "         WHERE CASE WHEN w.node THEN t.record->>'status' IN ({running}, {awaiting})"
            "           AND NOT EXISTS (SELECT 1 FROM jsonb_each(w.guards) AS g LEFT JOIN {ns} AS x"
            "               ON x.run_id = w.run_id AND x.node_id = g.key WHERE x.state IS DISTINCT FROM NULLIF(g.value, 'null'::jsonb))"
            "           AND NOT EXISTS (SELECT 1 FROM {items} AS x WHERE x.run_id = w.run_id AND x.field = ANY(w.unset))"
            "         ELSE (t.record->>'version')::int = w.expected END"
            "         ORDER BY t.run_id FOR UPDATE OF t)"
            # counters: one row each, added to atomically; `rc`: those this commit made reach their threshold
            ", cn AS (INSERT INTO {items} AS t (run_id, field, value)"
            "         SELECT w.run_id, c.e->>0, to_jsonb((c.e->>1)::bigint) FROM w JOIN lk ON lk.run_id = w.run_id,"
            "         jsonb_array_elements(w.counters) AS c(e) ORDER BY w.run_id, c.e->>0"
            "         ON CONFLICT (run_id, field) DO UPDATE SET value = to_jsonb((t.value #>> '{{}}')::bigint"
            "           + (EXCLUDED.value #>> '{{}}')::bigint)"
            "         RETURNING t.run_id, t.field, (t.value #>> '{{}}')::bigint AS after)"
            ", rc AS (SELECT cn.run_id, c.e, c.ord FROM cn JOIN w ON w.run_id = cn.run_id,"
            "         jsonb_array_elements(w.counters) WITH ORDINALITY AS c(e, ord)"
            "         WHERE c.e->>0 = cn.field AND cn.after - (c.e->>1)::bigint < (c.e->>2)::bigint"
            "         AND (c.e->>2)::bigint <= cn.after)"
            ", r AS (UPDATE {runs} AS t SET record = CASE WHEN w.node THEN t.record || jsonb_build_object("
            "           'version', (t.record->>'version')::int + 1, 'updated_at', w.updated_at,"
            "           'outstanding', (t.record->>'outstanding')::int + w.delta + " + reserved + ")"
            "         ELSE w.record || jsonb_build_object('outstanding', (w.record->>'outstanding')::int + " + reserved + ") END"
            "         FROM w JOIN lk ON lk.run_id = w.run_id"
            "         WHERE t.run_id = w.run_id RETURNING t.run_id, (t.record->>'outstanding')::int AS outstanding,"
            "         t.record->'awaiting' AS awaiting)"
            # node states and context keys: only the rows this commit changes
            ", ns AS (INSERT INTO {ns} (run_id, node_id, state)"
            "         SELECT w.run_id, e.key, e.value FROM w JOIN r ON r.run_id = w.run_id, jsonb_each(w.states) AS e"
            "         ORDER BY w.run_id, e.key ON CONFLICT (run_id, node_id) DO UPDATE SET state = EXCLUDED.state)"
            ", ck AS (INSERT INTO {ck} (run_id, key, value)"
            "         SELECT w.run_id, e.key, e.value FROM w JOIN r ON r.run_id = w.run_id, jsonb_each(w.ctx_set) AS e"
            "         WHERE e.key <> ALL(w.ctx_del)"
            "         ORDER BY w.run_id, e.key ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value)"
            ", kd AS (DELETE FROM {ck} AS t USING w JOIN r ON r.run_id = w.run_id"
            "         WHERE t.run_id = w.run_id AND t.key = ANY(w.ctx_del))"
            # a run that ends: the seed's context_data gets its final context (the key rows as
            # they were before this statement, with this commit's patch applied)
            ", c AS (UPDATE {ctx} AS t SET context_data = (COALESCE((SELECT jsonb_object_agg(k.key, k.value)"
            "         FROM {ck} AS k WHERE k.run_id = w.run_id), '{{}}'::jsonb) || w.ctx_set) - w.ctx_del"
            "         FROM w JOIN r ON r.run_id = w.run_id WHERE t.run_id = w.run_id AND w.final)"
            # batch items, a row per field (never the run's whole item document per item)
            ", i AS (INSERT INTO {items} (run_id, field, value)"
            "         SELECT w.run_id, e.key, e.value FROM w JOIN r ON r.run_id = w.run_id, jsonb_each(w.items) AS e"
            "         ORDER BY w.run_id, e.key ON CONFLICT (run_id, field) DO UPDATE SET value = EXCLUDED.value)"
            ", s AS (INSERT INTO {st} (run_id, status, updated_at, result)"
            "         SELECT w.run_id, w.status, now(), w.result FROM w JOIN r ON r.run_id = w.run_id WHERE NOT w.node"
            "         ORDER BY w.run_id" + upsert + ")"
            ", su AS (UPDATE {st} AS t SET updated_at = now() FROM w JOIN r ON r.run_id = w.run_id"
            "         WHERE t.run_id = w.run_id AND w.node)"
            # the run's history: a row per commit; a run that ends keeps its newest $3 rows
            ", h AS (INSERT INTO {hist} (run_id, events) SELECT w.run_id, w.history FROM w JOIN r ON r.run_id = w.run_id"
            "         WHERE jsonb_array_length(w.history) > 0 ORDER BY w.run_id)"
            ", hc AS (DELETE FROM {hist} AS t USING w JOIN r ON r.run_id = w.run_id WHERE w.final AND t.run_id = w.run_id"
            "         AND t.seq <= (SELECT x.seq FROM {hist} AS x WHERE x.run_id = w.run_id ORDER BY x.seq DESC OFFSET $3 LIMIT 1))"
            ", o AS (INSERT INTO {outbox} (run_id, body, delay_ms)"
            "         SELECT x.run_id, x.body, x.delay_ms FROM ("
            "           SELECT w.run_id, j.e->>0 AS body, (j.e->>1)::int AS delay_ms, 0 AS grp, j.ord FROM w"
            "           JOIN r ON r.run_id = w.run_id, jsonb_array_elements(w.jobs) WITH ORDINALITY AS j(e, ord)"
            "           UNION ALL SELECT rc.run_id, rc.e->>4, 0, 1, rc.ord FROM rc WHERE rc.e->>4 IS NOT NULL) AS x"
            "         ORDER BY x.run_id, x.grp, x.ord"
            "         RETURNING id, run_id, body, delay_ms)"
            # $2: outbox rows published since the last commit (rows a publisher elsewhere holds
            # locked are skipped: it deletes them itself)
            ", d AS (DELETE FROM {outbox} WHERE id = ANY($2) AND id IN"
            "         (SELECT id FROM {outbox} WHERE id = ANY($2) FOR UPDATE SKIP LOCKED))" + wave_returning
        )
        # A node commit's wave is a transaction that locks its runs rows first (then its checks
        # read the rows as the last writer of the run left them).
        self.lock_runs = q("BEGIN; SELECT 1 FROM {runs} WHERE run_id = ANY(%s::text[]) ORDER BY run_id FOR UPDATE; ")
        # Version 0: a run started by a seed client (a context row, no runs row) being adopted.
        self.adopt = q(
            "WITH r AS (INSERT INTO {runs} (run_id, record, keyed)"
            "           SELECT run_id, %(record)s, true FROM {ctx} WHERE run_id = %(run_id)s"
            "           ON CONFLICT (run_id) DO NOTHING RETURNING run_id)"
            ", ns AS (INSERT INTO {ns} (run_id, node_id, state) SELECT r.run_id, e.key, e.value"
            "        FROM r, jsonb_each(%(states)s::jsonb) AS e ORDER BY e.key ON CONFLICT DO NOTHING)"
            ", i AS (INSERT INTO {items} (run_id, field, value) SELECT r.run_id, e.key, e.value"
            "        FROM r, jsonb_each(%(items)s::jsonb) AS e ORDER BY e.key ON CONFLICT DO NOTHING)"
            # the seed client's context_data, patched, becomes the run's key rows
            ", ck AS (INSERT INTO {ck} (run_id, key, value) SELECT c.run_id, e.key, e.value"
            "        FROM {ctx} AS c JOIN r ON r.run_id = c.run_id,"
            "        jsonb_each((c.context_data || %(ctx_set)s::jsonb) - %(ctx_del)s::text[]) AS e"
            "        ORDER BY e.key ON CONFLICT DO NOTHING)"
            ", c AS (UPDATE {ctx} SET context_data = (context_data || %(ctx_set)s::jsonb) - %(ctx_del)s::text[]"
            "        WHERE %(final)s AND run_id IN (SELECT run_id FROM r))"
            ", s AS (INSERT INTO {st} (run_id, status, updated_at, result) SELECT run_id, %(status)s, now(), %(result)s"
            "        FROM r" + upsert + ")"
            ", o AS (INSERT INTO {outbox} (run_id, body, delay_ms) SELECT r.run_id, j.e->>0, (j.e->>1)::int FROM r,"
            "        jsonb_array_elements(%(jobs)s::jsonb) WITH ORDINALITY AS j(e, ord) ORDER BY j.ord"
            "        RETURNING id, run_id, body, delay_ms)" + returning
        )
        self.create = q(
            "WITH r AS (INSERT INTO {ctx} (run_id, context_data) VALUES (%(run_id)s, %(context)s)"
            "           ON CONFLICT (run_id) DO NOTHING RETURNING run_id)"
            ", n AS (INSERT INTO {runs} (run_id, record, keyed) SELECT run_id, %(record)s, true FROM r"
            "        ON CONFLICT (run_id) DO NOTHING)"
            ", ns AS (INSERT INTO {ns} (run_id, node_id, state) SELECT r.run_id, e.key, e.value"
            "        FROM r, jsonb_each(%(states)s::jsonb) AS e ORDER BY e.key ON CONFLICT DO NOTHING)"
            ", ck AS (INSERT INTO {ck} (run_id, key, value) SELECT r.run_id, e.key, e.value"
            "        FROM r, jsonb_each(%(context)s::jsonb) AS e ORDER BY e.key ON CONFLICT DO NOTHING)"
            ", s AS (INSERT INTO {st} (run_id, status, updated_at, result) SELECT run_id, %(status)s, now(), %(result)s"
            "        FROM r" + upsert + ")"
            ", h AS (INSERT INTO {hist} (run_id, events) SELECT r.run_id, %(history)s::jsonb FROM r"
            "        WHERE jsonb_array_length(%(history)s::jsonb) > 0)"
            ", o AS (INSERT INTO {outbox} (run_id, body, delay_ms) SELECT r.run_id, j.e->>0, (j.e->>1)::int FROM r,"
            "        jsonb_array_elements(%(jobs)s::jsonb) WITH ORDINALITY AS j(e, ord) ORDER BY j.ord"
            "        RETURNING id, run_id, body, delay_ms)" + returning
        )
        pick = ("(SELECT jsonb_object_agg(k, {col} -> k) FROM unnest(%({param})s::text[]) AS k WHERE {col} ? k)")
        # One row per requested run, in the order asked ($1: a JSON array of [run id, node ids,
        # context keys], null ids or keys for all of them), so any number of runs is one statement.
        pick_json = ("CASE WHEN q.e->{i} = 'null'::jsonb THEN {col} ELSE"
                     " (SELECT jsonb_object_agg(k, {col} -> k) FROM jsonb_array_elements_text(q.e->{i}) AS k WHERE {col} ? k) END")
        # rows of a node states or context keys table: all of the run's, or those named
        pick_rows = ("(SELECT jsonb_object_agg(x.{key}, x.{value}) FROM {table} AS x WHERE x.run_id = q.e->>0"
                     " AND (q.e->{i} = 'null'::jsonb OR x.{key} IN (SELECT jsonb_array_elements_text(q.e->{i}))))")
        # a run a seed client started and no worker adopted yet has its context in context_data only
        load = (
            "SELECT c.run_id IS NOT NULL, r.record, "
            + pick_rows.format(table="{ns}", key="node_id", value="state", i=1) + ", "
            "CASE WHEN r.run_id IS NULL THEN " + pick_json.format(col="c.context_data", i=2)
            + " ELSE " + pick_rows.format(table="{ck}", key="key", value="value", i=2) + " END, "
            "s.status, extract(epoch FROM s.updated_at)::float8"
            " FROM jsonb_array_elements($1) WITH ORDINALITY AS q(e, ord)"
            " LEFT JOIN {ctx} AS c ON c.run_id = q.e->>0"
            " LEFT JOIN {runs} AS r ON r.run_id = q.e->>0"
            " LEFT JOIN {st} AS s ON s.run_id = q.e->>0"
            " ORDER BY q.ord"
        )
        # a finished run's result is stored once, in its status row, not in its record too
        record = ("SELECT CASE WHEN s.result IS NULL THEN r.record ELSE r.record || jsonb_build_object('result', s.result) END"
                  " FROM {runs} AS r LEFT JOIN {st} AS s ON s.run_id = r.run_id WHERE r.run_id = $1")
        self.prepared: Dict[str, Tuple[str, sql.Composable]] = {names["commit"]: ("jsonb, bigint[], int", q(wave)), names["load"]: ("jsonb", q(load)),
                              names["record"]: ("text", q(record))}
        self.exec_commit = sql.SQL("EXECUTE {} (%s, %s, %s)").format(sql.Identifier(names["commit"]))
        self.exec_load = execute(names["load"])
        self.exec_record = execute(names["record"])
        self.history = q("SELECT events FROM {hist} WHERE run_id = %(run_id)s ORDER BY seq")
        self.states = q("SELECT jsonb_object_agg(node_id, state) FROM {ns}"
                        " WHERE run_id = %(run_id)s AND node_id = ANY(%(nodes)s::text[])")
        self.all_states = q("SELECT jsonb_object_agg(node_id, state) FROM {ns} WHERE run_id = %(run_id)s")
        # the key rows of an adopted run, else (a seed client's run no worker took yet) context_data
        self.context = q(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM {runs} WHERE run_id = %(run_id)s)"
            " THEN (SELECT jsonb_object_agg(key, value) FROM {ck} WHERE run_id = %(run_id)s AND key = ANY(%(keys)s::text[]))"
            " ELSE (SELECT " + pick.format(col="context_data", param="keys") + " FROM {ctx} WHERE run_id = %(run_id)s) END")
        self.all_context = q(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM {runs} WHERE run_id = %(run_id)s)"
            " THEN (SELECT jsonb_object_agg(key, value) FROM {ck} WHERE run_id = %(run_id)s)"
            " ELSE (SELECT context_data FROM {ctx} WHERE run_id = %(run_id)s) END")
        # the fields asked, in order; a run made before the items table has them in its runs row
        self.items = q(
            "SELECT (SELECT jsonb_agg(COALESCE(i.value, r.items -> u.f) ORDER BY u.n)"
            "        FROM unnest(%(fields)s::text[]) WITH ORDINALITY AS u(f, n)"
            "        LEFT JOIN {items} AS i ON i.run_id = r.run_id AND i.field = u.f)"
            " FROM {runs} AS r WHERE r.run_id = %(run_id)s"
        )
        self.outbox_lock = q(
            "BEGIN; SET LOCAL synchronous_commit TO OFF;"
            " SELECT id, body, delay_ms FROM {outbox} WHERE run_id = ANY(%(run_ids)s::text[]) ORDER BY id FOR UPDATE SKIP LOCKED"
        )
        # rows older than a reconciler's threshold: left by a worker killed after it published them
        # (their delete was deferred) or, rarely, before (its redelivered job published them since)
        self.outbox_stale = q(
            "BEGIN; SET LOCAL synchronous_commit TO OFF;"
            " SELECT id, body, delay_ms FROM {outbox} WHERE created_at <= now() - make_interval(secs => %(age)s)"
            " ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
        )
        self.outbox_delete = q("DELETE FROM {outbox} WHERE id = ANY(%(ids)s::bigint[]); COMMIT")
        self.outbox_forget = q("BEGIN; SET LOCAL synchronous_commit TO OFF;"
                                  " DELETE FROM {outbox} WHERE id = ANY(%(ids)s::bigint[]); COMMIT")
        self.idle = q(
            "SELECT (SELECT count(*) FROM {st} WHERE status = {running}),"
            " array(SELECT run_id FROM {st} WHERE status = {running}"
            "       AND updated_at <= now() - make_interval(secs => %(idle)s) ORDER BY updated_at LIMIT %(limit)s)"
        )
        self.touch = q("UPDATE {st} SET updated_at = now() WHERE run_id = %(run_id)s AND status = {running}")
        # A tool's patch of one key: the adopted run's key row, and its context_data as well (so a
        # finished run's final context, and a seed client's run not adopted yet, see it too).
        self.set_key = q(
            "WITH k AS (INSERT INTO {ck} (run_id, key, value) SELECT run_id, %(key)s, %(value)s FROM {runs}"
            "           WHERE run_id = %(run_id)s ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value)"
            " UPDATE {ctx} SET context_data = context_data || jsonb_build_object(%(key)s::text, %(value)s::jsonb)"
            " WHERE run_id = %(run_id)s"
        )
        self.delete_key = q("WITH k AS (DELETE FROM {ck} WHERE run_id = %(run_id)s AND key = %(key)s)"
                            " UPDATE {ctx} SET context_data = context_data - %(key)s::text WHERE run_id = %(run_id)s")
        self.run_ids = q("SELECT run_id FROM {ctx} ORDER BY run_id")
