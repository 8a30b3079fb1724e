"""`PostgresContext`: one run's context, read and patched key by key (for clients and tools): the
run's context key rows, and the seed's `flowcraft_contexts.context_data` JSONB column."""
from __future__ import annotations

from typing import Any, Dict

from .store import PostgresRunStore

_ABSENT = object()


class PostgresContext:
    """One run's context, read and patched key by key.

    `get`/`has` read one key, `to_dict` the whole context (an adopted run's key rows; a seed
    client's run no worker took yet: its `context_data`); `set`/`delete` patch one key in both. Changes made here are
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
