"""Concurrency limits under SIGKILL chaos (SPEC 14): worker processes serve a fan of limited nodes
(`maxConcurrency` 2, a 1.5 s slot TTL); one is SIGKILLed while its node holds a slot. Its slot
must stay taken until it expires (within the TTL: nothing double-books it) and then come back; the
run still completes with the in-memory result, each node committed once.

Node code records (pid, node, start, end) in a Redis list under the test's prefix; every process
runs on this host, so their `time.time()` agree."""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import pytest

from flowcraft import FlowRuntime, NodeContext, create_flow
from flowcraft.testing.conformance import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
SPANS_ENV, URL_ENV = "FLOWCRAFT_CHAOS_SPANS", "FLOWCRAFT_CHAOS_REDIS"
WIDTH, LIMIT, NAP, TTL = 10, 2, 0.5, 1.5


def _record(ctx: NodeContext) -> int:
    import redis

    client = redis.Redis.from_url(os.environ[URL_ENV])
    key = os.environ[SPANS_ENV]
    began = time.time()
    client.rpush(key, json.dumps({"pid": os.getpid(), "node": ctx.node_id, "start": began}))
    time.sleep(NAP)
    client.rpush(key, json.dumps({"pid": os.getpid(), "node": ctx.node_id, "start": began, "end": time.time()}))
    return 1


def chaos_flow() -> Any:
    flow = create_flow("limitchaos").node("start", lambda ctx: 0).node("end", lambda ctx: sum(ctx.input.values()))
    for i in range(WIDTH):
        flow.node(f"m{i}", _record, concurrency_key="'payments'", max_concurrency=LIMIT)
        flow.edge("start", f"m{i}").edge(f"m{i}", "end")
    return flow


def chaos_runtime() -> FlowRuntime:
    runtime = FlowRuntime()
    runtime.add_blueprint(chaos_flow())
    return runtime


def redis_worker(url: str, prefix: str, queue_name: str) -> None:
    import redis
    from flowcraft_redis import RedisAdapter

    RedisAdapter(chaos_runtime(), redis.Redis.from_url(url), queue_name=queue_name, prefix=prefix, poll_timeout=0.2,
                 heartbeat_ttl=1.0, recover_interval=0.3, concurrency_slot_ttl=TTL).work()


def _spawn(function: str, *args: Any, env: Dict[str, str]) -> WorkerProcess:
    code = f"import sys; sys.path[:0] = [{TESTS!r}, {HERE!r}]; import test_limits_chaos as t; t.{function}(*{args!r})"
    paths = [ROOT, os.path.join(ROOT, "adapters"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, **env, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    return WorkerProcess([sys.executable, "-c", code], function, cwd=ROOT, env=env)


def _spans(client: Any, key: str) -> Tuple[Dict[Tuple[int, str, float], Optional[float]], List[Dict[str, Any]]]:
    """(start record -> its end, None while open; the records)."""
    records = [json.loads(r) for r in client.lrange(key, 0, -1)]
    spans: Dict[Tuple[int, str, float], Optional[float]] = {}
    for r in records:
        spans.setdefault((r["pid"], r["node"], r["start"]), None)
        if "end" in r:
            spans[(r["pid"], r["node"], r["start"])] = r["end"]
    return spans, records


def _peak(intervals: List[Tuple[float, float]]) -> int:
    edges = sorted([(end, -1) for _, end in intervals] + [(start, 1) for start, _ in intervals])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def _first_full(intervals: List[Tuple[float, float]], after: float) -> Optional[float]:
    """The first instant after `after` at which `LIMIT` of `intervals` run at once."""
    edges = sorted([(end, -1) for _, end in intervals] + [(start, 1) for start, _ in intervals])
    running = 0
    for at, step in edges:
        running += step
        if running >= LIMIT and at > after:
            return at
    return None


def test_a_sigkilled_holders_slot_comes_back_within_its_ttl(redis_url: str, redis_client: Any, redis_prefix: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from flowcraft_redis import RedisAdapter

    queue_name, key = f"fcq-{uuid.uuid4().hex[:8]}", f"{redis_prefix}chaos:spans"
    env = {SPANS_ENV: key, URL_ENV: redis_url}  # (the client runs no node code)
    client = RedisAdapter(chaos_runtime(), redis_client, queue_name=queue_name, prefix=redis_prefix)
    workers = [_spawn("redis_worker", redis_url, redis_prefix, queue_name, env=env) for _ in range(3)]
    try:
        run_id = client.start_workflow("limitchaos")
        deadline = time.monotonic() + 30
        victim = None
        while victim is None:  # a worker whose node holds a slot, mid-sleep
            assert time.monotonic() < deadline, [w.stderr() for w in workers]
            open_spans = [(pid, start) for (pid, _, start), end in _spans(redis_client, key)[0].items()
                          if end is None and time.time() - start > 0.1]
            by_pid = {w.proc.pid: w for w in workers}
            victim = next((by_pid[pid] for pid, _ in open_spans if pid in by_pid), None)
            time.sleep(0.02)
        victim.kill()
        killed_at = time.time()
        result = client.wait_for_result(run_id, timeout=60)
        assert result.status == "completed", (result.errors, [w.stderr() for w in workers])
    finally:
        for worker in workers:
            worker.close()
        client.close()

    # the same blueprint in memory, its node code recording to a list of its own
    monkeypatch.setenv(URL_ENV, redis_url)
    monkeypatch.setenv(SPANS_ENV, f"{redis_prefix}chaos:in-memory")
    in_memory = chaos_runtime().run("limitchaos")
    assert in_memory.status == "completed", in_memory.errors
    assert result.context == in_memory.context
    history = client.get_history(run_id)
    finished = Counter(e.payload.get("node_id") for e in history if e.type == "node:finish")
    assert all(finished[f"m{i}"] == 1 for i in range(WIDTH)), finished  # each node committed once

    spans, _ = _spans(redis_client, key)
    dead = [(start, killed_at) for (pid, _, start), end in spans.items() if pid == victim.proc.pid and end is None]
    assert len(dead) == 1, spans  # the victim held one slot when it died
    live = [(start, end) for (pid, _, start), end in spans.items() if end is not None]
    assert _peak(live + dead) <= LIMIT  # never more than the limit among live holders
    # the dead holder's slot: taken until it expired (renewed every TTL/3: 2/3 TTL to TTL after the
    # kill), then back: LIMIT ran at once again soon after
    back = _first_full(live, killed_at)
    assert back is not None, spans
    print(f"redis: the SIGKILLed holder's slot came back {back - killed_at:.2f}s after the kill (TTL {TTL}s)")
    assert back - killed_at >= TTL * 2 / 3 - 0.1
    assert back - killed_at <= TTL + 1.5
