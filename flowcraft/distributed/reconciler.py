"""The reconciler: runs idle past a threshold get their frontier re-enqueued."""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Iterable, Tuple

import attrs

from .. import routing
from ._common import _OUTAGES

if TYPE_CHECKING:
    from . import DistributedAdapter

logger = logging.getLogger("flowcraft.distributed")


@attrs.frozen
class ReconcileStats:
    scanned: int = 0
    stalled: int = 0
    reconciled: int = 0
    failed: int = 0
    unserved: int = 0  # jobs waiting on a queue no live worker serves (SPEC 14)


class Reconciler:
    """Finds runs idle past a threshold and re-enqueues their frontier (`DistributedAdapter.reconcile`).

    Idleness is the store's (`RunStore.idle_runs`, based on the `updated_at` every commit
    refreshes). A pass also uses what the ports offer beyond that: the store's optional
    ``sweep_outbox(threshold, queue, limit)`` first publishes the outbox rows a killed worker left
    behind; the queue's optional ``take_abandoned()`` names the runs whose jobs a worker that is
    gone held, reconciled at once, idle or not, inside its optional ``reconcile_pass()`` (what
    the queue checks once per pass instead of once per run)."""

    def __init__(self, adapter: DistributedAdapter, stalled_threshold_seconds: float = 300.0, limit: int = 1000) -> None:
        self.adapter = adapter
        self.stalled_threshold_seconds = stalled_threshold_seconds
        self.limit = limit

    def run(self) -> ReconcileStats:
        queue, store = self.adapter.queue, self.adapter.store
        sweep = getattr(store, "sweep_outbox", None)
        if sweep is not None:
            swept = sweep(self.stalled_threshold_seconds, queue, self.limit)
            if swept:
                logger.info("reconciler: published %d outbox row(s) left behind again", swept)
        reconcile_pass = getattr(queue, "reconcile_pass", None)
        with reconcile_pass() if reconcile_pass is not None else contextlib.nullcontext():
            take_abandoned = getattr(queue, "take_abandoned", None)
            abandoned = take_abandoned() if take_abandoned is not None else []
            reconciled, failed = self.reconcile_each(abandoned)
            scanned, idle = store.idle_runs(self.stalled_threshold_seconds, self.limit)
            idle_reconciled, idle_failed = self.reconcile_each(idle)
        return ReconcileStats(scanned=scanned, stalled=len(idle), reconciled=reconciled + idle_reconciled,
                              failed=failed + idle_failed, unserved=self.unserved())

    def unserved(self) -> int:
        """How many jobs wait on a queue no live worker serves (a WARNING names the queues)."""
        try:
            waiting = routing.unserved(self.adapter.queue, self.adapter.runtime)
        except _OUTAGES:
            raise
        except Exception:  # the count is a report: a queue that cannot tell must not stop reconciling
            logger.exception("reconciler: counting the jobs on unserved queues failed")
            return 0
        if waiting:
            logger.warning("reconciler: %d job(s) wait on queue(s) no live worker serves: %s", sum(waiting.values()),
                           ", ".join(f"{name} ({n})" for name, n in waiting.items()))
        return sum(waiting.values())

    def reconcile_each(self, run_ids: Iterable[str]) -> Tuple[int, int]:
        """`adapter.reconcile` each run: (how many had work re-enqueued, how many failed to)."""
        reconciled = failed = 0
        for run_id in run_ids:
            try:
                if self.adapter.reconcile(run_id):
                    reconciled += 1
            except Exception:
                logger.exception("reconciling run %s failed", run_id)
                failed += 1
        return reconciled, failed
