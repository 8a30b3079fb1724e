"""Fan-out / fan-in: one node feeds four independent branches, and a join combines them.

                 +--> load_profile ---------+
                 +--> load_orders ----------+
    fetch_user --+                          +--> build_dashboard
                 +--> load_recommendations -+
                 +--> load_notifications ---+

With `concurrency=4` the four branches run at the same time on a thread pool. The join
(`build_dashboard`) runs once all four have finished and receives a dict of
predecessor id -> output, in the order the edges were declared, whatever order they finished in.

    python examples/fan_out_fan_in.py
"""
from __future__ import annotations

import time

from flowcraft import NodeContext, create_flow

SLOW_CALL = 0.05  # seconds: each branch pretends to call a slow service


def fetch_user(ctx: NodeContext):
    return {"user_id": ctx.input, "name": "Ada"}


def load_profile(ctx: NodeContext):
    time.sleep(SLOW_CALL)
    return {"plan": "pro", "member_since": 2019}


def load_orders(ctx: NodeContext):
    time.sleep(SLOW_CALL)
    return [{"id": "O-17", "total": 42.0}, {"id": "O-18", "total": 13.5}]


def load_recommendations(ctx: NodeContext):
    time.sleep(SLOW_CALL)
    return ["desk lamp", "notebook"]


def load_notifications(ctx: NodeContext):
    time.sleep(SLOW_CALL)
    return {"unread": 3}


def build_dashboard(ctx: NodeContext):
    # The join's input maps each predecessor's node id to its output.
    parts = ctx.input
    user = ctx.context.get("fetch_user")  # any earlier output is also in the context
    return {
        "greeting": f"Hello {user['name']} ({parts['load_profile']['plan']})",
        "order_count": len(parts["load_orders"]),
        "recommendations": parts["load_recommendations"],
        "unread": parts["load_notifications"]["unread"],
        "sections": list(parts),
    }


BRANCHES = [load_profile, load_orders, load_recommendations, load_notifications]

flow = create_flow("dashboard").node("fetch_user", fetch_user, inputs="user_id")
for branch in BRANCHES:
    flow.node(branch.__name__, branch)
    flow.edge("fetch_user", branch.__name__)
    flow.edge(branch.__name__, "build_dashboard")
flow.node("build_dashboard", build_dashboard)


def main():
    started = time.perf_counter()
    result = flow.run(initial_context={"user_id": "u-1"}, concurrency=4)
    elapsed = time.perf_counter() - started
    dashboard = result.context["build_dashboard"]
    print(f"{result.status} in {elapsed:.2f}s (4 branches of {SLOW_CALL}s each, run side by side)")
    print(f"  {dashboard['greeting']}: {dashboard['order_count']} orders, {dashboard['unread']} unread")
    print(f"  joined sections: {', '.join(dashboard['sections'])}")
    return result


if __name__ == "__main__":
    main()
