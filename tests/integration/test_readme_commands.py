"""The README's shell commands, read from README.md itself and run as written on the real services.

Two kinds of commands are taken from the README: every ```bash block (run as one `bash -e` script,
as a user pastes it) and every example cell of the "Command line" table (each a `flowcraft ...`
command; `RUN_ID` is replaced by the id the `start` cell printed, as the README says). A command
ending with `&` is started in the background, in its own session, and stopped with SIGTERM once the
commands after it ran (it must still be alive then: a worker that died at start fails the test).

Isolation: the commands run in a temporary directory holding links to the repository's `examples/`
and to the running interpreter's virtualenv as `.venv`, with FLOWCRAFT_QUEUE, FLOWCRAFT_PREFIX and
FLOWCRAFT_TABLE_PREFIX set to this test's names (the conftest fixtures remove them afterwards), so
the shared services' default queues and tables are never touched.

Not run: the first bash block (`python3 -m venv .venv && ... pip install ...`, then the whole test
suite: far too slow to re-run inside the suite; the environment running this test was made by it),
and the Benchmarks block (minutes of CPU on a shared host; `tests/integration/test_benchmarks_smoke.py`
runs each benchmark script in a small configuration instead). Both are named below, and the test
fails if the README gains a block or a table cell it does not run.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TIMEOUT = 60
# The blocks not run here, recognised by their first line (see the module docstring).
SKIPPED_BLOCKS = {
    "python3 -m venv .venv && .venv/bin/pip install -e '.[all,test]' && .venv/bin/python examples/quickstart.py":
        "installs the package and runs the whole test suite",
    ".venv/bin/python benchmarks/inmemory.py --rounds 3   # in memory vs Flowcraft TS 2.10.1 in memory":
        "benchmarks: minutes of CPU; test_benchmarks_smoke.py runs them small",
}


# --- reading the README -------------------------------------------------------------------------


def bash_blocks(text: str) -> List[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def table_cells(text: str) -> List[Tuple[str, str]]:
    """(command word, example command) for every `flowcraft ...` span in the Command line table's
    example column, in table order."""
    section = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    cells = []
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        example = row.rstrip().rstrip("|").rsplit(" | ", 1)[1]
        for command in re.findall(r"`(flowcraft [^`]*)`", example):
            words = shlex.split(command)
            cells.append((" ".join(words[1:3]) if words[1] == "db" else words[1], command))
    return cells


def test_the_readme_has_what_this_test_runs() -> None:
    text = README.read_text()
    blocks = bash_blocks(text)
    first_lines = [block.splitlines()[0] for block in blocks]
    for skipped in SKIPPED_BLOCKS:
        assert skipped in first_lines, f"a skipped block changed or went: {skipped!r}"
    assert len(blocks) - len(SKIPPED_BLOCKS) >= 2  # the backend examples and the RQ worker
    commands = {word for word, _ in table_cells(text)}
    assert commands == set(TABLE_HANDLERS), commands ^ set(TABLE_HANDLERS)


# --- running commands ---------------------------------------------------------------------------


def _venv() -> Path:
    for candidate in (ROOT / ".venv", Path(sys.prefix)):
        if (candidate / "bin" / "python").exists() and (candidate / "bin" / "rq").exists():
            return candidate
    pytest.skip("no virtualenv with python and rq to link as .venv")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / ".venv").symlink_to(_venv())
    return tmp_path


@pytest.fixture
def env(request: Any, workdir: Path) -> Iterator[Dict[str, str]]:
    """The environment every command runs in: this test's own queue, key prefix and tables."""
    queue = request.getfixturevalue("amqp_queue_name")  # a RabbitMQ queue removed afterwards; on Redis under the prefix
    redis_url = request.getfixturevalue("redis_url")
    client = request.getfixturevalue("redis_client")  # RQ's keys are under rq:, not our prefix: removed below
    values = {
        "REDIS_URL": redis_url, "RABBITMQ_URL": request.getfixturevalue("amqp_url"),
        "POSTGRES_URL": request.getfixturevalue("postgres_dsn"),
        "FLOWCRAFT_QUEUE": queue, "FLOWCRAFT_PREFIX": request.getfixturevalue("redis_prefix"),
        "FLOWCRAFT_TABLE_PREFIX": request.getfixturevalue("pg_table_prefix"),
    }
    full = {k: v for k, v in os.environ.items() if not k.startswith("FLOWCRAFT_")}
    full.update(values, PYTHONUNBUFFERED="1", PATH=f"{workdir / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    yield full
    for name in (queue, *_extra_queues):
        keys = list(client.scan_iter(match=f"rq:*{name}*", count=1000))
        if keys:
            client.delete(*keys)
        client.srem("rq:queues", f"rq:queue:{name}")
        stale = [m for m in client.smembers("rq:workers") if name.encode() in m]
        if stale:
            client.srem("rq:workers", *stale)
    _extra_queues.clear()


_extra_queues: List[str] = []


class Shell:
    """Runs commands with `bash -e` in the work directory; background ones are stopped at the end."""

    def __init__(self, cwd: Path, env: Dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.background: List[Tuple[str, subprocess.Popen]] = []

    def run(self, script: str, env: Optional[Dict[str, str]] = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        """Run `script` to its end; its background jobs (`&`) stay running, in its session."""
        # files, not pipes: a background job keeps its copy of them open after the script ends
        name = uuid.uuid4().hex[:8]
        out_path, err_path = self.cwd / f"{name}.out", self.cwd / f"{name}.err"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=str(self.cwd), env=env or self.env,
                                    stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        self.background.append((script, proc))  # its session: whatever it left running
        proc.wait(timeout=timeout)
        return subprocess.CompletedProcess(script, proc.returncode, out_path.read_text(), err_path.read_text())

    def ok(self, script: str, **kwargs: Any) -> str:
        done = self.run(script, **kwargs)
        assert done.returncode == 0, f"{script}\n-> exit {done.returncode}\n{done.stderr}"
        return done.stdout

    def alive(self, proc: subprocess.Popen) -> bool:
        try:
            os.killpg(proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop_all(self, check: bool = True) -> None:
        """SIGTERM every session left running (a worker stops gracefully), SIGKILL after 20 s."""
        left = [(script, proc) for script, proc in self.background if self.alive(proc)]
        for _, proc in left:
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for script, proc in left:
            while self.alive(proc) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.alive(proc):
                os.killpg(proc.pid, signal.SIGKILL)
                assert not check, f"still running 20 s after SIGTERM: {script}"
        self.background.clear()


@pytest.fixture
def shell(workdir: Path, env: Dict[str, str]) -> Iterator[Shell]:
    runner = Shell(workdir, env)
    try:
        yield runner
    finally:
        runner.stop_all(check=False)


def _json_lines(out: str) -> List[Any]:
    """Every JSON object printed (one a line, or pretty-printed over several)."""
    decoder, found, at = json.JSONDecoder(), [], out.find("{")
    while at >= 0:
        value, end = decoder.raw_decode(out, at)
        found.append(value)
        at = out.find("{", end)
    return found


# --- the bash blocks ----------------------------------------------------------------------------


def test_readme_bash_blocks_run_as_written(shell: Shell) -> None:
    blocks = [b for b in bash_blocks(README.read_text()) if b.splitlines()[0] not in SKIPPED_BLOCKS]
    assert blocks
    for block in blocks:
        out = shell.ok(block)
        if "examples/telemetry.py" in block:  # spans as JSON and the metrics page, no client
            assert '"name": "flowcraft.node' in out and "flowcraft_node_executions_total{" in out, out
            continue
        if "examples.flaky" in block:  # Operating Flowcraft: failed, found, inspected, retried, completed
            assert "payment service unavailable" in out and "Traceback (most recent call last)" in out, out
            assert _json_lines(out)[-1]["status"] == "completed", out
            continue
        if "examples/scheduled.py" in block:  # Production controls: a deadline missed, a run on time, a schedule
            assert "late: failed: DeadlineExceeded" in out and '"status": "completed"' in out, out
            assert re.search(r"^nightly +nightly-report +0 3 \* \* \* +Europe/Paris", out, re.MULTILINE), out
            continue
        results = _json_lines(out)  # each client prints its WorkflowResult
        assert len(results) == block.count("_client.py"), (block, out)
        for result in results:
            assert result["status"] == "completed", (block, result)
        started = [proc for script, proc in shell.background if script == block]
        if block.rstrip().endswith("&") or " &\n" in block:
            time.sleep(1.0)  # a worker that cannot start (bad URL, bad app) is dead by now
            assert all(shell.alive(proc) for proc in started), f"a background command of this block died:\n{block}"
        shell.stop_all()  # every worker stops gracefully on SIGTERM


# --- the Command line table ---------------------------------------------------------------------


def _cells() -> Dict[str, List[str]]:
    cells: Dict[str, List[str]] = {}
    for word, command in table_cells(README.read_text()):
        cells.setdefault(word, []).append(command)
    return cells


def _with_run_id(command: str, run_id: str) -> str:
    assert "RUN_ID" in command
    return command.replace("RUN_ID", shlex.quote(run_id))


TABLE_HANDLERS = ("run", "worker", "start", "status", "wait", "resume", "cancel", "reconcile", "graph", "lint", "db init")


def test_readme_command_line_table_runs_as_written(shell: Shell, env: Dict[str, str], workdir: Path) -> None:
    cells = _cells()
    assert set(cells) == set(TABLE_HANDLERS), set(cells) ^ set(TABLE_HANDLERS)
    (run_cell,) = cells["run"]
    assert _json_lines(shell.ok(run_cell))[0]["status"] == "completed"

    (worker_cell,) = cells["worker"]
    assert worker_cell.endswith("&")
    shell.run(worker_cell)
    (start_cell,) = cells["start"]
    run_id = shell.ok(start_cell).strip()
    assert run_id
    (wait_cell,) = cells["wait"]
    assert _json_lines(shell.ok(_with_run_id(wait_cell, run_id)))[0]["status"] == "completed"
    (status_cell,) = cells["status"]
    assert _json_lines(shell.ok(_with_run_id(status_cell, run_id)))[0]["status"] == "completed"
    for graph_cell in cells["graph"]:
        command = _with_run_id(graph_cell, run_id) if "RUN_ID" in graph_cell else graph_cell
        assert shell.ok(command).startswith("flowchart")
    (lint_cell,) = cells["lint"]
    assert "valid" in shell.ok(lint_cell)

    (reconcile_cell,) = cells["reconcile"]
    assert reconcile_cell.endswith("&")
    log = workdir / "reconcile.out"
    shell.run(f"{reconcile_cell[:-1].rstrip()} > {shlex.quote(str(log))} &")
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "scanned" in log.read_text(), "reconcile --every printed no first pass"
    shell.stop_all()  # the worker and the reconciler stop gracefully on SIGTERM

    (db_cell,) = cells["db init"]
    tables = json.loads(shell.ok(db_cell))
    assert tables["context_table"] == f"{env['FLOWCRAFT_TABLE_PREFIX']}contexts"

    # resume and cancel need runs of examples/approval.py waiting for approval: started here, on a
    # queue of their own (the table's worker runs examples.order_app)
    queue = f"{env['FLOWCRAFT_QUEUE']}-approval"
    _extra_queues.append(queue)
    approval_env = dict(env, FLOWCRAFT_QUEUE=queue)
    app = "--app examples.approval:flow"

    def awaiting_run() -> str:
        started = shell.ok(f"flowcraft start expense-approval {app}", env=approval_env).strip()
        shell.ok(f"flowcraft worker --burst {app}", env=approval_env)
        assert _json_lines(shell.ok(f"flowcraft wait {started} --timeout 30", env=approval_env))[0]["status"] == "awaiting"
        return started

    (resume_cell,) = cells["resume"]
    approved = awaiting_run()
    shell.ok(_with_run_id(resume_cell, approved), env=approval_env)
    shell.ok(f"flowcraft worker --burst {app}", env=approval_env)
    result = _json_lines(shell.ok(f"flowcraft wait {approved} --timeout 30", env=approval_env))[0]
    assert result["status"] == "completed" and result["context"]["pay_out"].endswith("(ok)"), result

    (cancel_cell,) = cells["cancel"]
    cancelled = awaiting_run()
    assert _json_lines(shell.ok(_with_run_id(cancel_cell, cancelled), env=approval_env))[0]["status"] == "cancelled"
