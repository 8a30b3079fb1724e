"""Values JSON cannot hold (issue 17, items 5 and 6) on the real services: Redis, and RabbitMQ +
PostgreSQL. The same cases in memory and on the fakes: tests/test_non_json_values.py.

Item 6: a node whose output or context write is circular fails its run at once, naming the key;
the worker (in a bounded child: memory cap, timeout) serves the other runs and dead-letters nothing.
Item 5: NaN, Infinity or a datetime in an initial context or a resume's output is refused before
anything is stored, with the message of the in-memory runtime (PostgreSQL used to answer
`unexpected InvalidTextRepresentation`, Redis to store text that is not JSON).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import uuid
from typing import Any, Dict, Iterator, List

import pytest
import redis

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from bounded import run_bounded  # noqa: E402
from test_hostile_rabbitmq import config  # noqa: E402,F401  (the fixture)

from flowcraft import FlowRuntime, SerializationError, create_flow  # noqa: E402
from flowcraft.cli import main  # noqa: E402
from flowcraft.cli.errors import EXIT_USAGE  # noqa: E402
from flowcraft_rabbitmq import RabbitMqAdapter, RedisCoordinationStore  # noqa: E402
from flowcraft_redis import RedisAdapter  # noqa: E402

pytestmark = pytest.mark.integration


def _circular_output(ctx: Any) -> Any:
    value: Dict[str, Any] = {"a": [1, 2]}
    value["a"].append(value)
    return value


def _circular_write(ctx: Any) -> Any:
    items: List[Any] = []
    items.append({"all": items})
    ctx.context.set("items", items)
    return "unreachable"


def make_runtime() -> FlowRuntime:
    """The worker's and the client's blueprints: two circular ones, a plain one, an approval."""
    rt = FlowRuntime()
    rt.add_blueprint(create_flow("out").node("n", _circular_output).node("m", lambda ctx: "after").edge("n", "m"))
    rt.add_blueprint(create_flow("write").node("n", _circular_write).node("m", lambda ctx: "after").edge("n", "m"))
    rt.add_blueprint(create_flow("plain").node("p", lambda ctx: "fine"))
    rt.add_blueprint(create_flow("approve").wait("decide").node("done", lambda ctx: ctx.input).edge("decide", "done"))
    return rt


CIRCULAR = {
    "out": "value at '_outputs.n.a[2]' is circular: it refers back to '_outputs.n'",
    "write": "value at 'items[0].all' is circular: it refers back to 'items'",
}

NOT_JSON = [
    pytest.param(float("nan"), "initial context: value at 'x' is NaN, which JSON cannot hold", id="nan"),
    pytest.param([float("inf")], "initial context: value at 'x[0]' is Infinity", id="infinity"),
    pytest.param({"at": datetime.datetime(2026, 1, 2)}, "initial context: value at 'x.at' is a datetime", id="datetime"),
]


def in_memory_message(value: Any) -> str:
    with pytest.raises(SerializationError) as error:
        make_runtime().run("plain", {"x": value})
    return str(error.value)


def check_circular_results(report: Dict[str, Any]) -> None:
    for name, fragment in CIRCULAR.items():
        for result in report[name]:
            assert result["status"] == "failed" and "m" not in result["keys"], (name, result)
            [(node_id, kind, message)] = result["errors"]
            assert (node_id, kind) == ("n", "SerializationError") and fragment in message, (name, result)
    assert [r["status"] for r in report["plain"]] == ["completed"] * 2


# === Redis ========================================================================================

REDIS_WORKER = """
import json, logging, sys, time
sys.path[:0] = ["tests", "tests/integration"]
logging.disable(logging.CRITICAL)
import redis
from flowcraft_redis import RedisAdapter
from test_non_json_backends import make_runtime
url, prefix, queue_name = {args!r}
adapter = RedisAdapter(make_runtime(), redis.Redis.from_url(url), queue_name, prefix=prefix, poll_timeout=0.1)
runs = {{name: [adapter.start_workflow(name) for _ in range(2)] for name in ("out", "write", "plain")}}
deadline = time.monotonic() + 20
while time.monotonic() < deadline and (adapter.queue.pending() or any(
        adapter.get_status(r).status == "running" for ids in runs.values() for r in ids)):
    adapter.work(burst=True)
out = {{}}
for name, ids in runs.items():
    results = [adapter.wait_for_result(r, timeout=1) for r in ids]
    out[name] = [{{"status": x.status, "keys": sorted(x.context),
                  "errors": [[e.node_id, e.type, e.message] for e in x.errors]}} for x in results]
out["dead"] = adapter.queue.dead_letters()
adapter.close()
print("RESULT " + json.dumps(out))
"""


def test_a_circular_value_fails_its_run_on_a_redis_worker(redis_url: str, redis_prefix: str) -> None:
    code = REDIS_WORKER.format(args=[redis_url, redis_prefix, f"fcq-{uuid.uuid4().hex[:8]}"])
    result = run_bounded(code, timeout=60, memory_mb=768)
    assert result.ok, result.describe()
    report = json.loads(result.stdout.split("RESULT ")[-1])
    check_circular_results(report)
    assert report["dead"] == []


@pytest.mark.parametrize("value, message", NOT_JSON)
def test_a_non_json_initial_context_is_refused_by_redis_as_in_memory(value: Any, message: str, redis_client: Any,
                                                                    redis_url: str, redis_prefix: str) -> None:
    adapter = RedisAdapter(make_runtime(), redis.Redis.from_url(redis_url), f"fcq-{uuid.uuid4().hex[:8]}",
                           prefix=redis_prefix, poll_timeout=0.1)
    try:
        before = sorted(redis_client.keys(f"{redis_prefix}*"))
        with pytest.raises(SerializationError) as error:
            adapter.start_workflow("plain", {"x": value}, run_id="refused")
        assert str(error.value) == in_memory_message(value) and str(error.value).startswith(message)
        assert sorted(redis_client.keys(f"{redis_prefix}*")) == before  # nothing stored, nothing queued
        assert adapter.get_status("refused") is None
    finally:
        adapter.close()


def test_cli_start_on_redis_refuses_nan_and_writes_nothing(capsys, redis_client: Any, redis_url: str,
                                                         redis_prefix: str) -> None:
    before = sorted(redis_client.keys(f"{redis_prefix}*"))
    code = main(["start", "plain", "--app", "test_non_json_backends:make_runtime", "--redis-url", redis_url,
                 "--prefix", redis_prefix, "--context", '{"x": NaN}'])
    captured = capsys.readouterr()
    assert (code, captured.out) == (EXIT_USAGE, "")
    lines = captured.err.strip().splitlines()
    assert lines == ["flowcraft: error: --context is not valid JSON: value at '$.x' is NaN, which JSON cannot hold "
                     "(no NaN or Infinity)"], captured.err
    assert sorted(redis_client.keys(f"{redis_prefix}*")) == before


# === RabbitMQ + PostgreSQL =========================================================================


def rabbit_adapter(config: Dict[str, Any]) -> RabbitMqAdapter:
    return RabbitMqAdapter(
        make_runtime(), RedisCoordinationStore(redis.Redis.from_url(config["redis_url"]), prefix=config["redis_prefix"]),
        config["amqp_url"], config["postgres_dsn"], queue_name=config["queue"], poll_timeout=0.2,
        context_table_name=config["context_table_name"], status_table_name=config["status_table_name"],
    )


@pytest.fixture
def rabbit(config: Dict[str, Any]) -> Iterator[RabbitMqAdapter]:  # noqa: F811
    adapter = rabbit_adapter(config)
    yield adapter
    adapter.close()
    adapter.coordination.client.close()


RABBIT_WORKER = """
import json, logging, sys, threading, time
sys.path[:0] = ["tests", "tests/integration"]
logging.disable(logging.CRITICAL)
from test_non_json_backends import rabbit_adapter
config, runs = json.loads({args!r})
adapter = rabbit_adapter(config)
thread = threading.Thread(target=adapter.work, daemon=True)
thread.start()
deadline = time.monotonic() + 30
ids = [r for group in runs.values() for r in group]
while thread.is_alive() and time.monotonic() < deadline and any(
        adapter.get_status(r).status == "running" for r in ids):
    time.sleep(0.05)
alive = thread.is_alive()
adapter.stop(timeout=10)
out = {{}}
for name, group in runs.items():
    results = [adapter.wait_for_result(r, timeout=1) for r in group]
    out[name] = [{{"status": x.status, "keys": sorted(x.context),
                  "errors": [[e.node_id, e.type, e.message] for e in x.errors]}} for x in results]
out["alive"] = alive
out["counts"] = list(adapter.queue.message_counts())
adapter.close()
print("RESULT " + json.dumps(out))
"""


def test_a_circular_value_fails_its_run_on_a_rabbitmq_worker(config: Dict[str, Any],  # noqa: F811
                                                             rabbit: RabbitMqAdapter) -> None:
    runs = {name: [rabbit.start_workflow(name) for _ in range(2)] for name in ("out", "write", "plain")}
    result = run_bounded(RABBIT_WORKER.format(args=json.dumps([config, runs])), timeout=60, memory_mb=1024)
    assert result.ok, result.describe()
    report = json.loads(result.stdout.split("RESULT ")[-1])
    assert report["alive"], result.describe()
    check_circular_results(report)
    assert report["counts"] == [0, 0, 0]  # nothing left, nothing dead-lettered


@pytest.mark.parametrize("value, message", NOT_JSON)
def test_a_non_json_initial_context_is_refused_by_postgresql_as_in_memory(value: Any, message: str,
                                                                         rabbit: RabbitMqAdapter) -> None:
    with pytest.raises(SerializationError) as error:  # not "unexpected InvalidTextRepresentation"
        rabbit.start_workflow("plain", {"x": value}, run_id="refused")
    assert str(error.value) == in_memory_message(value) and str(error.value).startswith(message)
    assert rabbit.get_status("refused") is None
    assert rabbit.queue.message_counts() == (0, 0, 0)


@pytest.mark.parametrize("output", [float("nan"), {"at": datetime.date(2026, 1, 2)}])
def test_a_non_json_resume_output_is_refused_on_postgresql_and_the_run_waits_on(output: Any, config: Dict[str, Any],  # noqa: F811
                                                                               rabbit: RabbitMqAdapter) -> None:
    run_id = rabbit.start_workflow("approve")
    worker = rabbit_adapter(config)
    try:
        worker.work(burst=True)
        assert rabbit.get_status(run_id).status == "awaiting"
        before = rabbit.store.read_all_context(run_id)
        with pytest.raises(SerializationError, match=r"^resume: value at 'output"):
            rabbit.resume_with_action(run_id, None, output)
        assert rabbit.get_status(run_id).status == "awaiting" and rabbit.store.read_all_context(run_id) == before
        rabbit.resume_with_action(run_id, None, "fine")
        worker.work(burst=True)
        assert rabbit.wait_for_result(run_id, timeout=10).context["done"] == "fine"
    finally:
        worker.close()
        worker.coordination.client.close()
