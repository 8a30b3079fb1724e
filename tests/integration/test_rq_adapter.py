"""`RqAdapter` (SPEC 7 and 7b): Flowcraft jobs as RQ jobs, against a real Redis.

Runs are executed by `RqAdapter.work()` (an RQ SimpleWorker in this process) and by stock
``rq worker`` processes (the RQ command line from the venv with our worker class, `FlowcraftWorker`,
or RQ's own, told the app with ``FLOWCRAFT_APP``;
this module is that app: `rq_app`). Scenario results are compared with the in-memory runtime.

Isolation: every test has its own key prefix (`redis_prefix`, deleted afterwards) and its own RQ
queue name (`rq_queue`); RQ keeps its keys under ``rq:``, so `delete_rq_queue` removes every
``rq:*<queue name>*`` key (the queue, its registries, its jobs, whose ids embed the queue name, its
workers) and the queue's entries in RQ's global sets.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from flowcraft import FlowRuntime, NodeContext, create_flow  # noqa: E402
from flowcraft.ports import Job  # noqa: E402
from test_distributed import (  # noqa: E402
    SCENARIOS, Scenario, _make_worker, assert_same_result, make_runtime, run_in_memory,
)

pytestmark = pytest.mark.integration

import redis  # noqa: E402
import rq  # noqa: E402
from rq.job import Job as RqJob  # noqa: E402
from rq.registry import StartedJobRegistry  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from flowcraft_redis import RqAdapter, create_redis_reconciler  # noqa: E402
from flowcraft_redis.keys import RunKeys  # noqa: E402
from flowcraft_redis.rq_adapter import RUN_NODE  # noqa: E402
from flowcraft_redis.rq_queue import Entry  # noqa: E402
from flowcraft_redis.store import RedisRunStore  # noqa: E402

RQ_CLI = os.path.join(os.path.dirname(sys.executable), "rq")
REDIS_URL_DEFAULT = "redis://127.0.0.1:6379/0"
FAN = 20
BATCH = 50


# =================================================================================================
# the app: flows for the scenarios, also imported by `rq worker` processes (FLOWCRAFT_APP)
# =================================================================================================


def _fan20() -> List[Any]:
    flow = create_flow("fan20").node("src", lambda ctx: 3)
    for i in range(FAN):
        flow.node(f"w{i}", _make_worker(i)).edge("src", f"w{i}").edge(f"w{i}", "sink")
    flow.node("sink", lambda ctx: {"keys": list(ctx.input), "total": sum(ctx.input.values())})
    return [flow]


def _batch50() -> List[Any]:
    return [
        create_flow("batch50")
        .node("make", lambda ctx: list(range(BATCH)))
        .batch("square", lambda ctx: {"i": ctx.input, "sq": ctx.input * ctx.input}, input_key="make",
               output_key="squares")
        .node("total", lambda ctx: sum(item["sq"] for item in ctx.input))
        .edge("make", "square")
        .edge("square", "total")
    ]


def _nap() -> List[Any]:
    return [
        create_flow("nap1s")
        .node("before", lambda ctx: {"t": "before"})
        .sleep("nap", duration=1)
        .node("after", lambda ctx: {"slept_with": ctx.input})
        .edge("before", "nap")
        .edge("nap", "after")
    ]


def _redis_from_env() -> Any:
    return redis.Redis.from_url(os.environ.get("REDIS_URL") or REDIS_URL_DEFAULT)


def _hold(ctx: NodeContext) -> Any:
    """Marks that it started (a Redis list named in the context), then blocks while a flag key
    named in the context exists. Without those keys in Redis (in memory) it returns at once."""
    started, flag = ctx.context.get("startedKey"), ctx.context.get("holdKey")
    client = _redis_from_env()
    try:
        client.rpush(started, str(os.getpid()))
        deadline = time.monotonic() + 60
        while client.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.close()
    return {"held": ctx.input}


def _holding() -> List[Any]:
    return [
        create_flow("holding")
        .node("first", lambda ctx: 1)
        .node("hold", _hold)
        .node("last", lambda ctx: {"after": ctx.input})
        .edge("first", "hold")
        .edge("hold", "last")
    ]


SCENARIO_LIST = [
    SCENARIOS["chain"],
    Scenario("fan20", _fan20),
    SCENARIOS["diamond_even"],  # if/else merging into an `all` join
    SCENARIOS["diamond_odd"],
    SCENARIOS["loop"],
    Scenario("batch50", _batch50),
    SCENARIOS["subflow"],
    SCENARIOS["wait_approve"],
    SCENARIOS["wait_reject"],
]
SUBPROCESS_SCENARIOS = ["chain", "fan20", "diamond_odd", "loop", "batch50", "subflow", "wait_approve"]
BY_NAME = {s.name: s for s in SCENARIO_LIST}


def rq_app() -> FlowRuntime:
    """Every flow of this module (``FLOWCRAFT_APP=test_rq_adapter:rq_app`` for `rq worker`)."""
    flows: Dict[str, Any] = {}
    for build in [s.build for s in SCENARIO_LIST] + [_nap, _holding]:
        for flow in build():
            flows.setdefault(flow.id, flow)
    return make_runtime(list(flows.values()))


# =================================================================================================
# fixtures and helpers
# =================================================================================================


def delete_rq_queue(client: Any, queue_name: str) -> None:
    """Delete everything RQ keeps for `queue_name` (see the module doc)."""
    pattern = "rq:*" + "".join("\\" + c if c in "*?[]\\^-" else c for c in queue_name) + "*"
    keys = list(client.scan_iter(match=pattern, count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])
    client.srem("rq:queues", f"rq:queue:{queue_name}")
    stale = [m for m in client.smembers("rq:workers") if queue_name.encode() in m]
    if stale:
        client.srem("rq:workers", *stale)


@pytest.fixture
def rq_queue(redis_client: Any) -> Iterator[str]:
    name = f"fcrq-{uuid.uuid4().hex[:8]}"
    yield name
    delete_rq_queue(redis_client, name)


@pytest.fixture
def make_adapter(redis_client: Any, redis_prefix: str, rq_queue: str) -> Iterator[Callable[..., RqAdapter]]:
    """Build adapters on this test's prefix and queue; stopped and closed afterwards."""
    made: List[RqAdapter] = []

    def make(runtime: Optional[FlowRuntime] = None, adapter_class: type = RqAdapter, **options: Any) -> RqAdapter:
        options.setdefault("queue_name", rq_queue)
        options.setdefault("prefix", redis_prefix)
        options.setdefault("poll_timeout", 0.1)
        options.setdefault("retry_intervals", (0, 0, 0))  # infrastructure re-runs at once: fast tests
        adapter = adapter_class(runtime or rq_app(), redis_client, **options)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()


def drain(adapter: RqAdapter, run_ids: Iterable[str], timeout: float = 60.0) -> None:
    """Work in bursts until no run is `running` (scheduled jobs are promoted by `work`)."""
    run_ids = list(run_ids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        adapter.work(burst=True)
        if all(adapter.get_status(r).status != "running" for r in run_ids):
            return
        time.sleep(0.05)
    raise TimeoutError(f"still running after {timeout}s: {[adapter.get_status(r) for r in run_ids]}")


def count_completions(adapter: RqAdapter) -> Counter:
    """Wrap the store's commit: count applied commits that mark (run, node, iteration) done."""
    store = adapter.store
    completions: Counter = Counter()
    commit = store.commit

    def counted(c: Any) -> bool:
        before = store.read_states(c.run_id, list(c.states))
        applied = commit(c)
        if applied:
            for node_id, state in c.states.items():
                old = before.get(node_id, {})
                if state.get("st") == "done" and (old.get("st") != "done" or old.get("it") != state.get("it")):
                    completions[(c.run_id, node_id, state.get("it", 0))] += 1
        return applied

    store.commit = counted  # type: ignore[method-assign]
    return completions


def assert_once(completions: Counter) -> None:
    assert completions, "nothing was committed"
    assert {k: n for k, n in completions.items() if n != 1} == {}


def assert_quiet(adapter: RqAdapter) -> None:
    """Nothing left behind: no RQ job queued, scheduled or running, no unpublished job, no dead letter."""
    assert adapter.queue.pending() == 0
    assert adapter.store.outbox_size() == 0
    assert adapter.queue.dead_letters() == []


def rq_queue_of(adapter: RqAdapter) -> Any:
    return adapter.queue.rq


def worker_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("REDIS_URL", REDIS_URL_DEFAULT)
    env.update(extra)
    return env


FLOWCRAFT_WORKER = "flowcraft_redis.rq_worker.FlowcraftWorker"  # the worker class we recommend for `rq worker`


def rq_worker_command(queue: str, redis_url: str, *, burst: bool = True, worker_class: str = FLOWCRAFT_WORKER,
                      scheduler: bool = False) -> List[str]:
    command = [RQ_CLI, "worker", "--url", redis_url, "-w", worker_class,
               "--serializer", "rq.serializers.JSONSerializer", "--path", TESTS, "--path", HERE,
               "--name", f"{queue}-w{uuid.uuid4().hex[:6]}"]
    if burst:
        command.append("--burst")
    if scheduler:
        command.append("--with-scheduler")
    return command + [queue]


def run_rq_worker_burst(queue: str, redis_url: str, worker_class: str = FLOWCRAFT_WORKER) -> None:
    proc = subprocess.run(rq_worker_command(queue, redis_url, worker_class=worker_class), cwd=ROOT,
                          env=worker_env(FLOWCRAFT_APP="test_rq_adapter:rq_app"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]


def start_scenario(adapter: RqAdapter, scenario: Scenario) -> str:
    return adapter.start_workflow(scenario.build()[0].id, dict(scenario.initial_context))


def resume_scenario(adapter: RqAdapter, scenario: Scenario, run_id: str) -> None:
    paused = adapter.wait_for_result(run_id, timeout=5)
    assert paused.status == "awaiting", (paused.status, paused.errors)
    action, output = scenario.resume
    adapter.resume_with_action(run_id, action, output=output)


# =================================================================================================
# scenarios through RqAdapter.work(): the same results as in memory, each node committed once
# =================================================================================================


@pytest.mark.parametrize("scenario", SCENARIO_LIST, ids=str)
def test_scenario_matches_in_memory(make_adapter: Callable[..., RqAdapter], scenario: Scenario) -> None:
    expected = run_in_memory(scenario)
    assert expected.status == "completed", expected.errors
    adapter = make_adapter()
    completions = count_completions(adapter)
    run_id = start_scenario(adapter, scenario)
    drain(adapter, [run_id])
    if scenario.resume is not None:
        resume_scenario(adapter, scenario, run_id)
        drain(adapter, [run_id])
    result = adapter.wait_for_result(run_id, timeout=10)
    assert_same_result(result, expected)
    assert adapter.get_status(run_id).result["context"] == expected.context
    assert_once(completions)
    assert_quiet(adapter)


def test_rq_jobs_carry_the_job_json_with_the_json_serializer(make_adapter: Callable[..., RqAdapter],
                                                             redis_client: Any, redis_prefix: str) -> None:
    adapter = make_adapter()
    run_id = adapter.start_workflow("chain", {"start": 21})
    [job_id] = rq_queue_of(adapter).get_job_ids()
    raw = redis_client.hgetall(RqJob.key_for(job_id))
    assert b"\x80" not in raw[b"data"][:2]  # not a pickle (protocol header)
    rq_job = RqJob.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
    assert rq_job.func_name == RUN_NODE == "flowcraft_redis.rq_jobs.run_node"
    assert json.loads(rq_job.args[0]) == {"runId": run_id, "blueprintId": "chain", "nodeId": "load"}
    assert rq_job.meta["flowcraft"]["prefix"] == redis_prefix
    assert rq_job.result_ttl == 60 and rq_job.timeout == -1 and rq_job.retries_left == 3
    assert job_id == adapter.queue.job_id(Job(run_id, "chain", "load"))
    drain(adapter, [run_id])
    assert adapter.get_status(run_id).status == "completed"


def test_the_rq_job_hash_is_the_one_rq_enqueue_writes(make_adapter: Callable[..., RqAdapter],
                                                       redis_client: Any) -> None:
    """Our publish script writes RQ's own `Job.to_dict()`: field for field what `Queue.enqueue`
    writes for the same job (but the timestamps), so every RQ tool reads it."""
    adapter = make_adapter()
    job = Job(f"r-{uuid.uuid4().hex}", "chain", "load")
    adapter.queue.enqueue([job])
    ours = redis_client.hgetall(RqJob.key_for(adapter.queue.job_id(job)))
    settings = adapter.settings
    twin = rq_queue_of(adapter).enqueue(
        RUN_NODE, job.to_json(), job_id=f"twin-{adapter.queue_name}", result_ttl=settings.result_ttl,
        failure_ttl=settings.effective_failure_ttl, job_timeout=settings.job_timeout,
        retry=rq.Retry(max=len(settings.retry_intervals), interval=list(settings.retry_intervals)),
        meta={"flowcraft": settings.to_meta()}, description=ours[b"description"].decode())
    theirs = redis_client.hgetall(twin.key)
    stamps = {b"created_at", b"enqueued_at"}
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k not in stamps} == {k: v for k, v in theirs.items() if k not in stamps}
    assert ours[b"status"] == b"queued" and rq_queue_of(adapter).get_job_ids() == [adapter.queue.job_id(job), twin.id]


def test_a_plain_chain_node_costs_two_round_trips_of_ours(make_adapter: Callable[..., RqAdapter],
                                                         monkeypatch: Any) -> None:
    """Inside the RQ job function: one load, then the commit and the publication of the
    successors in one pipelined round trip (RQ's own bookkeeping comes on top)."""
    adapter = make_adapter()
    run_id = adapter.start_workflow("chain", {"start": 21})
    counting = {"on": False, "trips": 0}
    per_job: List[int] = []
    send = redis.connection.AbstractConnection.send_packed_command
    run = RqAdapter.run_rq_job

    def counted_send(self: Any, *args: Any, **kwargs: Any) -> Any:
        if counting["on"]:
            counting["trips"] += 1
        return send(self, *args, **kwargs)

    def counted_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        counting.update(on=True, trips=0)
        try:
            return run(self, *args, **kwargs)
        finally:
            counting["on"] = False
            per_job.append(counting["trips"])

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted_send)
    monkeypatch.setattr(RqAdapter, "run_rq_job", counted_run)
    drain(adapter, [run_id])
    assert adapter.get_status(run_id).status == "completed"
    assert len(per_job) == 4  # load, double, describe, store
    assert per_job[:-1] == [2, 2, 2]
    assert per_job[-1] <= 5  # the last one also reads the run's states and context for its result


def test_jobs_a_worker_committed_but_never_published_are_drained(make_adapter: Callable[..., RqAdapter]) -> None:
    """A worker dies between the commit and the publish script (simulated: the commit alone, then
    an infrastructure error): RQ re-runs the job, which finds its node done and drains the outbox."""
    adapter = make_adapter(make_runtime(_fan20()))
    completions = count_completions(adapter)
    store = adapter.store
    commit = store.commit
    died: List[str] = []

    def commit_then_die(c: Any) -> bool:
        if died or not c.jobs:
            return commit(c)
        applied = RedisRunStore.commit(store, c)  # commit.lua alone: the jobs stay in the outbox
        died.append(c.run_id)
        assert applied and store.outbox_size() == len(c.jobs) == FAN
        raise ConnectionError("worker died between the commit and the publication")

    store.commit = commit_then_die  # type: ignore[method-assign]
    run_id = adapter.start_workflow("fan20")
    drain(adapter, [run_id])
    assert died == [run_id]
    assert_same_result(adapter.wait_for_result(run_id), run_in_memory(Scenario("fan20", _fan20)))
    assert_once(completions)
    assert_quiet(adapter)


def test_racing_publishers_publish_each_outbox_entry_once(make_adapter: Callable[..., RqAdapter],
                                                          redis_client: Any) -> None:
    adapter = make_adapter()
    store, queue = adapter.store, adapter.queue
    bodies = [Job(f"race-{i}", "chain", "load").to_json() for i in range(200)]
    redis_client.lpush(store.outbox.ready, *bodies)
    entries = [Entry(b, Job.from_json(b), None, "L", b) for b in bodies[:10]]
    assert queue.publish(entries) == (10, 190)
    assert queue.publish(entries) == (0, 190)  # a second publisher that read the same entries: nothing
    created: List[int] = []
    threads = [threading.Thread(target=lambda: created.append(store.drain_outbox())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(created) == 190 and store.outbox_size() == 0
    ids = rq_queue_of(adapter).get_job_ids()
    assert len(ids) == len(set(ids)) == 200
    assert sorted(ids) == sorted(queue.job_id(Job.from_json(b)) for b in bodies)


@pytest.fixture
def private_redis_url(tmp_path: Any) -> Iterator[str]:
    """A redis-server of this test's own (its scripts may be flushed: the shared one's may not)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the private redis-server did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def test_scripts_lost_by_redis_are_loaded_again(private_redis_url: str) -> None:
    """After SCRIPT FLUSH (what a restart does), the pipelined commit + publish meets NOSCRIPT:
    the scripts are loaded again and the commit is sent again, once."""
    client = redis.Redis.from_url(private_redis_url)
    adapter = RqAdapter(rq_app(), client, queue_name="flushq", poll_timeout=0.1, retry_intervals=())
    try:
        completions = count_completions(adapter)
        loads: List[int] = []
        load_scripts = adapter.store._load_scripts
        adapter.store._load_scripts = lambda: loads.append(1) or load_scripts()  # type: ignore[method-assign]
        run_id = adapter.start_workflow("chain", {"start": 21})
        assert adapter.work(burst=True, max_jobs=1) == 1
        client.script_flush()
        loads.clear()  # (the first commit on this fresh server loaded them too)
        drain(adapter, [run_id])
        assert loads == [1]  # the next commit met NOSCRIPT, once
        assert_same_result(adapter.wait_for_result(run_id), run_in_memory(SCENARIOS["chain"]))
        assert_once(completions)
        assert_quiet(adapter)
    finally:
        adapter.close()
        client.close()


@pytest.mark.parametrize("result_ttl", [60, 0])
def test_finished_rq_jobs_expire_after_result_ttl(make_adapter: Callable[..., RqAdapter], redis_client: Any,
                                                 result_ttl: int) -> None:
    adapter = make_adapter(result_ttl=result_ttl)
    run_id = adapter.start_workflow("chain", {"start": 21})
    job_ids = [adapter.queue.job_id(Job(run_id, "chain", node)) for node in ("load", "double", "describe", "store")]
    drain(adapter, [run_id])
    assert adapter.get_status(run_id).status == "completed"
    finished = rq_queue_of(adapter).finished_job_registry
    if result_ttl:
        assert sorted(finished.get_job_ids()) == sorted(job_ids)
        assert all(0 < redis_client.ttl(RqJob.key_for(i)) <= result_ttl for i in job_ids)
    else:
        assert finished.get_job_ids() == [] and not any(redis_client.exists(RqJob.key_for(i)) for i in job_ids)
    assert_quiet(adapter)


# =================================================================================================
# sleep, cancel, duplicates, malformed jobs, retries
# =================================================================================================


def test_sleep_is_an_rq_scheduled_job_that_fires(make_adapter: Callable[..., RqAdapter]) -> None:
    scenario = Scenario("nap1s", _nap, wait_timers=True)
    expected = run_in_memory(scenario)
    adapter = make_adapter()
    started = time.time()
    run_id = start_scenario(adapter, scenario)
    adapter.work(burst=True)  # before, nap: the timer is now scheduled, not queued
    registry = rq_queue_of(adapter).scheduled_job_registry
    assert adapter.get_status(run_id).status == "running"
    [timer_id] = registry.get_job_ids()
    timer = RqJob.fetch(timer_id, connection=adapter.redis, serializer=JSONSerializer)
    assert json.loads(timer.args[0])["kind"] == "timer"
    assert registry.get_scheduled_time(timer_id).timestamp() >= started + 1  # rounded up, never early
    adapter.start()
    result = adapter.wait_for_result(run_id, timeout=30)
    adapter.stop(timeout=10)
    assert time.time() - started >= 1.0
    assert_same_result(result, expected)
    assert_quiet(adapter)


def test_cancel_drops_the_remaining_jobs(make_adapter: Callable[..., RqAdapter]) -> None:
    adapter = make_adapter()
    run_id = adapter.start_workflow("chain", {"start": 21})
    adapter.work(burst=True, max_jobs=1)
    adapter.cancel(run_id)
    drain(adapter, [run_id])
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "cancelled"
    assert "load" in result.context and "double" not in result.context
    assert_quiet(adapter)


def test_a_job_enqueued_twice_is_one_rq_job_and_commits_once(make_adapter: Callable[..., RqAdapter]) -> None:
    adapter = make_adapter()
    completions = count_completions(adapter)
    run_id = adapter.start_workflow("chain", {"start": 21})
    adapter.queue.enqueue([Job(run_id, "chain", "load")])  # the same job again: de-duplicated
    assert rq_queue_of(adapter).count == 1
    # a second copy under another RQ job id (a client enqueueing by hand): both run, one commits
    rq_queue_of(adapter).enqueue(RUN_NODE, Job(run_id, "chain", "load").to_json(), job_id=f"copy-{adapter.queue_name}",
                                 result_ttl=0, meta={"flowcraft": adapter.settings.to_meta()})
    assert rq_queue_of(adapter).count == 2
    drain(adapter, [run_id])
    assert_same_result(adapter.wait_for_result(run_id), run_in_memory(SCENARIOS["chain"]))
    assert completions[(run_id, "load", 0)] == 1
    assert_once(completions)
    assert_quiet(adapter)


def test_reconcile_does_not_duplicate_a_waiting_job(make_adapter: Callable[..., RqAdapter]) -> None:
    adapter = make_adapter()
    run_id = adapter.start_workflow("chain", {"start": 21})
    assert adapter.reconcile(run_id) == {"load"}
    assert rq_queue_of(adapter).count == 1
    drain(adapter, [run_id])
    assert adapter.get_status(run_id).status == "completed"


def test_malformed_jobs_are_dead_lettered_and_the_worker_goes_on(make_adapter: Callable[..., RqAdapter]) -> None:
    adapter = make_adapter()
    queue = rq_queue_of(adapter)
    victim = adapter.start_workflow("approval")  # a (paused) run a bad job names: a forged job fails no run
    drain(adapter, [victim])
    bad = {
        "not-json": "{not json",
        "no-node": json.dumps({"runId": "r1", "blueprintId": "chain"}),
        "unknown-blueprint": json.dumps({"runId": victim, "blueprintId": "nope", "nodeId": "x"}),
    }
    for name, body in bad.items():
        queue.enqueue(RUN_NODE, body, job_id=f"{name}-{adapter.queue_name}", result_ttl=0, retry=rq.Retry(max=3),
                      meta={"flowcraft": adapter.settings.to_meta()})
    queue.enqueue(RUN_NODE, Job("r2", "chain", "load").to_json(), job_id=f"bad-meta-{adapter.queue_name}",
                  meta={"flowcraft": {"prefix": "has space"}}, retry=rq.Retry(max=3))
    good = adapter.start_workflow("chain", {"start": 21})
    drain(adapter, [good])
    assert adapter.get_status(good).status == "completed"
    letters = {d["rqJobId"].rsplit("-", 2)[0]: d for d in adapter.queue.dead_letters()}
    assert sorted(letters) == ["bad-meta", "no-node", "not-json", "unknown-blueprint"]
    assert "not valid JSON" in letters["not-json"]["reason"]
    assert "missing" in letters["no-node"]["reason"] and "nodeId" in letters["no-node"]["reason"]
    assert "unknown blueprint 'nope'" in letters["unknown-blueprint"]["reason"]
    assert "meta['flowcraft']" in letters["bad-meta"]["reason"]
    assert letters["not-json"]["body"] == "{not json"
    assert queue.failed_job_registry.count == 4  # in RQ's FailedJobRegistry, not retried
    for job in RqJob.fetch_many([d["rqJobId"] for d in letters.values()], connection=adapter.redis,
                                serializer=JSONSerializer):
        assert job.get_status() == "failed" and job.retries_left == 0
    untouched = adapter.wait_for_result(victim, timeout=5)
    assert untouched.status == "awaiting" and untouched.errors == []
    assert queue.count == 0 and queue.scheduled_job_registry.count == 0


def _flaky_flow(seen: List[Any], failures: int, delay: float) -> Any:
    state = {"calls": 0}

    def flaky(ctx: NodeContext) -> Any:
        current = rq.get_current_job()
        seen.append((ctx.attempt, current.id if current else None, current.number_of_retries if current else None,
                     time.time()))
        state["calls"] += 1
        if state["calls"] <= failures:
            raise RuntimeError(f"boom {state['calls']}")
        return {"attempt": ctx.attempt}

    return (create_flow("flaky").node("start", lambda ctx: "go")
            .node("flaky", flaky, max_retries=failures + 1, retry_delay=delay)
            .node("end", lambda ctx: {"got": ctx.input}).edge("start", "flaky").edge("flaky", "end"))


@pytest.mark.slow
def test_queue_mode_retry_is_rq_retry_of_the_same_rq_job(make_adapter: Callable[..., RqAdapter]) -> None:
    memory: List[Any] = []
    expected = _flaky_flow(memory, 2, 0.0).run()
    assert expected.status == "completed" and expected.context["flaky"] == {"attempt": 3}
    seen: List[Any] = []
    flow = _flaky_flow(seen, 2, 0.3)  # 300 ms: RQ retries after 1 s (whole seconds, rounded up)
    adapter = make_adapter(make_runtime([flow]), retry_mode="queue")
    run_id = adapter.start_workflow("flaky")
    adapter.work(burst=True)  # start, flaky attempt 1 -> rq.Retry: the job waits in the scheduled registry
    assert [s[0] for s in seen] == [1]
    assert rq_queue_of(adapter).scheduled_job_registry.get_job_ids() == [seen[0][1]]
    drain(adapter, [run_id])
    assert [(attempt, retries or 0) for attempt, _, retries, _ in seen] == [(1, 0), (2, 1), (3, 2)]
    assert len({rq_id for _, rq_id, _, _ in seen}) == 1  # RQ re-ran the same RQ job
    assert all(later[3] - earlier[3] >= 0.3 for earlier, later in zip(seen, seen[1:]))  # never early
    assert_same_result(adapter.wait_for_result(run_id), expected)
    assert_quiet(adapter)


def _always_fails(ctx: NodeContext) -> Any:
    raise ValueError(f"always (attempt {ctx.attempt})")


def test_queue_mode_retry_exhausted_fails_the_run(make_adapter: Callable[..., RqAdapter]) -> None:
    flow = create_flow("doomed").node("start", lambda ctx: 1).node("flaky", _always_fails, max_retries=3)
    flow.edge("start", "flaky")
    expected = flow.run()
    adapter = make_adapter(make_runtime([flow]), retry_mode="queue")
    run_id = adapter.start_workflow("doomed")
    drain(adapter, [run_id])
    result = adapter.wait_for_result(run_id)
    assert result.status == "failed"
    assert result.errors[0].node_id == "flaky" and "always (attempt 3)" in result.errors[0].message
    assert_same_result(result, expected)
    assert_quiet(adapter)


class _CrashOnce(RqAdapter):
    """Raises an infrastructure error once at each of `points`."""

    points: tuple = ()

    def _fault(self, point: str) -> None:
        if point in self.points and point not in self.fired:
            self.fired.append(point)
            raise ConnectionError(f"injected at {point}")


@pytest.mark.parametrize("points", [("before_execute",), ("after_execute",), ("after_commit",), ("before_ack",)])
def test_an_rq_job_that_raises_is_rerun_by_rq_and_commits_once(make_adapter: Callable[..., RqAdapter],
                                                              points: tuple) -> None:
    adapter = make_adapter(make_runtime(_fan20()), adapter_class=_CrashOnce)
    adapter.points, adapter.fired = points, []  # type: ignore[attr-defined]
    completions = count_completions(adapter)
    run_id = adapter.start_workflow("fan20")
    drain(adapter, [run_id])
    assert adapter.fired == list(points)  # type: ignore[attr-defined]
    assert_same_result(adapter.wait_for_result(run_id), run_in_memory(Scenario("fan20", _fan20)))
    assert_once(completions)
    assert_quiet(adapter)


def test_a_version_mismatch_is_put_back_as_a_scheduled_rq_job(make_adapter: Callable[..., RqAdapter]) -> None:
    def versioned(version: str) -> FlowRuntime:
        flow = create_flow("versioned").node("a", lambda ctx: version).node("b", lambda ctx: ctx.input).edge("a", "b")
        blueprint = flow.to_blueprint()
        runtime = FlowRuntime(registry=flow.registry)
        runtime.add_blueprint(type(blueprint).from_dict({**blueprint.to_dict(), "metadata": {"version": version}}))
        return runtime

    old, new = make_adapter(versioned("1")), make_adapter(versioned("2"), version_mismatch_delay=0.01)
    run_id = old.start_workflow("versioned")
    new.work(burst=True)  # not its version: put back for later
    registry = rq_queue_of(new).scheduled_job_registry
    [put_back] = registry.get_job_ids()
    assert json.loads(RqJob.fetch(put_back, connection=new.redis, serializer=JSONSerializer).args[0])["firstSeen"]
    assert old.get_status(run_id).status == "running"
    drain(old, [run_id])
    result = old.wait_for_result(run_id)
    assert result.status == "completed" and result.context["b"] == "1"


def test_a_run_started_by_a_seed_style_rq_client(make_adapter: Callable[..., RqAdapter], redis_client: Any,
                                                 rq_queue: str) -> None:
    """A foreign client writes the context hash and enqueues ``run_node({"runId", "blueprintId",
    "nodeId"})`` with RQ alone (no meta: the default settings, prefix "")."""
    run_id = f"seed-{uuid.uuid4().hex}"
    adapter = make_adapter(prefix="")
    try:
        redis_client.hset(f"workflow:state:{run_id}", mapping={"start": "21"})
        rq.Queue(rq_queue, connection=redis_client, serializer=JSONSerializer).enqueue(
            RUN_NODE, json.dumps({"runId": run_id, "blueprintId": "chain", "nodeId": "load"}),
            job_id=f"seed-{rq_queue}")
        drain(adapter, [run_id])
        assert_same_result(adapter.wait_for_result(run_id), run_in_memory(SCENARIOS["chain"]))
    finally:
        outbox = [f"{rq_queue}.outbox{suffix}" for suffix in ("", ":delayed")]
        redis_client.delete(*RunKeys("").all_of(run_id), *outbox)


def test_work_stops_on_stop(make_adapter: Callable[..., RqAdapter]) -> None:
    adapter = make_adapter()
    adapter.start()
    run_id = adapter.start_workflow("chain", {"start": 21})
    assert adapter.wait_for_result(run_id, timeout=20).status == "completed"
    thread = adapter._thread
    adapter.stop(timeout=10)
    assert thread is not None and not thread.is_alive()
    assert adapter.work(burst=True) == 0  # nothing left


# =================================================================================================
# stock `rq worker` processes
# =================================================================================================


@pytest.mark.slow
def test_stock_rq_worker_runs_the_scenarios_like_memory(make_adapter: Callable[..., RqAdapter], redis_url: str,
                                                        rq_queue: str) -> None:
    client = make_adapter()  # only a client here: the `rq worker` process does the work
    scenarios = [BY_NAME[n] for n in SUBPROCESS_SCENARIOS]
    runs = {s.name: start_scenario(client, s) for s in scenarios}
    run_rq_worker_burst(rq_queue, redis_url)
    for scenario in scenarios:
        if scenario.resume is not None:
            resume_scenario(client, scenario, runs[scenario.name])
    run_rq_worker_burst(rq_queue, redis_url)
    for scenario in scenarios:
        result = client.wait_for_result(runs[scenario.name], timeout=5)
        assert_same_result(result, run_in_memory(scenario))
    assert_quiet(client)


@pytest.mark.parametrize("worker_class", ["rq.worker.Worker", "rq.worker.SimpleWorker"])
def test_stock_rq_worker_classes(make_adapter: Callable[..., RqAdapter], redis_url: str, rq_queue: str,
                                 worker_class: str) -> None:
    """RQ's own worker classes run Flowcraft jobs too (the forking one, and SimpleWorker); unlike
    FlowcraftWorker they run any job their queue holds (test_hostile_rq)."""
    client = make_adapter()
    run_id = start_scenario(client, SCENARIOS["chain"])
    run_rq_worker_burst(rq_queue, redis_url, worker_class=worker_class)
    assert_same_result(client.wait_for_result(run_id, timeout=5), run_in_memory(SCENARIOS["chain"]))
    assert_quiet(client)


@pytest.mark.slow
def test_stock_rq_worker_scheduler_fires_a_sleep(make_adapter: Callable[..., RqAdapter], redis_url: str,
                                                 rq_queue: str) -> None:
    client = make_adapter()
    scenario = Scenario("nap1s", _nap, wait_timers=True)
    run_id = start_scenario(client, scenario)
    proc = subprocess.Popen(rq_worker_command(rq_queue, redis_url, burst=False, scheduler=True), cwd=ROOT,
                            env=worker_env(FLOWCRAFT_APP="test_rq_adapter:rq_app"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        result = client.wait_for_result(run_id, timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)  # warm shutdown: RQ stops its scheduler process too
        try:
            output, _ = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert_same_result(result, run_in_memory(scenario))
    assert proc.returncode == 0, output[-3000:]
    assert_quiet(client)


@pytest.mark.parametrize("recovery", ["rq-abandoned-job", "reconciler"])
def test_a_sigkilled_rq_worker_loses_nothing(make_adapter: Callable[..., RqAdapter], redis_client: Any,
                                            redis_prefix: str, redis_url: str, rq_queue: str, recovery: str) -> None:
    started_key, hold_key = f"{redis_prefix}started", f"{redis_prefix}hold"
    context = {"startedKey": started_key, "holdKey": hold_key}
    expected = make_runtime(_holding()).run("holding", dict(context))
    redis_client.delete(started_key)  # the in-memory run went through `hold` too
    adapter = make_adapter()
    redis_client.set(hold_key, "1")
    run_id = adapter.start_workflow("holding", dict(context))
    proc = subprocess.Popen(rq_worker_command(rq_queue, redis_url, burst=False), cwd=ROOT,
                            env=worker_env(FLOWCRAFT_APP="test_rq_adapter:rq_app"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while redis_client.llen(started_key) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert redis_client.llen(started_key) == 1, "the rq worker never started the node"
        # its worker lives: the reconciler leaves the job alone
        assert create_redis_reconciler(adapter, stalled_threshold_seconds=3600).run().reconciled == 0
        assert rq_queue_of(adapter).count == 0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # mid-job: `hold` is running in it
        proc.wait(timeout=10)
    redis_client.delete(hold_key)
    hold_job = adapter.queue.job_id(Job(run_id, "holding", "hold"))
    registry = StartedJobRegistry(queue=rq_queue_of(adapter))
    assert hold_job in registry.get_job_ids()
    assert adapter.get_status(run_id).status == "running"
    completions = count_completions(adapter)
    if recovery == "rq-abandoned-job":
        # what the next RQ registry maintenance does once the job's heartbeat has expired
        registry.cleanup(timestamp=time.time() + 10_000)
        assert rq_queue_of(adapter).count == 1  # retries were left: RQ put it back
    else:
        # the job's heartbeat has not expired, but its RQ worker is gone (no connection of its name
        # is left, its process is dead): the reconciler enqueues the node again at once, although
        # the run is not idle past the threshold
        reconciler = create_redis_reconciler(adapter, stalled_threshold_seconds=3600)
        stats = reconciler.run()
        assert stats.reconciled == 1 and stats.failed == 0
        assert rq_queue_of(adapter).count == 1
        assert hold_job not in registry.get_job_ids()
        assert reconciler.run().reconciled == 0  # the new job waits: no duplicate
    drain(adapter, [run_id])
    result = adapter.wait_for_result(run_id)
    assert_same_result(result, expected)
    assert redis_client.llen(started_key) == 2  # the node ran again: at-least-once
    assert_once(completions)


def test_a_worker_without_the_app_fails_jobs_without_losing_them(make_adapter: Callable[..., RqAdapter],
                                                                 redis_url: str, rq_queue: str) -> None:
    """No FLOWCRAFT_APP: the job function raises (an infrastructure error, retried by RQ, never a
    dead letter nor a failed run); once RQ gives up, the reconciler re-enqueues the node."""
    adapter = make_adapter()
    run_id = adapter.start_workflow("chain", {"start": 21})
    env = worker_env()
    env.pop("FLOWCRAFT_APP", None)
    proc = subprocess.run(rq_worker_command(rq_queue, redis_url), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AppNotConfigured" in proc.stdout + proc.stderr and "FLOWCRAFT_APP" in proc.stdout + proc.stderr
    failed = rq_queue_of(adapter).failed_job_registry
    [rq_id] = failed.get_job_ids()  # RQ's three re-runs (retry_intervals) spent
    assert RqJob.fetch(rq_id, connection=adapter.redis, serializer=JSONSerializer).retries_left == 0
    assert adapter.queue.dead_letters() == []
    assert adapter.get_status(run_id).status == "running"
    assert adapter.reconcile(run_id) == {"load"}  # the failed RQ job's id is taken: a fresh one
    drain(adapter, [run_id])
    assert_same_result(adapter.wait_for_result(run_id), run_in_memory(SCENARIOS["chain"]))
