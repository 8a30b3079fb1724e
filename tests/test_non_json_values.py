"""Values JSON cannot hold (issue 17, items 5 and 6), in memory (`FlowRuntime`), on the fakes
(`InMemoryAdapter`, several jobs fetched at once) and through the CLI.

Item 6: a circular value (a node's output, a context write, a batch item's output) fails its node
at once, naming the key and where in the value it refers back; it used to hang the run. Hostile
cases run in a bounded child (`run_bounded`) so a hang fails the test instead of the session.

Item 5: NaN, Infinity, a datetime... given to a run from outside (the initial context of
`FlowRuntime.run` and `start_workflow`, a resume's output, the CLI's `--context` / `--output`)
are refused before anything runs or is stored, with the same message in memory and distributed.
Redis and RabbitMQ + PostgreSQL: tests/integration/test_non_json_backends.py.
"""
from __future__ import annotations

import datetime
import json
from typing import Any, Dict

import pytest
from bounded import run_bounded
from test_cli import app, app_dir, app_module, assert_one_line_error, files, memory_backend, run_cli  # noqa: F401

from flowcraft import FlowRuntime, SerializationError, create_flow
from flowcraft.cli.errors import EXIT_OK, EXIT_USAGE
from flowcraft.serializer import JsonSerializer, check_json
from flowcraft.testing import InMemoryAdapter

PRELUDE = '''
import json, logging, time
logging.disable(logging.CRITICAL)
from flowcraft import FlowRuntime, create_flow
from flowcraft.testing import InMemoryAdapter

RAN = []

def circular_output(ctx):
    value = {"a": [1, 2]}
    value["a"].append(value)
    return value

def circular_write(ctx):
    items = []
    items.append({"all": items})
    ctx.context.set("items", items)
    return "unreachable"

def circular_item(ctx):
    loop = [ctx.input]
    loop.append(loop)
    return loop

def flows():
    def after(ctx):
        RAN.append(ctx.node_id)
        return "after"
    out = create_flow("out").node("n", circular_output).node("m", after).edge("n", "m")
    write = create_flow("write").node("n", circular_write).node("m", after).edge("n", "m")
    items = (create_flow("items").node("make", lambda ctx: [1, 2])
             .batch("each", circular_item, input_key="make", output_key="got").node("m", after)
             .edge("make", "each").edge("each", "m"))
    plain = create_flow("plain").node("p", lambda ctx: "fine")
    rt = FlowRuntime()
    for flow in (out, write, items, plain):
        rt.add_blueprint(flow)
    return rt

def summary(result):
    return {"status": result.status, "errors": [[e.node_id, e.type, e.message] for e in result.errors],
            "m": "m" in result.context}

def report(**values):
    print("RESULT " + json.dumps(values))
'''


def bounded(code: str, timeout: float = 30) -> Dict[str, Any]:
    result = run_bounded(PRELUDE + code, timeout=timeout, memory_mb=512)
    assert result.ok, result.describe()
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.describe()
    return json.loads(lines[-1][len("RESULT "):])


# === item 6: circular values =====================================================================

CIRCULAR = {
    "out": ["n", "value at '_outputs.n.a[2]' is circular: it refers back to '_outputs.n'"],
    "write": ["n", "value at 'items[0].all' is circular: it refers back to 'items'"],
    "items": ["each_scatter", "value at 'each_scatter.0[1]' is circular: it refers back to 'each_scatter.0'"],
}


def test_check_json_refuses_a_circular_value_at_once_naming_where() -> None:
    seen = bounded('''
from flowcraft.serializer import check_json
def cases():
    a = []; a.append(a)
    d = {"x": 1}; d["me"] = d
    deep = {"l": [{"m": {}}]}; deep["l"][0]["m"]["back"] = deep["l"]
    t = [1]; tup = (t,); t.append(tup)
    return {"list": a, "dict": d, "deep": deep, "tuple": tup}
out = {}
for name, value in cases().items():
    for bound in (16 * 1024 * 1024, None):
        started = time.monotonic()
        try:
            check_json(value, "k", bound)
            out[f"{name}-{bound}"] = ["accepted", 0]
        except Exception as error:
            out[f"{name}-{bound}"] = [type(error).__name__ + ": " + str(error), time.monotonic() - started]
report(**out)
''')
    assert seen.pop("list-None")[0] == seen.pop("list-16777216")[0] == (
        "SerializationError: value at 'k[0]' is circular: it refers back to 'k', which holds it "
        "(JSON cannot hold a value inside itself)")
    assert "value at 'k.me' is circular: it refers back to 'k'," in seen["dict-None"][0]
    assert "value at 'k.l[0].m.back' is circular: it refers back to 'k.l'," in seen["deep-None"][0]
    assert "value at 'k[0][1]' is circular: it refers back to 'k'," in seen["tuple-None"][0]
    for message, seconds in seen.values():
        assert message.startswith("SerializationError: ") and seconds < 0.5, (message, seconds)


def test_a_shared_sub_value_is_not_circular() -> None:
    shared = {"x": [1, "two"]}
    value = {"a": shared, "b": [shared, shared], "c": {"d": shared}}
    assert check_json(value, "k") == pytest.approx(len(json.dumps(value, separators=(",", ":"))), abs=30)
    rt = FlowRuntime()
    rt.add_blueprint(create_flow("shared").node("n", lambda ctx: value).node("m", lambda ctx: ctx.input["b"][1])
                     .edge("n", "m"))
    result = rt.run("shared", {"same": [shared, shared]})
    assert result.status == "completed" and result.context["m"] == shared
    ad = InMemoryAdapter(rt)
    run_id = ad.start_workflow("shared", {"same": [shared, shared]})
    ad.work(burst=True)
    assert ad.wait_for_result(run_id, timeout=5).context["m"] == shared


def test_a_circular_output_or_write_fails_its_node_in_memory_and_on_the_fakes() -> None:
    seen = bounded('''
rt = flows()
started = time.monotonic()
memory = {name: summary(rt.run(name)) for name in ("out", "write", "items")}
ad = InMemoryAdapter(rt, fetch_batch=8)
runs = {name: [ad.start_workflow(name) for _ in range(2)] for name in ("out", "write", "items", "plain")}
ad.work(burst=True)
distributed = {name: [summary(ad.wait_for_result(r, timeout=5)) for r in ids] for name, ids in runs.items()}
report(memory=memory, distributed=distributed, dead=len(ad.queue.dead), ran=RAN, seconds=time.monotonic() - started)
''')
    for name, (node_id, fragment) in CIRCULAR.items():
        for result in [seen["memory"][name]] + seen["distributed"][name]:
            assert result["status"] == "failed" and not result["m"], (name, result)
            [(failed, kind, message)] = result["errors"]
            assert (failed, kind) == (node_id, "SerializationError") and fragment in message, (name, result)
    assert [r["status"] for r in seen["distributed"]["plain"]] == ["completed", "completed"]
    assert seen["ran"] == [] and seen["dead"] == 0
    assert seen["seconds"] < 10


def test_every_encoder_refuses_a_cycle_instead_of_hanging() -> None:
    """What encodes a value without `check_json` first (a value changed after it was checked)
    raises at once: the serializer, the stores' encoders, the fake store."""
    seen = bounded('''
from flowcraft.serializer import JsonSerializer
from flowcraft.result import WorkflowResult
from flowcraft.testing.fakes import _copy
from flowcraft_redis.context import encode as redis_encode
from flowcraft_rabbitmq.store import _dumps as postgres_dumps
loop = {"x": []}; loop["x"].append(loop)
out = {}
for name, encode in [("serializer", lambda v: JsonSerializer().dumps({"k": v})),
                     ("result", lambda v: WorkflowResult("completed", {"k": v}).serialized_context),
                     ("fake-store", _copy), ("redis", redis_encode), ("postgres", postgres_dumps)]:
    try:
        encode(loop)
        out[name] = "accepted"
    except Exception as error:
        out[name] = type(error).__name__ + ": " + str(error)
report(**out)
''')
    for name, outcome in seen.items():
        assert "Circular reference detected" in outcome, (name, outcome)


def test_a_value_made_circular_after_its_write_fails_its_run_not_the_worker() -> None:
    seen = bounded('''
def sneaky(ctx):
    value = {"a": 1}
    ctx.context.set("later", value)  # checked here...
    value["me"] = value              # ...and made circular afterwards
    return "ok"
rt = flows()
rt.add_blueprint(create_flow("sneaky").node("n", sneaky))
ad = InMemoryAdapter(rt, fetch_batch=8)
runs = [ad.start_workflow("sneaky"), ad.start_workflow("plain")]
ad.work(burst=True)
report(results=[summary(ad.wait_for_result(r, timeout=5)) for r in runs])
''')
    sneaky, plain = seen["results"]
    # the worker's store encoder, or its final check of the run's context, refuses it
    assert sneaky["status"] == "failed" and "ircular" in sneaky["errors"][0][2], sneaky
    assert plain["status"] == "completed"


# === item 5: values from outside a run ===========================================================

NOT_JSON = [
    pytest.param({"x": float("nan")}, "initial context: value at 'x' is NaN, which JSON cannot hold", id="nan"),
    pytest.param({"x": float("inf")}, "initial context: value at 'x' is Infinity", id="infinity"),
    pytest.param({"ok": 1, "x": {"deep": [-float("inf")]}}, "initial context: value at 'x.deep[0]' is -Infinity",
                 id="deep-minus-infinity"),
    pytest.param({"when": datetime.datetime(2026, 1, 2)}, "initial context: value at 'when' is a datetime, which is "
                 "not JSON-serialisable", id="datetime"),
    pytest.param({"x": {1, 2}}, "initial context: value at 'x' is a set", id="set"),
    pytest.param({1: "one"}, "initial context: key 1 is a int: JSON keys are strings", id="int-key"),
]


def _counting_runtime() -> tuple:
    ran = []
    rt = FlowRuntime()
    rt.add_blueprint(create_flow("count").node("n", lambda ctx: ran.append(ctx.node_id) or "ran"))
    return rt, ran


@pytest.mark.parametrize("context, message", NOT_JSON)
def test_a_non_json_initial_context_is_refused_before_anything_runs(context: Dict[Any, Any], message: str) -> None:
    rt, ran = _counting_runtime()
    with pytest.raises(SerializationError) as in_memory:
        rt.run("count", context)
    ad = InMemoryAdapter(rt, fetch_batch=4)
    with pytest.raises(SerializationError) as distributed:
        ad.start_workflow("count", context, run_id="refused")
    assert str(in_memory.value) == str(distributed.value)
    assert str(in_memory.value).startswith(message)
    assert ad.get_status("refused") is None and ad.store.run_ids() == []
    assert ad.work(burst=True) == 0 and ran == []


def test_an_initial_value_over_max_value_bytes_is_refused_the_same_way() -> None:
    rt = FlowRuntime(max_value_bytes=100)
    rt.add_blueprint(create_flow("count").node("n", lambda ctx: "ran"))
    messages = []
    for start in (lambda: rt.run("count", {"big": "x" * 200}),
                  lambda: InMemoryAdapter(rt).start_workflow("count", {"big": "x" * 200})):
        with pytest.raises(SerializationError) as error:
            start()
        messages.append(str(error.value))
    assert messages[0] == messages[1] and messages[0].startswith("initial context: value of 'big' is too large")


def _awaiting_runtime() -> tuple:
    rt = FlowRuntime()
    rt.add_blueprint(create_flow("approve").wait("decide").node("done", lambda ctx: ctx.input).edge("decide", "done"))
    return rt


@pytest.mark.parametrize("output", [float("nan"), {"at": datetime.date(2026, 1, 2)}, [float("inf")]])
def test_a_non_json_resume_output_is_refused_and_the_run_stays_resumable(output: Any) -> None:
    rt = _awaiting_runtime()
    paused = rt.run("approve")
    assert paused.status == "awaiting"
    with pytest.raises(SerializationError, match=r"^resume: value at 'output"):
        rt.resume("approve", paused.serialized_context, output=output)
    assert rt.resume("approve", paused.serialized_context, output="fine").context["done"] == "fine"

    ad = InMemoryAdapter(rt, fetch_batch=4)
    run_id = ad.start_workflow("approve")
    ad.work(burst=True)
    before = ad.store.read_all_context(run_id)
    with pytest.raises(SerializationError, match=r"^resume: value at 'output"):
        ad.resume_with_action(run_id, None, output)
    assert ad.get_status(run_id).status == "awaiting" and ad.store.read_all_context(run_id) == before
    ad.resume_with_action(run_id, None, "fine")
    ad.work(burst=True)
    assert ad.wait_for_result(run_id, timeout=5).context["done"] == "fine"


def test_the_serializer_refuses_nan_too() -> None:
    with pytest.raises(SerializationError, match="not JSON-serialisable"):
        JsonSerializer().dumps({"x": float("nan")})


# --- the CLI: --context and --output --------------------------------------------------------------

BAD_JSON_ARGS = [
    pytest.param('{"n": NaN}', "--context is not valid JSON: value at '$.n' is NaN", id="nan"),
    pytest.param('{"n": 1, "deep": {"x": [Infinity]}}', "--context is not valid JSON: value at '$.deep.x[0]' is Infinity",
                 id="infinity"),
    pytest.param('{"n": -Infinity}', "value at '$.n' is -Infinity", id="minus-infinity"),
    pytest.param('{"n": 1e999}', "value at '$.n' is Infinity", id="overflowing-number"),
]


@pytest.mark.parametrize("text, fragment", BAD_JSON_ARGS)
def test_cli_run_refuses_nan_in_context(capsys, app, files, tmp_path, text: str, fragment: str) -> None:
    code, out, err = run_cli(capsys, "run", files["chain"], "--app", f"{app}:runtime", "--context", text)
    assert (code, out) == (EXIT_USAGE, "")
    assert_one_line_error(err, fragment, "(no NaN or Infinity)")
    path = tmp_path / "ctx.json"
    path.write_text(text)
    code, out, err = run_cli(capsys, "run", files["chain"], "--app", f"{app}:runtime", "--context", f"@{path}")
    assert (code, out) == (EXIT_USAGE, "")
    assert_one_line_error(err, f"--context file {str(path)!r} is not valid JSON: value at '$.")


def test_cli_start_and_resume_refuse_nan_and_change_nothing(capsys, app, memory_backend) -> None:
    code, out, err = run_cli(capsys, "start", "approval", "--app", f"{app}:runtime", "--context", '{"amount": NaN}')
    assert (code, out) == (EXIT_USAGE, "")
    assert_one_line_error(err, "--context is not valid JSON: value at '$.amount' is NaN")
    assert "adapter" not in memory_backend  # refused before any backend was opened

    code, out, _ = run_cli(capsys, "start", "approval", "--app", f"{app}:runtime")
    run_id = out.strip()
    assert run_cli(capsys, "worker", "--app", f"{app}:runtime", "--burst")[0] == EXIT_OK
    adapter = memory_backend["adapter"]
    before = (adapter.get_status(run_id).status, adapter.store.read_all_context(run_id))
    for output in ("NaN", '{"note": Infinity}'):
        code, out, err = run_cli(capsys, "resume", run_id, "--app", f"{app}:runtime", "--action", "approve",
                                 "--output", output)
        assert (code, out) == (EXIT_USAGE, "")
        assert_one_line_error(err, "--output is not valid JSON: value at '$", "(no NaN or Infinity)")
    assert (adapter.get_status(run_id).status, adapter.store.read_all_context(run_id)) == before == (
        "awaiting", before[1])
