"""Routing (SPEC 14): which queue a job goes to, decided from the compiled graph.

A node whose config has ``"queue": NAME`` sends its jobs (its executions, its timers, its batch
items, the "child finished" job of a subflow node) to the queue NAME of the same backend; every
other job goes to the adapter's default queue (`Job.queue` None). The driver routes every job it
hands to a port (`Router`), so adapters only put each job where its `queue` says.

`unserved` tells the jobs waiting on a queue no live worker serves (the reconciler reports them).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set

from .errors import FlowcraftError
from .graph import CompiledGraph
from .ports import Commit, Job, WorkerInfo, job_node_id

logger = logging.getLogger("flowcraft.routing")

QUEUE_KEY = "queue"  # the node config key (wire and builder keyword)


class RoutingError(FlowcraftError, ValueError):
    """A node routed to a queue name the backend cannot use."""


@functools.lru_cache(maxsize=256)
def routes(graph: CompiledGraph) -> Mapping[str, str]:
    """Node id -> queue name, for the routed nodes of `graph` only (empty for most graphs).

    The blueprint's validation has checked every name (`NodeConfig.problems`)."""
    return {node_id: node.config.extra[QUEUE_KEY] for node_id, node in graph.nodes.items()
            if QUEUE_KEY in node.config.extra}


def queue_of(graph: CompiledGraph, job: Job) -> Optional[str]:
    """The queue `job` of a run of `graph` goes to (None: the default queue)."""
    found = routes(graph)
    return found.get(job_node_id(job)) if found else None


class Router:
    """Sets `Job.queue` on the jobs the driver hands to its ports, from the runtime's graphs."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def queue_for(self, job: Job) -> Optional[str]:
        blueprint = self.runtime.blueprints.get(job.blueprint_id)
        if blueprint is None:  # a job of a blueprint this process does not know: the default queue
            return None
        return queue_of(self.runtime.graph(blueprint), job)

    def job(self, job: Job) -> Job:
        queue = self.queue_for(job)
        return job if job.queue == queue else job.with_(queue=queue)

    def jobs(self, jobs: Iterable[Job]) -> List[Job]:
        return [self.job(j) for j in jobs]

    def commit(self, commit: Commit) -> Commit:
        """`commit` with its jobs, delayed jobs and counters' jobs routed (changed in place)."""
        if commit.jobs:
            commit.jobs[:] = self.jobs(commit.jobs)
        if commit.delayed:
            commit.delayed[:] = [(self.job(j), d) for j, d in commit.delayed]
        for counter in commit.counters:
            if counter.job is not None:
                counter.job = self.job(counter.job)
        return commit

    def commits(self, commits: Sequence[Commit]) -> Sequence[Commit]:
        for commit in commits:
            self.commit(commit)
        return commits


def check_names(graph: CompiledGraph, problem: Optional[Callable[[str], Optional[str]]]) -> None:
    """Raise `RoutingError` naming the node when the backend cannot use a routed queue name
    (`problem(name)`: why not, or None; a queue without the check accepts any name)."""
    if problem is None:
        return
    for node_id, name in routes(graph).items():
        why = problem(name)
        if why:
            raise RoutingError(f"blueprint {graph.blueprint.id!r}: node {node_id!r}: queue {name!r} cannot be used: {why}")


def queue_names(runtime: Any) -> Set[str]:
    """Every queue a node of the runtime's blueprints is routed to."""
    names: Set[str] = set()
    for blueprint in list(runtime.blueprints.values()):
        try:
            names.update(routes(runtime.graph(blueprint)).values())
        except Exception:  # a blueprint that does not compile runs nowhere: it routes nothing
            logger.debug("blueprint %r does not compile", getattr(blueprint, "id", None), exc_info=True)
    return names


def unserved(queue: Any, runtime: Any) -> Dict[str, int]:
    """Queue name -> jobs ready on it, for the queues (the default one and those the runtime's
    nodes are routed to) that no live worker serves and that hold jobs; empty when the queue
    cannot tell its live workers or its depth."""
    live = getattr(queue, "live_workers", None)
    depth = getattr(queue, "depth", None)
    default = getattr(queue, "queue_name", None)
    if live is None or depth is None:
        return {}
    names = queue_names(runtime) | ({default} if default else set())
    workers: List[WorkerInfo] = list(live(tuple(sorted(names))))  # (a broker may count consumers per queue only)
    served = {name for w in workers for name in w.served}
    waiting = {name: int(depth(name)) for name in sorted(names - served)}
    return {name: n for name, n in waiting.items() if n > 0}
