"""Workers with threads (`threads=N`), the fetch policy and the outage backoff (SPEC section 10),
on the in-memory fakes."""
from __future__ import annotations

import threading
from typing import Any, List

import pytest

from flowcraft import FlowRuntime, create_flow
from flowcraft.testing import InMemoryAdapter
from flowcraft.distributed._worker_pool import HANDOFF_AFTER, OUTAGE_DELAY_MAX, Committer, FetchPace, JobBudget, outage_delays


def fan_flow(name: str, width: int, body: Any) -> Any:
    flow = create_flow(name)
    flow.node("start", lambda ctx: 1)
    flow.node("end", lambda ctx: sorted((ctx.input or {}).values()))
    for i in range(width):
        flow.node(f"m{i}", body)
        flow.edge("start", f"m{i}")
        flow.edge(f"m{i}", "end")
    return flow


def runtime_of(*flows: Any) -> FlowRuntime:
    runtime = FlowRuntime()
    for flow in flows:
        runtime.add_blueprint(flow)
    return runtime


def test_threads_run_the_nodes_of_a_fan_out_at_once() -> None:
    """Four nodes meet at a barrier of four: they complete only if four run at the same time."""
    barrier = threading.Barrier(4, timeout=10)

    def meet(ctx: Any) -> int:
        barrier.wait()
        return 2

    flow = fan_flow("barrierfan", 4, meet)
    adapter = InMemoryAdapter(runtime_of(flow), threads=4)
    run_id = adapter.start_workflow("barrierfan")
    assert adapter.work(burst=True) == 6
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "completed", result.errors
    reference = fan_flow("barrierfan", 4, lambda ctx: 2)  # the same outputs, without the barrier
    assert result.context == reference.run(runtime_of(reference)).context


def test_one_thread_runs_one_node_at_a_time() -> None:
    running: List[int] = []
    peak: List[int] = [0]
    lock = threading.Lock()

    def count(ctx: Any) -> int:
        with lock:
            running.append(1)
            peak[0] = max(peak[0], len(running))
        with lock:
            running.pop()
        return 1

    flow = fan_flow("serialfan", 8, count)
    adapter = InMemoryAdapter(runtime_of(flow))
    run_id = adapter.start_workflow("serialfan")
    adapter.work(burst=True)
    assert adapter.wait_for_result(run_id, timeout=5).status == "completed"
    assert peak[0] == 1


def test_many_runs_on_eight_threads_end_as_in_memory_each_node_committed_once() -> None:
    flow = create_flow("tchain")
    for i in range(6):
        flow.node(f"n{i}", lambda ctx: (ctx.input or 0) + 1)
        if i:
            flow.edge(f"n{i - 1}", f"n{i}")
    fan = fan_flow("tfan", 12, lambda ctx: (ctx.input or 0) + 1)
    runtime = runtime_of(flow, fan)
    adapter = InMemoryAdapter(runtime, threads=8, max_fetch=5, duplicate_rate=0.2, seed=3)
    runs = [adapter.start_workflow("tchain") for _ in range(10)] + [adapter.start_workflow("tfan") for _ in range(5)]
    adapter.work(burst=True)
    expected = {"tchain": flow.run(runtime_of(flow)).context, "tfan": fan.run(runtime_of(fan)).context}
    for run_id in runs:
        result = adapter.wait_for_result(run_id, timeout=5)
        record = adapter.store.get_record(run_id)
        assert result.status == "completed", result.errors
        assert result.context == expected[record.blueprint_id]
        states = adapter.store.read_all_states(run_id)
        assert all(s["st"] == "done" for s in states.values()), states
    assert adapter.conflicts >= 0  # counted over the threads, readable after work()


def test_threads_survive_crashes_and_end_as_in_memory() -> None:
    fan = fan_flow("crashfan", 10, lambda ctx: (ctx.input or 0) + 1)
    runtime = runtime_of(fan)
    adapter = InMemoryAdapter(runtime, threads=4, crash_at=["after_execute", "after_commit"], crash_rate=0.2,
                              max_crashes=6, seed=5)
    run_id = adapter.start_workflow("crashfan")
    adapter.drain(timeout=20)
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "completed", result.errors
    assert result.context == fan.run(runtime_of(fan)).context
    assert sum(adapter.crashes.values()) > 0


def test_max_jobs_is_shared_by_the_threads() -> None:
    fan = fan_flow("budgetfan", 20, lambda ctx: 1)
    adapter = InMemoryAdapter(runtime_of(fan), threads=4)
    adapter.start_workflow("budgetfan")
    assert adapter.work(burst=True, max_jobs=7) == 7
    assert adapter.queue.pending > 0


def test_stop_ends_every_thread() -> None:
    adapter = InMemoryAdapter(runtime_of(fan_flow("idle", 1, lambda ctx: 1)), threads=3, poll_timeout=0.05)
    adapter.start()
    adapter.stop(timeout=10)
    assert adapter._thread is None
    assert not [t for t in threading.enumerate() if t.name.startswith("flowcraft-worker-")]


def test_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threads"):
        InMemoryAdapter(FlowRuntime(), threads=0)


def test_rq_adapter_refuses_threads_with_the_reason() -> None:
    flowcraft_redis = pytest.importorskip("flowcraft_redis")
    with pytest.raises(ValueError, match="rq worker"):
        flowcraft_redis.RqAdapter(FlowRuntime(), "redis://127.0.0.1:1/0", threads=4)


# --- fetch policy -------------------------------------------------------------------------------


def test_a_fresh_worker_takes_one_job_and_slow_jobs_keep_it_at_one() -> None:
    pace = FetchPace(20, budget=0.02)
    assert pace.size() == 1
    pace.record(1, 0.05)
    assert pace.size() == 1
    pace.record(3, 3.0)
    assert pace.size() == 1


def test_fast_jobs_grow_the_fetch_by_doubling_up_to_the_ceiling() -> None:
    pace = FetchPace(20, budget=0.02)
    sizes = []
    for _ in range(8):
        size = pace.size()
        sizes.append(size)
        pace.record(size, size * 0.0001)
    assert sizes == [1, 2, 4, 8, 16, 20, 20, 20]


def test_jobs_turning_slow_bring_the_fetch_back_to_one() -> None:
    pace = FetchPace(20, budget=0.02)
    for _ in range(6):
        pace.record(pace.size(), 0.001)
    assert pace.size() == 20
    pace.record(20, 20 * 0.05)
    pace.record(1, 0.05)
    assert pace.size() == 1


def test_a_fixed_fetch_batch_is_kept() -> None:
    pace = FetchPace(10, fixed=True)
    assert pace.size() == 10
    pace.record(10, 100.0)
    assert pace.size() == 10


def test_the_worker_asks_for_one_job_at_a_time_while_nodes_are_slow() -> None:
    barrier = threading.Barrier(2, timeout=10)

    def slow(ctx: Any) -> int:  # slow: each waits for another thread's node
        barrier.wait()
        return 1

    fan = fan_flow("slowfan", 6, slow)
    adapter = InMemoryAdapter(runtime_of(fan), threads=2, max_fetch=20, fetch_budget=0.000001)
    asked: List[int] = []
    fetch = adapter.queue.fetch

    def recorded(max_jobs: int = 1, timeout: float = 1.0) -> Any:
        asked.append(max_jobs)
        return fetch(max_jobs, timeout)

    adapter.queue.fetch = recorded  # type: ignore[method-assign]
    run_id = adapter.start_workflow("slowfan")
    adapter.work(burst=True)
    assert adapter.wait_for_result(run_id, timeout=5).status == "completed"
    assert set(asked) == {1}, asked


def test_the_worker_batches_while_nodes_are_fast() -> None:
    flow = create_flow("fastchains")
    for i in range(5):
        flow.node(f"n{i}", lambda ctx: 1)
        if i:
            flow.edge(f"n{i - 1}", f"n{i}")
    adapter = InMemoryAdapter(runtime_of(flow), max_fetch=20, fetch_budget=10.0)
    asked: List[int] = []
    fetch = adapter.queue.fetch

    def recorded(max_jobs: int = 1, timeout: float = 1.0) -> Any:
        asked.append(max_jobs)
        return fetch(max_jobs, timeout)

    adapter.queue.fetch = recorded  # type: ignore[method-assign]
    runs = [adapter.start_workflow("fastchains") for _ in range(20)]
    adapter.work(burst=True)
    assert all(adapter.wait_for_result(r, timeout=5).status == "completed" for r in runs)
    assert asked[0] == 1 and max(asked) == 20, asked


def test_job_budget_reserves_and_gives_back() -> None:
    budget = JobBudget(5)
    assert budget.reserve(4) == 4
    assert budget.reserve(4) == 1
    budget.settle(4, 2)
    budget.settle(1, 1)
    assert budget.processed == 3 and budget.left == 2
    assert JobBudget(None).reserve(50) == 50


# --- outage backoff -----------------------------------------------------------------------------


def test_outage_delays_are_capped_and_jittered() -> None:
    delays = outage_delays()
    waits = [next(delays) for _ in range(60)]
    assert max(waits) <= OUTAGE_DELAY_MAX <= 1.0
    assert min(waits[20:]) >= OUTAGE_DELAY_MAX / 2
    assert len(set(waits[20:])) > 1  # jittered


def test_a_long_outage_never_makes_the_worker_wait_more_than_a_second() -> None:
    flow = fan_flow("outage", 2, lambda ctx: 1)
    adapter = InMemoryAdapter(runtime_of(flow), poll_timeout=0.01)
    run_id = adapter.start_workflow("outage")
    failures = [40]
    fetch = adapter.queue.fetch
    waits: List[float] = []

    def flaky(max_jobs: int = 1, timeout: float = 1.0) -> Any:
        if failures[0] > 0:
            failures[0] -= 1
            raise ConnectionError("the service is down")
        return fetch(max_jobs, timeout)

    class RecordingStop(threading.Event):
        def wait(self, timeout: Any = None) -> bool:
            waits.append(timeout)
            return False

    adapter.queue.fetch = flaky  # type: ignore[method-assign]
    adapter._stop = RecordingStop()
    adapter.work(burst=True)
    assert adapter.wait_for_result(run_id, timeout=5).status == "completed"
    assert len(waits) == 40 and max(waits) <= 1.0, waits


def test_a_batch_that_turns_out_slow_gives_its_unstarted_jobs_back() -> None:
    """A worker warmed by fast jobs fetches many at once; when they turn out slow, the jobs of the
    batch it has not started go back to the queue (for idle workers) instead of waiting behind."""
    import time as _time

    fast = create_flow("warm")
    fast.node("a", lambda ctx: 1)
    slow = fan_flow("slowbatch", 8, lambda ctx: _time.sleep(0.03) or 1)
    runtime = runtime_of(fast, slow)
    adapter = InMemoryAdapter(runtime, max_fetch=20, fetch_budget=0.005)
    warm = [adapter.start_workflow("warm") for _ in range(40)]
    adapter.work(burst=True)
    assert all(adapter.wait_for_result(r, timeout=5).status == "completed" for r in warm)
    assert adapter.pace.size() > 1  # fast so far: it takes several jobs a fetch
    given: List[int] = []
    give_back = adapter.queue.give_back

    def recorded(deliveries: Any) -> None:
        given.append(len(deliveries))
        give_back(deliveries)

    adapter.queue.give_back = recorded  # type: ignore[method-assign]
    run_id = adapter.start_workflow("slowbatch")
    adapter.work(burst=True)
    result = adapter.wait_for_result(run_id, timeout=5)
    assert result.status == "completed", result.errors
    assert result.context == slow.run(runtime_of(fan_flow("slowbatch", 8, lambda ctx: 1))).context
    assert given, "the slow batch kept all its jobs"
    assert adapter.pace.size() == 1


# --- commit rounds handed to the committer ----------------------------------------------------------


def _committing_threads(adapter: InMemoryAdapter) -> List[str]:
    """Record the name of the thread of every commit round of `adapter`'s store."""
    names: List[str] = []
    commit, commit_many = adapter.store.commit, adapter.store.commit_many

    def recorded(method: Any) -> Any:
        def call(commits: Any) -> Any:
            names.append(threading.current_thread().name)
            return method(commits)
        return call

    adapter.store.commit = recorded(commit)  # type: ignore[method-assign]
    adapter.store.commit_many = recorded(commit_many)  # type: ignore[method-assign]
    return names


def test_slow_jobs_have_their_commits_made_by_the_committer_and_end_as_in_memory() -> None:
    import time as _time

    nap = HANDOFF_AFTER * 2
    fan = fan_flow("handfan", 12, lambda ctx: _time.sleep(nap) or (ctx.input or 0) + 1)
    chain = create_flow("handchain")
    for i in range(5):
        chain.node(f"n{i}", lambda ctx: _time.sleep(nap) or (ctx.input or 0) + 1)
        if i:
            chain.edge(f"n{i - 1}", f"n{i}")
    runtime = runtime_of(fan, chain)
    adapter = InMemoryAdapter(runtime, threads=4, duplicate_rate=0.2, seed=7)
    names = _committing_threads(adapter)
    runs = [adapter.start_workflow("handfan") for _ in range(2)] + [adapter.start_workflow("handchain") for _ in range(4)]
    adapter.work(burst=True)
    expected = {"handfan": fan.run(runtime_of(fan)).context, "handchain": chain.run(runtime_of(chain)).context}
    for run_id in runs:
        result = adapter.wait_for_result(run_id, timeout=5)
        assert result.status == "completed", result.errors
        assert result.context == expected[adapter.store.get_record(run_id).blueprint_id]
        assert all(s["st"] == "done" for s in adapter.store.read_all_states(run_id).values())
    assert any(n.startswith("flowcraft-committer-") for n in names), names
    assert_effectively_once_per_node(adapter)


def assert_effectively_once_per_node(adapter: InMemoryAdapter) -> None:
    counts = adapter.store.completions
    assert counts and all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n != 1}


def test_threads_hand_off_their_commits_only_once_jobs_are_slow() -> None:
    adapter = InMemoryAdapter(runtime_of(fan_flow("pace", 1, lambda ctx: 1)), threads=2)
    assert not adapter._slow_jobs()  # nothing measured yet: the thread commits itself
    adapter.pace.record(20, 20 * HANDOFF_AFTER / 10)  # no-op jobs: a hand-off would only add wake-ups
    assert not adapter._slow_jobs()
    adapter.pace.record(1, HANDOFF_AFTER * 4)
    adapter.pace.record(1, HANDOFF_AFTER * 4)
    assert adapter._slow_jobs()


def test_a_committer_finishes_every_wave_handed_in_and_reports_errors_to_each() -> None:
    committer = Committer()
    rounds: List[List[Any]] = []

    def finish(waves: Any) -> None:
        rounds.append(list(waves))
        if "bad" in waves:
            raise ValueError("bad wave")

    first, second = committer.submit("a"), committer.submit("b")  # pending together: one round
    server = threading.Thread(target=committer.serve, args=(finish,))
    server.start()
    first.wait()
    second.wait()
    assert rounds == [["a", "b"]]
    bad = committer.submit("bad")
    with pytest.raises(ValueError, match="bad wave"):
        bad.wait()
    committer.close()
    server.join(5)
    assert not server.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        committer.submit("late")
