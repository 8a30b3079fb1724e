"""JSON checks and the context serializer. Nothing here ever unpickles."""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Protocol

from .errors import SerializationError

_SCALARS = (str, int, float, bool, type(None))


def check_json(value: Any, key: str) -> None:
    """Raise `SerializationError` naming `key` unless `value` is plain JSON data (JSON has no NaN
    or Infinity: a float that is not finite is refused too)."""
    kind = type(value)
    if kind in _SCALARS and (kind is not float or math.isfinite(value)):
        return
    problem = _find_problem(value, key)
    if problem:
        raise SerializationError(problem)


def _find_problem(value: Any, path: str) -> str:
    stack = [(value, path)]
    isfinite = math.isfinite
    while stack:
        item, where = stack.pop()
        kind = type(item)
        if kind in _SCALARS or isinstance(item, _SCALARS):
            if isinstance(item, float) and not isfinite(item):
                return f"value at {where!r} is {item!r}, which JSON cannot hold (no NaN or Infinity)"
            continue
        if isinstance(item, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
        elif isinstance(item, dict):
            for k, v in item.items():
                if not isinstance(k, str):
                    return f"value at {where!r} has a non-string key {k!r}: not JSON-serialisable"
                stack.append((v, f"{where}.{k}"))
        else:
            return f"value at {where!r} is a {kind.__name__}, which is not JSON-serialisable"
    return ""


class Serializer(Protocol):
    def dumps(self, data: Dict[str, Any]) -> str: ...

    def loads(self, text: str) -> Dict[str, Any]: ...


class JsonSerializer:
    """The default serializer: plain JSON."""

    def dumps(self, data: Dict[str, Any]) -> str:
        try:
            return json.dumps(data, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"context is not JSON-serialisable: {exc}") from None

    def loads(self, text: str) -> Dict[str, Any]:
        if isinstance(text, dict):
            return dict(text)
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SerializationError(f"serialized context is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SerializationError("serialized context must be a JSON object")
        return data
