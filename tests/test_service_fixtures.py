"""The service fixtures' "service down" path: skip normally, fail under FLOWCRAFT_REQUIRE_SERVICES=1.

Needs no running service: every address points at a local port nobody
listens on.  Runs nested pytest sessions (pytester) with tests/conftest.py.
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"

NESTED_TESTS = """
def test_redis(redis_client):
    raise AssertionError("must not run without Redis")

def test_postgres(pg_conn):
    raise AssertionError("must not run without PostgreSQL")

def test_rabbitmq(amqp_queue_name):
    raise AssertionError("must not run without RabbitMQ")
"""


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dead_services(pytester, monkeypatch):
    """Point every service at an unused port; return {service: address shown in messages}."""
    redis_port, pg_port, amqp_port = _unused_port(), _unused_port(), _unused_port()
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{redis_port}/0")
    monkeypatch.setenv("POSTGRES_URL", f"postgresql://root@127.0.0.1:{pg_port}/test")
    monkeypatch.setenv("RABBITMQ_URL", f"amqp://guest:guest@127.0.0.1:{amqp_port}/%2F")
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_nested=NESTED_TESTS)
    return {
        "Redis": f"redis://127.0.0.1:{redis_port}/0",
        "PostgreSQL": f"postgresql://root@127.0.0.1:{pg_port}/test",
        # The password is redacted in messages.
        "RabbitMQ": f"amqp://guest:***@127.0.0.1:{amqp_port}/%2F",
    }


@pytest.mark.parametrize("flag", [None, "0", ""])
def test_missing_services_skip_by_default(pytester, monkeypatch, dead_services, flag):
    if flag is None:
        monkeypatch.delenv("FLOWCRAFT_REQUIRE_SERVICES", raising=False)
    else:
        monkeypatch.setenv("FLOWCRAFT_REQUIRE_SERVICES", flag)
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(skipped=3)
    assert result.ret == pytest.ExitCode.OK
    for service, address in dead_services.items():
        result.stdout.fnmatch_lines([f"SKIPPED *{service} unavailable at {address}: *"])
    assert "guest:guest" not in result.stdout.str()


def test_missing_services_fail_when_required(pytester, monkeypatch, dead_services):
    monkeypatch.setenv("FLOWCRAFT_REQUIRE_SERVICES", "1")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    # The failure happens in fixture setup, so pytest reports errors, not skips.
    result.assert_outcomes(errors=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    for service, address in dead_services.items():
        result.stdout.fnmatch_lines(
            [f"*{service} unavailable at {address}: * (FLOWCRAFT_REQUIRE_SERVICES=1: a missing service is a failure)"]
        )
    assert "must not run" not in result.stdout.str()


@pytest.mark.parametrize(
    ("module", "fixture", "service"),
    [("redis", "redis_client", "Redis"), ("psycopg2", "pg_conn", "PostgreSQL"), ("pika", "amqp_url", "RabbitMQ")],
)
@pytest.mark.parametrize("required", [False, True])
def test_missing_client_library_counts_as_missing_service(pytester, monkeypatch, module, fixture, service, required):
    monkeypatch.setenv("FLOWCRAFT_REQUIRE_SERVICES", "1" if required else "0")
    pytester.makeconftest(CONFTEST.read_text())
    # A None entry in sys.modules makes `import <module>` raise ImportError.
    pytester.makepyfile(
        test_nolib=f"""
import sys
sys.modules[{module!r}] = None

def test_it({fixture}):
    raise AssertionError("must not run")
"""
    )
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider", timeout=120)
    if required:
        result.assert_outcomes(errors=1)
    else:
        result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines([f"*{service} unavailable at *: Python package {module!r} is not installed*"])
