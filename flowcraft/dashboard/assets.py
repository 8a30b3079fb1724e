"""The dashboard's stylesheet and script, served by the app itself (no CDN, no build step)."""
from __future__ import annotations

CSS = """
:root { --fg:#1f2933; --muted:#616e7c; --line:#d9e2ec; --bg:#f5f7fa; --card:#fff; --accent:#2f5fd0;
  --completed:#c8e6c9; --completed-b:#2e7d32; --failed:#ffcdd2; --failed-b:#c62828; --running:#bbdefb;
  --running-b:#1565c0; --awaiting:#ffe8a3; --awaiting-b:#c99400; --skipped:#e0e0e0; --skipped-b:#8d8d8d;
  --pending:#ffffff; --pending-b:#b0bec5; --cancelled:#eceff1; --cancelled-b:#546e7a; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
  color:var(--fg); background:var(--bg); }
header { background:#1b2a4a; color:#fff; display:flex; align-items:center; gap:28px; padding:0 24px; height:52px; }
header .brand { font-weight:700; font-size:16px; letter-spacing:.3px; }
header nav a { color:#c9d6f2; text-decoration:none; margin-right:18px; font-weight:500; }
header nav a.here, header nav a:hover { color:#fff; }
header .mode { margin-left:auto; font-size:12px; padding:3px 10px; border-radius:10px; background:#34486f; }
main { padding:20px 24px 40px; max-width:1400px; }
h1 { font-size:20px; margin:4px 0 16px; } h2 { font-size:15px; margin:0 0 10px; color:#334e68; }
a { color:var(--accent); }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px; margin-bottom:16px; }
.grid { display:grid; grid-template-columns:repeat(auto-fit,minmax(150px,1fr)); gap:12px; margin-bottom:16px; }
.stat { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; text-decoration:none; color:inherit; }
.stat .n { font-size:26px; font-weight:700; } .stat .l { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.5px; }
.cols { display:grid; grid-template-columns:repeat(auto-fit,minmax(320px,1fr)); gap:16px; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:6px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { font-size:12px; color:var(--muted); text-transform:uppercase; letter-spacing:.4px; font-weight:600; }
td.mono, .mono { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12.5px; }
.muted { color:var(--muted); }
.badge { display:inline-block; padding:1px 9px; border-radius:10px; font-size:12px; font-weight:600; border:1px solid; }
.b-completed { background:var(--completed); border-color:var(--completed-b); color:#1b5e20; }
.b-failed { background:var(--failed); border-color:var(--failed-b); color:#8e1616; }
.b-running { background:var(--running); border-color:var(--running-b); color:#0d3c78; }
.b-awaiting { background:var(--awaiting); border-color:var(--awaiting-b); color:#6d4c00; }
.b-cancelled, .b-stalled { background:var(--cancelled); border-color:var(--cancelled-b); color:#37474f; }
form.filters { display:flex; flex-wrap:wrap; gap:10px; align-items:end; }
form.filters label { display:flex; flex-direction:column; font-size:12px; color:var(--muted); gap:3px; }
input, select, textarea, button { font:inherit; }
input, select, textarea { padding:5px 8px; border:1px solid #bcccdc; border-radius:5px; background:#fff; }
button { padding:6px 14px; border-radius:5px; border:1px solid var(--accent); background:var(--accent); color:#fff; cursor:pointer; }
button.secondary { background:#fff; color:var(--accent); }
button.danger { background:#fff; color:#c62828; border-color:#c62828; }
.actions form { display:flex; gap:6px; align-items:center; margin:0 0 10px; flex-wrap:wrap; }
.actions form input:not([type=hidden]), .actions form select { flex:1 1 120px; min-width:0; }
.runcols { display:grid; grid-template-columns:minmax(0,1fr) 400px; gap:16px; align-items:start; }
@media (max-width: 1000px) { .runcols { grid-template-columns:1fr; } }
table.kv th { width:110px; } table.kv td, table.kv th { padding:5px 6px; }
.graphbox svg.graph { display:block; margin:0 auto; }
.pager { margin-top:12px; display:flex; gap:16px; }
.flash { padding:10px 14px; border-radius:6px; margin-bottom:14px; border:1px solid; }
.flash.ok { background:#e8f5e9; border-color:#81c784; } .flash.err { background:#ffebee; border-color:#e57373; }
pre { white-space:pre-wrap; word-break:break-word; margin:0; font-size:12.5px;
  font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; }
pre.tb { background:#fbf3f3; border:1px solid #f0caca; padding:8px; border-radius:5px; max-height:320px; overflow:auto; }
.graphbox { overflow:auto; max-height:78vh; background:#fbfcfe; border:1px solid var(--line); border-radius:6px; }
.legend { display:flex; flex-wrap:wrap; gap:14px; font-size:12px; color:var(--muted); margin:0 0 10px; align-items:center; }
.legend .sw { display:inline-block; width:14px; height:14px; border-radius:3px; border:2px solid; vertical-align:-3px; margin-right:5px; }
.sw.completed { background:var(--completed); border-color:var(--completed-b); }
.sw.running { background:var(--running); border-color:var(--running-b); }
.sw.awaiting { background:var(--awaiting); border-color:var(--awaiting-b); }
.sw.failed { background:var(--failed); border-color:var(--failed-b); }
.sw.skipped { background:var(--skipped); border-color:var(--skipped-b); }
.sw.pending { background:var(--pending); border-color:var(--pending-b); }
.legend .ln { display:inline-block; width:26px; border-top:3px solid #2e7d32; vertical-align:middle; margin-right:5px; }
.legend .ln.back { border-top:2px dashed #7b1fa2; }
svg.graph .shape { fill:#fff; stroke:#90a4ae; stroke-width:1.5; }
svg.graph .inner { fill:none; stroke:#90a4ae; stroke-width:1; }
svg.graph .kind-loop .shape { stroke-width:2.5; }
svg.graph .kind-batch .shape { stroke-dasharray:6 3; stroke-width:2; }
svg.graph .st-completed .shape { fill:var(--completed); stroke:var(--completed-b); }
svg.graph .st-failed .shape { fill:var(--failed); stroke:var(--failed-b); stroke-width:2.5; }
svg.graph .st-running .shape { fill:var(--running); stroke:var(--running-b); stroke-width:2.5; }
svg.graph .st-awaiting .shape { fill:var(--awaiting); stroke:var(--awaiting-b); stroke-width:2.5; }
svg.graph .st-skipped .shape { fill:var(--skipped); stroke:var(--skipped-b); stroke-dasharray:5 4; }
svg.graph .st-pending .shape { fill:var(--pending); stroke:var(--pending-b); }
svg.graph text { font:12.5px system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif; text-anchor:middle; fill:#1f2933; }
svg.graph text.nid { font-weight:600; }
svg.graph text.nuses { font-size:10.5px; fill:#52606d; }
svg.graph .edge path { fill:none; stroke:#9aa5b1; stroke-width:1.5; }
svg.graph .edge.back path { stroke:#7b1fa2; stroke-dasharray:6 4; }
svg.graph .edge.fallback path { stroke:#ef6c00; stroke-dasharray:2 3; }
svg.graph .edge.taken path { stroke:#2e7d32; stroke-width:3; }
svg.graph .edge.back.taken path { stroke:#2e7d32; }
svg.graph text.elabel.side { text-anchor:start; }
svg.graph text.elabel { font-size:11px; fill:#334e68; paint-order:stroke; stroke:#fbfcfe; stroke-width:4px; }
svg.graph .arrow-edge { fill:#9aa5b1; } svg.graph .arrow-back { fill:#7b1fa2; }
svg.graph .arrow-fallback { fill:#ef6c00; } svg.graph .arrow-taken { fill:#2e7d32; }
svg.graph .node { cursor:default; }
"""

JS = """
(function () {
  "use strict";
  var config = document.getElementById("run-config");
  if (!config) { return; }
  var run = JSON.parse(config.textContent);
  var live = ["running", "awaiting"];
  if (live.indexOf(run.status) < 0) { return; }
  var delay = run.status === "running" ? 1500 : 4000;
  function apply(data) {
    var states = data.drawn_states || {};
    var nodes = document.querySelectorAll("svg.graph g.node");
    for (var i = 0; i < nodes.length; i++) {
      var id = nodes[i].getAttribute("data-node");
      var state = states[id] || "pending";
      var cls = nodes[i].getAttribute("class").replace(/\\bst-[a-z]+/, "st-" + state);
      nodes[i].setAttribute("class", cls);
    }
    var badge = document.getElementById("run-status");
    if (badge) { badge.textContent = data.status; badge.className = "badge b-" + data.status; }
  }
  function poll() {
    var request = new XMLHttpRequest();
    request.open("GET", run.api + "?view=live");
    request.setRequestHeader("Accept", "application/json");
    request.onload = function () {
      if (request.status !== 200) { setTimeout(poll, delay * 2); return; }
      var data = JSON.parse(request.responseText);
      if (data.version !== run.version) {
        apply(data);
        if (data.status !== run.status) { window.location.reload(); return; }
        run.version = data.version;
      }
      setTimeout(poll, delay);
    };
    request.onerror = function () { setTimeout(poll, delay * 2); };
    request.send();
  }
  setTimeout(poll, delay);
})();
"""
