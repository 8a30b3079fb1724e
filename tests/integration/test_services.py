"""The CI machine's services are reachable, and the isolating fixtures really isolate.

Each test talks to a real service through the fixtures in tests/conftest.py.
The teardown checks run a nested pytest session (pytester) that uses the very
same conftest, then look from outside at what that session left behind.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------
def test_redis_roundtrip_under_prefix(redis_client, redis_prefix):
    assert redis_prefix.startswith("fctest:") and redis_prefix.endswith(":")
    key = redis_prefix + "greeting"
    assert redis_client.exists(key) == 0
    assert redis_client.set(key, "hello", ex=300) is True
    assert redis_client.get(key) == b"hello"
    redis_client.hset(redis_prefix + "hash", mapping={"a": "1", "b": "2"})
    assert redis_client.hgetall(redis_prefix + "hash") == {b"a": b"1", b"b": b"2"}
    found = sorted(redis_client.scan_iter(match=redis_prefix + "*"))
    assert found == [(redis_prefix + "greeting").encode(), (redis_prefix + "hash").encode()]


def test_redis_prefixes_are_unique_per_test(redis_prefix, redis_client):
    # Nothing from another test (or an earlier run) lives under this prefix.
    assert list(redis_client.scan_iter(match=redis_prefix + "*")) == []


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------
def test_postgres_table_under_prefix(pg_conn, pg_table_prefix):
    from psycopg2 import sql

    assert pg_table_prefix.startswith("fct_") and len(pg_table_prefix) == len("fct_12345678_")
    table = pg_table_prefix + "jobs"
    with pg_conn.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, name text NOT NULL)").format(
                sql.Identifier(table)
            )
        )
        cur.executemany(
            sql.SQL("INSERT INTO {} (name) VALUES (%s)").format(sql.Identifier(table)),
            [("a",), ("b",), ("c",)],
        )
        pg_conn.commit()
        cur.execute(sql.SQL("SELECT name FROM {} ORDER BY id").format(sql.Identifier(table)))
        assert [row[0] for row in cur.fetchall()] == ["a", "b", "c"]
        cur.execute("SELECT count(*) FROM pg_catalog.pg_tables WHERE tablename = %s", (table,))
        assert cur.fetchone()[0] == 1
    pg_conn.commit()


# --------------------------------------------------------------------------
# RabbitMQ
# --------------------------------------------------------------------------
def test_rabbitmq_persistent_publish_with_confirms(amqp_connection, amqp_queue_name):
    import pika

    channel = amqp_connection.channel()
    channel.confirm_delivery()
    declared = channel.queue_declare(queue=amqp_queue_name, durable=True)
    assert declared.method.queue == amqp_queue_name
    assert declared.method.message_count == 0

    body = json.dumps({"id": uuid.uuid4().hex, "payload": "héllo"}).encode()
    # With confirms on, basic_publish raises if the broker nacks the message
    # or (mandatory=True) cannot route it to a queue.
    channel.basic_publish(
        exchange="",
        routing_key=amqp_queue_name,
        body=body,
        properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),  # 2 = persistent
        mandatory=True,
    )

    method, properties, received = None, None, None
    for _ in range(50):  # basic_get may race the enqueue by a few ms
        method, properties, received = channel.basic_get(queue=amqp_queue_name, auto_ack=False)
        if method is not None:
            break
        amqp_connection.sleep(0.1)
    assert method is not None, "the published message never arrived"
    assert received == body
    assert properties.delivery_mode == 2
    assert properties.content_type == "application/json"
    channel.basic_ack(method.delivery_tag)

    after = channel.queue_declare(queue=amqp_queue_name, passive=True)
    assert after.method.message_count == 0
    channel.close()


# --------------------------------------------------------------------------
# Teardown really cleans up (nested session with the same conftest)
# --------------------------------------------------------------------------
NESTED_TEST = '''
import json, os

def _record(**names):
    with open(os.environ["FCT_NESTED_OUT"], "a") as fh:
        fh.write(json.dumps(names) + "\\n")

def test_leave_things_behind(redis_client, redis_prefix, pg_conn, pg_table_prefix,
                             amqp_connection, amqp_queue_name):
    # Enough keys that SCAN needs many pages to find them all.
    pipe = redis_client.pipeline(transaction=False)
    for i in range(2500):
        pipe.set(redis_prefix + "k%d" % i, i)
    pipe.execute()
    with pg_conn.cursor() as cur:
        for suffix in ("a", "b"):
            cur.execute('CREATE TABLE "%s%s" (x int)' % (pg_table_prefix, suffix))
        cur.execute('CREATE TABLE "%sc" (id serial PRIMARY KEY)' % pg_table_prefix)
    pg_conn.commit()
    ch = amqp_connection.channel()
    for q in (amqp_queue_name, amqp_queue_name + ".dead", amqp_queue_name + ".delay"):
        ch.queue_declare(queue=q, durable=True)
        ch.basic_publish(exchange="", routing_key=q, body=b"x")
    _record(redis=redis_prefix, pg=pg_table_prefix, amqp=amqp_queue_name)

def test_queue_cleanup_tolerates_missing_companions(amqp_connection, amqp_queue_name):
    # Only <name> exists: deleting <name>.dead and <name>.delay must not error.
    amqp_connection.channel().queue_declare(queue=amqp_queue_name)
    _record(amqp=amqp_queue_name)
'''


def _assert_queue_absent(connection, queue):
    import pika.exceptions

    channel = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        channel.queue_declare(queue=queue, passive=True)
    assert excinfo.value.reply_code == 404, queue


def test_fixture_teardown_removes_everything(
    pytester, monkeypatch, redis_client, redis_prefix, pg_conn, pg_table_prefix, amqp_connection
):
    from psycopg2 import sql

    # Sentinels in this test's own namespaces must survive the nested cleanup
    # (and are removed by this test's fixtures afterwards).
    redis_client.set(redis_prefix + "keep", "1", ex=600)
    keep_table = pg_table_prefix + "keep"
    with pg_conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TABLE {} (x int)").format(sql.Identifier(keep_table)))
    pg_conn.commit()

    out = pytester.path / "nested.jsonl"
    monkeypatch.setenv("FCT_NESTED_OUT", str(out))
    monkeypatch.setenv("FLOWCRAFT_REQUIRE_SERVICES", "1")
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_nested=NESTED_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=180)
    result.assert_outcomes(passed=2)
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    assert first["redis"] != redis_prefix and first["pg"] != pg_table_prefix

    assert list(redis_client.scan_iter(match=first["redis"] + "*", count=1000)) == []
    assert redis_client.get(redis_prefix + "keep") == b"1"

    with pg_conn.cursor() as cur:
        cur.execute(
            "SELECT tablename FROM pg_catalog.pg_tables WHERE tablename IN (%s, %s, %s, %s)",
            (first["pg"] + "a", first["pg"] + "b", first["pg"] + "c", keep_table),
        )
        assert [row[0] for row in cur.fetchall()] == [keep_table]
        cur.execute("SELECT count(*) FROM pg_catalog.pg_class WHERE relname = %s", (first["pg"] + "c_id_seq",))
        assert cur.fetchone()[0] == 0
    pg_conn.commit()

    for queue in (first["amqp"], first["amqp"] + ".dead", first["amqp"] + ".delay", second["amqp"]):
        _assert_queue_absent(amqp_connection, queue)
