"""Hostile queue messages and blueprints against a worker on the in-memory fakes (issue 11, items
2, 5, 8, 11 and 12, and the job-payload fuzz property test).

A queue writer can write anything: every message is either a valid job (executed, or dropped as
stale) or dead-lettered with a reason; the worker never dies, the other jobs fetched with it
(`fetch_batch` > 1: the batched path) complete, and no run fails unless a message carries that
run's own identity. The cases that crashed or hung a worker run in a bounded child process.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, List

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bounded import run_bounded  # noqa: E402
from flowcraft import FlowRuntime, create_flow  # noqa: E402
from flowcraft.blueprint import WorkflowBlueprint  # noqa: E402
from flowcraft.errors import BlueprintError  # noqa: E402
from flowcraft.ports import MAX_JOB_BYTES, Delivery, Job  # noqa: E402
from flowcraft.testing import InMemoryAdapter  # noqa: E402
from flowcraft.testing.fakes import InMemoryRunStore  # noqa: E402

CHAIN_NODES = ("load", "double", "store")
MARK = "\u2620POISON"  # what the fake store is told it cannot hold (as PostgreSQL cannot hold a NUL)


def nested(depth: int) -> List[Any]:
    value: List[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _load(value: Any) -> Any:
    """The chain's first node: its input, or (for the hostile cases) what a store cannot hold."""
    if value == "poison":
        return MARK
    if value == "deep":
        return nested(5000)
    return value


def chain_runtime(**settings_: Any) -> FlowRuntime:
    flow = (
        create_flow("chain")
        .node("load", lambda ctx: _load(ctx.input), inputs="start")
        .node("double", lambda ctx: ctx.input * 2)
        .node("store", lambda ctx: [ctx.input])
        .edge("load", "double")
        .edge("double", "store")
    )
    runtime = FlowRuntime(**settings_)
    runtime.add_blueprint(flow)
    return runtime


deep_runtime = chain_runtime  # "deep" makes its first node output a value nested 5,000 levels


def batch_adapter(**settings_: Any) -> InMemoryAdapter:
    return InMemoryAdapter(chain_runtime(**settings_), fetch_batch=8)


def statuses(adapter: InMemoryAdapter) -> Dict[str, str]:
    return {run_id: adapter.get_status(run_id).status for run_id in adapter.store.run_ids()}


DEEP = b'{"runId":"x","blueprintId":"chain","nodeId":"load","input":' + b"[" * 1100 + b"]" * 1100 + b"}"

# --- item 2: messages that crashed every worker, run in a bounded child --------------------------

HOSTILE_BODIES = {
    "nested-1100": DEEP,
    "nested-200000": b"[" * 200_000,
    "nested-object-past-bound": b'{"runId":"x","blueprintId":"chain","nodeId":"load","input":' + b'{"a":' * 200 + b"1" + b"}" * 201,
    "not-utf8": b'{"runId":"\xff\xfe","blueprintId":"chain","nodeId":"load"}',
    "lone-surrogate-escape": b'{"runId":"\\ud800","blueprintId":"chain","nodeId":"load"}',
    "nul-in-run-id": b'{"runId":"VICTIM\\u0000","blueprintId":"chain","nodeId":"load"}',
    "control-in-node-id": b'{"runId":"VICTIM","blueprintId":"chain","nodeId":"lo\\u001bad"}',
    "long-run-id": json.dumps({"runId": "r" * 5000, "blueprintId": "chain", "nodeId": "load"}).encode(),
    "nan-input": b'{"runId":"x","blueprintId":"chain","nodeId":"load","input":NaN}',
    "infinity-attempt": b'{"runId":"x","blueprintId":"chain","nodeId":"load","attempt":Infinity}',
    "huge-number": b'{"runId":"x","blueprintId":"chain","nodeId":"load","firstSeen":1e999}',
    "huge-int": b'{"runId":"x","blueprintId":"chain","nodeId":"load","iteration":' + b"9" * 5000 + b"}",
    "duplicate-keys": b'{"runId":"x","blueprintId":"chain","nodeId":"load","nodeId":"store"}',
    "not-an-object": b'["runId","x"]',
    "a-string": b'"job"',
    "bool-iteration": b'{"runId":"x","blueprintId":"chain","nodeId":"load","iteration":true}',
    "list-kind": b'{"runId":"x","blueprintId":"chain","nodeId":"load","kind":["node"]}',
    "first-seen-string": b'{"runId":"VICTIM","blueprintId":"chain","nodeId":"load","firstSeen":"yesterday"}',
    "too-large": b'{"runId":"x","blueprintId":"chain","nodeId":"load","input":"' + b"a" * (MAX_JOB_BYTES + 1) + b'"}',
}

_CHILD = """
import json, sys
sys.path.insert(0, "tests")
from test_hostile_jobs import batch_adapter, statuses
adapter = batch_adapter()
victim = adapter.start_workflow("chain", {"start": 1}, run_id="VICTIM")
body = open(sys.argv[1] if len(sys.argv) > 1 else %r, "rb").read()
adapter.queue.push_raw(body)
others = [adapter.start_workflow("chain", {"start": i}) for i in range(3)]
adapter.drain(timeout=20)
print(json.dumps({"statuses": statuses(adapter), "dead": [r for _, r in adapter.queue.dead],
                  "pending": adapter.queue.pending, "others": others,
                  "results": {r: adapter.wait_for_result(r, timeout=1).context.get("store") for r in others}}))
"""


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_hostile_message_is_dead_lettered_and_its_batch_completes(name: str, tmp_path: Any) -> None:
    body_file = tmp_path / "body"
    body_file.write_bytes(HOSTILE_BODIES[name])
    result = run_bounded(_CHILD % str(body_file), timeout=60, memory_mb=768)
    assert result.ok, result.describe()
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["pending"] == 0  # nothing circulates
    assert len(report["dead"]) == 1 and report["dead"][0].startswith("malformed job: "), report["dead"]
    victim = report["statuses"].pop("VICTIM")
    # a malformed job carrying a run's own identity fails that run (SPEC guarantee 4), no other does
    names_victim = Delivery.parse(HOSTILE_BODIES[name], 0).identity_hint() == ("VICTIM", "chain", "load")
    assert victim == ("failed" if names_victim else "completed"), report
    assert names_victim == (name == "first-seen-string")
    assert set(report["statuses"].values()) == {"completed"}, report
    assert report["results"] == {r: [i * 2] for i, r in enumerate(report["others"])}


def test_job_parsing_raises_only_malformed_job() -> None:
    for name, body in HOSTILE_BODIES.items():
        delivery = Delivery.parse(body, 1)
        assert delivery.job is None and delivery.error, name
    for name in ("nul-in-run-id", "control-in-node-id", "long-run-id", "not-utf8", "nested-1100"):
        assert Delivery.parse(HOSTILE_BODIES[name], 1).identity_hint() is None, name  # names no run
    assert "nested deeper than 128" in Delivery.parse(DEEP, 1).error
    assert Delivery.parse(object(), 1).error.startswith("a job body must be bytes or text")
    assert Delivery.parse("\ud800", 1).error  # text with a lone surrogate
    with pytest.raises(ValueError):
        Job.from_json(DEEP)


def test_job_parsing_stays_linear() -> None:
    """The checks are O(size): a 4 MB job with 100,000 shallow lists parses in well under a second."""
    body = json.dumps({"runId": "r", "blueprintId": "b", "nodeId": "n", "kind": "item", "parent": "p", "index": 0,
                       "input": [[i] for i in range(100_000)] + ["x" * 3_000_000]}).encode()
    started = time.perf_counter()
    assert Job.from_json(body).input[1] == [1]
    assert time.perf_counter() - started < 2.0


# --- item 5: the batched path guards every step ---------------------------------------------------

class BrokenStore(InMemoryRunStore):
    """Fails, other than by an outage, for the runs named: on load, on commit, on publish."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.bad_load: set = set()
        self.bad_commit: set = set()
        self.bad_publish: set = set()

    def load(self, run_id: str, node_ids: Any, context_keys: Any) -> Any:
        if run_id in self.bad_load:
            raise RecursionError("maximum recursion depth exceeded while decoding a JSON object")
        return super().load(run_id, node_ids, context_keys)

    def commit(self, commit: Any) -> bool:
        if commit.run_id in self.bad_commit and commit.record.status != "failed":
            raise TypeError("Object of type bytes is not JSON serializable")
        return super().commit(commit)

    def commit_many(self, commits: Any) -> List[bool]:
        if any(c.run_id in self.bad_commit for c in commits):
            raise TypeError("Object of type bytes is not JSON serializable")
        return super().commit_many(commits)

    def publish_outbox(self, run_id: str, queue: Any) -> int:
        if run_id in self.bad_publish:
            raise ValueError("a job too large for the queue")
        return super().publish_outbox(run_id, queue)

    def publish_outboxes(self, run_ids: Any, queue: Any) -> int:
        if set(run_ids) & self.bad_publish:
            raise ValueError("a job too large for the queue")
        return super().publish_outboxes(run_ids, queue)


def _broken_adapter(fetch_batch: int = 8) -> InMemoryAdapter:
    adapter = InMemoryAdapter(chain_runtime(), fetch_batch=fetch_batch)
    adapter.store = BrokenStore(reject_marker=MARK)
    return adapter


@pytest.mark.parametrize("fetch_batch", [8, 1])
def test_a_value_the_store_refuses_fails_its_run_only(fetch_batch: int) -> None:
    adapter = _broken_adapter(fetch_batch)
    runs = [adapter.start_workflow("chain", {"start": i}) for i in range(2)]
    bad = adapter.start_workflow("chain", {"start": "poison"}, run_id="bad")  # its output cannot be held
    runs += [adapter.start_workflow("chain", {"start": i}) for i in range(2, 4)]
    adapter.drain(timeout=10)
    result = adapter.wait_for_result(bad, timeout=1)
    assert result.status == "failed"
    assert [(e.node_id, e.type) for e in result.errors] == [("load", "StoreRejected")]
    assert "cannot hold the value of" in result.errors[0].message and "load" in result.errors[0].message
    assert MARK not in json.dumps(result.errors[0].message)
    for i, run_id in enumerate(runs):
        assert adapter.wait_for_result(run_id, timeout=1).context["store"] == [i * 2], run_id
    assert adapter.queue.pending == 0 and adapter.queue.dead == []


def test_a_run_that_cannot_be_loaded_committed_or_published_fails_alone() -> None:
    adapter = _broken_adapter()
    store: BrokenStore = adapter.store  # type: ignore[assignment]
    good = [adapter.start_workflow("chain", {"start": i}) for i in range(3)]
    no_load, no_commit, no_publish = (adapter.start_workflow("chain", {"start": 9}, run_id=r)
                                      for r in ("no-load", "no-commit", "no-publish"))
    store.bad_load.add(no_load)
    store.bad_commit.add(no_commit)
    store.bad_publish.add(no_publish)
    assert adapter.work(burst=True) >= 6  # never raises
    store.bad_load.clear()
    adapter.drain(timeout=10)
    for i, run_id in enumerate(good):
        assert adapter.wait_for_result(run_id, timeout=1).context["store"] == [i * 2]
    for run_id, fragment in ((no_load, "RecursionError"), (no_commit, "TypeError"), (no_publish, "too large for the queue")):
        result = adapter.wait_for_result(run_id, timeout=1)
        assert result.status == "failed" and fragment in result.errors[0].message, (run_id, result.errors)
    assert [r for _, r in adapter.queue.dead] == [
        "worker error: cannot load run 'no-load': RecursionError: maximum recursion depth exceeded while decoding a JSON object"]


def test_a_failing_event_bus_never_stops_the_batch() -> None:
    class Exploding:
        def emit(self, event: Any) -> None:
            raise RuntimeError("observer down")

    runtime = chain_runtime()
    runtime.event_bus = Exploding()
    adapter = InMemoryAdapter(runtime, fetch_batch=8)
    runs = [adapter.start_workflow("chain", {"start": i}) for i in range(4)]
    adapter.drain(timeout=10)
    assert [adapter.wait_for_result(r, timeout=1).context["store"] for r in runs] == [[0], [2], [4], [6]]


def test_a_bug_escaping_the_batched_path_never_kills_the_worker() -> None:
    class Buggy(InMemoryAdapter):
        calls = 0

        def _handle_wave(self, segments: Any) -> Any:
            Buggy.calls += 1
            if Buggy.calls == 1:  # half-way through the first wave's bookkeeping
                self._ack_quietly([segments[0][0]])
                raise RuntimeError("a bug")
            return super()._handle_wave(segments)

    adapter = Buggy(chain_runtime(), fetch_batch=8)
    runs = [adapter.start_workflow("chain", {"start": i}) for i in range(4)]
    adapter.drain(timeout=10)  # the batch is handled again job by job
    assert [adapter.wait_for_result(r, timeout=1).context.get("store") for r in runs][1:] == [[2], [4], [6]]
    assert adapter.queue.pending == 0


# --- item 8: a self-referencing subflow -----------------------------------------------------------


def _recursive_runtime(**settings_: Any) -> FlowRuntime:
    runtime = FlowRuntime(**settings_)
    runtime.add_blueprint(create_flow("again").node("start", lambda ctx: 1).subflow("self", "again").edge("start", "self"))
    runtime.add_blueprint(create_flow("plain").node("a", lambda ctx: "ok"))
    return runtime


def test_a_self_referencing_subflow_fails_at_the_depth_bound_in_memory() -> None:
    result = run_bounded("""
        import sys; sys.path.insert(0, "tests")
        from test_hostile_jobs import _recursive_runtime
        result = _recursive_runtime().run("again")
        print(result.status, result.errors[0].node_id)
        print(result.errors[0].message[-200:])
    """, timeout=60, memory_mb=768)
    assert result.ok, result.describe()
    assert result.stdout.startswith("failed self"), result.stdout
    assert "max_subflow_depth=32" in result.stdout and "RecursionError" not in result.stdout


def test_a_self_referencing_subflow_is_no_fork_bomb_when_distributed() -> None:
    result = run_bounded("""
        import sys; sys.path.insert(0, "tests")
        from test_hostile_jobs import _recursive_runtime
        from flowcraft.testing import InMemoryAdapter
        adapter = InMemoryAdapter(_recursive_runtime(max_subflow_depth=6), fetch_batch=8)
        root = adapter.start_workflow("again")
        plain = adapter.start_workflow("plain")
        jobs = adapter.drain(timeout=30)
        result = adapter.wait_for_result(root, timeout=1)
        print(len(adapter.store.run_ids()), jobs, result.status, adapter.wait_for_result(plain, timeout=1).status)
        print([e.node_id for e in result.errors], result.errors[0].message[-150:])
    """, timeout=60, memory_mb=768)
    assert result.ok, result.describe()
    runs, jobs, root_status, plain_status = result.stdout.splitlines()[0].split()
    assert int(runs) == 1 + 6 + 1  # the root, six nested children, the plain run: then it stops
    assert int(jobs) < 100 and root_status == "failed" and plain_status == "completed"
    assert "['self']" in result.stdout and "max_subflow_depth=6" in result.stdout


def test_subflow_depth_is_the_same_in_both_drivers() -> None:
    nested = FlowRuntime(max_subflow_depth=2)
    nested.add_blueprint(create_flow("leaf").node("x", lambda ctx: 1))
    nested.add_blueprint(create_flow("mid").subflow("down", "leaf"))
    nested.add_blueprint(create_flow("top").subflow("down", "mid"))
    nested.add_blueprint(create_flow("roof").subflow("down", "top"))
    assert nested.run("top").status == "completed"  # two levels: within the bound
    in_memory = nested.run("roof")
    adapter = InMemoryAdapter(nested, fetch_batch=8)
    top = adapter.start_workflow("top")
    roof = adapter.start_workflow("roof")
    adapter.drain()
    distributed = adapter.wait_for_result(roof, timeout=1)
    assert adapter.wait_for_result(top, timeout=1).status == "completed"
    assert in_memory.status == distributed.status == "failed"
    assert "max_subflow_depth=2" in in_memory.errors[0].message and "max_subflow_depth=2" in distributed.errors[0].message


# --- item 11: smaller contract gaps ---------------------------------------------------------------


def test_deeply_nested_blueprint_json_is_a_blueprint_error(tmp_path: Any) -> None:
    for text in ("[" * 100_000, '{"id": "x", "nodes": [{"id": "a", "uses": "u", "params": ' + "[" * 500 + "]" * 500 + "}]}"):
        with pytest.raises(BlueprintError, match="nested deeper than"):
            WorkflowBlueprint.from_json(text)
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000)
    from flowcraft.cli import main

    assert main(["validate", str(path)]) == 2


@pytest.mark.parametrize("config, field", [({"retryDelay": float("nan")}, "config.retryDelay"),
                                            ({"timeout": float("inf")}, "config.timeout")])
def test_nan_and_infinity_in_a_blueprint_are_refused_naming_node_and_field(config: Dict[str, Any], field: str) -> None:
    text = json.dumps({"id": "bp", "nodes": [{"id": "a", "uses": "u", "config": config, "params": {"w": [1, -math.inf]}}]})
    with pytest.raises(BlueprintError) as caught:
        WorkflowBlueprint.from_json(text)
    assert f"node 'a': {field}" in str(caught.value) and "node 'a': params.w[1]" in str(caught.value)


def test_blueprint_caps_are_refused_naming_node_field_and_cap() -> None:
    def bp(**config: Any) -> Dict[str, Any]:
        return {"id": "capped", "nodes": [{"id": "a", "uses": "u", "config": config}]}

    cases = [(bp(maxRetries=1_000_000), "node 'a': maxRetries=1000000 is more than the runtime's max_node_attempts=100"),
             (bp(retryDelay=10 ** 12), "node 'a': retryDelay=1000000000000ms is more than the runtime's max_retry_delay=3600 s"),
             (bp(timeout=10 ** 12), "max_node_timeout=86400 s"),
             ({"id": "capped", "nodes": [{"id": "loop", "uses": "loop-controller",
                                          "params": {"condition": "true", "maxIterations": 10 ** 9}}]},
              "node 'loop': params.maxIterations=1000000000 is more than the runtime's max_loop_iterations=10000")]
    for data, message in cases:
        # the lambdas run within this iteration, so they see its `data`
        for attempt in (lambda: FlowRuntime().run(data), lambda: FlowRuntime(blueprints=[data]),  # noqa: B023
                        lambda: InMemoryAdapter(FlowRuntime()).start_workflow(data)):  # noqa: B023
            with pytest.raises(BlueprintError) as caught:
                attempt()
            assert message in str(caught.value)
    FlowRuntime(max_node_attempts=None, blueprints=[bp(maxRetries=1_000_000)])  # a runtime's own choice


def test_first_seen_in_the_future_is_taken_as_now_so_the_job_ends() -> None:
    adapter = InMemoryAdapter(chain_runtime(), fetch_batch=8, version_mismatch_ttl=0.3, version_mismatch_delay=0.05)
    run_id = "mismatch"  # a run of chain@1, which no worker here has
    adapter.store.create_run(*_record_of(run_id))
    adapter.queue.push_raw(json.dumps({"runId": run_id, "blueprintId": "chain", "nodeId": "load", "firstSeen": 1e308}).encode())
    good = adapter.start_workflow("chain", {"start": 5})
    adapter.drain(timeout=10)  # before: put back forever (now - 1e308 never reaches the TTL)
    assert adapter.wait_for_result(good, timeout=1).context["store"] == [10]
    assert len(adapter.queue.dead) == 1 and "version mismatch" in adapter.queue.dead[0][1]


def _record_of(run_id: str) -> Any:
    from flowcraft.ports import RunRecord

    record = RunRecord(run_id, "chain", "1", "running", 1, 1, updated_at=time.time())
    return record, {}, {"load": {"st": "ready", "it": 0}}, []


def test_starting_a_run_with_the_id_of_another_refuses() -> None:
    adapter = batch_adapter()
    adapter.start_workflow("chain", {"start": 1, "secret": "theirs"}, run_id="taken")
    with pytest.raises(ValueError, match="run 'taken' exists already"):
        adapter.start_workflow("chain", {"start": 2}, run_id="taken")
    for bad in ("nul\x00", "x" * 5000, "tab\there"):
        with pytest.raises(ValueError, match="run id"):
            adapter.start_workflow("chain", {"start": 2}, run_id=bad)
    adapter.drain()
    assert adapter.wait_for_result("taken", timeout=1).context["store"] == [2]


# --- item 12: a job naming what its run does not have fails nobody ---------------------------------


def test_forged_identities_are_dead_lettered_without_failing_the_named_run() -> None:
    runtime = chain_runtime()
    runtime.add_blueprint(create_flow("other").node("x", lambda ctx: 1))
    adapter = InMemoryAdapter(runtime, fetch_batch=8)
    victim = adapter.start_workflow("chain", {"start": 4})
    forged = [{"nodeId": "ghost"}, {"blueprintId": "nope"}, {"blueprintId": "other", "nodeId": "x"},
              {"nodeId": "ghost", "iteration": "bad"}, {"blueprintId": "other", "nodeId": "x", "attempt": -1}]
    for fields in forged:
        adapter.queue.push_raw(json.dumps({"runId": victim, "blueprintId": "chain", "nodeId": "load", **fields}).encode())
    adapter.drain()
    assert adapter.wait_for_result(victim, timeout=1).context["store"] == [8]
    assert len(adapter.queue.dead) == len(forged)
    # one with the run's own identity still fails it (SPEC guarantee 4)
    second = adapter.start_workflow("chain", {"start": 4})
    adapter.queue.push_raw(json.dumps({"runId": second, "blueprintId": "chain", "nodeId": "double", "iteration": -1}).encode())
    adapter.drain()
    result = adapter.wait_for_result(second, timeout=1)
    assert result.status == "failed" and result.errors[0].node_id == "double" and "iteration" in result.errors[0].message


# --- the property test: fuzzed payloads against a live worker -------------------------------------

_TEXT = st.text(alphabet=st.characters(codec="utf-8", categories=None), max_size=12) | st.sampled_from(
    ["", "\x00", "a\x00b", "\x1b[31m", "\u202e", "\ud7ff", "\ud800", "\x7f", "\x85", "chain", "load", "double", "store", "TARGET"])
_SCALAR = st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70) | st.floats() | _TEXT
_VALUE = st.recursive(_SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
                      max_leaves=20)
_FIELD = {
    "runId": st.sampled_from(["TARGET", "nobody"]) | _TEXT | _VALUE,
    "blueprintId": st.sampled_from(["chain", "chain", "nope"]) | _TEXT | _VALUE,
    "nodeId": st.sampled_from(CHAIN_NODES) | _TEXT | _VALUE,
    "iteration": st.integers(-2, 3) | _VALUE,
    "attempt": st.integers(-1, 3) | _VALUE,
    "kind": st.sampled_from(["node", "timer", "child", "item", "resume"]) | _VALUE,
    "parent": st.sampled_from(CHAIN_NODES) | _VALUE,
    "index": st.integers(-1, 3) | _VALUE,
    "input": _VALUE,
    "firstSeen": st.floats() | st.integers() | _VALUE,
}


@st.composite
def payloads(draw: Any) -> bytes:
    """Structure, types, sizes, nesting, NUL and control characters; JSON text and raw bytes."""
    shape = draw(st.sampled_from(["job", "job", "job", "nested", "raw", "truncated", "value"]))
    if shape == "raw":
        return draw(st.binary(max_size=200))
    if shape == "value":
        return json.dumps(draw(_VALUE)).encode()
    names = draw(st.sets(st.sampled_from(sorted(_FIELD)), max_size=len(_FIELD)))
    job = {name: draw(_FIELD[name]) for name in sorted(names | {"runId", "blueprintId", "nodeId"}
                                                          if draw(st.booleans()) else names)}
    text = json.dumps(job, ensure_ascii=draw(st.booleans()))
    if shape == "nested":
        depth = draw(st.sampled_from([100, 127, 129, 1100, 50_000]))
        text = text[:-1] + (", " if job else "") + '"input": ' + "[" * depth + "]" * depth + "}"
    if shape == "truncated":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    return text.encode("utf-8", "surrogatepass")


def check_fuzzed(adapter: Any, dead: List[Any], bodies: List[bytes], bystander: str, target: str) -> None:
    """Every fuzzed message was executed legitimately or dead-lettered, the bystander completed,
    and only the target run (whose identity a fuzzed message may carry) may have failed."""
    dead_bodies = [bytes(b) for b in dead]
    for body in bodies:
        if Delivery.parse(body, 0).job is None:
            assert body in dead_bodies, body[:200]
    assert adapter.wait_for_result(bystander, timeout=5).context["store"] == [14]
    for run_id, status in statuses(adapter).items():
        assert status in ("completed", "failed") if run_id == target else status == "completed", (run_id, status)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(payloads(), min_size=1, max_size=6))
def test_fuzzed_payloads_never_crash_a_worker_on_the_fakes(bodies: List[bytes]) -> None:
    adapter = batch_adapter()
    target = adapter.start_workflow("chain", {"start": 1}, run_id="TARGET")
    for body in bodies:
        adapter.queue.push_raw(body)
    bystander = adapter.start_workflow("chain", {"start": 7})
    adapter.drain(timeout=20)  # raises nothing: every guard holds
    assert adapter.queue.pending == 0
    check_fuzzed(adapter, [b for b, _ in adapter.queue.dead], bodies, bystander, target)
    assert all(reason for _, reason in adapter.queue.dead)
