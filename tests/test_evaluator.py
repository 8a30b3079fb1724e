"""Tests for flowcraft.evaluator: the safe expression language of blueprint edges."""
from __future__ import annotations

import ast
import inspect
import operator
from collections.abc import Mapping
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flowcraft import evaluator as evaluator_module
from flowcraft.errors import ExpressionError, FlowcraftError
from flowcraft.evaluator import Evaluator, SafeEvaluator, default_evaluator


@pytest.fixture
def ev() -> SafeEvaluator:
    return SafeEvaluator()


def run(source: str, **names: Any) -> Any:
    return SafeEvaluator().evaluate(source, names)


class SpyMapping(Mapping):
    """A read-only mapping that records every key it is asked for."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.touched: list = []

    def __getitem__(self, key: Any) -> Any:
        self.touched.append(key)
        return self.data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class Tripwire:
    """An object whose attributes must never be read by the evaluator."""

    tripped = False
    secret = "s3cret"

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("__"):
            type(self).tripped = True
        return object.__getattribute__(self, name)

    @property
    def danger(self) -> str:
        type(self).tripped = True
        return "ran"


# ----------------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------------
def test_default_evaluator_is_a_fresh_safe_evaluator() -> None:
    a, b = default_evaluator(), default_evaluator()
    assert isinstance(a, SafeEvaluator) and a is not b
    assert a.max_length == 1000 and a.max_depth == 50
    assert isinstance(a, Evaluator)


def test_expression_error_is_a_flowcraft_value_error() -> None:
    with pytest.raises(ExpressionError) as info:
        run("1 +")
    assert isinstance(info.value, FlowcraftError) and isinstance(info.value, ValueError)


def test_compile_returns_reusable_callable(ev: SafeEvaluator) -> None:
    fn = ev.compile("result.output > 5")
    assert fn({"result": {"output": 7}}) is True
    assert fn({"result": {"output": 1}}) is False
    assert fn({}) is False
    assert fn.source == "result.output > 5"  # type: ignore[attr-defined]


def test_compile_is_cached_per_source(ev: SafeEvaluator) -> None:
    assert ev.compile("a + 1") is ev.compile("a + 1")
    assert ev.compile("a + 1") is not ev.compile("a + 2")
    assert ev.compile("a + 1") is not SafeEvaluator().compile("a + 1")


def test_cache_is_bounded(ev: SafeEvaluator) -> None:
    for i in range(1500):
        ev.compile(f"x + {i}")
    assert len(ev._cache) <= 1024
    assert ev.evaluate("x + 1499", {"x": 1}) == 1500
    assert ev.evaluate("x + 0", {"x": 1}) == 1  # evicted, compiled again


def test_refusals_are_cached_and_still_raise(ev: SafeEvaluator) -> None:
    for _ in range(3):
        with pytest.raises(ExpressionError, match="lambda"):
            ev.compile("(lambda: 1)()")


def test_names_none_is_an_empty_mapping(ev: SafeEvaluator) -> None:
    assert ev.evaluate("x", None) is None  # type: ignore[arg-type]


def test_custom_mapping_for_names_and_values(ev: SafeEvaluator) -> None:
    names = SpyMapping({"a": SpyMapping({"b": 3})})
    assert ev.evaluate("a.b * 2", names) == 6
    assert ev.evaluate("a['b'] + 1", names) == 4
    assert ev.evaluate("a.length", names) is None  # a mapping: a.get('length')
    assert ev.evaluate("a.missing", names) is None


@pytest.mark.parametrize("source", [None, 42, b"x > 1", ["x"]])
def test_non_string_sources_are_refused(ev: SafeEvaluator, source: Any) -> None:
    with pytest.raises(ExpressionError, match="string"):
        ev.compile(source)


@pytest.mark.parametrize("source", ["", "   ", "\n", "# only a comment"])
def test_empty_sources_are_refused(ev: SafeEvaluator, source: str) -> None:
    with pytest.raises(ExpressionError):
        ev.compile(source)


@pytest.mark.parametrize("source", ["1 +", "x = 1", "a b", "import os", "if x: y", "(", "'open"])
def test_syntax_errors(ev: SafeEvaluator, source: str) -> None:
    with pytest.raises(ExpressionError, match="cannot parse"):
        ev.compile(source)


def test_module_never_uses_eval_or_exec() -> None:
    tree = ast.parse(inspect.getsource(evaluator_module))
    called = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not called & {"eval", "exec", "compile", "getattr", "__import__"}


# ----------------------------------------------------------------------------------------------
# Allowed constructs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source, expected",
    [
        ("42", 42),
        ("-3.5", -3.5),
        ("1_000", 1000),
        ("'single'", "single"),
        ('"double"', "double"),
        ("'''triple'''", "triple"),
        ("True", True),
        ("False", False),
        ("None", None),
        ("[1, 'a', None]", [1, "a", None]),
        ("(1, 2)", (1, 2)),
        ("()", ()),
        ("{'a': 1, 'b': [2]}", {"a": 1, "b": [2]}),
        ("{}", {}),
        ("1 + 2", 3),
        ("'a' + 'b'", "ab"),
        ("[1] + [2]", [1, 2]),
        ("5 - 7", -2),
        ("3 * 4", 12),
        ("'ab' * 3", "ababab"),
        ("[0] * 3", [0, 0, 0]),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("2 ** 10", 1024),
        ("2 ** -1", 0.5),
        ("2.0 ** 0.5", 2.0**0.5),
        ("-(3)", -3),
        ("+4", 4),
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("1 == 1", True),
        ("1 != 1", False),
        ("1 < 2", True),
        ("2 <= 2", True),
        ("3 > 2", True),
        ("2 >= 3", False),
        ("1 < 2 < 3", True),
        ("1 < 3 < 2", False),
        ("'x' in ['x', 'y']", True),
        ("'z' not in ['x', 'y']", True),
        ("'ell' in 'hello'", True),
        ("'k' in {'k': 1}", True),
        ("None is None", True),
        ("1 is not None", True),
        ("1 and 2", 2),
        ("0 and 2", 0),
        ("0 or 'b'", "b"),
        ("not 0", True),
        ("not 1", False),
        ("1 if True else 2", 1),
        ("1 if 0 else 2", 2),
        ("[1, 2, 3][0]", 1),
        ("[1, 2, 3][-1]", 3),
        ("[1, 2, 3][1:]", [2, 3]),
        ("[1, 2, 3][::-1]", [3, 2, 1]),
        ("'hello'[1:3]", "el"),
        ("{'a': 1}['a']", 1),
        ("len([1, 2])", 2),
        ("str(12)", "12"),
        ("int('7') + 1", 8),
        ("float('1.5')", 1.5),
        ("bool(0)", False),
        ("abs(-3)", 3),
        ("min(3, 1, 2)", 1),
        ("max([3, 1, 2])", 3),
        ("max([], default=0)", 0),
        ("round(3.14159, 2)", 3.14),
        ("round(2.5)", 2),
        ("(len)([1])", 1),
    ],
)
def test_allowed_constructs(source: str, expected: Any) -> None:
    result = run(source)
    assert result == expected and type(result) is type(expected)


def test_names_and_context(ev: SafeEvaluator) -> None:
    names = {
        "result": {"output": {"total": 3, "items": [1, 2, 3]}},
        "input": {"items": ["a"]},
        "context": {"count": 2},
        "done": False,
        "status": "ok",
        "tags": ["x", "y"],
        "items": [1, 2, 3],
    }
    assert ev.evaluate("result.output.total > 0", names) is True
    assert ev.evaluate("input.items", names) == ["a"]
    assert ev.evaluate("context.count < 3 && !done", names) is True
    assert ev.evaluate("status === 'ok'", names) is True
    assert ev.evaluate("len(items) > 2", names) is True
    assert ev.evaluate("'x' in tags", names) is True
    assert ev.evaluate("result.output.items[1]", names) == 2
    assert ev.evaluate("result['output']['total'] * 2", names) == 6
    assert ev.evaluate("{'n': context.count, 'tags': tags}", names) == {"n": 2, "tags": ["x", "y"]}


def test_containers_are_fresh_each_call(ev: SafeEvaluator) -> None:
    fn = ev.compile("[1, 2]")
    first = fn({})
    first.append(3)
    assert fn({}) == [1, 2]


def test_single_underscore_names_are_normal_keys(ev: SafeEvaluator) -> None:
    names = {"_outputs": {"fetch": {"total": 4}}, "_x": 1}
    assert ev.evaluate("_outputs.fetch.total", names) == 4
    assert ev.evaluate("_x + 1", names) == 2
    assert ev.evaluate("_outputs['fetch']['_private']", names) is None


# ----------------------------------------------------------------------------------------------
# JavaScript spellings
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source, names, expected",
    [
        ("a === 1", {"a": 1}, True),
        ("a !== 1", {"a": 1}, False),
        ("a !== 2", {"a": 1}, True),
        ("a != 1", {"a": 1}, False),
        ("a && b", {"a": 1, "b": 2}, 2),
        ("a&&b", {"a": 0, "b": 2}, 0),
        ("a || b", {"a": 0, "b": 2}, 2),
        ("a||b", {"a": "x", "b": 2}, "x"),
        ("!a", {"a": 0}, True),
        ("!!a", {"a": 5}, True),
        ("!a && b", {"a": 0, "b": 3}, 3),
        ("a != !b", {"a": True, "b": True}, True),
        ("a == !b", {"a": False, "b": True}, True),
        ("!a == b", {"a": 0, "b": True}, True),  # JavaScript binding: (!a) == b
        ("not a == b", {"a": 0, "b": True}, True),  # Python binding: not (a == b)
        ("!a.b", {"a": {"b": 0}}, True),
        ("!(a > 1)", {"a": 0}, True),
        ("true", {}, True),
        ("false", {}, False),
        ("null", {}, None),
        ("undefined", {}, None),
        ("x === null", {"x": None}, True),
        ("x === undefined", {}, True),
        ("true && !false", {}, True),
        ("x.null", {"x": {"null": 1}}, 1),
        ("a\n&& b", {"a": 1, "b": 2}, 2),
        ("a # a comment ' && b\n || c", {"a": 0, "c": 5}, 5),
    ],
)
def test_js_spellings(source: str, names: dict, expected: Any) -> None:
    assert run(source, **names) == expected


@pytest.mark.parametrize(
    "literal",
    [
        "'a && b'",
        "'a || b'",
        "'!done'",
        "'x !== y === z != w'",
        "'true false null undefined'",
        '"it\'s && ok"',
        "'say \"!\" || \\'&&\\''",
        "'''multi && 'line' || !x'''",
        "'# not a comment'",
        "'~'",
    ],
)
def test_string_literals_are_untouched(literal: str) -> None:
    expected = ast.literal_eval(literal)
    assert run(literal) == expected
    assert run(f"s == {literal}", s=expected) is True


def test_tilde_is_refused() -> None:
    with pytest.raises(ExpressionError, match="'~'"):
        run("~x")


# ----------------------------------------------------------------------------------------------
# Name resolution, attributes, subscripts
# ----------------------------------------------------------------------------------------------
def test_missing_names_are_none(ev: SafeEvaluator) -> None:
    assert ev.evaluate("missing", {}) is None
    assert ev.evaluate("missing.deep.chain", {}) is None
    assert ev.evaluate("missing[0]", {}) is None
    assert ev.evaluate("missing['k'].x", {}) is None
    assert ev.evaluate("missing == null", {}) is True
    assert ev.evaluate("!missing", {}) is True
    assert ev.evaluate("x.y", {"x": None}) is None


def test_dotted_key_fallback(ev: SafeEvaluator) -> None:
    assert ev.evaluate("_outputs.fetch.total", {"_outputs.fetch": {"total": 5}}) == 5
    assert ev.evaluate("user.name", {"user.name": "ada"}) == "ada"
    assert ev.evaluate("a.b.c", {"a.b.c": 1, "a.b": {"c": 2}}) == 1  # longest prefix first
    assert ev.evaluate("a.b.c", {"a.b": {"c": 2}}) == 2
    assert ev.evaluate("a.b.c.d", {"a.b": {"c": {"d": 3}}}) == 3
    assert ev.evaluate("a.b.c", {"a.b.x": 1}) is None
    assert ev.evaluate("a.b.c", {"a": {"b": {"c": 7}}, "a.b.c": 1}) == 7  # head present wins
    assert ev.evaluate("a.b['c']", {"a.b": {"c": 8}}) == 8
    assert ev.evaluate("a.b.length", {"a.b": [1, 2]}) == 2


def test_length(ev: SafeEvaluator) -> None:
    assert ev.evaluate("x.length", {"x": [1, 2, 3]}) == 3
    assert ev.evaluate("x.length", {"x": (1,)}) == 1
    assert ev.evaluate("x.length", {"x": "abcd"}) == 4
    assert ev.evaluate("'abc'.length", {}) == 3
    assert ev.evaluate("x.length", {"x": {"length": 9}}) == 9
    assert ev.evaluate("x.length", {"x": {"a": 1}}) is None
    assert ev.evaluate("x.length", {"x": 12}) is None
    assert ev.evaluate("x.size", {"x": [1]}) is None


def test_attributes_of_other_objects_are_never_read(ev: SafeEvaluator) -> None:
    Tripwire.tripped = False
    obj = Tripwire()
    assert ev.evaluate("o.secret", {"o": obj}) is None
    assert ev.evaluate("o.danger", {"o": obj}) is None
    assert ev.evaluate("o['secret']", {"o": obj}) is None
    assert ev.evaluate("x.real", {"x": 3}) is None
    assert ev.evaluate("s.upper", {"s": "abc"}) is None
    assert not Tripwire.tripped


def test_subscripts(ev: SafeEvaluator) -> None:
    names = {"d": {"k": 1, 2: "two"}, "xs": [10, 20, 30], "t": (1, 2), "s": "hey"}
    assert ev.evaluate("d['k']", names) == 1
    assert ev.evaluate("d[2]", names) == "two"
    assert ev.evaluate("d['missing']", names) is None
    assert ev.evaluate("d[[1]]", names) is None  # unhashable key
    assert ev.evaluate("xs[0]", names) == 10
    assert ev.evaluate("xs[-1]", names) == 30
    assert ev.evaluate("xs[3]", names) is None
    assert ev.evaluate("xs[-4]", names) is None
    assert ev.evaluate("xs['0']", names) is None
    assert ev.evaluate("xs[i]", {**names, "i": 1}) == 20
    assert ev.evaluate("xs[i]", names) is None
    assert ev.evaluate("t[1]", names) == 2
    assert ev.evaluate("s[0]", names) == "h"
    assert ev.evaluate("s[1:]", names) == "ey"
    assert ev.evaluate("xs[:2]", names) == [10, 20]
    assert ev.evaluate("d[1:]", names) is None
    assert ev.evaluate("n[0]", {"n": 5}) is None
    assert ev.evaluate("d['k'] + xs[1]", names) == 21


def test_slice_step_zero_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError, match="slice step"):
        run("xs[::0]", xs=[1])


# ----------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source", ["x > 0", "x >= 0", "x < 0", "x <= 0", "0 < x", "x > y", "undefined > 0", "null <= 0"]
)
def test_ordering_with_none_is_false(source: str) -> None:
    assert run(source, x=None, y=None) is False


@pytest.mark.parametrize("source", ["'a' < 1", "[1] > 1", "{} <= 3", "x < y", "1 < 'b' < 3"])
def test_ordering_of_incomparable_values_is_false(source: str) -> None:
    assert run(source, x={"a": 1}, y=[2]) is False


def test_equality_is_pythons() -> None:
    assert run("x == y", x=None, y=None) is True
    assert run("1 == 1.0") is True
    assert run("'1' == 1") is False
    assert run("[1, 2] == [1, 2]") is True
    assert run("x != null", x=0) is True


def test_in_with_unsupported_containers() -> None:
    assert run("'x' in tags", tags=None) is False
    assert run("'x' in tags") is False
    assert run("'x' not in tags") is True
    assert run("1 in 5") is False
    assert run("1 in 'abc'") is False
    assert run("[1] in {'a': 1}") is False


def test_chained_comparison_evaluates_each_operand_once() -> None:
    calls = []

    def probe(value: Any) -> Any:
        calls.append(value)
        return value

    ev = SafeEvaluator(functions={"probe": probe})
    assert ev.evaluate("1 < probe(2) < 3", {}) is True
    assert calls == [2]


# ----------------------------------------------------------------------------------------------
# Functions
# ----------------------------------------------------------------------------------------------
def test_functions_extend_replace_and_remove() -> None:
    ev = SafeEvaluator(functions={"double": lambda v: v * 2, "len": lambda v: -1, "abs": None})
    assert ev.evaluate("double(x)", {"x": 4}) == 8
    assert ev.evaluate("len([1, 2])", {}) == -1
    assert ev.evaluate("max(1, 2)", {}) == 2
    with pytest.raises(ExpressionError, match="'abs'"):
        ev.compile("abs(-1)")
    assert "double" in ev.functions and "abs" not in ev.functions


def test_function_names_are_not_values() -> None:
    assert run("len") is None
    assert run("len", len=3) == 3


def test_function_errors_become_expression_errors() -> None:
    with pytest.raises(ExpressionError, match="TypeError"):
        run("len(x)", x=None)
    with pytest.raises(ExpressionError, match="ValueError"):
        run("int('abc')")
    with pytest.raises(ExpressionError, match="min"):
        run("min([1], key=len)")
    with pytest.raises(ExpressionError, match="ndigits"):
        run("round(123, -10**7)")

    def boom() -> None:
        raise RuntimeError("kaput")

    with pytest.raises(ExpressionError, match="kaput"):
        SafeEvaluator(functions={"boom": boom}).evaluate("boom()", {})


def test_invalid_function_whitelist() -> None:
    with pytest.raises(ValueError):
        SafeEvaluator(functions={"not an identifier": len})
    with pytest.raises(TypeError):
        SafeEvaluator(functions={"f": 3})  # type: ignore[dict-item]


# ----------------------------------------------------------------------------------------------
# Run-time errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source, fragment",
    [
        ("1 / 0", "division by zero"),
        ("1 // 0", "integer division or modulo by zero"),
        ("1 % 0", "modulo by zero"),
        ("'a' + 1", "TypeError"),
        ("x + 1", "TypeError"),
        ("-'a'", "bad operand type"),
        ("{[1]: 2}", "unhashable"),
        ("2.0 ** 10000", "OverflowError"),
        ("10 ** 400 / 1", "OverflowError"),
        ("'%s' % x", "formatting"),
        ("int(1e999)", "OverflowError"),
    ],
)
def test_runtime_errors_name_the_source(source: str, fragment: str) -> None:
    with pytest.raises(ExpressionError) as info:
        run(source)
    message = str(info.value)
    assert fragment in message
    assert repr(source) in message


# ----------------------------------------------------------------------------------------------
# Escape attempts: refused at compile time, nothing runs
# ----------------------------------------------------------------------------------------------
ESCAPES = [
    ("().__class__.__bases__[0].__subclasses__()", "__"),
    ("x.__class__", "__class__"),
    ("x['__globals__']", "__globals__"),
    ("__import__('os').system('echo hi')", "__import__"),
    ("open('/etc/passwd')", "open"),
    ("getattr(x, 'y')", "getattr"),
    ("(lambda: 1)()", "lambda"),
    ("[x for x in range(10)]", "comprehension"),
    ("{**a}", "'**'"),
    ("f'{x}'", "f-string"),
    ("x.get('a')", "method call"),
    ("len.__self__", "__self__"),
    ("type(x)", "type"),
    ("(x for x in y)", "generator"),
    ("{x: 1 for x in y}", "comprehension"),
    ("{1, 2}", "set"),
    ("(y := 1)", ":="),
    ("[*a]", "'*'"),
    ("len(*a)", "'*'"),
    ("len(**a)", "'**'"),
    ("x(1)", "'x'"),
    ("x[0](1)", "computed"),
    ("(len)(1)(2)", "computed"),
    ("a & b", "'&'"),
    ("a | b", "'|'"),
    ("a ^ b", "'^'"),
    ("1 << 100000", "'<<'"),
    ("a >> 1", "'>>'"),
    ("a @ b", "'@'"),
    ("b'bytes'", "bytes"),
    ("1j", "complex"),
    ("...", "Ellipsis"),
    ("__builtins__", "__builtins__"),
    ("x.__dict__['y']", "__dict__"),
    ("str(x).__len__", "__len__"),
    ("max(x, __key=1)", "__key"),
    ("'{0.__class__}'.format(x)", "method call"),
    ("eval('1')", "eval"),
    ("exec('1')", "exec"),
    ("compile('1', '', 'eval')", "compile"),
    ("breakpoint()", "breakpoint"),
    ("vars()", "vars"),
    ("globals()", "globals"),
]


@pytest.mark.parametrize("source, fragment", ESCAPES)
def test_escape_attempts_are_refused_at_compile_time(source: str, fragment: str) -> None:
    ev = SafeEvaluator()
    with pytest.raises(ExpressionError) as info:
        ev.compile(source)
    assert fragment in str(info.value)
    names = SpyMapping({"x": Tripwire(), "y": [1], "a": {"k": 1}, "b": 2})
    Tripwire.tripped = False
    with pytest.raises(ExpressionError):
        ev.evaluate(source, names)
    assert names.touched == []  # nothing was evaluated
    assert not Tripwire.tripped


def test_shell_escape_does_not_run(tmp_path: Any) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ExpressionError):
        run(f"__import__('os').system('touch {marker}')")
    with pytest.raises(ExpressionError):
        run(f"().__class__.__base__.__subclasses__()[0]('touch {marker}')")
    assert not marker.exists()


def test_computed_dunder_keys_only_read_mappings() -> None:
    # A key built at run time is only ever a mapping lookup, never an attribute.
    assert run("x['__' + 'class__']", x={}) is None
    assert run("x['__' + 'class__']", x={"__class__": 1}) == 1
    assert run("s['__' + 'class__']", s="str") is None


# ----------------------------------------------------------------------------------------------
# Bounded cost (each must finish quickly; no timing asserted)
# ----------------------------------------------------------------------------------------------
def test_long_source_is_refused() -> None:
    with pytest.raises(ExpressionError, match="characters"):
        run("1 + " * 2499 + "1")  # 10_000 characters
    with pytest.raises(ExpressionError, match="characters"):
        run("'" + "a" * 9998 + "'")


def test_limits_are_configurable() -> None:
    ev = SafeEvaluator(max_length=10, max_depth=3)
    with pytest.raises(ExpressionError):
        ev.compile("12345 + 12345")
    with pytest.raises(ExpressionError, match="deep"):
        ev.compile("---1")  # four levels
    assert ev.evaluate("-(-1)", {}) == 1  # three levels
    assert ev.evaluate("a.b.c", {"a": {"b": {"c": 2}}}) == 2


def test_nested_parentheses_are_refused() -> None:
    with pytest.raises(ExpressionError):
        run("(" * 500 + "1" + ")" * 500)
    with pytest.raises(ExpressionError):
        SafeEvaluator(max_length=10_000).compile("(" * 500 + "1" + ")" * 500)


def test_deep_trees_are_refused() -> None:
    with pytest.raises(ExpressionError, match="deep"):
        run("-" * 60 + "1")
    with pytest.raises(ExpressionError, match="deep"):
        run("a" + ".b" * 60)
    with pytest.raises(ExpressionError, match="deep"):
        run("[" * 60 + "]" * 60)
    with pytest.raises(ExpressionError):
        SafeEvaluator(max_length=100_000, max_depth=100_000).compile("-" * 50_000 + "1")


@pytest.mark.parametrize(
    "source",
    [
        "9**9**9**9",
        "'a' * 10**10",
        "[1] * 10**9",
        "10**10**10",
        "10**10 * 'a'",
        "2 ** 100001",
        "99999 ** 9999",
        "(2**99999) * (2**99999)",
        "'a' * 99999 * 2",
        "x + x",
        "x * 2",
        "str(2 ** 99999)",
        "int('9' * 5000)",
        "round(10**50, -10**9)",
        "[1, 2] * (10**5)",
    ],
)
def test_explosive_operations_are_refused(source: str) -> None:
    with pytest.raises(ExpressionError):
        run(source, x="a" * 600_000)


def test_large_but_bounded_operations_are_allowed() -> None:
    assert run("len('ab' * 50000)") == 100_000
    assert run("2 ** 10000 > 0") is True
    assert run("len(str(9 ** 4000))") == 3817
    assert run("len(x + x)", x="a" * 400_000) == 800_000


# ----------------------------------------------------------------------------------------------
# Property tests
# ----------------------------------------------------------------------------------------------
ENV = {"x": 3, "y": -2, "z": 0}
_BIN = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod}
_CMP = {
    "==": operator.eq, "===": operator.eq, "!=": operator.ne, "!==": operator.ne,
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
LIMIT = 1 << 4000


class TooBig(Exception):
    pass


def _leaves() -> st.SearchStrategy:
    return st.one_of(
        st.integers(-20, 20).map(lambda v: ("num", v)),
        st.sampled_from(sorted(ENV)).map(lambda n: ("var", n)),
        st.sampled_from([True, False]).map(lambda v: ("bool", v)),
    )


def _extend(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.just("bin"), st.sampled_from(sorted(_BIN)), children, children),
        st.tuples(st.just("cmp"), st.sampled_from(sorted(_CMP)), children, children),
        st.tuples(st.just("chain"), st.sampled_from(["<", "<=", "=="]), children, children, children),
        st.tuples(st.just("bool"), st.sampled_from(["and", "&&", "or", "||"]), children, children),
        st.tuples(st.just("un"), st.sampled_from(["not", "!", "-", "+"]), children),
        st.tuples(st.just("pow"), children, st.integers(0, 3)),
        st.tuples(st.just("if"), children, children, children),
    )


expressions = st.recursive(_leaves(), _extend, max_leaves=12)


def render(tree: tuple) -> str:
    kind = tree[0]
    if kind == "num":
        return f"({tree[1]})" if tree[1] < 0 else str(tree[1])
    if kind == "var":
        return tree[1]
    if kind == "bool" and len(tree) == 2:
        return "true" if tree[1] else "False"
    if kind in ("bin", "cmp"):
        return f"({render(tree[2])} {tree[1]} {render(tree[3])})"
    if kind == "chain":
        return f"({render(tree[2])} {tree[1]} {render(tree[3])} {tree[1]} {render(tree[4])})"
    if kind == "bool":
        return f"({render(tree[2])} {tree[1]} {render(tree[3])})"
    if kind == "un":
        op = "not " if tree[1] == "not" else tree[1]
        return f"({op}{render(tree[2])})"
    if kind == "pow":
        return f"({render(tree[1])} ** {tree[2]})"
    if kind == "if":
        return f"({render(tree[2])} if {render(tree[1])} else {render(tree[3])})"
    raise AssertionError(tree)


def reference(tree: tuple) -> Any:
    """A tiny interpreter with Python's semantics, independent of the evaluator."""
    kind = tree[0]
    if kind == "num":
        value = tree[1]
    elif kind == "var":
        value = ENV[tree[1]]
    elif kind == "bool" and len(tree) == 2:
        value = tree[1]
    elif kind == "bin":
        value = _BIN[tree[1]](reference(tree[2]), reference(tree[3]))
    elif kind == "cmp":
        value = _CMP[tree[1]](reference(tree[2]), reference(tree[3]))
    elif kind == "chain":
        a, b = reference(tree[2]), reference(tree[3])
        value = _CMP[tree[1]](a, b) and _CMP[tree[1]](b, reference(tree[4]))
    elif kind == "bool":
        left = reference(tree[2])
        if tree[1] in ("and", "&&"):
            value = reference(tree[3]) if left else left
        else:
            value = left if left else reference(tree[3])
    elif kind == "un":
        operand = reference(tree[2])
        value = {"not": operator.not_, "!": operator.not_, "-": operator.neg, "+": operator.pos}[tree[1]](
            operand
        )
    elif kind == "pow":
        value = reference(tree[1]) ** tree[2]
    elif kind == "if":
        value = reference(tree[2]) if reference(tree[1]) else reference(tree[3])
    else:
        raise AssertionError(tree)
    if isinstance(value, int) and abs(value) > LIMIT:
        raise TooBig
    return value


_shared = SafeEvaluator()


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions)
def test_arithmetic_agrees_with_python(tree: tuple) -> None:
    source = render(tree)
    assume(len(source) <= 1000)
    try:
        expected = reference(tree)
    except TooBig:
        assume(False)
    except ZeroDivisionError:
        with pytest.raises(ExpressionError, match="by zero"):
            _shared.evaluate(source, ENV)
        return
    result = _shared.evaluate(source, ENV)
    assert result == expected and type(result) is type(expected), source


GARBAGE_ALPHABET = list("  ()[]{}.,:;'\"+-*/%<>=!&|~#^@\\\nabcxyz_019") + [
    "len", "str", "int", "round", "max", "**", "9", "lambda", "__", "true", "null", "in", "not",
    "and", "or", "if", "else", "for", ".length", "x", "d", "s",
]
GARBAGE_NAMES = {"x": 7, "d": {"k": [1, 2]}, "s": "abc", "a": [1, 2, 3]}


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=80), st.lists(st.sampled_from(GARBAGE_ALPHABET), max_size=30).map("".join)))
def test_garbage_only_raises_expression_error(source: str) -> None:
    ev = SafeEvaluator()
    try:
        fn = ev.compile(source)
    except ExpressionError:
        return
    try:
        fn(GARBAGE_NAMES)
    except ExpressionError:
        pass


# ----------------------------------------------------------------------------------------------
# Logical sizes (issue 11, item 3; the hostile cases are in tests/test_hostile_expressions.py)
# ----------------------------------------------------------------------------------------------
def _doubling_dag(levels: int) -> list:
    value: Any = 0
    for _ in range(levels):
        value = [value, value]  # 2 references to one object: 2**levels leaves logically
    return value


def test_logical_size_walks_each_shared_object_once() -> None:
    dag = _doubling_dag(200)  # 2**201 - 1 items logically, 200 distinct lists
    assert evaluator_module._logical_size(dag, 2**300) == 2**201 - 1
    assert evaluator_module._logical_size(dag, 1000) > 1000
    assert evaluator_module._logical_size([[0] * 10] * 10, 10**6) == 1 + 10 * 11
    assert evaluator_module._logical_size("x" * 640, 10) == 11  # strings: not walked
    assert evaluator_module._logical_size({"a": [1, 2]}, 100) == 1 + 1 + 3


def test_logical_size_of_a_value_containing_itself_exceeds_any_limit() -> None:
    cyclic: list = [1]
    cyclic.append(cyclic)
    assert evaluator_module._logical_size(cyclic, 10**9) > 10**9
    with pytest.raises(ExpressionError, match="MAX_VISIT_ITEMS"):
        run("x == y", x=cyclic, y=[1, cyclic])


def test_shared_values_are_refused_by_logical_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluator_module, "MAX_VISIT_ITEMS", 1000)  # read at each call
    dag, other = _doubling_dag(40), _doubling_dag(40)
    for source in ("x == y", "x != y", "x < y", "x >= y", "[x] == [y]", "x in [y]", "min(x, y)"):
        with pytest.raises(ExpressionError, match="MAX_VISIT_ITEMS"):
            run(source, x=dag, y=other)
    with pytest.raises(ExpressionError, match="MAX_VISIT_ITEMS"):
        run("[[0] * 100] * 10")
    assert run("len([[0] * 100] * 9)") == 9
    assert run("x == x and x[0] is x[1]", x=dag) is True  # identity: Python does not walk it
    assert run("0 in x and x != [1]", x=dag) is False  # a scalar, a short side: cheap
    assert run("len(x[0][1]) == len(y[1][0]) == 2", x=dag, y=other) is True


def test_str_of_shared_values_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluator_module, "MAX_STR_CHARS", 1000)
    with pytest.raises(ExpressionError, match="MAX_STR_CHARS"):
        run("str(x)", x=_doubling_dag(20))
    with pytest.raises(ExpressionError, match="MAX_STR_CHARS"):
        run("str(object=x)", x=["y" * 600, "y" * 600])
    assert run("str(x)", x=_doubling_dag(3)) == str(_doubling_dag(3))
    assert run("str([1.5, None, True, -12345678901234567890])") == "[1.5, None, True, -12345678901234567890]"


def test_hashing_large_tuples_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluator_module, "MAX_VISIT_ITEMS", 1000)
    key = ((0,) * 100,) * 100
    for source in ("d[k]", "k in d", "{k: 1}"):
        with pytest.raises(ExpressionError, match="MAX_VISIT_ITEMS"):
            run(source, d={}, k=key)
    assert run("d[k]", d={(1, 2): "yes"}, k=(1, 2)) == "yes"


def test_values_logically_too_large_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluator_module, "MAX_VISIT_ITEMS", 1000)
    with pytest.raises(ExpressionError, match="MAX_VISIT_ITEMS"):
        run("[x, x]", x=[0] * 600)  # a transform's value is stored: walked in full
    assert run("[x, 1]", x=[0] * 600) == [[0] * 600, 1]


def test_int_of_long_strings_is_refused() -> None:
    with pytest.raises(ExpressionError, match="MAX_INT_DIGITS"):
        run("int(s)", s="1" * 5001)
    assert run("int(s, 16)", s="f" * 100) == int("f" * 100, 16)


def test_only_small_constants_are_folded() -> None:
    compiler = evaluator_module._Compiler("", evaluator_module.DEFAULT_FUNCTIONS)
    small = compiler.compile(ast.parse("(1, 'a') * 3 + (2 ** 10,)", mode="eval").body)
    assert small.const and small.value == (1, "a", 1, "a", 1, "a", 1024)
    for source in ("(0,) * 1000", "'a' * 1000", "2 ** 10000", "((0,) * 100,) * 100"):
        node = compiler.compile(ast.parse(source, mode="eval").body)
        assert not node.const, source
    assert run("len(((0,) * 100,) * 100)") == 100


# --- an evaluator with `evaluate(expression, context)` (the Flowcraft TS IEvaluator shape) ---------


class _TsShapedEvaluator:
    """Only `evaluate`, as a Flowcraft TS IEvaluator; knows two expressions and records its calls."""

    def __init__(self) -> None:
        self.calls = []

    def evaluate(self, expression, context):
        self.calls.append(expression)
        if expression == "big":
            return context["result"]["output"] > 10
        if expression == "small":
            return context["result"]["output"] <= 10
        raise ValueError(f"unknown expression {expression}")


def _branching_flow():
    from flowcraft import create_flow

    return (
        create_flow("ts-eval")
        .node("n", lambda ctx: ctx.input, inputs="n")
        .node("big", lambda ctx: "BIG")
        .node("small", lambda ctx: "SMALL")
        .edge("n", "big", condition="big")
        .edge("n", "small", condition="small")
    )


def _run_with(evaluator, driver, context):
    from flowcraft import FlowRuntime
    from flowcraft.testing import InMemoryAdapter

    flow = _branching_flow()
    runtime = FlowRuntime(evaluator=evaluator)
    runtime.add_blueprint(flow)
    if driver == "memory":
        return flow.run(runtime, context)
    adapter = InMemoryAdapter(runtime)
    run_id = adapter.start_workflow(flow.id, context)
    adapter.drain()
    return adapter.wait_for_result(run_id, timeout=5)


@pytest.mark.parametrize("driver", ["memory", "distributed"])
def test_an_evaluate_only_evaluator_drives_the_edges(driver):
    evaluator = _TsShapedEvaluator()
    result = _run_with(evaluator, driver, {"n": 42})
    assert result.status == "completed", result.errors
    assert result.context["big"] == "BIG" and result.skipped == ["small"]
    assert sorted(set(evaluator.calls)) == ["big", "small"]


@pytest.mark.parametrize("driver", ["memory", "distributed"])
def test_a_failing_evaluate_fails_the_node_naming_the_expression(driver):
    evaluator = _TsShapedEvaluator()
    result = _run_with(evaluator, driver, {"n": "x"})  # "x" > 10: TypeError inside the user's evaluator
    assert result.status == "failed"
    (error,) = result.errors
    assert error.node_id == "n"
    assert error.message == ("edge 'n' -> 'big': condition 'big' failed: TypeError: '>' not supported between "
                             "instances of 'str' and 'int'")


def test_a_compile_shaped_evaluator_is_used_as_it_is():
    from flowcraft import FlowRuntime
    from flowcraft.evaluator import EvaluateAdapter, as_evaluator

    safe = SafeEvaluator()
    assert FlowRuntime(evaluator=safe).evaluator is safe
    assert as_evaluator(safe) is safe  # it has both: compile wins (compiled once)
    assert isinstance(FlowRuntime(evaluator=_TsShapedEvaluator()).evaluator, EvaluateAdapter)


def test_an_object_with_neither_method_is_refused_at_once():
    from flowcraft import FlowRuntime

    with pytest.raises(TypeError, match=r"an evaluator needs a method compile\(source\) -> callable\(names\) or "
                                        r"evaluate\(expression, context\) -> value; object has neither"):
        FlowRuntime(evaluator=object())


# --- missing names and unorderable comparisons: reported to a watcher, free otherwise ----------------


def test_missing_reads_are_none_for_plain_mappings_and_reported_to_a_watcher():
    from flowcraft.evaluator import ExpressionProblem, WatchedNames

    class Watched(WatchedNames, dict):
        def __init__(self, *args):
            dict.__init__(self, *args)
            self.seen = []

        def expression_problem(self, problem: ExpressionProblem) -> None:
            self.seen.append(problem.message())

    ev = SafeEvaluator()
    cases = {
        "a.b.c": "'a.b.c' does not exist (a.b has keys: d)",
        "a['x']": "\"a['x']\" does not exist (a has keys: b)",
        "a.b.d[5]": "'a.b.d[5]' does not exist (a.b.d is a list of 1 items)",
        "zz": "name 'zz' does not exist (names: a, n)",
        "n < 'a'": "'<' compares 1 (int) with 'a' (str): values of these types cannot be ordered",
    }
    for source, message in cases.items():
        names = {"a": {"b": {"d": [1]}}, "n": 1}
        assert ev.compile(source)(names) in (None, False)  # a plain dict: today's values, no report
        watched = Watched(names)
        assert ev.compile(source)(watched) in (None, False)
        assert watched.seen == [message], source
    watched = Watched({"a": {"b": {"d": [1]}}, "k": None})
    assert ev.compile("a.b.d[0] == 1 and k is None and a.b.d.length == 1")(watched) is True
    assert watched.seen == []


def test_top_level_names():
    from flowcraft.evaluator import top_level_names

    names = top_level_names("len(result.output.items) > limit && !done || x[y] === null")
    assert sorted(names) == ["done", "limit", "result", "x", "y"]  # not `len`, not `null`
