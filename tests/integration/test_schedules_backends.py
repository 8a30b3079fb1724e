"""Schedules on the real backends (SPEC 14, issue 19): `flowcraft scheduler` processes on an
every-second schedule start exactly one run per tick; a SIGKILLed leader is replaced within its
lease's TTL; `flowcraft schedules` lists the next and the last started tick.

The schedulers are real processes (`python -m flowcraft scheduler`); this process reads the runs
they started and the lease they share from the backend.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

import pytest

from test_conformance_backends import FACTORIES, ROOT

pytestmark = pytest.mark.integration

APP = '''
from flowcraft import FlowRuntime, create_flow

runtime = FlowRuntime()
runtime.add_blueprint(create_flow("tick").node("a", lambda ctx: ctx.context.get("who")))
runtime.schedule("tick", "* * * * * *", {"who": "cron"}, name="every-second")
runtime.schedule("tick", "0 3 * * *", name="nightly", timezone="Europe/Paris")
'''
TTL = 2.0
STARTED = re.compile(r"started run (schedule:every-second:(\d+))")


def _env(app_dir: Path) -> Dict[str, str]:
    paths = [str(app_dir), ROOT, os.path.join(ROOT, "adapters"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


def _options(backend: str, factory: Any) -> List[str]:
    if backend in ("redis", "rq"):
        return ["--backend", backend, "--redis-url", factory.url, "--prefix", factory.prefix, "--queue", factory.queue_name]
    options = factory.options
    return ["--backend", "rabbitmq", "--rabbitmq-url", options["amqp_url"], "--postgres-url", options["postgres_dsn"],
            "--queue", options["queue_name"], "--context-table", options["context_table_name"],
            "--status-table", options["status_table_name"], "--redis-url", options["redis_url"],
            "--prefix", options["redis_prefix"]]


def _command(*args: str) -> List[str]:
    return [sys.executable, "-m", "flowcraft", *args, "--app", "schedapp:runtime"]


def _client(backend: str, request: pytest.FixtureRequest, app_dir: Path) -> Any:
    sys.path.insert(0, str(app_dir))
    try:
        runtime = importlib.import_module("schedapp").runtime
    finally:
        sys.path.remove(str(app_dir))
        sys.modules.pop("schedapp", None)
    factory = FACTORIES[backend](request)
    return factory, factory.make_adapter(runtime)


def _ticks(adapter: Any) -> List[int]:
    return sorted(int(r.run_id.rsplit(":", 1)[1]) for r in adapter.list_runs(limit=1000).runs
                  if r.run_id.startswith("schedule:every-second:"))


def _wait_for(predicate: Any, timeout: float) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")


def _lease_holder(factory: Any) -> str:
    value = factory.client.get(f"{factory.prefix}flowcraft:scheduler:lease")
    return value.decode() if value else ""


def test_two_schedulers_start_one_run_per_tick_and_a_killed_leader_hands_over(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    (tmp_path / "schedapp.py").write_text(APP)
    factory, adapter = _client("redis", request, tmp_path)
    logs = [tmp_path / f"scheduler{i}.log" for i in range(2)]
    command = _command("scheduler", *_options("redis", factory), "--lease-ttl", str(TTL), "-v")
    procs = [subprocess.Popen(command, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=log.open("wb"))
             for log in logs]
    try:
        first = _wait_for(lambda: _ticks(adapter), 30)[0]
        time.sleep(10.5)  # ten more ticks
        ticks = _ticks(adapter)
        assert ticks == list(range(first, ticks[-1] + 1)) and len(ticks) >= 10, ticks  # none missed, each once
        logged = Counter(int(m.group(2)) for log in logs for m in STARTED.finditer(log.read_text()))
        assert all(logged[t] == 1 for t in ticks), logged  # no scheduler started a tick another did

        holder = _lease_holder(factory)
        leader = next(p for p in procs if f":{p.pid}:" in holder)
        survivor = next(p for p in procs if p is not leader)
        killed_at = time.monotonic()
        leader.send_signal(signal.SIGKILL)
        leader.wait(10)
        _wait_for(lambda: f":{survivor.pid}:" in _lease_holder(factory), TTL + 5)
        handover = time.monotonic() - killed_at
        print(f"handover {handover:.2f}s after the SIGKILL (lease TTL {TTL:g}s)")
        assert handover <= TTL + 0.5, handover
        before = len(_ticks(adapter))
        time.sleep(3.2)
        after = _ticks(adapter)
        assert len(after) - before >= 3, after  # the new leader starts the ticks
        assert len(after) == len(set(after))
        tail = after[-3:]
        assert tail == list(range(tail[0], tail[0] + 3)), after
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(20) for proc in procs]
        text = "\n".join(log.read_text() for log in logs)
        factory.close()
    assert sorted(codes) == [-signal.SIGKILL, 0], codes  # the survivor stopped cleanly on SIGTERM
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("backend", ["rq", "rabbitmq"])
def test_a_scheduler_starts_runs_and_schedules_lists_them(backend: str, request: pytest.FixtureRequest,
                                                          tmp_path: Path) -> None:
    (tmp_path / "schedapp.py").write_text(APP)
    factory, adapter = _client(backend, request, tmp_path)
    options = _options(backend, factory)
    proc = subprocess.Popen(_command("scheduler", *options), cwd=ROOT, env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ticks = _wait_for(lambda: len(_ticks(adapter)) >= 3 and _ticks(adapter), 30)
        listed = subprocess.run(_command("schedules", *options, "--json"), cwd=ROOT, env=_env(tmp_path),
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        rows = {row["name"]: row for row in json.loads(listed.stdout)["schedules"]}
        assert rows["nightly"]["next_tick"].endswith("T03:00:00+01:00") and rows["nightly"]["last_started_tick"] is None
        assert rows["every-second"]["last_started_tick"] is not None and rows["every-second"]["next_tick"]
        adapter.work(burst=True)
        result = adapter.wait_for_result(f"schedule:every-second:{ticks[0]}", timeout=30)
        assert result.status == "completed" and result.context["a"] == "cron"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        factory.close()
    assert proc.returncode == 0, err.decode()[-3000:]
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))


def test_the_rabbitmq_scheduler_without_redis_is_one_clear_error(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    (tmp_path / "schedapp.py").write_text(APP)
    factory, _ = _client("rabbitmq", request, tmp_path)
    try:
        options = _options("rabbitmq", factory)
        options[options.index("--redis-url") + 1] = "redis://127.0.0.1:1/0"
        done = subprocess.run(_command("scheduler", *options, "--connect-timeout", "1"), cwd=ROOT, env=_env(tmp_path),
                              capture_output=True, text=True, timeout=60)
    finally:
        factory.close()
    assert done.returncode == 2
    assert "keeps its lease in Redis" in done.stderr and "Traceback" not in done.stderr, done.stderr
