"""A loop: page through a (fake) paginated API until there is no next page.

    fetch_page --> paginate --continue--> fetch_page
                      +--break--> report

`.loop(...)` adds the `paginate` controller node. Each time `fetch_page` finishes, the controller
evaluates its condition over the run's context: true -> run the loop body again, false -> leave
through the exit edge. It checks *before* each new lap (a while loop), and `max_iterations`
stops a runaway loop with a clear error instead of spinning forever. Nothing enters this loop, so
its body is the run's first node and the first page is always fetched; an edge into `paginate`
(`.edge("login", "paginate")`) would reach the controller and test the condition first.

    python examples/loop.py
"""
from __future__ import annotations

from flowcraft import NodeContext, create_flow

# A fake API: 23 users served 10 per page; each page names the cursor of the next one.
USERS = [f"user-{n:02d}" for n in range(1, 24)]
PAGE_SIZE = 10


def list_users(cursor):
    start = int(cursor or 0)
    end = start + PAGE_SIZE
    return {"items": USERS[start:end], "next_cursor": str(end) if end < len(USERS) else None}


def fetch_page(ctx: NodeContext):
    # The loop's state lives in the context, so the condition can see it and a paused or
    # distributed run keeps it: where we are (`cursor`) and what we have so far (`users`).
    page = list_users(ctx.context.get("cursor"))
    ctx.context.set("users", ctx.context.get("users", []) + page["items"])
    ctx.context.set("cursor", page["next_cursor"])
    pages = ctx.context.get("pages", 0) + 1
    ctx.context.set("pages", pages)
    return {"page": pages, "count": len(page["items"])}


def report(ctx: NodeContext):
    users = ctx.context.get("users")
    return {"total": len(users), "first": users[0], "last": users[-1]}


flow = (
    create_flow("list-all-users")
    .node("fetch_page", fetch_page)
    .loop("paginate", start_node_id="fetch_page", end_node_id="fetch_page",
          condition="cursor != null", max_iterations=100)
    .node("report", report)
    # Any edge out of the controller other than the loop-back is an exit edge.
    .edge("paginate", "report")
)


def main():
    result = flow.run()
    summary = result.context["report"]
    print(f"{result.status}: {summary['total']} users in {result.context['pages']} pages "
          f"({summary['first']} .. {summary['last']})")
    return result


if __name__ == "__main__":
    main()
