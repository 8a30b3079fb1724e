"""The adapter conformance kit (`flowcraft.testing.conformance`) on the three backends: the Redis
list adapter, RQ, and RabbitMQ + PostgreSQL. Every scenario of the kit, and its fault matrix for
process backends: worker processes SIGKILLed mid-run (`sigkill_workers`).

Each factory builds adapters on the conftest fixtures' isolated names (a Redis key prefix, an RQ
queue, a RabbitMQ queue and PostgreSQL tables of this test) and closes them afterwards; commits are
counted with the counting wrappers of each adapter's own tests. Worker processes are this module's
`*_worker` functions (`python -c`), or a stock `rq worker` told the kit's app with ``FLOWCRAFT_APP``.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
for _path in (TESTS, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from flowcraft import FlowRuntime  # noqa: E402
from flowcraft.testing.conformance import (  # noqa: E402
    BackendFactory, ConformanceSuite, WorkerProcess, check_names, worker_runtime,
)

pytestmark = pytest.mark.integration

CHECKS = check_names(kills=True)  # `sigkill_workers` takes 4-7 s a backend: not marked slow
KILLS = 3
NAP = 0.02  # seconds per node in worker processes: a kill lands mid-node


def _python_worker(function: str, *args: Any) -> List[str]:
    """The command of a worker process running `function(*args)` of this module."""
    code = (f"import sys; sys.path[:0] = [{TESTS!r}, {HERE!r}]; import test_conformance_backends as t; "
            f"t.{function}(*{args!r})")
    return [sys.executable, "-c", code]


def _env(base: Dict[str, str]) -> Dict[str, str]:
    paths = [ROOT, os.path.join(ROOT, "adapters"), os.environ.get("PYTHONPATH", "")]
    return dict(base, PYTHONPATH=os.pathsep.join(p for p in paths if p))


class _Factory(BackendFactory):
    """What the three factories share: the adapters they made (closed at the end) and their commit counts."""

    kills = KILLS

    def __init__(self) -> None:
        self.made: List[Any] = []
        self.counts: Dict[int, Mapping[Tuple[str, str, int], int]] = {}

    def _keep(self, adapter: Any, counts: Mapping[Tuple[str, str, int], int]) -> Any:
        self.made.append(adapter)
        self.counts[id(adapter)] = counts
        return adapter

    def commit_counts(self, adapter: Any) -> Optional[Mapping[Tuple[str, str, int], int]]:
        return self.counts.get(id(adapter))

    def close(self) -> None:
        for adapter in self.made:
            adapter.close()


# =================================================================================================
# Redis (the list adapter)
# =================================================================================================


def redis_worker(url: str, prefix: str, queue_name: str) -> None:
    import redis
    from flowcraft_redis import RedisAdapter

    adapter = RedisAdapter(worker_runtime(), redis.Redis.from_url(url), queue_name=queue_name, prefix=prefix,
                           poll_timeout=0.2, heartbeat_ttl=1.0, recover_interval=0.3)
    adapter.work()


class RedisFactory(_Factory):
    name = "redis"

    def __init__(self, client: Any, url: str, prefix: str) -> None:
        super().__init__()
        self.client, self.url, self.prefix = client, url, prefix
        self.queue_name = f"fcq-{uuid.uuid4().hex[:8]}"

    def make_adapter(self, runtime: FlowRuntime) -> Any:
        from flowcraft_redis import RedisAdapter
        from test_redis_adapter import count_completions

        adapter = RedisAdapter(runtime, self.client, queue_name=self.queue_name, prefix=self.prefix, poll_timeout=0.2)
        return self._keep(adapter, count_completions(adapter))

    def publish_raw(self, adapter: Any, body: bytes) -> None:
        adapter.queue.push_raw(body)

    def dead_letters(self, adapter: Any) -> List[bytes]:
        return [entry["body"].encode() for entry in reversed(adapter.queue.dead_letters())]

    def spawn_worker(self, name: str, ledger_path: str, nap: float) -> WorkerProcess:
        return WorkerProcess(_python_worker("redis_worker", self.url, self.prefix, self.queue_name), name, cwd=ROOT,
                             env=_env(self.worker_env(name, ledger_path, nap)))


# =================================================================================================
# RQ
# =================================================================================================


class RqFactory(_Factory):
    name = "rq"

    def __init__(self, client: Any, url: str, prefix: str) -> None:
        super().__init__()
        self.client, self.url, self.prefix = client, url, prefix
        self.queue_name = f"fcrq-{uuid.uuid4().hex[:8]}"
        self._recovered = 0.0

    def make_adapter(self, runtime: FlowRuntime) -> Any:
        from flowcraft_redis import RqAdapter
        from test_rq_adapter import count_completions

        adapter = RqAdapter(runtime, self.client, queue_name=self.queue_name, prefix=self.prefix, poll_timeout=0.1,
                            retry_intervals=(0, 0, 0))
        return self._keep(adapter, count_completions(adapter))

    def publish_raw(self, adapter: Any, body: bytes) -> None:
        from flowcraft_redis.rq_adapter import RUN_NODE

        adapter.queue.rq.enqueue(RUN_NODE, body.decode(), job_id=f"raw-{uuid.uuid4().hex[:8]}-{self.queue_name}",
                                 result_ttl=0, meta={"flowcraft": adapter.settings.to_meta()})

    def dead_letters(self, adapter: Any) -> List[bytes]:
        return [str(entry["body"]).encode() for entry in adapter.queue.dead_letters()]

    def spawn_worker(self, name: str, ledger_path: str, nap: float) -> WorkerProcess:
        from test_rq_adapter import FLOWCRAFT_WORKER, RQ_CLI

        command = [RQ_CLI, "worker", "--url", self.url, "-w", FLOWCRAFT_WORKER, "--serializer",
                   "rq.serializers.JSONSerializer", "--name", f"{self.queue_name}-{name}", self.queue_name]
        env = self.worker_env(name, ledger_path, nap, dict(os.environ, REDIS_URL=self.url,
                                                            FLOWCRAFT_APP="flowcraft.testing.conformance:worker_runtime"))
        return WorkerProcess(command, name, cwd=ROOT, env=_env(env))

    def recover(self, adapter: Any, killed: Sequence[str]) -> None:
        """What RQ's maintenance does once a dead worker's job heartbeat has expired (made to expire
        now), and the reconciler for runs idle 5 s (a job lost between RQ's dequeue and its registry)."""
        from rq.registry import StartedJobRegistry

        from flowcraft_redis import create_redis_reconciler

        if time.monotonic() - self._recovered < 0.2:
            return
        self._recovered = time.monotonic()
        registry = StartedJobRegistry(queue=adapter.queue.rq)
        for name in killed:
            key = f"rq:worker:{self.queue_name}-{name}"
            job_id = self.client.hget(key, "current_job")
            if job_id:
                for member in self.client.zrange(registry.key, 0, -1):
                    if member.decode().startswith(job_id.decode() + ":"):
                        self.client.zadd(registry.key, {member: time.time() - 1}, xx=True)
                self.client.hdel(key, "current_job")
        registry.cleanup()
        create_redis_reconciler(adapter, stalled_threshold_seconds=5).run()

    def close(self) -> None:
        from test_rq_adapter import delete_rq_queue

        super().close()
        delete_rq_queue(self.client, self.queue_name)


# =================================================================================================
# RabbitMQ + PostgreSQL
# =================================================================================================


def _rabbitmq_adapter(runtime: FlowRuntime, options: Mapping[str, Any]) -> Any:
    import redis
    from flowcraft_rabbitmq import RabbitMqAdapter, RedisCoordinationStore

    coordination = RedisCoordinationStore(redis.Redis.from_url(options["redis_url"]), prefix=options["redis_prefix"])
    return RabbitMqAdapter(runtime, coordination, options["amqp_url"], options["postgres_dsn"],
                           queue_name=options["queue_name"], poll_timeout=0.2,
                           context_table_name=options["context_table_name"],
                           status_table_name=options["status_table_name"])


def rabbitmq_worker(options: Dict[str, Any]) -> None:
    _rabbitmq_adapter(worker_runtime(), options).work()


class RabbitMqFactory(_Factory):
    name = "rabbitmq"

    def __init__(self, options: Dict[str, Any], amqp_connection: Any) -> None:
        super().__init__()
        self.options = options
        self.amqp = amqp_connection

    def make_adapter(self, runtime: FlowRuntime) -> Any:
        from test_rabbitmq_adapter import CountingStore

        adapter = _rabbitmq_adapter(runtime, self.options)
        return self._keep(adapter, CountingStore(adapter.store).outputs)

    def publish_raw(self, adapter: Any, body: bytes) -> None:
        adapter.queue.publish_raw(body)

    def dead_letters(self, adapter: Any) -> List[bytes]:
        """The dead-letter queue's bodies, read without taking them (unacknowledged, then given back)."""
        channel = self.amqp.channel()
        try:
            bodies = []
            while True:
                method, _, body = channel.basic_get(f"{self.options['queue_name']}.dead", auto_ack=False)
                if method is None:
                    return bodies
                bodies.append(bytes(body))
        finally:
            channel.close()

    def spawn_worker(self, name: str, ledger_path: str, nap: float) -> WorkerProcess:
        return WorkerProcess(_python_worker("rabbitmq_worker", self.options), name, cwd=ROOT,
                             env=_env(self.worker_env(name, ledger_path, nap)))

    def close(self) -> None:
        super().close()
        for adapter in self.made:
            adapter.coordination.client.close()


def _rabbitmq_factory(request: Any) -> RabbitMqFactory:
    value = request.getfixturevalue
    options = {"amqp_url": value("amqp_url"), "postgres_dsn": value("postgres_dsn"), "redis_url": value("redis_url"),
               "redis_prefix": value("redis_prefix"), "queue_name": value("amqp_queue_name"),
               "context_table_name": value("pg_table_prefix") + "contexts",
               "status_table_name": value("pg_table_prefix") + "statuses"}
    return RabbitMqFactory(options, value("amqp_connection"))


# =================================================================================================
# every check on every backend
# =================================================================================================

FACTORIES = {
    "redis": lambda request: RedisFactory(request.getfixturevalue("redis_client"), request.getfixturevalue("redis_url"),
                                          request.getfixturevalue("redis_prefix")),
    "rq": lambda request: RqFactory(request.getfixturevalue("redis_client"), request.getfixturevalue("redis_url"),
                                    request.getfixturevalue("redis_prefix")),
    "rabbitmq": _rabbitmq_factory,
}


@pytest.fixture(params=list(FACTORIES))
def backend(request: Any) -> Iterator[_Factory]:
    """A backend's factory on this test's isolated names (the conftest fixtures); closed afterwards."""
    factory = FACTORIES[request.param](request)
    yield factory
    factory.close()


@pytest.mark.parametrize("check", CHECKS)
def test_the_backend_conforms(check: str, backend: _Factory) -> None:
    ConformanceSuite(backend).run(check)
