"""The operator commands (`flowcraft runs`, `inspect`, `retry`, `restart`, `skip`, `dlq`, `prune`)
against each real backend: workers run as `python -m flowcraft worker --burst` subprocesses, client
commands in process (the `Cli` helper and `backend` fixture of test_cli_backends.py)."""
from __future__ import annotations

import os
import sys
import uuid
from typing import Any

import pytest

from flowcraft.cli.errors import EXIT_OK, EXIT_USAGE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_cli_backends import Cli, backend  # noqa: E402,F401  (the fixture is used by name)

pytestmark = pytest.mark.integration
BROKEN_ENV = "FLOWCRAFT_OPS_BROKEN"

APP_SOURCE = '''
"""A checkout whose payment dependency is broken while the file named by $%(env)s exists."""
import os

from flowcraft import FlowRuntime, create_flow


def load(ctx):
    return {"order": 42}


def charge(ctx):
    flag = os.environ.get("%(env)s")
    if flag and os.path.exists(flag):
        raise ConnectionError("payment service unavailable")
    return "charged"


def ship(ctx):
    return "shipped " + str(ctx.input)


checkout = (create_flow("checkout").node("load", load).node("charge", charge).node("ship", ship)
            .edge("load", "charge").edge("charge", "ship"))
runtime = FlowRuntime(blueprints=[checkout])
''' % {"env": BROKEN_ENV}


@pytest.fixture(scope="module")
def ops_app_dir(tmp_path_factory: Any) -> Any:
    path = tmp_path_factory.mktemp("cli_ops_app")
    name = f"cli_ops_app_{uuid.uuid4().hex[:8]}"
    (path / f"{name}.py").write_text(APP_SOURCE)
    return path, name


@pytest.fixture
def cli(capsys: Any, ops_app_dir: Any, backend: Any, tmp_path: Any, monkeypatch: Any) -> Cli:  # noqa: F811
    path, name = ops_app_dir
    monkeypatch.syspath_prepend(str(path))
    flag = tmp_path / "broken"
    flag.write_text("1")
    monkeypatch.setenv(BROKEN_ENV, str(flag))
    made = Cli(capsys, ops_app_dir, f"{name}:runtime", backend, tmp_path / "executions.log")
    made.env[BROKEN_ENV] = str(flag)
    made.flag = flag  # type: ignore[attr-defined]
    return made


def test_find_inspect_fix_retry(cli: Cli) -> None:
    run_id = cli.start("checkout")
    cli.burst()
    failed = cli.json("runs", "--status", "failed", "--json")
    assert [r["run_id"] for r in failed["runs"]] == [run_id]
    assert failed["runs"][0]["error"] == "payment service unavailable"
    code, out, err = cli("runs", "--status", "failed")
    assert code == EXIT_OK and run_id in out and "payment service unavailable" in out
    code, out, err = cli("inspect", run_id)
    assert code == EXIT_OK, err
    assert "Traceback (most recent call last)" in out and "in charge" in out and "ConnectionError" in out
    assert "timeline:" in out and "node:finish" in out and "node:error" in out
    info = cli.json("inspect", run_id, "--json")
    assert info["status"] == "failed" and info["nodes"]["load"]["status"] == "done"
    events = [e["event"] for e in info["timeline"]]
    assert events[0] == "workflow:start" and events[-1] == "workflow:finish" and "node:error" in events
    finished = [e for e in info["timeline"] if e["event"] == "node:finish"]
    assert finished and all("duration_ms" in e and "worker" in e and "timestamp" in e for e in finished)
    cli.flag.unlink()  # type: ignore[attr-defined]  # the operator fixes the cause
    assert cli.json("retry", run_id, app=True)["enqueued"] == ["charge"]
    cli.burst()
    assert cli.json("status", run_id)["status"] == "completed"
    assert cli.json("runs", "--status", "failed", "--json")["runs"] == []
    assert cli.json("restart", run_id, "--from", "ship", app=True)["enqueued"] == ["ship"]
    cli.burst()
    assert cli.json("status", run_id)["status"] == "completed"
    assert cli.json("prune", "--older-than", "0s")["deleted"] == 1
    assert cli("status", run_id)[0] == EXIT_USAGE


def test_skip_dlq_and_one_line_errors(cli: Cli) -> None:
    run_id = cli.start("checkout")
    cli.burst()
    assert cli.json("skip", run_id, "charge", "--output", '"by hand"', app=True)["enqueued"] == ["ship"]
    cli.burst()
    assert cli.json("wait", run_id, "--timeout", "30")["context"]["ship"] == "shipped by hand"
    for argv in (("retry", run_id), ("retry", "no-such-run"), ("restart", run_id, "--from", "nope"),
                 ("skip", run_id, "load")):
        code, out, err = cli(*argv, app=True)
        assert code == EXIT_USAGE and err.startswith("flowcraft: error: ") and err.count("\n") == 1, (argv, err)
    assert cli.json("dlq", "purge")["purged"] >= 0
    code, out, _ = cli("dlq", "list")
    assert code == EXIT_OK and "no dead letters" in out
    code, _, err = cli("dlq", "requeue", "nope")
    assert code == EXIT_USAGE and "no dead letter" in err
    code, _, err = cli("prune", "--older-than", "soon")
    assert code == EXIT_USAGE and "--older-than" in err
