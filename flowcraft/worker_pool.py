"""What the threads of one worker share: how many jobs to take per fetch (`FetchPace`), how many
jobs the worker may still take (`JobBudget`), and the delays between retries after an outage
(`outage_delays`).

A worker holds only what it can start soon (SPEC section 10). `FetchPace` sizes each fetch from
the recent mean time a job took in this worker: while jobs are fast (a no-op node costs well under
a millisecond) a fetch takes up to `budget / mean` jobs, so that one round trip serves many; once
they are slow (tens of milliseconds and more) it takes one per free thread, so the rest of a
fan-out stays in the queue for idle workers. A fresh worker, which knows nothing yet, takes one
job, and the size at most doubles from one fetch to the next.
"""
from __future__ import annotations

import random
import threading
from typing import Iterator, Optional

DEFAULT_FETCH_BUDGET = 0.02  # seconds of jobs one fetch may hold when they run one after the other
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


__all__ = ["DEFAULT_FETCH_BUDGET", "FetchPace", "JobBudget", "OUTAGE_DELAY_MAX", "outage_delays"]
