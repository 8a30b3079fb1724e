"""Run a hostile case in a child Python process with a memory cap and a timeout.

Hostile-input tests feed the attacker's input in the child, so a case that hangs, recurses away or
exhausts memory fails the test with the child's output instead of taking the test session (or the
machine) down with it.

    result = run_bounded('''
        from flowcraft.evaluator import default_evaluator
        try:
            default_evaluator().compile("[[0]*100000]*100000 == [[0]*100000]*100000")({})
        except Exception as error:
            print("OK", type(error).__name__)
    ''', timeout=20, memory_mb=512)
    assert result.ok and "OK" in result.stdout, result.describe()
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Mapping, Optional

import attrs

ROOT = Path(__file__).resolve().parents[1]


@attrs.frozen
class BoundedResult:
    returncode: Optional[int]  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.returncode == 0

    def describe(self) -> str:
        state = "timed out" if self.timed_out else f"exit {self.returncode}"
        return (f"child {state} after {self.seconds:.1f}s\n--- stdout\n{self.stdout[-3000:]}"
                f"\n--- stderr\n{self.stderr[-3000:]}")


def _limit_memory(memory_mb: int) -> None:
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_bounded(code: str, *, timeout: float = 30.0, memory_mb: int = 768,
                env: Optional[Mapping[str, str]] = None) -> BoundedResult:
    """Run `code` (dedented) with `python -c` in a child limited to `memory_mb` of address space,
    killed after `timeout` seconds. The child imports this checkout's `flowcraft` and adapters."""
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "adapters"), child_env.get("PYTHONPATH", "")])
    child_env.update(env or {})
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(ROOT), env=child_env,
                              capture_output=True, text=True, timeout=timeout,
                              preexec_fn=lambda: _limit_memory(memory_mb))
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        err = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        return BoundedResult(None, out, err, time.monotonic() - started, True)
    return BoundedResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started, False)
