"""Service restarts (SPEC 7, guarantee 5): a worker reconnects with backoff and goes on, and every
run still ends as in memory, each node execution committed once.

The shared services are never touched: each test starts a private PostgreSQL cluster (`initdb`
into a temporary directory, on a free port) or a private RabbitMQ node (its own node name, ports,
data directory and Erlang cookie), restarts that one mid-run, and removes it afterwards; the other
services are the shared ones, under the conftest fixtures' isolated names. (The Redis restart is in
test_redis_adapter.py.)

The worker is the example worker, `examples/rabbitmq_worker.py`, in its own process, with
`--latency` so that runs are still going when the service goes down. Completions are counted by a
trigger on the adapter's runs table, inside each commit's own transaction: a node execution
committed twice would show as two rows, whatever the client saw of the commit's reply.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (str(ROOT), str(HERE.parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

import pika  # noqa: E402
import psycopg2  # noqa: E402
from psycopg2 import sql  # noqa: E402

from conftest import service_unavailable  # noqa: E402
from examples.workflows import BLUEPRINT_ID, ORDERS, make_runtime  # noqa: E402
from flowcraft_rabbitmq import ensure_schema  # noqa: E402
from flowcraft_rabbitmq.schema import node_states_table_name  # noqa: E402

pytestmark = pytest.mark.integration

logger = logging.getLogger("tests.service_restarts")

TIMEOUT = 90.0
LATENCY = "0.1"  # seconds added to every node by the example worker's --latency: runs still in flight when a service stops
RUNS_PER_ORDER = 2
PROGRESS_BEFORE_RESTART = 12  # node completions committed before the service goes down
OUTAGE = 1.0  # seconds the service stays down (on top of its stop and start times)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# =================================================================================================
# a private PostgreSQL cluster
# =================================================================================================


def postgres_bindir() -> Optional[Path]:
    """The newest server installation's bin directory (Debian layout), else where `initdb` is on PATH."""
    def version(path: str) -> Tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", path)) or (0,)

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port>, data in `base`. PostgreSQL refuses
    to run as root, so as root its commands run as the `postgres` user (`runuser`)."""

    def __init__(self, bindir: Path, base: Path) -> None:
        self.bindir = bindir
        self.base = base
        self.data = base / "data"
        self.port = free_port()
        self.dsn = f"postgresql://flowcraft@127.0.0.1:{self.port}/postgres"
        self.as_owner: List[str] = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.as_owner, str(self.bindir / tool), *args], capture_output=True, text=True,
                              timeout=120, cwd=str(self.base))
        if check and proc.returncode != 0:
            log = self.base / "postgres.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr or proc.stdout}\n{tail}")
        return proc

    def init(self) -> None:
        (self.base / "sockets").mkdir()
        if self.as_owner:
            for path in (self.base, self.base / "sockets"):
                shutil.chown(path, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "flowcraft", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.base / 'sockets'} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "postgres.log"), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        pid = read_pid(self.data / "postmaster.pid")
        if pid is not None and pid_alive(pid):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop", check=False)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    bindir = postgres_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        service_unavailable("a private PostgreSQL", "initdb/pg_ctl", "the PostgreSQL server binaries are not installed")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        service_unavailable("a private PostgreSQL", str(bindir), "running as root, and `runuser` is missing")
    server = PrivatePostgres(bindir, Path(tempfile.mkdtemp(prefix="fc-pg-")))
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()


# =================================================================================================
# a private RabbitMQ node
# =================================================================================================


def rabbitmq_sbindir() -> Optional[Path]:
    """Where the real `rabbitmq-server` script lives (Debian's /usr/sbin one is a wrapper that
    switches to the `rabbitmq` user and writes the shared node's startup log)."""
    if Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists():
        return Path("/usr/lib/rabbitmq/bin")
    found = shutil.which("rabbitmq-server")
    return Path(found).resolve().parent if found else None


class PrivateRabbitMq:
    """A RabbitMQ node of our own: node name `fctest-<hex>@localhost`, AMQP and distribution
    ports picked free, configuration, data, logs and Erlang cookie (HOME) in `base`. The shared
    node's settings (/etc/rabbitmq) are not read."""

    def __init__(self, sbindir: Path, base: Path) -> None:
        self.sbindir = sbindir
        self.base = base
        self.node = f"fctest-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.pid_file = base / "rabbitmq.pid"
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")
        self.env = dict(
            os.environ, HOME=str(base), RABBITMQ_NODENAME=self.node, RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(free_port()), RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"), RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"), RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"), ERL_EPMD_ADDRESS="127.0.0.1",
        )

    def _run(self, tool: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.sbindir / tool), *args], env=self.env, cwd=str(self.base),
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
        return proc

    def start(self, timeout: float = 90.0) -> None:
        """Start the node and return once it accepts AMQP connections."""
        self._run("rabbitmq-server", "-detached")
        deadline = time.monotonic() + timeout
        while True:
            try:
                params = pika.URLParameters(self.url)
                params.connection_attempts, params.socket_timeout = 1, 2
                pika.BlockingConnection(params).close()
                return
            except pika.exceptions.AMQPError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"RabbitMQ node {self.node} did not start in {timeout}s:\n{self.log_tail()}") from exc
                time.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        return "".join(path.read_text(errors="replace")[-chars:] for path in sorted((self.base / "log").glob("*.log")))

    def stop(self) -> None:
        """Stop the node gracefully; returns once its process has exited."""
        self._run("rabbitmqctl", "-n", self.node, "stop", str(self.pid_file))

    def destroy(self) -> None:
        """Stop the node if it runs (SIGTERM: the VM shuts down cleanly; SIGKILL after 30 s), and
        remove its directory."""
        pid = read_pid(self.pid_file)
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def private_rabbitmq() -> Iterator[PrivateRabbitMq]:
    sbindir = rabbitmq_sbindir()
    if sbindir is None or not (sbindir / "rabbitmqctl").exists():
        service_unavailable("a private RabbitMQ", "rabbitmq-server", "the RabbitMQ server is not installed")
    node = PrivateRabbitMq(sbindir, Path(tempfile.mkdtemp(prefix="fc-mq-")))
    try:
        node.start()
        yield node
    finally:
        node.destroy()


# =================================================================================================
# counting commits inside PostgreSQL
# =================================================================================================


class CompletionAudit:
    """A trigger on the node states table (a row per run and node) that records every node state a
    commit moves to `done` (or to `done` at a new iteration), with the database's clock, in the
    commit's own transaction."""

    def __init__(self, dsn: str, runs_table: str, name: str) -> None:
        self.dsn = dsn
        self.table = sql.Identifier(name)
        self.function = sql.Identifier(f"{name}_fn")
        states = sql.Identifier(node_states_table_name(runs_table))
        statements = [
            sql.SQL("CREATE TABLE {} (run_id TEXT NOT NULL, node_id TEXT NOT NULL, iteration INT NOT NULL,"
                    " at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())").format(self.table),
            sql.SQL("""CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.state ->> 'st' = 'done' AND (TG_OP = 'INSERT'
                            OR OLD.state ->> 'st' IS DISTINCT FROM 'done'
                            OR OLD.state ->> 'it' IS DISTINCT FROM NEW.state ->> 'it') THEN
                        INSERT INTO {audit} (run_id, node_id, iteration)
                        VALUES (NEW.run_id, NEW.node_id, (NEW.state ->> 'it')::int);
                    END IF;
                    RETURN NULL;
                END $$""").format(fn=self.function, audit=self.table),
            sql.SQL("CREATE TRIGGER {} AFTER INSERT OR UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
                sql.Identifier(f"{name}_trg"), states, self.function),
        ]
        self._execute(statements)

    def _execute(self, statements: Sequence[Any], params: Any = None) -> List[Any]:
        """Run the statements in one transaction; return the last one's rows."""
        with closing(psycopg2.connect(self.dsn, connect_timeout=5)) as conn, conn, conn.cursor() as cur:
            rows: List[Any] = []
            for statement in statements:
                cur.execute(statement, params)
                rows = cur.fetchall() if cur.description else []
            return rows

    def counts(self) -> Counter:
        """(run id, node id, iteration) -> how many commits completed it."""
        rows = self._execute([sql.SQL("SELECT run_id, node_id, iteration, count(*) FROM {} GROUP BY 1, 2, 3")
                              .format(self.table)])
        return Counter({(run, node, it): n for run, node, it, n in rows})

    def total(self) -> int:
        return self._execute([sql.SQL("SELECT count(*) FROM {}").format(self.table)])[0][0]

    def first_after(self, epoch: float) -> Optional[float]:
        """When (unix seconds) the first completion committed at or after `epoch` was, if any."""
        rows = self._execute([sql.SQL("SELECT extract(epoch FROM min(at))::float8 FROM {} WHERE at >= to_timestamp(%s)")
                              .format(self.table)], (epoch,))
        return rows[0][0]

    def drop_function(self) -> None:
        """The function outlives the tables (DROP TABLE ... CASCADE drops only the trigger)."""
        self._execute([sql.SQL("DROP FUNCTION IF EXISTS {}() CASCADE").format(self.function)])


# =================================================================================================
# the scenario: the example worker, six runs, a restart in the middle
# =================================================================================================


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, worker: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert worker.poll() is None, f"the worker exited ({worker.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{what}: not after {timeout}s; worker log:\n{log.read_text()}"
        time.sleep(0.05)


def queue_counts(url: str, queue: str) -> Tuple[int, ...]:
    """Messages in the main, delay and dead-letter queues, through a connection of our own."""
    with closing(pika.BlockingConnection(pika.URLParameters(url))) as connection:
        channel = connection.channel()
        return tuple(channel.queue_declare(name, passive=True).method.message_count
                     for name in (queue, f"{queue}.delay", f"{queue}.dead"))


class Scenario:
    """The example worker in its own process (log in `log`) and a client adapter here, both
    configured by the environment as a user configures them; the client starts two runs of each
    demo order."""

    def __init__(self, env: Dict[str, str], monkeypatch: Any, tmp_path: Path,
                 processes: List[subprocess.Popen]) -> None:
        from examples.rabbitmq_worker import open_adapter

        for name, value in env.items():
            monkeypatch.setenv(name, value)
        self.env = env
        self.client = open_adapter(make_runtime())
        self.log = tmp_path / "worker.log"
        with open(self.log, "w") as out:
            self.worker = subprocess.Popen(
                [sys.executable, str(ROOT / "examples" / "rabbitmq_worker.py"), "--latency", LATENCY],
                env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=str(ROOT.parent), stdout=out, stderr=subprocess.STDOUT)
        processes.append(self.worker)
        self.runs = {self.client.start_workflow(BLUEPRINT_ID, {"orderId": order_id}): order_id
                     for order_id in ORDERS for _ in range(RUNS_PER_ORDER)}
        self.expected = {order_id: make_runtime().run(BLUEPRINT_ID, {"orderId": order_id}) for order_id in ORDERS}

    def expected_completions(self) -> Counter:
        """Each node that runs in memory, completed exactly once per run."""
        return Counter({(run_id, key.split(".", 1)[1], 0): 1 for run_id, order_id in self.runs.items()
                        for key in self.expected[order_id].context if key.startswith("_outputs.")})

    def wait_for_progress(self, audit: CompletionAudit, completions: int) -> int:
        wait_until(lambda: audit.total() >= completions, TIMEOUT, f"{completions} node completions",
                   self.worker, self.log)
        done = audit.total()
        assert done < sum(self.expected_completions().values()), "the runs ended before the restart: nothing tested"
        return done

    def check_recovery(self, audit: CompletionAudit, back_at: float, reconnect_message: str) -> float:
        """Every run ends as in memory, every node is committed once, and the worker (the only
        one) committed after the service came back; return how long after it did.

        One more run of each order is started once the service is back: with the worker's
        prefetch window, the first runs may all finish while the service is down (their jobs were
        in hand), and the worker must still be shown serving new work after the restart."""
        self.runs.update({self.client.start_workflow(BLUEPRINT_ID, {"orderId": order_id}): order_id
                          for order_id in ORDERS})
        for run_id, order_id in self.runs.items():
            result = self.client.wait_for_result(run_id, timeout=TIMEOUT)
            expected = self.expected[order_id]
            assert result.status == "completed", (order_id, result.status, result.errors, self.log.read_text())
            assert result.context == expected.context
            assert sorted(result.skipped) == sorted(expected.skipped)
        assert audit.counts() == self.expected_completions()
        first = audit.first_after(back_at)
        assert first is not None, "no node completed after the restart"
        url, queue = self.env["RABBITMQ_URL"], self.env["FLOWCRAFT_QUEUE"]
        wait_until(lambda: queue_counts(url, queue) == (0, 0, 0), 30, "an empty queue", self.worker, self.log)
        log = self.log.read_text()
        assert reconnect_message in log, log
        assert "Exception in thread" not in log, log  # the worker thread never died (pika logs its own tracebacks)
        return first - back_at

    def stop_worker(self) -> None:
        """SIGTERM: a graceful stop, exit status 0, even after the outage."""
        self.worker.send_signal(signal.SIGTERM)
        assert self.worker.wait(TIMEOUT) == 0, self.log.read_text()
        assert "stopped" in self.log.read_text().splitlines()[-1]

    def close(self) -> None:
        self.client.close()
        self.client.coordination.client.close()


@pytest.fixture
def processes() -> Iterator[List[subprocess.Popen]]:
    started: List[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# =================================================================================================
# the tests
# =================================================================================================


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_worker_survives_a_postgres_restart(mode: str, private_postgres: PrivatePostgres, amqp_url: str,
                                            amqp_queue_name: str, redis_url: str, redis_prefix: str, monkeypatch: Any,
                                            tmp_path: Path, processes: List[subprocess.Popen]) -> None:
    """PostgreSQL (the runs' store) is shut down mid-run (`pg_ctl stop -m fast`: sessions are
    terminated; `-m immediate`: the server dies without a checkpoint and recovers on start), stays
    down for a second, and comes back on the same port."""
    with closing(psycopg2.connect(private_postgres.dsn)) as conn:
        ensure_schema(conn)  # the seed's default table names: the whole cluster is this test's
    audit = CompletionAudit(private_postgres.dsn, "flowcraft_runs", "fctest_audit")
    scenario = Scenario({"POSTGRES_URL": private_postgres.dsn, "RABBITMQ_URL": amqp_url, "REDIS_URL": redis_url,
                         "FLOWCRAFT_QUEUE": amqp_queue_name, "FLOWCRAFT_PREFIX": redis_prefix},
                        monkeypatch, tmp_path, processes)
    try:
        done = scenario.wait_for_progress(audit, PROGRESS_BEFORE_RESTART)
        stopping = time.time()
        private_postgres.stop(mode)
        time.sleep(OUTAGE)
        private_postgres.start()
        back_at = time.time()
        recovery = scenario.check_recovery(audit, back_at, "reconnected to PostgreSQL")
        scenario.stop_worker()
    finally:
        scenario.close()
    logger.info("PostgreSQL %s restart after %d completions: down %.2fs, first commit %.2fs after it was back",
                mode, done, back_at - stopping, recovery)


@pytest.mark.slow
def test_worker_survives_a_rabbitmq_restart(private_rabbitmq: PrivateRabbitMq, postgres_dsn: str, pg_table_prefix: str,
                                            redis_url: str, redis_prefix: str, monkeypatch: Any, tmp_path: Path,
                                            processes: List[subprocess.Popen]) -> None:
    """The broker (`rabbitmqctl stop`: it closes every connection and exits) stays down for a
    second, and comes back with its durable queues and persistent messages."""
    with closing(psycopg2.connect(postgres_dsn)) as conn:
        ensure_schema(conn, f"{pg_table_prefix}contexts", f"{pg_table_prefix}statuses")
    audit = CompletionAudit(postgres_dsn, f"{pg_table_prefix}runs", f"{pg_table_prefix}audit")
    scenario: Optional[Scenario] = None
    try:
        scenario = Scenario({"POSTGRES_URL": postgres_dsn, "RABBITMQ_URL": private_rabbitmq.url, "REDIS_URL": redis_url,
                             "FLOWCRAFT_QUEUE": "flowcraft-jobs", "FLOWCRAFT_TABLE_PREFIX": pg_table_prefix,
                             "FLOWCRAFT_PREFIX": redis_prefix}, monkeypatch, tmp_path, processes)
        done = scenario.wait_for_progress(audit, PROGRESS_BEFORE_RESTART)
        stopping = time.time()
        private_rabbitmq.stop()
        time.sleep(OUTAGE)
        private_rabbitmq.start()
        back_at = time.time()
        recovery = scenario.check_recovery(audit, back_at, "RabbitMQ consumer connection re-opened")
        scenario.stop_worker()
    finally:
        if scenario is not None:
            scenario.close()
        audit.drop_function()  # conftest drops the prefixed tables, not functions
    logger.info("RabbitMQ restart after %d completions: down %.2fs, first commit %.2fs after it was back",
                done, back_at - stopping, recovery)
