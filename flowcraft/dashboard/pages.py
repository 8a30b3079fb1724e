"""The dashboard's HTML pages, rendered on the server. Every value shown goes through `e()`
(html.escape); JSON inside a page goes through `script_json` (no `</script>` breakout)."""
from __future__ import annotations

import json
from html import escape
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence
from urllib.parse import quote, urlencode

from ..inspection import format_time
from .svg import STATES
from .views import RUN_STATUSES


def e(value: Any) -> str:
    """Text for HTML (element content or a quoted attribute)."""
    return escape("" if value is None else str(value), quote=True)


def script_json(value: Any) -> str:
    """JSON for inside a `<script type="application/json">`: `<`, `>` and `&` as \\u escapes."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def path_part(value: str) -> str:
    """A value as one URL path segment."""
    return quote(str(value), safe="")


def badge(status: Any, element_id: str = "") -> str:
    ident = f' id="{e(element_id)}"' if element_id else ""
    return f'<span class="badge b-{e(status)}"{ident}>{e(status)}</span>'


_NAV = (("/", "Overview"), ("/runs", "Runs"), ("/blueprints", "Blueprints"), ("/dead-letters", "Dead letters"))


def layout(title: str, body: str, *, here: str, read_only: bool, flash: Optional[Mapping[str, str]] = None) -> str:
    current = ' class="here"'
    nav = "".join(f'<a href="{href}"{current if href == here else ""}>{label}</a>' for href, label in _NAV)
    mode = '<span class="mode">read-only</span>' if read_only else ""
    note = ""
    if flash:
        kind = "err" if flash.get("kind") == "err" else "ok"
        note = f'<div class="flash {kind}" role="status">{e(flash.get("text"))}</div>'
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{e(title)} \u2014 Flowcraft</title><link rel="stylesheet" href="/static/app.css"></head>'
            f'<body><header><span class="brand">Flowcraft</span><nav>{nav}</nav>{mode}</header>'
            f'<main>{note}{body}</main><script src="/static/app.js"></script></body></html>')


def legend() -> str:
    items = "".join(f'<span><span class="sw {s}"></span>{s}</span>' for s in STATES)
    return (f'<div class="legend" aria-label="legend">{items}<span><span class="ln"></span>edge taken</span>'
            f'<span><span class="ln back"></span>loop / back edge</span></div>')


def _count(entry: Optional[Mapping[str, Any]]) -> str:
    if entry is None:
        return "?"
    return f'{entry["count"]}{"+" if entry.get("more") else ""}'


def runs_table(runs: Sequence[Mapping[str, Any]]) -> str:
    if not runs:
        return '<p class="muted">No runs.</p>'
    rows = "".join(
        f'<tr><td class="mono"><a href="/runs/{path_part(r["run_id"])}">{e(r["run_id"])}</a></td>'
        f'<td>{badge(r["status"])}</td><td>{e(r["blueprint_id"] or "-")}</td>'
        f'<td class="mono">{e(format_time(r["created_at"]))}</td><td class="mono">{e(format_time(r["updated_at"]))}</td>'
        f'<td>{e((r.get("error") or "")[:160])}</td></tr>' for r in runs)
    return (f'<table class="runs"><thead><tr><th>Run</th><th>Status</th><th>Blueprint</th><th>Created (UTC)</th>'
            f'<th>Updated (UTC)</th><th>Error</th></tr></thead><tbody>{rows}</tbody></table>')


def overview_page(data: Mapping[str, Any]) -> str:
    stats = "".join(f'<a class="stat" href="/runs?status={s}"><div class="n">{e(_count(data["runs"].get(s)))}</div>'
                    f'<div class="l">{badge(s)}</div></a>' for s in RUN_STATUSES)
    queues = "".join(f'<tr><td class="mono">{e(q["name"])}</td><td>{e("?" if q["depth"] is None else q["depth"])}</td></tr>'
                     for q in data["queues"])
    letters = data["dead_letters"]
    workers = data["workers"]
    if workers is None:
        worker_rows = '<p class="muted">This backend cannot tell which workers are live.</p>'
    elif not workers:
        worker_rows = '<p class="muted">No live worker.</p>'
    else:
        worker_rows = ('<table><thead><tr><th>Worker</th><th>Queue</th><th>Last seen</th><th></th></tr></thead><tbody>'
                       + "".join(f'<tr><td class="mono">{e(w["id"])}</td><td class="mono">{e(w["queue"])}</td>'
                                 f'<td class="mono">{e(format_time(w["last_seen"]))}</td><td class="muted">{e(w["detail"])}</td></tr>'
                                 for w in workers) + "</tbody></table>")
    letter_part = '<p class="muted">Unavailable.</p>' if letters is None else (
        f'<p><a href="/dead-letters"><b>{e(_count(letters))}</b> dead letter(s)</a></p>'
        + "".join(f'<div class="muted mono">{e(d["id"])} \u00b7 {e(format_time(d["dead_at"]))} \u00b7 {e(d["reason"][:100])}</div>'
                  for d in letters["latest"]))
    return (f'<h1>Overview</h1><div class="grid">{stats}</div><div class="cols">'
            f'<div class="card"><h2>Queues</h2><table><thead><tr><th>Queue</th><th>Jobs ready</th></tr></thead>'
            f'<tbody>{queues}</tbody></table></div>'
            f'<div class="card"><h2>Live workers</h2>{worker_rows}</div>'
            f'<div class="card"><h2>Dead letters</h2>{letter_part}</div></div>'
            f'<div class="card"><h2>Recent runs</h2>{runs_table(data["recent"])}</div>')


def _time_input(value: Optional[str]) -> str:
    return e(value or "")


def run_list_page(data: Mapping[str, Any], filters: Mapping[str, Optional[str]], blueprints: Iterable[str]) -> str:
    status_opts = '<option value="">any</option>' + "".join(
        f'<option value="{s}"{" selected" if filters.get("status") == s else ""}>{s}</option>' for s in RUN_STATUSES)
    bp_opts = '<option value="">any</option>' + "".join(
        f'<option value="{e(b)}"{" selected" if filters.get("blueprint") == b else ""}>{e(b)}</option>' for b in blueprints)
    form = (f'<form class="filters card" method="get" action="/runs">'
            f'<label>Status<select name="status" id="f-status">{status_opts}</select></label>'
            f'<label>Blueprint<select name="blueprint" id="f-blueprint">{bp_opts}</select></label>'
            f'<label>Updated since (UTC)<input type="datetime-local" step="1" name="since" id="f-since" value="{_time_input(filters.get("since"))}"></label>'
            f'<label>Updated until (UTC)<input type="datetime-local" step="1" name="until" id="f-until" value="{_time_input(filters.get("until"))}"></label>'
            f'<label>Per page<input type="number" min="1" max="500" name="limit" id="f-limit" value="{e(filters.get("limit") or 50)}"></label>'
            f'<button type="submit" id="f-apply">Filter</button> <a href="/runs">reset</a></form>')
    kept = {k: v for k, v in filters.items() if v and k != "cursor"}
    pager = []
    if filters.get("cursor"):
        pager.append(f'<a href="/runs?{e(urlencode(kept))}">\u21e4 newest</a>')
    if data["next_cursor"]:
        pager.append(f'<a id="next-page" href="/runs?{e(urlencode({**kept, "cursor": data["next_cursor"]}))}">next page \u2192</a>')
    return (f'<h1>Runs</h1>{form}<div class="card">{runs_table(data["runs"])}'
            f'<div class="pager">{"".join(pager)}</div></div>')


def _hidden(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{e(csrf)}">'


def _action_form(run_id: str, action: str, csrf: str, inner: str, button: str, style: str = "") -> str:
    cls = f' class="{style}"' if style else ""
    return (f'<form method="post" action="/runs/{path_part(run_id)}/{action}" data-action="{action}">{_hidden(csrf)}{inner}'
            f'<button type="submit"{cls}>{e(button)}</button></form>')


def _node_select(name: str, node_ids: Sequence[str], chosen: Optional[str] = None) -> str:
    opts = "".join(f'<option value="{e(n)}"{" selected" if n == chosen else ""}>{e(n)}</option>' for n in node_ids)
    return f'<select name="{name}">{opts}</select>'


def _actions(info: Mapping[str, Any], csrf: str) -> str:
    run_id, status = info["run_id"], info["status"]
    node_ids: List[str] = list(info.get("node_ids") or info["nodes"])
    out: List[str] = []
    for node_id, choices in info["resume_choices"].items():
        if (info["awaiting"].get(node_id) or {}).get("type") not in ("wait", "webhook", None):
            continue
        node = f'<input type="hidden" name="node" value="{e(node_id)}">'
        output = '<input name="output" placeholder="output JSON" size="14">'
        if choices:
            for choice in choices:
                out.append(_action_form(run_id, "resume", csrf, node + output
                                        + f'<input type="hidden" name="action" value="{e(choice)}">',
                                        f"Resume {node_id}: {choice}"))
        else:
            out.append(_action_form(run_id, "resume", csrf, node + '<input name="action" placeholder="action (optional)">'
                                    + output, f"Resume {node_id}"))
    if status in ("running", "awaiting"):
        out.append(_action_form(run_id, "cancel", csrf, "", "Cancel run", "danger"))
    if status in ("failed", "cancelled", "stalled"):
        out.append(_action_form(run_id, "retry", csrf, "", "Retry failed nodes"))
    if status != "running" and node_ids:
        out.append(_action_form(run_id, "restart", csrf, _node_select("node", node_ids), "Restart from", "secondary"))
    skippable = [n for n in node_ids if n in info["awaiting"] or any(x.get("node_id") == n for x in info["errors"])]
    if skippable:
        out.append(_action_form(run_id, "skip", csrf, _node_select("node", skippable)
                                + '<input name="output" placeholder="output JSON" size="14">', "Skip node",
                                "secondary"))
    return f'<div class="card actions"><h2>Actions</h2>{"".join(out) or "<p class=muted>None apply.</p>"}</div>'


def _timeline(entries: Sequence[Mapping[str, Any]]) -> str:
    if not entries:
        return '<p class="muted">No history.</p>'
    rows = []
    for x in entries:
        what = x.get("node_id") or x.get("status") or ",".join(x.get("node_ids") or [])
        details = [f'{x["duration_ms"]:.1f} ms' if "duration_ms" in x else "",
                   f'attempt {x["attempt"]}' if x.get("attempt", 1) != 1 else "",
                   f'item {x["index"]}' if "index" in x else "", str(x.get("message") or "")[:200]]
        rows.append(f'<tr><td class="mono">{e(format_time(x.get("timestamp")))}</td><td class="mono">{e(x["event"])}</td>'
                    f'<td class="mono">{e(what)}</td><td>{e("  ".join(d for d in details if d))}</td>'
                    f'<td class="mono muted">{e(x.get("worker") or "")}</td></tr>')
    return ('<table class="timeline"><thead><tr><th>Time (UTC)</th><th>Event</th><th>Node</th><th>Details</th>'
            f'<th>Worker</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def run_page(info: Mapping[str, Any], csrf: str, read_only: bool, api: str) -> str:
    run_id = info["run_id"]
    head = f'<h1>Run <span class="mono">{e(run_id)}</span> {badge(info["status"], "run-status")}</h1>'
    summary = (f'<div class="card"><h2>Summary</h2><table class="kv"><tbody>'
               f'<tr><th>Blueprint</th><td>{_blueprint_link(info["blueprint_id"])}</td></tr>'
               f'<tr><th>Version</th><td class="mono">{e(info["blueprint_version"] or "-")}</td></tr>'
               f'<tr><th>Updated</th><td class="mono">{e(format_time(info["updated_at"]))} UTC</td></tr>'
               f'<tr><th>Commits</th><td>{e(info["version"])}</td></tr>'
               f'<tr><th>Outstanding</th><td>{e(info["outstanding"])}</td></tr></tbody></table></div>')
    graph = info.get("svg")
    graph_part = (f'<div class="card"><h2>Graph</h2>{legend()}<div class="graphbox">{graph}</div></div>' if graph
                  else '<div class="card"><h2>Graph</h2><p class="muted">This app does not know the run\'s blueprint.</p></div>')
    awaiting = "".join(f'<tr><td class="mono">{e(n)}</td><td>{e((d or {}).get("type"))}</td>'
                       f'<td>{e(", ".join(info["resume_choices"].get(n) or []) or "any")}</td></tr>'
                       for n, d in info["awaiting"].items())
    awaiting_part = (f'<div class="card"><h2>Awaiting</h2><table><thead><tr><th>Node</th><th>Kind</th>'
                     f'<th>Resume actions</th></tr></thead><tbody>{awaiting}</tbody></table></div>') if awaiting else ""
    errors = "".join(f'<div class="error"><p><b class="mono">{e(x.get("node_id"))}</b>: {e(x.get("type"))}: '
                     f'{e(x.get("message"))}</p>' + (f'<pre class="tb">{e(x.get("traceback"))}</pre>' if x.get("traceback") else "")
                     + "</div>" for x in info["errors"])
    errors_part = f'<div class="card"><h2>Errors</h2>{errors}</div>' if errors else ""
    context = "".join(f'<tr><td class="mono">{e(k)}</td><td><pre>{e(v)}</pre></td></tr>' for k, v in info["shown_context"])
    more = len(info["context"]) - len(info["shown_context"])
    note = (f'<p class="muted">{len(info["shown_context"])} of {len(info["context"])} keys shown; all of them: '
            f'<a href="{e(api)}">{e(api)}</a></p>') if more > 0 else ""
    context_part = (f'<div class="card"><h2>Context</h2>{note}<table class="context"><tbody>'
                    f'{context or "<tr><td>empty</td></tr>"}</tbody></table></div>')
    config = (f'<script type="application/json" id="run-config">'
              f'{script_json({"api": api, "status": info["status"], "version": info["version"]})}</script>')
    actions = "" if read_only else _actions(info, csrf)
    side = summary + awaiting_part + actions + errors_part
    body = graph_part + f'<div class="card"><h2>Timeline</h2>{_timeline(info["timeline"])}</div>' + context_part
    return f'{head}<div class="runcols"><div class="maincol">{body}</div><aside>{side}</aside></div>{config}'


def _blueprint_link(blueprint_id: Any) -> str:
    if not blueprint_id:
        return "-"
    return f'<a href="/blueprints/{path_part(blueprint_id)}">{e(blueprint_id)}</a>'


def blueprints_page(items: Sequence[Mapping[str, Any]]) -> str:
    rows = "".join(f'<tr><td>{_blueprint_link(b["id"])}</td><td>{b["nodes"]}</td><td>{b["edges"]}</td>'
                   f'<td><a href="/runs?blueprint={path_part(b["id"])}">runs</a></td></tr>' for b in items)
    return (f'<h1>Blueprints</h1><div class="card"><table><thead><tr><th>Blueprint</th><th>Nodes</th><th>Edges</th>'
            f'<th></th></tr></thead><tbody>{rows}</tbody></table></div>')


def blueprint_page(blueprint_id: str, svg: str) -> str:
    return (f'<h1>Blueprint <span class="mono">{e(blueprint_id)}</span></h1>'
            f'<div class="card"><div class="legend"><span><span class="ln back"></span>loop / back edge</span>'
            f'<span>\u25c7 loop controller \u00b7 trapezoid: batch \u00b7 pill: wait</span></div>'
            f'<div class="graphbox">{svg}</div></div>')


def dead_letters_page(letters: Sequence[Mapping[str, Any]], csrf: str, read_only: bool) -> str:
    if not letters:
        return '<h1>Dead letters</h1><div class="card"><p class="muted">No dead letters.</p></div>'
    rows = []
    for d in letters:
        run = f'<a href="/runs/{path_part(d["run_id"])}">{e(d["run_id"])}</a>' if d["run_id"] else "-"
        button = "" if read_only else (
            f'<form method="post" action="/dead-letters/{path_part(d["id"])}/requeue">{_hidden(csrf)}'
            f'<button type="submit" class="secondary">Requeue</button></form>')
        rows.append(f'<tr><td class="mono">{e(d["id"])}</td><td class="mono">{e(format_time(d["dead_at"]))}</td>'
                    f'<td class="mono">{run}</td><td>{e(d["reason"])}</td><td><pre>{e(d["body"][:500])}</pre></td>'
                    f'<td>{button}</td></tr>')
    return ('<h1>Dead letters</h1><div class="card"><table><thead><tr><th>Id</th><th>Dead at (UTC)</th><th>Run</th>'
            f'<th>Reason</th><th>Body</th><th></th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def message_page(title: str, text: str) -> str:
    return f'<h1>{e(title)}</h1><div class="card"><p>{e(text)}</p></div>'


def flash_of(query: Mapping[str, List[str]]) -> Optional[Dict[str, str]]:
    for kind in ("ok", "err"):
        if query.get(kind):
            return {"kind": kind, "text": query[kind][0][:500]}
    return None
