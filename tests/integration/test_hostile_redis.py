"""Hostile queue messages against a Redis worker (issue 11, items 2, 5, 8 and 12, and the fuzz
property test on Redis): the attacker's bytes go straight into the Redis list; the worker runs in
a bounded child process (memory cap, timeout) with its default batch (`fetch_batch` 20), so the
legitimate jobs fetched with the hostile one are those of the batched path.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Any, List

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, TESTS)

from bounded import run_bounded  # noqa: E402
from flowcraft.ports import Delivery  # noqa: E402
from test_hostile_jobs import HOSTILE_BODIES, chain_runtime, payloads  # noqa: E402

pytestmark = pytest.mark.integration

from flowcraft_redis import RedisAdapter  # noqa: E402
from flowcraft_redis.keys import QueueKeys  # noqa: E402

# The child: a Redis worker serving the hostile message with legitimate runs queued after it.
_WORKER = """
import json, sys, time
sys.path.insert(0, "tests")
import redis
from flowcraft_redis import RedisAdapter
from test_hostile_jobs import {factory}
prefix, queue_name, url = sys.argv[1:4] if len(sys.argv) > 3 else {args!r}
adapter = RedisAdapter({factory}(), redis.Redis.from_url(url), queue_name, prefix=prefix, poll_timeout=0.1)
started = [adapter.start_workflow(*start) for start in {starts!r}]
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    adapter.work(burst=True)  # raises nothing, whatever the queue holds
    if all(adapter.get_status(r).status != "running" for r in started) and adapter.queue.pending() == 0:
        break
    time.sleep(0.05)
results = {{r: adapter.wait_for_result(r, timeout=1) for r in started}}
print(json.dumps({{"started": started, "status": {{r: x.status for r, x in results.items()}},
                  "errors": {{r: [e.message for e in x.errors] for r, x in results.items()}},
                  "store": {{r: x.context.get("store") for r, x in results.items()}},
                  "scanned": adapter.store.idle_runs(1e9, 100000)[0],
                  "dead": adapter.queue.dead_letters(), "pending": adapter.queue.pending()}}))
adapter.close()
"""


def run_worker(redis_url: str, prefix: str, queue_name: str, starts: List[Any], factory: str = "chain_runtime",
               timeout: float = 60) -> dict:
    code = _WORKER.format(factory=factory, args=[prefix, queue_name, redis_url], starts=starts)
    result = run_bounded(code, timeout=timeout, memory_mb=768)
    assert result.ok, result.describe()
    return json.loads(result.stdout.strip().splitlines()[-1])


CHAIN_STARTS = [("chain", {"start": 1}, "VICTIM")] + [("chain", {"start": i}) for i in range(3)]


@pytest.mark.parametrize("name", ["nested-1100", "nested-200000", "nul-in-run-id", "control-in-node-id", "not-utf8",
                                  "lone-surrogate-escape", "nan-input", "huge-number", "duplicate-keys",
                                  "not-an-object", "long-run-id"])
def test_hostile_message_in_the_redis_list_is_dead_lettered(name: str, redis_client: Any, redis_url: str,
                                                            redis_prefix: str) -> None:
    queue_name = f"fcq-{uuid.uuid4().hex[:8]}"
    body = HOSTILE_BODIES[name].replace(b'"runId":"x"', b'"runId":"VICTIM"')
    redis_client.lpush(QueueKeys(queue_name, redis_prefix).ready, body)  # as an attacker would
    report = run_worker(redis_url, redis_prefix, queue_name, CHAIN_STARTS)
    assert report["pending"] == 0
    assert [d["reason"][:15] for d in report["dead"]] == ["malformed job: "], report["dead"]
    victim = report["status"].pop("VICTIM")
    # a malformed job carrying the victim's own identity fails it (SPEC guarantee 4), no other does
    names_victim = Delivery.parse(body, 0).identity_hint() == ("VICTIM", "chain", "load")
    assert victim == ("failed" if names_victim else "completed"), (victim, report)
    assert set(report["status"].values()) == {"completed"}, report
    assert [report["store"][r] for r in report["started"][1:]] == [[0], [2], [4]]


def test_a_value_nested_past_the_encoder_fails_its_run_only_on_redis(redis_url: str, redis_prefix: str) -> None:
    """A node output nested 5,000 deep (the Redis store's encoder recurses on it) in a batch of
    three runs: that run fails, the worker and the other runs go on."""
    queue_name = f"fcq-{uuid.uuid4().hex[:8]}"
    report = run_worker(redis_url, redis_prefix, queue_name,
                        [("chain", {"start": i}) for i in range(2)] + [("chain", {"start": "deep"}, "DEEP")]
                        + [("chain", {"start": 5})], factory="deep_runtime")
    assert report["status"]["DEEP"] == "failed", report
    assert report["errors"]["DEEP"], report
    assert [report["store"][r] for r in report["started"] if r != "DEEP"] == [[0], [2], [10]]
    assert report["pending"] == 0


def test_a_self_referencing_subflow_is_no_fork_bomb_on_redis(redis_url: str, redis_prefix: str) -> None:
    queue_name = f"fcq-{uuid.uuid4().hex[:8]}"
    report = run_worker(redis_url, redis_prefix, queue_name, [("again", {}, "ROOT"), ("plain", {}, "PLAIN")],
                        factory="_recursive_runtime")
    assert report["status"] == {"ROOT": "failed", "PLAIN": "completed"}, report
    assert "max_subflow_depth=32" in report["errors"]["ROOT"][0]
    assert report["scanned"] == 2 + 32  # the two runs and 32 nested children, no more
    assert report["pending"] == 0


def test_a_forged_identity_on_redis_fails_nobody(redis_client: Any, redis_url: str, redis_prefix: str) -> None:
    queue_name = f"fcq-{uuid.uuid4().hex[:8]}"
    ready = QueueKeys(queue_name, redis_prefix).ready
    for fields in ({"nodeId": "ghost"}, {"blueprintId": "nope"}, {"nodeId": "ghost", "iteration": -1}):
        redis_client.lpush(ready, json.dumps({"runId": "VICTIM", "blueprintId": "chain", "nodeId": "load", **fields}))
    report = run_worker(redis_url, redis_prefix, queue_name, CHAIN_STARTS)
    assert len(report["dead"]) == 3 and set(report["status"].values()) == {"completed"}, report


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(bodies=st.lists(payloads(), min_size=1, max_size=5))
def test_fuzzed_payloads_never_crash_a_redis_worker(bodies: List[bytes], redis_client: Any, redis_prefix: str) -> None:
    tag = uuid.uuid4().hex[:8]
    bodies = [b.replace(b"TARGET", f"T-{tag}".encode()) for b in bodies]
    adapter = RedisAdapter(chain_runtime(), redis_client, f"fcq-{tag}", prefix=redis_prefix, poll_timeout=0.1)
    try:
        target = adapter.start_workflow("chain", {"start": 1}, run_id=f"T-{tag}")
        for body in bodies:
            redis_client.lpush(adapter.queue.keys.ready, body)
        bystander = adapter.start_workflow("chain", {"start": 7})
        for _ in range(100):
            adapter.work(burst=True)  # raises nothing
            if adapter.queue.pending() == 0 and adapter.get_status(bystander).status != "running":
                break
        assert adapter.queue.pending() == 0
        dead = adapter.queue.dead_letters()
        assert all(d["reason"] for d in dead)
        unreadable = [b for b in bodies if Delivery.parse(b, 0).job is None]
        assert len(dead) >= len(unreadable)
        dead_bodies = [d["body"] for d in dead]
        for body in unreadable:
            try:
                assert body.decode("utf-8") in dead_bodies
            except UnicodeDecodeError:
                pass  # kept with replacement characters
        assert adapter.wait_for_result(bystander, timeout=5).context["store"] == [14]
        assert adapter.get_status(target).status in ("completed", "failed")
    finally:
        adapter.close()
