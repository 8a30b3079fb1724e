"""The distributed benchmark scripts run end to end with tiny shapes (no peers, no speed assertion).

Each script is run as a user would run it (a subprocess, from another working directory, so that
`benchmarks/redis.py` must not shadow the `redis` package); it must exit 0 and print well-formed
JSON lines: a positive, finite rate for every shape of every backend and every raw limit, and a
summary saying ok. The scripts clean up after themselves: none of their keys, tables or queues is left.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any, Dict, List, Sequence

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")
TINY = ["--rounds", "1", "--runs", "2", "--chain", "3", "--fan", "5", "--fan-runs", "2", "--serial-runs", "1",
        "--no-peer", "--seconds", "0.2", "--warmup", "0", "--timeout", "60"]


def run_script(name: str, args: Sequence[str], env: Dict[str, str], cwd: Any) -> List[Dict[str, Any]]:
    done = subprocess.run([sys.executable, os.path.join(BENCH, name), *args], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (f"{name} exited {done.returncode}\n"
                                  f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def positive_rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def assert_figures(lines: List[Dict[str, Any]], backends: Sequence[str], limit_keys: Sequence[str]) -> None:
    kinds = [line["kind"] for line in lines]
    assert kinds[0] == "start" and kinds[-1] == "end", kinds
    assert "check_failed" not in kinds, [line for line in lines if line["kind"] == "check_failed"]
    ours = {(line["backend"], line["shape"]): line for line in lines if line["kind"] == "ours"}
    for backend in backends:
        for shape, runs, nodes in (("a_chain", 2, 3), ("a_serial", 1, 3), ("b_fan", 2, 7)):
            line = ours[(backend, shape)]
            assert line["node_executions"] == runs * nodes, line
            assert positive_rate(line["nodes_per_s"]) and positive_rate(line["wall_s"]), line
            assert line["run_latency_ms"]["n"] == runs and positive_rate(line["run_latency_ms"]["median"]), line
            assert set(line["host_cpu"]) >= {"busy_cores", "worker_cores", "other_cores"}, line
    (limits,) = [line for line in lines if line["kind"] == "limits"]
    for key in limit_keys:
        assert positive_rate(limits[key]), (key, limits)
    workers = [line for line in lines if line["kind"] == "workers"]
    assert sorted(w["backend"] for w in workers) == sorted(backends), workers
    assert all(w["clean_shutdown"] and w["processed"] > 0 and not w.get("rq_failed_jobs") for w in workers), workers
    (summary,) = [line for line in lines if line["kind"] == "summary"]
    assert summary["ok"] is True and summary["rows"], summary
    # tiny shapes differ from the peers': no ratio, and no verdict on the target
    assert all(row.get("ratio") is None for row in summary["rows"]), summary["rows"]
    assert summary["target"]["met"] is None, summary["target"]


def redis_keys(redis_url: str, *patterns: str) -> List[Any]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return [key for pattern in patterns for key in client.scan_iter(match=pattern, count=1000)]
    finally:
        client.close()


def rq_adapter_available() -> bool:
    try:
        from flowcraft_redis import RqAdapter  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def service_env(redis_url: str, postgres_dsn: str, amqp_url: str) -> Dict[str, str]:
    return dict(os.environ, REDIS_URL=redis_url, POSTGRES_URL=postgres_dsn, RABBITMQ_URL=amqp_url)


@pytest.mark.slow  # about 5 s: two backends, each with its worker process to start and stop
def test_redis_benchmark_prints_checked_figures(redis_url: str, tmp_path: Any) -> None:
    backends = ["redis", "rq"] if rq_adapter_available() else ["redis"]
    env = dict(os.environ, REDIS_URL=redis_url)
    lines = run_script("redis.py", ["--backend", ",".join(backends), *TINY], env, tmp_path)
    assert_figures(lines, backends, ["redis_ping_per_s", "redis_pipelined_incr_per_s_batch100",
                                     "handoff_2proc_per_s", "handoff_1proc_sequential_per_s"])
    tag = next(line for line in lines if line["kind"] == "setup")["tag"]
    assert redis_keys(redis_url, f"fcbench:{tag}:*", f"rq:*fcbench-{tag}-*") == []


def test_redis_benchmark_rejects_bad_arguments(tmp_path: Any) -> None:
    done = subprocess.run([sys.executable, os.path.join(BENCH, "redis.py"), "--runs", "0"], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--runs" in done.stderr, done.stderr


def test_rabbitmq_benchmark_prints_checked_figures(service_env: Dict[str, str], redis_url: str, postgres_dsn: str,
                                                   amqp_url: str, tmp_path: Any) -> None:
    lines = run_script("rabbitmq.py", TINY, service_env, tmp_path)
    assert_figures(lines, ["rabbitmq"], ["amqp_publish_confirmed_persistent_per_s", "amqp_consume_manual_ack_prefetch100_per_s",
                                         "pg_update_autocommit_per_s", "pg_update_tx10_stmts_per_s", "redis_ping_per_s"])
    setup = next(line for line in lines if line["kind"] == "setup")
    import pika
    import psycopg2

    conn = psycopg2.connect(postgres_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_catalog.pg_tables WHERE substr(tablename, 1, length(%(p)s)) = %(p)s",
                        {"p": setup["table_prefix"]})
            assert cur.fetchall() == [], "benchmark tables left behind"
    finally:
        conn.close()
    amqp = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for queue in (setup["queue"], setup["queue"] + ".dead"):
            with pytest.raises(pika.exceptions.ChannelClosedByBroker):  # 404: the queue was deleted
                amqp.channel().queue_declare(queue, passive=True)
    finally:
        amqp.close()
    assert redis_keys(redis_url, setup["redis_prefix"] + "*") == []


def test_limits_script_prints_one_line(service_env: Dict[str, str], tmp_path: Any) -> None:
    done = subprocess.run([sys.executable, os.path.join(BENCH, "limits.py"), "--seconds", "0.1"], cwd=str(tmp_path),
                          env=service_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [json.loads(x) for x in done.stdout.splitlines() if x.strip()]
    assert line["ok"] is True, line
    for key in ("redis_ping_per_s", "redis_pipelined_incr_per_s_batch100", "handoff_2proc_per_s",
                "handoff_1proc_sequential_per_s", "amqp_publish_confirmed_persistent_per_s",
                "amqp_consume_manual_ack_prefetch100_per_s", "pg_update_autocommit_per_s", "pg_update_tx10_stmts_per_s"):
        assert positive_rate(line[key]), (key, line)


def test_a_wrong_result_fails_the_benchmark(redis_url: str, tmp_path: Any) -> None:
    """The checks inside the timed loop fire: a wrong chain output makes the script exit 1."""
    env = dict(os.environ, REDIS_URL=redis_url, BENCH_INJECT_FAULT="1")
    done = subprocess.run([sys.executable, os.path.join(BENCH, "redis.py"), "--backend", "redis", "--no-limits", *TINY],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    (failure,) = [line for line in lines if line["kind"] == "check_failed"]
    assert "final output 4 != 3" in failure["error"], failure
    (summary,) = [line for line in lines if line["kind"] == "summary"]
    assert summary["ok"] is False
    tag = next(line for line in lines if line["kind"] == "setup")["tag"]
    assert redis_keys(redis_url, f"fcbench:{tag}:*") == []


SCALE_TINY = ["--chain", "3,6", "--fan", "3,6", "--batch", "4,8", "--timeout", "60"]


def scale_backends() -> List[str]:
    return ["memory", "redis", "rq", "rabbitmq"] if rq_adapter_available() else ["memory", "redis", "rabbitmq"]


def assert_scale_cleaned_up(tag: str, redis_url: str, postgres_dsn: str) -> None:
    assert redis_keys(redis_url, f"fcbench:{tag}*", f"rq:*fcbench-{tag}*") == []
    import psycopg2

    conn = psycopg2.connect(postgres_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_catalog.pg_tables WHERE substr(tablename, 1, length(%(p)s)) = %(p)s",
                        {"p": f"fcbench_{tag}"})
            assert cur.fetchall() == [], "benchmark tables left behind"
    finally:
        conn.close()


@pytest.mark.slow  # a few seconds: every backend, every shape at two tiny sizes
def test_scale_benchmark_prints_a_cost_and_a_ratio_per_backend_and_shape(service_env: Dict[str, str], redis_url: str,
                                                                          postgres_dsn: str, tmp_path: Any) -> None:
    backends = scale_backends()
    lines = run_script("scale.py", ["--backends", ",".join(backends), *SCALE_TINY], service_env, tmp_path)
    kinds = [line["kind"] for line in lines]
    assert kinds[0] == "start" and kinds[-1] == "end" and "check_failed" not in kinds, lines
    shapes = ("chain", "fan", "batch_start", "batch_after")
    nodes = {("chain", 3): 3, ("chain", 6): 6, ("fan", 3): 5, ("fan", 6): 8, ("batch_start", 4): 6,
             ("batch_start", 8): 10, ("batch_after", 4): 7, ("batch_after", 8): 11}
    scale = {(l["backend"], l["shape"], l["size"]): l for l in lines if l["kind"] == "scale"}
    assert set(scale) == {(b, s, n) for b in backends for (s, n) in nodes}, sorted(scale)
    for (_backend, shape, n), line in scale.items():
        assert line["node_executions"] == nodes[(shape, n)], line
        assert positive_rate(line["us_per_node"]) and positive_rate(line["wall_s"]), line
        assert line["conflicts"] == 0, line  # one worker: nothing to race
    ratios = {(l["backend"], l["shape"]): l for l in lines if l["kind"] == "ratio"}
    assert set(ratios) == {(b, s) for b in backends for s in shapes}
    for (backend, shape), line in ratios.items():
        small, large = scale[(backend, shape, line["small"])], scale[(backend, shape, line["large"])]
        # the script divides unrounded costs; the lines print them rounded to 0.01 us
        assert abs(line["ratio"] - large["us_per_node"] / small["us_per_node"]) <= 0.011, (line, small, large)
        assert line["met"] == (line["ratio"] <= 1.3)
    (summary,) = [line for line in lines if line["kind"] == "summary"]
    assert summary["ok"] is True and len(summary["ratios"]) == len(ratios)
    assert_scale_cleaned_up(next(l for l in lines if l["kind"] == "setup")["tag"], redis_url, postgres_dsn)


@pytest.mark.slow  # worker processes to start and stop per backend and count
def test_scale_benchmark_measures_contention_with_worker_processes(service_env: Dict[str, str], redis_url: str,
                                                                   postgres_dsn: str, tmp_path: Any) -> None:
    backends = [b for b in scale_backends() if b != "memory"]
    lines = run_script("scale.py", ["--backends", ",".join(backends), "--workers", "1,2", "--workers-fan", "4",
                                    "--workers-batch", "5", "--sleep-ms", "1", "--timeout", "60"], service_env, tmp_path)
    assert "check_failed" not in [line["kind"] for line in lines], lines
    measured = {(l["backend"], l["shape"], l["workers"]): l for l in lines if l["kind"] == "workers"}
    assert set(measured) == {(b, s, w) for b in backends for s in ("fan", "batch_after") for w in (1, 2)}, sorted(measured)
    for line in measured.values():
        assert line["node_executions"] == (6 if line["shape"] == "fan" else 8), line
        assert positive_rate(line["nodes_per_s"]), line
        assert isinstance(line["conflicts"], int) and line["conflicts"] >= 0, line
        assert line["clean_shutdown"] and line["processed"] >= line["node_executions"] and not line["worker_errors"], line
    assert_scale_cleaned_up(next(l for l in lines if l["kind"] == "setup")["tag"], redis_url, postgres_dsn)


def test_scale_benchmark_rejects_bad_sizes(tmp_path: Any) -> None:
    done = subprocess.run([sys.executable, os.path.join(BENCH, "scale.py"), "--fan", "100,10"], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--fan" in done.stderr, done.stderr


REALISTIC_TINY = ["--fan", "6", "--fan-ms", "5", "--threads", "3", "--procs", "2", "--runs", "3", "--chain", "3",
                  "--chain-ms", "2", "--chain-threads", "2", "--repeat", "1", "--timeout", "60", "--no-peer"]


@pytest.mark.slow  # about 10 s: worker processes to start and stop, per shape and backend
def test_realistic_benchmark_prints_checked_figures(service_env: Dict[str, str], tmp_path: Any) -> None:
    lines = run_script("realistic.py", ["--backends", "redis,rabbitmq", *REALISTIC_TINY], service_env, tmp_path)
    ours = {(line["backend"], line["shape"]): line for line in lines if line["kind"] == "ours"}
    assert set(ours) == {(b, s) for b in ("redis", "rabbitmq") for s in ("fan_threads", "fan_procs", "chains")}, ours
    for (_backend, shape), line in ours.items():
        assert positive_rate(line["wall_s"]) and line["conflicts"] >= 0, line
        assert "met" not in line  # tiny sizes: no verdict on the targets
        if shape == "chains":
            assert line["node_executions"] == 9 and positive_rate(line["nodes_per_s"]), line
        if shape == "fan_procs":
            assert len(line["shares"]) == 2 and abs(sum(line["shares"]) - 1) < 0.01, line
    (summary,) = [line for line in lines if line["kind"] == "summary"]
    assert summary["ok"] is True and len(summary["rows"]) == 6, summary


@pytest.mark.slow  # about 15 s: a victim and a survivor worker per kill, a private Redis stopped for 1 s
def test_kill_recovery_benchmark_prints_recovery_times(service_env: Dict[str, str], tmp_path: Any) -> None:
    lines = run_script("kill_recovery.py", ["--kills", "1", "--runs", "3", "--threads", "3", "--node-ms", "50",
                                            "--outage-s", "1", "--outage-runs", "60"], service_env, tmp_path)
    recovery = {line["backend"]: line for line in lines if line["kind"] == "recovery"}
    assert set(recovery) == {"redis", "rabbitmq"}, lines
    for line in recovery.values():
        assert line["jobs"] == 3 and 0 < line["all_jobs_s"]["max"] <= line["bar_s"], line
        assert line["met"] is True, line
    (outage,) = [line for line in lines if line["kind"] == "outage"]
    assert 0 <= outage["progress_after_up_s"] <= outage["bar_s"] and outage["met"] is True, outage
    (summary,) = [line for line in lines if line["kind"] == "summary"]
    assert summary["ok"] is True


def test_operations_benchmark_tiny(tmp_path: Any) -> None:
    """benchmarks/operations.py with a few runs: a list figure per backend, a command figure for
    the two with services, everything it stored removed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "adapters")]))
    lines = run_script("operations.py", ["--runs", "30", "--repeat", "2"], env, tmp_path)
    assert [line["kind"] for line in lines][0] == "start" and lines[-1]["kind"] == "end"
    listed = {line["backend"]: line for line in lines if line["kind"] == "list"}
    assert set(listed) == {"memory", "redis", "postgres"}
    for line in listed.values():
        assert line["all"]["listed"] == 30 and line["failed"]["listed"] == 3, line
        assert positive_rate(line["all"]["median_ms"]) and positive_rate(line["failed"]["median_ms"]), line
    commands = {line["backend"]: line for line in lines if line["kind"] == "command"}
    assert set(commands) == {"redis", "rabbitmq"} and all(positive_rate(c["seconds"]) for c in commands.values())


def test_dashboard_benchmark_tiny(redis_url: str, tmp_path: Any) -> None:
    """benchmarks/dashboard.py with a few runs: every page figure of both backends, everything it
    stored in Redis removed."""
    import redis

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "adapters")]), REDIS_URL=redis_url)
    lines = run_script("dashboard.py", ["--runs", "30", "--repeat", "2"], env, tmp_path)
    assert lines[0]["kind"] == "start" and lines[-1]["kind"] == "end"
    pages = [line for line in lines if line["kind"] == "page"]
    assert {(p["backend"], p["page"]) for p in pages} == {
        (b, p) for b in ("memory", "redis") for p in ("run list", "run list, failed", "api run list", "overview",
                                                      "run page, chain1000", "api run, chain1000",
                                                      "run page, fan1000", "api run, fan1000")}
    assert all(positive_rate(p["median_ms"]) and p["bytes"] > 0 for p in pages)
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match=lines[0]["redis_prefix"] + "*")) == []
    finally:
        client.close()


def test_controls_benchmark_prints_the_cost_of_a_concurrency_key(redis_url: str, tmp_path: Any) -> None:
    lines = run_script("controls.py", ["--rounds", "1", "--runs", "2", "--chain", "3"], dict(os.environ, REDIS_URL=redis_url),
                       tmp_path)
    measured = {line["mode"]: line for line in lines if line["kind"] == "controls"}
    assert set(measured) == {"plain", "keyed"}
    for line in measured.values():
        assert line["node_executions"] == 6 and line["wrong"] == [], line
        assert positive_rate(line["nodes_per_s"]) and positive_rate(line["round_trips_per_node"]), line
    (summary,) = [line for line in lines if line["kind"] == "summary"]
    assert summary["ok"] is True and isinstance(summary["extra_round_trips_per_node"], float), summary
    tag = next(line for line in lines if line["kind"] == "setup")["tag"]
    assert redis_keys(redis_url, f"fcbench:{tag}:*") == []
