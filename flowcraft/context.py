"""The run context: a JSON-serialisable key/value store shared by a run's nodes.

`DictContext` keeps the data in a plain dict and, when asked, records what changed (the delta),
so a distributed store can persist only the keys a node touched.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Protocol, Set, Tuple

from .serializer import check_json

_MISSING = object()


class Context(Protocol):
    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any) -> None: ...

    def has(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def to_dict(self) -> Dict[str, Any]: ...


class DictContext:
    """A `Context` over a dict. With `track=True` it records set and deleted keys."""

    __slots__ = ("data", "_changed", "_deleted", "_tracking", "on_change")

    def __init__(self, data: Optional[Dict[str, Any]] = None, *, track: bool = False) -> None:
        self.data: Dict[str, Any] = data if data is not None else {}
        self._changed: Dict[str, Any] = {}
        self._deleted: Set[str] = set()
        self._tracking = track
        self.on_change: Optional[Callable[[str, Any, bool], None]] = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        check_json(value, key)
        self.data[key] = value
        if self._tracking:
            self._changed[key] = value
            self._deleted.discard(key)
        if self.on_change is not None:
            self.on_change(key, value, False)

    def has(self, key: str) -> bool:
        return key in self.data

    def delete(self, key: str) -> None:
        self.data.pop(key, None)
        if self._tracking:
            self._changed.pop(key, None)
            self._deleted.add(key)
        if self.on_change is not None:
            self.on_change(key, None, True)

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
