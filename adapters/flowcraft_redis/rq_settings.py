"""The settings an `RqAdapter` puts on its RQ jobs, and small RQ helpers shared by its modules.

An RQ job carries the settings of the adapter that enqueued it in ``meta["flowcraft"]`` (key
prefix, state TTL, retry mode, RQ job options), so that every worker, whatever its own options,
commits to the right run store and makes the successor RQ jobs the same way.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, NoReturn, Optional, Tuple

import attrs

from .keys import validate_prefix

META_KEY = "flowcraft"
DEAD_LETTER_META_KEY = "flowcraft_dead_letter"
QUEUE_META_KEY = "flowcraft_queue"  # on a routed job: the enqueuer's default queue (absent: the job's origin)
DEFAULT_RETRY_INTERVALS = (1, 5, 30, 60, 300)
DEFAULT_RESULT_TTL = 60
RETRY_MODES = ("in-process", "queue")
_MAX_RETRY_INTERVALS = 25


class DeadLettered(Exception):
    """Raised by the RQ job function for a dead-lettered job: RQ files it as failed, never retries it."""


class NodeFailed(Exception):
    """Raised by the RQ job function once a node's failure is committed: RQ files the RQ job as
    failed (``rq info`` counts it; its exc_info holds the node's traceback) and never retries it
    (the core's retries were spent already)."""


def fail_rq_job(rq_job: Any, description: str) -> NoReturn:
    rq_job.retries_left = 0
    raise NodeFailed(description)


def dead_letter_rq_job(rq_job: Any, reason: str) -> NoReturn:
    """End the running RQ job as a dead letter: failed with `reason`, RQ retries turned off."""
    rq_job.retries_left = 0  # the worker decides on a retry from this very object
    rq_job.meta[DEAD_LETTER_META_KEY] = reason
    rq_job.save_meta()
    raise DeadLettered(reason)


def due_score(timestamp: float) -> str:
    """The scheduled registry score of a job due at `timestamp`: rounded UP to the millisecond.
    RQ's own scheduler compares scores with the whole second (``int(now)``), so it never moves a job
    early (at most a second late); `rq_worker.promote_due_jobs` compares them with the time itself."""
    return f"{math.ceil(timestamp * 1000) / 1000:.3f}"


def retry_interval(delay: float) -> int:
    """The `rq.Retry` interval (whole seconds) that never re-runs a job before `delay` seconds:
    RQ schedules ``now + interval`` truncated to the second, so one second is added."""
    return 0 if delay <= 0 else int(math.ceil(delay)) + 1


def _int_tuple(values: Iterable[int]) -> Tuple[int, ...]:
    return tuple(values)


def _whole(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, not {value!r}")
    return value


@attrs.frozen
class RqSettings:
    """Where a job's run lives and how its RQ jobs are made: the settings of the adapter that
    enqueued it, carried in the RQ job's ``meta["flowcraft"]`` so that every worker follows them.

    `result_ttl`: seconds RQ keeps a finished job (its hash, its None result, its entry in the
    FinishedJobRegistry). 0 deletes it at once, which RQ 2.12 does with about nine more Redis round
    trips per job than an expiry; the default keeps it a minute."""

    prefix: str = ""
    state_ttl_seconds: int = 86400
    retry_mode: str = "in-process"
    job_timeout: int = -1
    failure_ttl: Optional[int] = None
    result_ttl: int = DEFAULT_RESULT_TTL
    retry_intervals: Tuple[int, ...] = attrs.field(default=DEFAULT_RETRY_INTERVALS, converter=_int_tuple)

    def __attrs_post_init__(self) -> None:
        validate_prefix(self.prefix)
        _whole("state_ttl_seconds", self.state_ttl_seconds, 0)
        if self.retry_mode not in RETRY_MODES:
            raise ValueError(f"retry_mode must be one of {RETRY_MODES}, not {self.retry_mode!r}")
        if self.job_timeout != -1:
            _whole("job_timeout (-1 = none)", self.job_timeout, 1)
        if self.failure_ttl is not None:
            _whole("failure_ttl", self.failure_ttl, 1)
        _whole("result_ttl", self.result_ttl, 0)
        if len(self.retry_intervals) > _MAX_RETRY_INTERVALS:
            raise ValueError(f"at most {_MAX_RETRY_INTERVALS} retry intervals, not {len(self.retry_intervals)}")
        for interval in self.retry_intervals:
            _whole("a retry interval", interval, 0)

    @property
    def effective_failure_ttl(self) -> Optional[int]:
        """How long RQ keeps a failed job: `failure_ttl`, else the state TTL (0 = RQ's default)."""
        return self.failure_ttl if self.failure_ttl is not None else (self.state_ttl_seconds or None)

    def to_meta(self) -> Dict[str, Any]:
        return {"prefix": self.prefix, "state_ttl_seconds": self.state_ttl_seconds, "retry_mode": self.retry_mode,
                "job_timeout": self.job_timeout, "failure_ttl": self.failure_ttl, "result_ttl": self.result_ttl,
                "retry_intervals": list(self.retry_intervals)}

    @classmethod
    def from_meta(cls, meta: Any) -> "RqSettings":
        """The settings in an RQ job's meta (defaults when it has none); ValueError when invalid."""
        data = (meta or {}).get(META_KEY) if isinstance(meta, dict) else None
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"must be an object, not {type(data).__name__}")
        unknown = sorted(set(data) - set(attrs.fields_dict(cls)))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}")
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(str(error)) from None

    def adapter_options(self) -> Dict[str, Any]:
        """These settings as `RqAdapter` keyword arguments."""
        return {"state_ttl_seconds": self.state_ttl_seconds, "retry_mode": self.retry_mode, "prefix": self.prefix,
                "job_timeout": self.job_timeout, "failure_ttl": self.failure_ttl, "result_ttl": self.result_ttl,
                "retry_intervals": self.retry_intervals}


__all__ = ["DEFAULT_RESULT_TTL", "DEFAULT_RETRY_INTERVALS", "DEAD_LETTER_META_KEY", "DeadLettered", "META_KEY", "QUEUE_META_KEY",
           "RETRY_MODES", "RqSettings", "dead_letter_rq_job", "due_score", "retry_interval"]
