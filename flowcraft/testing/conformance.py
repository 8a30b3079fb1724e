"""The adapter conformance kit: the scenarios and the fault matrix every implementation of the
distributed ports must pass.

A backend proves itself the way the in-memory fakes, Redis, RQ and RabbitMQ + PostgreSQL do: it
subclasses `BackendFactory` (how to build an adapter on a runtime, publish a raw message, read the
dead letters, and, for process backends, start a worker process), and runs every check of
`ConformanceSuite` in its tests::

    from flowcraft.testing.conformance import BackendFactory, ConformanceSuite, check_names

    class NatsFactory(BackendFactory):
        name = "nats"
        kills = 3                                  # SIGKILL a worker process three times mid-run
        def make_adapter(self, runtime): ...       # a NatsAdapter on this test's own subjects/buckets
        def publish_raw(self, adapter, body): ...
        def dead_letters(self, adapter): ...
        def spawn_worker(self, name, ledger_path, nap):  # `worker_runtime()` in a process of its own
            return WorkerProcess(["nats-worker", ...], name, env=self.worker_env(name, ledger_path, nap))

    @pytest.mark.parametrize("check", check_names(kills=True))
    def test_nats_conforms(check, nats_factory):
        ConformanceSuite(nats_factory).run(check)

The checks drive the adapter only through its public API (`start_workflow`, `work(burst=True)`,
`wait_for_result`, `get_status`, `resume_with_action`, `cancel`, `reconcile`). Each scenario runs
the same blueprint in memory (`FlowRuntime.run`, the reference) and on the backend, and asserts the
same status, context, skipped nodes and errors. Node code records its `ctx.idempotency_key` in a
`Ledger` (a side effect, as a payment call would make): the backend's side effects must be the
in-memory run's, key for key, and each node execution must keep one key however often it runs.
Where the backend can count commits (`BackendFactory.commit_counts`), each node execution must be
committed exactly once.

The fault matrix: for backends with in-process crash injection (`BackendFactory.crash_points`: the
fakes' `CRASH_POINTS`), every scenario under crashes at each point and at all of them; for process
backends (`BackendFactory.kills`), worker processes SIGKILLed mid-run: nothing is lost, every node
execution is done, and the context is the in-memory one.

This module imports no adapter: a backend's factory lives in its tests.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import attrs

from ..flow import Flow, create_flow
from ..node import NodeContext
from ..ports import Job
from ..result import AWAITING, FINAL_STATUSES, WorkflowResult
from ..runtime import FlowRuntime

__all__ = [
    "BackendFactory", "Check", "ConformanceSuite", "FileLedger", "Ledger", "MemoryLedger", "SCENARIOS", "Scenario",
    "WorkerProcess", "check_names", "conformance_flows", "conformance_runtime", "normalised_effects", "run_in_memory",
    "worker_runtime",
]

LEDGER = "conformance.ledger"  # the runtime dependency node code records its side effects in
NAP = "conformance.nap"  # seconds each node of the endurance flow sleeps (worker processes only)
LEDGER_ENV = "FLOWCRAFT_CONFORMANCE_LEDGER"  # a worker process's ledger file
WORKER_ENV = "FLOWCRAFT_CONFORMANCE_WORKER"  # a worker process's name, written with each side effect
NAP_ENV = "FLOWCRAFT_CONFORMANCE_NAP"

FAN_WIDTH = 8
BATCH_SIZE = 12
LOOP_LAPS = 4
ENDURANCE_BRANCHES = 4
ENDURANCE_LENGTH = 10
TIMEOUT = 60.0


# =================================================================================================
# side effects
# =================================================================================================


class Ledger:
    """Where node code records its side effects: one `record(key)` per execution of node code."""

    def record(self, key: str) -> None:
        raise NotImplementedError

    def entries(self) -> List[Tuple[str, str]]:
        """(worker name, key) of every recorded side effect, in order."""
        raise NotImplementedError

    def counts(self) -> Counter:
        """key -> how many times node code ran with it."""
        return Counter(key for _, key in self.entries())


class MemoryLedger(Ledger):
    """A ledger in this process (node code run by `work()` in the test's own process)."""

    def __init__(self) -> None:
        self._entries: List[Tuple[str, str]] = []
        self._lock = threading.Lock()

    def record(self, key: str) -> None:
        with self._lock:
            self._entries.append(("", key))

    def entries(self) -> List[Tuple[str, str]]:
        with self._lock:
            return list(self._entries)


class FileLedger(Ledger):
    """A ledger file shared by worker processes: each record is one `O_APPEND` write of one line
    (`<worker> <key>`), so records of processes killed at any moment never interleave."""

    def __init__(self, path: str, worker: str = "") -> None:
        self.path = path
        self.worker = worker

    def record(self, key: str) -> None:
        line = json.dumps([self.worker, key]).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def entries(self) -> List[Tuple[str, str]]:
        try:
            with open(self.path, "rb") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            return []
        return [(str(w), str(k)) for w, k in (json.loads(line) for line in lines if line.strip())]


def _effect(ctx: NodeContext) -> None:
    ledger = ctx.dependencies.get(LEDGER)
    if ledger is not None:
        ledger.record(f"{ctx.blueprint_id}|{ctx.idempotency_key}")
    nap = float(ctx.dependencies.get(NAP, 0.0) or 0.0)
    if nap > 0:
        time.sleep(nap)


def _effectful(fn: Callable[[NodeContext], Any]) -> Callable[[NodeContext], Any]:
    def run(ctx: NodeContext) -> Any:
        _effect(ctx)
        return fn(ctx)

    return run


def normalised_effects(counts: Mapping[str, int]) -> Counter:
    """Side-effect counts with the run ids left out (`blueprint|node:iteration`), to compare runs.

    A batch item's key is `run:<scatter>.<index>:<iteration>` in memory and carries the item index
    once more (`...:<index>`) when distributed; both are stable, so the suffix is left out too."""
    out: Counter = Counter()
    for key, n in counts.items():
        blueprint, _, idempotency = key.partition("|")
        out[blueprint + "|" + ":".join(idempotency.split(":")[1:3])] += n
    return out


# =================================================================================================
# the blueprints
# =================================================================================================


def _chain() -> Flow:
    return (
        create_flow("cf-chain")
        .node("a", _effectful(lambda ctx: {"n": ctx.input}), inputs="start")
        .node("b", _effectful(lambda ctx: ctx.input["n"] * 2))
        .node("c", _effectful(lambda ctx: ctx.context.set("seen", ctx.input) or f"value={ctx.input}"))
        .node("d", _effectful(lambda ctx: [ctx.input, ctx.context.get("seen")]))
        .edge("a", "b").edge("b", "c").edge("c", "d")
    )


def _fan_worker(i: int) -> Callable[[NodeContext], Any]:
    return _effectful(lambda ctx: ctx.input * 10 + i)


def _fan() -> Flow:
    flow = create_flow("cf-fan").node("src", _effectful(lambda ctx: 5))
    for i in range(FAN_WIDTH):
        flow.node(f"w{i}", _fan_worker(i)).edge("src", f"w{i}").edge(f"w{i}", "sink")
    return flow.node("sink", _effectful(lambda ctx: {"order": list(ctx.input), "total": sum(ctx.input.values())}))


def _diamond() -> Flow:
    return (
        create_flow("cf-diamond")
        .node("decide", _effectful(lambda ctx: ctx.input), inputs="n")
        .node("even", _effectful(lambda ctx: "EVEN"))
        .node("odd", _effectful(lambda ctx: "ODD"))
        .node("big", _effectful(lambda ctx: "BIG"))
        .node("merge", _effectful(lambda ctx: {"got": ctx.input}))
        .edge("decide", "even", condition="result.output % 2 == 0")
        .edge("decide", "odd", condition="result.output % 2 != 0")
        .edge("decide", "big", condition="result.output > 100")
        .edge("even", "merge").edge("odd", "merge")
    )


def _batch() -> Flow:
    return (
        create_flow("cf-batch")
        .node("make", _effectful(lambda ctx: list(range(BATCH_SIZE))))
        .batch("square", _effectful(lambda ctx: {"i": ctx.input, "sq": ctx.input * ctx.input}), input_key="make",
               output_key="squares")
        .node("total", _effectful(lambda ctx: sum(item["sq"] for item in ctx.input)))
        .edge("make", "square").edge("square", "total")
    )


def _lap(ctx: NodeContext) -> Any:
    count = ctx.context.get("count", 0) + 1
    ctx.context.set("count", count)
    ctx.context.set(f"lap{count}", ctx.input)
    return count


def _loop() -> Flow:
    return (
        create_flow("cf-loop")
        .node("init", _effectful(lambda ctx: ctx.context.set("count", 0) or 0))
        .node("body", _effectful(_lap))
        .node("after", _effectful(lambda ctx: {"final": ctx.input, "count": ctx.context.get("count")}))
        .loop("repeat", start_node_id="body", end_node_id="body", condition=f"count < {LOOP_LAPS}")
        .edge("init", "repeat").edge("repeat", "after")
    )


def _wait() -> Flow:
    return (
        create_flow("cf-wait")
        .node("request", _effectful(lambda ctx: {"amount": 10}))
        .wait("approve")
        .node("yes", _effectful(lambda ctx: {"approved": ctx.input}))
        .node("no", _effectful(lambda ctx: {"rejected": ctx.input}))
        .node("done", _effectful(lambda ctx: ctx.input))
        .edge("request", "approve")
        .edge("approve", "yes", action="approve").edge("approve", "no", action="reject")
        .edge("yes", "done").edge("no", "done")
    )


def _sleep() -> Flow:
    return (
        create_flow("cf-sleep")
        .node("before", _effectful(lambda ctx: {"t": "before"}))
        .sleep("nap", duration=0.05)
        .node("after", _effectful(lambda ctx: {"slept_with": ctx.input}))
        .edge("before", "nap").edge("nap", "after")
    )


def _child() -> Flow:
    return (
        create_flow("cf-child")
        .node("c1", _effectful(lambda ctx: ctx.context.get("v") * 3))
        .node("c2", _effectful(lambda ctx: ctx.input + 1))
        .edge("c1", "c2")
    )


def _parent() -> Flow:
    return (
        create_flow("cf-parent")
        .node("p0", _effectful(lambda ctx: 5))
        .subflow("sub", "cf-child", inputs={"v": "p0"}, outputs={"childResult": "c2"})
        .node("p2", _effectful(lambda ctx: {"from_child": ctx.context.get("childResult"), "input": ctx.input}))
        .edge("p0", "sub").edge("sub", "p2")
    )


def _raise(ctx: NodeContext) -> Any:
    raise ValueError("kaput")


def _failing() -> Flow:
    return (
        create_flow("cf-failing")
        .node("s", _effectful(lambda ctx: 1))
        .node("bad", _effectful(_raise))
        .node("after", _effectful(lambda ctx: "never"))
        .edge("s", "bad").edge("bad", "after")
    )


def _flaky(ctx: NodeContext) -> Any:
    if ctx.attempt < 3:
        raise RuntimeError(f"attempt {ctx.attempt} fails")
    return {"succeeded_on": ctx.attempt, "input": ctx.input}


def _retries() -> Flow:
    return (
        create_flow("cf-retries")
        .node("s", _effectful(lambda ctx: "go"))
        .node("flaky", _effectful(_flaky), max_retries=3)
        .node("after", _effectful(lambda ctx: ctx.input))
        .edge("s", "flaky").edge("flaky", "after")
    )


def _fallback() -> Flow:
    return (
        create_flow("cf-fallback")
        .node("s", _effectful(lambda ctx: 1))
        .node("primary", _effectful(_raise), fallback="backup", max_retries=2)
        .node("backup", _effectful(lambda ctx: {"from": "backup", "input": ctx.input}))
        .node("next", _effectful(lambda ctx: ctx.input))
        .edge("s", "primary").edge("primary", "next")
    )


def _endurance() -> Flow:
    """A fan of chains: `start` -> ENDURANCE_BRANCHES chains of ENDURANCE_LENGTH nodes -> `end`."""
    flow = create_flow("cf-endurance").node("start", _effectful(lambda ctx: 0))
    for b in range(ENDURANCE_BRANCHES):
        previous = "start"
        for i in range(ENDURANCE_LENGTH):
            node = f"b{b}n{i}"
            flow.node(node, _effectful(lambda ctx: ctx.input + 1)).edge(previous, node)
            previous = node
        flow.edge(previous, "end")
    return flow.node("end", _effectful(lambda ctx: sum(ctx.input.values())))


_BUILDERS = (_chain, _fan, _diamond, _batch, _loop, _wait, _sleep, _child, _parent, _failing, _retries, _fallback,
             _endurance)


def conformance_flows() -> List[Flow]:
    """Every blueprint the checks run (built afresh: the same blueprints, digests and node keys)."""
    return [build() for build in _BUILDERS]


def conformance_runtime(ledger: Optional[Ledger] = None, *, nap: float = 0.0, **options: Any) -> FlowRuntime:
    """A runtime that knows every conformance blueprint and its node code; node code records its
    side effects in `ledger` and, with `nap`, sleeps that long per node of the endurance flow."""
    dependencies = dict(options.pop("dependencies", None) or {})
    if ledger is not None:
        dependencies[LEDGER] = ledger
    if nap:
        dependencies[NAP] = nap
    runtime = FlowRuntime(dependencies=dependencies, **options)
    for flow in conformance_flows():
        runtime.add_blueprint(flow)
    return runtime


def worker_runtime() -> FlowRuntime:
    """The runtime of a worker process, from its environment: the ledger file (`LEDGER_ENV`), the
    worker's name (`WORKER_ENV`) and the nap per node (`NAP_ENV`). For apps named by a string, such
    as ``FLOWCRAFT_APP=flowcraft.testing.conformance:worker_runtime``."""
    path = os.environ.get(LEDGER_ENV)
    ledger = FileLedger(path, os.environ.get(WORKER_ENV, "")) if path else None
    return conformance_runtime(ledger, nap=float(os.environ.get(NAP_ENV) or 0.0))


# =================================================================================================
# scenarios
# =================================================================================================


@attrs.frozen
class Scenario:
    """A blueprint run from `initial_context`; `resume` (action, output) completes its wait."""

    name: str
    blueprint_id: str
    initial_context: Mapping[str, Any] = attrs.field(factory=dict)
    resume: Optional[Tuple[str, Any]] = None
    status: str = "completed"

    def __str__(self) -> str:
        return self.name


SCENARIOS: Dict[str, Scenario] = {s.name: s for s in [
    Scenario("chain", "cf-chain", {"start": 21}),
    Scenario("fan_out_fan_in", "cf-fan"),
    Scenario("diamond_skips_a_branch", "cf-diamond", {"n": 3}),
    Scenario("batch", "cf-batch"),
    Scenario("loop", "cf-loop"),
    Scenario("wait_and_resume", "cf-wait", resume=("approve", {"by": "ann"})),
    Scenario("sleep", "cf-sleep"),
    Scenario("subflow", "cf-parent"),
    Scenario("failing_node", "cf-failing", status="failed"),
    Scenario("retries", "cf-retries"),
    Scenario("fallback", "cf-fallback"),
]}
"""The plain scenarios: each run as in memory. The suite adds `cancel`, `malformed_job`,
`duplicate_job` and `reconcile`, which need more than a start and a resume."""

_SPECIAL = ("cancel", "malformed_job", "duplicate_job", "reconcile")
_CRASH_SCENARIOS = ("chain", "fan_out_fan_in", "diamond_skips_a_branch", "batch", "loop", "wait_and_resume", "sleep",
                    "subflow", "failing_node", "retries", "fallback")
CRASH_SEEDS = (1, 2)
CRASH_RATE = 0.3


def run_in_memory(scenario: Scenario) -> Tuple[WorkflowResult, Counter]:
    """The reference: the scenario run by `FlowRuntime.run` (and `resume`), and its side effects."""
    ledger = MemoryLedger()
    runtime = conformance_runtime(ledger)
    result = runtime.run(scenario.blueprint_id, dict(scenario.initial_context), wait_timers=True)
    if scenario.resume is not None:
        assert result.status == AWAITING, (result.status, result.errors)
        action, output = scenario.resume
        result = runtime.resume(scenario.blueprint_id, result.serialized_context, action=action, output=output,
                                wait_timers=True)
    return result, normalised_effects(ledger.counts())


# =================================================================================================
# what a backend provides
# =================================================================================================


class WorkerProcess:
    """A worker in a process (and session) of its own, started with `command`; `kill()` sends its
    whole process group SIGKILL (a stock worker that forks per job loses its job in hand too)."""

    def __init__(self, command: Sequence[str], name: str, *, env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[str] = None) -> None:
        self.name = name
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(list(command), cwd=cwd, env=dict(env) if env is not None else None,
                                     stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)

    def stderr(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def close(self) -> None:
        self.kill()
        self._log.close()


class BackendFactory:
    """What a backend gives the suite. Override `make_adapter`, `publish_raw` and `dead_letters`;
    the fault matrix uses `crash_points` + `make_crashing_adapter` (in-process crash injection)
    and/or `kills` + `spawn_worker` (worker processes SIGKILLed mid-run)."""

    name = "backend"
    crash_points: Sequence[str] = ()  # crash points `make_crashing_adapter` can inject
    kills = 0  # SIGKILLs of worker processes the kill check throws (0: no process workers)
    workers = 2  # worker processes the kill check keeps running
    kill_timeout = TIMEOUT  # seconds a run may take to finish after the kills (recovery included)

    def make_adapter(self, runtime: FlowRuntime) -> Any:
        """A fresh adapter (client and worker) on this test's own queue, tables or keys; every adapter
        made for one test shares them. The factory closes its adapters when the test ends."""
        raise NotImplementedError

    def make_crashing_adapter(self, runtime: FlowRuntime, points: Sequence[str], *, rate: float, seed: int) -> Any:
        """An adapter whose worker dies at `points` with probability `rate` (its jobs in hand come back)."""
        raise NotImplementedError(f"{self.name}: no in-process crash injection")

    def publish_raw(self, adapter: Any, body: bytes) -> None:
        """Put `body` on the adapter's queue as a foreign (or broken) client would."""
        raise NotImplementedError

    def dead_letters(self, adapter: Any) -> List[bytes]:
        """The bodies of the messages the adapter's workers dead-lettered, oldest first."""
        raise NotImplementedError

    def publish_again(self, adapter: Any, job: Job) -> None:
        """Publish `job` once more, as a broker that redelivers (or a client that retries) would."""
        adapter.queue.enqueue([job])

    def commit_counts(self, adapter: Any) -> Optional[Mapping[Tuple[str, str, int], int]]:
        """(run id, node id, iteration) -> commits that marked it done, if the backend can tell; to be
        effective it is set up when the adapter is made."""
        return None

    def spawn_worker(self, name: str, ledger_path: str, nap: float) -> WorkerProcess:
        """A worker process on this test's queue that runs `worker_runtime()` with `LEDGER_ENV`,
        `WORKER_ENV` (= `name`) and `NAP_ENV` set (see `worker_env`)."""
        raise NotImplementedError(f"{self.name}: no worker processes")

    def recover(self, adapter: Any, killed: Sequence[str]) -> None:
        """After workers named `killed` were SIGKILLed: what the backend's own machinery does in time
        to hand their jobs back (nothing, for a broker that requeues on a dropped connection)."""
        return None

    @staticmethod
    def worker_env(name: str, ledger_path: str, nap: float, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update({LEDGER_ENV: ledger_path, WORKER_ENV: name, NAP_ENV: str(nap)})
        return env


# =================================================================================================
# the suite
# =================================================================================================


@attrs.frozen
class Check:
    """One named check of the suite; call it to run it."""

    name: str
    run: Callable[[], None]

    def __call__(self) -> None:
        self.run()

    def __str__(self) -> str:
        return self.name


def check_names(crash_points: Sequence[str] = (), kills: bool = False) -> List[str]:
    """The names of the suite's checks, for `pytest.mark.parametrize` (collected before any fixture
    exists): the scenarios, then the fault matrix for these crash points and/or the kill check."""
    names = [*SCENARIOS, *_SPECIAL]
    if crash_points:
        for points in [(p,) for p in crash_points] + [tuple(crash_points)]:
            label = points[0] if len(points) == 1 else "all-points"
            names += [f"crash[{label}]:{s}:{seed}" for s in _CRASH_SCENARIOS for seed in CRASH_SEEDS]
    if kills:
        names.append("sigkill_workers")
    return names


class ConformanceSuite:
    """The checks for one backend: `checks()` (name -> `Check`), or `run(name)`."""

    def __init__(self, factory: BackendFactory) -> None:
        self.factory = factory

    def checks(self) -> Dict[str, Check]:
        out: Dict[str, Check] = {}
        for name in check_names(self.factory.crash_points, self.factory.kills > 0):
            out[name] = Check(name, self._bound(name))
        return out

    def run(self, name: str) -> None:
        self._bound(name)()

    def _bound(self, name: str) -> Callable[[], None]:
        if name in SCENARIOS:
            return lambda: self.check_scenario(SCENARIOS[name])
        if name.startswith("crash["):
            label, scenario, seed = name[len("crash["):].replace("]", "", 1).split(":")
            points = tuple(self.factory.crash_points) if label == "all-points" else (label,)
            return lambda: self.check_crashes(SCENARIOS[scenario], points, int(seed))
        special: Dict[str, Callable[[], None]] = {
            "cancel": self.check_cancel, "malformed_job": self.check_malformed_job,
            "duplicate_job": self.check_duplicate_job, "reconcile": self.check_reconcile,
            "sigkill_workers": self.check_sigkill_workers,
        }
        if name not in special:
            raise KeyError(f"no conformance check {name!r}")
        return special[name]

    # --- driving ---------------------------------------------------------------------------------

    @staticmethod
    def settle(adapter: Any, run_id: str, until: Iterable[str] = FINAL_STATUSES, timeout: float = TIMEOUT) -> str:
        """Work in bursts until the run's status is one of `until` (timers fire on their own); return it."""
        wanted = set(until)
        deadline = time.monotonic() + timeout
        while True:
            adapter.work(burst=True)
            status = adapter.get_status(run_id)
            if status is not None and status.status in wanted:
                return str(status.status)
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} still {status.status if status else None} after {timeout}s")
            time.sleep(0.005)

    def _play(self, adapter: Any, scenario: Scenario) -> Tuple[str, WorkflowResult]:
        run_id = adapter.start_workflow(scenario.blueprint_id, dict(scenario.initial_context))
        if scenario.resume is not None:
            assert self.settle(adapter, run_id, {AWAITING, *FINAL_STATUSES}) == AWAITING
            action, output = scenario.resume
            adapter.resume_with_action(run_id, action, output=output)
        self.settle(adapter, run_id)
        adapter.work(burst=True)  # whatever duplicates are left: they change nothing
        return run_id, adapter.wait_for_result(run_id, timeout=TIMEOUT)

    # --- assertions ------------------------------------------------------------------------------

    @staticmethod
    def assert_same_result(result: WorkflowResult, expected: WorkflowResult) -> None:
        """SPEC 5: the same status, context, skipped nodes and errors as the in-memory run."""
        assert result.status == expected.status, (result.status, result.errors)
        assert result.context == expected.context
        assert sorted(result.skipped) == sorted(expected.skipped)
        assert result.errors == expected.errors

    @staticmethod
    def assert_one_key_per_execution(counts: Mapping[str, int]) -> None:
        """A node execution keeps its idempotency key across attempts and redeliveries, and two
        executions never share one: full keys and run-free keys are one to one."""
        by_execution: Dict[str, set] = {}
        for key in counts:
            by_execution.setdefault(next(iter(normalised_effects({key: 1}))), set()).add(key)
        assert all(len(keys) == 1 for keys in by_execution.values()), by_execution

    def assert_committed_once(self, adapter: Any, run_id: str) -> None:
        counts = self.factory.commit_counts(adapter)
        if counts is None:
            return
        mine = {k: n for k, n in counts.items() if str(k[0]).startswith(run_id)}
        assert mine, "nothing of the run was committed"
        assert all(n == 1 for n in mine.values()), {k: n for k, n in mine.items() if n != 1}

    # --- the checks ------------------------------------------------------------------------------

    def check_scenario(self, scenario: Scenario) -> None:
        """The scenario ends as in memory; node code ran as in memory, key for key; committed once."""
        expected, effects = run_in_memory(scenario)
        assert expected.status == scenario.status, (expected.status, expected.errors)
        ledger = MemoryLedger()
        adapter = self.factory.make_adapter(conformance_runtime(ledger))
        run_id, result = self._play(adapter, scenario)
        self.assert_same_result(result, expected)
        assert result.run_id == run_id
        status = adapter.get_status(run_id)
        assert status is not None and status.status == expected.status
        assert normalised_effects(ledger.counts()) == effects
        self.assert_one_key_per_execution(ledger.counts())
        self.assert_committed_once(adapter, run_id)
        assert self.factory.dead_letters(adapter) == []

    def check_crashes(self, scenario: Scenario, points: Sequence[str], seed: int) -> None:
        """Workers die at `points`: the run still ends as in memory, every node execution's side
        effect happened (again, maybe, under its one key), and each was committed once."""
        expected, effects = run_in_memory(scenario)
        ledger = MemoryLedger()
        adapter = self.factory.make_crashing_adapter(conformance_runtime(ledger), points, rate=CRASH_RATE, seed=seed)
        run_id, result = self._play(adapter, scenario)
        self.assert_same_result(result, expected)
        got = normalised_effects(ledger.counts())
        assert set(got) == set(effects), (sorted(set(got) ^ set(effects)))
        assert all(got[k] >= effects[k] for k in effects), got
        self.assert_one_key_per_execution(ledger.counts())
        self.assert_committed_once(adapter, run_id)
        assert self.factory.dead_letters(adapter) == []

    def check_cancel(self) -> None:
        """A run cancelled after its first node ends `cancelled`; no later node runs or is committed."""
        ledger = MemoryLedger()
        adapter = self.factory.make_adapter(conformance_runtime(ledger))
        run_id = adapter.start_workflow("cf-chain", {"start": 21})
        deadline = time.monotonic() + TIMEOUT
        while not ledger.entries():
            adapter.work(burst=True, max_jobs=1)
            assert time.monotonic() < deadline, "the first node never ran"
            time.sleep(0.005)
        adapter.cancel(run_id)
        assert self.settle(adapter, run_id) == "cancelled"
        adapter.work(burst=True)
        result = adapter.wait_for_result(run_id, timeout=TIMEOUT)
        assert result.status == "cancelled"
        assert normalised_effects(ledger.counts()) == Counter({"cf-chain|a:0": 1})
        assert "a" in result.context and "b" not in result.context
        adapter.cancel(run_id)  # cancelling a finished run changes nothing
        assert adapter.get_status(run_id).status == "cancelled"
        assert self.factory.dead_letters(adapter) == []

    def check_malformed_job(self) -> None:
        """Malformed messages are dead-lettered, bodies intact; the worker goes on with good runs."""
        bodies = [b"not json {", b'{"runId": "r1"}',
                  json.dumps({"runId": "nope", "blueprintId": "unknown-bp", "nodeId": "x"}).encode()]
        scenario = SCENARIOS["chain"]
        expected, effects = run_in_memory(scenario)
        ledger = MemoryLedger()
        adapter = self.factory.make_adapter(conformance_runtime(ledger))
        for body in bodies:
            self.factory.publish_raw(adapter, body)
        adapter.work(burst=True)
        run_id, result = self._play(adapter, scenario)
        self.assert_same_result(result, expected)
        assert normalised_effects(ledger.counts()) == effects
        assert sorted(self.factory.dead_letters(adapter)) == sorted(bodies)

    def check_duplicate_job(self) -> None:
        """The start job published twice, and a premature job for the second node: effectively once."""
        scenario = SCENARIOS["chain"]
        expected, effects = run_in_memory(scenario)
        ledger = MemoryLedger()
        adapter = self.factory.make_adapter(conformance_runtime(ledger))
        run_id = adapter.start_workflow(scenario.blueprint_id, dict(scenario.initial_context))
        self.factory.publish_again(adapter, Job(run_id, scenario.blueprint_id, "a"))
        self.factory.publish_again(adapter, Job(run_id, scenario.blueprint_id, "b"))
        self.settle(adapter, run_id)
        adapter.work(burst=True)
        self.assert_same_result(adapter.wait_for_result(run_id, timeout=TIMEOUT), expected)
        assert normalised_effects(ledger.counts()) == effects  # each node code ran once
        self.assert_committed_once(adapter, run_id)
        assert self.factory.dead_letters(adapter) == []

    def check_reconcile(self) -> None:
        """`reconcile` re-enqueues a running run's frontier (a duplicate here): nothing runs twice,
        and a finished run has no frontier."""
        scenario = SCENARIOS["fan_out_fan_in"]
        expected, effects = run_in_memory(scenario)
        ledger = MemoryLedger()
        adapter = self.factory.make_adapter(conformance_runtime(ledger))
        run_id = adapter.start_workflow(scenario.blueprint_id, dict(scenario.initial_context))
        assert adapter.reconcile(run_id) == {"src"}
        adapter.work(burst=True, max_jobs=1)
        self.settle(adapter, run_id)
        adapter.work(burst=True)
        self.assert_same_result(adapter.wait_for_result(run_id, timeout=TIMEOUT), expected)
        assert normalised_effects(ledger.counts()) == effects
        self.assert_committed_once(adapter, run_id)
        assert adapter.reconcile(run_id) == set()
        assert self.factory.dead_letters(adapter) == []

    def check_sigkill_workers(self, nap: float = 0.02) -> None:
        """Worker processes run a fan of chains; `factory.kills` times, the worker that ran the latest
        node is SIGKILLed (mid-node: each node naps after its side effect) and a fresh one started.
        The run ends as in memory, every node execution ran, and none ran twice but for the jobs in
        the killed workers' hands (at most one fetch window each)."""
        factory = self.factory
        scenario = Scenario("endurance", "cf-endurance")
        expected, effects = run_in_memory(scenario)
        directory = tempfile.mkdtemp(prefix="fc-conformance-")
        path = os.path.join(directory, "ledger")
        ledger = FileLedger(path)
        client = factory.make_adapter(conformance_runtime())  # a client only: it never works
        pool: Dict[str, WorkerProcess] = {}
        killed: List[str] = []
        spawned = 0

        def spawn() -> None:
            nonlocal spawned
            spawned += 1
            name = f"{factory.name}-w{spawned}"
            pool[name] = factory.spawn_worker(name, path, nap)

        try:
            for _ in range(factory.workers):
                spawn()
            run_id = client.start_workflow(scenario.blueprint_id)
            total = sum(effects.values())
            step = max(2, total // (factory.kills + 2))
            deadline = time.monotonic() + factory.kill_timeout
            for kill in range(factory.kills):
                while len(ledger.entries()) < step * (kill + 1):
                    dead = [n for n, w in pool.items() if not w.alive() and n not in killed]
                    assert not dead, {n: pool[n].stderr() for n in dead}
                    assert time.monotonic() < deadline, f"no progress: {len(ledger.entries())} side effects"
                    factory.recover(client, killed)
                    time.sleep(0.01)
                # the worker that started the latest node, mid-node (each node naps after its effect)
                victim = next((w for w, _ in reversed(ledger.entries()) if w in pool and pool[w].alive()),
                              next(n for n, w in pool.items() if w.alive()))
                pool[victim].kill()
                killed.append(victim)
                spawn()
                factory.recover(client, killed)
            while client.get_status(run_id).status not in FINAL_STATUSES:
                assert time.monotonic() < deadline, f"run still running: {len(ledger.entries())} side effects"
                factory.recover(client, killed)
                time.sleep(0.05)
            result = client.wait_for_result(run_id, timeout=TIMEOUT)
            for worker in pool.values():
                worker.kill()  # no worker runs node code while the ledger is read
            counts = ledger.counts()
            history = client.get_history(run_id) if hasattr(client, "get_history") else None
        finally:
            for worker in pool.values():
                worker.close()
            shutil.rmtree(directory, ignore_errors=True)
        self.assert_same_result(result, expected)
        got = normalised_effects(counts)
        assert set(got) == set(effects), sorted(set(got) ^ set(effects))
        self.assert_one_key_per_execution(counts)
        assert len(killed) == factory.kills
        extra = sum(got.values()) - sum(effects.values())
        assert extra <= factory.kills * max(1, int(getattr(client, "fetch_batch", 1))), (extra, got)
        assert factory.dead_letters(client) == []
        if history is not None:  # the run's history: exactly one completion per node execution, killed or not
            finished = Counter((e.payload.get("node_id"), e.payload.get("iteration", 0), e.payload.get("index"))
                               for e in history if e.type == "node:finish")
            assert set(finished.values()) == {1}, [k for k, n in finished.items() if n != 1]
            assert {node for node, _, index in finished if index is None} == set(expected.context) & {
                n.id for n in conformance_runtime().blueprints[scenario.blueprint_id].nodes}
