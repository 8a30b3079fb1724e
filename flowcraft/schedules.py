"""Schedules (SPEC 14): runs started on a cron expression.

`FlowRuntime.schedule(blueprint_id, cron, ...)` registers a `Schedule` with the runtime; a
`Scheduler` (the `flowcraft scheduler` command runs one) starts its runs. Cron expressions are
parsed by `croniter` (the optional extra `cron`), imported only when a schedule is made: five
fields (minute hour day month weekday), or six, the sixth giving seconds (croniter's convention:
``* * * * * */10`` is every ten seconds), in the schedule's `timezone` (an IANA name).

Any number of schedulers may run, in any processes, against one coordination store:

- a *lease* (`set_if_not_exist` / `extend_ttl` on one key, renewed every third of its TTL) makes
  one of them the leader, which alone starts runs; a leader that dies stops renewing, and another
  takes the lease over once it expires (followers try every `poll` seconds);
- each tick's run has an id derived from the schedule's name and the tick's time, claimed first
  in the coordination store (`tick:<name>:<epoch>`): two schedulers racing on one tick (a leader
  whose lease ran out while it was paused, say) start one run, as the store refuses a second run
  of that id;
- the last tick started is kept per schedule (`last:<name>`): a scheduler that comes back after
  ticks were missed starts the latest missed tick once, not once per missed tick. A schedule's
  first tick is the first one after a scheduler first saw it.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import attrs

from .errors import FlowcraftError
from .ports import CoordinationStore, identity_problem
from .serializer import check_values

logger = logging.getLogger("flowcraft.schedules")

DEFAULT_LEASE_TTL = 10.0  # seconds
DEFAULT_PREFIX = "flowcraft:scheduler:"
_SEEN = "seen"  # marks the kept tick a scheduler first saw a schedule at (no run started)
_CRON_EXTRA = "schedules need a cron parser: pip install 'flowcraft[cron]' (croniter)"


def _croniter() -> Any:
    try:
        from croniter import croniter
    except ImportError:
        raise FlowcraftError(_CRON_EXTRA) from None
    return croniter


def _zone(name: Any) -> Any:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if not isinstance(name, str) or not name:
        raise ValueError(f"timezone must be an IANA time zone name such as 'UTC' or 'Europe/Paris', not {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r}: use an IANA time zone name such as 'UTC' or 'Europe/Paris'") from None


@attrs.frozen
class Schedule:
    """Start a run of `blueprint_id` with `initial_context` on every tick of `cron` in `timezone`."""

    name: str
    blueprint_id: str
    cron: str
    initial_context: Optional[Dict[str, Any]] = None
    timezone: str = "UTC"

    def _iter(self, at: float) -> Any:
        return _croniter()(self.cron, _dt.datetime.fromtimestamp(at, _zone(self.timezone)))

    def next_tick(self, after: float) -> float:
        """The first tick strictly after `after` (epoch seconds)."""
        return float(self._iter(after).get_next(float))

    def latest_tick(self, at: float) -> float:
        """The latest tick at or before `at` (epoch seconds)."""
        tick = float(self._iter(at).get_prev(float))
        following = self.next_tick(tick)
        return following if following <= at else tick

    def run_id(self, tick: float) -> str:
        """The id of the run of `tick`: the same in every scheduler (see the module doc)."""
        return f"schedule:{self.name}:{int(tick)}"


def make_schedule(runtime: Any, blueprint_id: Any, cron: Any, initial_context: Optional[Mapping[str, Any]] = None,
                  name: Optional[str] = None, timezone: str = "UTC") -> Schedule:
    """A checked `Schedule` (one clear `ValueError` naming what is wrong; nothing registered)."""
    blueprint = runtime.blueprint(blueprint_id)
    name = blueprint.id if name is None else name
    problem = identity_problem(name)
    if problem is not None or (isinstance(name, str) and len(name) > 200):
        raise ValueError(f"schedule name {name!r} {problem or 'is longer than 200 characters'}")
    if name in runtime.schedules:
        raise ValueError(f"a schedule named {name!r} exists already: give this one another name=")
    if not isinstance(cron, str):
        raise ValueError(f"schedule {name!r}: the cron expression must be a string, not {type(cron).__name__}")
    _zone(timezone)
    croniter = _croniter()
    try:
        croniter(cron, _dt.datetime.now(_dt.timezone.utc)).get_next(float)
    except (ValueError, KeyError, TypeError) as error:  # croniter's errors are ValueErrors (CroniterError)
        raise ValueError(f"schedule {name!r}: bad cron expression {cron!r}: {error}") from None
    context = dict(initial_context) if initial_context is not None else None
    if context is not None:
        check_values(context, f"schedule {name!r} initial context", runtime.max_value_bytes)
    if not isinstance(blueprint_id, str) and runtime.blueprints.get(blueprint.id) is not blueprint:
        runtime.add_blueprint(blueprint_id)  # a blueprint or Flow given: its runs need it known
    return Schedule(name, blueprint.id, cron, context, timezone)


def _format(at: Optional[float], zone: str = "UTC") -> Optional[str]:
    if at is None:
        return None
    return _dt.datetime.fromtimestamp(at, _zone(zone)).isoformat()


class Scheduler:
    """Starts the runs of `runtime.schedules` on time, as leader of the schedulers sharing
    `coordination` (see the module doc).

    `client` starts the runs: a distributed adapter (`start_workflow(blueprint, context,
    run_id=...)`), or None to run them in memory with `runtime.run` (in the scheduler's thread;
    `results` keeps each schedule's latest result).
    `coordination` defaults to the client's, else (in memory) an `InMemoryCoordinationStore`.
    `clock` (epoch seconds) and `check(now)` let a test drive it without waiting."""

    def __init__(self, runtime: Any, client: Any = None, coordination: Optional[CoordinationStore] = None, *,
                 lease_ttl: float = DEFAULT_LEASE_TTL, poll: Optional[float] = None, prefix: str = DEFAULT_PREFIX,
                 clock: Callable[[], float] = time.time, name: Optional[str] = None,
                 on_start: Optional[Callable[[Schedule, float, str], None]] = None) -> None:
        if not lease_ttl > 0:
            raise ValueError(f"lease_ttl must be a positive number of seconds, not {lease_ttl!r}")
        self.runtime = runtime
        self.client = client
        if coordination is None:
            coordination = getattr(client, "coordination", None)
        if coordination is None:
            if client is not None:
                raise ValueError("a scheduler needs a coordination store (for its lease): this client has none")
            from .testing.fakes import InMemoryCoordinationStore

            coordination = InMemoryCoordinationStore(clock)
        self.coordination = coordination
        self.lease_ttl = float(lease_ttl)
        self.poll = float(poll) if poll is not None else min(self.lease_ttl / 10, 0.5)
        self.prefix = prefix
        self.clock = clock
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.on_start = on_start
        self.leader = False
        self._renewed_at = float("-inf")
        self.results: Dict[str, Any] = {}  # in memory: schedule name -> the `WorkflowResult` of its latest run

    # --- the lease ---------------------------------------------------------------------------

    @property
    def lease_key(self) -> str:
        return f"{self.prefix}lease"

    def acquire(self) -> bool:
        """Take the lease, or renew it if this scheduler holds it; True while it is the leader."""
        now = self.clock()
        if self.leader and now - self._renewed_at < self.lease_ttl / 3:
            return True
        key = self.lease_key
        if self.coordination.set_if_not_exist(key, self.name, self.lease_ttl):
            if not self.leader:
                logger.info("scheduler %s is the leader", self.name)
            self.leader, self._renewed_at = True, now
        elif self.coordination.get(key) == self.name and self.coordination.extend_ttl(key, self.lease_ttl):
            self.leader, self._renewed_at = True, now
        else:
            if self.leader:
                logger.warning("scheduler %s lost the lease", self.name)
            self.leader = False
        return self.leader

    def release(self) -> None:
        """Give the lease up (a stopping scheduler: another takes over at once)."""
        if self.leader and self.coordination.get(self.lease_key) == self.name:
            self.coordination.delete(self.lease_key)
        self.leader = False

    # --- ticks -------------------------------------------------------------------------------

    def _last(self, schedule: Schedule) -> Optional[Tuple[float, bool]]:
        """(the last tick dealt with, whether a run was started for it: False for the tick a
        scheduler first saw the schedule at), as the coordination store keeps it; None if none."""
        text = self.coordination.get(f"{self.prefix}last:{schedule.name}")
        if text is None:
            return None
        tick, _, mark = text.partition(" ")
        try:
            return float(tick), mark != _SEEN
        except ValueError:
            return None

    def last_started(self, schedule: Schedule) -> Optional[float]:
        """The tick of the last run started for `schedule` (None: none yet)."""
        last = self._last(schedule)
        return last[0] if last is not None and last[1] else None

    def _keep_last(self, schedule: Schedule, tick: float, started: bool) -> None:
        key = f"{self.prefix}last:{schedule.name}"
        known = self._last(schedule)
        if known is not None and known[0] >= tick:
            return
        self.coordination.delete(key)  # the store has no plain set; only the leader writes it
        self.coordination.set_if_not_exist(key, repr(tick) if started else f"{tick!r} {_SEEN}", 0)

    def check(self, now: Optional[float] = None) -> List[str]:
        """One pass: if this scheduler is the leader, start each schedule's due tick; return the ids
        of the runs it started."""
        if not self.acquire():
            return []
        now = self.clock() if now is None else now
        started = []
        for schedule in list(self.runtime.schedules.values()):
            try:
                run_id = self._due(schedule, now)
            except (ConnectionError, OSError):
                raise
            except Exception:  # one broken schedule (a blueprint gone) must not stop the others
                logger.exception("scheduler: schedule %r failed", schedule.name)
                continue
            if run_id is not None:
                started.append(run_id)
        return started

    def _due(self, schedule: Schedule, now: float) -> Optional[str]:
        tick = schedule.latest_tick(now)
        last = self._last(schedule)
        if last is None:  # first seen: its first tick is the next one
            self._keep_last(schedule, tick, started=False)
            return None
        if tick <= last[0]:
            return None
        run_id = self._start(schedule, tick)  # only the latest of the ticks missed since the last
        self._keep_last(schedule, tick, started=True)
        return run_id

    def _start(self, schedule: Schedule, tick: float) -> Optional[str]:
        run_id = schedule.run_id(tick)
        claim = f"{self.prefix}tick:{schedule.name}:{int(tick)}"
        if not self.coordination.set_if_not_exist(claim, self.name, max(self.lease_ttl, 60.0)) \
                and self.coordination.get(claim) != self.name:  # ours: an earlier try failed (an outage)
            return None  # another scheduler is starting it
        context = dict(schedule.initial_context or {})
        if self.client is None:
            self.results[schedule.name] = self.runtime.run(schedule.blueprint_id, context, run_id=run_id)
        else:
            try:
                self.client.start_workflow(schedule.blueprint_id, context, run_id=run_id)
            except ValueError:
                if self.client.get_status(run_id) is None:
                    raise
                return None  # started already (by a scheduler whose claim expired)
        logger.info("schedule %r: started run %s for the tick of %s", schedule.name, run_id, _format(tick, schedule.timezone))
        if self.on_start is not None:
            self.on_start(schedule, tick, run_id)
        return run_id

    # --- running -----------------------------------------------------------------------------

    def wait_time(self, now: float) -> float:
        """How long to sleep before the next pass: until the next tick, at most until the lease
        needs renewing (leader) or may be taken over (follower)."""
        if not self.leader:
            return self.poll
        ticks = [s.next_tick(now) for s in self.runtime.schedules.values()]
        until = min(ticks) - now if ticks else self.lease_ttl / 3
        return max(0.005, min(until, self.lease_ttl / 3 - (now - self._renewed_at)))

    def run(self, stop: threading.Event) -> None:
        """Pass after pass until `stop` is set; outages are logged and retried after `poll`."""
        try:
            while not stop.is_set():
                try:
                    self.check()
                    delay = self.wait_time(self.clock())
                except (ConnectionError, OSError) as error:
                    logger.warning("scheduler: %s; retrying in %.1fs", error, self.poll)
                    self.leader = False
                    delay = self.poll
                stop.wait(delay)
        finally:
            try:
                self.release()
            except (ConnectionError, OSError):
                logger.warning("scheduler: could not release the lease; it expires in %gs", self.lease_ttl)

    def describe(self, now: Optional[float] = None) -> List[Dict[str, Any]]:
        """The schedules with their next tick and last started tick (`flowcraft schedules`)."""
        now = self.clock() if now is None else now
        rows = []
        for schedule in self.runtime.schedules.values():
            last = self.last_started(schedule)
            rows.append({"name": schedule.name, "blueprint_id": schedule.blueprint_id, "cron": schedule.cron,
                         "timezone": schedule.timezone, "next_tick": _format(schedule.next_tick(now), schedule.timezone),
                         "last_started_tick": _format(last, schedule.timezone),
                         "last_run_id": schedule.run_id(last) if last is not None else None})
        return rows


__all__ = ["Schedule", "Scheduler", "make_schedule"]
