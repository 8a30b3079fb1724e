"""The `flowcraft` command line, in process (`main([...])`) and as `python -m flowcraft`.

No services: the distributed subcommands run against one shared `InMemoryAdapter` (the backend
factory is replaced), except the unreachable-service and bad-table cases, which fail before any
service is needed. Real backends are exercised in tests/integration/test_cli_backends.py.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from flowcraft import create_flow
from flowcraft.cli import backends, main
from flowcraft.cli.errors import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE
from flowcraft.cli.parser import build_parser
from flowcraft.cli.progress import Progress
from flowcraft.cli.signals import ForcedStop, StopSignals
from flowcraft.cli.worker import child_argv, serve
from flowcraft.distributed import Reconciler
from flowcraft.events import Event
from flowcraft.testing import InMemoryAdapter

ROOT = Path(__file__).resolve().parents[1]

APP_SOURCE = '''
"""A test app for the CLI: a chain, a failing flow, an approval flow, and signal-sending nodes."""
import os
import signal

from flowcraft import FlowRuntime, create_flow


def double(ctx):
    return (ctx.input if ctx.input is not None else 1) * 2


def boom(ctx):
    raise RuntimeError("boom")


def submit(ctx):
    return {"amount": ctx.context.get("amount") or 10}


def pay(ctx):
    return "paid %s (%s)" % (ctx.context.get("submit")["amount"], ctx.input)


def refuse(ctx):
    return "refused (%s)" % (ctx.input,)


def interrupt(ctx):
    os.kill(os.getpid(), signal.SIGINT)
    return "interrupted"


def terminate(ctx):
    if ctx.context.get("signal"):
        os.kill(os.getpid(), signal.SIGTERM)
    return "terminated"


def interrupt_twice(ctx):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    return "unreachable"


def terminate_twice(ctx):
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    return "unreachable"


chain = create_flow("chain").node("a", double, inputs="n").node("b", double).edge("a", "b")
failing = create_flow("failing").node("a", double, inputs="n").node("boom", boom).edge("a", "boom")
approval = (
    create_flow("approval")
    .node("submit", submit)
    .wait("decide")
    .node("pay", pay)
    .node("refuse", refuse)
    .edge("submit", "decide")
    .edge("decide", "pay", action="approve")
    .edge("decide", "refuse", action="reject")
)
interrupted = create_flow("interrupted").node("stop", interrupt).node("after", double).edge("stop", "after")
stopper = create_flow("stopper").node("stop", terminate)
forced = create_flow("forced").node("stop", terminate_twice)
impatient = create_flow("impatient").node("stop", interrupt_twice)

runtime = FlowRuntime(blueprints=[chain, failing, approval, interrupted, stopper, forced, impatient])
registry = runtime.registry
not_a_runtime = 42


def make_runtime():
    return runtime


def broken_factory():
    raise RuntimeError("no config")
'''


@pytest.fixture(scope="session")
def app_dir(tmp_path_factory):
    """A directory holding the test app module (a unique name) and blueprint files."""
    path = tmp_path_factory.mktemp("cliapp")
    name = f"cli_app_{uuid.uuid4().hex[:8]}"
    (path / f"{name}.py").write_text(APP_SOURCE)
    (path / "broken_app.py").write_text("raise RuntimeError('cannot start')\n")
    return path, name


@pytest.fixture
def app(app_dir, monkeypatch):
    """`MODULE` of the test app, importable in this process."""
    path, name = app_dir
    monkeypatch.syspath_prepend(str(path))
    return name


@pytest.fixture
def app_module(app):
    import importlib

    return importlib.import_module(app)


@pytest.fixture
def files(app_dir, app_module):
    """Blueprint files: `chain.json`, `failing.json`, and broken ones."""
    path, _ = app_dir
    out = {}
    for name in ("chain", "failing"):
        out[name] = path / f"{name}.json"
        out[name].write_text(getattr(app_module, name).to_blueprint().to_json())
    out["bad_json"] = path / "bad.json"
    out["bad_json"].write_text('{"id": "x", "nodes": [')
    out["invalid"] = path / "invalid.json"
    out["invalid"].write_text(json.dumps({"id": "x", "nodes": [{"id": "a", "uses": "u"}],
                                          "edges": [{"source": "a", "target": "nowhere"}]}))
    return {k: str(v) for k, v in out.items()}


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `main(argv)`."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("flowcraft: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --- run --------------------------------------------------------------------------------------


def test_run_prints_the_result_json(capsys, app, files):
    code, out, err = run_cli(capsys, "run", files["chain"], "--app", f"{app}:runtime", "--context", '{"n": 3}')
    assert code == EXIT_OK
    result = json.loads(out)
    assert result["status"] == "completed"
    assert result["context"]["b"] == 12
    assert err == ""  # not a terminal: no progress line


def test_run_by_blueprint_id_with_threads_and_context_file(capsys, app, tmp_path):
    context = tmp_path / "ctx.json"
    context.write_text('{"n": 5}')
    code, out, _ = run_cli(capsys, "run", "chain", "--app", f"{app}:runtime", "--context", f"@{context}",
                           "--concurrency", "4")
    assert code == EXIT_OK
    assert json.loads(out)["context"]["b"] == 20


@pytest.mark.parametrize("attr", ["chain", "registry", "make_runtime"])
def test_app_may_be_a_flow_a_registry_or_a_factory(capsys, app, files, attr):
    code, out, _ = run_cli(capsys, "run", files["chain"], "--app", f"{app}:{attr}", "--context", '{"n": 1}')
    assert code == EXIT_OK
    assert json.loads(out)["context"]["b"] == 4


def test_run_failed_exits_1_with_the_errors(capsys, app, files):
    code, out, _ = run_cli(capsys, "run", files["failing"], "--app", f"{app}:runtime")
    assert code == EXIT_FAILED
    result = json.loads(out)
    assert result["status"] == "failed"
    assert result["errors"][0]["node_id"] == "boom"


def test_run_awaiting_is_not_a_failure(capsys, app):
    code, out, _ = run_cli(capsys, "run", "approval", "--app", f"{app}:runtime")
    assert code == EXIT_OK
    assert json.loads(out)["awaiting"] == ["decide"]


def test_interrupting_a_run_cancels_it_and_prints_the_result(capsys, app):
    code, out, _ = run_cli(capsys, "run", "interrupted", "--app", f"{app}:runtime")
    assert code == EXIT_FAILED
    result = json.loads(out)
    assert result["status"] == "cancelled"
    assert "after" not in result["context"]  # no node started after the signal
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_a_second_interrupt_forces_the_stop(capsys, app):
    code, out, err = run_cli(capsys, "run", "impatient", "--app", f"{app}:runtime")
    assert (code, out) == (EXIT_FAILED, "")
    assert err.strip() == "flowcraft: forced stop (SIGINT)"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_run_on_a_terminal_draws_progress_on_stderr(app, files, monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = main(["run", files["chain"], "--app", f"{app}:runtime"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert json.loads(out)["status"] == "completed"  # stdout holds only the JSON
    drawn = terminal.getvalue()
    assert drawn.startswith("\r\x1b[Kchain: 0/2 nodes")  # the first event is always drawn
    assert "\r\x1b[Kchain: completed, 2/2 nodes in " in drawn and drawn.endswith("s\n")


def test_progress_counts_done_and_skipped_and_throttles_redraws():
    stream, now = _Terminal(), [0.0]
    progress = Progress(stream, "bp", 3, interval=1.0, clock=lambda: now[0])
    progress(Event("node:start", {"blueprint_id": "bp", "node_id": "a"}))
    progress(Event("node:finish", {"blueprint_id": "bp", "node_id": "a"}))  # within the interval: not drawn
    progress(Event("node:start", {"blueprint_id": "child", "node_id": "x"}))  # another run's: ignored
    now[0] = 2.0
    progress(Event("node:skipped", {"blueprint_id": "bp", "node_id": "b"}))
    assert stream.getvalue() == "\r\x1b[Kbp: 0/3 nodes | running a\r\x1b[Kbp: 2/3 nodes | running a"
    progress.finish("completed")
    assert stream.getvalue().endswith("\r\x1b[Kbp: completed, 2/3 nodes, 1 skipped in 2.00s\n")


def test_run_keeps_the_apps_own_event_bus(capsys, app, app_module, files, monkeypatch):
    seen = []

    class Bus:
        def emit(self, event):
            seen.append(event.type)

    monkeypatch.setattr(app_module.runtime, "event_bus", Bus())
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert main(["run", files["chain"], "--app", f"{app}:runtime"]) == EXIT_OK
    assert "workflow:finish" in seen
    assert isinstance(app_module.runtime.event_bus, Bus)  # put back


# --- bad input: one line, exit 2 ----------------------------------------------------------------


@pytest.mark.parametrize("argv, fragments", [
    (["run", "missing.json"], ["cannot read blueprint file 'missing.json'", "No such file"]),
    (["run", "{bad_json}"], ["is not valid JSON", "bad.json"]),
    (["run", "{invalid}"], ["invalid blueprint in", "nowhere"]),
    (["run", "no-such-id", "--app", "{app}:runtime"], ["no blueprint file or known blueprint id 'no-such-id'", "chain"]),
    (["run", "{chain}", "--app", "no_such_module_xyz:runtime"], ["cannot import app module 'no_such_module_xyz'"]),
    (["run", "{chain}", "--app", "{app}:nope"], ["has no attribute 'nope'"]),
    (["run", "{chain}", "--app", "{app}"], ["must be MODULE:ATTR"]),
    (["run", "{chain}", "--app", "{app}:not_a_runtime"], ["is a int, not a FlowRuntime"]),
    (["run", "{chain}", "--app", "{app}:broken_factory"], ["calling it failed", "no config"]),
    (["run", "{chain}", "--app", "broken_app:runtime"], ["importing app module 'broken_app' failed", "cannot start"]),
    (["run", "{chain}", "--app", "{app}:runtime", "--context", "{{nope"], ["--context is not valid JSON"]),
    (["run", "{chain}", "--app", "{app}:runtime", "--context", "[1]"], ["--context must be a JSON object"]),
    (["run", "{chain}", "--app", "{app}:runtime", "--context", "@missing-ctx.json"], ["cannot read --context file"]),
    (["lint", "missing.json"], ["cannot read blueprint file"]),
    (["lint", "{bad_json}"], ["is not valid JSON"]),
    (["graph", "{invalid}"], ["invalid blueprint in"]),
    (["status", "r1", "--redis-url", "redis://127.0.0.1:1/0"], ["cannot reach Redis at redis://127.0.0.1:1/0"]),
    (["start", "chain", "--app", "{app}:runtime", "--redis-url", "redis://127.0.0.1:1/0"], ["cannot reach Redis"]),
    (["worker", "--app", "{app}:runtime", "--burst", "--redis-url", "redis://127.0.0.1:1/0"], ["cannot reach Redis"]),
    (["worker", "--app", "{app}:runtime", "--backend", "rq", "--threads", "4"], ["--threads is not for rq", "--concurrency"]),
    (["status", "r1", "--backend", "rabbitmq", "--context-table", "bad name; drop"],
     ["--context-table 'bad name; drop' is not a valid table name"]),
    (["db", "init", "--status-table", "1bad"], ["--status-table '1bad' is not a valid table name"]),
])
def test_bad_input_is_one_line_and_exit_2(capsys, app, files, argv, fragments):
    values = dict(files, app=app)
    code, out, err = run_cli(capsys, *[a.format(**values) for a in argv])
    assert code == EXIT_USAGE
    assert out == ""
    assert_one_line_error(err, *fragments)


def test_usage_errors_exit_2(capsys):
    assert main([]) == EXIT_USAGE
    assert main(["worker", "--backend", "nosuch", "--app", "m:a"]) == EXIT_USAGE
    assert main(["run", "x.json", "--concurrency", "0"]) == EXIT_USAGE
    assert main(["worker", "--app", "m:a", "--threads", "0"]) == EXIT_USAGE
    assert "usage: flowcraft" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["run"], ["worker"], ["start"], ["status"], ["wait"], ["resume"], ["cancel"],
                                     ["reconcile"], ["graph"], ["lint"], ["db"], ["db", "init"]])
def test_help_of_every_command(capsys, command):
    assert main([*command, "--help"]) == EXIT_OK
    assert capsys.readouterr().out.startswith("usage: flowcraft")


def test_unreachable_postgres_names_the_service_and_hides_the_password_and_redis_is_not_needed(capsys, app):
    # nothing listens on port 1; the rabbitmq backend never reaches for Redis (the engine needs none)
    code, _, err = run_cli(capsys, "status", "r1", "--backend", "rabbitmq", "--redis-url",
                           "redis://:secret@127.0.0.1:1/0", "--postgres-url", "postgresql://u:secret@127.0.0.1:1/test")
    assert code == EXIT_USAGE
    assert_one_line_error(err, "cannot reach PostgreSQL at postgresql://u:***@127.0.0.1:1/test")
    assert "secret" not in err and "Redis" not in err


# --- lint and graph -----------------------------------------------------------------------------


def test_lint_valid_and_invalid(capsys, app, files):
    code, out, _ = run_cli(capsys, "lint", files["chain"], "--app", f"{app}:runtime")
    assert (code, out.strip()) == (EXIT_OK, "valid")
    code, out, _ = run_cli(capsys, "lint", files["invalid"])
    assert code == EXIT_FAILED
    assert "DANGLING_EDGE" in out and out.strip().endswith("error(s)")


def test_lint_json_and_unknown_uses_with_app(capsys, app, tmp_path):
    path = tmp_path / "unknown.json"
    path.write_text(json.dumps({"id": "u", "nodes": [{"id": "a", "uses": "not-registered"}], "edges": []}))
    code, out, _ = run_cli(capsys, "lint", path, "--app", f"{app}:runtime", "--json")
    assert code == EXIT_FAILED
    report = json.loads(out)
    assert report["is_valid"] is False
    assert [i["code"] for i in report["issues"]] == ["UNKNOWN_USES"]
    code, _, _ = run_cli(capsys, "lint", path)  # without an app, `uses` keys are not checked
    assert code == EXIT_OK


def test_graph_prints_mermaid(capsys, app, files):
    code, out, _ = run_cli(capsys, "graph", files["chain"])
    assert code == EXIT_OK
    assert out.startswith("flowchart TD\n")
    assert "a --> b" in out


# --- distributed client on the in-memory adapter -------------------------------------------------


@pytest.fixture
def memory_backend(monkeypatch):
    """Every backend is one shared `InMemoryAdapter` (over the first runtime asked for)."""
    shared = {}

    def open_adapter(args, runtime):
        if "adapter" not in shared:
            shared["adapter"] = InMemoryAdapter(runtime, poll_timeout=0.05)
        return shared["adapter"]

    monkeypatch.setattr(backends, "open_adapter", open_adapter)
    monkeypatch.setattr(backends, "open_reconciler", lambda args, adapter: Reconciler(adapter, args.stalled_after))
    return shared


@pytest.mark.parametrize("backend, threads, expected", [("redis", "3", 3), ("rabbitmq", "16", 16), ("redis", None, None)])
def test_worker_threads_reach_the_adapter(monkeypatch, backend, threads, expected):
    seen = {}
    monkeypatch.setattr(backends, "_redis_adapter", lambda args, runtime, options: seen.update(options))
    monkeypatch.setattr(backends, "_rabbitmq_adapter", lambda args, runtime, options: seen.update(options))
    argv = ["worker", "--backend", backend, "--app", "m:a"] + (["--threads", threads] if threads else [])
    args = build_parser().parse_args(argv)
    backends.open_adapter(args, None)
    assert seen.get("threads") == expected


def test_start_worker_status_wait(capsys, app, memory_backend):
    code, out, _ = run_cli(capsys, "start", "chain", "--app", f"{app}:runtime", "--context", '{"n": 2}')
    assert code == EXIT_OK
    run_id = out.strip()
    code, out, _ = run_cli(capsys, "status", run_id)
    assert json.loads(out)["status"] == "running"
    assert run_cli(capsys, "worker", "--app", f"{app}:runtime", "--burst")[0] == EXIT_OK
    code, out, _ = run_cli(capsys, "status", run_id)
    status = json.loads(out)
    assert (status["run_id"], status["status"], status["result"]["context"]["b"]) == (run_id, "completed", 8)
    code, out, _ = run_cli(capsys, "wait", run_id, "--timeout", "5")
    assert (code, json.loads(out)["context"]["b"]) == (EXIT_OK, 8)


def test_start_from_a_file_warns_when_the_app_lacks_it(capsys, app, memory_backend, tmp_path):
    path = tmp_path / "other.json"
    path.write_text(create_flow("other").node("a", f"{app}.double").to_blueprint().to_json())
    code, out, err = run_cli(capsys, "start", path, "--app", f"{app}:runtime", "--run-id", "fixed-id")
    assert (code, out.strip()) == (EXIT_OK, "fixed-id")
    assert "workers need it too" in err


def _misspelt_uses(app, tmp_path):
    """a (known) -> b (a misspelt key) -> c (unknown): issue 17 item 3."""
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"id": "typo", "nodes": [
        {"id": "a", "uses": f"{app}.double"}, {"id": "b", "uses": f"{app}.doubel"}, {"id": "c", "uses": "nowhere"}],
        "edges": [{"source": "a", "target": "b"}, {"source": "b", "target": "c"}]}))
    return path, (f"flowcraft: error: blueprint 'typo' cannot run, nothing was started: not in the registry: "
                  f"'{app}.doubel' (node 'b'; did you mean '{app}.double'?), 'nowhere' (node 'c')")


def test_run_with_unknown_uses_is_exit_2_before_any_node_runs(capsys, app, tmp_path):
    path, expected = _misspelt_uses(app, tmp_path)
    code, out, err = run_cli(capsys, "run", path, "--app", f"{app}:runtime")
    assert (code, out, err.strip()) == (EXIT_USAGE, "", expected)


def test_start_with_unknown_uses_is_exit_2_and_stores_nothing(capsys, app, memory_backend, tmp_path):
    path, expected = _misspelt_uses(app, tmp_path)
    code, out, err = run_cli(capsys, "start", path, "--app", f"{app}:runtime", "--run-id", "typo-run")
    assert (code, out, err.strip().splitlines()[-1]) == (EXIT_USAGE, "", expected)
    adapter = memory_backend["adapter"]
    assert (adapter.store.get_record("typo-run"), adapter.queue.pending) == (None, 0)


def test_lint_without_an_app_says_uses_were_not_checked(capsys, app, tmp_path):
    path, _ = _misspelt_uses(app, tmp_path)
    code, out, err = run_cli(capsys, "lint", path)
    assert (code, out.strip()) == (EXIT_OK, "valid")
    assert err.strip() == ("flowcraft: warning: uses keys not checked: without --app there is no registry "
                           "to check them against")
    code, out, err = run_cli(capsys, "lint", path, "--app", f"{app}:runtime")
    assert code == EXIT_FAILED and out.count("UNKNOWN_USES") == 2 and err == ""


def test_failed_run_wait_exits_1(capsys, app, memory_backend):
    run_id = run_cli(capsys, "start", "failing", "--app", f"{app}:runtime")[1].strip()
    run_cli(capsys, "worker", "--app", f"{app}:runtime", "--burst")
    code, out, _ = run_cli(capsys, "wait", run_id)
    assert (code, json.loads(out)["status"]) == (EXIT_FAILED, "failed")


def test_wait_timeout_exits_3_with_one_line(capsys, app, memory_backend):
    run_id = run_cli(capsys, "start", "chain", "--app", f"{app}:runtime")[1].strip()
    code, out, err = run_cli(capsys, "wait", run_id, "--timeout", "0.05")
    assert (code, out) == (EXIT_TIMEOUT, "")
    assert_one_line_error(err, f"run {run_id!r} did not finish within 0.05s")


def test_approval_start_wait_resume_worker(capsys, app, memory_backend):
    run_id = run_cli(capsys, "start", "approval", "--app", f"{app}:runtime", "--context", '{"amount": 42}')[1].strip()
    run_cli(capsys, "worker", "--app", f"{app}:runtime", "--burst")
    code, out, _ = run_cli(capsys, "wait", run_id)
    assert (code, json.loads(out)["status"], json.loads(out)["awaiting"]) == (EXIT_OK, "awaiting", ["decide"])
    code, out, _ = run_cli(capsys, "resume", run_id, "--action", "approve", "--output", '"ok by ada"', "--node", "decide",
                           "--app", f"{app}:runtime")
    assert (code, json.loads(out)) == (EXIT_OK, {"run_id": run_id, "enqueued": ["pay"]})
    run_cli(capsys, "worker", "--app", f"{app}:runtime", "--burst")
    code, out, _ = run_cli(capsys, "wait", run_id)
    result = json.loads(out)
    assert (code, result["status"], result["context"]["pay"]) == (EXIT_OK, "completed", "paid 42 (ok by ada)")
    assert "refuse" in result["skipped"]
    # resuming a finished run is an input error
    code, _, err = run_cli(capsys, "resume", run_id, "--action", "approve", "--app", f"{app}:runtime")
    assert code == EXIT_USAGE
    assert_one_line_error(err, "nothing to resume")


def test_a_misspelt_resume_action_is_exit_2_and_the_run_still_resumes(capsys, app, memory_backend):
    """Issue 17 item 1: `--action aprove` used to print {"enqueued": []}, exit 0 and end the run."""
    run_id = run_cli(capsys, "start", "approval", "--app", f"{app}:runtime")[1].strip()
    run_cli(capsys, "worker", "--app", f"{app}:runtime", "--burst")
    adapter = memory_backend["adapter"]
    before = (adapter.store.get_record(run_id), adapter.store.read_all_states(run_id), adapter.queue.pending)
    code, out, err = run_cli(capsys, "resume", run_id, "--action", "aprove", "--app", f"{app}:runtime")
    assert (code, out) == (EXIT_USAGE, "")
    assert_one_line_error(err, f"run {run_id}: node 'decide' has no outgoing edge with action 'aprove': "
                               f"give one of 'approve', 'reject'")
    assert (adapter.store.get_record(run_id), adapter.store.read_all_states(run_id), adapter.queue.pending) == before
    code, _, err = run_cli(capsys, "resume", run_id, "--action", "approve", "--node", "pay", "--app", f"{app}:runtime")
    assert code == EXIT_USAGE
    assert_one_line_error(err, "node 'pay' is not awaiting: give one of ['decide']", "--node ID")
    code, out, _ = run_cli(capsys, "resume", run_id, "--action", "approve", "--app", f"{app}:runtime")
    assert (code, json.loads(out)["enqueued"]) == (EXIT_OK, ["pay"])


def test_cancel(capsys, app, memory_backend):
    run_id = run_cli(capsys, "start", "chain", "--app", f"{app}:runtime")[1].strip()
    code, out, _ = run_cli(capsys, "cancel", run_id)
    assert (code, json.loads(out)) == (EXIT_OK, {"run_id": run_id, "status": "cancelled"})
    code, out, _ = run_cli(capsys, "wait", run_id)
    assert (code, json.loads(out)["status"]) == (EXIT_FAILED, "cancelled")


@pytest.mark.parametrize("command", [["status"], ["wait"], ["cancel"], ["resume", "--action", "go"], ["graph", "chain", "--run"]])
def test_unknown_run_is_exit_2(capsys, app, memory_backend, command):
    argv = [*command, "no-such-run"] + (["--app", f"{app}:runtime"] if command[0] in ("graph", "resume") else [])
    code, out, err = run_cli(capsys, *argv)
    assert (code, out) == (EXIT_USAGE, "")
    assert_one_line_error(err, "unknown run 'no-such-run'")


def test_bad_resume_output_is_exit_2(capsys, app, memory_backend):
    code, _, err = run_cli(capsys, "resume", "r", "--action", "go", "--output", "not json", "--app", f"{app}:runtime")
    assert code == EXIT_USAGE
    assert_one_line_error(err, "--output is not valid JSON")


def test_reconcile_once_prints_stats(capsys, app, memory_backend):
    run_cli(capsys, "start", "chain", "--app", f"{app}:runtime")
    code, out, _ = run_cli(capsys, "reconcile", "--app", f"{app}:runtime", "--stalled-after", "0.000001")
    assert code == EXIT_OK
    # no worker runs: the start job and its re-enqueued copy wait on a queue nobody serves, and the
    # reconciler says so
    assert json.loads(out) == {"scanned": 1, "stalled": 1, "reconciled": 1, "failed": 0, "unserved": 2}


def test_graph_of_a_run_highlights_its_path(capsys, app, memory_backend):
    run_id = run_cli(capsys, "start", "approval", "--app", f"{app}:runtime")[1].strip()
    code, out, _ = run_cli(capsys, "graph", "approval", "--app", f"{app}:runtime", "--run", run_id)
    assert code == EXIT_OK  # still running: nothing has run yet
    assert "class submit" not in out
    run_cli(capsys, "worker", "--app", f"{app}:runtime", "--burst")
    code, out, _ = run_cli(capsys, "graph", "approval", "--app", f"{app}:runtime", "--run", run_id)
    assert code == EXIT_OK
    assert "classDef awaiting" in out and "class decide awaiting" in out
    assert "class submit executed" in out


# --- the worker's signals -----------------------------------------------------------------------


def test_sigterm_stops_the_worker_after_the_job_in_hand(app_module):
    adapter = InMemoryAdapter(app_module.runtime, poll_timeout=0.05)
    runs = [adapter.start_workflow("stopper", {"signal": i == 0}) for i in range(3)]
    # the first job sends SIGTERM to this process while it runs; not a burst: only the signal stops it
    assert serve(adapter, burst=False) == EXIT_OK
    assert [adapter.get_status(r).status for r in runs] == ["completed", "running", "running"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back
    assert serve(adapter, burst=True) == EXIT_OK  # the others were left in the queue, untouched
    assert [adapter.get_status(r).status for r in runs] == ["completed"] * 3


def test_a_second_signal_forces_the_stop_without_committing(app_module):
    adapter = InMemoryAdapter(app_module.runtime, poll_timeout=0.05)
    run_id = adapter.start_workflow("forced")
    assert serve(adapter, burst=False) == EXIT_FAILED
    assert adapter.get_status(run_id).status == "running"  # nothing committed: the job will come back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_stop_signal_just_before_work_begins_is_not_lost(app_module):
    adapter = InMemoryAdapter(app_module.runtime, poll_timeout=0.05)
    run_id = adapter.start_workflow("stopper", {"signal": False})
    work, watchdog_fired = adapter.work, threading.Event()

    def late_work(burst=False, max_jobs=None):
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(0.2)  # the stop request (made on a helper thread) lands before work() starts
        return work(burst=burst, max_jobs=max_jobs)

    def watchdog():  # a lost request would leave this non-burst worker serving forever
        if not finished.wait(10):
            watchdog_fired.set()
            work.__self__.stop()

    adapter.work = late_work
    finished = threading.Event()
    threading.Thread(target=watchdog, daemon=True).start()
    try:
        assert serve(adapter, burst=False) == EXIT_OK
    finally:
        finished.set()
    assert not watchdog_fired.is_set()
    assert adapter.get_status(run_id).status == "running" and adapter.queue.pending == 1  # stopped before any job


def test_stop_signals_sleep_returns_early_and_calls_on_stop():
    called = threading.Event()
    with StopSignals(called.set) as signals:
        assert signals.sleep(0.01) is False
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.sleep(30) is True
        assert called.is_set()
        with pytest.raises(ForcedStop):
            os.kill(os.getpid(), signal.SIGINT)
            signals.sleep(30)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_child_argv_drops_concurrency():
    argv = ["worker", "--app", "m:a", "--concurrency", "3", "--burst", "--concurrency=2"]
    assert child_argv(argv) == ["worker", "--app", "m:a", "--burst"]


# --- as a program -------------------------------------------------------------------------------


def _flowcraft(app_dir, *argv, **kwargs):
    path, _ = app_dir
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(path), str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "flowcraft", *map(str, argv)], cwd=str(path), env=env,
                          capture_output=True, text=True, timeout=60, **kwargs)


def test_program_success_prints_only_the_json_when_piped(app_dir, files):
    _, name = app_dir
    proc = _flowcraft(app_dir, "run", files["chain"], "--app", f"{name}:runtime", "--context", '{"n": 4}')
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["context"]["b"] == 16


def test_program_failed_run_exits_1(app_dir, files):
    _, name = app_dir
    proc = _flowcraft(app_dir, "run", files["failing"], "--app", f"{name}:runtime")
    assert proc.returncode == EXIT_FAILED, proc.stderr
    assert json.loads(proc.stdout)["status"] == "failed"


def test_program_bad_input_exits_2_with_one_line(app_dir):
    proc = _flowcraft(app_dir, "run", "missing.json")
    assert proc.returncode == EXIT_USAGE
    assert proc.stdout == ""
    assert_one_line_error(proc.stderr, "missing.json")


def test_program_lint_errors_exit_1(app_dir, files):
    proc = _flowcraft(app_dir, "lint", files["invalid"])
    assert proc.returncode == EXIT_FAILED
    assert "DANGLING_EDGE" in proc.stdout


def test_console_script_entry_point_is_main():
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["options.entry_points"]["console_scripts"].strip() == "flowcraft = flowcraft.cli:main"


def test_importing_the_cli_imports_no_driver():
    code = ("import sys, flowcraft.cli, flowcraft.cli.commands, flowcraft.cli.worker, flowcraft.cli.backends; "
            "print(sorted(m for m in ('redis', 'pika', 'psycopg2', 'rq') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_postgres_password_refusal_is_authentication_failed_not_cannot_reach():
    # the local PostgreSQL trusts every role, so its refusal is built here as psycopg2 raises it
    psycopg2 = pytest.importorskip("psycopg2")
    refused = psycopg2.OperationalError('connection to server at "127.0.0.1", port 5432 failed: '
                                        'FATAL:  password authentication failed for user "root"\n')
    error = backends.service_error("PostgreSQL", "postgresql://root:pw@127.0.0.1:5432/test", refused)
    assert str(error) == ('authentication failed for PostgreSQL at postgresql://root:***@127.0.0.1:5432/test: '
                          'FATAL: password authentication failed for user "root"')
    down = psycopg2.OperationalError("connection to server at \"127.0.0.1\", port 1 failed: Connection refused")
    assert str(backends.service_error("PostgreSQL", "postgresql://root@127.0.0.1:1/test", down)).startswith(
        "cannot reach PostgreSQL at postgresql://root@127.0.0.1:1/test: ")


def test_queue_prefix_and_tables_come_from_the_environment_unless_given(monkeypatch):
    from flowcraft.cli.parser import build_parser

    def parsed(*flags):
        return build_parser().parse_args(["status", "r1", *flags])

    monkeypatch.delenv("FLOWCRAFT_QUEUE", raising=False)
    monkeypatch.delenv("FLOWCRAFT_PREFIX", raising=False)
    monkeypatch.delenv("FLOWCRAFT_TABLE_PREFIX", raising=False)
    args = parsed("--backend", "rabbitmq")
    assert (backends.queue_name(args), backends.key_prefix(args)) == ("flowcraft-jobs", "")
    assert backends.table_names(args) == ("flowcraft_contexts", "flowcraft_statuses")
    monkeypatch.setenv("FLOWCRAFT_QUEUE", "env-queue")
    monkeypatch.setenv("FLOWCRAFT_PREFIX", "env:")
    monkeypatch.setenv("FLOWCRAFT_TABLE_PREFIX", "env_")
    for backend in ("redis", "rq", "rabbitmq"):
        args = parsed("--backend", backend)
        assert (backends.queue_name(args), backends.key_prefix(args)) == ("env-queue", "env:")
    assert backends.table_names(args) == ("env_contexts", "env_statuses")
    args = parsed("--queue", "q", "--prefix", "", "--context-table", "c", "--status-table", "s")  # flags win
    assert (backends.queue_name(args), backends.key_prefix(args), backends.table_names(args)) == ("q", "", ("c", "s"))
    monkeypatch.setenv("FLOWCRAFT_TABLE_PREFIX", "bad name;")
    with pytest.raises(Exception, match=r"--context-table \(from \$FLOWCRAFT_TABLE_PREFIX\) .bad name;contexts. is not a valid table name"):
        backends.table_names(parsed())


# --- --version, --debug, a closed pipe (issue 17 item 8) ------------------------------------------


def test_version(capsys):
    import flowcraft

    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out == f"flowcraft {flowcraft.__version__}\n"


def test_debug_shows_the_apps_own_traceback_when_it_fails_to_import(capsys, app_dir):
    path, _ = app_dir
    (path / "nested_broken_app.py").write_text("def setup():\n    raise RuntimeError('no config file')\n\nsetup()\n")
    sys.path.insert(0, str(path))
    try:
        code, out, err = run_cli(capsys, "run", "x.json", "--app", "nested_broken_app:runtime")
        assert code == EXIT_USAGE and out == ""
        assert_one_line_error(err, "importing app module 'nested_broken_app' failed: RuntimeError: no config file")
        code, out, err = run_cli(capsys, "run", "x.json", "--app", "nested_broken_app:runtime", "--debug")
    finally:
        sys.path.remove(str(path))
    assert code == EXIT_USAGE
    assert "nested_broken_app.py\", line 4, in <module>" in err and "in setup" in err, err  # the user's frames
    assert err.splitlines()[-1] == ("flowcraft: error: importing app module 'nested_broken_app' failed: "
                                    "RuntimeError: no config file")


def test_graph_into_a_pipe_closed_early_ends_quietly(app_dir, tmp_path):
    flow = create_flow("long")
    for i in range(3000):  # far more Mermaid than a pipe buffers
        flow.node(f"n{i}", double_for_pipe)
        if i:
            flow.edge(f"n{i - 1}", f"n{i}")
    blueprint = tmp_path / "long.json"
    blueprint.write_text(flow.to_blueprint().to_json())
    path, _ = app_dir
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "flowcraft", "graph", str(blueprint)], cwd=str(path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"flowchart TD\n"
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err  # 128 + SIGPIPE, as a shell reports a command killed by it
    assert err == ""  # no "[Errno 32] Broken pipe", no "Exception ignored"


def double_for_pipe(ctx):
    return 2
