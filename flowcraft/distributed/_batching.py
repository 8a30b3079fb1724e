"""How a worker handles several deliveries at once (`DistributedAdapter.handle_batch`).

A batch is handled in waves. A wave holds, for each run, one *segment*: either consecutive jobs
of that run of one chaining kind (plain node jobs, or batch item jobs), executed one after the
other over one loaded snapshot that each commit advances, and committed together as ONE commit
(so the fan-out siblings or the batch items of a run cost one load and one commit round, not one
each); or a single job of another kind (timer, child, resume), whose checks read the store. A
segment never holds one job twice (a redelivered copy waits for a later wave, where the store
shows it done). No wave holds two commits of one run, so the commits of a wave never race each
other.
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence, Set, Tuple

import attrs

from ..ports import Commit, Counter, Delivery, RunSnapshot

Segment = List[Delivery]


CHAINING_KINDS = frozenset({"node", "item"})


def _chain_kind(delivery: Delivery) -> Optional[str]:
    job = delivery.job
    return job.kind if job is not None and job.kind in CHAINING_KINDS else None


def first_wave(deliveries: Sequence[Delivery]) -> Tuple[List[Segment], List[Delivery]]:
    """The first segment of each run (in order of first appearance), and the deliveries left."""
    segments: Dict[Hashable, Segment] = {}
    kinds: Dict[Hashable, Optional[str]] = {}  # the kind a run's segment chains; None once closed
    seen: Dict[Hashable, Set[str]] = {}
    later: List[Delivery] = []
    for i, delivery in enumerate(deliveries):
        job = delivery.job
        key: Hashable = job.run_id if job is not None else ("unreadable", i)
        segment = segments.get(key)
        if segment is None:
            segments[key] = [delivery]
            kinds[key] = _chain_kind(delivery)
            seen[key] = {job.key} if job is not None else set()
        elif kinds[key] is not None and _chain_kind(delivery) == kinds[key] and job.key not in seen[key]:  # type: ignore[union-attr]  # a chaining kind has a job
            segment.append(delivery)
            seen[key].add(job.key)  # type: ignore[union-attr]
        else:
            kinds[key] = None
            later.append(delivery)
    return list(segments.values()), later


def advance(snap: RunSnapshot, commit: Commit) -> RunSnapshot:
    """`snap` as it will be once `commit` is applied (its version kept: the merged commit of a
    segment expects the version loaded)."""
    states = dict(snap.states)
    states.update(commit.states)
    context = dict(snap.context)
    context.update(commit.context_set)
    for key in commit.context_delete:
        context.pop(key, None)
    record = commit.record  # a plan's own copy, never changed after; it keeps the version loaded
    if record.version != snap.record.version:
        record = attrs.evolve(record, version=snap.record.version)
    items = snap.pending_items
    if commit.items:
        items = dict(items)
        items.update(commit.items)
    return RunSnapshot(record, states, context, snap.whole, items)


def merge(commits: Sequence[Commit]) -> Commit:
    """Consecutive commits of one run, each derived over the state the previous one leaves, as
    one commit: the last record, later writes over earlier ones, every job, counter and
    acknowledgement. Node commits merge into a node commit (each state guarded as the first one
    loaded it); with a run commit among them, they are one run commit on the version loaded."""
    first = commits[0]
    if len(commits) == 1:
        return first
    context_set: Dict[str, object] = {}
    deleted: Dict[str, None] = {}
    states: Dict[str, Dict[str, object]] = {}
    items: Dict[str, object] = {}
    node_commit = all(c.node_commit for c in commits)
    expected = None if node_commit else next(c.expected_version for c in commits if not c.node_commit)
    merged = Commit(first.run_id, expected, commits[-1].record, context_set, [], states, items)
    counters: Dict[str, Counter] = {}
    for commit in commits:
        for key in commit.context_delete:
            context_set.pop(key, None)
            deleted[key] = None
        for key, value in commit.context_set.items():
            deleted.pop(key, None)
            context_set[key] = value
        states.update(commit.states)
        items.update(commit.items)
        merged.jobs.extend(commit.jobs)
        merged.delayed.extend(commit.delayed)
        merged.ack.extend(commit.ack)
        for key, guard in commit.guards.items():
            merged.guards.setdefault(key, guard)
        merged.unset_items.extend(commit.unset_items)
        merged.history.extend(commit.history)
        merged.outstanding_delta += commit.outstanding_delta
        for counter in commit.counters:
            same = counters.get(counter.field)
            if same is None:
                counters[counter.field] = attrs.evolve(counter)
            else:
                same.delta += counter.delta
    merged.counters = list(counters.values())
    merged.context_delete = list(deleted)
    if not node_commit:
        merged.guards, merged.unset_items, merged.outstanding_delta = {}, [], 0
    return merged


def wanted_union(requests: Sequence[Tuple[List[str], List[str]]]) -> Tuple[List[str], List[str]]:
    """The node states and context keys several jobs of one run need, each once, in order."""
    nodes: Dict[str, None] = {}
    keys: Dict[str, None] = {}
    for node_ids, context_keys in requests:
        nodes.update(dict.fromkeys(node_ids))
        keys.update(dict.fromkeys(context_keys))
    return list(nodes), list(keys)
