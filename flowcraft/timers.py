"""The in-memory timer scheduler: a sleeping in-memory run resumes by itself when its time comes.

The Python counterpart of Flowcraft TS's `WorkflowScheduler` (packages/core/src/runtime/scheduler.ts)
and `FlowRuntime.startScheduler` / `stopScheduler`: once a runtime's scheduler exists
(`runtime.start_scheduler()`), every in-memory run that ends `awaiting` on a `sleep` node is
registered with it, and a daemon thread resumes it (`runtime.resume(..., node_id=<the sleep>)`) once
its `wake_at` has passed. The result of each resume is kept (`result(run_id)`) and handed to
`on_result`; a run that awaits again (another sleep, a `wait`) stays registered only if it sleeps.
"""
from __future__ import annotations

import datetime as _dt
import logging
import threading
from typing import Any, Callable, Dict, List, Optional

import attrs

from .builtins import utc_now
from .result import AWAITING, WorkflowResult

logger = logging.getLogger("flowcraft.timers")

AWAITING_DETAILS_KEY = "_awaitingDetails"


@attrs.define
class SleepingRun:
    """A paused in-memory run waiting for one of its `sleep` nodes to wake."""

    run_id: str
    blueprint: Any
    serialized_context: str
    node_id: str
    wake_at: _dt.datetime
    registry: Optional[Dict[str, Any]] = None


class TimerScheduler:
    """Resumes sleeping in-memory runs of `runtime` when their wake-up time comes.

    `interval` is how often (seconds) the thread looks for due timers (TS: `checkIntervalMs`,
    default 1 s). `check()` does one pass now and returns the results of the runs it resumed, so
    a caller (or a test) can drive it without the thread."""

    def __init__(self, runtime: Any, interval: float = 1.0,
                 on_result: Optional[Callable[[WorkflowResult], None]] = None) -> None:
        if not interval > 0:
            raise ValueError(f"the scheduler's interval must be a positive number of seconds, not {interval!r}")
        self.runtime = runtime
        self.interval = float(interval)
        self.on_result = on_result
        self._runs: Dict[str, SleepingRun] = {}
        self._results: Dict[str, WorkflowResult] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # --- registration --------------------------------------------------------------------------

    def register(self, blueprint: Any, result: WorkflowResult, registry: Optional[Dict[str, Any]] = None) -> bool:
        """Register `result` if it is an awaiting run with a sleeping node; True if registered.
        A run whose every awaiting node is a `wait` (or a webhook) is not a timer's: it is left alone."""
        if result.status != AWAITING:
            self.unregister(result.run_id)
            return False
        details = result.context.get(AWAITING_DETAILS_KEY) or {}
        sleeps = [(_dt.datetime.fromisoformat(d["wake_at"]), n) for n, d in details.items()
                  if isinstance(d, dict) and d.get("type") == "sleep" and d.get("wake_at")]
        if not sleeps:
            self.unregister(result.run_id)
            return False
        wake_at, node_id = min(sleeps)
        with self._lock:
            self._runs[result.run_id] = SleepingRun(result.run_id, blueprint, result.serialized_context, node_id,
                                                    wake_at, registry)
        return True

    def unregister(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def sleeping(self) -> List[SleepingRun]:
        """The registered runs, soonest first (TS: `getActiveWorkflows`)."""
        with self._lock:
            return sorted(self._runs.values(), key=lambda r: r.wake_at)

    def result(self, run_id: str) -> Optional[WorkflowResult]:
        """The result of the last resume the scheduler made of `run_id` (TS: `getResumeResult`)."""
        with self._lock:
            return self._results.get(run_id)

    # --- running -------------------------------------------------------------------------------

    def check(self) -> List[WorkflowResult]:
        """Resume every registered run whose timer is due; return their results."""
        now = utc_now()
        with self._lock:
            due = [r for r in self._runs.values() if r.wake_at <= now]
            for run in due:
                del self._runs[run.run_id]
        results = []
        for run in due:
            try:
                # the resume re-registers the run if it sleeps again (FlowRuntime's hook)
                result = self.runtime.resume(run.blueprint, run.serialized_context, node_id=run.node_id,
                                             registry=run.registry, run_id=run.run_id)
            except Exception:  # TS logs and drops the run; so do we, with the traceback
                logger.exception("the scheduler could not resume run %s at node %s", run.run_id, run.node_id)
                continue
            with self._lock:
                self._results[run.run_id] = result
            results.append(result)
            if self.on_result is not None:
                try:
                    self.on_result(result)
                except Exception:
                    logger.exception("the scheduler's on_result failed for run %s", run.run_id)
        return results

    def start(self) -> None:
        """Start the thread (a no-op when it runs already, as TS)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="flowcraft-timers", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the thread; registered runs stay registered (a later `start` resumes them)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # never let the thread die silently
                logger.exception("the timer scheduler's pass failed")
