"""Hostile RQ jobs (issue 11, items 1, 2 and 5 on RQ), fed straight into the RQ queue, against a real Redis.

A queue writer must not run code in a Flowcraft RQ worker (`FlowcraftWorker`, the worker of
`RqAdapter.work()`), crash it or stall the jobs queued beside its job: a job that is not exactly
``run_node(<one string>)`` is dead-lettered in RQ's FailedJobRegistry with the reason, before RQ
imports anything it names, and the worker goes on. A stock ``rq worker`` (RQ trusts its queue) runs
the same foreign job: `test_a_stock_rq_worker_runs_foreign_jobs` documents it.

Isolation: every test has its own key prefix and RQ queue (the fixtures of test_rq_adapter).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any, Dict, List

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import rq  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from bounded import run_bounded  # noqa: E402
from flowcraft import FlowRuntime, create_flow  # noqa: E402
from flowcraft.ports import Job  # noqa: E402
from flowcraft_redis import RqAdapter  # noqa: E402
from flowcraft_redis.rq_adapter import RUN_NODE  # noqa: E402
from flowcraft_redis.rq_settings import DEAD_LETTER_META_KEY  # noqa: E402
from test_rq_adapter import RQ_CLI, rq_queue, worker_env  # noqa: E402,F401 (rq_queue: a fixture)

pytestmark = pytest.mark.integration


def hostile_app() -> FlowRuntime:
    """The app of the workers here (``FLOWCRAFT_APP=test_hostile_rq:hostile_app``): a 3-node chain."""
    runtime = FlowRuntime()
    runtime.add_blueprint(create_flow("chain3").node("a", lambda ctx: ctx.context["start"])
                          .node("b", lambda ctx: ctx.input + 1).node("c", lambda ctx: {"total": ctx.input * 2})
                          .edge("a", "b").edge("b", "c"))
    return runtime


@pytest.fixture
def adapter(redis_client: Any, redis_prefix: str, rq_queue: str) -> Any:  # noqa: F811
    made = RqAdapter(hostile_app(), redis_client, rq_queue, prefix=redis_prefix, poll_timeout=0.1,
                     retry_intervals=(0, 0, 0))
    yield made
    made.close()


@pytest.fixture
def evil_module(tmp_path: Path) -> Dict[str, Any]:
    """A module in `tmp_path` that writes a file when imported and another when its function runs."""
    name = f"fc_evil_{uuid.uuid4().hex[:8]}"
    imported, called = tmp_path / "imported", tmp_path / "called"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        open({str(imported)!r}, "w").write("imported")

        def boom(*args, **kwargs):
            open({str(called)!r}, "w").write("called")
    """))
    return {"name": name, "path": str(tmp_path), "imported": imported, "called": called}


def own_id(adapter: Any, name: str) -> str:
    """An RQ job id with the queue name in it: the `rq_queue` fixture deletes its keys."""
    return f"{name}-{adapter.queue_name}"


def rq_queue_of(adapter: Any) -> Any:
    return rq.Queue(adapter.queue_name, connection=adapter.redis, serializer=JSONSerializer)


def reasons(adapter: Any) -> Dict[str, str]:
    """RQ job id -> dead-letter reason, for every job in the queue's FailedJobRegistry (read raw:
    the reason is in the job hash's meta and its exc_info)."""
    out = {}
    for job_id in rq_queue_of(adapter).failed_job_registry.get_job_ids():
        meta = adapter.redis.hget(f"rq:job:{job_id}", "meta")
        out[job_id] = json.loads(meta).get(DEAD_LETTER_META_KEY) if meta else None
    return out


def assert_completed(adapter: Any, run_ids: List[str]) -> None:
    for run_id in run_ids:
        result = adapter.wait_for_result(run_id, timeout=10)
        assert result.status == "completed", (run_id, result.status, result.errors)
        assert result.context["c"] == {"total": (result.context["start"] + 1) * 2}


def run_stock_worker(adapter: Any, worker_class: str, pythonpath: str, *extra: str) -> subprocess.CompletedProcess:
    command = [RQ_CLI, "worker", "--url", "redis://127.0.0.1:6379/0", "-w", worker_class, "--path", HERE,
               "--burst", "--name", f"{adapter.queue_name}-w{uuid.uuid4().hex[:6]}", *extra, adapter.queue_name]
    env = worker_env(FLOWCRAFT_APP="test_hostile_rq:hostile_app",
                     PYTHONPATH=os.pathsep.join([pythonpath, ROOT, os.path.join(ROOT, "adapters")]))
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


# =================================================================================================
# item 1: a queue writer names a function
# =================================================================================================


def test_adapter_work_refuses_os_system(adapter: Any, tmp_path: Path) -> None:
    """The issue's attack, exactly: ``enqueue("os.system", "touch pwned")`` then ``work(burst=True)``."""
    pwned = tmp_path / "pwned"
    before = adapter.start_workflow("chain3", {"start": 1})
    attack = rq_queue_of(adapter).enqueue("os.system", f"touch {pwned}", job_id=own_id(adapter, "attack"))
    after = adapter.start_workflow("chain3", {"start": 2})
    assert adapter.work(burst=True) >= 7  # the attack and 2 x 3 nodes, in one RQ worker
    assert not pwned.exists()
    assert_completed(adapter, [before, after])
    letters = reasons(adapter)
    assert list(letters) == [attack.id]
    assert "refused" in letters[attack.id] and "'os.system'" in letters[attack.id]
    assert "not flowcraft_redis.rq_jobs.run_node" in letters[attack.id]
    stored = rq.job.Job.fetch(attack.id, connection=adapter.redis, serializer=JSONSerializer)
    assert stored.get_status() == "failed" and stored.retries_left == 0
    assert "refused" in stored.latest_result().exc_string
    assert [d["rqJobId"] for d in adapter.queue.dead_letters()] == [attack.id]


def test_adapter_work_never_imports_a_named_module(adapter: Any, evil_module: Dict[str, Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """RQ resolves a function name by importing its module: that import is code execution. Neither
    the function nor a callback (on a job that is otherwise a Flowcraft job) is imported."""
    monkeypatch.syspath_prepend(evil_module["path"])  # importable: only the check stops it
    boom = f"{evil_module['name']}.boom"
    queue = rq_queue_of(adapter)
    run_id = adapter.start_workflow("chain3", {"start": 5})
    named = queue.enqueue(boom, "x", job_id=own_id(adapter, "named"))
    body = Job("r-x", "chain3", "a").to_json()
    on_success = queue.enqueue(RUN_NODE, body, on_success=rq.Callback(boom), job_id=own_id(adapter, "on-success"))
    on_failure = queue.enqueue(RUN_NODE, body, on_failure=rq.Callback(boom), job_id=own_id(adapter, "on-failure"))
    adapter.work(burst=True)
    assert not evil_module["imported"].exists() and not evil_module["called"].exists()
    assert evil_module["name"] not in sys.modules
    assert_completed(adapter, [run_id])
    letters = reasons(adapter)
    assert sorted(letters) == sorted([named.id, on_success.id, on_failure.id])
    assert f"'{boom}'" in letters[named.id] and "refused" in letters[named.id]
    assert "success_callback" in letters[on_success.id] and "failure_callback" in letters[on_failure.id]
    assert all("nothing it names was imported or run" in reason for reason in letters.values())


def test_stock_command_line_with_flowcraft_worker_refuses_foreign_jobs(adapter: Any, evil_module: Dict[str, Any],
                                                                       tmp_path: Path) -> None:
    """``rq worker -w flowcraft_redis.rq_worker.FlowcraftWorker --burst --with-scheduler`` (no
    --serializer: it reads JSON anyway, never pickle), the evil module on the worker's PYTHONPATH,
    a garbage job due in the scheduled registry."""
    pwned = tmp_path / "pwned"
    queue = rq_queue_of(adapter)
    first = adapter.start_workflow("chain3", {"start": 3})
    system = queue.enqueue("os.system", f"touch {pwned}", job_id=own_id(adapter, "system"))
    named = queue.enqueue(f"{evil_module['name']}.boom", "x", job_id=own_id(adapter, "named"))
    second = adapter.start_workflow("chain3", {"start": 4})
    garbage = f"sched-garbage-{adapter.queue_name}"  # RQ's own scheduler stops on it
    adapter.redis.hset(f"rq:job:{garbage}", mapping={"data": "[", "status": "scheduled", "timeout": "never"})
    adapter.redis.zadd(queue.scheduled_job_registry.key, {garbage: 0, "bad id!": 0})
    proc = run_stock_worker(adapter, "flowcraft_redis.rq_worker.FlowcraftWorker", evil_module["path"],
                            "--with-scheduler")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not pwned.exists() and not evil_module["imported"].exists() and not evil_module["called"].exists()
    assert_completed(adapter, [first, second])
    letters = reasons(adapter)
    assert sorted(letters) == sorted([system.id, named.id, garbage])
    assert "'os.system'" in letters[system.id] and "refused" in letters[system.id]
    assert "hash is malformed" in letters[garbage] and queue.scheduled_job_registry.count == 0
    assert f"'{evil_module['name']}.boom'" in letters[named.id]
    assert "serializer" in output and "ignored" in output  # the pickle default was not used


def test_a_stock_rq_worker_runs_foreign_jobs(adapter: Any, tmp_path: Path) -> None:
    """What the README warns about: RQ's own SimpleWorker trusts its queue and runs a foreign job."""
    pwned = tmp_path / "pwned"
    rq_queue_of(adapter).enqueue("os.system", f"touch {pwned}", job_id=own_id(adapter, "attack"))
    proc = run_stock_worker(adapter, "rq.worker.SimpleWorker", str(tmp_path), "--serializer",
                            "rq.serializers.JSONSerializer")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert pwned.exists()


# =================================================================================================
# items 2 and 5: hostile RQ data, in a bounded child: the worker survives and serves the others
# =================================================================================================

_CHILD = """
    import json, sys
    sys.path[:0] = [{tests!r}, {here!r}]
    import redis, rq
    from rq.serializers import JSONSerializer
    import flowcraft_redis.rq_adapter as rq_adapter
    from flowcraft_redis import RqAdapter
    from flowcraft_redis.rq_adapter import RUN_NODE
    from test_hostile_rq import hostile_app

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    adapter = RqAdapter(hostile_app(), client, {queue!r}, prefix={prefix!r}, poll_timeout=0.1,
                        retry_intervals=(0, 0, 0))
    queue = rq.Queue({queue!r}, connection=client, serializer=JSONSerializer)
    workers = []

    class Counted(rq_adapter.InProcessWorker):
        def __init__(self, a):
            workers.append(self)
            super().__init__(a)

    rq_adapter.InProcessWorker = Counted
    runs = [adapter.start_workflow("chain3", {{"start": 0}})]

    def raw(job_id, **fields):
        "an RQ job hash written by hand, pushed on the queue"
        client.hset("rq:job:" + job_id, mapping=fields)
        client.rpush(queue.key, job_id)
        runs.append(adapter.start_workflow("chain3", {{"start": len(runs)}}))  # a legitimate run beside it

    def envelope(func, args, kwargs=None):
        return json.dumps([func, None, args, kwargs or {{}}], allow_nan=True)

    deep = "[" * 1100 + "]" * 1100
    identity = json.dumps({{"runId": "x", "blueprintId": "chain3", "nodeId": "a"}})
    flowcraft_deep = identity[:-1] + ', "input": ' + deep + "}}"  # the issue's item 2 payload
    hostile = {{
        "deep-args": dict(data=envelope(RUN_NODE, []).replace("[], {{}}]", deep + ", {{}}]"), status="queued"),
        "deep-data": dict(data=deep, status="queued"),
        "huge": dict(data=envelope(RUN_NODE, ["x" * (17 * 1024 * 1024)]), status="queued"),
        "nan-arg": dict(data=envelope(RUN_NODE, [float("nan")]), status="queued"),
        "int-args": dict(data=envelope(RUN_NODE, [1, 2]), status="queued"),
        "kwargs": dict(data=envelope(RUN_NODE, ["{{}}"], {{"x": 1}}), status="queued"),
        "not-utf8": dict(data=b"\\xff\\xfe\\x00", status="queued"),
        "no-data": dict(status="queued", origin="elsewhere"),
        "bad-status": dict(data=envelope(RUN_NODE, ["{{}}"]), status="bogus"),
        "bad-timeout": dict(data=envelope(RUN_NODE, ["{{}}"]), timeout="forever"),
        "bad-date": dict(data=envelope(RUN_NODE, ["{{}}"]), created_at="yesterday"),
        "deep-retry": dict(data=envelope(RUN_NODE, ["{{}}"]), retry_intervals=deep),
        "huge-retry": dict(data=envelope(RUN_NODE, ["{{}}"]), retries_left="1", retry_intervals="[1e400]"),
        "big-ttl": dict(data=envelope(RUN_NODE, ["{{}}"]), failure_ttl=str(10 ** 30)),
        "deep-meta": dict(data=envelope(RUN_NODE, [json.dumps({{"runId": "r", "blueprintId": "chain3",
                                                                "nodeId": "a"}})]), meta=deep),
        "repeat": dict(data=envelope(RUN_NODE, ["{{}}"]), repeats_left="1000000"),
    }}
    for name, fields in hostile.items():
        raw(name + "-" + {queue!r}, **fields)
    client.rpush(queue.key, "not a job id!", b"\\xff\\xfe")  # entries RQ cannot even parse
    client.hset("rq:job:sched-garbage-" + {queue!r}, mapping=dict(data="[", status="scheduled"))
    client.zadd(queue.scheduled_job_registry.key, {{"sched-garbage-" + {queue!r}: 0, "bad id!": 0}})  # due now
    runs.append(adapter.start_workflow("chain3", {{"start": len(runs)}}))
    queue.enqueue(RUN_NODE, flowcraft_deep, job_id="flowcraft-deep-" + {queue!r})  # deep JSON inside the job
    runs.append(adapter.start_workflow("chain3", {{"start": len(runs)}}))

    adapter.work(burst=True)
    assert len(workers) == 1 and workers[0].error is None, [w.error for w in workers]  # never restarted
    statuses = [adapter.wait_for_result(r, timeout=10) for r in runs]
    failed = set(queue.failed_job_registry.get_job_ids())
    letters = {{}}
    for job_id in failed:
        meta = client.hget("rq:job:" + job_id, "meta")
        letters[job_id] = json.loads(meta).get("flowcraft_dead_letter") if meta else None
    print(json.dumps({{"statuses": [s.status for s in statuses], "letters": letters,
                      "scheduled": queue.scheduled_job_registry.count,
                      "queued": queue.count, "intermediate": client.llen(queue.intermediate_queue_key)}}))
"""

_HOSTILE = ["deep-args", "deep-data", "huge", "nan-arg", "int-args", "kwargs", "not-utf8", "no-data", "bad-status",
            "bad-timeout", "bad-date", "deep-retry", "huge-retry", "big-ttl", "deep-meta", "repeat"]


def test_hostile_rq_data_is_dead_lettered_and_the_worker_serves_the_rest(
        redis_prefix: str, rq_queue: str) -> None:  # noqa: F811
    """Each hostile hash is queued with a legitimate run right behind it; one burst of one worker
    (never restarted) dead-letters every hostile job with its reason and completes every run."""
    code = _CHILD.format(tests=TESTS, here=HERE, queue=rq_queue, prefix=redis_prefix)
    result = run_bounded(code, timeout=60, memory_mb=1024)
    assert result.ok, result.describe()
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["statuses"] == ["completed"] * (len(_HOSTILE) + 3), report  # every legitimate run beside them
    letters = report["letters"]
    for name in _HOSTILE:
        reason = letters.get(f"{name}-{rq_queue}")
        assert reason and reason.startswith("refused: "), (name, reason, sorted(letters))
        assert reason.endswith("nothing it names was imported or run"), (name, reason)
    expected = {"deep-args": "not readable JSON (RecursionError)", "deep-data": "not readable JSON (RecursionError)",
                "huge": "over the limit of 16777216", "nan-arg": "exactly one string argument",
                "int-args": "exactly one string argument", "kwargs": "no keyword arguments",
                "not-utf8": "not readable JSON", "no-data": "hash is malformed", "bad-status": "hash is malformed",
                "bad-timeout": "hash is malformed", "bad-date": "hash is malformed",
                "deep-retry": "hash is malformed (RecursionError", "huge-retry": "retry_intervals",
                "big-ttl": "failure_ttl", "deep-meta": "meta", "repeat": "repeats"}
    for name, words in expected.items():
        assert words in letters[f"{name}-{rq_queue}"], (name, letters[f"{name}-{rq_queue}"])
    assert f"flowcraft-deep-{rq_queue}" in letters  # failed once (after the merge: dead-lettered as malformed)
    assert "not readable JSON" in letters[f"sched-garbage-{rq_queue}"]  # promoted by the worker, then refused
    assert len(letters) == len(_HOSTILE) + 2, sorted(letters)
    assert report["queued"] == report["intermediate"] == report["scheduled"] == 0, report  # nothing left stuck


_CHILD_VALUES = """
    import json, sys
    sys.path[:0] = [{tests!r}, {here!r}]
    import redis
    import flowcraft_redis.rq_adapter as rq_adapter
    from flowcraft import FlowRuntime, create_flow
    from flowcraft_redis import RqAdapter
    from test_hostile_rq import hostile_app

    def deep(ctx):
        value = []
        for _ in range(1100):
            value = [value]
        return value

    runtime = hostile_app()
    runtime.add_blueprint(create_flow("nan").node("a", lambda ctx: 1).node("b", lambda ctx: ctx.input)
                          .edge("a", "b", transform="float('nan')"))
    runtime.add_blueprint(create_flow("deep").node("a", deep).node("b", lambda ctx: 1).edge("a", "b"))
    adapter = RqAdapter(runtime, redis.Redis.from_url("redis://127.0.0.1:6379/0"), {queue!r}, prefix={prefix!r},
                        poll_timeout=0.1, retry_intervals=(0, 0, 0))
    workers = []

    class Counted(rq_adapter.InProcessWorker):
        def __init__(self, a):
            workers.append(self)
            super().__init__(a)

    rq_adapter.InProcessWorker = Counted
    runs = []
    for i in range(3):  # several jobs queued at once (the batched path of the other workers)
        runs += [("nan", adapter.start_workflow("nan")), ("deep", adapter.start_workflow("deep")),
                 ("chain3", adapter.start_workflow("chain3", {{"start": i}}))]
    adapter.work(burst=True)
    assert len(workers) == 1 and workers[0].error is None, [w.error for w in workers]
    for flow, run_id in runs:
        result = adapter.wait_for_result(run_id, timeout=10)
        print(json.dumps([flow, result.status, result.errors[0].message if result.errors else ""]))
"""


def test_hostile_values_fail_their_run_and_the_worker_serves_the_rest(
        redis_prefix: str, rq_queue: str) -> None:  # noqa: F811
    """Item 5 on RQ: a transform producing NaN and a node value nested past the JSON limit, three
    runs each queued at once with legitimate runs: one worker, never restarted, ends every run."""
    result = run_bounded(_CHILD_VALUES.format(tests=TESTS, here=HERE, queue=rq_queue, prefix=redis_prefix),
                         timeout=60, memory_mb=768)
    assert result.ok, result.describe()
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert len(lines) == 9, result.describe()
    for flow, status, message in lines:
        if flow == "chain3":
            assert status == "completed", (flow, status, message)
        elif flow == "deep":
            assert status == "failed" and ("RecursionError" in message or "nest" in message), (flow, status, message)
        else:  # NaN: stored as JSON allows it, or refused by the core: either way the run ends
            assert status in ("completed", "failed"), (flow, status, message)
