"""Cooperative cancellation: a token set from any thread and checked by the engine and node code."""
from __future__ import annotations

import threading
import time
from typing import Optional

from .errors import CancelledError


class CancelToken:
    """`cancel()` from any thread; the engine starts no new node once it is set."""

    __slots__ = ("_flag", "_event", "reason")

    def __init__(self) -> None:
        self._flag = False  # a plain flag: reads are cheap and atomic; the Event exists only for wait()
        self._event: Optional[threading.Event] = None
        self.reason = ""

    @property
    def cancelled(self) -> bool:
        return self._flag

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._flag = True
        event = self._event
        if event is not None:
            event.set()

    def raise_if_cancelled(self) -> None:
        if self._flag:
            raise CancelledError(self.reason or "cancelled")

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds, waking early on cancel; True if cancelled."""
        if self._event is None:
            self._event = threading.Event()
        if self._flag:
            self._event.set()
        return self._event.wait(timeout) or self._flag

    def __repr__(self) -> str:
        return f"CancelToken(cancelled={self.cancelled})"


class ChildToken(CancelToken):
    """Cancelled on its own or when its `parent` is; cancelling it leaves the parent alone (a run's
    token under a deadline, a timed-out attempt's)."""

    __slots__ = ("parent",)

    def __init__(self, parent: Optional[CancelToken]) -> None:
        super().__init__()
        self.parent = parent

    @property
    def cancelled(self) -> bool:
        return self._flag or (self.parent is not None and self.parent.cancelled)

    def raise_if_cancelled(self) -> None:
        if self.parent is not None:
            self.parent.raise_if_cancelled()
        super().raise_if_cancelled()

    def wait(self, timeout: float) -> bool:
        """As `CancelToken.wait`; wakes at once on its own cancel, within 50 ms on the parent's."""
        end = time.monotonic() + timeout
        while not self.cancelled:
            left = end - time.monotonic()
            if left <= 0:
                return False
            super().wait(min(left, 0.05))
        return True
