"""Deadlines and schedules (SPEC 14): a nightly report that must be done within ten minutes.

`metadata.deadline` (seconds) fails a run that has not ended in time with `DeadlineExceeded`;
`runtime.schedule(...)` starts a run on every tick of a cron expression once `flowcraft scheduler`
runs (needs the `cron` extra, croniter):

    flowcraft schedules --app examples.scheduled:runtime     # the schedule and its next tick
    flowcraft scheduler --app examples.scheduled:runtime     # starts the runs (any number may run)

Run this file to see both in memory: a report run that makes it, one that misses a short deadline,
and a `Scheduler` driven by a clock of our own through two nights, one of them missed.

    python examples/scheduled.py
"""
from __future__ import annotations

import datetime as dt
from typing import Any, List

from flowcraft import FlowRuntime, WorkflowResult, create_flow
from flowcraft.schedules import Scheduler


def gather(ctx: Any) -> dict:
    if ctx.cancel.wait(float(ctx.context.get("slowness", 0))):  # a slow data source; wakes at the deadline
        return {}  # discarded: the run failed at its deadline
    return {"orders": 42}


def send(ctx: Any) -> str:
    return f"report sent to {', '.join(ctx.context.get('recipients') or ['nobody'])}"


flow = (create_flow("nightly-report", metadata={"version": "1", "deadline": 600})
        .node("gather", gather).node("send", send).edge("gather", "send"))
runtime = FlowRuntime()
runtime.add_blueprint(flow)
runtime.schedule("nightly-report", "0 3 * * *", {"recipients": ["ops@example.com"]}, name="nightly",
                 timezone="Europe/Paris")


def main() -> List[WorkflowResult]:
    on_time = runtime.run("nightly-report", {"recipients": ["ops@example.com"]})
    print(f"on time: {on_time.status}: {on_time.context['send']}")
    late = runtime.run("nightly-report", {"slowness": 5}, deadline=0.5)
    print(f"late: {late.status}: {late.errors[0].type}: {late.errors[0].message}")

    now = [dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc).timestamp()]
    started: List[WorkflowResult] = []
    scheduler = Scheduler(runtime, clock=lambda: now[0])  # in memory: runs with runtime.run
    scheduler.check()  # first seen at noon: the first tick is tonight at 03:00 in Paris
    for hours in (15.5, 48):  # the next morning; then two days later (a night missed: started once)
        now[0] += hours * 3600
        for run_id in scheduler.check():
            started.append(scheduler.results["nightly"])
            print(f"scheduler started {run_id}: {started[-1].status}")
    row = scheduler.describe()[0]
    print(f"schedule {row['name']}: next tick {row['next_tick']}, last started {row['last_started_tick']}")
    return [on_time, late, *started]


if __name__ == "__main__":
    main()
