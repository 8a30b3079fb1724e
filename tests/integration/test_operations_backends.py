"""SPEC section 11 on the real backends: the scenarios of tests/operations_scenarios.py (retry,
restart_from, skip / patch_context, prune, run lists, dead letters) on Redis, RQ and
RabbitMQ + PostgreSQL, each isolated by the fixtures of tests/conftest.py."""
from __future__ import annotations

import os
import sys
import uuid
from typing import Any, Callable, Iterator, List

import pytest

from flowcraft import FlowRuntime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.operations_scenarios import SCENARIOS, dead_letter_listed_and_requeued  # noqa: E402


def _drain(adapter: Any) -> None:
    for _ in range(3):  # a burst works until the queue is empty; jobs published by the last commit too
        adapter.work(burst=True)


@pytest.fixture
def redis_make(redis_client: Any, redis_prefix: str) -> Iterator[Callable[[FlowRuntime], Any]]:
    from flowcraft_redis import RedisAdapter

    queue_name = f"fcops-{uuid.uuid4().hex[:8]}"
    made: List[Any] = []

    def make(runtime: FlowRuntime) -> Any:
        adapter = RedisAdapter(runtime, redis_client, prefix=redis_prefix, queue_name=queue_name, poll_timeout=0.1)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.queue.close()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_redis(redis_make: Any, name: str) -> None:
    SCENARIOS[name](redis_make, _drain)


def test_redis_dead_letters(redis_make: Any) -> None:
    dead_letter_listed_and_requeued(redis_make, _drain, lambda adapter, body: adapter.queue.push_raw(body))


def test_redis_index_follows_status_and_prune_deletes_every_key(redis_make: Any, redis_client: Any,
                                                                 redis_prefix: str) -> None:
    from flowcraft import create_flow

    runtime = FlowRuntime()
    runtime.add_blueprint(create_flow("ix").node("a", lambda ctx: 1))
    adapter = redis_make(runtime)
    run_id = adapter.start_workflow("ix", {})
    assert redis_client.zscore(f"{redis_prefix}flowcraft:runs:active", run_id) is not None
    _drain(adapter)
    assert redis_client.zscore(f"{redis_prefix}flowcraft:runs:active", run_id) is None
    assert redis_client.zscore(f"{redis_prefix}flowcraft:runs:completed", run_id) is not None
    assert adapter.prune(0) == 1
    left = [k for k in redis_client.scan_iter(match=f"{redis_prefix}*") if run_id.encode() in k]
    assert left == []
    assert redis_client.zscore(f"{redis_prefix}flowcraft:runs:all", run_id) is None
