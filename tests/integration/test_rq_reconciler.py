"""The RQ reconciler does not trust an RQ job hash (issue 17, item 14), against a real Redis.

A run whose RQ job was lost while the job's hash survived (its id taken off RQ's queue list, for
instance) used to stay `running` forever: the reconciler saw the hash's "queued" status and
skipped the job. It must now check that the job really waits (queue list, intermediate queue,
scheduled or deferred registry) or runs (started, heartbeat alive), re-enqueue it otherwise, and
still never duplicate a job that does wait. The fixtures and the app are `test_rq_adapter`'s.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import pytest

from test_rq_adapter import (  # noqa: F401  (fixtures)
    Scenario, _nap, assert_once, assert_quiet, assert_same_result, count_completions, drain, make_adapter,
    rq_queue, rq_queue_of, run_in_memory, SCENARIOS, start_scenario,
)
from flowcraft.ports import Job
from flowcraft_redis import RqAdapter, create_redis_reconciler
from flowcraft_redis.rq_queue import RqQueue
from rq.job import Job as RqJob

pytestmark = pytest.mark.integration


def _lose(adapter: RqAdapter, rq_id: str) -> None:
    """What a lost RQ job looks like: its id is off the queue list, its hash still says queued."""
    assert adapter.redis.lrem(rq_queue_of(adapter).key, 0, rq_id) == 1
    assert adapter.redis.hget(RqJob.key_for(rq_id), "status") == b"queued"


def test_the_reconciler_recovers_a_job_lost_from_the_queue_list(make_adapter: Callable[..., RqAdapter]) -> None:
    adapter = make_adapter()
    completions = count_completions(adapter)
    run_id = adapter.start_workflow("chain", {"start": 21})
    lost = adapter.queue.job_id(Job(run_id, "chain", "load"))
    _lose(adapter, lost)
    assert rq_queue_of(adapter).count == 0
    assert create_redis_reconciler(adapter, stalled_threshold_seconds=3600).run().stalled == 0  # not idle yet
    reconciler = create_redis_reconciler(adapter, stalled_threshold_seconds=0)
    stats = reconciler.run()
    assert (stats.stalled, stats.reconciled, stats.failed) == (1, 1, 0)
    assert rq_queue_of(adapter).get_job_ids() == [lost]  # enqueued again under its own id
    drain(adapter, [run_id], timeout=30)
    assert_same_result(adapter.wait_for_result(run_id), run_in_memory(SCENARIOS["chain"]))
    assert_once(completions)
    assert_quiet(adapter)


def test_reconcile_of_one_run_recovers_a_lost_job_too(make_adapter: Callable[..., RqAdapter]) -> None:
    """Outside a reconciler pass (`adapter.reconcile(run_id)`) the check is an atomic LPOS."""
    adapter = make_adapter()
    run_id = adapter.start_workflow("chain", {"start": 21})
    lost = adapter.queue.job_id(Job(run_id, "chain", "load"))
    _lose(adapter, lost)
    assert adapter.reconcile(run_id) == {"load"}
    assert rq_queue_of(adapter).get_job_ids() == [lost]
    drain(adapter, [run_id], timeout=30)
    assert adapter.get_status(run_id).status == "completed"


def test_the_reconciler_does_not_duplicate_queued_jobs(make_adapter: Callable[..., RqAdapter],
                                                       monkeypatch: Any) -> None:
    """Many idle runs with queued jobs: none duplicated, and the queue list is scanned once per
    pass (chunk by chunk), with no LPOS at all for jobs the scan saw."""
    adapter = make_adapter()
    completions = count_completions(adapter)
    other = adapter.start_workflow("chain", {"start": 1})  # a queued job of a run that is not lost
    run_ids = [adapter.start_workflow("chain", {"start": 21}) for _ in range(25)]
    lost = adapter.queue.job_id(Job(run_ids[7], "chain", "load"))
    _lose(adapter, lost)
    before = rq_queue_of(adapter).get_job_ids()
    scans, checks = [], []
    ids_in_lists, publish_checked = RqQueue._ids_in_lists, RqQueue._publish_checked
    monkeypatch.setattr(RqQueue, "_ids_in_lists",
                        lambda self, wanted, lists, chunk=10: scans.append(len(wanted)) or
                        ids_in_lists(self, wanted, lists, chunk))
    monkeypatch.setattr(RqQueue, "_publish_checked",
                        lambda self, entries, check: checks.append((len(entries), check)) or
                        publish_checked(self, entries, check))
    stats = create_redis_reconciler(adapter, stalled_threshold_seconds=0).run()
    assert (stats.stalled, stats.failed) == (26, 0)
    assert scans == [26]  # one scan for the pass (in chunks of 10 here)
    assert [c for c in checks if c[1] == "L"] == [(1, "L")]  # only the lost one is confirmed by LPOS
    assert rq_queue_of(adapter).get_job_ids() == before + [lost]
    drain(adapter, run_ids + [other], timeout=60)
    assert {adapter.get_status(r).status for r in run_ids + [other]} == {"completed"}
    assert_once(completions)
    assert_quiet(adapter)


def test_the_reconciler_does_not_duplicate_a_scheduled_sleep(make_adapter: Callable[..., RqAdapter]) -> None:
    scenario = Scenario("nap1s", _nap, wait_timers=True)
    adapter = make_adapter()
    completions = count_completions(adapter)
    run_id = start_scenario(adapter, scenario)
    adapter.work(burst=True)  # before, nap: the timer is now an RQ scheduled job
    registry = rq_queue_of(adapter).scheduled_job_registry
    [timer] = registry.get_job_ids()
    stats = create_redis_reconciler(adapter, stalled_threshold_seconds=0).run()
    assert (stats.stalled, stats.failed) == (1, 0)
    assert registry.get_job_ids() == [timer] and rq_queue_of(adapter).count == 0
    assert adapter.reconcile(run_id) == {"nap"}  # one run, outside a pass: the same
    assert registry.get_job_ids() == [timer] and rq_queue_of(adapter).count == 0
    drain(adapter, [run_id], timeout=30)
    assert_same_result(adapter.wait_for_result(run_id), run_in_memory(scenario))
    assert_once(completions)
    assert_quiet(adapter)


def test_the_reconciler_recovers_a_scheduled_job_lost_from_its_registry(
        make_adapter: Callable[..., RqAdapter]) -> None:
    scenario = Scenario("nap1s", _nap, wait_timers=True)
    adapter = make_adapter()
    run_id = start_scenario(adapter, scenario)
    adapter.work(burst=True)
    registry = rq_queue_of(adapter).scheduled_job_registry
    [timer] = registry.get_job_ids()
    adapter.redis.zrem(registry.key, timer)  # lost: the hash still says scheduled
    assert adapter.redis.hget(RqJob.key_for(timer), "status") == b"scheduled"
    create_redis_reconciler(adapter, stalled_threshold_seconds=0).run()
    assert registry.get_job_ids() == [timer]
    started = time.monotonic()
    drain(adapter, [run_id], timeout=30)
    assert adapter.get_status(run_id).status == "completed" and time.monotonic() - started < 30
