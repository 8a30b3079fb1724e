"""PostgreSQL schema of the RabbitMQ adapter.

The two tables of the seed protocol, exactly as its documentation creates them::

    CREATE TABLE flowcraft_contexts (run_id TEXT PRIMARY KEY, context_data JSONB NOT NULL);
    CREATE TABLE flowcraft_statuses (run_id TEXT PRIMARY KEY, status TEXT NOT NULL,
                                     updated_at TIMESTAMPTZ DEFAULT NOW(), result JSONB);

plus two tables of the adapter's own:

* ``<runs>`` (default ``flowcraft_runs``): ``run_id TEXT PRIMARY KEY, record JSONB NOT NULL,
  states JSONB NOT NULL DEFAULT '{}', items JSONB NOT NULL DEFAULT '{}', keyed BOOLEAN NOT NULL
  DEFAULT false`` (fillfactor 70) -- the run's record (its small bookkeeping: ``version``,
  ``outstanding``, ``status``, ``awaiting``, ``errors``...); a run started by a seed client has no
  row here until a worker adopts it. ``states`` and ``items`` are what older versions kept there
  (``states`` is emptied by the migration below, ``items`` still read); ``keyed`` marks runs whose
  node states and context are in the two tables below (every run this version writes).
* ``<node_states>`` (``<runs>`` with ``runs`` replaced by ``node_states``): ``run_id TEXT, node_id
  TEXT, state JSONB NOT NULL, PRIMARY KEY (run_id, node_id)`` (fillfactor 70) -- a row per node.
* ``<context_keys>`` (likewise): ``run_id TEXT, key TEXT, value JSONB NOT NULL, PRIMARY KEY
  (run_id, key)`` (fillfactor 70) -- the context of an adopted run, a row per key. The seed's
  ``context_data`` holds the initial context (as the run's creator wrote it) and is brought up to
  date with the final context by the commit that ends the run (and by `PostgresContext` patches).
* ``<items>`` (``<runs>`` with ``runs`` replaced by ``items``, default ``flowcraft_items``):
  ``run_id TEXT, field TEXT, value JSONB NOT NULL, PRIMARY KEY (run_id, field)`` -- batch items (a
  batch's header, each item's input and result), one row per field, so an item job reads and writes
  its own item only (runs made before this table keep theirs in ``<runs>.items``, still read).
* ``<outbox>`` (default ``flowcraft_outbox``): ``id BIGSERIAL PRIMARY KEY, run_id TEXT NOT NULL,
  body TEXT NOT NULL, delay_ms INT NOT NULL DEFAULT 0, created_at TIMESTAMPTZ NOT NULL DEFAULT
  now()`` -- jobs committed with a node's completion and not yet confirmed by RabbitMQ (or confirmed
  and not yet deleted: a worker killed there leaves them, and the reconciler sweeps old rows).

For run lists the status table gains a ``created_at TIMESTAMPTZ DEFAULT now()`` column (its rows
made before it get the time of the migration) and two indexes, ``(updated_at DESC, run_id DESC)``
and ``(status, updated_at DESC, run_id DESC)``; the seed's columns are unchanged.

Migration of tables made by older versions (idempotent, under the schema lock): the columns and
tables missing are added, and runs not ``keyed`` get their ``<runs>.states`` and ``context_data``
copied into rows (``states`` then emptied, ``keyed`` set). Upgrade every worker at once: an older
worker would not see the rows.

Every identifier goes through `validate_identifier` and `psycopg2.sql.Identifier`; every value is a
query parameter.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Tuple

from flowcraft.result import RUNNING
from psycopg2 import sql

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # matched whole (`fullmatch`): `$` would take "x\n"

DEFAULT_CONTEXT_TABLE = "flowcraft_contexts"
DEFAULT_STATUS_TABLE = "flowcraft_statuses"


def validate_identifier(name: Any, what: str = "table name") -> str:
    """Return `name` if it is a plain SQL identifier (letters, digits, `_`, at most 63 chars), all
    of it: a trailing newline (or anything else) after a valid name is refused."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise ValueError(
            f"invalid {what} {name!r}: use 1-63 letters, digits or underscores, not starting with a digit "
            f"(pattern {_IDENTIFIER.pattern})"
        )
    return name


def default_table_names(context_table_name: str, runs_table_name: Optional[str] = None,
                        outbox_table_name: Optional[str] = None) -> Tuple[str, str]:
    """The runs and outbox table names: given ones, else derived from the context table's name
    (`flowcraft_contexts` -> `flowcraft_runs`, `flowcraft_outbox`; `x` -> `x_runs`, `x_outbox`)."""
    validate_identifier(context_table_name, "context table name")
    base = context_table_name[: -len("contexts")] if context_table_name.endswith("contexts") else context_table_name + "_"
    runs = runs_table_name or (base + "runs")
    outbox = outbox_table_name or (base + "outbox")
    return validate_identifier(runs, "runs table name"), validate_identifier(outbox, "outbox table name")


def _companion(runs_table_name: str, suffix: str) -> str:
    runs = validate_identifier(runs_table_name, "runs table name")
    name = runs[: -len("runs")] + suffix if runs.endswith("runs") else runs[:62 - len(suffix)] + "_" + suffix
    return validate_identifier(name, f"{suffix} table name")


def items_table_name(runs_table_name: str) -> str:
    """The batch items table that goes with a runs table (`flowcraft_runs` -> `flowcraft_items`,
    `x` -> `x_items`)."""
    return _companion(runs_table_name, "items")


def node_states_table_name(runs_table_name: str) -> str:
    """The node states table that goes with a runs table (`flowcraft_runs` -> `flowcraft_node_states`,
    `x` -> `x_node_states`)."""
    return _companion(runs_table_name, "node_states")


def history_table_name(runs_table_name: str) -> str:
    """The run history table that goes with a runs table (`flowcraft_runs` -> `flowcraft_history`,
    `x` -> `x_history`): a row per commit, its events."""
    return _companion(runs_table_name, "history")


def context_keys_table_name(runs_table_name: str) -> str:
    """The in-flight context table that goes with a runs table (`flowcraft_runs` ->
    `flowcraft_context_keys`, `x` -> `x_context_keys`)."""
    return _companion(runs_table_name, "context_keys")


def ensure_schema(conn: Any, context_table_name: str = DEFAULT_CONTEXT_TABLE,
                  status_table_name: str = DEFAULT_STATUS_TABLE, runs_table_name: Optional[str] = None,
                  outbox_table_name: Optional[str] = None) -> None:
    """Create the adapter's tables if they do not exist (idempotent; commits)."""
    context = validate_identifier(context_table_name, "context table name")
    status = validate_identifier(status_table_name, "status table name")
    runs, outbox = default_table_names(context, runs_table_name, outbox_table_name)
    index = validate_identifier((status[:49] + "_running_idx"), "index name")
    outbox_index = validate_identifier((outbox[:52] + "_run_idx"), "index name")
    list_index = validate_identifier((status[:48] + "_listed_idx"), "index name")
    list_status_index = validate_identifier((status[:48] + "_status_idx"), "index name")
    states, keys = node_states_table_name(runs), context_keys_table_name(runs)
    ident = sql.Identifier
    statements = [
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (run_id TEXT PRIMARY KEY, context_data JSONB NOT NULL)").format(ident(context)),
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (run_id TEXT PRIMARY KEY, status TEXT NOT NULL,"
                " updated_at TIMESTAMPTZ DEFAULT NOW(), result JSONB)").format(ident(status)),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (updated_at) WHERE status = {}").format(ident(index), ident(status),
                                                                                             sql.Literal(RUNNING)),
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (run_id TEXT PRIMARY KEY, record JSONB NOT NULL,"
                " states JSONB NOT NULL DEFAULT '{{}}', items JSONB NOT NULL DEFAULT '{{}}')").format(ident(runs)),
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (run_id TEXT NOT NULL, field TEXT NOT NULL, value JSONB NOT NULL,"
                " PRIMARY KEY (run_id, field))").format(ident(items_table_name(runs))),
        # node states and in-flight context keys, a row each; updated in place (HOT: no column of
        # theirs but the key is indexed, and pages keep room for the new versions)
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (run_id TEXT NOT NULL, node_id TEXT NOT NULL, state JSONB NOT NULL,"
                " PRIMARY KEY (run_id, node_id)) WITH (fillfactor = 70)").format(ident(states)),
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (run_id TEXT NOT NULL, key TEXT NOT NULL, value JSONB NOT NULL,"
                " PRIMARY KEY (run_id, key)) WITH (fillfactor = 70)").format(ident(keys)),
        # runs rows are updated by every commit (HOT: only run_id is indexed)
        sql.SQL("ALTER TABLE {} SET (fillfactor = 70)").format(ident(runs)),
        # Runs made before the two tables above (`keyed` false): their node states move out of
        # the runs row and their context into key rows, once (idempotent, under the schema lock).
        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS keyed BOOLEAN NOT NULL DEFAULT false").format(ident(runs)),
        sql.SQL("INSERT INTO {} (run_id, node_id, state) SELECT r.run_id, e.key, e.value FROM {} AS r,"
                " jsonb_each(r.states) AS e WHERE NOT r.keyed ON CONFLICT DO NOTHING").format(ident(states), ident(runs)),
        sql.SQL("INSERT INTO {} (run_id, key, value) SELECT r.run_id, e.key, e.value FROM {} AS r JOIN {} AS c"
                " ON c.run_id = r.run_id, jsonb_each(c.context_data) AS e WHERE NOT r.keyed ON CONFLICT DO NOTHING"
                ).format(ident(keys), ident(runs), ident(context)),
        sql.SQL("UPDATE {} SET keyed = true, states = '{{}}' WHERE NOT keyed").format(ident(runs)),
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (id BIGSERIAL PRIMARY KEY, run_id TEXT NOT NULL, body TEXT NOT NULL,"
                " delay_ms INT NOT NULL DEFAULT 0, created_at TIMESTAMPTZ NOT NULL DEFAULT now())").format(ident(outbox)),
        # outbox tables made before created_at existed
        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ NOT NULL DEFAULT now()").format(ident(outbox)),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (run_id)").format(ident(outbox_index), ident(outbox)),
        # the runs' histories: appended by the commits, read per run in commit order
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (run_id TEXT NOT NULL, seq BIGSERIAL, events JSONB NOT NULL,"
                " PRIMARY KEY (run_id, seq))").format(ident(history_table_name(runs))),
        # run lists (SPEC 11, `list_runs`): newest first, over all runs or one status
        sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ DEFAULT now()").format(ident(status)),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (updated_at DESC, run_id DESC)").format(ident(list_index), ident(status)),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (status, updated_at DESC, run_id DESC)").format(
            ident(list_status_index), ident(status)),
    ]
    autocommit = conn.autocommit
    if not autocommit:
        conn.rollback()
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            # Concurrent first starts of several workers must not race on CREATE ... IF NOT EXISTS.
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"flowcraft-schema:{context}",))
            for statement in statements:
                cur.execute(statement)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = autocommit
