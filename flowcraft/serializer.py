"""JSON checks and the context serializer. Nothing here ever unpickles."""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Protocol, Tuple

from .errors import SerializationError, ValueTooLarge

_SCALARS = (str, int, float, bool, type(None))
_CONTAINERS = (list, tuple, dict)
_LEFT = object()  # on `_walk`'s stack: the walk has left the container named by id

DEFAULT_MAX_VALUE_BYTES = 16 * 1024 * 1024
"""The default bound on one value (a context key, a node output, a batch item), as JSON."""
DEFAULT_MAX_CONTEXT_BYTES = 256 * 1024 * 1024
"""The default bound on a run's whole context, as JSON."""


def check_json(value: Any, key: str, max_bytes: Optional[int] = DEFAULT_MAX_VALUE_BYTES) -> int:
    """Raise `SerializationError` naming `key` unless `value` is plain JSON data (JSON has no NaN
    or Infinity: a float that is not finite is refused too), `ValueTooLarge` if its JSON is larger
    than `max_bytes` (None: no bound). Returns its size as JSON, estimated on the walk the check
    makes anyway (close for text, which makes up large values; escapes and non-ASCII text count
    one byte per character)."""
    kind = type(value)
    if kind is str:
        size = len(value) + 2
    elif kind is int:
        size = value.bit_length() * 3 // 10 + 2
    elif kind in _SCALARS and (kind is not float or math.isfinite(value)):
        return 8
    else:
        problem, size = _walk(value, key, max_bytes)
        if problem:
            raise SerializationError(problem)
    if max_bytes is not None and size > max_bytes:
        raise ValueTooLarge(f"value of {key!r} is too large: at least {size} bytes as JSON, over the bound of "
                            f"{max_bytes} (max_value_bytes)")
    return size


def check_values(values: Mapping[Any, Any], what: str, max_bytes: Optional[int] = DEFAULT_MAX_VALUE_BYTES) -> None:
    """Refuse values given to a run from outside before anything runs or is stored (an initial
    context, a resume's output), the same way in memory and on every backend: `SerializationError`
    (or `ValueTooLarge`) "<what>: value at '<key>...' ..." unless each key is a string and each
    value passes `check_json`."""
    for key, value in values.items():
        if type(key) is not str and not isinstance(key, str):
            raise SerializationError(f"{what}: key {key!r} is a {type(key).__name__}: JSON keys are strings")
        try:
            check_json(value, key, max_bytes)
        except SerializationError as error:
            raise type(error)(f"{what}: {error}") from None


def _path(where: str, step: Any) -> str:
    return f"{where}[{step}]" if type(step) is int else f"{where}.{step}"


def _walk(value: Any, path: str, max_bytes: Optional[int]) -> Tuple[str, int]:
    """(the first problem found or "", the size as JSON so far). Plain scalars in a container are
    counted where the container is expanded; paths are formatted only for containers and for the
    problem reported.

    A circular value (a container inside itself) is refused where it refers back: the walk keeps
    the containers enclosing the item it is at (by id, with their paths), and a `_LEFT` entry on
    the stack, below a container's items, takes it off once they are walked. A sub-value shared by several keys is
    not on its own path, so it is accepted (and counted each time, as JSON writes it each time)."""
    stack: List[Tuple[Any, Any, Any]] = [(value, path, None)]
    enclosing: Dict[int, str] = {}
    isfinite = math.isfinite
    size = 0
    limit = max_bytes if max_bytes is not None else -1
    while stack:
        item, where, step = stack.pop()
        if item is _LEFT:
            del enclosing[where]  # `where` is the id of the container whose items are walked
            continue
        kind = type(item)
        if kind is list or kind is tuple or kind is dict or isinstance(item, _CONTAINERS):
            here = where if step is None else _path(where, step)
            ident = id(item)
            if ident in enclosing:
                return (f"value at {here!r} is circular: it refers back to {enclosing[ident]!r}, which holds it "
                        f"(JSON cannot hold a value inside itself)"), size
            size += 2
            if isinstance(item, dict):
                pairs: Iterable[Tuple[Any, Any]] = item.items()
                for k in item:
                    if not isinstance(k, str):
                        return f"value at {here!r} has a non-string key {k!r}: not JSON-serialisable", size
                    size += len(k) + 3
            else:
                pairs = enumerate(item)
            mark = len(stack)
            for k, v in pairs:
                t = type(v)
                if t is str:
                    size += len(v) + 3
                elif t is int:
                    size += v.bit_length() * 3 // 10 + 2
                elif v is None or t is bool or (t is float and v - v == 0.0):  # v - v is NaN for inf and NaN
                    size += 6
                else:
                    stack.append((v, here, k))
            if len(stack) > mark:  # only a container holding containers can enclose itself: the others cost nothing
                enclosing[ident] = here
                stack.insert(mark, (_LEFT, ident, None))  # below its items: popped once they are all walked
        elif isinstance(item, _SCALARS):  # a subclass of one, or a float that is not finite
            if isinstance(item, float) and not isfinite(item):
                where = where if step is None else _path(where, step)
                name = "NaN" if item != item else ("Infinity" if item > 0 else "-Infinity")  # as JSON-ish text writes them
                return f"value at {where!r} is {name}, which JSON cannot hold (no NaN or Infinity)", size
            size += len(item) + 3 if isinstance(item, str) else 6
        else:
            where = where if step is None else _path(where, step)
            return f"value at {where!r} is a {kind.__name__}, which is not JSON-serialisable", size
        if 0 <= limit < size:
            break  # too large already: the caller says so, without walking the rest
    return "", size


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
