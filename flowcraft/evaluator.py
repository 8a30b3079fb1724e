"""A safe evaluator for the expressions carried by blueprint edges (conditions and transforms).

Blueprints may come from untrusted sources, so their expressions are never handed to `eval` or
`exec` and no code object is ever executed. `SafeEvaluator.compile` parses a source string with
`ast.parse(..., mode="eval")`, checks every node against a strict whitelist, and turns the tree
into nested Python closures once; the returned callable takes a mapping of names and runs in a
few microseconds without walking the tree again.

Evaluator protocol
------------------
The runtime accepts *any* object with a method ``compile(source: str) -> callable`` whose result,
called with a mapping of names (``fn(names)``), returns the expression's value. ``compile``
should raise `ExpressionError` for sources it refuses, and the callable should raise
`ExpressionError` when evaluation fails. `SafeEvaluator` is the default implementation and
`Evaluator` is the matching `typing.Protocol`. An object with only ``evaluate(expression,
context) -> value`` (the Flowcraft TS ``IEvaluator`` shape; ``context`` is the names mapping) is
accepted too: `as_evaluator` wraps it in an `EvaluateAdapter`.

Missing names and unorderable comparisons
-----------------------------------------
A read that finds nothing (a name, a key, an index) is ``None`` and an ordering comparison of
values that cannot be ordered (``None``, a number with a string) is ``False``. When the names
mapping is a `WatchedNames`, it is told of each such `ExpressionProblem` first, and may raise:
that is how the runtime's ``strict_expressions`` fails them and its lenient mode warns. Only the
miss path pays for this: a read that finds its key costs one identity test more.

Language
--------
* Literals: ints, floats, strings, ``True``/``False``/``None``, lists, tuples, dicts. JavaScript
  spellings are accepted too: ``===``/``!==`` (same as ``==``/``!=``), ``&&``, ``||``, prefix
  ``!`` and ``true``/``false``/``null``/``undefined``. ``!`` binds like JavaScript's (tighter
  than comparisons: ``!a == b`` is ``(not a) == b``); Python's ``not`` keeps Python's precedence.
  String literals are never rewritten.
* Names resolve in the mapping given to the compiled callable; a missing name is ``None``.
  An attribute chain ``a.b.c`` whose head ``a`` is not a key tries the dotted keys ``"a.b.c"``,
  then ``"a.b"`` (followed by ``.c``), and is ``None`` when none exists.
* ``x.y`` reads ``x.get(y)`` of a mapping; ``.length`` of a list, tuple or string is its length;
  anything else is ``None``. Attributes of other objects are never read.
* ``x[k]`` reads ``x.get(k)`` of a mapping, the item (or ``None`` when out of range) of a list,
  tuple or string with an int index; slices of lists, tuples and strings are allowed; anything
  else is ``None``.
* Comparisons (``== != < <= > >= in not in is is not``, chained as in Python); an ordering
  comparison with ``None`` or between incomparable values is ``False`` rather than an error;
  ``in`` against a value that does not support it (``None``, a number) is ``False``.
* ``and``/``or``/``not`` (returning operands, as in Python and JavaScript), unary ``-``/``+``,
  ``+ - * / // % **``, ``x if cond else y``.
* Calls only to whitelisted functions by bare name (default: ``len str int float bool abs min
  max round``; see `SafeEvaluator`'s ``functions``). No method calls, lambdas, comprehensions,
  f-strings, ``:=``, ``*``/``**`` unpacking, sets, bitwise operators or string ``%`` formatting.
  Names, attributes and literal subscript keys starting with ``__`` are refused.

Cost is bounded: sources longer than ``max_length`` and trees deeper than ``max_depth`` are refused
when compiled, and compiling is linear in the source's length; at run time ``**``, ``*``, ``+``
and ``round`` refuse results that would be huge. Every failure raises `ExpressionError` naming
the expression (and, for a limit, the name of the limit).

Sizes are also bounded *logically*. Repetition shares items, so ``[[0]*100000]*100000`` is small
in memory but holds 10^10 items, and comparing, hashing or printing it would run in C, holding the
GIL, for hours. The logical size of a value counts every item of every list, tuple and dict (keys
and values), nested, once per reference (a string counts one item plus one per
``STR_CHARS_PER_ITEM`` characters). It is measured before the work, in one pass per distinct
object (memoised by id()), stopping as soon as it exceeds the limit; numbers and strings are never
walked, so ordinary conditions pay a class check only. The limits are module constants:

* ``MAX_VISIT_ITEMS`` (10,000,000): the most items one operation may walk: ``==``/``!=``/ordering
  (refused when *both* sides exceed it: a comparison stops at the end of the smaller), ``in``,
  hashing a tuple (dict lookups and literals), ``min``/``max``; also the largest logical size
  ``*`` may build and an expression's value may have (the runtime stores a transform's value).
  A context value of a million numbers compares fine.
* ``MAX_STR_CHARS`` (20,000,000): the longest text ``str()`` may make of a list, tuple or dict
  (estimated from the items before converting).
* ``MAX_INT_DIGITS`` (5,000): the longest string ``int()`` converts.
* ``MAX_FOLDED_CHARS`` (256): constant sub-expressions (``2*60``, ``('a', 'b')``) are computed
  once when compiled only when the text form of the value is at most this long; larger ones are
  computed at each evaluation, so a compiled expression never keeps a large value.

Functions added with ``functions=`` are trusted code: they must bound their own cost.
"""
from __future__ import annotations

import ast
import operator
import threading
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple, runtime_checkable

from .errors import ExpressionError

__all__ = [
    "DEFAULT_FUNCTIONS",
    "Evaluator",
    "ExpressionProblem",
    "SafeEvaluator",
    "WatchedNames",
    "as_evaluator",
    "default_evaluator",
    "top_level_names",
]

Names = Mapping[str, Any]
CompiledExpression = Callable[[Names], Any]

# Run-time limits.
MAX_EXPONENT = 10_000  # largest int exponent of an int base
MAX_INT_BITS = 100_000  # largest int produced by ** or *
MAX_REPEAT_ITEMS = 100_000  # largest str/list/tuple produced by *
MAX_CONCAT_ITEMS = 1_000_000  # largest str/list/tuple produced by +
MAX_ROUND_DIGITS = 10_000  # largest |ndigits| accepted by round()
# Work on values. Lists built by repetition share their items, so a value can be small in memory
# but huge *logically* (`[[0]*100000]*100000` holds 10^10 items), and comparing, hashing or
# printing it runs in C, holding the GIL, for as long as that logical size takes. Sizes below
# are logical: every item of every list, tuple and dict (keys and values), nested, counted once
# per reference; a string counts as one item plus one per STR_CHARS_PER_ITEM characters.
MAX_VISIT_ITEMS = 10_000_000  # most items a comparison, 'in', hashing, min()/max() may walk,
#                               and the largest logical size '*' may build
MAX_STR_CHARS = 20_000_000  # longest text (estimated) str() may make of a list, tuple or dict
MAX_INT_DIGITS = 5_000  # longest string int() converts (decimal conversion is quadratic)
MAX_FOLDED_CHARS = 256  # a constant sub-expression is folded (and kept) only when its text
#                         form is at most this long; larger ones are computed when evaluated
STR_CHARS_PER_ITEM = 64
CACHE_SIZE = 1024

_JS_CONSTANTS = {"true": True, "false": False, "null": None, "undefined": None}
_SEQUENCES = (list, tuple, str)
_CONTAINERS = (list, tuple, dict)  # the values whose operations walk nested items
_CONTAINER_CLASSES = frozenset(_CONTAINERS)
# Exact classes that are never containers: the hot-path test before any size is measured.
_SCALAR_CLASSES = frozenset({int, float, str, bool, type(None)})
_NUMBER_CLASSES = frozenset({int, float, bool, type(None)})
_INT_CLASSES = frozenset({int, bool})
_MISSING = object()


@runtime_checkable
class Evaluator(Protocol):
    """What the runtime needs of an evaluator: ``compile(source)`` returning ``fn(names)``."""

    def compile(self, source: str) -> CompiledExpression:  # pragma: no cover - protocol
        ...


class _Refused(Exception):
    """A run-time limit was hit; turned into `ExpressionError` by the compiled callable."""


# --------------------------------------------------------------------------------------------
# Logical sizes (what an operation on a value would walk)
# --------------------------------------------------------------------------------------------
def _logical_size(value: Any, limit: int, text: bool = False) -> int:
    """The logical size of `value`, or some number above `limit` as soon as it exceeds `limit`.

    Containers are memoised by id(), so a DAG of shared lists costs one pass per distinct object
    (a value cannot change while one operation measures it). With ``text`` the measure is an
    estimate of the length of ``str(value)`` instead. Scalars are never walked: a string's size
    comes from its length, a number's from its class (or its bit length, for text).
    """
    if not isinstance(value, _CONTAINERS):
        return _leaf_size(value, text)
    try:
        return _walk(value, limit, text, {})
    except RecursionError:  # Python could not compare or print it either
        raise _Refused("a value is nested too deeply to be measured") from None


def _leaf_size(value: Any, text: bool) -> int:
    cls = value.__class__
    if cls is str:
        if not text:
            return 1 + len(value) // STR_CHARS_PER_ITEM
        # repr() escapes unprintable characters, up to 10 characters each ('\U000e0001').
        return len(value) * (1 if value.isprintable() else 10) + 2
    if not text:
        return 1
    if cls is bool:
        return 5
    if isinstance(value, int):
        return 2 + value.bit_length() * 30103 // 100_000  # the sign and digits
    return 24  # a float's repr is at most 24 characters; other objects: a guess


def _walk(value: Any, limit: int, text: bool, memo: Dict[int, int]) -> int:
    # One frame per level of nesting, so as deep a value as Python itself can compare.
    key = id(value)
    known = memo.get(key)
    if known is not None:
        return limit + 1 if known < 0 else known  # < 0: the value contains itself
    memo[key] = -1
    n = len(value)
    if isinstance(value, dict):
        parts: Tuple[Any, ...] = (value.keys(), value.values())
        n *= 2
    else:
        parts = (value,)
    total = 2 + 2 * n if text else 1  # brackets and separators
    if total + n > limit:  # every item counts at least one
        return total + n
    for part in parts:
        flat = _flat_size(part, text) if len(part) > 8 else None
        if flat is not None:
            total += flat
        else:
            for item in part:
                if item.__class__ in _SCALAR_CLASSES or not isinstance(item, _CONTAINERS):
                    total += _leaf_size(item, text)
                else:
                    total += _walk(item, limit - total, text, memo)
                if total > limit:
                    return total
        if total > limit:
            return total
    memo[key] = total
    return total


def _flat_size(items: Any, text: bool) -> Optional[int]:
    """The summed sizes of `items` when they are all numbers or all strings (measured at C speed),
    else None."""
    kinds = set(map(type, items))
    if kinds <= _NUMBER_CLASSES:
        if not text:
            return len(items)
        if kinds <= _INT_CLASSES:
            bits = sum(map(int.bit_length, items))
            return (5 if bool in kinds else 2) * len(items) + bits * 30103 // 100_000
        return 24 * len(items)
    if len(kinds) == 1 and str in kinds:
        chars = sum(map(len, items))
        if not text:
            return len(items) + chars // STR_CHARS_PER_ITEM
        return 2 * len(items) + chars * (1 if all(map(str.isprintable, items)) else 10)
    return None


def _check_compare(what: str, a: Any, b: Any, equality: bool) -> None:
    """Refuse comparing two containers when both exceed MAX_VISIT_ITEMS.

    Comparing walks both values in step and stops at the end of the smaller, so its cost is
    bounded by the smaller logical size; one small side makes any comparison cheap.
    """
    if a is b or not (isinstance(a, _CONTAINERS) and isinstance(b, _CONTAINERS)):
        return  # an object equals itself item by item: Python compares identity first
    ca, cb = a.__class__, b.__class__
    if ca is not cb and ca in _CONTAINER_CLASSES and cb in _CONTAINER_CLASSES:
        return  # a list and a tuple (or a dict) are unequal and unordered at once
    if equality and ca is cb and len(a) != len(b):
        return  # '==' of lengths that differ returns at once
    if _small(a) >= 0 or _small(b) >= 0:
        return  # one side has a few items: a few comparisons
    limit = MAX_VISIT_ITEMS
    if _logical_size(a, limit) > limit and _logical_size(b, limit) > limit:
        raise _Refused(
            f"{what} of two values each larger than {limit} items (counted through nested "
            f"lists) is refused (limit MAX_VISIT_ITEMS)"
        )


SMALL_ITEMS = 64  # a container of at most this many items, nested, is never measured


def _small(value: Any, budget: int = SMALL_ITEMS) -> int:
    """What is left of `budget` after counting the items of a container, nested; negative as soon
    as it is exhausted. The common case (a few items) tested without measuring: no memo, so a
    shared item counts once per reference, which can only overcount."""
    if value.__class__ is dict or isinstance(value, dict):
        budget -= 2 * len(value)
        if budget < 0:
            return budget
        for item in value.values():
            if item.__class__ not in _SCALAR_CLASSES and isinstance(item, _CONTAINERS):
                budget = _small(item, budget)
                if budget < 0:
                    return budget
        for item in value:
            if item.__class__ is not str and isinstance(item, tuple):  # the hashable container
                budget = _small(item, budget)
                if budget < 0:
                    return budget
        return budget
    budget -= len(value)
    if budget < 0:
        return budget
    for item in value:
        if item.__class__ not in _SCALAR_CLASSES and isinstance(item, _CONTAINERS):
            budget = _small(item, budget)
            if budget < 0:
                return budget
    return budget


def _check_hash(what: str, key: Any) -> None:
    """Hashing a tuple walks it (tuples do not cache their hash)."""
    limit = MAX_VISIT_ITEMS
    if _logical_size(key, limit) > limit:
        raise _Refused(
            f"{what} with a key larger than {limit} items is refused (limit MAX_VISIT_ITEMS)"
        )


def _check_walked(what: str, values: Tuple[Any, ...]) -> None:
    """Refuse a function that walks its arguments when they hold more than MAX_VISIT_ITEMS."""
    for value in values:
        if value.__class__ not in _SCALAR_CLASSES:
            break
    else:
        return  # the common case: numbers and strings
    limit = MAX_VISIT_ITEMS
    total = 0
    for value in values:
        if value.__class__ not in _SCALAR_CLASSES and isinstance(value, _CONTAINERS):
            total += _logical_size(value, limit - total)
            if total > limit:
                raise _Refused(
                    f"{what} of values larger than {limit} items (counted through nested "
                    f"lists) is refused (limit MAX_VISIT_ITEMS)"
                )


# --------------------------------------------------------------------------------------------
# Whitelisted functions
# --------------------------------------------------------------------------------------------
def _safe_min(*args: Any, **kwargs: Any) -> Any:
    if kwargs and set(kwargs) - {"default"}:
        raise _Refused("min() accepts only the keyword argument 'default'")
    _check_walked("min()", args)  # it compares the items: at most their logical size
    return min(*args, **kwargs)


def _safe_max(*args: Any, **kwargs: Any) -> Any:
    if kwargs and set(kwargs) - {"default"}:
        raise _Refused("max() accepts only the keyword argument 'default'")
    _check_walked("max()", args)
    return max(*args, **kwargs)


def _safe_round(number: Any, ndigits: Any = None) -> Any:
    if isinstance(ndigits, int) and abs(ndigits) > MAX_ROUND_DIGITS:
        raise _Refused(f"round() ndigits is limited to {MAX_ROUND_DIGITS} in absolute value")
    return round(number) if ndigits is None else round(number, ndigits)


def _safe_str(*args: Any, **kwargs: Any) -> str:
    value = args[0] if args else kwargs.get("object", "")
    cls = value.__class__
    if cls is int or (cls not in _SCALAR_CLASSES and isinstance(value, int)):
        if value.bit_length() > MAX_INT_BITS:
            raise _Refused("str() of an integer this large is refused")
    elif cls not in _SCALAR_CLASSES:
        if isinstance(value, _CONTAINERS):
            size = _logical_size(value, MAX_STR_CHARS, text=True)
            if size > MAX_STR_CHARS:
                raise _Refused(
                    f"str() would produce more than {MAX_STR_CHARS} characters "
                    f"(limit MAX_STR_CHARS)"
                )
    return str(*args, **kwargs)


def _safe_int(*args: Any, **kwargs: Any) -> int:
    value = args[0] if args else None
    if isinstance(value, (str, bytes)) and len(value) > MAX_INT_DIGITS:
        raise _Refused(
            f"int() of a string longer than {MAX_INT_DIGITS} characters is refused "
            f"(limit MAX_INT_DIGITS)"
        )
    return int(*args, **kwargs)


_safe_min.__name__, _safe_max.__name__, _safe_round.__name__, _safe_str.__name__ = (
    "min", "max", "round", "str",
)
_safe_int.__name__ = "int"

#: The default whitelist of callable functions, by the bare name used in expressions.
DEFAULT_FUNCTIONS: Mapping[str, Callable[..., Any]] = {
    "len": len,
    "str": _safe_str,
    "int": _safe_int,
    "float": float,
    "bool": bool,
    "abs": abs,
    "min": _safe_min,
    "max": _safe_max,
    "round": _safe_round,
}


# --------------------------------------------------------------------------------------------
# Run-time helpers (the closures call these; keep them small)
# --------------------------------------------------------------------------------------------
def _read_attr(value: Any, name: str) -> Any:
    """`x.y`: a mapping's key, or the `.length` of a list, tuple or string; `_MISSING` when there
    is no such key (attributes of other objects are never read)."""
    if value.__class__ is dict or isinstance(value, Mapping):
        return value.get(name, _MISSING)
    if name == "length" and isinstance(value, _SEQUENCES):
        return len(value)
    return _MISSING


def _read_item(value: Any, key: Any) -> Any:
    """`x[k]`: a mapping's key, an item or slice of a list, tuple or string; `_MISSING` when there is
    no such key or index; None for a key of the wrong kind."""
    if value.__class__ is dict or isinstance(value, Mapping):
        if isinstance(key, tuple):
            _check_hash("a lookup", key)
        try:
            return value.get(key, _MISSING)
        except TypeError:  # unhashable key
            return None
    if isinstance(value, _SEQUENCES):
        if isinstance(key, int):
            try:
                return value[key]
            except IndexError:
                return _MISSING
        if isinstance(key, slice):
            return value[key]
        return None
    return _MISSING


# --------------------------------------------------------------------------------------------
# Reads that find nothing, comparisons that cannot order: reported to the names' watcher
# --------------------------------------------------------------------------------------------
UNKNOWN_NAME = "unknown-name"
UNORDERABLE = "unorderable"
MAX_LISTED_KEYS = 20


class ExpressionProblem:
    """A read of a name or key that does not exist (`kind` UNKNOWN_NAME), or an ordering comparison
    of values that cannot be ordered (UNORDERABLE). Expressions read such a name as None and such a
    comparison as False; a names mapping that is a `WatchedNames` is told of each one first (the runtime's strict mode raises from it, its lenient mode logs a warning).
    Only the miss path builds one, and `message()` describes it lazily (it may list keys)."""

    __slots__ = ("kind", "_path", "_parent", "container", "operands")

    def __init__(self, kind: str, path: Any, parent: Any = None, container: Any = None,
                 operands: Tuple[Any, ...] = ()) -> None:
        self.kind = kind
        self._path = path  # a string, or a callable making one (labels are built only when shown)
        self._parent = parent
        self.container = container
        self.operands = operands

    @property
    def path(self) -> str:
        """What was read (`result.output.totl`), or the operator of a comparison."""
        return self._path() if callable(self._path) else self._path

    @property
    def parent(self) -> Optional[str]:
        """What the missing key was read from (`result.output`); None for a top-level name."""
        return self._parent() if callable(self._parent) else self._parent

    def message(self) -> str:
        if self.kind == UNORDERABLE:
            a, b = self.operands
            return (f"{self.path!r} compares {_short(a)} ({type(a).__name__}) with {_short(b)} "
                    f"({type(b).__name__}): values of these types cannot be ordered")
        parent = self.parent
        if parent is None:
            return f"name {self.path!r} does not exist (names: {_list_keys(self.container, top=True)})"
        return f"{self.path!r} does not exist ({parent} {_describe(self.container)})"

    def __repr__(self) -> str:
        return f"ExpressionProblem({self.message()!r})"


def _short(value: Any) -> str:
    text = repr(value) if value.__class__ in _SCALAR_CLASSES else f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _list_keys(mapping: Any, top: bool = False) -> str:
    try:
        keys = [k for k in mapping if isinstance(k, str) and not (top and k.startswith("_"))]
    except Exception:  # a mapping that cannot list its keys: say so rather than fail
        return "unknown"
    if not keys:
        return "none"
    keys.sort()
    listed = ", ".join(keys[:MAX_LISTED_KEYS])
    return listed if len(keys) <= MAX_LISTED_KEYS else f"{listed}, ... ({len(keys) - MAX_LISTED_KEYS} more)"


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"has keys: {_list_keys(value)}"
    if isinstance(value, (list, tuple)):
        return f"is a {type(value).__name__} of {len(value)} items"
    if value is None:
        return "is None"
    return f"is a {type(value).__name__}"


class WatchedNames:
    """A mixin for the names mapping given to a compiled expression: `expression_problem` is called
    with each `ExpressionProblem` before the read is None (or the comparison False); it may raise
    (`ExpressionError`) to make the problem an error. Plain mappings are not watched."""

    __slots__ = ()

    def expression_problem(self, problem: ExpressionProblem) -> None:  # pragma: no cover - overridden
        """Deliberately nothing here: a subclass (the graph's `_Watch`) logs or raises."""


def _miss(names: Any, path: Any, parent: Any, container: Any) -> None:
    """A read found nothing: tell the names' watcher, if any; the read is None."""
    if isinstance(names, WatchedNames):
        names.expression_problem(ExpressionProblem(UNKNOWN_NAME, path, parent, container))
    return None


def _unorderable(names: Any, symbol: str, a: Any, b: Any) -> bool:
    """An ordering comparison of values that cannot be ordered: tell the watcher; it is False."""
    if isinstance(names, WatchedNames):
        names.expression_problem(ExpressionProblem(UNORDERABLE, symbol, operands=(a, b)))
    return False


class _Unorderable(Exception):
    """Raised by the ordering operators of a comparison chain; the chain reports it (it has the names)."""

    def __init__(self, symbol: str, a: Any, b: Any) -> None:
        super().__init__(symbol)
        self.symbol, self.a, self.b = symbol, a, b


def _ordering(op: Callable[[Any, Any], Any], symbol: str) -> Callable[[Any, Any], Any]:
    what = f"{symbol!r}"

    def compare(a: Any, b: Any) -> Any:
        if a is None or b is None:
            raise _Unorderable(symbol, a, b)  # the closure that called it reports it and is False
        if a.__class__ not in _SCALAR_CLASSES and b.__class__ not in _SCALAR_CLASSES:
            _check_compare(what, a, b, False)
        try:
            return op(a, b)
        except TypeError:
            raise _Unorderable(symbol, a, b) from None

    compare.__name__ = op.__name__
    return compare


def _eq(a: Any, b: Any) -> Any:
    if a.__class__ not in _SCALAR_CLASSES and b.__class__ not in _SCALAR_CLASSES:
        _check_compare("'=='", a, b, True)
    return a == b


def _ne(a: Any, b: Any) -> Any:
    if a.__class__ not in _SCALAR_CLASSES and b.__class__ not in _SCALAR_CLASSES:
        _check_compare("'!='", a, b, True)
    return a != b


def _contains(a: Any, b: Any) -> bool:
    if b is None:
        return False
    if a.__class__ not in _SCALAR_CLASSES:
        _check_contains(a, b)
    try:
        return a in b
    except TypeError:
        return False


def _check_contains(a: Any, b: Any) -> None:
    """`a in b` compares a with each item of a list or tuple (each costs at most the smaller of
    the two), and hashes a for anything else. A scalar `a` compares with any item at once."""
    if isinstance(b, (list, tuple)):
        if not isinstance(a, _CONTAINERS) or not b:
            return
        limit = MAX_VISIT_ITEMS
        share = limit // len(b)
        if _logical_size(a, share) > share and _logical_size(b, limit) > limit:
            raise _Refused(
                f"'in' would compare more than {limit} items (counted through nested lists) "
                f"(limit MAX_VISIT_ITEMS)"
            )
    elif isinstance(a, tuple) and not isinstance(b, str):
        _check_hash("'in'", a)


def _not_contains(a: Any, b: Any) -> bool:
    return not _contains(a, b)


def _check_size(kind: str, size: int, limit: int) -> None:
    if size > limit:
        raise _Refused(f"{kind} would produce {size} items (limit {limit})")


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
        _check_size("'+'", len(a) + len(b), MAX_CONCAT_ITEMS)
    return a + b


def _mul(a: Any, b: Any) -> Any:
    if isinstance(a, int):
        if isinstance(b, int):
            if a.bit_length() + b.bit_length() > MAX_INT_BITS:
                raise _Refused(f"'*' would produce an integer larger than {MAX_INT_BITS} bits")
        elif isinstance(b, _SEQUENCES):
            _check_size("'*'", len(b) * a, MAX_REPEAT_ITEMS)
            if b.__class__ is not str:
                _check_repeat(b, a)
    elif isinstance(a, _SEQUENCES) and isinstance(b, int):
        _check_size("'*'", len(a) * b, MAX_REPEAT_ITEMS)
        if a.__class__ is not str:
            _check_repeat(a, b)
    return a * b


def _check_repeat(items: Any, times: int) -> None:
    """Refuse a repetition whose result would be logically larger than MAX_VISIT_ITEMS.

    The result shares the items of `items`, so it is cheap to build, but everything that later
    walks it (comparing, printing) would visit each shared item once per reference.
    """
    if times <= 1 or not items:
        return
    limit = MAX_VISIT_ITEMS
    share = limit // times
    size = _logical_size(items, share + 1)
    if (size - 1) * times + 1 > limit:
        raise _Refused(
            f"'*' would build a value of more than {limit} items counted through nested lists "
            f"(limit MAX_VISIT_ITEMS)"
        )


def _pow(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and b > 0:
        if b > MAX_EXPONENT:
            raise _Refused(f"exponent {b} is larger than {MAX_EXPONENT}")
        if abs(a).bit_length() * b > MAX_INT_BITS:
            raise _Refused(f"'**' would produce an integer larger than {MAX_INT_BITS} bits")
    return a ** b


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, (str, bytes)):
        raise _Refused("string formatting with '%' is not allowed")
    return a % b


def _logical_not(a: Any) -> bool:
    return not a


_BINOPS: Dict[type, Tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Add: ("+", _add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", _mul),
    ast.Div: ("/", operator.truediv),
    ast.FloorDiv: ("//", operator.floordiv),
    ast.Mod: ("%", _mod),
    ast.Pow: ("**", _pow),
}
_FORBIDDEN_BINOPS = {
    ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<", ast.RShift: ">>",
    ast.MatMult: "@",
}
_UNARYOPS: Dict[type, Callable[[Any], Any]] = {
    ast.Not: _logical_not,
    ast.Invert: _logical_not,  # the JavaScript '!' is rewritten to '~' (see _translate)
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_ORDERING = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
_ORDERING_SYMBOLS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_COMPARE: Dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: _eq,
    ast.NotEq: _ne,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
    ast.In: _contains,
    ast.NotIn: _not_contains,
    **{kind: _ordering(op, _ORDERING_SYMBOLS[kind]) for kind, op in _ORDERING.items()},
}
# Comparing with a constant costs at most the constant's size, which folding keeps small
# (MAX_FOLDED_CHARS), so those comparisons skip the size checks.
_UNCHECKED: Dict[Callable[[Any, Any], Any], Callable[[Any, Any], Any]] = {_eq: operator.eq, _ne: operator.ne}
_FORBIDDEN_NODES = {
    "Lambda": "lambda",
    "ListComp": "list comprehension",
    "SetComp": "set comprehension",
    "DictComp": "dict comprehension",
    "GeneratorExp": "generator expression",
    "JoinedStr": "f-string",
    "FormattedValue": "f-string",
    "NamedExpr": "assignment expression ':='",
    "Starred": "unpacking with '*'",
    "Set": "set literal",
    "Await": "await",
    "Yield": "yield",
    "YieldFrom": "yield",
}


# --------------------------------------------------------------------------------------------
# Source translation (JavaScript spellings)
# --------------------------------------------------------------------------------------------
def _translate(source: str) -> str:
    """Rewrite JavaScript operators outside string literals.

    ``===``/``!==`` become ``==``/``!=``, ``&&``/``||`` become ``and``/``or``, and a prefix
    ``!`` becomes ``~``, which the compiler reads as a logical *not* with JavaScript's binding
    (a user-written ``~`` is refused here, so the two cannot be confused). Newlines outside
    strings become spaces and comments are dropped, so expressions may span lines.
    """
    out: List[str] = []
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "'" or c == '"':
            quote = c * 3 if source.startswith(c * 3, i) else c
            j = i + len(quote)
            while j < n:
                if source[j] == "\\":
                    j += 2
                elif source.startswith(quote, j):
                    j += len(quote)
                    break
                elif len(quote) == 1 and source[j] == "\n":
                    break  # unterminated: the parser reports it
                else:
                    j += 1
            out.append(source[i:j])
            i = j
            continue
        if c == "=" and source.startswith("===", i):
            out.append("==")
            i += 3
        elif c == "!":
            if source.startswith("!==", i):
                out.append("!=")
                i += 3
            elif source.startswith("!=", i):
                out.append("!=")
                i += 2
            else:
                out.append(" ~")
                i += 1
        elif c == "~":
            raise ExpressionError(f"operator '~' is not allowed in expression {source!r}")
        elif c == "&" and source.startswith("&&", i):
            out.append(" and ")
            i += 2
        elif c == "|" and source.startswith("||", i):
            out.append(" or ")
            i += 2
        elif c == "#":
            end = source.find("\n", i)
            out.append(" ")
            i = n if end < 0 else end
        elif c == "\\" and source.startswith("\n", i + 1):
            out.append(" ")
            i += 2
        elif c in "\r\n":
            out.append(" ")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out).strip()


# --------------------------------------------------------------------------------------------
# Compiler: validated AST -> closures
# --------------------------------------------------------------------------------------------
class _Node:
    """A compiled sub-expression: its closure, and its value when known at compile time."""

    __slots__ = ("fn", "const", "value")

    def __init__(self, fn: CompiledExpression, const: bool = False, value: Any = None) -> None:
        self.fn = fn
        self.const = const
        self.value = value


def _constant(value: Any) -> _Node:
    return _Node(lambda names: value, True, value)


_FOLDABLE = (int, float, str, bool, type(None), tuple)


def _fold(node: _Node, children: List[_Node]) -> _Node:
    """Replace `node` by its value when every child is a constant and evaluation succeeds.

    Only small values are folded (MAX_FOLDED_CHARS): a large one would be kept by the compiled
    expression for as long as it is cached, and would make the next fold up the tree walk it
    again (`((0,)*100000,)*100000` was quadratic). Since constants are small, each fold costs
    a bounded amount and compiling stays linear in the source's length.
    """
    if not all(child.const for child in children):
        return node
    try:
        value = node.fn({})
    except Exception:  # let the error happen at run time, where it is reported
        return node
    if isinstance(value, _FOLDABLE) and _small_frozen(value):
        return _constant(value)
    return node


def _small_frozen(value: Any) -> bool:
    if isinstance(value, (str, tuple)) and len(value) > MAX_FOLDED_CHARS // 2:
        return False  # cheap first: a tuple's text has at least two characters per item
    if _logical_size(value, MAX_FOLDED_CHARS, text=True) > MAX_FOLDED_CHARS:
        return False
    return not isinstance(value, tuple) or _frozen(value)


def _repeats_past_folding(a: Any, b: Any) -> bool:
    """True when `a * b` repeats a sequence past what folding keeps (so it is not built)."""
    if isinstance(a, int) and isinstance(b, _SEQUENCES):
        a, b = b, a
    return isinstance(a, _SEQUENCES) and isinstance(b, int) and len(a) * b > MAX_FOLDED_CHARS


def _frozen(value: tuple) -> bool:
    # Only called on tuples already measured as small, so the recursion is short.
    return all(isinstance(v, _FOLDABLE) and (not isinstance(v, tuple) or _frozen(v)) for v in value)


def _label(node: ast.AST, attrs: Tuple[str, ...] = ()) -> Callable[[], str]:
    """A label for a sub-expression (`x[0].y`), made only when a problem is shown."""

    def label() -> str:
        text = ast.unparse(node)
        return ".".join((text, *attrs)) if attrs else text

    return label


class _Compiler:
    def __init__(self, source: str, functions: Mapping[str, Callable[..., Any]]) -> None:
        self.source = source
        self.functions = functions

    def fail(self, what: str) -> ExpressionError:
        return ExpressionError(f"{what} is not allowed in expression {self.source!r}")

    def check_name(self, name: str, kind: str) -> None:
        if name.startswith("__"):
            raise self.fail(f"{kind} {name!r} (names starting with '__' are reserved)")

    def compile(self, node: ast.AST) -> _Node:
        kind = type(node).__name__
        method = _Compiler.__dict__.get("c_" + kind)
        if method is None:
            raise self.fail(_FORBIDDEN_NODES.get(kind, f"construct {kind}"))
        return method(self, node)

    # --- leaves ------------------------------------------------------------------------------
    def c_Constant(self, node: ast.Constant) -> _Node:
        value = node.value
        if value is None or isinstance(value, (bool, int, float, str)):
            return _constant(value)
        raise self.fail(f"literal {value!r} of type {type(value).__name__}")

    def c_Name(self, node: ast.Name) -> _Node:
        name = node.id
        if name in _JS_CONSTANTS:
            return _constant(_JS_CONSTANTS[name])
        self.check_name(name, "name")

        def read_name(names: Names) -> Any:
            value = names.get(name, _MISSING)
            if value is _MISSING:
                return _miss(names, name, None, names)
            return value

        return _Node(read_name)

    # --- attributes and subscripts -----------------------------------------------------------
    # A read that finds nothing is None; it is told to the names' watcher (`_miss`) on that path
    # only, so reads that find their key pay one identity test.
    def c_Attribute(self, node: ast.Attribute) -> _Node:
        chain: List[str] = []
        base: ast.AST = node
        while isinstance(base, ast.Attribute):
            self.check_name(base.attr, "attribute")
            chain.append(base.attr)
            base = base.value
        chain.reverse()
        if isinstance(base, ast.Name) and base.id not in _JS_CONSTANTS:
            self.check_name(base.id, "name")
            return self._dotted_chain(base.id, chain)
        inner = self.compile(base)
        get = inner.fn
        attrs = tuple(chain)
        base_node = base

        def attribute(names: Names) -> Any:
            value = get(names)
            for i, attr in enumerate(attrs):
                found = _read_attr(value, attr)
                if found is _MISSING:
                    parent = _label(base_node, attrs[:i])
                    return _miss(names, lambda: f"{parent()}.{attr}", parent, value)  # noqa: B023 (returns: the loop ends)
                value = found
            return value

        return _fold(_Node(attribute), [inner])

    def _dotted_chain(self, head: str, chain: List[str]) -> _Node:
        parts = [head, *chain]
        labels = tuple(".".join(parts[: k + 1]) for k in range(len(parts)))  # labels[i]: through parts[i]
        # Fallback keys, longest first: ("a.b.c", ()), ("a.b", ("c",)).
        fallbacks = tuple(
            (".".join(parts[:k]), tuple(parts[k:])) for k in range(len(parts), 1, -1)
        )

        def walk(names: Names, value: Any, first: int) -> Any:
            """Read parts[first:] from `value` (which is labels[first - 1])."""
            for i in range(first, len(parts)):
                found = _read_attr(value, parts[i])
                if found is _MISSING:
                    return _miss(names, labels[i], labels[i - 1], value)
                value = found
            return value

        def fallback(names: Names) -> Any:
            for key, rest in fallbacks:
                value = names.get(key, _MISSING)
                if value is not _MISSING:
                    return walk(names, value, len(parts) - len(rest))
            return _miss(names, head, None, names)

        if len(chain) == 1:
            attr = chain[0]
            path = labels[1]

            def attribute1(names: Names) -> Any:
                value = names.get(head, _MISSING)
                if value is _MISSING:
                    return fallback(names)
                found = value.get(attr, _MISSING) if value.__class__ is dict else _read_attr(value, attr)
                if found is _MISSING:
                    return _miss(names, path, head, value)
                return found

            return _Node(attribute1)
        attrs = tuple(chain)

        def attribute_chain(names: Names) -> Any:
            value = names.get(head, _MISSING)
            if value is _MISSING:
                return fallback(names)
            for attr in attrs:
                found = value.get(attr, _MISSING) if value.__class__ is dict else _read_attr(value, attr)
                if found is _MISSING:
                    return walk(names, names.get(head), 1)  # the slow path again, to name the step
                value = found
            return value

        return _Node(attribute_chain)

    def c_Subscript(self, node: ast.Subscript) -> _Node:
        key_node = node.slice
        if isinstance(key_node, ast.Constant) and isinstance(key_node.value, str):
            self.check_name(key_node.value, "key")
        inner = self.compile(node.value)
        key = self.compile(key_node)
        get, get_key = inner.fn, key.fn
        parent = _label(node.value)
        if key.const:
            k = key.value

            def subscript_const(names: Names) -> Any:
                value = get(names)
                if value.__class__ is dict:
                    try:
                        found = value.get(k, _MISSING)
                    except TypeError:
                        return None
                else:
                    found = _read_item(value, k)
                if found is _MISSING:
                    return _miss(names, lambda: f"{parent()}[{k!r}]", parent, value)
                return found

            return _fold(_Node(subscript_const), [inner, key])

        def subscript(names: Names) -> Any:
            value = get(names)
            k = get_key(names)
            found = _read_item(value, k)
            if found is _MISSING:
                return _miss(names, lambda: f"{parent()}[{_short(k)}]", parent, value)
            return found

        return _fold(_Node(subscript), [inner, key])

    def c_Slice(self, node: ast.Slice) -> _Node:
        parts = [None if p is None else self.compile(p) for p in (node.lower, node.upper, node.step)]
        fns = [(lambda names: None) if p is None else p.fn for p in parts]
        lower, upper, step = fns

        def make_slice(names: Names) -> slice:
            return slice(lower(names), upper(names), step(names))

        # A slice object is not foldable into a constant (not in _FOLDABLE); that is fine.
        return _Node(make_slice)

    # --- operators ---------------------------------------------------------------------------
    def c_BinOp(self, node: ast.BinOp) -> _Node:
        kind = type(node.op)
        if kind not in _BINOPS:
            raise self.fail(f"operator {_FORBIDDEN_BINOPS.get(kind, kind.__name__)!r}")
        _, op = _BINOPS[kind]
        left, right = self.compile(node.left), self.compile(node.right)
        lf, rf = left.fn, right.fn
        if op is _mul and left.const and right.const and _repeats_past_folding(left.value, right.value):
            children = []  # not folded: do not even build it (see _fold)
        else:
            children = [left, right]
        if right.const:
            k = right.value

            def binop_const(names: Names) -> Any:
                return op(lf(names), k)

            return _fold(_Node(binop_const), children) if children else _Node(binop_const)

        def binop(names: Names) -> Any:
            return op(lf(names), rf(names))

        return _fold(_Node(binop), children) if children else _Node(binop)

    def c_UnaryOp(self, node: ast.UnaryOp) -> _Node:
        op = _UNARYOPS[type(node.op)]
        operand = self.compile(node.operand)
        f = operand.fn
        if op is _logical_not:

            def logical_not(names: Names) -> bool:
                return not f(names)

            return _fold(_Node(logical_not), [operand])

        def unary(names: Names) -> Any:
            return op(f(names))

        return _fold(_Node(unary), [operand])

    def c_BoolOp(self, node: ast.BoolOp) -> _Node:
        values = [self.compile(v) for v in node.values]
        fns = tuple(v.fn for v in values)
        is_and = isinstance(node.op, ast.And)
        if len(fns) == 2:
            a, b = fns
            if is_and:

                def and2(names: Names) -> Any:
                    return a(names) and b(names)

                return _fold(_Node(and2), values)

            def or2(names: Names) -> Any:
                return a(names) or b(names)

            return _fold(_Node(or2), values)

        def boolop(names: Names) -> Any:
            result = None
            for f in fns:
                result = f(names)
                if (not result) if is_and else result:
                    return result
            return result

        return _fold(_Node(boolop), values)

    def c_Compare(self, node: ast.Compare) -> _Node:
        left = self.compile(node.left)
        comparators = [self.compile(c) for c in node.comparators]
        ops = [_COMPARE[type(op)] for op in node.ops]
        children = [left, *comparators]
        lf = left.fn
        if len(ops) == 1:
            right = comparators[0]
            kind = type(node.ops[0])
            if right.const and kind in _ORDERING:
                k, raw = right.value, _ORDERING[kind]

                symbol = _ORDERING_SYMBOLS[kind]

                def ordering_const(names: Names) -> Any:
                    a = lf(names)
                    if a is None or k is None:
                        return _unorderable(names, symbol, a, k)
                    try:
                        return raw(a, k)
                    except TypeError:
                        return _unorderable(names, symbol, a, k)

                return _fold(_Node(ordering_const), children)
            op = ops[0]
            if right.const:
                k = right.value
                op = _UNCHECKED.get(op, op)

                def compare_const(names: Names) -> Any:
                    return op(lf(names), k)

                return _fold(_Node(compare_const), children)
            rf = right.fn
            if kind in _ORDERING:

                def ordering(names: Names) -> Any:
                    try:
                        return op(lf(names), rf(names))
                    except _Unorderable as exc:
                        return _unorderable(names, exc.symbol, exc.a, exc.b)

                return _fold(_Node(ordering), children)

            def compare(names: Names) -> Any:
                return op(lf(names), rf(names))

            return _fold(_Node(compare), children)
        pairs = tuple(zip(ops, (c.fn for c in comparators)))

        def compare_chain(names: Names) -> Any:
            a = lf(names)
            result: Any = True
            try:
                for op, f in pairs:
                    b = f(names)
                    result = op(a, b)
                    if not result:
                        return result
                    a = b
            except _Unorderable as exc:
                return _unorderable(names, exc.symbol, exc.a, exc.b)
            return result

        return _fold(_Node(compare_chain), children)

    def c_IfExp(self, node: ast.IfExp) -> _Node:
        test, body, orelse = (self.compile(n) for n in (node.test, node.body, node.orelse))
        if test.const:
            return body if test.value else orelse
        t, b, o = test.fn, body.fn, orelse.fn

        def if_exp(names: Names) -> Any:
            return b(names) if t(names) else o(names)

        return _Node(if_exp)

    # --- containers --------------------------------------------------------------------------
    def c_List(self, node: ast.List) -> _Node:
        fns = tuple(self.compile(e).fn for e in node.elts)
        return _Node(lambda names: [f(names) for f in fns])

    def c_Tuple(self, node: ast.Tuple) -> _Node:
        items = [self.compile(e) for e in node.elts]
        fns = tuple(i.fn for i in items)
        return _fold(_Node(lambda names: tuple(f(names) for f in fns)), items)

    def c_Dict(self, node: ast.Dict) -> _Node:
        keys = [k for k in node.keys if k is not None]
        if len(keys) < len(node.keys):
            raise self.fail("unpacking with '**'")
        pairs = tuple((self._dict_key(k), self.compile(v).fn) for k, v in zip(keys, node.values))
        return _Node(lambda names: {k(names): v(names) for k, v in pairs})

    def _dict_key(self, node: ast.AST) -> CompiledExpression:
        key = self.compile(node)
        if key.const:
            return key.fn  # small: hashing it is cheap
        get = key.fn

        def checked_key(names: Names) -> Any:
            value = get(names)
            if isinstance(value, tuple):
                _check_hash("a dict literal", value)
            return value

        return checked_key

    # --- calls -------------------------------------------------------------------------------
    def c_Call(self, node: ast.Call) -> _Node:
        func = node.func
        if isinstance(func, ast.Attribute):
            self.check_name(func.attr, "attribute")
            raise self.fail(f"method call '.{func.attr}()'")
        if not isinstance(func, ast.Name):
            raise self.fail("calling a computed value")
        name = func.id
        self.check_name(name, "name")
        target = self.functions.get(name)
        if target is None:
            allowed = ", ".join(sorted(self.functions)) or "none"
            raise self.fail(f"call to {name!r} (allowed functions: {allowed})")
        keyword_names: List[str] = []
        for kw in node.keywords:
            if kw.arg is None:
                raise self.fail("unpacking with '**'")
            self.check_name(kw.arg, "keyword argument")
            keyword_names.append(kw.arg)
        args = tuple(self.compile(a).fn for a in node.args)
        keywords = tuple((name, self.compile(kw.value).fn) for name, kw in zip(keyword_names, node.keywords))
        if keywords:

            def call_kw(names: Names) -> Any:
                return target(*[a(names) for a in args], **{k: v(names) for k, v in keywords})

            return _Node(call_kw)
        if len(args) == 1:
            (a,) = args

            def call1(names: Names) -> Any:
                return target(a(names))

            return _Node(call1)

        def call(names: Names) -> Any:
            return target(*[a(names) for a in args])

        return _Node(call)


def _depth_exceeds(node: ast.AST, limit: int) -> bool:
    """True when the expression tree is deeper than `limit` (recursion bounded by `limit`)."""
    if limit < 0:
        return True
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.expr_context, ast.operator, ast.unaryop, ast.boolop, ast.cmpop)):
            continue
        if _depth_exceeds(child, limit - 1):
            return True
    return False


def _runtime_error(source: str, exc: Exception) -> ExpressionError:
    if isinstance(exc, (_Refused, ExpressionError)):
        detail = str(exc)
    else:
        detail = f"{type(exc).__name__}: {exc}"
    return ExpressionError(f"cannot evaluate {source!r}: {detail}")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
class SafeEvaluator:
    """Compiles blueprint expressions into fast callables, refusing anything unsafe.

    ``functions`` extends the default whitelist (`DEFAULT_FUNCTIONS`): its entries are added or
    replace the default of the same name; an entry whose value is ``None`` removes that name.
    Compiled expressions (and refusals) are cached per source string, up to 1024 entries.
    """

    def __init__(
        self,
        *,
        max_length: int = 1000,
        max_depth: int = 50,
        functions: Optional[Mapping[str, Optional[Callable[..., Any]]]] = None,
    ) -> None:
        self.max_length = max_length
        self.max_depth = max_depth
        merged: Dict[str, Callable[..., Any]] = dict(DEFAULT_FUNCTIONS)
        for name, fn in (functions or {}).items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"function name must be an identifier, not {name!r}")
            if fn is None:
                merged.pop(name, None)
            elif not callable(fn):
                raise TypeError(f"function {name!r} is not callable")
            else:
                merged[name] = fn
        self._functions = merged
        self._cache: Dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def functions(self) -> Mapping[str, Callable[..., Any]]:
        """The whitelisted functions (a copy)."""
        return dict(self._functions)

    def __repr__(self) -> str:
        return (
            f"SafeEvaluator(max_length={self.max_length}, max_depth={self.max_depth}, "
            f"functions={sorted(self._functions)})"
        )

    def compile(self, source: str) -> CompiledExpression:
        """Parse and validate `source` once; return ``fn(names) -> value``.

        Raises `ExpressionError` when the source cannot be parsed or uses a forbidden construct;
        the message names the construct.
        """
        try:
            entry = self._cache.get(source)
        except TypeError:  # unhashable, so certainly not a string
            entry = None
        if entry is not None:
            if entry.__class__ is str:
                raise ExpressionError(entry)
            return entry
        try:
            entry = self._build(source)
        except ExpressionError as exc:
            if isinstance(source, str):
                self._remember(source, str(exc))
            raise
        self._remember(source, entry)
        return entry

    def evaluate(self, source: str, names: Names) -> Any:
        """Compile (cached) and evaluate `source` with `names`."""
        return self.compile(source)(names)

    # --- internals ---------------------------------------------------------------------------
    def _remember(self, source: str, entry: Any) -> None:
        with self._lock:
            cache = self._cache
            if source not in cache and len(cache) >= CACHE_SIZE:
                cache.pop(next(iter(cache)), None)  # oldest first
            cache[source] = entry

    def _build(self, source: Any) -> CompiledExpression:
        if not isinstance(source, str):
            raise ExpressionError(f"an expression must be a string, not {type(source).__name__}")
        if len(source) > self.max_length:
            raise ExpressionError(
                f"expression is {len(source)} characters long (limit {self.max_length}): "
                f"{source[:60]!r}..."
            )
        text = _translate(source)
        if not text:
            raise ExpressionError("empty expression")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise ExpressionError(f"cannot parse expression {source!r}: {exc.msg}") from None
        except (ValueError, RecursionError, MemoryError, OverflowError) as exc:
            raise ExpressionError(
                f"cannot parse expression {source!r}: {type(exc).__name__}: {exc}"
            ) from None
        if _depth_exceeds(tree.body, self.max_depth - 1):
            raise ExpressionError(
                f"expression is nested more than {self.max_depth} levels deep: {source[:60]!r}"
            )
        try:
            node = _Compiler(source, self._functions).compile(tree.body)
        except RecursionError:
            raise ExpressionError(f"expression is nested too deeply: {source[:60]!r}") from None
        return _finish(source, node)


def _check_result(value: Any) -> None:
    """Refuse a value whose logical size exceeds MAX_VISIT_ITEMS: whatever receives it (the
    runtime storing a transform's value as JSON) would walk every shared item once per reference.
    A list literal repeating a name (`[x, x, x, ...]`) multiplies sizes without any '*'."""
    if isinstance(value, _CONTAINERS) and _small(value) < 0:
        limit = MAX_VISIT_ITEMS
        if _logical_size(value, limit) > limit:
            raise _Refused(
                f"its value holds more than {limit} items counted through nested lists "
                f"(limit MAX_VISIT_ITEMS)"
            )


def _finish(source: str, node: _Node) -> CompiledExpression:
    fn = node.fn

    def compiled(names: Names) -> Any:
        try:
            value = fn(names)
            if value.__class__ not in _SCALAR_CLASSES:
                _check_result(value)
            return value
        except Exception as exc:
            if names is None:
                return compiled({})
            raise _runtime_error(source, exc) from exc

    compiled.source = source  # type: ignore[attr-defined]
    compiled.__qualname__ = compiled.__name__ = "compiled_expression"
    return compiled


def default_evaluator() -> SafeEvaluator:
    """A new `SafeEvaluator` with the default settings."""
    return SafeEvaluator()


class EvaluateAdapter:
    """An evaluator with only ``evaluate(expression, context)`` (the Flowcraft TS ``IEvaluator``
    shape) seen as one with ``compile``: each call evaluates the source with the names mapping as
    ``context``. Its failures become `ExpressionError` naming the expression."""

    def __init__(self, evaluator: Any) -> None:
        self.evaluator = evaluator

    def __repr__(self) -> str:
        return f"EvaluateAdapter({self.evaluator!r})"

    def compile(self, source: str) -> CompiledExpression:
        if not isinstance(source, str):
            raise ExpressionError(f"an expression must be a string, not {type(source).__name__}")
        evaluate = self.evaluator.evaluate

        def evaluated(names: Names) -> Any:
            try:
                return evaluate(source, names)
            except ExpressionError:
                raise
            except Exception as exc:
                raise _runtime_error(source, exc) from exc

        evaluated.source = source  # type: ignore[attr-defined]
        return evaluated


def as_evaluator(evaluator: Any = None) -> Any:
    """The evaluator a runtime uses: the default `SafeEvaluator` for None, an object with
    ``compile(source)`` as it is, and one with only ``evaluate(expression, context)`` wrapped in an
    `EvaluateAdapter`. Anything else is a `TypeError`."""
    if evaluator is None:
        return default_evaluator()
    if hasattr(evaluator, "compile") and callable(evaluator.compile):
        return evaluator
    if hasattr(evaluator, "evaluate") and callable(evaluator.evaluate):
        return EvaluateAdapter(evaluator)
    raise TypeError(
        f"an evaluator needs a method compile(source) -> callable(names) or evaluate(expression, "
        f"context) -> value; {type(evaluator).__name__} has neither"
    )


def top_level_names(source: str) -> List[str]:
    """The top-level names an expression reads (`a` of `a.b[c]`, and `c`), each once, without JavaScript constants and called function names. Raises `ExpressionError` when the
    source cannot be parsed."""
    if not isinstance(source, str):
        raise ExpressionError(f"an expression must be a string, not {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(_translate(source), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as exc:
        raise ExpressionError(f"cannot parse expression {source!r}: {exc}") from None
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    found: List[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and id(node) not in called and node.id not in _JS_CONSTANTS \
                and node.id not in found:
            found.append(node.id)
    return found
