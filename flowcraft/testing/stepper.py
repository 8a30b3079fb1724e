"""`Stepper`: run a blueprint one wave of ready nodes at a time, inspecting the state in between,
stepping back (`prev`) or starting over (`reset`) without running node code again."""
from __future__ import annotations

import copy
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Deque, List, Mapping, Optional, Tuple

from ..graph import Activation
from ..result import WorkflowResult


# what a step changes in a run, saved before each step (the graph and the registry are shared)
_SAVED = ("data", "traversal", "awaiting", "child_contexts", "batches", "errors", "skipped")


class Stepper:
    """`step()` runs every node that is ready now and returns their ids; `done` once nothing is left;
    `prev()` undoes the last step and `reset()` every step (as TS's stepper `prev()` / `reset()`)."""

    def __init__(
        self, runtime: Any, blueprint: Any, initial_context: Optional[Mapping[str, Any]] = None,
        *, registry: Optional[Mapping[str, Any]] = None, run_id: Optional[str] = None,
    ) -> None:
        from ..runtime import _Run, new_run_id

        graph = runtime.graph(blueprint)
        self._run = _Run(runtime, graph, dict(initial_context or {}), runtime._registry_for(registry),
                         run_id or new_run_id(), None, 1)
        self._ready: Deque[Activation] = deque(self._run.traversal.start())
        self.steps = 0
        self._history: List[Tuple[Any, ...]] = []  # the state before each step taken, oldest first

    @property
    def ready(self) -> List[str]:
        """The ids of the nodes the next step will run."""
        return [a.node_id for a in self._ready]

    @property
    def context(self) -> Mapping[str, Any]:
        return self._run.data

    @property
    def done(self) -> bool:
        """Nothing is left to run and the run does not await (as TS's `isDone()`, false while a
        node awaits), or the run is stopping (failed, cancelled)."""
        if not self._ready:
            self._run._settle(self._ready)
        if self._run._stopping():
            return True
        return not self._ready and not self._run.awaiting

    def step(self, concurrency: Optional[int] = None) -> List[str]:
        """Run the ready nodes, up to `concurrency` of them at once on threads (default: one after
        the other); their outcomes are applied in the order they were ready, so the state after a
        step does not depend on which node finished first."""
        self._history.append(self._save())
        wave, self._ready = self._ready, deque()
        run = self._run
        if concurrency is not None and concurrency > 1 and len(wave) > 1:
            with ThreadPoolExecutor(min(concurrency, len(wave)), thread_name_prefix="flowcraft-stepper") as pool:
                outcomes = list(pool.map(run._execute, wave))
            for activation, outcome in zip(wave, outcomes):
                if run._stopping():
                    break
                run._finish(activation, outcome, self._ready)
        else:
            for activation in wave:
                if run._stopping():
                    break
                run._finish(activation, run._execute(activation), self._ready)
        self.steps += 1
        return [a.node_id for a in wave]

    def prev(self) -> List[str]:
        """Undo the last step (its context writes, node states, errors); return the ids of the nodes
        it ran, ready again; [] when no step was taken. Node code is not run again."""
        if not self._history:
            return []
        self._restore(self._history.pop())
        self.steps -= 1
        return self.ready

    def reset(self) -> None:
        """Back to the state before the first step."""
        if self._history:
            self._restore(self._history[0])
            self._history.clear()
            self.steps = 0

    def _save(self) -> Tuple[Any, ...]:
        run = self._run
        memo = {id(run.graph): run.graph}
        context = run.context
        saved = copy.deepcopy(tuple(getattr(run, name) for name in _SAVED) + (self._ready,), memo)
        return saved + (dict(context._sizes), context._total)

    def _restore(self, saved: Tuple[Any, ...]) -> None:
        run = self._run
        *fields, ready, sizes, total = saved
        memo = {id(run.graph): run.graph}
        fields = copy.deepcopy(fields, memo)  # the history keeps its own copy: prev() can be called again
        for name, value in zip(_SAVED, fields):
            setattr(run, name, value)
        run.context.data = run.data
        run.context._sizes, run.context._total = dict(sizes), total
        self._ready = copy.deepcopy(ready, memo)

    def run_to_end(self) -> WorkflowResult:
        while not self.done and self._ready:  # an awaiting run is not done, and has nothing to step
            self.step()
        return self.result()

    def result(self) -> WorkflowResult:
        return self._run._result()
