"""Concurrency limits (SPEC 14): at most `maxConcurrency` executions with the same key at once.

A node's `config.concurrencyKey` is an expression over its context and `input` (the names it sees:
the context keys, `input` and `context`), evaluated by the runtime's safe evaluator just before the
node code would run; `config.maxConcurrency` is the limit, a whole number >= 1. Executions of any
node, of any blueprint, whose keys are equal share one count.

Distributed, the count is a TTL'd semaphore in the coordination store (`ConcurrencySlots`): a worker
takes a slot before it runs the node code and gives it back once the node's outcome is committed; a
job that finds every slot taken goes back to the queue, delayed (jittered), without counting as an
attempt. A live holder renews its slots in the background while they are held; a dead worker's slots
expire by themselves after the TTL. A store with `acquire_slot`, `renew_slots` and `release_slot`
(Redis: one script call each) does it atomically; on any other store the semaphore is built from
the Flowcraft TS methods (`PortableSlots`), with one key per slot. Every worker of one deployment
uses the same store class, so they agree on the layout.

In memory (`FlowRuntime.run(..., concurrency=k)`) each run counts its own executions: a ready node
whose key is at its limit waits in the run's ready list, and no thread blocks on it.
"""
from __future__ import annotations

import functools
import logging
import os
import random
import threading
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import attrs

from .errors import ExpressionError, FlowcraftError

logger = logging.getLogger("flowcraft.limits")

CONCURRENCY_KEY = "concurrencyKey"  # the wire names, in a node's `config`
MAX_CONCURRENCY = "maxConcurrency"
MAX_KEY_LENGTH = 512  # characters of a key's value: it names a key of the coordination store
SLOT_PREFIX = "flowcraft:concurrency:"  # the coordination keys of the limits' slots
DEFAULT_SLOT_TTL = 30.0  # seconds a slot outlives a dead holder
DEFAULT_RETRY_DELAY = 0.1  # seconds (mean, jittered) before a job over its limit is delivered again


class ConcurrencyKeyError(FlowcraftError):
    """A node's concurrency key could not be evaluated, or is not a string or a whole number."""


def config_problems(config: Any, where: str, evaluator: Any) -> List[str]:
    """What is wrong with the concurrency limit of a node's config (`where` names the node)."""
    extra = getattr(config, "extra", None) or {}
    source, limit = extra.get(CONCURRENCY_KEY), extra.get(MAX_CONCURRENCY)
    if source is None and limit is None:
        return []
    found = []
    if limit is None:
        found.append(f"{where}: concurrencyKey {source!r} needs a maxConcurrency (a whole number >= 1)")
    elif type(limit) is not int or limit < 1:
        found.append(f"{where}: maxConcurrency must be a whole number >= 1, not {limit!r}")
    if source is None:
        found.append(f"{where}: maxConcurrency needs a concurrencyKey (an expression, e.g. \"'payments'\" or "
                     f"\"input.customer_id\")")
    elif not isinstance(source, str) or not source.strip():
        found.append(f"{where}: concurrencyKey must be a non-empty expression string, not {source!r}")
    else:
        try:
            evaluator.compile(source)
        except ExpressionError as exc:
            found.append(f"{where}: concurrencyKey {source!r} cannot be parsed: {exc}")
    return found


class _Names(Mapping[str, Any]):
    """What a key expression sees: the context's keys (read through `lookup`), `input`, `context`."""

    def __init__(self, lookup: Callable[[str], Any], node_input: Any) -> None:
        self._lookup = lookup
        self._input = node_input

    def __getitem__(self, name: str) -> Any:
        if name == "input":
            return self._input
        if name == "context":
            return _ContextView(self._lookup)
        value = self._lookup(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(("input", "context"))

    def __len__(self) -> int:
        return 2


class _ContextView(Mapping[str, Any]):
    def __init__(self, lookup: Callable[[str], Any]) -> None:
        self._lookup = lookup

    def __getitem__(self, name: str) -> Any:
        value = self._lookup(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@attrs.frozen
class Limit:
    """A node's compiled concurrency limit."""

    node_id: str
    source: str
    max: int
    expression: Callable[[Mapping[str, Any]], Any] = attrs.field(eq=False, repr=False)

    def key(self, lookup: Callable[[str], Any], node_input: Any) -> str:
        """The key of one execution; `lookup(name)` reads a context key (None: missing).
        Raises `ConcurrencyKeyError` naming the node and the expression."""
        try:
            value = self.expression(_Names(lookup, node_input))
        except ExpressionError as exc:
            raise ConcurrencyKeyError(f"node {self.node_id!r}: concurrencyKey {self.source!r} failed: {exc}",
                                      node_id=self.node_id) from exc
        if type(value) not in (str, int):
            raise ConcurrencyKeyError(f"node {self.node_id!r}: concurrencyKey {self.source!r} gave {_shown(value)}, "
                                      f"not a string or a whole number", node_id=self.node_id)
        text = str(value)
        if not text or len(text) > MAX_KEY_LENGTH:
            raise ConcurrencyKeyError(f"node {self.node_id!r}: concurrencyKey {self.source!r} gave a key of "
                                      f"{len(text)} characters (1 to {MAX_KEY_LENGTH} allowed)", node_id=self.node_id)
        return text


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


@functools.lru_cache(maxsize=1024)
def key_names(source: Optional[str]) -> Tuple[str, ...]:
    """The context keys a key expression reads at top level (a worker loads them with the node's
    input); () for no expression."""
    if source is None:
        return ()
    from .evaluator import top_level_names

    return tuple(n for n in top_level_names(source) if n not in ("input", "context"))


@functools.lru_cache(maxsize=256)
def graph_limits(graph: Any) -> Dict[str, Limit]:
    """The limits of a compiled graph's nodes, by node id (compiled once per graph)."""
    found: Dict[str, Limit] = {}
    for node_id, node in graph.nodes.items():
        extra = node.config.extra
        source = extra.get(CONCURRENCY_KEY)
        if source is None:
            continue
        found[node_id] = Limit(node_id, source, extra[MAX_CONCURRENCY], graph.evaluator.compile(source))
    return found


def node_limit(graph: Any, node_id: str) -> Optional[Limit]:
    """The limit of a node of a compiled graph (None: unlimited)."""
    limits = graph_limits(graph)
    return limits.get(node_id) if limits else None


# --- distributed: a TTL'd semaphore in the coordination store ---------------------------------


@attrs.frozen
class Slot:
    """A slot held: the coordination key it is counted under and who holds it (unique per
    acquisition); `index`: the slot key's number, for `PortableSlots`."""

    name: str
    holder: str
    index: int = 0


class PortableSlots:
    """The semaphore on the Flowcraft TS methods alone: slot `i` of a key is the coordination key
    ``<name>:<i>``, taken with `set_if_not_exist` (the holder as value, with the TTL), renewed with
    `extend_ttl`, released by `delete` after a `get` finds it still this holder's. Taking a slot
    tries the slots from a random one: up to `limit` calls when the key is busy."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def acquire_slots(self, requests: Sequence[Tuple[str, str, int]], ttl: float) -> List[Optional[int]]:
        return [self.acquire_slot(name, holder, limit, ttl) for name, holder, limit in requests]

    def acquire_slot(self, name: str, holder: str, limit: int, ttl: float) -> Optional[int]:
        first = random.randrange(limit)
        for offset in range(limit):
            index = (first + offset) % limit
            if self.store.set_if_not_exist(f"{name}:{index}", holder, ttl):
                return index
        return None

    def renew_slots(self, slots: Sequence[Slot], ttl: float) -> None:
        for slot in slots:
            self.store.extend_ttl(f"{slot.name}:{slot.index}", ttl)

    def release_slots(self, slots: Sequence[Slot]) -> None:
        for slot in slots:
            key = f"{slot.name}:{slot.index}"
            if self.store.get(key) == slot.holder:  # expired and taken by another: theirs now
                self.store.delete(key)


class _AtomicSlots:
    """A store with the slot methods of its own (one round trip each, e.g. Redis scripts):
    ``acquire_slots([(name, holder, limit), ...], ttl) -> [bool, ...]`` (in order, as if one by
    one), ``renew_slots(slots, ttl)`` and ``release_slots(slots)`` (`Slot`s: their `name` and
    `holder`)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def acquire_slots(self, requests: Sequence[Tuple[str, str, int]], ttl: float) -> List[Optional[int]]:
        return [0 if ok else None for ok in self.store.acquire_slots(requests, ttl)]

    def renew_slots(self, slots: Sequence[Slot], ttl: float) -> None:
        self.store.renew_slots(slots, ttl)

    def release_slots(self, slots: Sequence[Slot]) -> None:
        self.store.release_slots(slots)


class ConcurrencySlots:
    """The slots one worker process holds, over its coordination store, and their renewal.

    `acquire` takes a slot of a key (None: every slot is taken), `release` gives slots back; while
    any is held a daemon thread renews them all every third of the TTL, so a node that runs longer
    than the TTL keeps its slot, and a worker that dies loses its slots after at most the TTL."""

    def __init__(self, store: Any, ttl: float = DEFAULT_SLOT_TTL) -> None:
        if not ttl > 0:
            raise ValueError(f"a concurrency slot's TTL must be > 0 seconds, not {ttl!r}")
        self.ttl = float(ttl)
        atomic = all(callable(getattr(store, m, None)) for m in ("acquire_slots", "renew_slots", "release_slots"))
        self.backend: Any = _AtomicSlots(store) if atomic else PortableSlots(store)
        self._held: Dict[Tuple[str, str], Slot] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._renewer: Optional[threading.Thread] = None
        self._prefix = f"{os.getpid()}:{os.urandom(4).hex()}:"
        self._count = 0

    def acquire(self, key: str, limit: int) -> Optional[Slot]:
        return self.acquire_many([(key, limit)])[0]

    def acquire_many(self, requests: Sequence[Tuple[str, int]]) -> List[Optional[Slot]]:
        """A slot of each `(key, limit)` (None: every slot of it is taken), in one call where the
        store can; in order, as if one by one."""
        with self._lock:
            first = self._count + 1
            self._count += len(requests)
        asked = [(SLOT_PREFIX + key, f"{self._prefix}{first + i}", limit) for i, (key, limit) in enumerate(requests)]
        indexes = self.backend.acquire_slots(asked, self.ttl)
        slots = [None if index is None else Slot(name, holder, index) for (name, holder, _), index in zip(asked, indexes)]
        with self._lock:
            for slot in slots:
                if slot is not None:
                    self._held[(slot.name, slot.holder)] = slot
            if self._held and (self._renewer is None or not self._renewer.is_alive()):
                self._renewer = threading.Thread(target=self._renew_loop, name="flowcraft-slots", daemon=True)
                self._renewer.start()
        return slots

    def release(self, slots: Sequence[Optional[Slot]]) -> None:
        """Give slots back (None entries are ignored); a failure is logged: the slot then expires."""
        held = [s for s in slots if s is not None]
        if not held:
            return
        with self._lock:
            for slot in held:
                self._held.pop((slot.name, slot.holder), None)
        try:
            self.backend.release_slots(held)
        except Exception as error:  # an outage included: the TTL frees them
            logger.warning("could not release %d concurrency slot(s) (they expire in %.0fs): %s", len(held),
                           self.ttl, error)

    def held(self) -> List[Slot]:
        with self._lock:
            return list(self._held.values())

    def _renew_loop(self) -> None:
        while True:
            self._wake.wait(self.ttl / 3)
            with self._lock:
                slots = list(self._held.values())
                if not slots:
                    self._renewer = None
                    return
            try:
                self.backend.renew_slots(slots, self.ttl)
            except Exception as error:
                logger.warning("could not renew %d concurrency slot(s): %s", len(slots), error)


def retry_delay(mean: float) -> float:
    """How long a job over its limit waits before it is delivered again: `mean`, jittered by half
    (jobs put back together do not come back together)."""
    return mean * random.uniform(0.5, 1.5)


class RunLimits:
    """The in-memory count of one run's executions per key (`FlowRuntime.run`, in threads)."""

    def __init__(self) -> None:
        self.running: Dict[str, int] = {}

    def admit(self, limit: Limit, key: str) -> bool:
        if self.running.get(key, 0) >= limit.max:
            return False
        self.running[key] = self.running.get(key, 0) + 1
        return True

    def leave(self, key: str) -> None:
        left = self.running[key] - 1
        if left:
            self.running[key] = left
        else:
            del self.running[key]
