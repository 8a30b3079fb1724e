"""The function RQ workers call for Flowcraft jobs: ``flowcraft_redis.rq_jobs.run_node``.

Every RQ job of `RqAdapter` is ``run_node(<job JSON>)`` (serialized with RQ's `JSONSerializer`),
so RQ's command line runs Flowcraft jobs; with our worker class, which runs nothing else:

    FLOWCRAFT_APP=myapp.workflows:runtime rq worker -w flowcraft_redis.rq_worker.FlowcraftWorker \\
        --serializer rq.serializers.JSONSerializer --with-scheduler flowcraft-queue

`run_node` needs the app's `FlowRuntime` (registry and blueprints); it finds it in one of two ways:

- inside `RqAdapter.work()`, the adapter running the worker is bound to the job while it runs;
- inside any other RQ worker, the environment variable ``FLOWCRAFT_APP=module:attr`` names the
  runtime (the same forms as ``flowcraft --app``: a `FlowRuntime`, a `Flow`, a registry, or a
  callable returning one). An `RqAdapter` is built on the worker's Redis connection, with the
  settings the job carries in ``meta["flowcraft"]`` (key prefix, state TTL, retry mode... of the
  adapter that enqueued it) and the default queue of that adapter (``meta["flowcraft_queue"]`` on a
  routed job, else the job's queue), once per process: it is cached by (app, queue, settings,
  connection).
  With the forking ``rq.worker.Worker`` every job runs in a fresh work horse, so the cache does not
  outlive the job; ``rq.worker.SimpleWorker`` (and `FlowcraftWorker`, a SimpleWorker) keeps it (and
  is much faster for short nodes). RQ's own classes also run any other job of the queue.
"""
from __future__ import annotations

import contextvars
import os
import threading
from typing import Any, Dict, Tuple

APP_ENV = "FLOWCRAFT_APP"

_BOUND: contextvars.ContextVar = contextvars.ContextVar("flowcraft_rq_adapter", default=None)
_CACHE: Dict[Tuple[Any, ...], Any] = {}
_CACHE_LOCK = threading.Lock()


class AppNotConfigured(RuntimeError):
    """A worker has no Flowcraft app: the job fails, RQ retries it, nothing is dead-lettered."""


def run_node(body: Any = None) -> Any:
    """Execute one Flowcraft job (the RQ job function). Returns None, or an `rq.Retry` when the
    node asked to be retried through the queue (``retry_mode="queue"``)."""
    from rq import get_current_job

    rq_job = get_current_job()
    if rq_job is None:
        raise RuntimeError("flowcraft_redis.rq_jobs.run_node runs inside an RQ worker only")
    return adapter_for(rq_job).run_rq_job(rq_job, body)


def bind(adapter: Any) -> contextvars.Token:
    """Make `adapter` run the jobs of this thread until `unbind` (used by `RqAdapter.work`)."""
    return _BOUND.set(adapter)


def unbind(token: contextvars.Token) -> None:
    _BOUND.reset(token)


def adapter_for(rq_job: Any) -> Any:
    """The `RqAdapter` that runs `rq_job`: the bound one, else one built from ``FLOWCRAFT_APP``."""
    from .keys import queue_name_problem
    from .rq_settings import QUEUE_META_KEY, RqSettings, dead_letter_rq_job

    try:
        settings = RqSettings.from_meta(rq_job.meta)
    except ValueError as error:
        dead_letter_rq_job(rq_job, f"malformed job: meta['flowcraft'] is invalid: {error}")
    # the enqueuer's default queue: a routed job's origin is the queue it was routed to
    queue_name = rq_job.meta.get(QUEUE_META_KEY, rq_job.origin) if isinstance(rq_job.meta, dict) else rq_job.origin
    problem = queue_name_problem(queue_name)
    if problem is not None:
        dead_letter_rq_job(rq_job, f"malformed job: meta[{QUEUE_META_KEY!r}] is invalid: {problem}")
    bound = _BOUND.get()
    if bound is not None:
        return bound.with_settings(queue_name, settings)
    spec = os.environ.get(APP_ENV, "").strip()
    if not spec:
        raise AppNotConfigured(f"set {APP_ENV}=module:attr (a FlowRuntime) in the environment of the RQ worker "
                               f"that runs Flowcraft jobs")
    connection = rq_job.connection
    key = (spec, queue_name, settings, id(connection))
    with _CACHE_LOCK:
        adapter = _CACHE.get(key)
        if adapter is None:
            adapter = _CACHE[key] = _build(spec, queue_name, settings, connection)
    return adapter


def _build(spec: str, queue_name: str, settings: Any, connection: Any) -> Any:
    from flowcraft.cli.inputs import load_app

    from .rq_adapter import RqAdapter

    try:
        runtime = load_app(spec)
    except Exception as error:  # CliError: a bad spec, an import error in the app module...
        raise AppNotConfigured(f"{APP_ENV}={spec!r}: {error}") from None
    return RqAdapter(runtime, connection, queue_name, **settings.adapter_options())


def clear_cache() -> None:
    """Forget the adapters built from ``FLOWCRAFT_APP`` (for tests)."""
    with _CACHE_LOCK:
        _CACHE.clear()


__all__ = ["APP_ENV", "AppNotConfigured", "adapter_for", "bind", "clear_cache", "run_node", "unbind"]
