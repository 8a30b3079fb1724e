"""How soon a SIGKILLed worker's jobs run again on another live worker, without a reconciler
(SPEC section 10: within 2 seconds), on Redis and on RabbitMQ.

Each round: a victim worker process (``--threads`` threads, 10 by default) takes the first node
of ``--runs`` (10) runs of a 2-node chain of nodes sleeping ``--node-ms`` (500; the first node
also waits, while a flag is set, for the victim's kill); once it is executing the first node of
every run, a second worker (same threads) starts, and once that one
is registered (Redis: its CLIENT ID; RabbitMQ: its consumers) the victim gets SIGKILL. Recovery of
a job: from the kill to the moment the survivor starts executing it (node code records each start
with its pid in Redis). No reconciler runs. Then every run must end as in memory (the same
context), and every node must have been committed exactly once (the workers count their commits).

Then an outage: a worker on a private Redis (append-only, so its data survives) in the middle of
``--outage-runs`` runs; Redis stopped for ``--outage-s`` (10) seconds and started again: how soon
after it answers does a node start (the bar: 2 s)?

Prints JSON lines: one per round, and per backend the min/median/max over all recovered jobs and
over each round's slowest, with `met` (every job recovered within ``--bar`` seconds, 2.0).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, os.path.join(ROOT, "adapters")):
    if path not in sys.path:
        sys.path.insert(0, path)

from benchmarks import _common as C  # noqa: E402
from benchmarks import scale as S  # noqa: E402

FLOW = "kill-recovery-chain"


# =================================================================================================
# the flow and the worker processes
# =================================================================================================


def build_flow(node_ms: float, record_key: str) -> Any:
    from flowcraft import create_flow

    def node(add: int) -> Any:
        def run(ctx: Any) -> Any:
            redis = ctx.dependencies["redis"]
            redis.rpush(record_key, json.dumps([ctx.run_id, ctx.node_id, os.getpid(), time.time()]))
            deadline = time.monotonic() + 120
            while redis.exists(record_key + ":hold") and time.monotonic() < deadline:
                time.sleep(0.01)  # held until the victim is killed: it is killed in the middle of its jobs
            time.sleep(node_ms / 1000.0)
            return (ctx.input if ctx.input is not None else ctx.context.get("value")) + add
        return run

    flow = create_flow(FLOW)
    flow.node("n0", node(1))
    flow.node("n1", node(10)).edge("n0", "n1")
    return flow


def make_runtime(conf: Mapping[str, Any]) -> Any:
    import redis

    from flowcraft import FlowRuntime

    runtime = FlowRuntime(dependencies={"redis": redis.Redis.from_url(conf["redis_url"])})
    runtime.add_blueprint(build_flow(conf["node_ms"], conf["record_key"]))
    return runtime


def count_commits(conf: Mapping[str, Any]) -> None:
    """Count, in Redis, each node completion a commit of this process applies (class-level, so the
    stores of every worker thread count)."""
    import redis

    client = redis.Redis.from_url(conf["redis_url"])
    if conf["backend"] == "rabbitmq":
        from flowcraft_rabbitmq.store import PostgresRunStore as Store
    else:
        from flowcraft_redis.store import RedisRunStore as Store  # type: ignore[assignment]

    def note(commits: Sequence[Any], applied: Sequence[bool]) -> None:
        for commit, ok in zip(commits, applied):
            if ok:
                for node_id, state in commit.states.items():
                    if state.get("st") == "done":
                        client.hincrby(conf["commits_key"], f"{commit.run_id}:{node_id}", 1)

    one, many = Store.commit, Store.commit_many

    def commit(self: Any, c: Any) -> bool:
        applied = one(self, c)
        note([c], [applied])
        return applied

    def commit_many(self: Any, commits: Sequence[Any]) -> List[bool]:
        applied = many(self, commits)
        note(commits, applied)
        return applied

    Store.commit, Store.commit_many = commit, commit_many  # type: ignore[method-assign]


def worker_main(conf_json: str) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    conf = json.loads(conf_json)
    count_commits(conf)
    adapter = S.adapter_for(conf, make_runtime(conf), worker=True)
    signal.signal(signal.SIGTERM, lambda *_: adapter.stop())
    print("ready", flush=True)
    try:
        adapter.work()
    finally:
        C.close_adapter(adapter)
    return 0


def spawn(conf: Mapping[str, Any]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "adapters"),
                                                       os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", json.dumps(conf)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=tempfile.TemporaryFile(), start_new_session=True)


# =================================================================================================
# rounds
# =================================================================================================


def records(client: Any, key: str) -> List[List[Any]]:
    return [json.loads(r) for r in client.lrange(key, 0, -1)]


def wait_for(what: str, condition: Any, timeout: float, procs: Sequence[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                proc.stderr.seek(0)  # type: ignore[union-attr]
                raise C.CheckFailed(f"a worker exited ({proc.returncode}) while waiting for {what}: "
                                    f"{proc.stderr.read()[-800:]!r}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            raise C.CheckFailed(f"timed out waiting for {what}")
        time.sleep(0.005)


def registered(conf: Mapping[str, Any], client: Any, count: int) -> Any:
    """A condition: `count` workers are registered (and so will look after each other)."""
    if conf["backend"] == "redis":
        key = f"{conf['prefix']}{conf['queue']}:clients"
        return lambda: client.hlen(key) >= count
    import pika

    def consumers() -> bool:
        connection = pika.BlockingConnection(pika.URLParameters(conf["amqp_url"]))
        try:
            return connection.channel().queue_declare(conf["queue"], passive=True).method.consumer_count >= count
        finally:
            connection.close()

    return consumers


def kill_round(conf: Dict[str, Any], args: argparse.Namespace, client: Any, adapter: Any, out: C.Output,
               index: int) -> Dict[str, Any]:
    key = conf["record_key"]
    client.delete(key)
    client.set(key + ":hold", "1", ex=300)
    victim = spawn(conf)
    survivor: Optional[subprocess.Popen] = None
    try:
        run_ids = [adapter.start_workflow(FLOW, {"value": i}) for i in range(args.runs)]
        held = lambda: {r[0] for r in records(client, key) if r[2] == victim.pid and r[1] == "n0"}  # noqa: E731
        wait_for("the victim to execute a job of every run", lambda: len(held()) >= args.runs, 60, [victim])
        survivor = spawn(conf)
        wait_for("the survivor to register", registered(conf, client, 2 * args.threads if conf["backend"] == "rabbitmq" else 2),
                 30, [victim, survivor])
        killed_at = time.time()
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        client.delete(key + ":hold")
        mine = held()
        survivor_pid = survivor.pid
        try:
            wait_for("the survivor to start every job the victim held",
                     lambda: mine <= {r[0] for r in records(client, key) if r[2] == survivor_pid and r[1] == "n0"},
                     args.bar * 10, [survivor])
        except C.CheckFailed as error:
            raise C.CheckFailed(f"{error}: victim {victim.pid}, survivor {survivor_pid}, held {sorted(mine)}, "
                                f"starts {records(client, key)}") from None
        starts: Dict[str, float] = {}
        for run_id, node_id, pid, at in records(client, key):
            if pid == survivor_pid and node_id == "n0" and run_id in mine:
                starts.setdefault(run_id, at)
        recovery = sorted(at - killed_at for at in starts.values())
        results = {r: adapter.wait_for_result(r, timeout=60) for r in run_ids}
    finally:
        client.delete(key + ":hold")
        for proc in (victim, survivor):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (victim, survivor):
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    check_runs(conf, client, results, args)
    line = out.emit("round", backend=conf["backend"], round=index, jobs_held=len(mine),
                    recovery_s={"min": round(recovery[0], 3), "median": round(statistics.median(recovery), 3),
                                "max": round(recovery[-1], 3)})
    out.note(f"{conf['backend']:<9} kill {index + 1}: {len(mine)} jobs back on the survivor after "
             f"{recovery[0]:.3f}..{recovery[-1]:.3f} s")
    return {"recovery": recovery, "line": line}


def check_runs(conf: Mapping[str, Any], client: Any, results: Mapping[str, Any], args: argparse.Namespace,
               exact: bool = True) -> None:
    """Every run as in memory, every node committed once (`exact`), or at most once as counted
    (a count lost with the Redis that went down right after the commit it counts)."""
    from flowcraft import FlowRuntime

    runtime = FlowRuntime(dependencies={"redis": client})
    flow = build_flow(0.0, conf["record_key"] + ":memory")
    runtime.add_blueprint(flow)
    commits = {k.decode(): int(v) for k, v in client.hgetall(conf["commits_key"]).items()}
    for i, (run_id, result) in enumerate(results.items()):
        expected = flow.run(runtime, {"value": i}).context
        C.check(result.status == "completed", f"run {run_id}: {result.status} {result.errors}")
        C.check(result.context == expected, f"run {run_id}: context {result.context} != in memory {expected}")
        for node_id in ("n0", "n1"):
            n = commits.get(f"{run_id}:{node_id}", 0)
            C.check(n == 1 if exact else n <= 1, f"run {run_id}: node {node_id} committed {n} times")
    client.delete(conf["record_key"] + ":memory")


def measure(backend: str, args: argparse.Namespace, out: C.Output) -> Dict[str, Any]:
    import redis

    tag = C.new_tag()
    conf = S.backend_conf(backend, tag, [], {"threads": args.threads})
    conf.update(node_ms=args.node_ms, record_key=f"fckill:{tag}:starts", commits_key=f"fckill:{tag}:commits")
    S.prepare(conf)
    client = redis.Redis.from_url(conf["redis_url"])
    adapter = S.adapter_for(conf, make_runtime(conf), worker=False)
    recoveries: List[float] = []
    slowest: List[float] = []
    try:
        for index in range(args.kills):
            got = kill_round(conf, args, client, adapter, out, index)
            recoveries += got["recovery"]
            slowest.append(got["recovery"][-1])
    finally:
        C.close_adapter(adapter)
        S.cleanup(conf)
        client.delete(conf["record_key"], conf["commits_key"])
        client.close()

    def summary(values: Sequence[float]) -> Dict[str, float]:
        return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}

    line = out.emit("recovery", backend=backend, kills=args.kills, jobs=len(recoveries), all_jobs_s=summary(recoveries),
                    slowest_per_kill_s=summary(slowest), bar_s=args.bar, met=max(recoveries) <= args.bar)
    out.note(f"{backend:<9} {args.kills} kills, {len(recoveries)} jobs: recovery min {min(recoveries):.3f} s, "
             f"median {statistics.median(recoveries):.3f} s, max {max(recoveries):.3f} s (bar {args.bar:g} s)")
    return line


# =================================================================================================
# a Redis outage
# =================================================================================================


class PrivateRedis:
    """A redis-server of our own (append-only file, fsync always: its data survives a restart)."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="fckill-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> float:
        """Start it; the time it first answered."""
        import redis

        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                client.close()
                return time.time()
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise C.CheckFailed("the private redis-server did not start") from None
                time.sleep(0.005)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # flushes the append-only file
            self.proc.wait(20)
        self.proc = None

    def close(self) -> None:
        self.stop()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def measure_outage(args: argparse.Namespace, out: C.Output) -> Dict[str, Any]:
    """A worker on a private Redis; Redis stopped for `--outage-s` seconds in the middle of a run
    (`--outage-runs` runs); how soon after it answers again does a node start?"""
    import redis

    server = PrivateRedis()
    server.start()
    tag = C.new_tag()
    conf = S.backend_conf("redis", tag, [], {"threads": args.threads})
    conf.update(redis_url=server.url, node_ms=args.outage_node_ms, record_key=f"fckill:{tag}:starts",
                commits_key=f"fckill:{tag}:commits")
    worker: Optional[subprocess.Popen] = None
    try:
        client = redis.Redis.from_url(server.url)
        adapter = S.adapter_for(conf, make_runtime(conf), worker=False)
        worker = spawn(conf)
        run_ids = [adapter.start_workflow(FLOW, {"value": i}) for i in range(args.outage_runs)]
        wait_for("a first node to start", lambda: client.llen(conf["record_key"]) > 0, 30, [worker])
        client.close()
        C.close_adapter(adapter)
        server.stop()
        time.sleep(args.outage_s)
        up_at = server.start()
        client = redis.Redis.from_url(server.url)
        wait_for("a node to start after the outage",
                 lambda: any(r[3] >= up_at for r in records(client, conf["record_key"])), args.outage_s + 30, [worker])
        first = min(r[3] for r in records(client, conf["record_key"]) if r[3] >= up_at)
        adapter = S.adapter_for(conf, make_runtime(conf), worker=False)
        results = {r: adapter.wait_for_result(r, timeout=60) for r in run_ids}
        check_runs(conf, client, results, args, exact=False)
        C.close_adapter(adapter)
        client.close()
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        server.close()
    progress = first - up_at
    line = out.emit("outage", backend="redis", down_s=args.outage_s, progress_after_up_s=round(progress, 3),
                    bar_s=args.bar, met=progress <= args.bar)
    out.note(f"redis     down {args.outage_s:g} s: a node started {progress:.3f} s after Redis answered again "
             f"(bar {args.bar:g} s)")
    return line


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="redis,rabbitmq")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--runs", type=int, default=10, help="runs whose jobs the victim holds at its kill")
    p.add_argument("--threads", type=int, default=10, help="threads of each worker")
    p.add_argument("--node-ms", type=float, default=500.0)
    p.add_argument("--bar", type=float, default=2.0, help="seconds within which every job must run again")
    p.add_argument("--outage-s", type=float, default=10.0, help="seconds a private Redis is down (0: no outage test)")
    p.add_argument("--outage-node-ms", type=float, default=20.0)
    p.add_argument("--outage-runs", type=int, default=200, help="runs in flight across the outage")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.backend_list = [b for b in args.backends.split(",") if b]
    if args.threads < args.runs:
        p.error("--threads must be at least --runs (the victim holds one job of each run)")
    return args


def run(args: argparse.Namespace, out: C.Output) -> int:
    ok = True
    for backend in args.backend_list:
        try:
            ok = measure(backend, args, out)["met"] and ok
        except C.CheckFailed as error:
            out.emit("check_failed", backend=backend, error=str(error))
            ok = False
    if args.outage_s > 0:
        try:
            ok = measure_outage(args, out)["met"] and ok
        except C.CheckFailed as error:
            out.emit("check_failed", backend="redis-outage", error=str(error))
            ok = False
    out.emit("summary", ok=ok)
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "worker":
        return worker_main(sys.argv[2])
    return C.run_main("kill_recovery", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
