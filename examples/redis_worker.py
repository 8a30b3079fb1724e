"""A Flowcraft worker on Redis: the worker side of the BullMQ seed, in Python.

It runs the order-fulfilment workflow of `workflows.py`; start `redis_client.py` to give it runs.
Start as many workers as you like: they share the queue (and a run's fan-out) between them.

    python examples/redis_worker.py                  # works until Ctrl-C or SIGTERM
    python examples/redis_worker.py --burst          # stops once the queue is empty
    python examples/redis_worker.py --latency 0.5    # every node takes 0.5 s longer (to watch it)

Ctrl-C or SIGTERM stops it gracefully: the job in hand is finished, committed and acknowledged.
A worker killed outright (SIGKILL) loses nothing either: its jobs go back to the queue once its
heartbeat expires, and another worker takes them.

Settings (environment): REDIS_URL (default redis://127.0.0.1:6379/0), FLOWCRAFT_QUEUE (default
flowcraft-queue) and FLOWCRAFT_PREFIX (a key prefix, default none: the seed's key names).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

if __package__ in (None, ""):  # run as `python examples/redis_worker.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowcraft_redis import RedisAdapter  # noqa: E402

from examples.workflows import make_runtime, serve  # noqa: E402

logger = logging.getLogger("examples.redis_worker")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def settings() -> Dict[str, str]:
    """Connection settings from the environment; the defaults suit a local Redis."""
    return {"url": os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL,
            "queue_name": os.environ.get("FLOWCRAFT_QUEUE") or "flowcraft-queue",
            "prefix": os.environ.get("FLOWCRAFT_PREFIX", "")}


def open_adapter(runtime: Any, **options: Any) -> RedisAdapter:
    """The adapter worker and client both use: one Redis holds the queue, the runs and the
    coordination keys."""
    config = settings()
    return RedisAdapter(runtime, config["url"], queue_name=config["queue_name"], prefix=config["prefix"], **options)


def main(argv: Optional[Sequence[str]] = None) -> Optional[int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="stop once the queue is empty")
    parser.add_argument("--latency", type=float, default=0.0, metavar="SECONDS",
                        help="make every node take this much longer (default: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    # 1. The blueprints and the registry (shared with the client), in a runtime.
    runtime = make_runtime(latency=args.latency)
    # 2. The adapter: a reliable Redis list as the queue, the context in the seed's hash
    #    `workflow:state:<runId>`, coordination in Redis too.
    adapter = open_adapter(runtime)
    logger.info("worker %d on Redis queue %r (key prefix %r)%s", os.getpid(), settings()["queue_name"],
                settings()["prefix"], ", burst" if args.burst else "")
    # 3. Process jobs.
    try:
        processed = serve(adapter, args.burst)
    finally:
        adapter.close()
    logger.info("worker %d stopped%s", os.getpid(), "" if processed is None else f" after {processed} job(s)")
    return processed


if __name__ == "__main__":
    main()
