"""The `flowcraft` command line against real services: Redis, RabbitMQ + PostgreSQL (+ RQ when present).

Client commands run in process (`main([...])`); workers run as `python -m flowcraft worker`
subprocesses, as an operator would start them. Every test has its own Redis key prefix, queue
name and table names (tests/conftest.py fixtures), removed afterwards. Run results are compared
with the in-memory run of the same blueprint (SPEC 5: the semantics are identical).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, List

import pytest

from flowcraft.cli import main
from flowcraft.cli.errors import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOG_ENV = "FLOWCRAFT_CLI_TEST_LOG"

APP_SOURCE = '''
"""The integration app: a chain, an approval, and a slow chain; executions are logged to a file."""
import os
import time

from flowcraft import FlowRuntime, create_flow


def _log(ctx):
    path = os.environ.get("%(env)s")
    if path:  # one line per node execution, appended atomically
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, ("%%s %%s\\n" %% (ctx.context.get("tag"), ctx.node_id)).encode())
        finally:
            os.close(fd)


def double(ctx):
    _log(ctx)
    return (ctx.input if ctx.input is not None else 1) * 2


def nap(ctx):
    _log(ctx)
    time.sleep(0.5)
    return {"slept": ctx.context.get("tag")}


def after(ctx):
    _log(ctx)
    return {"after": ctx.input}


def submit(ctx):
    return {"amount": ctx.context.get("amount") or 10}


def pay(ctx):
    return "paid %%s (%%s)" %% (ctx.context.get("submit")["amount"], ctx.input)


def refuse(ctx):
    return "refused"


chain = create_flow("chain").node("a", double, inputs="n").node("b", double).edge("a", "b")
slow = create_flow("slow").node("nap", nap).node("after", after).edge("nap", "after")
approval = (
    create_flow("approval").node("submit", submit).wait("decide").node("pay", pay).node("refuse", refuse)
    .edge("submit", "decide").edge("decide", "pay", action="approve").edge("decide", "refuse", action="reject")
)
runtime = FlowRuntime(blueprints=[chain, slow, approval])
''' % {"env": LOG_ENV}


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory) -> Any:
    path = tmp_path_factory.mktemp("cli_backend_app")
    name = f"cli_backend_app_{uuid.uuid4().hex[:8]}"
    (path / f"{name}.py").write_text(APP_SOURCE)
    return path, name


@pytest.fixture
def app(app_dir, monkeypatch) -> Any:
    """(`MODULE:runtime` of the test app, the imported module); importable here and in subprocesses."""
    path, name = app_dir
    monkeypatch.syspath_prepend(str(path))
    import importlib

    return f"{name}:runtime", importlib.import_module(name)


def _delete_rq_queue(client: Any, queue: str) -> None:
    """Delete what RQ keeps for `queue` (its keys all contain the queue name)."""
    keys = list(client.scan_iter(match=f"rq:*{queue}*", count=1000))
    if keys:
        client.delete(*keys)
    client.srem("rq:queues", f"rq:queue:{queue}")
    stale = [m for m in client.smembers("rq:workers") if queue.encode() in m]
    if stale:
        client.srem("rq:workers", *stale)


def _rq_available() -> bool:
    try:
        import flowcraft_redis
    except ImportError:
        return False
    return hasattr(flowcraft_redis, "RqAdapter")


@pytest.fixture(params=["redis", "rabbitmq", "rq"])
def backend(request) -> List[str]:
    """The connection flags of one backend, isolated for this test."""
    kind = request.param
    if kind == "rq" and not _rq_available():
        pytest.skip("flowcraft_redis.RqAdapter does not exist yet (being written): the rq backend is untested")
    redis_url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    flags = ["--backend", kind, "--redis-url", redis_url, "--prefix", prefix]
    if kind != "rabbitmq":
        queue = f"cli-{uuid.uuid4().hex[:8]}"
        if kind == "rq":  # RQ's own keys are under `rq:`, not our prefix
            client = request.getfixturevalue("redis_client")
            request.addfinalizer(lambda: _delete_rq_queue(client, queue))
        return flags + ["--queue", queue]
    tables = request.getfixturevalue("pg_table_prefix")
    return flags + [
        "--rabbitmq-url", request.getfixturevalue("amqp_url"), "--queue", request.getfixturevalue("amqp_queue_name"),
        "--postgres-url", request.getfixturevalue("postgres_dsn"),
        "--context-table", f"{tables}contexts", "--status-table", f"{tables}statuses",
    ]


class Cli:
    """Runs the command line in process and as subprocesses, with one backend's flags."""

    def __init__(self, capsys: Any, app_dir: Any, app: str, flags: List[str], log: Path) -> None:
        self.capsys, self.app, self.flags, self.log = capsys, app, flags, log
        path, _ = app_dir
        self.cwd = str(path)
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(path), str(ROOT), os.environ.get("PYTHONPATH")])), **{LOG_ENV: str(log)})

    def __call__(self, *argv: Any, app: bool = False) -> Any:
        """(exit code, stdout, stderr) of `main`; with `app`, `--app` is passed too."""
        args = [str(a) for a in argv] + self.flags + (["--app", self.app] if app else [])
        code = main(args)
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def json(self, *argv: Any, app: bool = False, expect: int = EXIT_OK) -> Any:
        code, out, err = self(*argv, app=app)
        assert code == expect, err
        return json.loads(out)

    def start(self, blueprint: str, context: Any = None) -> str:
        code, out, err = self("start", blueprint, "--context", json.dumps(context or {}), app=True)
        assert code == EXIT_OK, err
        return out.strip()

    def spawn(self, *argv: Any) -> subprocess.Popen:
        command = [sys.executable, "-m", "flowcraft", *map(str, argv), *self.flags, "--app", self.app]
        return subprocess.Popen(command, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def burst(self, *extra: Any) -> subprocess.CompletedProcess:
        proc = self.spawn("worker", "--burst", *extra)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_OK, err
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def executions(self) -> Counter:
        return Counter(self.log.read_text().splitlines()) if self.log.exists() else Counter()


@pytest.fixture
def cli(capsys, app_dir, app, backend, tmp_path) -> Cli:
    return Cli(capsys, app_dir, app[0], backend, tmp_path / "executions.log")


def in_memory(app_module: Any, blueprint_id: str, context: Any) -> Any:
    return app_module.runtime.run(blueprint_id, dict(context))


# --- the round trip -----------------------------------------------------------------------------


def test_start_worker_status_wait_graph(cli, app):
    run_id = cli.start("chain", {"n": 3, "tag": "one"})
    assert cli.json("status", run_id)["status"] == "running"
    cli.burst()
    status = cli.json("status", run_id)
    assert (status["run_id"], status["status"]) == (run_id, "completed")
    result = cli.json("wait", run_id, "--timeout", "30")
    assert result["context"] == in_memory(app[1], "chain", {"n": 3, "tag": "one"}).context
    code, out, _ = cli("graph", "chain", "--run", run_id, app=True)
    assert code == EXIT_OK and "class a,b executed" in out
    assert cli.executions() == Counter({"one a": 1, "one b": 1})


def test_approval_waits_then_resumes(cli, app):
    run_id = cli.start("approval", {"amount": 7})
    cli.burst()
    paused = cli.json("wait", run_id, "--timeout", "30")
    assert (paused["status"], paused["awaiting"]) == ("awaiting", ["decide"])
    assert cli.json("resume", run_id, "--action", "approve", "--output", '"ok"', app=True) == {"run_id": run_id, "enqueued": ["pay"]}
    cli.burst()
    done = cli.json("wait", run_id, "--timeout", "30")
    runtime = app[1].runtime
    first = runtime.run("approval", {"amount": 7})
    expected = runtime.resume("approval", first.serialized_context, action="approve", output="ok")
    assert done["status"] == "completed"
    assert done["context"] == expected.context


def test_a_misspelt_resume_action_is_exit_2_and_changes_nothing(cli):
    """Issue 17 item 1 (SPEC 11): refused with one line naming the actions; the run still resumes."""
    run_id = cli.start("approval", {"amount": 7})
    cli.burst()
    before = cli.json("status", run_id)
    code, out, err = cli("resume", run_id, "--action", "aprove", app=True)
    assert (code, out) == (EXIT_USAGE, "")
    assert err.strip() == (f"flowcraft: error: run {run_id}: node 'decide' has no outgoing edge with action "
                           f"'aprove': give one of 'approve', 'reject'")
    assert cli.json("status", run_id) == before
    assert cli.json("resume", run_id, "--action", "reject", app=True) == {"run_id": run_id, "enqueued": ["refuse"]}
    cli.burst()
    assert cli.json("wait", run_id, "--timeout", "30")["context"]["refuse"] == "refused"


def test_cancel_then_wait_exits_1(cli):
    run_id = cli.start("chain", {"n": 1})
    assert cli.json("cancel", run_id) == {"run_id": run_id, "status": "cancelled"}
    assert cli.json("wait", run_id, expect=EXIT_FAILED)["status"] == "cancelled"
    cli.burst()  # the cancelled run's jobs are dropped, not run
    assert cli.executions() == Counter()


def test_unknown_run_and_wait_timeout_as_a_program(cli):
    code, _, err = cli("status", "no-such-run")
    assert code == EXIT_USAGE and err.startswith("flowcraft: error: unknown run 'no-such-run'")
    run_id = cli.start("chain", {"n": 1})  # no worker: it cannot finish
    proc = cli.spawn("wait", run_id, "--timeout", "0.2")
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (EXIT_TIMEOUT, "")
    assert err.strip() == f"flowcraft: error: run {run_id!r} did not finish within 0.2s (it goes on)"


# --- SIGTERM: the job in hand is finished, nothing is lost, nothing runs twice ---------------------


def _wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _stop_mid_run_then_finish(cli: Cli, app: Any, *worker_flags: str) -> Counter:
    """Queue 3 slow runs, SIGTERM a worker while its first `nap` (0.5 s) sleeps, check it exits 0
    leaving work behind, let a second worker finish: every run as in memory, every node run once.
    Returns the executions of the first worker."""
    contexts = [{"tag": f"run{i}"} for i in range(3)]
    runs = [cli.start("slow", context) for context in contexts]
    worker = cli.spawn("worker", *worker_flags)
    _wait_for(lambda: cli.executions())
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == EXIT_OK, err
    assert "stopped (stop signal)" in err
    first = cli.executions()
    assert "running" in [cli.json("status", r)["status"] for r in runs]  # it stopped early
    cli.burst()
    for run_id, context in zip(runs, contexts):
        result = cli.json("wait", run_id, "--timeout", "30")
        assert result["status"] == "completed", result["errors"]
        assert result["context"] == in_memory(app[1], "slow", context).context
    assert cli.executions() == Counter({f"run{i} {n}": 1 for i in range(3) for n in ("nap", "after")})
    return first


@pytest.mark.slow
def test_sigterm_finishes_the_job_in_hand_and_a_second_worker_finishes_the_rest(cli, app):
    first = _stop_mid_run_then_finish(cli, app, "--batch", "1")  # one job in hand at a time
    assert sum(first.values()) == 1  # the job in hand, and no other, was run


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_sigterm_with_the_default_batch_finishes_the_batch_in_hand(cli, app):
    first = _stop_mid_run_then_finish(cli, app)  # the adapter fetches up to 10 jobs at once
    assert set(first) <= {f"run{i} nap" for i in range(3)}  # no job fetched after the signal


# --- several worker processes, reconcile, db init, unreachable services ---------------------------


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_worker_concurrency_starts_processes_and_forwards_sigterm(cli, app):
    runs = [cli.start("chain", {"n": i, "tag": f"r{i}"}) for i in range(4)]
    cli.burst("--concurrency", "2")
    assert [cli.json("status", r)["status"] for r in runs] == ["completed"] * 4
    supervisor = cli.spawn("worker", "--concurrency", "2")
    started = 0
    while started < 2:  # each child logs its start once its signal handlers are in place
        line = supervisor.stderr.readline()
        assert line, "the supervisor's stderr closed before both workers started"
        started += " started on " in line
    supervisor.send_signal(signal.SIGTERM)
    _, err = supervisor.communicate(timeout=30)
    assert supervisor.returncode == EXIT_OK, err
    assert err.count("stopped (stop signal)") == 2


def test_reconcile_once_and_every_until_sigterm(cli):
    cli.start("chain", {"n": 1})
    time.sleep(0.05)
    stats = cli.json("reconcile", "--stalled-after", "0.01", app=True)
    assert stats["scanned"] >= 1 and stats["reconciled"] == 1 and stats["failed"] == 0
    proc = cli.spawn("reconcile", "--every", "0.1", "--stalled-after", "0.01")
    first = json.loads(proc.stdout.readline())
    second = json.loads(proc.stdout.readline())
    assert set(first) == set(second) == {"scanned", "stalled", "reconciled", "failed", "unserved"}
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == EXIT_OK


@pytest.mark.parametrize("backend", ["rabbitmq"], indirect=True)
def test_db_init_creates_the_tables(capsys, backend, pg_conn, pg_table_prefix):
    flags = ["--postgres-url", backend[backend.index("--postgres-url") + 1],
             "--context-table", f"{pg_table_prefix}contexts", "--status-table", f"{pg_table_prefix}statuses"]
    for _ in range(2):  # idempotent
        assert main(["db", "init", *flags]) == EXIT_OK
        names = json.loads(capsys.readouterr().out)
    assert names == {"context_table": f"{pg_table_prefix}contexts", "status_table": f"{pg_table_prefix}statuses",
                     "runs_table": f"{pg_table_prefix}runs", "outbox_table": f"{pg_table_prefix}outbox",
                     "items_table": f"{pg_table_prefix}items", "node_states_table": f"{pg_table_prefix}node_states",
                     "context_keys_table": f"{pg_table_prefix}context_keys", "history_table": f"{pg_table_prefix}history"}
    with pg_conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE %s", (pg_table_prefix + "%",))
        assert {row[0] for row in cur.fetchall()} == set(names.values())


@pytest.mark.parametrize("service, flag, url", [
    ("RabbitMQ", "--rabbitmq-url", "amqp://guest:guest@127.0.0.1:1/%2F"),
    ("PostgreSQL", "--postgres-url", "postgresql://root@127.0.0.1:1/test"),
])
@pytest.mark.parametrize("backend", ["rabbitmq"], indirect=True)
def test_unreachable_rabbitmq_backend_services(capsys, backend, service, flag, url):
    flags = list(backend)
    flags[flags.index(flag) + 1] = url
    code = main(["status", "r1", *flags, "--connect-timeout", "0.5"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flowcraft: error: cannot reach {service} at "), err
    assert "guest:guest" not in err


# --- a service that refuses or is not there: one line, as a program (issue 17 item 7) ---------------


def _program(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m flowcraft ARGV` as a user runs it: its own logging set up by the command."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "flowcraft", *argv], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_one_line(proc: subprocess.CompletedProcess, start: str, secret: str = "") -> str:
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr  # no pika log lines, no retry warnings, no traceback
    assert lines[0].startswith(f"flowcraft: error: {start}"), lines[0]
    if secret:
        assert secret not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("command", [["status", "r1"], ["worker", "--burst", "--app", "examples.workflows:runtime"]])
def test_closed_rabbitmq_port_is_one_line(amqp_url, command):
    url = "amqp://guest:s3cret@127.0.0.1:1/%2F"
    proc = _program(*command, "--backend", "rabbitmq", "--rabbitmq-url", url, "--connect-timeout", "1")
    line = _assert_one_line(proc, "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/%2F: ", "s3cret")
    assert line.endswith("Connection refused"), line


@pytest.mark.parametrize("command", [["status", "r1"], ["worker", "--burst", "--app", "examples.workflows:runtime"]])
def test_wrong_rabbitmq_password_is_authentication_failed_at_once(amqp_url, command, amqp_queue_name):
    parts = amqp_url.split("@", 1)
    url = parts[0].rsplit(":", 1)[0] + ":not-the-password@" + parts[1]
    began = time.monotonic()
    proc = _program(*command, "--backend", "rabbitmq", "--rabbitmq-url", url, "--queue", amqp_queue_name,
                    "--connect-timeout", "30")
    line = _assert_one_line(proc, "authentication failed for RabbitMQ at ", "not-the-password")
    assert "ACCESS_REFUSED" in line
    assert time.monotonic() - began < 15  # not retried for --connect-timeout (30 s): a login refused stays refused


def test_missing_rabbitmq_vhost_is_access_refused(amqp_url):
    url = amqp_url.rsplit("/", 1)[0] + "/no-such-vhost-" + uuid.uuid4().hex[:6]
    line = _assert_one_line(_program("status", "r1", "--backend", "rabbitmq", "--rabbitmq-url", url,
                                     "--connect-timeout", "30"), "access refused for RabbitMQ at ")
    assert "no-such-vhost" in line


def test_unknown_postgres_role_is_authentication_failed(postgres_dsn):
    # the local server trusts every known role (no password to get wrong): an unknown role is the refusal
    for argv in (["status", "r1", "--backend", "rabbitmq"], ["db", "init"]):
        proc = _program(*argv, "--postgres-url", "postgresql://no_such_role_xyz@127.0.0.1:5432/test")
        line = _assert_one_line(proc, "authentication failed for PostgreSQL at postgresql://no_such_role_xyz@")
        assert 'role "no_such_role_xyz" does not exist' in line


def test_wrong_redis_user_or_password_is_authentication_failed(redis_url):
    address = redis_url.replace("redis://", "redis://nobody_xyz:wrong@", 1)
    for argv in (["status", "r1"], ["worker", "--burst", "--app", "examples.workflows:runtime"]):
        proc = _program(*argv, "--redis-url", address)
        line = _assert_one_line(proc, "authentication failed for Redis at redis://nobody_xyz:***@", "wrong@")
        assert "invalid username-password pair" in line


# --- the names in the environment, as the examples read them (issue 17 item 9) ---------------------


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_cli_worker_reads_the_examples_environment_and_serves_their_client(request, kind):
    """With FLOWCRAFT_QUEUE / FLOWCRAFT_PREFIX (/ FLOWCRAFT_TABLE_PREFIX) set and no flags, `flowcraft
    db init` and `flowcraft worker` use those names: the example client's run completes."""
    env = {"REDIS_URL": request.getfixturevalue("redis_url"), "FLOWCRAFT_PREFIX": request.getfixturevalue("redis_prefix")}
    if kind == "redis":
        env["FLOWCRAFT_QUEUE"] = f"fcq-{uuid.uuid4().hex[:8]}"  # under the prefix: deleted with it
    else:
        tables = request.getfixturevalue("pg_table_prefix")
        env.update(RABBITMQ_URL=request.getfixturevalue("amqp_url"), POSTGRES_URL=request.getfixturevalue("postgres_dsn"),
                   FLOWCRAFT_QUEUE=request.getfixturevalue("amqp_queue_name"), FLOWCRAFT_TABLE_PREFIX=tables)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **env)
    flowcraft = [sys.executable, "-m", "flowcraft"]
    if kind == "rabbitmq":
        init = subprocess.run([*flowcraft, "db", "init"], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=60)
        assert init.returncode == EXIT_OK, init.stderr
        assert json.loads(init.stdout)["context_table"] == f"{tables}contexts"
    worker = subprocess.Popen([*flowcraft, "worker", "--backend", kind, "--app", "examples.workflows:runtime"],
                              cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = subprocess.run([sys.executable, str(ROOT / "examples" / f"{kind}_client.py"), "--order", "A-1001"],
                                cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr
        assert json.loads(client.stdout)["status"] == "completed"
    finally:
        worker.send_signal(signal.SIGTERM)
        _, log = worker.communicate(timeout=30)
    assert worker.returncode == EXIT_OK, log
    assert f"queue {env['FLOWCRAFT_QUEUE']!r}" in log, log  # the worker's start line names the queue it used
