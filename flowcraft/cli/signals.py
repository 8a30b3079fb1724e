"""SIGTERM/SIGINT handling for the long-running commands: the first signal asks for a graceful stop,
a second one forces it."""
from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable, List, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ForcedStop(BaseException):
    """A second stop signal arrived: stop now. A `BaseException`, like `KeyboardInterrupt`, so no
    `except Exception` in node or worker code takes it for a node failure."""


class StopSignals:
    """While installed (as a context manager), the first SIGTERM or SIGINT calls `on_stop` and sets
    `stopping`; a second raises `ForcedStop` in the main thread.

    `on_stop` runs on a short-lived thread, not in the handler itself: the handler interrupts the
    main thread at any bytecode, maybe while it holds the very lock `on_stop` needs (an `Event`'s),
    which would deadlock."""

    def __init__(self, on_stop: Optional[Callable[[], Any]] = None) -> None:
        self.on_stop = on_stop
        self.received: List[int] = []
        self._previous: dict = {}

    @property
    def stopping(self) -> bool:
        return bool(self.received)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal.signal needs the main thread
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            raise ForcedStop(signal.Signals(signum).name)
        if self.on_stop is not None:
            helper = threading.Thread(target=self.on_stop, name="flowcraft-stop", daemon=True)
            helper.start()
            # Usually done at once, so the stop is in effect before the interrupted code goes on; if
            # the main thread holds the lock it needs, it finishes as soon as that is released.
            helper.join(0.5)

    def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`, returning early (True) once a stop signal arrived."""
        deadline = time.monotonic() + seconds
        while not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 0.1))
        return True
