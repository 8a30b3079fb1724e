"""What the threads of one worker share: how many jobs to take per fetch (`FetchPace`), how many
jobs the worker may still take (`JobBudget`), the delays between retries after an outage
(`outage_delays`), the thread that commits for them all (`Committer`), and what the threads of
one `work()` share (`LanePool`).

A worker holds only what it can start soon (SPEC section 10). `FetchPace` sizes each fetch from
the recent mean time a job took in this worker: while jobs are fast (a no-op node costs well under
a millisecond) a fetch takes up to `budget / mean` jobs, so that one round trip serves many; once
they are slow (tens of milliseconds and more) it takes one per free thread, so the rest of a
fan-out stays in the queue for idle workers. A fresh worker, which knows nothing yet, takes one
job, and the size at most doubles from one fetch to the next.
"""
from __future__ import annotations

import contextlib
import random
import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Protocol, Sequence

DEFAULT_FETCH_BUDGET = 0.02  # seconds of jobs one fetch may hold when they run one after the other
# mean seconds a job takes from which its thread hands the commit round to a committer thread
# (`Committer`) and runs its next job meanwhile: a commit round is a few round trips, about a
# millisecond each here
HANDOFF_AFTER = 0.005
OUTAGE_DELAY_MIN = 0.05
OUTAGE_DELAY_MAX = 1.0  # so a worker resumes within about a second of a service coming back


class FetchPace:
    """The size of the next fetch: `ceiling` when `fixed`, else adapted to the mean job duration.

    Thread-safe; the mean is an exponentially weighted moving average over batches."""

    def __init__(self, ceiling: int, budget: float = DEFAULT_FETCH_BUDGET, fixed: bool = False,
                 weight: float = 0.5) -> None:
        if budget <= 0:
            raise ValueError(f"fetch budget must be > 0 seconds, not {budget!r}")
        self.ceiling = max(1, int(ceiling))
        self.budget = float(budget)
        self.fixed = fixed
        self.weight = weight
        self._mean: Optional[float] = None
        self._last = 1  # the size last handed out: the next is at most twice that
        self._lock = threading.Lock()

    @property
    def mean(self) -> Optional[float]:
        """Seconds per job, as recently measured (None before the first measure)."""
        return self._mean

    def size(self) -> int:
        if self.fixed:
            return self.ceiling
        with self._lock:
            mean = self._mean
            if mean is None:
                return 1
            target = self.ceiling if mean <= 0 else int(self.budget / mean)
            self._last = size = max(1, min(self.ceiling, target, 2 * self._last))
            return size

    def record(self, jobs: int, seconds: float) -> None:
        """`jobs` jobs were handled, one after the other, in `seconds`."""
        if jobs <= 0:
            return
        per_job = max(0.0, seconds) / jobs
        with self._lock:
            self._mean = per_job if self._mean is None else self.weight * per_job + (1 - self.weight) * self._mean


class JobBudget:
    """How many jobs the worker's threads may still take (`max_jobs` of `work()`), and how many
    they processed. Thread-safe."""

    def __init__(self, max_jobs: Optional[int]) -> None:
        self.left = max_jobs
        self.processed = 0
        self._lock = threading.Lock()

    def reserve(self, want: int) -> int:
        """Up to `want` jobs this thread may take now (0: the budget is spent)."""
        with self._lock:
            if self.left is None:
                return want
            take = max(0, min(want, self.left))
            self.left -= take
            return take

    def settle(self, reserved: int, taken: int) -> None:
        """`taken` of the `reserved` jobs were fetched (and will be processed)."""
        with self._lock:
            self.processed += taken
            if self.left is not None:
                self.left += reserved - taken

    @property
    def spent(self) -> bool:
        return self.left is not None and self.left <= 0


def outage_delays(rng: Optional[random.Random] = None) -> Iterator[float]:
    """The waits between retries during an outage: doubling from `OUTAGE_DELAY_MIN` up to
    `OUTAGE_DELAY_MAX` (however long the outage), each jittered down to half of it, so a fleet of
    workers does not retry in step."""
    rng = rng or random.Random()
    delay = OUTAGE_DELAY_MIN
    while True:
        yield delay * rng.uniform(0.5, 1.0)
        delay = min(delay * 2, OUTAGE_DELAY_MAX)


class Handoff:
    """One worker thread's executed wave, handed to the `Committer`."""

    __slots__ = ("work", "done", "error")

    def __init__(self, work: Any) -> None:
        self.work = work
        self.done = threading.Event()
        self.error: Optional[BaseException] = None

    def wait(self) -> None:
        """Until the committer finished it; re-raises what finishing it raised."""
        self.done.wait()
        if self.error is not None:
            raise self.error


class _Recovers(Protocol):
    def after_outage(self) -> None: ...


class LanePool:
    """What the threads (lanes) of one `work()` share."""

    def __init__(self, budget: JobBudget, threads: int) -> None:
        self.budget = budget
        self.threads = threads
        self.lock = threading.Lock()
        self.active = 0  # lanes handling jobs right now
        self.error: Optional[BaseException] = None
        self.recovered_at = float("-inf")  # when a lane last ran `after_outage`
        self.committer: Optional[Committer] = None  # threads > 1: the commit rounds of their waves
        # the lanes' stop request: never cleared, so lanes left behind by a forced stop (an
        # exception in the calling thread) still stop once their jobs in hand are done
        self.stop = threading.Event()

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        with self.lock:
            self.active += 1
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1

    def fail(self, error: BaseException) -> None:
        """A lane died of `error`: every lane stops, and `work()` raises the first such error."""
        with self.lock:
            if self.error is None:
                self.error = error
        self.stop.set()

    def handing(self, delta: int) -> None:
        """A wave handed to the committer (+1) or settled (-1): its commit may enqueue more jobs,
        so its thread counts as active until then."""
        with self.lock:
            self.active += delta

    def idle_done(self) -> bool:
        """A burst lane found the queue empty: done once no other lane is handling jobs (their
        commits may enqueue more); else it waits a moment and looks again."""
        with self.lock:
            if self.active == 0:
                return True
        time.sleep(0.002)
        return False

    def after_outage(self, lane: "_Recovers", failed_at: float) -> None:
        """`lane.after_outage()`, unless another lane ran it since this one failed: the jobs the
        worker held were given back once, not once per thread."""
        with self.lock:
            if self.recovered_at > failed_at:
                return
            lane.after_outage()
            self.recovered_at = time.monotonic()


def committer_threads(threads: int) -> int:
    """Committer threads for `threads` worker threads: one per four (each commit round is a few
    round trips; rounds of different committers run at once, on connections of their own)."""
    return max(1, (threads + 3) // 4)


class Committer:
    """The commit rounds of the worker threads' executed waves, in threads of their own (`serve`):
    each round takes every wave handed in meanwhile and finishes them together (one store commit,
    one publish for the node executions of several threads), while those threads already run
    their next jobs. A thread hands in one wave at a time and waits for it (`Handoff.wait`)
    before it hands in the next, so the round trips of a commit overlap a node's execution
    instead of adding to it."""

    def __init__(self) -> None:
        self._pending: List[Handoff] = []
        self._cond = threading.Condition()
        self._closed = False

    def submit(self, work: Any) -> Handoff:
        handoff = Handoff(work)
        with self._cond:
            if self._closed:
                raise RuntimeError("the committer is closed")
            self._pending.append(handoff)
            self._cond.notify()
        return handoff

    def serve(self, finish: Callable[[Sequence[Any]], None]) -> None:
        """Finish what is handed in with `finish` (the waves pending, at once), until `close()`
        (then what is still pending, and return). Several threads may serve at once."""
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                batch, self._pending = self._pending, []
                if not batch:
                    return
            error: Optional[BaseException] = None
            try:
                finish([h.work for h in batch])
            except BaseException as raised:  # each thread that handed one in deals with it
                error = raised
            for handoff in batch:
                handoff.error = error
                handoff.done.set()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


__all__ = ["Committer", "LanePool", "committer_threads", "DEFAULT_FETCH_BUDGET", "HANDOFF_AFTER", "FetchPace", "Handoff", "JobBudget", "OUTAGE_DELAY_MAX", "outage_delays"]
