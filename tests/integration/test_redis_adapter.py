"""The Redis adapter (SPEC 7 and 7b) against a real Redis.

Every test has its own key prefix (`redis_prefix`, deleted afterwards with SCAN) and its own queue
name, so tests never see each other's jobs on the shared Redis. Scenario results are compared with
the in-memory runtime (`Flow.run`): SPEC 5 says the semantics are identical.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from typing import Any, Callable, Dict, Iterable, List

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)

from flowcraft import FlowRuntime, NodeContext, create_flow  # noqa: E402
from flowcraft.ports import Job  # noqa: E402
from flowcraft.testing.conformance import WorkerProcess  # noqa: E402
from test_distributed import SCENARIOS, Scenario, make_runtime, run_in_memory  # noqa: E402

pytestmark = pytest.mark.integration

import attrs  # noqa: E402
import redis  # noqa: E402
from flowcraft_redis import (  # noqa: E402
    RedisAdapter, RedisContext, RedisCoordinationStore, RedisRunStore, create_redis_reconciler,
)
from flowcraft_redis.keys import QueueKeys, RunKeys  # noqa: E402
from flowcraft_redis.queue import RedisQueue  # noqa: E402

FINAL = ("completed", "failed", "cancelled", "stalled")


# =================================================================================================
# helpers
# =================================================================================================


class CountingRedis(redis.Redis):
    """A client that logs every round trip: one entry per command, one per pipeline execute."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: List[str] = []
        self.script_names: Dict[str, str] = {}  # sha -> name logged for its EVALSHA

    def name_scripts(self, adapter: Any) -> None:
        for name, script in (("commit.lua", adapter.store._commit), ("load.lua", adapter.store._load),
                             ("promote.lua", adapter.queue._promote)):
            self.script_names[script.sha] = name

    def execute_command(self, *args: Any, **options: Any) -> Any:
        entry = str(args[0])
        if entry == "EVALSHA" and args[1] in self.script_names:
            entry = self.script_names[args[1]]
            if entry == "commit.lua":
                entry += f"x{args[3 + int(args[2])]}"  # how many commits the call carries (its ARGV[1])
        self.log.append(entry)
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        def counted(*a: Any, **k: Any) -> Any:
            self.log.append("PIPELINE[" + ",".join(str(c[0][0]) for c in pipe.command_stack) + "]")
            return execute(*a, **k)

        pipe.execute = counted
        return pipe


@pytest.fixture
def make_adapter(redis_client: Any, redis_prefix: str) -> Iterable[Callable[..., RedisAdapter]]:
    """Build adapters sharing this test's prefix and queue; all are stopped and closed afterwards."""
    queue_name = f"fcq-{uuid.uuid4().hex[:8]}"
    made: List[RedisAdapter] = []

    def make(runtime: FlowRuntime, client: Any = None, **options: Any) -> RedisAdapter:
        options.setdefault("queue_name", queue_name)
        options.setdefault("poll_timeout", 0.2)
        adapter = RedisAdapter(runtime, client if client is not None else redis_client, prefix=redis_prefix, **options)
        made.append(adapter)
        return adapter

    make.queue_name = queue_name  # type: ignore[attr-defined]
    yield make
    for adapter in made:
        adapter.stop(timeout=5)
        try:
            adapter.queue.close()
        except Exception:
            pass


def drain(adapter: RedisAdapter, run_ids: Iterable[str], timeout: float = 60.0) -> None:
    """Work in bursts until every run has left `running` (timers included)."""
    run_ids = list(run_ids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        adapter.work(burst=True)
        statuses = [adapter.get_status(r) for r in run_ids]
        if all(s is not None and s.status != "running" for s in statuses):
            return
        time.sleep(0.02)
    raise TimeoutError(f"runs still running after {timeout}s: {[adapter.get_status(r) for r in run_ids]}")


def queue_is_empty(client: Any, prefix: str, queue_name: str) -> bool:
    keys = QueueKeys(queue_name, prefix)
    processing = list(client.scan_iter(match=keys.ready.replace("*", "\\*") + ":processing:*", count=1000))
    return (client.llen(keys.ready) == 0 and client.zcard(keys.delayed) == 0
            and all(client.llen(p) == 0 for p in processing))


def count_completions(adapter: RedisAdapter) -> Counter:
    """Wrap the store's commit: count, per (run, node, iteration), applied commits marking it done."""
    store = adapter.store
    completions: Counter = Counter()
    commit_many = store.commit_many

    def counted_many(commits: Any) -> List[bool]:
        befores = [store.read_states(c.run_id, list(c.states)) for c in commits]
        results = commit_many(commits)
        for c, before, applied in zip(commits, befores, results):
            if applied:
                for node_id, state in c.states.items():
                    old = before.get(node_id, {})
                    if state.get("st") == "done" and (old.get("st") != "done" or old.get("it") != state.get("it")):
                        completions[(c.run_id, node_id, state.get("it", 0))] += 1
        return results

    store.commit_many = counted_many  # type: ignore[method-assign]
    store.commit = lambda c: counted_many([c])[0]  # type: ignore[method-assign]
    return completions


def run_scenario(make_adapter: Callable[..., RedisAdapter], scenario: Scenario) -> Any:
    flows = scenario.build()
    adapter = make_adapter(make_runtime(flows))
    completions = count_completions(adapter)
    run_id = adapter.start_workflow(flows[0].id, dict(scenario.initial_context))
    drain(adapter, [run_id])
    if scenario.resume is not None:
        paused = adapter.wait_for_result(run_id, timeout=5)
        assert paused.status == "awaiting", (paused.status, paused.errors)
        action, output = scenario.resume
        adapter.resume_with_action(run_id, action, output=output)
        drain(adapter, [run_id])
    return adapter, run_id, adapter.wait_for_result(run_id, timeout=10), completions


def _batch_1000() -> List[Any]:
    return [
        create_flow("batching1000")
        .node("make", lambda ctx: list(range(1000)))
        .batch("square", lambda ctx: {"i": ctx.input, "sq": ctx.input * ctx.input}, input_key="make", output_key="squares")
        .node("total", lambda ctx: sum(item["sq"] for item in ctx.input))
        .edge("make", "square")
        .edge("square", "total")
    ]


REDIS_SCENARIOS = [SCENARIOS[name] for name in (
    "chain", "fan_in", "diamond_even", "diamond_odd", "loop", "subflow", "wait_approve", "wait_reject")]
REDIS_SCENARIOS.append(Scenario("batch_1000", _batch_1000))


# =================================================================================================
# scenarios: Redis == in memory
# =================================================================================================


@pytest.mark.parametrize("scenario", REDIS_SCENARIOS, ids=str)
def test_scenario_matches_in_memory(make_adapter: Any, redis_client: Any, redis_prefix: str, scenario: Scenario) -> None:
    expected = run_in_memory(scenario)
    assert expected.status == "completed", expected.errors
    adapter, run_id, result, completions = run_scenario(make_adapter, scenario)
    assert result.status == "completed", result.errors
    assert result.context == expected.context
    assert sorted(result.skipped) == sorted(expected.skipped)
    assert result.errors == expected.errors
    assert completions and all(n == 1 for n in completions.values()), completions
    assert adapter.queue.dead_letters() == []
    assert queue_is_empty(redis_client, redis_prefix, make_adapter.queue_name)
    # the seed-compatible status key, and the TTL of a finished run
    status = json.loads(redis_client.get(RunKeys(redis_prefix).status(run_id)))
    assert status["status"] == "completed" and status["result"]["context"] == expected.context
    ttl = redis_client.ttl(RunKeys(redis_prefix).record(run_id))
    assert 0 < ttl <= 86400


def test_fan_in_join_fires_once_with_edge_ordered_inputs(make_adapter: Any) -> None:
    adapter, run_id, result, completions = run_scenario(make_adapter, SCENARIOS["fan_in"])
    assert list(result.context["_inputs.sink"]) == [f"w{i}" for i in range(50)]
    assert completions[(run_id, "sink", 0)] == 1
    states = adapter.store.read_all_states(run_id)
    assert all(s["st"] == "done" for s in states.values()), states


def test_batch_of_1000_gathers_in_item_order(make_adapter: Any) -> None:
    _, _, result, _ = run_scenario(make_adapter, Scenario("batch_1000", _batch_1000))
    assert result.context["squares"] == [{"i": i, "sq": i * i} for i in range(1000)]


def test_wait_then_resume_with_action(make_adapter: Any) -> None:
    flows = SCENARIOS["wait_approve"].build()
    adapter = make_adapter(make_runtime(flows))
    run_id = adapter.start_workflow("approval")
    drain(adapter, [run_id])
    paused = adapter.wait_for_result(run_id, timeout=5)
    assert paused.status == "awaiting" and paused.awaiting == ["approve"]
    assert paused.context == flows[0].run(make_runtime(flows)).context
    assert adapter.resume_with_action(run_id, "reject", output={"by": "bob"}) == {"no"}
    drain(adapter, [run_id])
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "completed" and result.skipped == ["yes"]
    assert result.context["done"] == {"rejected": {"by": "bob"}}


def test_a_misspelt_resume_action_is_refused_and_changes_nothing(make_adapter: Any, redis_client: Any,
                                                                  redis_prefix: str) -> None:
    """Issue 17 item 1 (SPEC 11): no edge names 'aprove': ValueError naming the actions, run unchanged."""
    flows = SCENARIOS["wait_approve"].build()
    adapter = make_adapter(make_runtime(flows))
    run_id = adapter.start_workflow("approval")
    drain(adapter, [run_id])

    def stored() -> Any:
        keys = sorted(k for k in redis_client.scan_iter(match=f"{redis_prefix}*", count=1000))
        return {k: redis_client.dump(k) for k in keys}

    before = stored()
    for action in ("aprove", None):
        with pytest.raises(ValueError) as error:
            adapter.resume_with_action(run_id, action, output={"by": "bob"})
        message = str(error.value)
        assert message.startswith(f"run {run_id}: node 'approve' ") and "'approve', 'reject'" in message, message
    assert stored() == before
    assert adapter.resume_with_action(run_id, "approve", output={"by": "bob"}) == {"yes"}
    drain(adapter, [run_id])
    assert adapter.wait_for_result(run_id, timeout=5).context["done"] == {"approved": {"by": "bob"}}


def test_an_edited_blueprint_with_the_same_version_is_put_back_by_the_old_worker(make_adapter: Any) -> None:
    """Issue 17 item 4: the run records its blueprint's digest; a worker with another one never runs it."""
    from test_blueprint_digest import order
    from flowcraft.blueprint import blueprint_digest

    calls: List[str] = []
    new = make_adapter(make_runtime([order(True, calls)]), version_mismatch_delay=0.0)
    old = make_adapter(make_runtime([order(False, calls)]), version_mismatch_delay=0.0)
    run_id = new.start_workflow("order")
    record = old.store.get_record(run_id)  # read back through Redis: the digest is stored
    assert record.blueprint_digest == blueprint_digest(new.runtime.blueprint("order"))
    assert old.work(max_jobs=2) == 2
    assert calls == [] and old.queue.dead_letters() == []
    drain(new, [run_id])
    assert (new.wait_for_result(run_id, timeout=5).status, calls) == ("completed", ["ship new", "bill new"])


# =================================================================================================
# sleep, cancel
# =================================================================================================


def test_short_sleep_completes_while_the_worker_serves_another_run(make_adapter: Any) -> None:
    sleeper = (
        create_flow("sleeper")
        .node("a", lambda ctx: "woke")
        .sleep("nap", duration=0.5)
        .node("b", lambda ctx: {"after_nap": ctx.input})
        .edge("a", "nap")
        .edge("nap", "b")
    )
    quick = create_flow("quick").node("q", lambda ctx: "quick")
    adapter = make_adapter(make_runtime([sleeper, quick]))
    adapter.start()
    slow_run = adapter.start_workflow("sleeper")
    time.sleep(0.15)
    assert adapter.get_status(slow_run).status == "running"
    quick_run = adapter.start_workflow("quick")
    assert adapter.wait_for_result(quick_run, timeout=5).status == "completed"
    assert adapter.get_status(slow_run).status == "running"  # the later run finished first
    result = adapter.wait_for_result(slow_run, timeout=10)
    expected = sleeper.run(make_runtime([sleeper]), wait_timers=True)
    assert result.status == "completed", result.errors
    assert result.context == expected.context


def test_cancel_ends_the_run_and_drops_its_remaining_jobs(make_adapter: Any, redis_client: Any, redis_prefix: str) -> None:
    ran: List[str] = []
    flow = (
        create_flow("cancellable")
        .node("a", lambda ctx: ran.append("a") or 1)
        .sleep("nap", duration=0.3)
        .node("b", lambda ctx: ran.append("b") or 2)
        .edge("a", "nap")
        .edge("nap", "b")
    )
    adapter = make_adapter(make_runtime([flow]))
    run_id = adapter.start_workflow("cancellable")
    adapter.work(burst=True)
    assert ran == ["a"] and adapter.get_status(run_id).status == "running"
    adapter.cancel(run_id)
    assert adapter.get_status(run_id).status == "cancelled"
    time.sleep(0.4)
    adapter.work(burst=True)  # the timer comes due and is dropped
    assert ran == ["a"]
    assert adapter.wait_for_result(run_id, timeout=5).status == "cancelled"
    status = json.loads(redis_client.get(RunKeys(redis_prefix).status(run_id)))
    assert status["status"] == "cancelled"
    assert queue_is_empty(redis_client, redis_prefix, make_adapter.queue_name)


# =================================================================================================
# faults: lost jobs, duplicates, malformed jobs
# =================================================================================================


def test_reconciler_re_enqueues_a_lost_job(make_adapter: Any, redis_client: Any, redis_prefix: str) -> None:
    flows = SCENARIOS["chain"].build()
    adapter = make_adapter(make_runtime(flows))
    run_id = adapter.start_workflow("chain", {"start": 21})
    adapter.work(max_jobs=1)
    ready = QueueKeys(make_adapter.queue_name, redis_prefix).ready
    assert redis_client.delete(ready) == 1  # the next job is lost
    adapter.work(burst=True)
    assert adapter.get_status(run_id).status == "running"
    before = adapter.store.get_record(run_id)
    stats = create_redis_reconciler(adapter, redis_client, stalled_threshold_seconds=0, scan_count=10).run()
    assert stats.scanned >= 1 and stats.stalled >= 1 and stats.reconciled >= 1 and stats.failed == 0
    after = adapter.store.get_record(run_id)
    assert after.version == before.version and after.updated_at > before.updated_at  # touched, not committed
    drain(adapter, [run_id])
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "completed"
    assert result.context == run_in_memory(SCENARIOS["chain"]).context
    # a finished run is no longer idle
    stats = create_redis_reconciler(adapter, redis_client, stalled_threshold_seconds=0).run()
    assert stats.stalled == 0


def test_a_job_pushed_twice_commits_once(make_adapter: Any, redis_client: Any, redis_prefix: str) -> None:
    executed: Counter = Counter()
    flow = (
        create_flow("dup")
        .node("a", lambda ctx: executed.update(["a"]) or 1)
        .node("b", lambda ctx: executed.update(["b"]) or ctx.input + 1)
        .edge("a", "b")
    )
    adapter = make_adapter(make_runtime([flow]))
    completions = count_completions(adapter)
    run_id = adapter.start_workflow("dup")
    ready = QueueKeys(make_adapter.queue_name, redis_prefix).ready
    body = redis_client.lindex(ready, 0)
    redis_client.lpush(ready, body)  # delivered twice
    adapter.work(max_jobs=1)
    adapter.queue.enqueue([Job(run_id, "dup", "b")])  # and a duplicate of the successor
    drain(adapter, [run_id])
    assert adapter.wait_for_result(run_id, timeout=5).context["b"] == 2
    assert executed == Counter({"a": 1, "b": 1})
    assert completions == Counter({(run_id, "a", 0): 1, (run_id, "b", 0): 1})
    assert queue_is_empty(redis_client, redis_prefix, make_adapter.queue_name)


def test_malformed_jobs_are_dead_lettered_and_the_worker_goes_on(make_adapter: Any, redis_client: Any, redis_prefix: str) -> None:
    flows = SCENARIOS["chain"].build()
    adapter = make_adapter(make_runtime(flows))
    queue = adapter.queue
    queue.push_raw(b"not json at all")
    queue.push_raw(b'{"runId": "r1"}')
    queue.push_raw(b'{"runId": "bad id", "blueprintId": "chain", "nodeId": "load"}')
    queue.push_raw(b'{"runId": "r2", "blueprintId": "nope", "nodeId": "x"}')
    run_id = adapter.start_workflow("chain", {"start": 21})
    drain(adapter, [run_id])
    assert adapter.wait_for_result(run_id, timeout=5).status == "completed"
    dead = queue.dead_letters()
    reasons = sorted(d["reason"] for d in dead)
    assert len(dead) == 4, dead
    assert any("malformed job: not valid JSON" in r for r in reasons)
    assert any("missing or empty field" in r for r in reasons)
    assert any("unknown run 'bad id'" in r for r in reasons)
    assert any("unknown blueprint 'nope'" in r for r in reasons)
    assert {d["body"] for d in dead} >= {"not json at all", '{"runId": "r1"}'}
    assert redis_client.llen(QueueKeys(make_adapter.queue_name, redis_prefix).dead) == 4
    assert queue_is_empty(redis_client, redis_prefix, make_adapter.queue_name)


def test_a_run_started_the_seed_way_completes(make_adapter: Any, redis_client: Any, redis_prefix: str) -> None:
    flow = (
        create_flow("seeded")
        .node("read", lambda ctx: {"name": ctx.context.get("name"), "count": ctx.context.get("count"),
                                   "obj": ctx.context.get("obj")})
        .node("shout", lambda ctx: ctx.input["name"].upper() * ctx.input["count"])
        .edge("read", "shout")
    )
    adapter = make_adapter(make_runtime([flow]))
    run_id = str(uuid.uuid4())
    # what the seed client does: hset(key, initialContext) with raw strings, then enqueue the start jobs
    redis_client.hset(RunKeys(redis_prefix).context(run_id), mapping={"name": "ann", "count": "2", "obj": '{"a": 1}'})
    redis_client.lpush(QueueKeys(make_adapter.queue_name, redis_prefix).ready,
                       json.dumps({"runId": run_id, "blueprintId": "seeded", "nodeId": "read"}))
    assert adapter.get_status(run_id).status == "running"
    drain(adapter, [run_id])
    result = adapter.wait_for_result(run_id, timeout=5)
    expected = flow.run(make_runtime([flow]), {"name": "ann", "count": 2, "obj": {"a": 1}})
    assert result.status == "completed", result.errors
    assert result.context == expected.context
    assert result.context["shout"] == "ANNANN"
    status = json.loads(redis_client.get(RunKeys(redis_prefix).status(run_id)))
    assert status["status"] == "completed" and status["result"]["context"]["shout"] == "ANNANN"
    assert RedisContext(redis_client, run_id, redis_prefix).get("name") == "ann"


# =================================================================================================
# round trips per node
# =================================================================================================


def _counted_chain_run(make_adapter: Any, redis_url: str, length: int = 20) -> List[List[str]]:
    flow = create_flow("rtchain")
    for i in range(length):
        flow.node(f"n{i}", lambda ctx: (ctx.input or 0) + 1)
        if i:
            flow.edge(f"n{i - 1}", f"n{i}")
    client = CountingRedis.from_url(redis_url)
    adapter = make_adapter(make_runtime([flow]), client)
    client.name_scripts(adapter)
    run_id = adapter.start_workflow("rtchain")
    adapter.queue.recover_dead_workers()
    adapter.queue.requeue_own()  # start-up work done: only node processing from here on
    adapter.queue._started = True
    per_node: List[List[str]] = []
    fetch, handle = adapter.queue.fetch, adapter.handle
    pending: List[str] = []

    def counted_fetch(*a: Any, **k: Any) -> Any:
        start = len(client.log)
        out = fetch(*a, **k)
        pending[:] = client.log[start:]
        return out

    def counted_handle(delivery: Any) -> None:
        start = len(client.log)
        handle(delivery)
        per_node.append(pending[:] + client.log[start:])

    adapter.queue.fetch = counted_fetch  # type: ignore[method-assign]
    adapter.handle = counted_handle  # type: ignore[method-assign]
    adapter.work(max_jobs=length)
    assert adapter.wait_for_result(run_id, timeout=5).status == "completed"
    client.close()
    return per_node


def test_round_trips_per_chain_node_are_load_and_commit(make_adapter: Any, redis_url: str) -> None:
    """2 round trips per plain chain node: load (EVALSHA load.lua) and commit (EVALSHA commit.lua:
    it acks the delivery, pushes the successor's job and takes the worker's next jobs, so ack,
    publish_outbox and the next fetch cost nothing). Only the first fetch of the worker loop is a
    round trip of its own (EVALSHA promote.lua); the last node, which ends the run, loaded the
    whole run at once, so its result costs no extra read."""
    per_node = _counted_chain_run(make_adapter, redis_url)
    assert per_node[0] == ["promote.lua", "load.lua", "commit.luax1"], per_node[0]
    for trips in per_node[1:]:
        assert trips == ["load.lua", "commit.luax1"], trips


def test_at_most_three_round_trips_per_chain_node(make_adapter: Any, redis_url: str) -> None:
    per_node = _counted_chain_run(make_adapter, redis_url)
    assert max(len(t) for t in per_node[:-1]) <= 3, per_node[:3]


def test_a_batched_worker_needs_well_under_one_round_trip_per_node(make_adapter: Any, redis_url: str) -> None:
    """With `fetch_batch`, one fetch, one load and one commit script call serve a wave of jobs of
    different runs: 10 concurrent chains cost 3 round trips per 10 node executions."""
    runs, length = 10, 5
    flow = create_flow("rtbatch")
    for i in range(length):
        flow.node(f"n{i}", lambda ctx: (ctx.input or 0) + 1)
        if i:
            flow.edge(f"n{i - 1}", f"n{i}")
    client = CountingRedis.from_url(redis_url)
    adapter = make_adapter(make_runtime([flow]), client, fetch_batch=runs)
    client.name_scripts(adapter)
    run_ids = [adapter.start_workflow("rtbatch") for _ in range(runs)]
    adapter.queue.recover_dead_workers()
    adapter.queue.requeue_own()
    adapter.queue._started = True
    start = len(client.log)
    assert adapter.work(max_jobs=runs * length) == runs * length
    trips = client.log[start:]
    for run_id in run_ids:
        result = adapter.wait_for_result(run_id, timeout=5)
        assert result.status == "completed" and result.context[f"n{length - 1}"] == length
    client.close()
    assert len(trips) <= 2 * length + 1, trips
    assert trips.count(f"commit.luax{runs}") >= length - 1, trips
    assert trips.count("load.lua") <= length + 1, trips
    assert trips.count("promote.lua") <= 2, trips  # the commits take the next waves' jobs


def test_jobs_taken_with_commits_are_given_back_when_the_worker_loop_returns(make_adapter: Any, redis_client: Any) -> None:
    """A commit takes the worker's next jobs; those `work()` did not get to are put back on the
    ready list when it returns, and another worker finishes every run, each node once."""
    runs, length = 6, 5
    executed: Counter = Counter()
    flow = create_flow("giveback")
    for i in range(length):
        flow.node(f"n{i}", (lambda name: lambda ctx: executed.update([(ctx.run_id, name)]) or (ctx.input or 0) + 1)(f"n{i}"))
        if i:
            flow.edge(f"n{i - 1}", f"n{i}")
    first = make_adapter(make_runtime([flow]), fetch_batch=runs)
    run_ids = [first.start_workflow("giveback") for _ in range(runs)]
    assert first.work(max_jobs=runs + 2) == runs + 2  # the first wave's commits took the second wave
    assert redis_client.llen(first.queue.processing_key) == 0
    assert first.queue._stash == [] and first.queue.prefetch == 0
    second = make_adapter(make_runtime([flow]), fetch_batch=runs)
    assert second.work(burst=True) == runs * length - (runs + 2)
    for run_id in run_ids:
        result = second.wait_for_result(run_id, timeout=5)
        assert result.status == "completed" and result.context[f"n{length - 1}"] == length
    assert sorted(executed.values()) == [1] * (runs * length)


# =================================================================================================
# coordination store
# =================================================================================================


def test_coordination_store(redis_client: Any, redis_prefix: str) -> None:
    store = RedisCoordinationStore(redis_client, redis_prefix)
    assert store.increment("join:x", 10) == 1
    assert store.increment("join:x", 10) == 2
    assert 0 < redis_client.pttl(store.key("join:x")) <= 10_000
    assert store.set_if_not_exist("lock", "me", 5) is True
    assert store.set_if_not_exist("lock", "you", 5) is False
    assert store.get("lock") == "me"
    assert store.extend_ttl("lock", 60) is True and redis_client.ttl(store.key("lock")) > 5
    assert store.extend_ttl("missing", 60) is False
    store.delete("lock")
    assert store.get("lock") is None
    assert store.set_if_not_exist("short", "v", 0.05) is True
    time.sleep(0.1)
    assert store.get("short") is None
    with pytest.raises(ValueError, match="bad key"):
        store.get("bad key")


def test_coordination_keys_are_the_keys_given(redis_client: Any, redis_prefix: str) -> None:
    """SPEC 7: as Flowcraft TS's store, no namespace of ours; a prefix given is used verbatim."""
    prefixed = RedisCoordinationStore(redis_client, redis_prefix)
    assert prefixed.increment("lock:a", 10) == 1
    assert redis_client.get(redis_prefix + "lock:a") == b"1"
    assert sorted(redis_client.scan_iter(match=redis_prefix + "*")) == [(redis_prefix + "lock:a").encode()]
    plain = RedisCoordinationStore(redis_client)  # default: no prefix at all
    key = redis_prefix + "plain:b"  # a key of this test's own (the fixture deletes it)
    assert plain.set_if_not_exist(key, "me", 10) is True
    assert redis_client.get(key) == b"me"
    assert not any(b"flowcraft:coord:" in k for k in redis_client.scan_iter(match=redis_prefix + "*"))


def test_coordination_store_shares_keys_with_a_flowcraft_ts_service(redis_client: Any, redis_prefix: str) -> None:
    """Each method against what Flowcraft TS's RedisCoordinationStore (ioredis) sends for the same
    name: ``INCR`` + ``EXPIRE``, ``SET k v EX ttl NX``, ``EXPIRE``, ``DEL``, ``GET``."""
    store = RedisCoordinationStore(redis_client)
    lock, counter = redis_prefix + "lock:order-1", redis_prefix + "join:run-1:sink"
    # the TS service takes the lock first: Python sees it, cannot take it, reads its holder
    assert redis_client.set(lock, "ts-worker", ex=30, nx=True)
    assert store.set_if_not_exist(lock, "py-worker", 30) is False
    assert store.get(lock) == "ts-worker"
    assert store.extend_ttl(lock, 120) is True and 30 < redis_client.ttl(lock) <= 120
    store.delete(lock)
    assert redis_client.exists(lock) == 0
    assert store.set_if_not_exist(lock, "py-worker", 5) is True  # NX with the TTL, as TS
    assert redis_client.get(lock) == b"py-worker" and 0 < redis_client.pttl(lock) <= 5000
    assert redis_client.set(lock, "ts-worker", ex=30, nx=True) is None  # and TS now cannot take it
    # a join counter incremented from both sides: one count, the TTL (re)set by each increment
    assert redis_client.incr(counter) == 1 and redis_client.expire(counter, 2)
    assert store.increment(counter, 60) == 2 and 2 < redis_client.ttl(counter) <= 60
    assert redis_client.incr(counter) == 3 and store.get(counter) == "3"
    assert store.extend_ttl(redis_prefix + "missing", 10) is False and store.get(redis_prefix + "missing") is None


# =================================================================================================
# a worker process SIGKILLed mid-run
# =================================================================================================

KILL_CHAIN = 200


def kill_flow() -> Any:
    """A 200-node chain of short sleeps; each node INCRs a counter keyed by its idempotency key."""
    def step(ctx: NodeContext) -> Any:
        client = ctx.dependencies["redis"]
        client.incr(ctx.dependencies["prefix"] + "sidefx:" + ctx.idempotency_key)
        time.sleep(0.01)
        return (ctx.input or 0) + 1

    flow = create_flow("killchain")
    for i in range(KILL_CHAIN):
        flow.node(f"k{i}", step)
        if i:
            flow.edge(f"k{i - 1}", f"k{i}")
    return flow


def worker_main(redis_url: str, prefix: str, queue_name: str) -> None:
    """The body of a worker subprocess (started with `python -c`)."""
    client = redis.Redis.from_url(redis_url)
    flow = kill_flow()
    runtime = FlowRuntime(dependencies={"redis": client, "prefix": prefix})
    runtime.add_blueprint(flow)
    adapter = RedisAdapter(runtime, client, queue_name=queue_name, prefix=prefix, heartbeat_ttl=1.0,
                           recover_interval=0.3, poll_timeout=0.2)
    store, commit, commit_many = adapter.store, adapter.store.commit, adapter.store.commit_many

    def note(c: Any) -> None:  # count committed completions (a kill right after may lose a count, never add one)
        for node_id, state in c.states.items():
            if state.get("st") == "done":
                client.incr(f"{prefix}commits:{c.run_id}:{node_id}:{state.get('it', 0)}")

    def counted(c: Any) -> bool:
        applied = commit(c)
        if applied:
            note(c)
        return applied

    def counted_many(commits: Any) -> List[bool]:  # a wave's, or a committer thread's round
        applied = commit_many(commits)
        for c, ok in zip(commits, applied):
            if ok:
                note(c)
        return applied

    store.commit, store.commit_many = counted, counted_many
    adapter.work()


def _start_worker(redis_url: str, prefix: str, queue_name: str) -> WorkerProcess:
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import test_redis_adapter as t; "
            f"t.worker_main({redis_url!r}, {prefix!r}, {queue_name!r})")
    return WorkerProcess([sys.executable, "-c", code], "redis-worker", cwd=ROOT)


def test_worker_sigkilled_mid_run_loses_nothing(make_adapter: Any, redis_client: Any, redis_prefix: str, redis_url: str) -> None:
    flow = kill_flow()
    runtime = FlowRuntime(dependencies={"redis": redis_client, "prefix": redis_prefix})
    runtime.add_blueprint(flow)
    client_adapter = make_adapter(runtime)
    queue_name = make_adapter.queue_name
    workers = [_start_worker(redis_url, redis_prefix, queue_name) for _ in range(2)]
    try:
        run_id = client_adapter.start_workflow("killchain")
        deadline = time.monotonic() + 60
        while len(redis_client.hgetall(RunKeys(redis_prefix).states(run_id))) < 40:
            assert time.monotonic() < deadline, "the workers made no progress"
            assert all(w.alive() for w in workers), [w.stderr() for w in workers if not w.alive()]
            time.sleep(0.02)
        workers[0].kill()
        workers.append(_start_worker(redis_url, redis_prefix, queue_name))
        result = client_adapter.wait_for_result(run_id, timeout=120)
    finally:
        for w in workers:
            w.close()
    assert result.status == "completed", result.errors
    assert result.context["k199"] == KILL_CHAIN
    assert result.context == flow.run(runtime).context
    states = client_adapter.store.read_all_states(run_id)
    assert len(states) == KILL_CHAIN and all(s == {"it": 0, "st": "done"} for s in states.values()), states
    commits = {k: int(redis_client.get(k)) for k in redis_client.scan_iter(match=f"{redis_prefix}commits:*", count=1000)}
    assert commits and max(commits.values()) == 1, {k: v for k, v in commits.items() if v > 1}
    assert len(commits) >= KILL_CHAIN - 1  # a kill just after a commit may lose one count, never add one
    side = {k: int(redis_client.get(k)) for k in redis_client.scan_iter(match=f"{redis_prefix}sidefx:{run_id}:*", count=1000)}
    assert len(side) == KILL_CHAIN  # one idempotency key per node execution, stable across redelivery
    assert sum(side.values()) - KILL_CHAIN <= 1  # only the job in the killed worker's hands ran twice
    assert queue_is_empty(redis_client, redis_prefix, queue_name)


# =================================================================================================
# a Redis restart
# =================================================================================================


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_server(port: int, data_dir: str) -> None:
    subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                    "--appendfsync", "always", "--dir", data_dir, "--daemonize", "yes",
                    "--logfile", os.path.join(data_dir, "redis.log")], check=True, stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    client.close()


def test_worker_survives_a_redis_restart(redis_url: str) -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli are not installed")
    port = _free_port()
    data_dir = tempfile.mkdtemp(prefix="fc-redis-")
    _redis_server(port, data_dir)
    url = f"redis://127.0.0.1:{port}/0"
    flow = create_flow("restart")
    for i in range(60):
        flow.node(f"r{i}", lambda ctx: time.sleep(0.02) or (ctx.input or 0) + 1)
        if i:
            flow.edge(f"r{i - 1}", f"r{i}")
    adapter = RedisAdapter(make_runtime([flow]), url, queue_name="restartq", poll_timeout=0.2)
    try:
        adapter.start()
        run_id = adapter.start_workflow("restart")
        client = redis.Redis(port=port)
        while len(client.hgetall(RunKeys().states(run_id))) < 15:
            time.sleep(0.01)
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], check=False, capture_output=True)
        time.sleep(1.0)  # the worker sees the outage and backs off
        assert adapter._thread is not None and adapter._thread.is_alive()
        _redis_server(port, data_dir)
        deadline = time.monotonic() + 60
        while True:
            try:
                result = adapter.wait_for_result(run_id, timeout=1)
                break
            except (TimeoutError, ConnectionError):
                assert time.monotonic() < deadline, "the run did not finish after the restart"
        assert result.status == "completed", result.errors
        assert result.context == flow.run(make_runtime([flow])).context
        states = adapter.store.read_all_states(run_id)
        assert all(s["st"] == "done" for s in states.values()) and len(states) == 60
    finally:
        adapter.stop(timeout=5)
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], check=False, capture_output=True)
        shutil.rmtree(data_dir, ignore_errors=True)


# =================================================================================================
# commits send only the record fields that changed
# =================================================================================================


def test_commits_write_only_changed_record_fields_and_stay_right_across_stores(redis_client: Any, redis_prefix: str) -> None:
    """A store remembers the record it read or wrote at a version, so a commit expecting that
    version sends only the changed fields; a second store committing in between makes the first
    one's next commit fail its version check (nothing written), and a fresh load is whole again."""
    from flowcraft.ports import Commit, RunRecord

    one = RedisRunStore(redis_client, redis_prefix, queue_name="fcq-fields")
    two = RedisRunStore(redis_client, redis_prefix, queue_name="fcq-fields")
    record = RunRecord("r1", "bp", "1", "running", 1, outstanding=1, updated_at=1.0)
    assert one.create_run(record, {"x": 1}, {}, [])

    def fields_sent(store: RedisRunStore, commit: Commit) -> int:
        _keys, args, _acks = store._commit_call(commit)
        assert args[1:3] == [0, 0]  # a run commit: no guards, no unset items
        return int(args[5])  # the count of record field/value pairs

    snap = one.load("r1", [], [])
    commit = Commit("r1", 1, attrs.evolve(snap.record, outstanding=2, updated_at=2.0))
    assert fields_sent(one, commit) == 2  # outstanding, updated_at: the rest is as read
    assert one.commit(commit)
    snap_two = two.load("r1", [], [])
    errors = [{"nodeId": "a", "message": "boom"}]
    assert two.commit(Commit("r1", 2, attrs.evolve(snap_two.record, errors=errors, awaiting={"w": {"type": "wait"}},
                                                    updated_at=3.0)))
    stale = Commit("r1", 2, attrs.evolve(snap.record, outstanding=3, updated_at=4.0))
    assert not one.commit(stale)  # version 3 now: refused, nothing written
    fresh = one.load("r1", [], []).record
    assert (fresh.version, fresh.outstanding, fresh.errors, fresh.awaiting) == (3, 2, errors, {"w": {"type": "wait"}})
    assert one.commit(Commit("r1", 3, attrs.evolve(fresh, awaiting={}, updated_at=5.0)))
    final = two.load("r1", [], []).record
    assert (final.version, final.outstanding, final.errors, final.awaiting, final.updated_at) == (4, 2, errors, {}, 5.0)
    assert (final.blueprint_id, final.blueprint_version, final.status) == ("bp", "1", "running")


# =================================================================================================
# a dead worker found by its connection (SPEC section 10)
# =================================================================================================

HOLDER = """
import sys, time, redis
sys.path[:0] = [{root!r}, {adapters!r}]
from flowcraft_redis.queue import RedisQueue
queue = RedisQueue(redis.Redis.from_url({url!r}), {queue!r}, "victim-1", {prefix!r}, heartbeat_ttl=60.0)
held = queue.fetch(2, timeout=1.0)
print(len(held), flush=True)
time.sleep(120)
"""


def test_a_killed_workers_jobs_come_back_at_once_though_its_heartbeat_lives(redis_client: Any, redis_prefix: str,
                                                                             redis_url: str) -> None:
    """The victim's heartbeat lasts 60 s; its registered connection is gone the moment it dies."""
    queue_name = f"q{uuid.uuid4().hex[:8]}"
    live = RedisQueue(redis.Redis.from_url(redis_url), queue_name, "survivor-1", redis_prefix)
    live.enqueue([Job("r1", "b", "n1"), Job("r2", "b", "n1")])
    code = HOLDER.format(root=ROOT, adapters=os.path.join(ROOT, "adapters"), url=redis_url, queue=queue_name,
                         prefix=redis_prefix)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "2", proc.stderr.read() if proc.stderr else ""
        keys = QueueKeys(queue_name, redis_prefix)
        assert redis_client.hexists(keys.clients, "victim-1")
        assert live.recover_dead_workers() == 0  # alive: nothing is taken from it
        assert redis_client.llen(keys.processing("victim-1")) == 2
    finally:
        proc.kill()
        proc.wait(10)
    assert redis_client.exists(QueueKeys(queue_name, redis_prefix).heartbeat("victim-1"))  # the fallback would wait
    deadline = time.monotonic() + 5
    moved = 0
    while moved < 2 and time.monotonic() < deadline:  # Redis notices the closed socket at once; allow a moment
        moved += live.recover_dead_workers()
    assert moved == 2
    assert sorted(d.job.run_id for d in live.fetch(2, timeout=0) if d.job) == ["r1", "r2"]
    assert not redis_client.hexists(QueueKeys(queue_name, redis_prefix).clients, "victim-1")
    live.close()
    live.client.close()


@pytest.mark.parametrize("name", ["fan_in", "batch", "diamond_even", "loop", "subflow", "wait_approve", "chain"])
def test_a_worker_with_threads_matches_in_memory(make_adapter: Any, redis_client: Any, redis_prefix: str,
                                                 name: str) -> None:
    """`threads=4`: four threads share the client, the processing list and the stash of jobs taken
    with commits; every node is committed once and the run ends as in memory."""
    scenario = SCENARIOS[name]
    expected = run_in_memory(scenario)
    flows = scenario.build()
    adapter = make_adapter(make_runtime(flows), threads=4)
    completions = count_completions(adapter)
    run_ids = [adapter.start_workflow(flows[0].id, dict(scenario.initial_context)) for _ in range(3)]
    drain(adapter, run_ids)
    if scenario.resume is not None:
        action, output = scenario.resume
        for run_id in run_ids:
            assert adapter.wait_for_result(run_id, timeout=5).status == "awaiting"
            adapter.resume_with_action(run_id, action, output=output)
        drain(adapter, run_ids)
    for run_id in run_ids:
        result = adapter.wait_for_result(run_id, timeout=10)
        assert result.status == expected.status, result.errors
        assert result.context == expected.context
    assert completions and all(n == 1 for n in completions.values()), completions
    assert adapter.queue.dead_letters() == []
    assert queue_is_empty(redis_client, redis_prefix, make_adapter.queue_name)


def _barrier_fan(width: int) -> Any:
    barrier = __import__("threading").Barrier(width, timeout=15)

    def meet(ctx: NodeContext) -> int:
        barrier.wait()  # completes only if `width` of them run at once
        return 1

    flow = create_flow(f"barrier{width}").node("start", lambda ctx: 0).node("end", lambda ctx: sorted(ctx.input.values()))
    for i in range(width):
        flow.node(f"m{i}", meet).edge("start", f"m{i}").edge(f"m{i}", "end")
    return flow


def test_idle_workers_get_the_rest_of_a_fan_out_of_slow_nodes(make_adapter: Any) -> None:
    """Three one-thread workers, a fan-out of three nodes that wait for each other: the worker that
    commits the start node holds one of them, not all three (SPEC section 10's fetch policy)."""
    flow = _barrier_fan(3)
    workers = [make_adapter(make_runtime([flow])) for _ in range(3)]
    for worker in workers:
        worker.start()
    result = workers[0].wait_for_result(workers[0].start_workflow(flow.id), timeout=30)
    assert result.status == "completed", result.errors
    assert result.context["end"] == [1, 1, 1]
