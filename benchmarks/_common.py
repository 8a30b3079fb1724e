"""Shared harness of the distributed benchmarks (redis.py, rabbitmq.py).

* The workflows, the same as the peers' (../shared/peers/ts/bullmq.mjs): a CHAIN-node chain
  (n0 = value + 1, then input + 1: the last output must be CHAIN) and a 1 -> FAN -> 1
  fan-out/fan-in (p_i = 0 + i; the join must see FAN outputs summing to FAN*(FAN-1)/2).
* Worker processes: ``python -m benchmarks._common worker CONF_JSON`` builds the runtime and the
  adapter (with the worker options from the command line, passed as keyword arguments to the
  adapter's constructor) and calls ``adapter.work()`` until SIGTERM. For the RQ backend the worker
  is a stock ``rq worker`` that loads ``FLOWCRAFT_APP=benchmarks._common:rq_app``.
* The client side: runs started with ``adapter.start_workflow`` from the benchmark process, their
  end detected as the TS peer does: all pending runs polled in one read of the seed-protocol status
  (Redis: one MGET of ``workflow:status:<runId>``; PostgreSQL: one SELECT of the status table)
  every ``--poll-ms``, stretched up to 20 ms for runs that take long; every run's result checked in
  each measured batch.
* CPU accounting per measurement (the machine is a shared 2-core VM): host busy cores from
  /proc/stat, this process, the worker processes, the services (by process name) and the rest.
* The peers, copied from ../shared/peers (or ``BENCH_PEERS_DIR``) to benchmarks/.peers/ (git-ignored)
  and installed there on first use (a venv from the Python peer's requirements.txt; ``npm install``).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, ".peers")
# The peers' sources: ../shared/peers beside the checkout, or BENCH_PEERS_DIR (a worktree elsewhere)
SHARED_PEERS = os.environ.get("BENCH_PEERS_DIR") or os.path.join(ROOT, "..", "shared", "peers")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_POSTGRES_URL = "postgresql://root@127.0.0.1:5432/test"

# The peers' fixed shapes: a ratio is printed only when ours were measured with the same ones.
PEER_SHAPE = {"chain": 20, "runs": 20, "fan": 100, "fan_runs": 5}
FINAL = ("completed", "failed", "cancelled", "stalled")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class CheckFailed(Exception):
    """A run did not complete with the right final value: the figure is not valid."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def new_tag() -> str:
    """A short random tag naming this run's keys, queues and tables."""
    return uuid.uuid4().hex[:8]


# =================================================================================================
# workflows
# =================================================================================================


def chain_id(n: int) -> str:
    return f"bench-chain-{n}"


def fan_id(n: int) -> str:
    return f"bench-fan-{n}"


def build_flows(chain: int, fan: int) -> List[Any]:
    """The chain and fan-out/fan-in flows (node functions as in benchmarks/inmemory.py).

    BENCH_INJECT_FAULT=1 (as in the Python peers) makes the chain's first node wrong, to see the
    checks fire."""
    from flowcraft import create_flow

    step = 2 if os.environ.get("BENCH_INJECT_FAULT") == "1" else 1
    chain_flow = create_flow(chain_id(chain))
    chain_flow.node("n0", lambda ctx: ctx.context.get("value") + step)
    for i in range(1, chain):
        chain_flow.node(f"n{i}", lambda ctx: ctx.input + 1)
        chain_flow.edge(f"n{i - 1}", f"n{i}")

    fan_flow = create_flow(fan_id(fan))
    fan_flow.node("start", lambda ctx: 0)
    for i in range(fan):
        fan_flow.node(f"p{i}", (lambda k: lambda ctx: ctx.input + k)(i))
        fan_flow.edge("start", f"p{i}")
        fan_flow.edge(f"p{i}", "join")

    def join(ctx: Any) -> Dict[str, int]:  # the join's input maps every predecessor to its output
        values = ctx.input
        return {"count": len(values), "sum": sum(values.values())}

    fan_flow.node("join", join)
    return [chain_flow, fan_flow]


def make_runtime(chain: int, fan: int) -> Any:
    from flowcraft import FlowRuntime

    runtime = FlowRuntime()
    for flow in build_flows(chain, fan):
        runtime.add_blueprint(flow)
    return runtime


def rq_app() -> Any:
    """The runtime for ``rq worker`` (FLOWCRAFT_APP=benchmarks._common:rq_app), its shapes from
    BENCH_CHAIN / BENCH_FAN."""
    return make_runtime(int(os.environ.get("BENCH_CHAIN", "20")), int(os.environ.get("BENCH_FAN", "100")))


def outputs(context: Mapping[str, Any], node_prefix: str) -> int:
    """How many `_outputs.<node_prefix><digits>` keys the context holds."""
    head = "_outputs." + node_prefix
    return sum(1 for k in context if k.startswith(head) and k[len(head):].isdigit())


def check_chain(run_id: str, result: Optional[Mapping[str, Any]], n: int) -> None:
    check(result is not None and result.get("status") == "completed",
          f"chain run {run_id}: status {result and result.get('status')} {result and result.get('errors')}")
    context = result.get("context") or {}
    last = context.get(f"_outputs.n{n - 1}")
    check(last == n, f"chain run {run_id}: final output {last!r} != {n}")
    check(outputs(context, "n") == n, f"chain run {run_id}: {outputs(context, 'n')} _outputs.n* keys != {n}")


def check_fan(run_id: str, result: Optional[Mapping[str, Any]], n: int) -> None:
    check(result is not None and result.get("status") == "completed",
          f"fan run {run_id}: status {result and result.get('status')} {result and result.get('errors')}")
    context = result.get("context") or {}
    expected = {"count": n, "sum": n * (n - 1) // 2}
    join = context.get("_outputs.join")
    check(join == expected, f"fan run {run_id}: join saw {join!r}, expected {expected}")
    check(outputs(context, "p") == n, f"fan run {run_id}: {outputs(context, 'p')} _outputs.p* keys != {n}")


# =================================================================================================
# adapters and worker processes
# =================================================================================================


def parse_options(pairs: Sequence[str]) -> Dict[str, Any]:
    """`KEY=VALUE` pairs (VALUE parsed as JSON when it is JSON, else a string) -> keyword options."""
    options: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--opt wants KEY=VALUE with KEY an identifier, not {pair!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def rq_available() -> Tuple[bool, str]:
    try:
        from flowcraft_redis import RqAdapter  # noqa: F401
    except ImportError as exc:
        return False, f"flowcraft_redis.RqAdapter is not available ({exc})"
    return True, ""


def build_adapter(conf: Mapping[str, Any], runtime: Any, worker: bool) -> Any:
    """The adapter of `conf["backend"]`; a worker's gets `conf["worker_options"]` as keyword arguments
    (and so does an RqAdapter client: its settings travel with each job to the `rq worker`)."""
    options = dict(conf.get("worker_options") or {}) if worker or conf["backend"] == "rq" else {}
    backend = conf["backend"]
    if backend == "redis":
        from flowcraft_redis import RedisAdapter

        return RedisAdapter(runtime, conf["redis_url"], queue_name=conf["queue"], prefix=conf["prefix"], **options)
    if backend == "rq":
        from flowcraft_redis import RqAdapter

        return RqAdapter(runtime, conf["redis_url"], queue_name=conf["queue"], prefix=conf["prefix"], **options)
    if backend == "rabbitmq":
        import redis
        from flowcraft_rabbitmq import RabbitMqAdapter, RedisCoordinationStore

        coordination = RedisCoordinationStore(redis.Redis.from_url(conf["redis_url"]), prefix=conf["prefix"])
        return RabbitMqAdapter(runtime, coordination, conf["amqp_url"], conf["postgres_dsn"],
                               context_table_name=conf["context_table"], status_table_name=conf["status_table"],
                               queue_name=conf["queue"], **options)
    raise ValueError(f"unknown backend {backend!r}")


def close_adapter(adapter: Any) -> None:
    """Close the adapter, then the Redis client of its coordination store (the adapters leave it open)."""
    close = getattr(adapter, "close", None) or getattr(adapter, "stop", None)
    if close is not None:
        close()
    client = getattr(getattr(adapter, "coordination", None), "client", None)
    if client is not None:
        client.close()


def worker_main(conf_json: str) -> int:
    """A worker process: work until SIGTERM/SIGINT, then print how many jobs it processed."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conf = json.loads(conf_json)
    adapter = build_adapter(conf, make_runtime(conf["chain"], conf["fan"]), worker=True)
    stop = lambda *_: adapter.stop()  # noqa: E731 - finishes the job in hand, then work() returns
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    processed = 0
    profile_to = os.environ.get("BENCH_PROFILE")  # a path prefix: cProfile the worker, dump to PREFIX.<pid>
    profiler = None
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        processed = adapter.work()
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(f"{profile_to}.{os.getpid()}")
        close_adapter(adapter)
        print(json.dumps({"pid": os.getpid(), "processed": processed}), flush=True)
    return 0


class Workers:
    """Worker processes of one backend, with their output in temporary files."""

    def __init__(self, conf: Mapping[str, Any], count: int) -> None:
        self.conf = dict(conf)
        self.procs: List[subprocess.Popen] = []
        self.logs: List[Tuple[Any, Any]] = []
        for i in range(count):
            self._spawn(i)

    def _command(self, i: int) -> Tuple[List[str], Dict[str, str]]:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if self.conf["backend"] != "rq":
            return [sys.executable, "-m", "benchmarks._common", "worker", json.dumps(self.conf)], env
        env.update(FLOWCRAFT_APP="benchmarks._common:rq_app", BENCH_CHAIN=str(self.conf["chain"]),
                   BENCH_FAN=str(self.conf["fan"]))
        rq = os.path.join(os.path.dirname(sys.executable), "rq")
        argv = [rq, "worker", "--url", self.conf["redis_url"], "--serializer", "rq.serializers.JSONSerializer",
                "--worker-class", self.conf.get("rq_worker_class") or "flowcraft_redis.rq_worker.FlowcraftWorker", "--with-scheduler",
                "--logging_level", "WARNING", "--name", f"fcbench-{self.conf['tag']}-{i}", self.conf["queue"]]
        return argv, env

    def _spawn(self, i: int) -> None:
        argv, env = self._command(i)
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.logs.append((out, err))
        # own session: a kill of the group also reaches an rq work-horse
        self.procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True))

    def _rq_counts(self) -> Dict[str, int]:
        """The `rq worker`s' own job counters (read before they stop and unregister)."""
        import redis

        client = redis.Redis.from_url(self.conf["redis_url"])
        counts = {"processed": 0, "rq_failed_jobs": 0}
        try:
            for i in range(len(self.procs)):
                data = client.hgetall(f"rq:worker:fcbench-{self.conf['tag']}-{i}")
                counts["processed"] += int(data.get(b"successful_job_count") or 0)
                counts["rq_failed_jobs"] += int(data.get(b"failed_job_count") or 0)
        finally:
            client.close()
        return counts

    @property
    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def assert_alive(self) -> None:
        for proc, (_, err) in zip(self.procs, self.logs):
            if proc.poll() is not None:
                raise CheckFailed(f"worker {proc.pid} exited with {proc.returncode}: {tail(err)}")

    def stop(self, timeout: float = 15.0) -> Dict[str, Any]:
        """SIGTERM (warm shutdown), SIGKILL of the group if that hangs; returns what they reported."""
        report: Dict[str, Any] = {"processed": 0, "clean_shutdown": True}
        if self.conf["backend"] == "rq":
            report.update(self._rq_counts())
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, (out, err) in zip(self.procs, self.logs):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                report["clean_shutdown"] = False
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            report.setdefault("exit_codes", []).append(proc.returncode)
            report["clean_shutdown"] = report["clean_shutdown"] and proc.returncode == 0
            for line in read_all(out).splitlines():
                if line.startswith('{"pid"'):  # what worker_main prints last
                    report["processed"] += json.loads(line).get("processed", 0)
            errors = [ln for ln in read_all(err).splitlines() if "Traceback" in ln or " ERROR " in ln]
            if errors:
                report.setdefault("worker_errors", []).append(tail(err))
            out.close()
            err.close()
        return report


def read_all(f: Any) -> str:
    f.seek(0)
    return f.read().decode("utf-8", "replace")


def tail(f: Any, chars: int = 1500) -> str:
    return read_all(f)[-chars:]


# =================================================================================================
# the client side: start runs, poll their statuses, check them
# =================================================================================================


FinalStatuses = Callable[[Sequence[str]], Dict[str, Tuple[str, Optional[Dict[str, Any]]]]]


def final_statuses(conf: Mapping[str, Any], adapter: Any) -> FinalStatuses:
    """run ids -> {run id: (status, result)} of those that ended, in one read (as the peers poll)."""
    if conf["backend"] in ("redis", "rq"):
        keys, client = adapter.store.keys, adapter.store.client

        def from_redis(run_ids: Sequence[str]) -> Dict[str, Tuple[str, Optional[Dict[str, Any]]]]:
            found = {}
            for run_id, raw in zip(run_ids, client.mget([keys.status(r) for r in run_ids])):
                if raw is not None:
                    value = json.loads(raw)
                    if value.get("status") in FINAL:
                        found[run_id] = (value["status"], value.get("result"))
            return found

        return from_redis
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(conf["postgres_dsn"])
    conn.autocommit = True
    query = sql.SQL("SELECT run_id, status, result FROM {} WHERE run_id = ANY(%s) AND status = ANY(%s)").format(
        sql.Identifier(conf["status_table"]))

    def from_postgres(run_ids: Sequence[str]) -> Dict[str, Tuple[str, Optional[Dict[str, Any]]]]:
        with conn.cursor() as cur:
            cur.execute(query, (list(run_ids), list(FINAL)))
            return {run_id: (status, result) for run_id, status, result in cur.fetchall()}

    return from_postgres


class Client:
    """Starts runs through an adapter and detects their end by polling `finished` (one read for all
    pending runs)."""

    def __init__(self, adapter: Any, poll_s: float, timeout_s: float, workers: Optional[Workers] = None,
                 finished: Optional[FinalStatuses] = None) -> None:
        self.adapter = adapter
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.workers = workers
        self.finished = finished or self._one_by_one

    def _one_by_one(self, run_ids: Sequence[str]) -> Dict[str, Tuple[str, Optional[Dict[str, Any]]]]:
        found = {}
        for run_id in run_ids:
            status = self.adapter.get_status(run_id)
            if status is not None and status.status in FINAL:
                found[run_id] = (status.status, status.result)
        return found

    def start(self, blueprint_id: str, initial: Mapping[str, Any]) -> Tuple[str, float]:
        t0 = time.perf_counter()
        return self.adapter.start_workflow(blueprint_id, dict(initial)), t0

    def wait(self, started: Dict[str, float]) -> Dict[str, Tuple[float, Optional[Dict[str, Any]]]]:
        """Poll until every run has ended; run id -> (end time, result dict)."""
        pending = dict(started)
        done: Dict[str, Tuple[float, Optional[Dict[str, Any]]]] = {}
        deadline = time.perf_counter() + self.timeout_s
        next_liveness = time.perf_counter() + 1.0
        while pending:
            for run_id, (status, result) in self.finished(list(pending)).items():
                done[run_id] = (time.perf_counter(), result or {"status": status})
                del pending[run_id]
            if not pending:
                break
            now = time.perf_counter()
            if self.workers is not None and now > next_liveness:  # a dead worker fails fast, with its stderr
                self.workers.assert_alive()
                next_liveness = now + 1.0
            if now > deadline:
                raise CheckFailed(f"{len(pending)} run(s) not finished after {self.timeout_s}s, e.g. {next(iter(pending))}")
            # Every poll competes with the workers for the same services: poll less often as runs
            # get older (the error stays <= 2% of a latency).
            oldest = now - min(pending.values())
            time.sleep(max(self.poll_s, min(0.02, 0.02 * oldest)))
        return done

    def batch(self, blueprint_id: str, initial: Mapping[str, Any], runs: int,
              verify: Callable[[str, Optional[Mapping[str, Any]]], None]) -> Dict[str, Any]:
        """Start `runs` runs at once, wait for all, check each: wall time, enqueue time, latencies."""
        started: Dict[str, float] = {}
        first = time.perf_counter()
        for _ in range(runs):
            run_id, t0 = self.start(blueprint_id, initial)
            started[run_id] = t0
        enqueued = time.perf_counter()
        done = self.wait(started)
        for run_id, (_, result) in done.items():
            verify(run_id, result)
        last = max(t for t, _ in done.values())
        return {"wall_s": last - first, "enqueue_ms": (enqueued - first) * 1e3,
                "latencies_ms": [(done[r][0] - t0) * 1e3 for r, t0 in started.items()]}

    def serial(self, blueprint_id: str, initial: Mapping[str, Any], runs: int,
               verify: Callable[[str, Optional[Mapping[str, Any]]], None]) -> Dict[str, Any]:
        """`runs` runs one after another (unloaded latency)."""
        latencies = []
        first = time.perf_counter()
        for _ in range(runs):
            run_id, t0 = self.start(blueprint_id, initial)
            t_done, result = self.wait({run_id: t0})[run_id]
            verify(run_id, result)
            latencies.append((t_done - t0) * 1e3)
        return {"wall_s": time.perf_counter() - first, "latencies_ms": latencies}


def stats(values: Sequence[float]) -> Dict[str, float]:
    v = sorted(values)
    if not v:
        return {"n": 0}
    return {"n": len(v), "min": round(v[0], 3), "median": round(statistics.median(v), 3),
            "p90": round(v[min(len(v) - 1, round(0.9 * (len(v) - 1)))], 3), "max": round(v[-1], 3)}


def median(values: Iterable[float]) -> Optional[float]:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


# =================================================================================================
# the command line and one round of our shapes (shared by redis.py and rabbitmq.py)
# =================================================================================================


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=20, help="concurrent chain runs (a_chain)")
    p.add_argument("--chain", type=int, default=20, help="chain length")
    p.add_argument("--serial-runs", type=int, default=10, help="a_serial runs (0: skip the shape)")
    p.add_argument("--fan", type=int, default=100, help="fan-out width")
    p.add_argument("--fan-runs", type=int, default=5, help="concurrent fan-out/fan-in runs (b_fan)")
    p.add_argument("--workers", type=int, default=1, help="worker processes per backend")
    p.add_argument("--fetch-batch", type=int, help="worker option fetch_batch (passed to the adapter)")
    p.add_argument("--prefetch", type=int, help="worker option prefetch (passed to the adapter)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other worker adapter option (VALUE as JSON if it parses); repeatable")
    p.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds (at least one run of each shape)")
    p.add_argument("--seconds", type=float, default=1.0, help="duration of each raw-limit measurement")
    p.add_argument("--poll-ms", type=float, default=2.0,
                   help="client status polling interval, at least (up to 20 ms or 2%% of the oldest pending run's age)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a batch of runs may take")
    p.add_argument("--no-peer", action="store_true", help="ours only")
    p.add_argument("--no-limits", action="store_true", help="skip the raw limits")
    p.add_argument("--json", action="store_true", help="JSON lines only (no progress or table on stderr)")


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if min(args.rounds, args.runs, args.chain, args.fan, args.fan_runs, args.workers) < 1 or args.serial_runs < 0:
        p.error("--rounds, --runs, --chain, --fan, --fan-runs and --workers must be >= 1, --serial-runs >= 0")


def same_shape_as_peers(args: argparse.Namespace) -> bool:
    return all(getattr(args, k) == v for k, v in PEER_SHAPE.items())


def worker_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The worker adapter's keyword options from the command line (only those given)."""
    options = parse_options(args.opt)
    if args.fetch_batch is not None:
        options["fetch_batch"] = args.fetch_batch
    if args.prefetch is not None:
        options["prefetch"] = args.prefetch
    return options


def shape_lines(client: "Client", args: argparse.Namespace, worker_pids: List[int],
                services: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """One round of our shapes: shape -> its measurement (`services`: those the backend uses)."""
    chain, fan = chain_id(args.chain), fan_id(args.fan)
    verify_chain = lambda r, res: check_chain(r, res, args.chain)  # noqa: E731
    verify_fan = lambda r, res: check_fan(r, res, args.fan)  # noqa: E731
    out: Dict[str, Dict[str, Any]] = {}

    cpu = cpu_begin(worker_pids)
    m = client.batch(chain, {"value": 0}, args.runs, verify_chain)
    out["a_chain"] = rate_line(args.runs * args.chain, m, cpu_end(cpu, services))

    if args.serial_runs:
        cpu = cpu_begin(worker_pids)
        m = client.serial(chain, {"value": 0}, args.serial_runs, verify_chain)
        line = rate_line(args.serial_runs * args.chain, m, cpu_end(cpu, services))
        line["ms_per_run"] = line["run_latency_ms"]["median"]
        out["a_serial"] = line

    cpu = cpu_begin(worker_pids)
    m = client.batch(fan, {}, args.fan_runs, verify_fan)
    out["b_fan"] = rate_line(args.fan_runs * (args.fan + 2), m, cpu_end(cpu, services))
    return out


def rate_line(nodes: int, m: Mapping[str, Any], cpu: Mapping[str, float]) -> Dict[str, Any]:
    line = {"node_executions": nodes, "wall_s": round(m["wall_s"], 4), "nodes_per_s": round(nodes / m["wall_s"], 1),
            "run_latency_ms": stats(m["latencies_ms"])}
    if "enqueue_ms" in m:
        line["enqueue_ms"] = round(m["enqueue_ms"], 2)
    line["host_cpu"] = dict(cpu)
    return line


def warm_up(client: "Client", args: argparse.Namespace) -> int:
    """Chain batches and fan runs until `--warmup` seconds have passed (at least one of each); the
    first also waits for the workers to come up."""
    nodes = 0
    end = time.perf_counter() + args.warmup
    while True:
        client.batch(chain_id(args.chain), {"value": 0}, args.runs, lambda r, res: check_chain(r, res, args.chain))
        client.batch(fan_id(args.fan), {}, 1, lambda r, res: check_fan(r, res, args.fan))
        nodes += args.runs * args.chain + args.fan + 2
        if time.perf_counter() >= end:
            return nodes


class Backend:
    """One backend under test: its worker processes and the client adapter in this process."""

    def __init__(self, conf: Dict[str, Any], args: argparse.Namespace, cleanup: Callable[[Mapping[str, Any]], None]) -> None:
        self.conf = conf
        self.cleanup = cleanup
        self.workers = Workers(conf, args.workers)
        try:
            self.adapter = build_adapter(conf, make_runtime(args.chain, args.fan), worker=False)
        except BaseException:
            self.workers.stop()
            cleanup(conf)
            raise
        self.client = Client(self.adapter, args.poll_ms / 1000, args.timeout, self.workers,
                             final_statuses(conf, self.adapter))

    def close(self) -> Dict[str, Any]:
        """Stop the workers, close the client, remove this backend's keys, queues and tables."""
        report = self.workers.stop()
        try:
            close_adapter(self.adapter)
        finally:
            self.cleanup(self.conf)
        return report


def measure_ours(under_test: Mapping[str, Backend], args: argparse.Namespace, out: "Output", round_: int) -> None:
    for name, backend in under_test.items():
        backend.workers.assert_alive()
        services = BACKEND_SERVICES[backend.conf["backend"]]
        for shape, line in shape_lines(backend.client, args, backend.workers.pids, services).items():
            out.emit("ours", backend=name, shape=shape, round=round_, workers=args.workers,
                     worker_options=backend.conf["worker_options"], **line)
            out.note(f"round {round_} {name:<8} {shape:<8} {line['nodes_per_s']:>9,.0f} nodes/s  median run "
                     f"{line['run_latency_ms']['median']:,.1f} ms  other_cores {line['host_cpu']['other_cores']}")


def value_at(line: Mapping[str, Any], dotted: str) -> Optional[float]:
    """`line["a"]["b"]` for "a.b" (None when missing)."""
    value: Any = line
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


# =================================================================================================
# CPU accounting
# =================================================================================================

SERVICE_PROCESSES = {"redis": ("redis-server",), "postgres": ("postgres",), "rabbitmq": ("beam.smp", "erl_child_setup")}
# the services each backend uses (their CPU is part of the measurement, not of the noise)
BACKEND_SERVICES = {"redis": ("redis",), "rq": ("redis",), "rabbitmq": ("redis", "postgres", "rabbitmq")}


def _proc_jiffies(pid: int, children: bool = True) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    # after the comm field: utime is field 14 of stat, i.e. index 11 here; cutime/cstime follow stime
    total = int(fields[11]) + int(fields[12])
    return total + (int(fields[13]) + int(fields[14]) if children else 0)


def _service_jiffies() -> Dict[str, int]:
    totals = {name: 0 for name in SERVICE_PROCESSES}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        for name, comms in SERVICE_PROCESSES.items():
            if comm in comms:
                totals[name] += _proc_jiffies(int(entry), children=False)
    return totals


def _host_busy_jiffies() -> int:
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:9]]
    return sum(values) - values[3] - values[4]  # minus idle and iowait


def cpu_begin(worker_pids: Sequence[int]) -> Dict[str, Any]:
    return {"t": time.perf_counter(), "host": _host_busy_jiffies(), "self": _proc_jiffies(os.getpid()),
            "workers": {p: _proc_jiffies(p) for p in worker_pids}, "services": _service_jiffies()}


def cpu_end(begin: Mapping[str, Any], used: Sequence[str]) -> Dict[str, float]:
    """Cores used since `begin`: host, this process, the workers, each service, and everything else
    (`other_cores`: the host minus this process, the workers and the services in `used`)."""
    wall = time.perf_counter() - begin["t"]
    cores = lambda jiffies: jiffies / CLK_TCK / wall  # noqa: E731
    out = {"busy_cores": cores(_host_busy_jiffies() - begin["host"]),
           "self_cores": cores(_proc_jiffies(os.getpid()) - begin["self"]),
           "worker_cores": cores(sum(_proc_jiffies(p) - j for p, j in begin["workers"].items()))}
    services = _service_jiffies()
    for name, before in begin["services"].items():
        out[f"{name}_cores"] = cores(max(0, services[name] - before))
    ours = out["self_cores"] + out["worker_cores"] + sum(out[f"{name}_cores"] for name in used)
    out["other_cores"] = max(0.0, out["busy_cores"] - ours)
    return {k: round(v, 2) for k, v in out.items()}


# =================================================================================================
# output
# =================================================================================================


class Output:
    """JSON lines on stdout; progress and the final table on stderr unless `json_only`."""

    def __init__(self, bench: str, json_only: bool) -> None:
        self.bench = bench
        self.json_only = json_only
        self.lines: List[Dict[str, Any]] = []

    def emit(self, kind: str, **fields: Any) -> Dict[str, Any]:
        line = {"bench": self.bench, "kind": kind, **fields, "loadavg_1m": round(os.getloadavg()[0], 2)}
        self.lines.append(line)
        print(json.dumps(line), flush=True)
        return line

    def note(self, text: str) -> None:
        if not self.json_only:
            print(text, file=sys.stderr, flush=True)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value < 100:
        return f"{value:,.1f}"
    return f"{value:,.0f}"


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of {shape, metric, ours, peer, peer_value, ratio} as an aligned text table."""
    head = ("shape", "metric", "ours (median)", "peer", "peer (median)", "ours vs peer", "other cores")
    body = [(r["shape"], r["metric"], fmt(r.get("ours")), r.get("peer") or "-", fmt(r.get("peer_value")),
             f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-", noise(r.get("other_cores")))
            for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i < 2 or i == 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("ours vs peer: > 1 means ours is faster (rates: ours/peer; latencies: peer/ours); "
                 "'-' when the peer was not run or the shapes differ from the peers' (20x20 chain, 5 x 1->100->1).")
    lines.append("other cores: median CPU cores used by the rest of the machine (not this benchmark, its workers "
                 "or the services) while ours / the peer ran; above ~0.3 the figure is disturbed.")
    return "\n".join(lines)


def noise(pair: Optional[Sequence[Optional[float]]]) -> str:
    if not pair or pair[0] is None:
        return "-"
    return f"{pair[0]:.2f}" + (f" / {pair[1]:.2f}" if len(pair) > 1 and pair[1] is not None else "")


def ratio(ours: Optional[float], theirs: Optional[float], higher_is_better: bool = True) -> Optional[float]:
    """ours/peer for rates; peer/ours for latencies (so > 1 always means we are faster)."""
    if not ours or not theirs:
        return None
    return round(ours / theirs if higher_is_better else theirs / ours, 2)


# =================================================================================================
# peers
# =================================================================================================


def _sync_copy(src: str, dst: str) -> None:
    """Copy the peer's files (not its installed dependencies) into `dst` when missing or changed."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        path = os.path.join(src, name)
        target = os.path.join(dst, name)
        if os.path.isfile(path) and not (os.path.exists(target) and filecmp.cmp(path, target, shallow=False)):
            shutil.copy(path, target)
            os.chmod(target, 0o644)


def ensure_ts_peer() -> Tuple[Optional[str], str]:
    """benchmarks/.peers/ts with node_modules (npm install on first use), or (None, why not)."""
    src, dst = os.path.join(SHARED_PEERS, "ts"), os.path.join(PEERS, "ts")
    if not shutil.which("node") or not shutil.which("npm"):
        return None, "node and npm are needed for the TS peer"
    if os.path.isdir(src):
        _sync_copy(src, dst)
    elif not os.path.isfile(os.path.join(dst, "bullmq.mjs")):
        return None, f"no TS peer at {src}"
    if not os.path.isdir(os.path.join(dst, "node_modules")):
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=dst, capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"npm install of the TS peer failed: {done.stderr[-500:]}"
    return dst, ""


def ensure_py_peer() -> Tuple[Optional[str], str]:
    """benchmarks/.peers/py with its own .venv from its requirements.txt (pinned Celery, RQ, clients)."""
    src, dst = os.path.join(SHARED_PEERS, "py"), os.path.join(PEERS, "py")
    if os.path.isdir(src):
        _sync_copy(src, dst)
    elif not os.path.isfile(os.path.join(dst, "rq_bench.py")):
        return None, f"no Python peer at {src}"
    python = os.path.join(dst, ".venv", "bin", "python")
    if not os.path.exists(python):
        made = subprocess.run([sys.executable, "-m", "venv", os.path.join(dst, ".venv")], capture_output=True, text=True)
        if made.returncode != 0:
            return None, f"creating the peer venv failed: {made.stderr[-500:]}"
    ready = subprocess.run([python, "-c", "import celery, rq, redis, pika, psycopg2"], capture_output=True)
    if ready.returncode != 0:
        done = subprocess.run([python, "-m", "pip", "install", "-q", "-r", "requirements.txt"], cwd=dst,
                              capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"pip install of the Python peer's requirements failed: {done.stderr[-500:]}"
    return dst, ""


def last_json_line(text: str) -> Optional[Dict[str, Any]]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def run_ts_bullmq(peer_dir: str, warmup_s: float, serial_runs: int, timeout_s: float = 600) -> Dict[str, Any]:
    """One `node bullmq.mjs` process, one round of its shapes (a_chain, a_chain_serial, b_fan)."""
    env = dict(os.environ, ROUNDS="1", WARMUP_SECONDS=str(warmup_s), SERIAL_RUNS=str(max(1, serial_runs)))
    done = subprocess.run(["node", "bullmq.mjs"], cwd=peer_dir, capture_output=True, text=True, env=env, timeout=timeout_s)
    line = last_json_line(done.stdout)
    if line is None or not line.get("ok"):
        raise RuntimeError(f"TS BullMQ peer failed (exit {done.returncode}): "
                           f"{(line or {}).get('error') or done.stderr[-500:]}")
    return line


def run_py_peer(peer_dir: str, argv: Sequence[str], timeout_s: float = 900) -> Dict[str, Any]:
    """Run one of the Python peer's scripts with its venv; its one JSON line."""
    python = os.path.join(peer_dir, ".venv", "bin", "python")
    done = subprocess.run([python, *argv], cwd=peer_dir, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)
    line = last_json_line(done.stdout)
    if line is None or not line.get("ok"):
        raise RuntimeError(f"peer {' '.join(argv)} failed (exit {done.returncode}): "
                           f"{json.dumps(line)[:500] if line else done.stderr[-500:]}")
    return line


# =================================================================================================
# Redis cleanup
# =================================================================================================


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\^-" else ch for ch in text)


def delete_redis_keys(client: Any, pattern: str) -> int:
    """Delete every key matching a SCAN pattern (never KEYS or FLUSHDB: the Redis is shared)."""
    deleted = 0
    batch: List[Any] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += client.delete(*batch)
            batch.clear()
    if batch:
        deleted += client.delete(*batch)
    return deleted


def delete_redis_prefix(client: Any, prefix: str) -> int:
    return delete_redis_keys(client, _glob_escape(prefix) + "*")


def delete_rq_queue(client: Any, queue: str, worker_prefix: str) -> int:
    """Delete an RQ queue's keys, the jobs (and their results) whose origin is that queue, and the
    records of the workers named `worker_prefix`*."""
    deleted = 0
    for key in client.scan_iter(match="rq:job:*", count=1000):
        name = key.decode() if isinstance(key, bytes) else key
        if name.count(":") != 2:
            continue  # rq:job:<id>:dependents and the like: not a job hash
        if client.hget(key, "origin") in (queue.encode(), queue):
            job_id = name.split(":", 2)[2]
            deleted += client.delete(key, f"rq:results:{job_id}", f"rq:job:{job_id}:dependents",
                                     f"rq:job:{job_id}:dependencies")
    for pattern in (f"rq:*:{_glob_escape(queue)}", f"rq:queue:{_glob_escape(queue)}*", f"rq:*:{_glob_escape(queue)}:*"):
        deleted += delete_redis_keys(client, pattern)
    client.srem("rq:queues", f"rq:queue:{queue}")
    for key in client.scan_iter(match=f"rq:worker:{_glob_escape(worker_prefix)}*", count=1000):
        deleted += client.delete(key)
    return deleted


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit("usage: python -m benchmarks._common worker CONF_JSON")


def run_main(bench: str, args: Any, run: Callable[[Any, "Output"], int]) -> int:
    """A benchmark script's main: its start and end lines (with the load averages) around `run`."""
    load_start = os.getloadavg()
    out = Output(bench, args.json)
    out.emit("start", python=sys.version.split()[0], argv=sys.argv[1:], loadavg_start=load_start)
    try:
        return run(args, out)
    finally:
        out.emit("end", loadavg_start=load_start, loadavg_end=os.getloadavg())
