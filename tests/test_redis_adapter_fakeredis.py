"""Parts of the Redis adapter that need no Lua, on fakeredis (no server): key validation, the
context encoding (raw seed strings read as strings) and the coordination store.

The store and the queue run Lua scripts (fakeredis needs `lupa` for that), so they are tested on
a real Redis in tests/integration/test_redis_adapter.py."""
from __future__ import annotations

import pytest

fakeredis = pytest.importorskip("fakeredis")

from flowcraft_redis import RedisContext, RedisCoordinationStore  # noqa: E402
from flowcraft_redis.context import decode, encode  # noqa: E402
from flowcraft_redis.keys import QueueKeys, RunKeys  # noqa: E402


def test_default_keys_are_the_seeds() -> None:
    keys = RunKeys()
    assert keys.context("r1") == "workflow:state:r1"
    assert keys.status("r1") == "workflow:status:r1"
    assert keys.record("r1") == "flowcraft:run:r1"
    assert keys.states("r1") == "flowcraft:states:r1"
    assert keys.items("r1") == "flowcraft:items:r1"
    q = QueueKeys("flowcraft-queue")
    assert (q.ready, q.delayed, q.dead) == ("flowcraft-queue", "flowcraft-queue:delayed", "flowcraft-queue:dead")
    assert q.processing("w1") == "flowcraft-queue:processing:w1"
    assert RunKeys("app:").context("r1") == "app:workflow:state:r1"


@pytest.mark.parametrize("bad", ["with space", "tab\there", "nl\n", "", "nul\x00"])
def test_bad_run_ids_are_refused_naming_them(bad: str) -> None:
    with pytest.raises(ValueError, match="run id"):
        RunKeys().context(bad)


@pytest.mark.parametrize("bad", ["a:b", "has space", "", "*"])
def test_bad_queue_names_are_refused_naming_them(bad: str) -> None:
    with pytest.raises(ValueError, match="queue name"):
        QueueKeys(bad)


def test_bad_prefix_and_worker_id() -> None:
    with pytest.raises(ValueError, match="key prefix"):
        RunKeys("a b")
    with pytest.raises(ValueError, match="worker id"):
        QueueKeys("q").processing("w:1")


def test_context_json_with_raw_string_fallback() -> None:
    assert decode(encode({"a": [1, 2.5, None]})) == {"a": [1, 2.5, None]}
    assert decode(b"hello") == "hello"
    assert decode(b"42") == 42
    assert decode(b'{"x": 1}') == {"x": 1}
    assert decode("ünï".encode()) == "ünï"


def test_redis_context_reads_seed_hash() -> None:
    client = fakeredis.FakeRedis()
    client.hset("p:workflow:state:r1", mapping={"name": "ann", "count": "2"})
    ctx = RedisContext(client, "r1", "p:")
    assert ctx.to_dict() == {"name": "ann", "count": 2}
    ctx.set("name", "bob")
    ctx.update({"obj": {"k": [1]}})
    assert ctx.get("name") == "bob" and ctx.get("obj") == {"k": [1]} and ctx.get("nope", 0) == 0
    assert ctx.has("obj") and not ctx.has("nope")
    ctx.delete("obj")
    assert ctx.get_many(["name", "obj"]) == {"name": "bob"}


def test_coordination_store_on_fakeredis() -> None:
    client = fakeredis.FakeRedis()
    store = RedisCoordinationStore(client, "p:")
    assert [store.increment("c", 10), store.increment("c", 10)] == [1, 2]
    assert client.keys("*") == [b"p:c"]  # the key given, under the prefix given: nothing else
    assert store.set_if_not_exist("m", "v", 10) and not store.set_if_not_exist("m", "w", 10)
    assert store.get("m") == "v" and store.extend_ttl("m", 20) and not store.extend_ttl("zz", 5)
    store.delete("m")
    assert store.get("m") is None
