"""The distributed driver: workers that execute one node per job, over the ports of `ports.py`.

All orchestration lives here; adapters only implement the ports. The parts: `worker` (the loop of
a worker process and its threads; `_worker_pool`: committer threads, fetch pace, job budget),
`_jobs` (deliveries and waves into node executions and commits; `_batching` cuts a fetch into
waves), `_plan` (step 5: one outcome into one `Commit`, through `flowcraft.outcome`),
`_worker_context` (the context and engine node code sees), `client` (what a client calls, and the
operations of SPEC 11), `reconciler`; `_base` holds the one constructor and the events, `_common`
what the parts share. One job is handled as:

1. parse it, within bounds (`ports.load_job_json`): a malformed job is dead-lettered, and its run
   failed only when the job carries that run's own identity (the run exists, is of the blueprint
   named, which has the node named); a job naming a blueprint or node its run lacks fails nobody;
2. load the run's record, the node's state and its successors' states, and the node's input;
3. skip it if the node is not ready at the job's iteration (a duplicate, or stale after a loop lap);
4. run the node code (the only step that may run twice, after a crash);
5. derive the routing decisions and the traversal transition with `graph.Traversal`, and commit
   context patch, node states, outstanding count, status and successor jobs in ONE version-checked
   `Commit`; on a version conflict, reload and derive again (the node code is not run again);
6. publish any outbox, then acknowledge the delivery.

Every step of every path (one job, or a batch: `handle_batch`) is guarded: an error other than an
outage (`ConnectionError`, `OSError`: the loop backs off) fails that job or its run, never the
worker nor the other jobs of its batch; a commit the store refuses (`StoreRejected`) fails its run
with a commit carrying none of the refused values.

A crash anywhere before 5 redelivers the job and the node runs again; after 5 the redelivered job
finds the node done and only acknowledges. A join fires exactly once because its readiness is part
of the same versioned state; a run completes when its outstanding count reaches zero.
"""
from __future__ import annotations

from ._worker_context import StoreContext
from ._common import WorkerCrash, safe_reason
from .client import _ClientCalls
from .reconciler import Reconciler, ReconcileStats
from .worker import _WorkerLoop


class DistributedAdapter(_ClientCalls, _WorkerLoop):
    """A worker and a client over a job queue and a run store. `coordination` holds the slots of
    concurrency limits (`flowcraft.limits`: a slot outlives a dead holder `concurrency_slot_ttl`
    seconds; a job over its limit comes back after about `concurrency_retry_delay` seconds) and is
    kept for node code and tools that use one; None is fine for blueprints without limits."""


__all__ = ["DistributedAdapter", "ReconcileStats", "Reconciler", "StoreContext", "WorkerCrash", "safe_reason"]
