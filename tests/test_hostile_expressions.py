"""Hostile expressions (issue 11, items 3 and 4): each case runs in a child process with a memory cap
and a timeout (tests/bounded.py), and must fail fast with an `ExpressionError` naming the limit.

Values built by repetition share their items, so they are small in memory but huge logically:
comparing, hashing or printing them runs in C while holding the GIL, for as long as the logical
size takes (a worker would freeze and stop heartbeating). The child builds such values directly
(cheap) to feed them as context values too, the way a node's output or a queue payload would.
"""
from __future__ import annotations

import json
import tracemalloc

import pytest

from bounded import run_bounded
from flowcraft.errors import ExpressionError
from flowcraft.evaluator import MAX_VISIT_ITEMS, SafeEvaluator

MEMORY_MB = 400  # the child's address-space cap: the interpreter needs ~60 MB of it
FAST_SECONDS = 2.0  # each hostile case must be refused within this (it runs in milliseconds)
PEAK_MB = 50  # tracemalloc peak of one compile + evaluate in the child

# Shared across cases: `nested` and `other` are 10^15 items logically (three lists of 10^5 shared
# references each), `tup` is a tuple of 10^10 (hashing it walks them all), `wide` a flat 10^5 list.
CHILD = """
import json, sys, time, tracemalloc
from flowcraft.evaluator import SafeEvaluator
from flowcraft.errors import ExpressionError

def nest(levels):
    value = 0
    for _ in range(levels):
        value = [value] * 100000
    return value

names = {{
    "nested": nest(3), "other": nest(3), "tup": ((0,) * 100000,) * 100000,
    "wide": list(range(100000)), "d": {{"k": 1}},
}}
names["pair"] = [names["nested"], names["other"]]
tracemalloc.start()
for source in json.loads(sys.argv[1] if len(sys.argv) > 1 else {sources!r}):
    tracemalloc.reset_peak()
    started = time.perf_counter()
    try:
        value = SafeEvaluator().compile(source)(names)
        outcome = {{"value": repr(value)[:200]}}
    except ExpressionError as exc:
        outcome = {{"error": str(exc)}}
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    # One line per case, flushed: a case that kills the child leaves the earlier ones readable.
    print(json.dumps({{"source": source, **outcome, "seconds": seconds, "peak_mb": peak / 2**20}}),
          flush=True)
"""

HOSTILE = [
    # The case: 10^15 comparisons, refused when '*' would build it.
    ("[[[0]*100000]*100000]*100000 == [[[0]*100000]*100000]*100000", "MAX_VISIT_ITEMS"),
    ("[[[0]*100000]*100000]*100000 != [[[0]*100000]*100000]*100000", "MAX_VISIT_ITEMS"),
    ("((0,)*100000,)*100000", "MAX_VISIT_ITEMS"),
    ("str([[0]*100000]*100000)", "MAX_VISIT_ITEMS"),
    ("3 * [[0]*100000] * 100", "MAX_VISIT_ITEMS"),
    # The same values given as context values, each operation on its own.
    ("nested == other", "MAX_VISIT_ITEMS"),
    ("nested != other", "MAX_VISIT_ITEMS"),
    ("nested === other", "MAX_VISIT_ITEMS"),
    ("nested < other", "MAX_VISIT_ITEMS"),
    ("nested >= other", "MAX_VISIT_ITEMS"),
    ("nested == other == nested", "MAX_VISIT_ITEMS"),
    ("[nested] == [other]", "MAX_VISIT_ITEMS"),
    ("str(nested)", "MAX_STR_CHARS"),
    ("str(nested[0])", "MAX_STR_CHARS"),
    ("str(object=nested)", "MAX_STR_CHARS"),
    ("nested[0] in other", "MAX_VISIT_ITEMS"),
    ("nested in pair", "MAX_VISIT_ITEMS"),
    ("nested not in [other, other]", "MAX_VISIT_ITEMS"),
    ("tup in d", "MAX_VISIT_ITEMS"),
    ("d[tup]", "MAX_VISIT_ITEMS"),
    ("{tup: 1}", "MAX_VISIT_ITEMS"),
    ("min(nested)", "MAX_VISIT_ITEMS"),
    ("max(nested, other)", "MAX_VISIT_ITEMS"),
    ("max(pair)", "MAX_VISIT_ITEMS"),
    ("[wide] * 101", "MAX_VISIT_ITEMS"),
    # A transform's value is stored as JSON: a literal repeating a name multiplies sizes.
    ("[nested, 1]", "MAX_VISIT_ITEMS"),
    ("[[wide]*99, [wide]*99]", "MAX_VISIT_ITEMS"),
    ("int('1' * 100000)", "MAX_INT_DIGITS"),
]


CHEAP = [
    ("0 in nested", "False"),  # a scalar compares with each (list) item at once
    ("[0] in nested", "False"),  # lengths differ: each comparison returns at once
    ("nested == nested", "True"),  # the same object: Python compares identity first
    ("len(nested) + len(tup)", "200000"),
    ("nested[0][0][0] == other[1][2][3]", "True"),
    ("nested[0] == [1, 2]", "False"),  # one side is small
    ("wide == other", "False"),
    ("wide == wide[:]", "True"),
]


@pytest.fixture(scope="module")
def outcomes() -> dict:
    """Every case below, evaluated one after the other in a single capped child (one child per
    case would cost a second each); each case is timed and its memory peak measured alone."""
    sources = [source for source, _ in HOSTILE + CHEAP]
    result = run_bounded(CHILD.format(sources=json.dumps(sources)), timeout=120, memory_mb=MEMORY_MB)
    found = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            outcome = json.loads(line)
            found[outcome["source"]] = outcome
    return {"result": result, "found": found}


def run_child(outcomes: dict, source: str) -> dict:
    outcome = outcomes["found"].get(source)
    assert outcome is not None, f"the child died before {source!r}: {outcomes['result'].describe()}"
    return outcome


@pytest.mark.parametrize("source, limit", HOSTILE)
def test_hostile_expression_fails_fast_naming_the_limit(outcomes: dict, source: str, limit: str) -> None:
    outcome = run_child(outcomes, source)
    assert "error" in outcome, f"{source!r} was evaluated: {outcome}"
    assert limit in outcome["error"] and source in outcome["error"], outcome
    assert outcome["seconds"] < FAST_SECONDS, outcome
    assert outcome["peak_mb"] < PEAK_MB, outcome


def test_the_child_survived_every_case(outcomes: dict) -> None:
    assert outcomes["result"].ok, outcomes["result"].describe()
    assert len(outcomes["found"]) == len(HOSTILE) + len(CHEAP)


@pytest.mark.parametrize("source, expected", CHEAP)
def test_cheap_operations_on_huge_values_still_work(outcomes: dict, source: str, expected: str) -> None:
    outcome = run_child(outcomes, source)
    assert outcome.get("value") == expected, outcome
    assert outcome["seconds"] < FAST_SECONDS, outcome


# ----------------------------------------------------------------------------------------------
# Item 4: loading a blueprint whose condition folds a huge constant
# ----------------------------------------------------------------------------------------------
BLUEPRINT_CHILD = """
import json, os, sys, tempfile, time, tracemalloc
from flowcraft.blueprint import WorkflowBlueprint
from flowcraft.analysis import lint_blueprint
from flowcraft.cli import main

condition = "((0,)*100000,)*100000"
edges = [{{"source": "a", "target": "b", "condition": condition,
           "transform": "((0,)*10000,)*10000"}}]
# Distinct big constants: each would be folded and kept (the issue's 3.8 GB from 301 KB).
edges += [{{"source": "a", "target": "b", "action": str(i),
            "condition": f"x == (0,)*100000 + ({{i}},)*100000 + (1,)*100000"}}
          for i in range({edges})]
text = json.dumps({{"id": "hostile", "nodes": [{{"id": "a", "uses": "x"}}, {{"id": "b", "uses": "y"}}],
                   "edges": edges}})
tracemalloc.start()
times = {{}}
started = time.perf_counter()
bp = WorkflowBlueprint.from_json(text)
times["from_json"] = time.perf_counter() - started
started = time.perf_counter()
problems = bp.problems()
bp.validate()
times["validate"] = time.perf_counter() - started
started = time.perf_counter()
lint = lint_blueprint(bp)
times["lint"] = time.perf_counter() - started
kept_mb = tracemalloc.get_traced_memory()[0] / 2**20
with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    f.write(text)
started = time.perf_counter()
code = main(["lint", f.name])
times["cli"] = time.perf_counter() - started
os.unlink(f.name)
print(json.dumps({{"times": times, "problems": problems, "valid": lint.is_valid, "cli": code,
                   "kept_mb": kept_mb, "peak_mb": tracemalloc.get_traced_memory()[1] / 2**20}}))
"""


def test_blueprint_with_huge_folded_constants_loads_validates_and_lints_fast() -> None:
    result = run_bounded(BLUEPRINT_CHILD.format(edges=150), timeout=60, memory_mb=MEMORY_MB)
    assert result.ok, result.describe()
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    # The expressions are well formed; their values are refused when evaluated (tests above).
    assert outcome["problems"] == [] and outcome["valid"] is True and outcome["cli"] == 0, outcome
    assert all(seconds < 10 for seconds in outcome["times"].values()), outcome
    # 151 edges each referencing three 100,000-item tuples: nothing of them is kept.
    assert outcome["kept_mb"] < 30, outcome
    assert outcome["peak_mb"] < 100, outcome


def test_compiling_is_linear_in_the_source() -> None:
    # A chain of tuple folds ((i,)*k,)*k: quadratic when each fold re-walked the one below it.
    result = run_bounded("""
        import json, time
        from flowcraft.evaluator import SafeEvaluator
        ev = SafeEvaluator(max_length=100_000, max_depth=100_000)
        timings = []
        for width in (1_000, 4_000):
            source = " + ".join(f"((({i},)*{width},)*{width},)" for i in range(width // 20))
            started = time.perf_counter()
            ev.compile(source)
            timings.append(time.perf_counter() - started)
        print(json.dumps(timings))
    """, timeout=60, memory_mb=MEMORY_MB)
    assert result.ok, result.describe()
    small, large = json.loads(result.stdout)
    assert large < 2.0, (small, large)


def test_folded_constants_are_small() -> None:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        ev = SafeEvaluator()
        fns = [ev.compile(f"x == ({i},)*100000") for i in range(50)]
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 5 * 2**20, kept  # 50 tuples of 100,000 items would be 40 MB
    assert fns[3]({"x": (3,) * 100000}) is True
    assert ev.evaluate("(1, 2) * 2 + ('a',)", {}) == (1, 2, 1, 2, "a")


# ----------------------------------------------------------------------------------------------
# Legitimate large context values keep working
# ----------------------------------------------------------------------------------------------
def test_a_million_element_context_value_still_compares_and_works() -> None:
    big, same, other = list(range(1_000_000)), list(range(1_000_000)), list(range(1, 1_000_001))
    names = {"x": big, "y": same, "z": other, "d": {"items": big}}
    ev = SafeEvaluator()
    assert ev.evaluate("x == y", names) is True
    assert ev.evaluate("x != z", names) is True
    assert ev.evaluate("x < z and z > y", names) is True
    assert ev.evaluate("[x, 1] == [y, 1]", names) is True
    assert ev.evaluate("d.items == y", names) is True
    assert ev.evaluate("999999 in x and -1 not in x", names) is True
    assert ev.evaluate("y in [z, x]", names) is True
    assert ev.evaluate("max(x) + min(z)", names) == 1_000_000
    assert ev.evaluate("len(str(x))", names) == len(str(big))
    assert ev.evaluate("len(x[:500000] + y[500000:])", names) == 1_000_000
    assert ev.evaluate("x[-1]", names) == 999_999
    assert ev.evaluate("d.items", names) is big  # a transform passing it on
    assert ev.evaluate("[x] * 5 == [y] * 5", names) is True


def test_limits_are_documented_module_constants() -> None:
    from flowcraft import evaluator

    for name in ("MAX_VISIT_ITEMS", "MAX_STR_CHARS", "MAX_INT_DIGITS", "MAX_FOLDED_CHARS"):
        assert isinstance(getattr(evaluator, name), int) and name in evaluator.__doc__, name
    with pytest.raises(ExpressionError, match="MAX_VISIT_ITEMS"):
        SafeEvaluator().evaluate("[x] * 11", {"x": [0] * (MAX_VISIT_ITEMS // 10)})


# ----------------------------------------------------------------------------------------------
# Fuzzing: generated expressions, each timed and its memory peak measured in a capped child
# ----------------------------------------------------------------------------------------------
FUZZ_CHILD = """
import sys, time, tracemalloc
from hypothesis import HealthCheck, given, settings, strategies as st
from flowcraft.evaluator import SafeEvaluator
from flowcraft.errors import ExpressionError

SECONDS, PEAK_MB, EXAMPLES = {seconds}, {peak_mb}, {examples}
L = [0] * 100000
names = {{
    "x": 3, "y": -2, "f": 0.5, "s": "abc", "long": "ab" * 50000, "nul": "a\\x00b",
    "wide": list(range(100000)), "nested": [[L] * 100000] * 100000,
    "other": [[[0] * 100000] * 100000] * 100000,  # equal to nested, sharing nothing with it
    "tup": ((0,) * 100000,) * 100000, "d": {{"k": [1, 2], "n": None, "__class__": 1}},
}}
names["deep"] = [names["nested"], [names["other"]] * 3]

SMALL = [
    "0", "1", "-1", "7", "100000", "10**6", "2**64", "1e308", "0.1", "'a'", "'ab'", "''", "'\\\\x00'",
    "true", "false", "null", "undefined", "None", "[]", "()", "{{}}", "[0]", "(0,)", "[[0]]",
    "x", "y", "f", "s", "nul", "d", "missing", "d.k", "d.n", "d['__class__']",
]
BIG = ["nested", "other", "deep", "tup", "wide", "long", "nested[0]", "nested.length"]
ESCAPES = ["x.__class__", "__import__('os')", "''.join", "d.__class__"]  # refused when compiled
FUNCTIONS = ["len", "str", "int", "float", "bool", "abs", "min", "max", "round"] * 3 + [
    "sum", "sorted", "eval", "getattr", "type", "print"]
REPEATS = ["0", "1", "2", "3", "10", "100", "1000", "100000", "1000000", "10**9", "-1", "True"]
OPERATORS = ["+", "-", "*", "/", "//", "%", "**"]
COMPARISONS = ["==", "!=", "<", "<=", ">", ">=", "in", "not in", "is", "is not", "===", "!=="]


def extend(e):
    seq = st.lists(e, max_size=4)
    compare = st.tuples(e, st.sampled_from(COMPARISONS), e).map(lambda t: "(%s %s %s)" % t)
    return st.one_of(
        compare, compare,  # comparisons and walking functions, the costly ones, twice as often
        st.tuples(st.sampled_from(["str", "min", "max"]), e).map(lambda t: "%s(%s)" % t),
        st.tuples(e, st.sampled_from(OPERATORS), e).map(lambda t: "(%s %s %s)" % t),
        st.tuples(e, st.sampled_from(REPEATS)).map(lambda t: "(%s * %s)" % t),
        st.tuples(st.sampled_from(REPEATS), e).map(lambda t: "(%s * %s)" % t),
        seq.map(lambda items: "[%s]" % ", ".join(items)),
        seq.map(lambda items: "(%s,)" % ", ".join(items) if items else "()"),
        st.lists(st.tuples(e, e), max_size=2).map(
            lambda kv: "{{%s}}" % ", ".join("%s: %s" % p for p in kv)),
        st.tuples(e, st.sampled_from(COMPARISONS), e).map(lambda t: "(%s %s %s)" % t),
        st.tuples(e, st.sampled_from(["<", "==", "<="]), e, e).map(
            lambda t: "(%s %s %s %s %s)" % (t[0], t[1], t[2], t[1], t[3])),
        st.tuples(st.sampled_from(FUNCTIONS), st.lists(e, max_size=3)).map(
            lambda t: "%s(%s)" % (t[0], ", ".join(t[1]))),
        st.tuples(st.sampled_from(["min", "max", "str", "int", "round"]), e, e).map(
            lambda t: "%s(%s, default=%s)" % t if t[0] in ("min", "max") else "%s(%s, %s)" % t),
        st.tuples(e, e).map(lambda t: "%s[%s]" % t),
        st.tuples(e, e, e).map(lambda t: "%s[%s:%s]" % t),
        st.tuples(e, st.sampled_from([".length", ".k", ".__class__", "['__dict__']", "[::-1]",
                                     "[0]", "[-1]"])).map("".join),
        st.tuples(st.sampled_from(["not ", "!", "-", "+"]), e).map(lambda t: "(%s%s)" % t),
        st.tuples(e, st.sampled_from(["and", "or", "&&", "||"]), e).map(lambda t: "(%s %s %s)" % t),
        st.tuples(e, e, e).map(lambda t: "(%s if %s else %s)" % t),
    )


leaves = st.one_of(st.sampled_from(SMALL), st.sampled_from(BIG), st.sampled_from(ESCAPES))
expressions = st.recursive(leaves, extend, max_leaves=10)
worst = {{"seconds": 0.0, "peak_mb": 0.0, "source": ""}}
counts = {{"value": 0, "refused": 0}}


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(expressions)
def fuzz(source):
    tracemalloc.start()  # around the evaluation only: tracing hypothesis would slow it down
    started = time.perf_counter()
    try:
        SafeEvaluator().compile(source)(names)
        counts["value"] += 1
    except ExpressionError:  # the only exception allowed out
        counts["refused"] += 1
    finally:
        seconds = time.perf_counter() - started
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    if seconds > worst["seconds"]:
        worst.update(seconds=seconds, source=source)
    worst["peak_mb"] = max(worst["peak_mb"], peak_mb)
    assert seconds < SECONDS, f"{{source!r}} took {{seconds:.2f}}s"
    assert peak_mb < PEAK_MB, f"{{source!r}} peaked at {{peak_mb:.1f}} MB"


fuzz()
import json
print("OK " + json.dumps({{"counts": counts, "worst": worst}}))
"""


@pytest.mark.slow
def test_fuzzed_expressions_raise_only_expression_errors_within_time_and_memory() -> None:
    code = FUZZ_CHILD.format(seconds=FAST_SECONDS, peak_mb=100, examples=600)
    result = run_bounded(code, timeout=120, memory_mb=1024)
    assert result.ok and "OK " in result.stdout, result.describe()
    report = json.loads(result.stdout.split("OK ", 1)[1])
    # Both paths were exercised: expressions that evaluate and expressions that are refused.
    assert report["counts"]["value"] > 100 and report["counts"]["refused"] > 100, report
