"""How a worker handles several deliveries at once (`DistributedAdapter.handle_batch`).

A batch is handled in waves. A wave holds, for each run, one *segment*: either consecutive plain
node jobs of that run, executed one after the other over one loaded snapshot that each commit
advances, and committed together as ONE commit (so the fan-out siblings of a run cost one load
and one commit round, not one each); or a single job of another kind (item, timer, child), whose
checks read the store. No wave holds two commits of one run, so the commits of a wave never race
each other.
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import attrs

from .ports import Commit, Delivery, RunSnapshot

Segment = List[Delivery]


def _chains(delivery: Delivery) -> bool:
    return delivery.job is not None and delivery.job.kind == "node"


def first_wave(deliveries: Sequence[Delivery]) -> Tuple[List[Segment], List[Delivery]]:
    """The first segment of each run (in order of first appearance), and the deliveries left."""
    segments: Dict[Hashable, Segment] = {}
    closed: Dict[Hashable, bool] = {}
    later: List[Delivery] = []
    for i, delivery in enumerate(deliveries):
        key: Hashable = delivery.job.run_id if delivery.job is not None else ("unreadable", i)
        segment = segments.get(key)
        if segment is None:
            segments[key] = [delivery]
            closed[key] = not _chains(delivery)
        elif not closed[key] and _chains(delivery):
            segment.append(delivery)
        else:
            closed[key] = True
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
    items = {**snap.items, **commit.items} if commit.items else snap.items  # what a join's last arrival reads
    return RunSnapshot(record, states, context, snap.whole, items)


def merge(commits: Sequence[Commit]) -> Commit:
    """Consecutive commits of one run, each derived over the state the previous one leaves, as
    one commit: the last record, later writes over earlier ones, every job and acknowledgement."""
    first = commits[0]
    if len(commits) == 1:
        return first
    context_set: Dict[str, object] = {}
    deleted: Dict[str, None] = {}
    states: Dict[str, Dict[str, object]] = {}
    items: Dict[str, object] = {}
    merged = Commit(first.run_id, first.expected_version, commits[-1].record, context_set, [], states, items)
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
    merged.context_delete = list(deleted)
    return merged


def wanted_union(requests: Sequence[Tuple[List[str], List[str]]]) -> Tuple[List[str], List[str]]:
    """The node states and context keys several jobs of one run need, each once, in order."""
    nodes: Dict[str, None] = {}
    keys: Dict[str, None] = {}
    for node_ids, context_keys in requests:
        nodes.update(dict.fromkeys(node_ids))
        keys.update(dict.fromkeys(context_keys))
    return list(nodes), list(keys)
