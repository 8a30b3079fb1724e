"""The run context: a JSON-serialisable key/value store shared by a run's nodes.

`DictContext` keeps the data in a plain dict and, when asked, records what changed (the delta),
so a distributed store can persist only the keys a node touched.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Protocol, Set, Tuple

from .serializer import DEFAULT_MAX_CONTEXT_BYTES, DEFAULT_MAX_VALUE_BYTES, ValueTooLarge, check_json


class Context(Protocol):
    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any) -> None: ...

    def has(self, key: str) -> bool: ...

    def delete(self, key: str) -> bool: ...

    def to_dict(self) -> Dict[str, Any]: ...


class DictContext:
    """A `Context` over a dict. With `track=True` it records set and deleted keys."""

    __slots__ = ("data", "_changed", "_deleted", "_tracking", "on_change", "max_value_bytes", "max_context_bytes",
                 "_sizes", "_total")

    def __init__(self, data: Optional[Dict[str, Any]] = None, *, track: bool = False,
                 max_value_bytes: Optional[int] = DEFAULT_MAX_VALUE_BYTES,
                 max_context_bytes: Optional[int] = DEFAULT_MAX_CONTEXT_BYTES) -> None:
        self.data: Dict[str, Any] = data if data is not None else {}
        self._changed: Dict[str, Any] = {}
        self._deleted: Set[str] = set()
        self._tracking = track
        self.on_change: Optional[Callable[[str, Any, bool], None]] = None
        self.max_value_bytes = max_value_bytes  # bounds on one value and on what is written here, as JSON
        self.max_context_bytes = max_context_bytes
        self._sizes: Dict[str, int] = {}  # the size of each value written here (the initial data is not counted)
        self._total = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.charge(key, check_json(value, key, self.max_value_bytes))
        self.data[key] = value
        if self._tracking:
            self._changed[key] = value
            self._deleted.discard(key)
        if self.on_change is not None:
            self.on_change(key, value, False)

    def has(self, key: str) -> bool:
        return key in self.data

    def charge(self, key: str, size: int) -> None:
        """Count `size` bytes for `key` (replacing what it held) against `max_context_bytes`;
        `ValueTooLarge` naming the key if the values written would pass the bound."""
        bound = self.max_context_bytes
        if bound is None:
            return
        total = self._total - self._sizes.get(key, 0) + size
        if total > bound:
            raise ValueTooLarge(f"setting {key!r} ({size} bytes as JSON) makes the run's context at least {total} bytes, "
                                f"over the bound of {bound} (max_context_bytes)")
        self._sizes[key] = size
        self._total = total

    def charge_output(self, outputs_key: str, node_id: str, size: int) -> None:
        """`charge` a node's output, stored under both its keys (one call: every node's path)."""
        bound = self.max_context_bytes
        if bound is None:
            return
        sizes = self._sizes
        total = self._total - sizes.get(outputs_key, 0) - sizes.get(node_id, 0) + 2 * size
        if total > bound:  # say which key passed it, as `charge` does
            self.charge(outputs_key, size)
            self.charge(node_id, size)
        sizes[outputs_key] = sizes[node_id] = size
        self._total = total

    def delete(self, key: str) -> bool:
        """Remove `key`; whether it existed (as TS's `delete`)."""
        existed = self.has(key)
        self._total -= self._sizes.pop(key, 0)
        self.data.pop(key, None)
        if self._tracking:
            self._changed.pop(key, None)
            self._deleted.add(key)
        if self.on_change is not None:
            self.on_change(key, None, True)
        return existed

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.data)

    def take_delta(self) -> Tuple[Dict[str, Any], Set[str]]:
        """The keys set and deleted since the last call, and reset the record."""
        changed, deleted = self._changed, self._deleted
        self._changed, self._deleted = {}, set()
        return changed, deleted

    # Mapping-style conveniences, for node code that prefers them.
    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"DictContext({self.data!r})"
