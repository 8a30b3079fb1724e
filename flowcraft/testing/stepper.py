"""`Stepper`: run a blueprint one wave of ready nodes at a time, inspecting the state in between."""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, List, Mapping, Optional

from ..graph import Activation
from ..result import WorkflowResult


class Stepper:
    """`step()` runs every node that is ready now and returns their ids; `done` once nothing is left."""

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

    def step(self) -> List[str]:
        wave, self._ready = self._ready, deque()
        for activation in wave:
            if self._run._stopping():
                break
            self._run._finish(activation, self._run._execute(activation), self._ready)
        self.steps += 1
        return [a.node_id for a in wave]

    def run_to_end(self) -> WorkflowResult:
        while not self.done and self._ready:  # an awaiting run is not done, and has nothing to step
            self.step()
        return self.result()

    def result(self) -> WorkflowResult:
        return self._run._result()
