"""Schedules (SPEC 14) on the in-memory fakes, driven by a fake clock: one run per tick whatever
the number of schedulers, a missed tick started once, a dead leader's lease taken over."""
from __future__ import annotations

import builtins
import datetime as dt
from typing import Any, List

import pytest

from flowcraft import FlowRuntime, FlowcraftError, create_flow
from flowcraft.schedules import Scheduler
from flowcraft.testing import InMemoryAdapter, InMemoryCoordinationStore

T0 = dt.datetime(2026, 12, 2, 22, 0, 30, tzinfo=dt.timezone.utc).timestamp()  # half a minute past a tick


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _runtime() -> FlowRuntime:
    runtime = FlowRuntime()
    runtime.add_blueprint(create_flow("job").node("a", lambda ctx: ctx.context.get("who")))
    return runtime


def _setup(count: int = 1, cron: str = "* * * * *", ttl: float = 10.0) -> Any:
    clock = Clock()
    runtime = _runtime()
    runtime.schedule("job", cron, {"who": "cron"}, name="every")
    adapter = InMemoryAdapter(runtime)
    coordination = InMemoryCoordinationStore(clock)
    schedulers = [Scheduler(runtime, adapter, coordination, clock=clock, lease_ttl=ttl, name=f"s{i}") for i in range(count)]
    return clock, adapter, schedulers


def _runs(adapter: Any) -> List[str]:
    return sorted(r.run_id for r in adapter.list_runs(limit=1000).runs)


def test_a_schedule_starts_one_run_per_tick_from_the_first_tick_after_it_was_seen() -> None:
    clock, adapter, (scheduler,) = _setup()
    assert scheduler.check() == []  # first seen at 22:00:30: the 22:00 tick is past
    clock.now = T0 + 29  # 22:00:59
    assert scheduler.check() == []
    clock.now = T0 + 30.2  # 22:01:00.2
    started = scheduler.check()
    assert started == [f"schedule:every:{int(T0 + 30)}"]
    assert scheduler.check() == []  # the same tick again: nothing
    adapter.work(burst=True)
    result = adapter.wait_for_result(started[0], timeout=5)
    assert result.status == "completed" and result.context["a"] == "cron"


def test_missed_ticks_are_caught_up_once() -> None:
    clock, adapter, (scheduler,) = _setup()
    scheduler.check()
    clock.now = T0 + 30 + 600.5  # ten ticks missed (no scheduler ran): 22:11:00.5
    assert scheduler.check() == [f"schedule:every:{int(T0 + 630)}"]  # the latest one, once
    assert scheduler.check() == []
    assert _runs(adapter) == [f"schedule:every:{int(T0 + 630)}"]
    assert scheduler.last_started(adapter.runtime.schedules["every"]) == T0 + 630


def test_several_schedulers_start_exactly_one_run_per_tick_and_a_dead_leader_is_replaced() -> None:
    clock, adapter, schedulers = _setup(count=3, ttl=10.0)
    for s in schedulers:
        s.check()
    assert [s.leader for s in schedulers] == [True, False, False]
    ticks = []
    for minute in range(1, 6):
        clock.now = T0 + 30 + 60 * (minute - 1) + 0.1
        ticks.append(int(clock.now - 0.1))
        for s in schedulers:
            s.check()
    assert _runs(adapter) == [f"schedule:every:{t}" for t in ticks]
    # the leader dies (stops renewing, never releases): the lease expires within its TTL
    alive = schedulers[1:]
    clock.now += 5
    assert not any(s.check() for s in alive) and not any(s.leader for s in alive)
    clock.now += 5.1
    for s in alive:
        s.check()
    assert sum(s.leader for s in alive) == 1
    clock.now = T0 + 30 + 60 * 5 + 0.1  # the next tick is started by the new leader, once
    for s in alive:
        s.check()
    assert len(_runs(adapter)) == 6


def test_two_schedulers_that_both_think_they_lead_start_one_run_per_tick() -> None:
    clock, adapter, (a, b) = _setup(count=2)
    a.check()
    b.leader, b._renewed_at = True, clock.now  # a stale leader whose lease ran out while it was paused
    clock.now = T0 + 30.1
    started = a.check() + b.check()
    assert len(started) == 1 and _runs(adapter) == started
    b.coordination.delete(f"{b.prefix}tick:every:{int(T0 + 30)}")  # even once the claim expired
    b.coordination.delete(f"{b.prefix}last:every")
    b.coordination.set_if_not_exist(f"{b.prefix}last:every", repr(T0), 0)
    assert b.check() == [] and _runs(adapter) == started  # the run id exists: not started again


def test_a_stopping_scheduler_hands_the_lease_over_at_once() -> None:
    clock, _, (a, b) = _setup(count=2)
    a.check()
    a.release()
    b.check()
    assert b.leader and not a.leader


def test_in_memory_scheduler_runs_with_the_runtime() -> None:
    clock = Clock()
    runtime = _runtime()
    runtime.schedule("job", "*/5 * * * *")
    results: List[Any] = []
    scheduler = Scheduler(runtime, clock=clock, on_start=lambda s, tick, run_id: results.append((s.name, tick, run_id)))
    scheduler.check()
    clock.now = dt.datetime(2026, 12, 2, 22, 5, 0, tzinfo=dt.timezone.utc).timestamp()
    assert scheduler.check() == [f"schedule:job:{int(clock.now)}"]
    assert results == [("job", clock.now, f"schedule:job:{int(clock.now)}")]


def test_schedules_are_listed_with_their_next_and_last_started_tick() -> None:
    clock, adapter, (scheduler,) = _setup()
    adapter.runtime.schedule("job", "0 3 * * *", name="nightly", timezone="Europe/Paris")
    scheduler.check()
    clock.now = T0 + 30.5
    scheduler.check()
    rows = {r["name"]: r for r in scheduler.describe()}
    assert rows["every"]["next_tick"] == "2026-12-02T22:02:00+00:00"
    assert rows["every"]["last_started_tick"] == "2026-12-02T22:01:00+00:00"
    assert rows["every"]["last_run_id"] == f"schedule:every:{int(T0 + 30)}"
    assert rows["nightly"]["next_tick"] == "2026-12-03T03:00:00+01:00"  # in its own zone: 02:00 UTC
    assert rows["nightly"]["last_started_tick"] is None  # seen, never started


def test_every_second_with_a_sixth_field() -> None:
    clock, adapter, (scheduler,) = _setup(cron="* * * * * *")
    scheduler.check()
    started = []
    for i in range(1, 11):
        clock.now = T0 + i + 0.01
        started += scheduler.check()
    assert started == [f"schedule:every:{int(T0) + i}" for i in range(1, 11)]


@pytest.mark.parametrize("cron, timezone, message", [
    ("every day", "UTC", "bad cron expression 'every day'"),
    ("61 * * * *", "UTC", "bad cron expression '61 \\* \\* \\* \\*'"),
    ("0 0 30 2 *", "UTC", "bad cron expression"),
    ("* * * * *", "Mars/Olympus", "unknown timezone 'Mars/Olympus'"),
    (5, "UTC", "must be a string"),
])
def test_a_bad_schedule_is_one_clear_error(cron: Any, timezone: str, message: str) -> None:
    runtime = _runtime()
    with pytest.raises(ValueError, match=message):
        runtime.schedule("job", cron, timezone=timezone)
    assert runtime.schedules == {}


def test_unknown_blueprint_and_duplicate_names_are_refused() -> None:
    runtime = _runtime()
    with pytest.raises(ValueError, match="unknown blueprint id 'nope'"):
        runtime.schedule("nope", "* * * * *")
    runtime.schedule("job", "* * * * *")
    with pytest.raises(ValueError, match="exists already"):
        runtime.schedule("job", "*/2 * * * *")


def test_without_croniter_schedules_say_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_croniter(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "croniter":
            raise ImportError("No module named 'croniter'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_croniter)
    with pytest.raises(FlowcraftError, match=r"flowcraft\[cron\]"):
        _runtime().schedule("job", "* * * * *")


def test_a_client_without_coordination_store_is_refused() -> None:
    runtime = _runtime()
    adapter = InMemoryAdapter(runtime)
    adapter.coordination = None
    with pytest.raises(ValueError, match="coordination store"):
        Scheduler(runtime, adapter)


def test_the_example_misses_a_deadline_and_starts_a_missed_night_once() -> None:
    from examples import scheduled

    on_time, late, *nights = scheduled.main()
    assert on_time.status == "completed" and late.errors[0].type == "DeadlineExceeded"
    assert [r.status for r in nights] == ["completed", "completed"]  # two runs for three nights: one was missed


def test_run_loops_until_stopped_and_gives_the_lease_up() -> None:
    import threading

    runtime = _runtime()
    runtime.schedule("job", "* * * * * *")
    adapter = InMemoryAdapter(runtime)
    scheduler = Scheduler(runtime, adapter, lease_ttl=3.0)
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,))
    thread.start()
    try:
        deadline = dt.datetime.now().timestamp() + 10
        while not adapter.list_runs().runs and dt.datetime.now().timestamp() < deadline:
            stop.wait(0.05)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert [r.run_id.split(":")[:2] for r in adapter.list_runs().runs][:1] == [["schedule", "job"]]
    assert adapter.coordination.get(scheduler.lease_key) is None  # released: another takes over at once


def test_a_flow_given_to_schedule_is_registered() -> None:
    runtime = FlowRuntime()
    flow = create_flow("given").node("a", lambda ctx: 1)
    schedule = runtime.schedule(flow, "* * * * *")
    assert schedule.blueprint_id == "given" and "given" in runtime.blueprints and "given" in runtime.schedules


def test_a_start_that_failed_on_an_outage_is_tried_again_on_the_next_pass() -> None:
    clock, adapter, (scheduler,) = _setup()
    scheduler.check()
    clock.now = T0 + 30.1
    real = adapter.start_workflow
    calls: List[int] = []

    def down_once(*args: Any, **kwargs: Any) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the store is down")
        return real(*args, **kwargs)

    adapter.start_workflow = down_once  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        scheduler.check()
    assert scheduler.check() == [f"schedule:every:{int(T0 + 30)}"]  # its own claim does not stop it
