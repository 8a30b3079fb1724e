"""The in-memory runtime: runs a blueprint inside this process, serially or on a thread pool."""
from __future__ import annotations

import datetime as _dt
import difflib
import logging
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Deque, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import deadlines, limits
from .blueprint import NodeDefinition, WorkflowBlueprint
from .builtins import (BATCH_SCATTER, BUILTINS, LOOP_CONTROLLER, SUBFLOW, Await, SubflowError, child_run_id,
                       finish_subflow, utc_now)
from .cancel import CancelToken
from .context import DictContext
from .errors import BlueprintError, FlowcraftError, LoopLimitError, SerializationError, UnknownNodeError
from .events import Event
from .execution import FallbackResult, NodeFailure, NodeRunner, item_failure, resolve_impl
from .graph import (MAX_CYCLE_ITERATIONS, Activation, CompiledGraph, GraphNode, RoutingError, Traversal,
                    check_resume_action, input_value)
from .middleware import call_hooks, start_traceparent
from . import outcome as outcome_of
from .node import NodeContext, NodeResult, Registry, to_result
from .result import AWAITING, CANCELLED, COMPLETED, FAILED, STALLED, WorkflowError, WorkflowResult
from .serializer import DEFAULT_MAX_CONTEXT_BYTES, DEFAULT_MAX_VALUE_BYTES, JsonSerializer, check_json, check_values

logger = logging.getLogger("flowcraft.runtime")

BlueprintRef = Union[WorkflowBlueprint, Mapping[str, Any], str]
TRAVERSAL_KEY = "_traversal"
CHILD_CONTEXTS_KEY = "childContexts"  # in the traversal snapshot: awaiting subflow node id -> child's context
_SCALARS = frozenset((int, float, str, bool, type(None)))
AWAITING_IDS_KEY = "_awaitingNodeIds"
AWAITING_DETAILS_KEY = "_awaitingDetails"


def new_run_id() -> str:
    return os.urandom(16).hex()
_GRAPH_CACHE_SIZE = 256

# Defaults of the runtime's bounds on what a blueprint may ask for (blueprints are untrusted input).
MAX_SUBFLOW_DEPTH = 32
MAX_LOOP_ITERATIONS = 10_000
MAX_NODE_ATTEMPTS = 100
MAX_RETRY_DELAY = 3600.0  # seconds
MAX_NODE_TIMEOUT = 86400.0  # seconds


def _whole(number: float) -> Any:
    return int(number) if float(number).is_integer() else number


def subflow_depth_error(node_id: str, depth: int, limit: int) -> SubflowError:
    """The error of a subflow node whose child would be nested past `max_subflow_depth` (the same
    in memory and distributed)."""
    return SubflowError(f"subflow {node_id!r}: its child run would be nested {depth} subflows deep, "
                        f"more than the runtime's max_subflow_depth={limit}")


class FlowRuntime:
    """Runs blueprints in memory. Holds the node registry, known blueprints, and run options.

    `max_cycle_iterations` caps a cycle that no loop controller governs (a raw back edge): past it
    the run fails with `LoopLimitError`, in memory and distributed alike; None removes the cap.

    `max_value_bytes` bounds one value (a context key, a node output, a batch item's input or
    output, an edge's transformed value) and `max_context_bytes` a run's context (in memory: all a
    run's nodes write; in a worker: what one node writes, and a finished run's whole context), both
    as JSON (default 16 MiB and 256 MiB; None: no bound). Past them the node fails with
    `ValueTooLarge` naming the key, and so does the run, in both drivers.

    Bounds on what a blueprint may ask for, the same in memory and distributed (None removes one):

    - `max_subflow_depth` (32): subflows nested in subflows; the subflow node whose child would be
      deeper fails its run with a `SubflowError` naming the node and the limit (a blueprint that
      runs itself as a subflow ends there, instead of forking runs forever).
    - `max_loop_iterations` (10,000): a loop controller's `maxIterations`;
    - `max_node_attempts` (100): a node's `config.maxRetries` (total attempts);
    - `max_retry_delay` (3,600 s): a node's `config.retryDelay`;
    - `max_node_timeout` (86,400 s): a node's `config.timeout`.

    A blueprint over one of the last four is refused when it is registered or compiled
    (`BlueprintError` naming the node, the field and the cap): nothing is clamped silently.

    `evaluator` compiles edge and loop expressions: an object with `compile(source)` (default: the
    safe `SafeEvaluator`) or one with `evaluate(expression, context)` (the Flowcraft TS shape).
    `strict_expressions=True` makes a name or key an expression reads that does not exist, and an
    ordering comparison of values that cannot be ordered (None or a number with a string), fail
    the edge's source node with an error naming the expression, the name and the keys that exist;
    without it they read as None and False, and are logged once per blueprint and edge at WARNING
    (logger "flowcraft.expressions"). In memory and distributed alike (SPEC 5)."""

    def __init__(
        self,
        registry: Optional[Mapping[str, Any]] = None,
        blueprints: Optional[Union[Mapping[str, Any], Sequence[Any]]] = None,
        dependencies: Optional[Mapping[str, Any]] = None,
        event_bus: Any = None,
        middleware: Sequence[Any] = (),
        evaluator: Any = None,
        serializer: Any = None,
        max_cycle_iterations: Optional[int] = MAX_CYCLE_ITERATIONS,
        *,
        max_value_bytes: Optional[int] = DEFAULT_MAX_VALUE_BYTES,
        max_context_bytes: Optional[int] = DEFAULT_MAX_CONTEXT_BYTES,
        max_subflow_depth: Optional[int] = MAX_SUBFLOW_DEPTH,
        max_loop_iterations: Optional[int] = MAX_LOOP_ITERATIONS,
        max_node_attempts: Optional[int] = MAX_NODE_ATTEMPTS,
        max_retry_delay: Optional[float] = MAX_RETRY_DELAY,
        max_node_timeout: Optional[float] = MAX_NODE_TIMEOUT,
        strict_expressions: bool = False,
    ) -> None:
        from .evaluator import as_evaluator

        evaluator = as_evaluator(evaluator)  # None: the default; `evaluate`-only: adapted
        self.strict_expressions = bool(strict_expressions)
        self.registry: Dict[str, Any] = dict(registry or {})
        self.dependencies: Dict[str, Any] = dict(dependencies or {})
        self.event_bus = event_bus
        self.middleware = tuple(middleware)
        self.evaluator = evaluator
        self.serializer = serializer if serializer is not None else JsonSerializer()
        self.max_cycle_iterations = max_cycle_iterations
        self.max_value_bytes = max_value_bytes
        self.max_context_bytes = max_context_bytes
        self.max_subflow_depth = max_subflow_depth
        self.max_loop_iterations = max_loop_iterations
        self.max_node_attempts = max_node_attempts
        self.max_retry_delay = max_retry_delay
        self.max_node_timeout = max_node_timeout
        self.blueprints: Dict[str, WorkflowBlueprint] = {}
        for item in (blueprints.values() if isinstance(blueprints, Mapping) else blueprints or ()):
            self.add_blueprint(item)
        self._graphs: Dict[Tuple[int, bool], Tuple[WorkflowBlueprint, CompiledGraph]] = {}
        # blueprint id() -> (blueprint, the registry it was checked against, the registry keys it needs)
        self._registry_checked: Dict[int, Tuple[WorkflowBlueprint, Mapping[str, Any], FrozenSet[str]]] = {}
        self._runner = NodeRunner(self.middleware, None)
        self.scheduler: Any = None  # a `timers.TimerScheduler` once `start_scheduler` made one
        self.pause_requests: set = set()  # ids of runs `request_pause` asked to pause (timetravel)
        self.schedules: Dict[str, Any] = {}  # name -> `schedules.Schedule` (`schedule`)

    # --- blueprints ----------------------------------------------------------------------------

    def add_blueprint(self, blueprint: Any) -> WorkflowBlueprint:
        """Register a blueprint (or a `Flow`, whose registry is merged in) under its id."""
        if hasattr(blueprint, "to_blueprint") and hasattr(blueprint, "registry"):
            self.registry.update(blueprint.registry)
            blueprint = blueprint.to_blueprint()
        bp = self._as_blueprint(blueprint)
        self.check_limits(bp)
        self.blueprints[bp.id] = bp
        return bp

    def limit_problems(self, blueprint: WorkflowBlueprint) -> List[str]:
        """What in `blueprint` exceeds this runtime's bounds (see the class doc), as sentences."""
        found: List[str] = deadlines.metadata_problems(blueprint)
        caps = (("maxRetries", "max_retries", self.max_node_attempts, "max_node_attempts", 1),
                ("retryDelay", "retry_delay", self.max_retry_delay, "max_retry_delay", 1000),
                ("timeout", "timeout", self.max_node_timeout, "max_node_timeout", 1000))
        for node in blueprint.nodes:
            config = node.config
            if config is not None:
                for field, attr, cap, setting, wire in caps:
                    value = getattr(config, attr)
                    if cap is not None and isinstance(value, (int, float)) and value > cap:
                        unit = "ms" if wire != 1 else ""
                        found.append(f"node {node.id!r}: {field}={_whole(value * wire)}{unit} is more than the "
                                     f"runtime's {setting}={_whole(cap)}{' s' if unit else ''}")
            if node.uses == LOOP_CONTROLLER and node.params and node.params.get("maxIterations") is not None:
                value = node.params["maxIterations"]
                if type(value) is not int or value < 1:
                    found.append(f"node {node.id!r}: params.maxIterations must be a whole number >= 1, not {value!r}")
                elif self.max_loop_iterations is not None and value > self.max_loop_iterations:
                    found.append(f"node {node.id!r}: params.maxIterations={value} is more than the runtime's "
                                 f"max_loop_iterations={self.max_loop_iterations}")
        return found

    def check_limits(self, blueprint: WorkflowBlueprint) -> None:
        """Raise `BlueprintError` if `blueprint` exceeds this runtime's bounds."""
        found = self.limit_problems(blueprint)
        if found:
            raise BlueprintError(found, blueprint.id)

    def registry_problems(self, blueprint: WorkflowBlueprint, registry: Optional[Mapping[str, Any]] = None) -> List[str]:
        """What `blueprint` would need and this runtime lacks, as phrases: `uses` keys that are
        neither in the registry (`registry` merged over the runtime's) nor built-ins, of its nodes
        (fallback nodes included), of its batches' workers and, transitively, of the blueprints its
        subflows run; and the subflow blueprints the runtime does not know."""
        known = self._registry_for(registry)
        missing: List[str] = []
        unknown_blueprints: List[str] = []
        seen = {blueprint.id}
        todo: List[Tuple[WorkflowBlueprint, str]] = [(blueprint, "")]
        while todo:
            bp, where = todo.pop()
            for node in bp.nodes:
                params = node.params or {}
                if node.uses == SUBFLOW and node.uses not in known:
                    child_id = params.get("blueprintId")
                    child = self.blueprints.get(child_id) if isinstance(child_id, str) else None
                    if child is None:
                        unknown_blueprints.append(f"{child_id!r} (node {node.id!r}{where})")
                    elif child.id not in seen:
                        seen.add(child.id)
                        todo.append((child, f" of subflow blueprint {child.id!r}"))
                elif node.uses == BATCH_SCATTER and node.uses not in known:
                    worker = params.get("workerUsesKey")
                    if isinstance(worker, str) and worker not in known and worker not in BUILTINS:
                        missing.append(f"{worker!r} (the workers of batch node {node.id!r}{where}{_close(worker, known)})")
                elif node.uses not in known and node.uses not in BUILTINS:
                    missing.append(f"{node.uses!r} (node {node.id!r}{where}{_close(node.uses, known)})")
        found = [f"not in the registry: {', '.join(missing)}"] if missing else []
        if unknown_blueprints:
            found.append(f"subflow blueprints the runtime does not know: {', '.join(unknown_blueprints)}")
        return found

    def check_registry(self, blueprint: WorkflowBlueprint, registry: Optional[Mapping[str, Any]] = None,
                       known: Optional[Mapping[str, Any]] = None) -> None:
        """Raise `UnknownNodeError` (one line naming them all) if `blueprint` uses what this runtime
        lacks (`registry_problems`): checked before a run starts, so that no node runs (and no side
        effect happens) in a run that would fail on the first node nobody can run."""
        if known is None:
            known = self._registry_for(registry)
        checked = self._registry_checked.get(id(blueprint))
        if checked is not None and checked[0] is blueprint and checked[1] is known and checked[2] <= known.keys():
            return  # checked against this registry before, and the keys it needed are all still there
        found = self.registry_problems(blueprint, registry)
        if found:
            raise UnknownNodeError(f"blueprint {blueprint.id!r} cannot run, nothing was started: {'; '.join(found)}")
        if all(node.uses != SUBFLOW for node in blueprint.nodes):  # a subflow's check depends on other blueprints
            needed = frozenset(k for n in blueprint.nodes for k in (n.uses, (n.params or {}).get("workerUsesKey"))
                               if isinstance(k, str) and k in known)
            if len(self._registry_checked) >= _GRAPH_CACHE_SIZE:
                self._registry_checked.pop(next(iter(self._registry_checked)))
            self._registry_checked[id(blueprint)] = (blueprint, known, needed)

    def blueprint(self, ref: BlueprintRef) -> WorkflowBlueprint:
        """A blueprint from a `WorkflowBlueprint`, its dict form, a `Flow`, or the id of a known one."""
        if isinstance(ref, str):
            found = self.blueprints.get(ref)
            if found is None:
                raise BlueprintError([f"unknown blueprint id {ref!r} (known: {sorted(self.blueprints)})"], ref)
            return found
        return self._as_blueprint(ref)

    @staticmethod
    def _as_blueprint(ref: Any) -> WorkflowBlueprint:
        if isinstance(ref, WorkflowBlueprint):
            return ref
        if hasattr(ref, "to_blueprint"):
            return ref.to_blueprint()
        return WorkflowBlueprint.from_dict(ref)

    def graph(self, blueprint: BlueprintRef, *, strict: bool = False) -> CompiledGraph:
        """The compiled graph of a blueprint, built once and cached."""
        bp = self.blueprint(blueprint)
        key = (id(bp), strict)
        cached = self._graphs.get(key)
        if cached is not None and cached[0] is bp:
            return cached[1]
        self.check_limits(bp)
        graph = CompiledGraph(bp, self.evaluator, strict=strict, max_cycle_iterations=self.max_cycle_iterations,
                              max_value_bytes=self.max_value_bytes, strict_expressions=self.strict_expressions)
        if len(self._graphs) >= _GRAPH_CACHE_SIZE:
            self._graphs.pop(next(iter(self._graphs)))
        self._graphs[key] = (bp, graph)
        return graph

    # --- running -------------------------------------------------------------------------------

    def run(
        self,
        blueprint: BlueprintRef,
        initial_context: Union[Mapping[str, Any], str, None] = None,
        *,
        registry: Optional[Mapping[str, Any]] = None,
        concurrency: int = 1,
        cancel: Optional[CancelToken] = None,
        strict: bool = False,
        run_id: Optional[str] = None,
        wait_timers: bool = False,
        deadline: Optional[float] = None,
        _subflow_depth: int = 0,
    ) -> WorkflowResult:
        """Run a blueprint to its end (or until it awaits) and return the `WorkflowResult`.

        `initial_context` may be a serialized context (a JSON string), as TS's `run`. `deadline`
        (seconds; default the blueprint's `metadata.deadline`): past it the run fails with
        `DeadlineExceeded` (see `flowcraft.deadlines`)."""
        if isinstance(initial_context, str):
            initial_context = self.serializer.loads(initial_context)
        cached = self._graphs.get((id(blueprint), strict))
        graph = cached[1] if cached is not None and cached[0] is blueprint else self.graph(blueprint, strict=strict)
        if initial_context is not None and type(initial_context) is not dict and not isinstance(initial_context, Mapping):
            raise TypeError(f"initial_context must be a mapping, not {type(initial_context).__name__}")
        known = self._registry_for(registry)
        if not _subflow_depth:  # a subflow's child was checked with its parent
            self.check_registry(graph.blueprint, registry, known)
        data = dict(initial_context) if initial_context else {}
        check_values(data, "initial context", self.max_value_bytes)  # refused before anything runs, as by start_workflow
        seconds = deadlines.run_deadline(graph.blueprint, deadline)
        run_deadline = deadlines.RunDeadline.start(seconds, cancel) if seconds is not None else None
        if run_deadline is not None:
            cancel = run_deadline.token
        run = _Run(self, graph, data, known, run_id or new_run_id(), cancel, concurrency, wait_timers)
        run.deadline = run_deadline
        run.depth = _subflow_depth
        if run.emit is not None:
            run.emit("workflow:start", {"initial_context": dict(data)})
        return self._settled(graph.blueprint, run.execute(run.traversal.start()), registry, _subflow_depth)

    def resume(
        self,
        blueprint: BlueprintRef,
        serialized_context: Union[str, Mapping[str, Any]],
        *,
        output: Any = None,
        action: Optional[str] = None,
        node_id: Optional[str] = None,
        registry: Optional[Mapping[str, Any]] = None,
        concurrency: int = 1,
        cancel: Optional[CancelToken] = None,
        run_id: Optional[str] = None,
        wait_timers: bool = False,
        strict: bool = False,
        _subflow_depth: int = 0,
    ) -> WorkflowResult:
        """Complete an awaiting node of a paused run with `output`/`action`, and run on from there."""
        check_values({"output": output}, "resume", self.max_value_bytes)  # refused before the run changes
        graph = self.graph(blueprint, strict=strict)
        data = self.serializer.loads(serialized_context) if not isinstance(serialized_context, Mapping) else dict(serialized_context)
        snapshot = data.pop(TRAVERSAL_KEY, None)
        awaiting = dict(data.get(AWAITING_DETAILS_KEY) or {})
        if snapshot is None or not awaiting:
            raise ValueError("this context is not that of an awaiting run (no awaiting nodes recorded)")
        paused = [n for n, d in awaiting.items() if d.get("type") == "pause" and (node_id is None or n == node_id)]
        resumed = ""
        if not paused:
            resumed = awaiting_node(awaiting, node_id)
            self._check_resume(graph, resumed, awaiting[resumed], snapshot, action)
        run_deadline = deadlines.RunDeadline.restore(snapshot, cancel)
        if run_deadline is not None:
            cancel = run_deadline.token
        run = _Run(self, graph, data, self._registry_for(registry), run_id or snapshot.get("runId") or new_run_id(),
                   cancel, concurrency, wait_timers)
        run.deadline = run_deadline
        run.depth = _subflow_depth
        run.traversal = Traversal.restore(graph, snapshot)
        run.awaiting = awaiting
        run.child_contexts = dict(snapshot.get(CHILD_CONTEXTS_KEY) or {})
        if paused:  # a run `request_pause` paused: its parked nodes run now
            from .timetravel import unpark_paused

            run.emit_event("workflow:resume", {"node_ids": paused})
            return self._settled(graph.blueprint, run.execute(unpark_paused(run, paused)), registry, _subflow_depth)
        run.emit_event("workflow:resume", {"node_id": resumed})
        return self._settled(graph.blueprint, run.execute(run.resume_node(resumed, output, action)), registry,
                             _subflow_depth)

    def _settled(self, blueprint: WorkflowBlueprint, result: WorkflowResult, registry: Optional[Mapping[str, Any]],
                 depth: int) -> WorkflowResult:
        """A top-level run's result, after the timer scheduler (if any) has seen it."""
        self.pause_requests.discard(result.run_id)
        if self.scheduler is not None and not depth:
            self.scheduler.register(blueprint, result, dict(registry) if registry else None)
        return result

    # --- timers (flowcraft.timers) -------------------------------------------------------------

    def schedule(self, blueprint_id: BlueprintRef, cron: str, initial_context: Optional[Mapping[str, Any]] = None,
                 name: Optional[str] = None, timezone: str = "UTC") -> Any:
        """Start a run of `blueprint_id` on every tick of `cron` (needs the `cron` extra), once a
        `flowcraft.schedules.Scheduler` (`flowcraft scheduler`) runs; returns the `Schedule`."""
        from .schedules import make_schedule

        made = make_schedule(self, blueprint_id, cron, initial_context, name, timezone)
        self.schedules[made.name] = made
        return made

    def start_scheduler(self, interval: Optional[float] = None, on_result: Any = None) -> Any:
        """Start the in-memory timer scheduler (TS `startScheduler`): from now on a run that awaits
        a `sleep` node resumes by itself when it is due. `interval` (seconds, default 1) makes a
        new scheduler, as TS's `checkIntervalMs`. Returns the `TimerScheduler`."""
        from .timers import TimerScheduler

        if self.scheduler is None or interval is not None:
            old = self.scheduler
            self.scheduler = TimerScheduler(self, interval if interval is not None else 1.0,
                                            on_result if on_result is not None else getattr(old, "on_result", None))
            if old is not None:
                old.stop()
                for sleeping in old.sleeping():
                    self.scheduler._runs[sleeping.run_id] = sleeping
        elif on_result is not None:
            self.scheduler.on_result = on_result
        self.scheduler.start()
        return self.scheduler

    def stop_scheduler(self) -> None:
        """Stop the timer scheduler's thread (TS `stopScheduler`); sleeping runs stay registered."""
        if self.scheduler is not None:
            self.scheduler.stop()

    def _check_resume(self, graph: CompiledGraph, node_id: str, details: Mapping[str, Any],
                      snapshot: Mapping[str, Any], action: Optional[str]) -> None:
        """Refuse, before anything runs, an action the awaiting node (for a subflow: its child's
        awaiting node, however deep) has no edge for (`graph.check_resume_action`)."""
        if details.get("type") != "subflow":
            return check_resume_action(graph.nodes[node_id], action)
        child = (snapshot.get(CHILD_CONTEXTS_KEY) or {}).get(node_id) or details.get("childContext")
        if child is None:
            return  # resuming fails the node, naming what is missing
        data = self.serializer.loads(child)
        child_awaiting = dict(data.get(AWAITING_DETAILS_KEY) or {})
        child_snapshot = data.get(TRAVERSAL_KEY)
        if not child_awaiting or child_snapshot is None:
            return
        child_node = awaiting_node(child_awaiting, None)
        self._check_resume(self.graph(details["blueprintId"]), child_node, child_awaiting[child_node], child_snapshot,
                           action)

    def replay(self, blueprint: BlueprintRef, events: Any) -> WorkflowResult:
        """Rebuild the final context of a recorded run from its events, running no node code."""
        from .replay import replay_events

        self.blueprint(blueprint)  # a replay must name a blueprint this runtime can load
        return replay_events(events)

    # --- time travel (flowcraft.timetravel) ---------------------------------------------------

    def request_pause(self, run_id: str) -> None:
        """Ask the in-memory run `run_id`, running in another thread, to pause (TS `requestPause`):
        the nodes running finish, no other starts (a batch in progress finishes first), and the run
        ends `awaiting` with the nodes it would have run next parked as `{"type": "pause"}`;
        `resume(blueprint, serialized_context)` runs them and goes on."""
        self.pause_requests.add(run_id)

    def execute_nodes(self, blueprint: BlueprintRef, node_ids: Sequence[str], events: Any, **options: Any) -> WorkflowResult:
        """Run just `node_ids` over the context a recorded history describes (TS `executeNodes`)."""
        from .timetravel import execute_nodes

        return execute_nodes(self, blueprint, node_ids, events, **options)

    def patch_context(self, blueprint: BlueprintRef, source: Any, *, set: Optional[Mapping[str, Any]] = None,
                      delete: Optional[Sequence[str]] = None, run_id: Optional[str] = None) -> WorkflowResult:
        """Change a run's context (a serialized context or an event history) between node
        executions (TS `patchContext`)."""
        from .timetravel import patch_context

        return patch_context(self, blueprint, source, set=set, delete=delete, run_id=run_id)

    def mark_node_completed(self, blueprint: BlueprintRef, events: Any, node_id: str, output: Any = None,
                            **options: Any) -> WorkflowResult:
        """Count a node as completed with `output` without running it, and go on (TS `markNodeCompleted`)."""
        from .timetravel import mark_node_completed

        return mark_node_completed(self, blueprint, events, node_id, output, **options)

    def rollback_execution(self, blueprint: BlueprintRef, events: Any, node_id: str) -> WorkflowResult:
        """The run as it stood right after `node_id` completed (TS `rollbackExecution`)."""
        from .timetravel import rollback_execution

        return rollback_execution(self, blueprint, events, node_id)

    def retry(self, blueprint: BlueprintRef, serialized_context: Union[str, Mapping[str, Any]],
              node_ids: Optional[Sequence[str]] = None, **options: Any) -> WorkflowResult:
        """Continue a failed (or cancelled) run from its serialized context (SPEC 11): the nodes
        that completed (their `_outputs.<id>` is there) give their outputs without running, except
        `node_ids`, which run again; the failed nodes run with fresh attempts."""
        from .timetravel import retry_run

        return retry_run(self, blueprint, serialized_context, node_ids, **options)

    def replay_from(self, blueprint: BlueprintRef, events: Any, node_id: str, **options: Any) -> WorkflowResult:
        """Run `node_id` and what follows again, its ancestors' results taken from the history
        (TS `replayFrom`; `input_overrides=` sets context keys first)."""
        from .timetravel import replay_from

        return replay_from(self, blueprint, events, node_id, **options)

    def _registry_for(self, registry: Optional[Mapping[str, Any]]) -> Mapping[str, Any]:
        if not registry:
            return self.registry
        if not self.registry:
            return registry
        merged = dict(self.registry)
        merged.update(registry)
        return merged

    def _emitter(self, run_id: str, blueprint_id: str) -> Optional[Callable[[str, Dict[str, Any]], None]]:
        bus = self.event_bus
        if bus is None:
            return None

        def emit(kind: str, payload: Dict[str, Any]) -> None:
            try:
                bus.emit(Event(kind, {"run_id": run_id, "blueprint_id": blueprint_id, **payload}))
            except Exception:  # an observer must never break a run (nor a worker)
                logger.exception("the event bus failed on %s", kind)

        return emit


class _Run:
    """One execution of a blueprint in memory: the context, the traversal, the errors."""

    __slots__ = (
        "runtime", "evaluator", "wait_timers", "awaiting", "batches", "graph", "data", "context", "registry",
        "run_id", "blueprint_id", "cancel", "concurrency", "traversal", "errors", "skipped", "emit", "runner", "impls",
        "dependencies", "child_contexts", "depth", "recorded", "traceparent", "deadline",
    )

    def __init__(
        self,
        runtime: FlowRuntime,
        graph: CompiledGraph,
        data: Dict[str, Any],
        registry: Mapping[str, Any],
        run_id: str,
        cancel: Optional[CancelToken],
        concurrency: int,
        wait_timers: bool = False,
    ) -> None:
        self.runtime = runtime
        self.dependencies = runtime.dependencies
        self.evaluator = runtime.evaluator
        self.wait_timers = wait_timers
        self.awaiting: Dict[str, Dict[str, Any]] = {}  # node id -> details (with its iteration)
        self.child_contexts: Dict[str, str] = {}  # awaiting subflow node id -> its child's serialized context
        self.batches: Dict[str, List[Any]] = {}  # parent node id -> its dynamic nodes' outputs
        self.graph = graph
        self.data = data
        self.context = DictContext(data, max_value_bytes=runtime.max_value_bytes, max_context_bytes=runtime.max_context_bytes)
        self.registry = registry
        # a `Registry`'s own dict (live: what is registered later is seen), read per node without a Python call
        self.impls: Mapping[str, Any] = registry._nodes if type(registry) is Registry else registry
        self.run_id = run_id
        self.depth = 0  # how many subflows deep this run is (0: not a subflow's child)
        self.recorded: Optional[Dict[str, NodeResult]] = None  # node id -> the result it gives without running (timetravel)
        self.blueprint_id = graph.blueprint.id
        self.cancel = cancel if cancel is not None else CancelToken()
        self.concurrency = max(1, int(concurrency))
        self.traversal = Traversal(graph)
        self.deadline: Optional[deadlines.RunDeadline] = None  # set by `run`/`resume` (its token is `cancel`)
        self.errors: List[WorkflowError] = []
        self.skipped: List[str] = []
        self.emit = runtime._emitter(run_id, self.blueprint_id)
        # the run's trace context, from a telemetry middleware (`middleware.start_traceparent`)
        self.traceparent = start_traceparent(runtime.middleware) if runtime.middleware else None
        self.runner = NodeRunner(runtime.middleware, self.emit) if self.emit is not None else runtime._runner
        if self.emit is not None:
            emit = self.emit
            self.context.on_change = lambda key, value, deleted: emit(
                "context:change", {"key": key, "value": value, "op": "delete" if deleted else "set"}
            )

    def emit_event(self, kind: str, payload: Dict[str, Any]) -> None:
        if self.emit is not None:
            self.emit(kind, payload)

    # --- the loop ------------------------------------------------------------------------------

    def execute(self, activations: List[Activation]) -> WorkflowResult:
        ready: Deque[Activation] = deque(activations)
        if self.concurrency == 1 and self.deadline is None:  # under a deadline nodes run in threads: waits are bounded
            self._run_serial(ready)
        else:
            self._run_pool(ready)
        if ready and self._pausing():
            from .timetravel import park_paused

            park_paused(self, ready)
        return self._result()

    def _pausing(self) -> bool:
        """`request_pause` asked this run to pause (honoured between batches, not inside one)."""
        return self.run_id in self.runtime.pause_requests and not self.batches

    def _stopping(self) -> bool:
        return bool(self.errors) or self.cancel.cancelled

    def _run_serial(self, ready: Deque[Activation]) -> None:
        execute, finish, pauses = self._execute, self._finish, self.runtime.pause_requests
        limited = limits.graph_limits(self.graph)  # one node at a time: never over a limit, but a bad key fails
        while True:
            while ready and not self.errors and not self.cancel.cancelled and not (pauses and self._pausing()):
                activation = ready.popleft()
                if limited and activation.parent is None and activation.node_id in limited:
                    try:
                        self._key(activation, limited[activation.node_id])
                    except limits.ConcurrencyKeyError as error:
                        finish(activation, NodeFailure(activation.node_id, error), ready)
                        continue
                finish(activation, execute(activation), ready)
            if not self._settle(ready):
                return

    def _settle(self, ready: Deque[Activation]) -> bool:
        """Nothing left to run: skip unused fallback nodes; True if that made more work."""
        if ready or self._stopping() or self.traversal.outstanding != len(self.awaiting) or not self.graph.fallback_only_ids:
            return False
        newly_ready, skipped = self.traversal.settle()
        outcome_of.store_inputs(self.graph, newly_ready, self.data)
        self.skipped.extend(skipped)
        ready.extend(newly_ready)
        return bool(newly_ready)

    def _run_pool(self, ready: Deque[Activation]) -> None:
        running: Dict[Future, Activation] = {}
        deadline = self.deadline
        limited = limits.graph_limits(self.graph)
        counts = limits.RunLimits()
        keys: Dict[Future, str] = {}  # the concurrency key of each running limited node
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"flowcraft-{self.run_id[:8]}")
        try:
            while ready or running:
                if deadline is not None and deadline.due():
                    return self._expire(running.values(), ready)
                while ready and len(running) < self.concurrency and not self._stopping() and not self._pausing():
                    if not limited:
                        activation = ready.popleft()
                        running[pool.submit(self._execute, activation)] = activation
                        continue
                    admitted = self._admit(ready, limited, counts)
                    if admitted is None:
                        break  # every ready node waits for its key
                    activation, key = admitted
                    future = pool.submit(self._execute, activation)
                    running[future] = activation
                    if key is not None:
                        keys[future] = key
                if not running:
                    if self._settle(ready):
                        continue
                    break
                timeout = None if deadline is None else max(0.0, deadline.remaining())
                done, _ = wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
                for future in done:
                    if future in keys:
                        counts.leave(keys.pop(future))
                    self._finish(running.pop(future), future.result(), ready)
        finally:
            # past a deadline the nodes still running are left to finish on their own (a thread
            # cannot be killed; their token is set and their results are discarded)
            pool.shutdown(wait=deadline is None or not deadline.expired, cancel_futures=True)

    def _admit(self, ready: Deque[Activation], limited: Mapping[str, "limits.Limit"], counts: "limits.RunLimits"
               ) -> Optional[Tuple[Activation, Optional[str]]]:
        """The first ready activation whose concurrency key (if any) is under its limit, taken out
        of `ready`, with its key; None when every one waits. A key that cannot be had fails its node."""
        for index, activation in enumerate(ready):
            limit = limited.get(activation.node_id) if activation.parent is None else None
            if limit is None:
                del ready[index]
                return activation, None
            try:
                key = self._key(activation, limit)
            except limits.ConcurrencyKeyError as error:
                del ready[index]
                self._finish(activation, NodeFailure(activation.node_id, error), ready)
                return self._admit(ready, limited, counts) if not self._stopping() else None
            if counts.admit(limit, key):
                del ready[index]
                return activation, key
        return None

    def _key(self, activation: Activation, limit: "limits.Limit") -> str:
        """The concurrency key of a node's activation (raises `ConcurrencyKeyError`)."""
        node = self.graph.nodes[activation.node_id]
        node_input = activation.input if activation.has_input and node.inputs is None else self._input(node, activation)
        return limit.key(self.data.get, node_input)

    def _expire(self, running: Iterable[Activation], ready: Iterable[Activation]) -> None:
        """The run's deadline passed: it fails with `DeadlineExceeded` naming what was left."""
        assert self.deadline is not None
        error = self.deadline.expire([a.node_id if a.parent is None else a.parent for a in running],
                                     [a.node_id if a.parent is None else a.parent for a in ready] + list(self.awaiting))
        if error is None:
            return
        self.data = dict(self.data)  # the result's context: what late node code writes is not in it
        self.errors.append(error)
        self.emit_event(deadlines.DEADLINE_EVENT, {"message": error.message, "deadline_at": self.deadline.at})

    # --- one node ------------------------------------------------------------------------------

    def _execute(self, activation: Activation) -> Any:
        """Run one activation; return its `NodeResult`, or a `NodeFailure`."""
        recorded = self.recorded
        if recorded is not None and activation.parent is None and activation.node_id in recorded:
            return recorded[activation.node_id]  # time travel: a node whose result is taken from a record
        node = self.graph.nodes[activation.node_id] if activation.parent is None else self._dynamic_node(activation)
        impl = self.impls.get(node.uses)
        if impl is None:
            impl = self._impl(node)  # a built-in
            if impl is None:
                return NodeFailure(node.id, UnknownNodeError(f"node {node.id!r} uses {node.uses!r}, which is not in the registry"))
        # the common input inline: a value handed on by the predecessor (see `_input`)
        node_input = activation.input if activation.has_input and node.inputs is None else self._input(node, activation)
        ctx = NodeContext(
            self.context, node_input, node.params, self.dependencies, node.id, self.run_id, 1,
            "", self.cancel, self.blueprint_id, activation.iteration, self.traceparent,
        )
        emit = self.emit
        if emit is not None:
            emit("node:start", {"node_id": node.id, "input": node_input, "iteration": activation.iteration,
                                "stored_input": node.inputs is None and activation.has_input and activation.parent is None})
        try:
            if node.plain and not self.runtime.middleware and not isinstance(impl, type):
                try:  # the plain function node, called directly
                    value = impl(ctx)
                except Exception as error:
                    raise NodeFailure(node.id, error) from error
                if type(value) is NodeResult:
                    return value
                return NodeResult(output=value) if value is not None and not isinstance(value, NodeResult) else to_result(value)
            return self.runner.run(node, impl, ctx)
        except NodeFailure as failure:
            if not node.config.fallback:
                return failure
            fallback = self.graph.nodes.get(node.config.fallback)
            return self.runner.fall_back(node, ctx, failure, fallback, self._impl(fallback) if fallback else None)
        except Exception as error:  # middleware, or a bug outside the node's own code
            return NodeFailure(node.id, error)

    def _impl(self, node: GraphNode) -> Any:
        return resolve_impl(self.registry, node, self)

    def _dynamic_node(self, activation: Activation) -> GraphNode:
        spec = activation.definition or {}
        return GraphNode(NodeDefinition(
            id=activation.node_id, uses=spec.get("uses", ""), params=spec.get("params"), inputs=spec.get("inputs"),
        ))

    def _input(self, node: GraphNode, activation: Activation) -> Any:
        inputs = node.inputs
        if inputs is None:
            if activation.parent is not None:
                return activation.input
            if activation.has_input:  # stored when it was scheduled (`outcome.store_inputs`)
                return activation.input
            return self.data.get(node.inputs_key)  # a subflow child's start node: its parent's input
        data = self.data
        if isinstance(inputs, str):
            return input_value(inputs, data.get, data.__contains__)
        return {name: input_value(key, data.get, data.__contains__) for name, key in inputs.items()}

    def _finish(self, activation: Activation, outcome: Any, ready: Deque[Activation]) -> None:
        if activation.parent is not None:
            return self._finish_item(activation, outcome, ready)
        node = self.graph.nodes[activation.node_id]
        if type(outcome) is NodeResult and outcome.dynamic_nodes is None and type(outcome.output) is not Await:
            return self._complete(node, activation, outcome, ready)
        if type(outcome) is NodeFailure:
            return self._fail(node, outcome.cause)
        if type(outcome) is FallbackResult:
            return self._complete(node, activation, outcome, ready)
        if type(outcome.output) is Await:
            return self._pause(node, activation, outcome.output)
        if outcome.dynamic_nodes is not None:
            return self._expand(node, activation, outcome.dynamic_nodes, ready)
        self._complete(node, activation, outcome, ready)

    def _complete(self, node: GraphNode, activation: Activation, outcome: Any, ready: Deque[Activation]) -> None:
        try:
            done = outcome_of.complete(self.graph, self.traversal, self.data, node, activation.iteration, outcome,
                                       self.runtime.max_value_bytes, self.context.charge_output)
        except (SerializationError, RoutingError, LoopLimitError) as error:
            return self._fail(node, error)
        _, _, newly_ready, skipped = done
        if newly_ready:
            ready.extend(newly_ready)
        if skipped:
            self.skipped.extend(skipped)
        if self.emit is not None:
            for kind, payload in outcome_of.completion_events(node, done):
                self.emit(kind, payload)

    def _pause(self, node: GraphNode, activation: Activation, pause: Await) -> None:
        self.awaiting[node.id] = dict(pause.details, iteration=activation.iteration)
        if pause.child_context is not None:
            self.child_contexts[node.id] = pause.child_context
        self.emit_event("workflow:pause", {"node_id": node.id, "details": pause.details})

    def _expand(self, node: GraphNode, activation: Activation, specs: List[Dict[str, Any]], ready: Deque[Activation]) -> None:
        """Run a node's dynamic nodes (a batch's items); the node completes when the last one does."""
        if not specs:
            return self._complete(node, activation, NodeResult(output=[]), ready)
        self.batches[node.id] = [None] * len(specs)
        self.traversal.expand(node.id, len(specs))
        self.emit_event("batch:start", {"node_id": node.id, "items": len(specs)})
        iteration = activation.iteration
        ready.extend(
            Activation(spec.get("id") or f"{node.id}.{i}", iteration, spec.get("input"), True, node.id, i, spec)
            for i, spec in enumerate(specs)
        )

    def _finish_item(self, activation: Activation, outcome: Any, ready: Deque[Activation]) -> None:
        assert activation.parent is not None  # only a batch item's activation is finished here
        parent = self.graph.nodes[activation.parent]
        if type(outcome) is NodeFailure:
            self.traversal.item_done(parent.id)
            return self._fail(parent, item_failure(activation.index, activation.node_id, outcome.cause))
        results = self.batches[parent.id]
        try:
            check_json(outcome.output, f"{activation.node_id}", self.runtime.max_value_bytes)
        except SerializationError as error:
            self.traversal.item_done(parent.id)
            return self._fail(parent, error)
        results[activation.index] = outcome.output
        if self.traversal.item_done(parent.id) and not self._stopping():
            del self.batches[parent.id]
            self.emit_event("batch:finish", {"node_id": parent.id, "items": len(results)})
            self._complete(parent, Activation(parent.id, activation.iteration), NodeResult(output=results), ready)

    def resume_node(self, node_id: str, output: Any, action: Optional[str]) -> List[Activation]:
        """Complete an awaiting node (a resume); return the activations that became ready."""
        details = self.awaiting.pop(node_id)
        node = self.graph.nodes[node_id]
        activation = Activation(node_id, int(details.get("iteration", 0)))
        kind = details.get("type")
        if kind == "sleep" and not _due(details):
            self.awaiting[node_id] = details  # resumed before its wake-up time: keeps waiting
            return []
        if kind == "sleep" and output is None:
            output = self.data.get(node.inputs_key)  # a timer passes its input through
        if kind == "subflow":
            outcome = self._resume_subflow(node, details, output, action)
        else:
            outcome = NodeResult(output=output, action=action)
        ready: Deque[Activation] = deque()
        self._finish(activation, outcome, ready)
        return list(ready)

    def _resume_subflow(self, node: GraphNode, details: Dict[str, Any], output: Any, action: Optional[str]) -> Any:
        ctx = NodeContext(self.context, None, node.params, self.runtime.dependencies, node.id, self.run_id)
        # contexts saved before the child's context moved to the traversal snapshot kept it in the details
        child_context = self.child_contexts.pop(node.id, None) or details.get("childContext")
        try:
            if child_context is None:
                raise ValueError(f"subflow {node.id!r}: the saved run holds no context of its awaiting child")
            child = self.runtime.resume(details["blueprintId"], child_context, output=output, action=action,
                                        registry=self.registry, run_id=details.get("childRunId"),
                                        _subflow_depth=self.depth + 1)
            return to_result(finish_subflow(ctx, child, self))
        except Exception as error:
            return NodeFailure(node.id, error)

    # --- the engine view built-ins use ---------------------------------------------------------

    def laps(self, node_id: str) -> int:
        return self.traversal.state(node_id).laps

    def exit_conditions(self, node_id: str) -> List[Callable[[Mapping[str, Any]], Any]]:
        return self.graph.exit_conditions(node_id)

    def context_names(self) -> Mapping[str, Any]:
        return self.data

    def child_blueprint(self, blueprint_id: str) -> WorkflowBlueprint:
        return self.runtime.blueprint(blueprint_id)

    def run_child(
        self, blueprint_id: str, context: Dict[str, Any], parent_node_id: str, iteration: int = 0
    ) -> WorkflowResult:
        limit = self.runtime.max_subflow_depth
        if limit is not None and self.depth + 1 > limit:
            raise subflow_depth_error(parent_node_id, self.depth + 1, limit)
        return self.runtime.run(blueprint_id, context, registry=self.registry, cancel=self.cancel,
                                run_id=child_run_id(self.run_id, parent_node_id, iteration),
                                wait_timers=self.wait_timers, _subflow_depth=self.depth + 1)

    def _fail(self, node: GraphNode, error: BaseException) -> None:
        failure, event = outcome_of.fail(self.traversal, node, error)
        self.errors.append(failure)
        self.emit_event("node:error", event)
        logger.debug("run %s: node %s failed: %s", self.run_id, node.id, error)

    # --- the outcome ---------------------------------------------------------------------------

    def _result(self) -> WorkflowResult:
        stalled: List[str] = []
        if self.errors and any(e.type != "CancelledError" for e in self.errors):
            status = FAILED
        elif self.cancel.cancelled:
            status = CANCELLED
        elif self.awaiting:
            status = AWAITING
        else:
            stalled = self.traversal.unfinished()
            status = STALLED if stalled else COMPLETED
        if status == STALLED:
            self.emit_event("workflow:stall", {"stalled": stalled})
        elif status in (FAILED, CANCELLED):
            outcome_of.drop_unstarted_inputs(self.data, self.traversal.states, self.awaiting)
        if status == AWAITING:
            self.data[AWAITING_IDS_KEY] = list(self.awaiting)
            self.data[AWAITING_DETAILS_KEY] = self.awaiting
        elif AWAITING_IDS_KEY in self.data:
            del self.data[AWAITING_IDS_KEY]
            self.data.pop(AWAITING_DETAILS_KEY, None)
        result = WorkflowResult(
            status=status, context=self.data, errors=self.errors, run_id=self.run_id, awaiting=list(self.awaiting),
            skipped=self.skipped, stalled=stalled, dumps=self.runtime.serializer.dumps,
        )
        if status == AWAITING:
            snapshot = dict(self.traversal.snapshot(), runId=self.run_id)
            if self.deadline is not None:  # a resume past it fails the run
                snapshot.update(self.deadline.snapshot_fields())
            children = {n: c for n, c in self.child_contexts.items() if n in self.awaiting}
            if children:
                snapshot[CHILD_CONTEXTS_KEY] = children
            result._serialized = self.runtime.serializer.dumps({**self.data, TRAVERSAL_KEY: snapshot})
        self.emit_event("workflow:finish", {"status": status, "errors": [e.to_dict() for e in self.errors]})
        if self.runtime.middleware and status != AWAITING:
            call_hooks(self.runtime.middleware, "run_finished", self.run_id, self.blueprint_id, status)
        return result


def _close(key: str, known: Mapping[str, Any]) -> str:
    """`; did you mean 'x'?` for the registry key closest to a misspelt one, else nothing."""
    try:
        keys = [k for k in known if isinstance(k, str)]
    except Exception:  # a registry that cannot be listed
        return ""
    match = difflib.get_close_matches(key, keys, n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def awaiting_node(awaiting: Mapping[str, Any], node_id: Optional[str]) -> str:
    """The awaiting node a resume completes: `node_id`, or the only one awaiting; `ValueError`
    saying what to pass when that is ambiguous or `node_id` does not await."""
    if node_id is None:
        if len(awaiting) == 1:
            return next(iter(awaiting))
        raise ValueError(f"{len(awaiting)} nodes await {sorted(awaiting)}: say which with node_id= "
                         f"(flowcraft resume --node ID)")
    if node_id not in awaiting:
        raise ValueError(f"node {node_id!r} is not awaiting: give one of {sorted(awaiting)} as node_id= "
                         f"(flowcraft resume --node ID)")
    return node_id


def _due(details: Mapping[str, Any]) -> bool:
    wake_at = details.get("wake_at")
    if not wake_at:
        return True
    return utc_now() >= _dt.datetime.fromisoformat(wake_at)


__all__ = ["FlowRuntime", "FlowcraftError"]
