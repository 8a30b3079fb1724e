"""The worker loop: threads (lanes) that fetch jobs and hand them to `_jobs`, committer threads,
the fetch pace, stop and outage handling."""
from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from typing import Iterator, Optional, Sequence

from . import _batching as batching
from ..ports import Delivery
from ._worker_pool import HANDOFF_AFTER, Committer, JobBudget, LanePool, committer_threads, outage_delays
from ._common import _HANDOFF_IDLE, _OUTAGES, GIVE_BACK_AFTER
from ._jobs import _JobHandling


logger = logging.getLogger("flowcraft.distributed")


class _WorkerLoop(_JobHandling):
    """`work()`, `start()`, `stop()`: the loop of a worker process and its threads."""

    # === worker ==================================================================================

    def work(self, burst: bool = False, max_jobs: Optional[int] = None) -> int:
        """Process jobs until stopped (or, with `burst`, until the queue is empty); return how many.

        `threads` threads each fetch and handle jobs (each with its own queue and store connections
        where the adapter's are not thread-safe: `_lane`), and hand the commit rounds of the jobs
        they ran to committer threads (`_worker_pool.Committer`) while they run their next ones;
        the first of them is this thread (with one thread and `burst`, it does it all). A `stop()` that comes before
        `work()` starts is not lost: `work()` then returns at once."""
        try:
            return self._work(burst, max_jobs)
        finally:
            self._stop.clear()  # the request is served; the next `work()` runs

    def _work(self, burst: bool, max_jobs: Optional[int]) -> int:
        pool = LanePool(JobBudget(max_jobs), self.threads)
        if self.threads == 1 and burst:  # (a drain, a test: no committer thread to set up and tear down)
            self._pool = pool
            try:
                with self._worker_session():
                    self._serve(burst)
            finally:
                self._pool = None
            return pool.budget.processed
        lanes = [self._lane(i) for i in range(self.threads)]
        # the commit rounds of the threads' waves, in threads (with connections) of their own
        pool.committer = Committer()
        committers = [self._lane(self.threads + i) for i in range(committer_threads(self.threads))]
        for committer in committers:
            committer._committer = pool.committer
        lanes += committers
        for lane in lanes:
            lane._pool = pool
            lane._stop = pool.stop
        self._lanes = lanes
        self._running = pool
        if self._stop.is_set():  # (`stop()` sets both once `_running` is set: neither order loses it)
            pool.stop.set()
        # the first lane runs in this thread: node code that signals this process (or is
        # interrupted by a signal) runs where the signal's handler does, as with one thread
        threads = [threading.Thread(target=lane._lane_main, args=(burst,), name=f"flowcraft-worker-{i}", daemon=True)
                   for i, lane in enumerate(lanes[1:self.threads], start=1)]
        committing = [threading.Thread(target=lane._lane_main, args=(burst,), name=f"flowcraft-committer-{i}", daemon=True)
                      for i, lane in enumerate(committers)]
        try:
            with self._worker_session():  # the ports the lanes share (lanes with their own: `_lane_main`)
                for thread in committing + threads:
                    thread.start()
                try:
                    lanes[0]._serve(burst)
                except Exception as error:  # a bug: the other lanes stop too (and `work` raises it)
                    pool.fail(error)
                for thread in threads:
                    thread.join()
                pool.committer.close()
                for thread in committing:
                    thread.join()
        except BaseException:
            # this thread was interrupted (a forced stop): leave at once; the lanes are daemon
            # threads, and the jobs in their hands are delivered again
            pool.stop.set()
            raise
        finally:
            self._running = None
        self._conflicts += sum(lane._conflicts for lane in lanes)
        self._lanes = []
        for lane in lanes:
            lane._pool = None
            try:
                lane._close_lane()
            except Exception:
                logger.exception("worker: closing a worker thread's connections failed")
        if pool.error is not None:
            raise pool.error
        return pool.budget.processed

    def _lane(self, index: int) -> "_WorkerLoop":
        """A copy of this adapter that one worker thread runs (`index` > 0: another thread), with
        the same runtime, stop request and fetch pace; a queue or store whose client is not
        thread-safe gives the other threads ports of their own (its optional ``lane()``)."""
        lane = copy.copy(self)
        lane._lanes = []
        lane._running = None
        lane._conflicts = 0
        lane._thread = None
        lane._busy = threading.Lock()
        lane._batch_deadline = None
        lane._given_back = 0
        lane._committer = None
        lane._handoff = None
        lane._handing = False
        lane._own_ports = []
        if index > 0:
            queue_lane, store_lane = getattr(self.queue, "lane", None), getattr(self.store, "lane", None)
            if queue_lane is not None:
                lane.queue = queue_lane()
                lane._own_ports.append(lane.queue)
            if store_lane is not None:
                lane.store = store_lane()
                lane._own_ports.append(lane.store)
        return lane

    def _close_lane(self) -> None:
        """Close the ports this lane was given of its own (see `_lane`)."""
        for port in self._own_ports:
            port.close()

    @contextlib.contextmanager
    def _worker_session(self) -> Iterator[None]:
        """While a worker loop runs on these ports: the store's optional ``worker_session(queue)``
        (what it does only while a worker runs); at the end, the queue's optional ``release()``
        gives back what it took ahead of fetches and did not hand out."""
        session = getattr(self.store, "worker_session", None)
        with session(self.queue) if session is not None else contextlib.nullcontext():
            try:
                yield
            finally:
                release = getattr(self.queue, "release", None)
                if release is not None:
                    try:
                        release()
                    except (ConnectionError, OSError) as error:  # they come back with the broker's own recovery
                        logger.warning("worker: could not give back the jobs held ahead: %s", error)

    def _lane_main(self, burst: bool) -> None:
        pool = self._pool
        assert pool is not None
        try:
            with self._worker_session() if self._own_ports else contextlib.nullcontext():
                self._serve(burst)
        except BaseException as error:  # a bug or a simulated crash: the worker stops (and `work` raises it)
            pool.fail(error)

    def _serve(self, burst: bool) -> None:
        """One worker thread's loop (`_loop`); adapters wrap it with what each thread sets up."""
        self._loop(burst)

    def _loop(self, burst: bool) -> None:
        pool = self._pool
        assert pool is not None
        if self._committer is not None:
            self._committer.serve(self._finish_waves)
            return
        try:
            self._fetch_loop(pool, burst)
        finally:
            self._settle_handoff(quiet=True)

    def _fetch_loop(self, pool: LanePool, burst: bool) -> None:
        budget = pool.budget
        delays: Optional[Iterator[float]] = None
        while not self._stop.is_set():
            size = self.pace.size()
            self._handing = pool.committer is not None and self._slow_jobs()
            handed = self._handoff is not None
            self._hold(size + handed)  # the wave handed to the committer is not acknowledged yet
            want = budget.reserve(size)
            if want <= 0:
                break
            taken = 0
            try:
                wait = 0.0 if burst else min(self.poll_timeout, _HANDOFF_IDLE) if handed else self.poll_timeout
                deliveries = self.queue.fetch(want, timeout=wait)
                taken = len(deliveries)
                if not deliveries:
                    if handed:
                        self._settle_handoff()
                    elif burst and pool.idle_done():
                        break
                    delays = None
                    continue
                with pool.working(), self._busy:
                    began = time.monotonic()
                    self._given_back = 0
                    if self._handing:
                        self._handle_handing_off(pool.committer, deliveries)  # type: ignore[arg-type]  # `_handing` says there is one
                    else:
                        self._settle_handoff()  # (the jobs turned fast: this thread commits again)
                        if len(deliveries) == 1:
                            self.handle(deliveries[0])
                        else:
                            self._handle_fetched(deliveries)
                    self.pace.record(len(deliveries) - self._given_back, time.monotonic() - began)
                delays = None
            except (ConnectionError, OSError) as error:
                self._settle_handoff(quiet=True)
                # a service is down: the unacknowledged jobs come back; wait (at most about a
                # second, jittered, however long the outage) and go on
                failed_at = time.monotonic()
                delays = delays or outage_delays()
                delay = next(delays)
                logger.warning("worker: %s; retrying in %.2fs", error, delay)
                if self._stop.wait(delay):
                    break
                try:
                    pool.after_outage(self, failed_at)
                except (ConnectionError, OSError):
                    continue
            finally:
                budget.settle(want, taken)
            if budget.spent:
                break

    def _slow_jobs(self) -> bool:
        """Whether jobs take long enough (`HANDOFF_AFTER`, mean) to hand their commit rounds to the
        committer: while they are fast, the thread commits itself (a commit may take its next
        jobs in the same round trip), as a hand-off would only add the wake-ups of two threads."""
        mean = self.pace.mean
        return mean is not None and mean >= HANDOFF_AFTER

    def _handle_fetched(self, deliveries: Sequence[Delivery]) -> None:
        if not self.pace.fixed and hasattr(self.queue, "give_back"):
            self._batch_deadline = time.monotonic() + max(GIVE_BACK_AFTER * self.pace.budget, 0.05)
        try:
            self._handle_batch_guarded(deliveries)
        finally:
            self._batch_deadline = None

    def _handle_handing_off(self, committer: Committer, deliveries: Sequence[Delivery]) -> None:
        """Run the node code of a batch of one wave, then hand its commit round to the committer
        (once the one handed in before is done and acknowledged) and return: the thread fetches
        its next jobs while the committer commits. A batch of several waves is handled here, each
        wave seeing the commits of those before."""
        segments, later = batching.first_wave(deliveries)
        if later:
            self._settle_handoff()
            self._handle_fetched(deliveries)
            return
        if len(deliveries) > 1 and not self.pace.fixed and hasattr(self.queue, "give_back"):
            self._batch_deadline = time.monotonic() + max(GIVE_BACK_AFTER * self.pace.budget, 0.05)
        try:
            wave, deferred = self._run_wave(segments)
        except _OUTAGES:
            raise
        except Exception:
            logger.exception("worker: a batch of %d deliveries failed; handling them one by one", len(deliveries))
            self._settle_handoff()
            for delivery in deliveries:
                self.handle(delivery)
            return
        finally:
            self._batch_deadline = None
        self._settle_handoff()
        if wave.prepared:
            pool = self._pool
            assert pool is not None
            pool.handing(+1)
            self._handoff = (committer.submit(wave), [p.delivery for p in wave.prepared])  # type: ignore[misc]  # a wave's jobs come with their deliveries
        if deferred:  # a segment cut short: its rest waits for this wave's commits
            self._settle_handoff()
            self._handle_fetched(deferred)

    def _settle_handoff(self, quiet: bool = False) -> None:
        """Wait for the wave handed to the committer and acknowledge its deliveries; a bug in its
        commit round: handle them again one by one (those done are found done). `quiet` (the loop
        ends, or an outage): an outage is logged, the deliveries come back unacknowledged."""
        handoff, self._handoff = self._handoff, None
        if handoff is None:
            return
        done, deliveries = handoff
        try:
            try:
                try:
                    done.wait()
                finally:
                    if self._pool is not None:
                        self._pool.handing(-1)
            except _OUTAGES:
                raise
            except Exception:
                logger.exception("worker: committing a wave of %d deliveries failed; handling them one by one",
                                 len(deliveries))
                for delivery in deliveries:
                    self.handle(delivery)
                return
            self._ack_quietly(deliveries)
        except (ConnectionError, OSError) as error:
            if not quiet:
                raise
            logger.warning("worker: %s; %d deliveries come back unacknowledged", error, len(deliveries))

    def _hold(self, size: int) -> None:
        """The next fetch asks for `size` jobs (with those held unacknowledged): a queue that
        takes jobs ahead of a fetch (its optional ``hold(count, commits_take)``: a broker's
        prefetch window, jobs taken with a commit) holds no more than that, nor more than the
        job budget leaves; `commits_take` is False while a committer thread commits this
        thread's jobs (jobs its commits took would wait while this thread waits on the queue)."""
        hold = getattr(self.queue, "hold", None)
        if hold is None:
            return
        left = self._pool.budget.left if self._pool is not None else None
        hold(size if left is None else max(0, min(size, left)), commits_take=not self._handing)

    def close(self) -> None:
        """Stop the worker if one runs (`stop()`), then close the queue and the store (if it has
        `close()`)."""
        if self._thread is not None or self._running is not None or self._pool is not None:
            self.stop()
        self.queue.close()
        close_store = getattr(self.store, "close", None)
        if close_store is not None:
            close_store()

    def start(self) -> None:
        """Run `work()` in a background thread."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.work, name="flowcraft-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish (and acknowledge) the jobs in hand (of every thread), then stop the worker."""
        self._stop.set()
        running = self._running
        if running is not None:
            running.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def after_outage(self) -> None:
        """Called once a worker loop retries after a connection error: the queue's optional
        ``recover()`` gives back the jobs this worker held; may raise `ConnectionError` again."""
        recover = getattr(self.queue, "recover", None)
        if recover is not None:
            recover()
