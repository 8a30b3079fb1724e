"""The adapter conformance kit (`flowcraft.testing.conformance`) on the in-memory fakes: every
scenario, and the crash matrix (each crash point of `CRASH_POINTS`, and all of them at once)."""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

import pytest

from flowcraft import FlowRuntime
from flowcraft.testing import CRASH_POINTS, InMemoryAdapter
from flowcraft.testing.conformance import BackendFactory, ConformanceSuite, check_names


class FakesFactory(BackendFactory):
    name = "fakes"
    crash_points = CRASH_POINTS

    def __init__(self) -> None:
        self.crashes = 0
        self.made: List[InMemoryAdapter] = []

    def make_adapter(self, runtime: FlowRuntime) -> InMemoryAdapter:
        adapter = InMemoryAdapter(runtime, poll_timeout=0.01)
        self.made.append(adapter)
        return adapter

    def make_crashing_adapter(self, runtime: FlowRuntime, points: Sequence[str], *, rate: float, seed: int) -> Any:
        adapter = InMemoryAdapter(runtime, crash_at=points, crash_rate=rate, seed=seed, poll_timeout=0.01)
        self.made.append(adapter)
        return adapter

    def publish_raw(self, adapter: InMemoryAdapter, body: bytes) -> None:
        adapter.queue.push_raw(body)

    def dead_letters(self, adapter: InMemoryAdapter) -> List[bytes]:
        return [body for body, _ in adapter.queue.dead]

    def commit_counts(self, adapter: InMemoryAdapter) -> Optional[Mapping[Tuple[str, str, int], int]]:
        return adapter.store.completions


@pytest.fixture
def factory() -> FakesFactory:
    return FakesFactory()


@pytest.mark.parametrize("check", check_names(CRASH_POINTS))
def test_the_fakes_conform(check: str, factory: FakesFactory) -> None:
    ConformanceSuite(factory).run(check)
    for adapter in factory.made:
        assert adapter.queue.pending == 0


def test_the_crash_matrix_really_crashes_at_every_point(factory: FakesFactory) -> None:
    suite = ConformanceSuite(factory)
    for name in check_names(CRASH_POINTS):
        if name.startswith("crash[all-points]"):
            suite.run(name)
    hit = {point for adapter in factory.made for point, n in adapter.crashes.items() if n}
    assert hit == set(CRASH_POINTS)


def test_checks_are_named_callables(factory: FakesFactory) -> None:
    checks = ConformanceSuite(factory).checks()
    assert list(checks) == check_names(CRASH_POINTS)
    assert "sigkill_workers" not in checks  # the fakes have no worker processes
    checks["chain"]()
    assert str(checks["chain"]) == "chain"


# --- the kit fails a backend that breaks the contract --------------------------------------------


class SilentDeadLetters(FakesFactory):
    def dead_letters(self, adapter: InMemoryAdapter) -> List[bytes]:
        return []


class DoubleCommits(FakesFactory):
    def commit_counts(self, adapter: InMemoryAdapter) -> Optional[Mapping[Tuple[str, str, int], int]]:
        return {key: n + 1 for key, n in adapter.store.completions.items()}


class RunsNodesTwice(FakesFactory):
    """Node code runs twice per execution (its side effect happens twice)."""

    def make_adapter(self, runtime: FlowRuntime) -> InMemoryAdapter:
        adapter = super().make_adapter(runtime)
        ledger = runtime.dependencies["conformance.ledger"]
        record = ledger.record
        ledger.record = lambda key: (record(key), record(key))  # type: ignore[method-assign]
        return adapter


@pytest.mark.parametrize("broken, check", [
    (SilentDeadLetters, "malformed_job"),  # a malformed job not dead-lettered
    (DoubleCommits, "chain"),  # a node execution committed twice
    (RunsNodesTwice, "duplicate_job"),  # node code run twice
])
def test_the_kit_fails_a_backend_that_breaks_the_contract(broken: Any, check: str) -> None:
    with pytest.raises(AssertionError):
        ConformanceSuite(broken()).run(check)
