// Parrot dashboard: polls /v1/observe/* and draws sessions, the selected session's graph
// (Cytoscape.js with the dagre layout) and a per-engine timeline (request bars, and uPlot
// charts of batch size and queue depth). No build step; the libraries are vendored.
"use strict";

const POLL_MS = 1000;
const WINDOW_S = 120; // the timeline shows at most the last two minutes
const state = {
  key: null, session: null, sessionsSeen: [], graphKey: "", cy: null,
  charts: new Map(), lastGraph: null, tenant: "",
};

// ---- access ----------------------------------------------------------------------------
function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("key")) {
    sessionStorage.setItem("parrot-operator-key", params.get("key"));
  }
  if (params.get("session")) state.session = params.get("session");
  if (params.get("tenant")) state.tenant = params.get("tenant");
  state.key = sessionStorage.getItem("parrot-operator-key");
}

async function api(path) {
  const headers = state.key ? { Authorization: `Bearer ${state.key}` } : {};
  const resp = await fetch(path, { headers });
  if (resp.status === 401 || resp.status === 403) {
    const body = await resp.json().catch(() => ({}));
    showKeyForm((body.error && body.error.message) || "the operator key is required");
    throw new Error("unauthorized");
  }
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp.json();
}

function showKeyForm(message) {
  const form = document.getElementById("key-form");
  form.hidden = false;
  document.getElementById("key-error").textContent = message;
}

document.getElementById("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = document.getElementById("key-input").value;
  sessionStorage.setItem("parrot-operator-key", state.key);
  document.getElementById("key-form").hidden = true;
  poll();
});

// ---- formatting --------------------------------------------------------------------------
const fmtS = (s) => (s == null ? "–" : s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`);
const pct = (x) => `${(100 * x).toFixed(1)}%`;
const short = (id) => (id && id.length > 12 ? id.slice(0, 8) + "…" : id);
function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-") || k === "title" || k === "style") node.setAttribute(k, v);
    else node[k] = v;
  }
  if (text) node.textContent = text;
  return node;
}

// ---- summary -----------------------------------------------------------------------------
function drawSummary(s) {
  document.getElementById("stat-hit").textContent = pct(s.cache_hit_rate);
  document.getElementById("stat-tps").textContent = s.tokens_per_s.toFixed(1);
  document.getElementById("stat-active").textContent = s.requests_active;
  document.getElementById("stat-sessions").textContent = s.sessions_open;
  document.getElementById("stat-calls").textContent = `${s.calls.pending} / ${s.calls.running}`;
}

// ---- sessions ----------------------------------------------------------------------------
function drawSessions(list) {
  const tbody = document.querySelector("#sessions tbody");
  tbody.replaceChildren();
  if (!state.session && list.length) state.session = list[0].id; // the newest
  for (const s of list) {
    const done = s.states.done, total = s.num_calls;
    const time = s.makespan_s != null ? fmtS(s.makespan_s) : fmtS(s.elapsed_s);
    const row = el("tr", { "data-session": s.id, title: s.id });
    if (s.id === state.session) row.classList.add("selected");
    if (s.deleted) row.classList.add("deleted");
    row.append(el("td", {}, short(s.id)), el("td", {}, s.tenant), el("td", {}, `${done}/${total}`),
               el("td", {}, time));
    row.addEventListener("click", () => { state.session = s.id; state.graphKey = ""; poll(); });
    tbody.append(row);
  }
}

// ---- graph -------------------------------------------------------------------------------
function graphElements(g) {
  const nodes = [], edges = [];
  const producedOrConsumed = new Set();
  for (const c of g.calls) {
    for (const v of c.inputs) producedOrConsumed.add(v);
    for (const v of c.outputs) producedOrConsumed.add(v);
  }
  for (const c of g.calls) {
    const cached = c.prompt_tokens ? ` · ${c.cached_tokens}/${c.prompt_tokens} cached` : "";
    nodes.push({ group: "nodes", data: {
      id: `call:${c.id}`, kind: "call", callId: c.id,
      label: `${c.name || c.id}\n${c.state}${c.criterion ? " · " + c.criterion : ""}${cached}`,
      state: c.state, critical: c.critical ? 1 : 0,
    }, classes: `call ${c.state}${c.critical ? " critical" : ""}` });
  }
  const critical = new Set(g.critical_path);
  for (const v of g.variables) {
    if (!producedOrConsumed.has(v.id)) continue;
    nodes.push({ group: "nodes", data: { id: `var:${v.id}`, kind: "variable", label: v.name || short(v.id) },
                 classes: `variable${v.ready ? " ready" : ""}` });
    if (v.producer) {
      edges.push({ group: "edges", data: { id: `e:${v.producer}>${v.id}`, source: `call:${v.producer}`,
                                           target: `var:${v.id}` } });
    }
    for (const consumer of v.consumers) {
      edges.push({ group: "edges", data: { id: `e:${v.id}>${consumer}`, source: `var:${v.id}`,
                                           target: `call:${consumer}` } });
    }
  }
  // An edge is on the critical path when it links two consecutive calls of the path.
  const path = g.critical_path;
  const onPath = new Set();
  for (let i = 0; i + 1 < path.length; i++) {
    for (const e of g.edges) {
      if (e.source === path[i] && e.target === path[i + 1]) {
        onPath.add(`e:${e.source}>${e.var}`);
        onPath.add(`e:${e.var}>${e.target}`);
      }
    }
  }
  for (const e of edges) if (onPath.has(e.data.id)) e.classes = "critical";
  for (const n of nodes) if (n.data.kind === "call" && critical.has(n.data.callId)) n.classes += " critical";
  return { nodes, edges };
}

const STATE_COLORS = { pending: "#6b7785", running: "#e0a526", done: "#3fae6a", failed: "#e05252",
                       cancelled: "#8a5cc2" };

function makeCy() {
  return cytoscape({
    container: document.getElementById("dag"),
    wheelSensitivity: 0.3,
    style: [
      { selector: "node.call", style: {
        shape: "round-rectangle", width: 150, height: 44, label: "data(label)", "text-wrap": "wrap",
        "text-valign": "center", "font-size": 10, color: "#0b0f13",
        "background-color": (n) => STATE_COLORS[n.data("state")] || "#6b7785",
        "border-width": 0 } },
      { selector: "node.call.critical", style: { "border-width": 4, "border-color": "#4aa3ff" } },
      { selector: "node.variable", style: {
        shape: "ellipse", width: 14, height: 14, "background-color": "#3a4654", label: "data(label)",
        "font-size": 9, color: "#8593a3", "text-valign": "bottom", "text-margin-y": 3 } },
      { selector: "node.variable.ready", style: { "background-color": "#5d6e80" } },
      { selector: "edge", style: { width: 1.5, "line-color": "#4a5663", "target-arrow-color": "#4a5663",
                                   "target-arrow-shape": "triangle", "curve-style": "bezier" } },
      { selector: "edge.critical", style: { width: 3.5, "line-color": "#4aa3ff",
                                            "target-arrow-color": "#4aa3ff" } },
      { selector: ":selected", style: { "overlay-opacity": 0.15 } },
    ],
  });
}

function drawGraph(g) {
  state.lastGraph = g;
  document.getElementById("graph-title").textContent =
    `${g.id} · tenant ${g.tenant} · ${g.num_calls} calls` +
    (g.makespan_s != null ? ` · makespan ${fmtS(g.makespan_s)}` : "") + (g.deleted ? " · deleted" : "");
  if (!state.cy) {
    state.cy = makeCy();
    state.cy.on("tap", "node.call", (ev) => showCall(ev.target.data("callId")));
  }
  const cy = state.cy;
  const { nodes, edges } = graphElements(g);
  const key = g.id + "|" + nodes.map((n) => n.data.id).join(",") + "|" + edges.map((e) => e.data.id).join(",");
  if (key !== state.graphKey) {
    cy.elements().remove();
    cy.add([...nodes, ...edges]);
    cy.layout({ name: "dagre", rankDir: "TB", nodeSep: 20, rankSep: 40, animate: false }).run();
    cy.fit(undefined, 20);
    state.graphKey = key;
  } else {
    for (const n of nodes) {
      const node = cy.getElementById(n.data.id);
      node.data(n.data);
      node.classes(n.classes);
    }
    for (const e of edges) cy.getElementById(e.data.id).classes(e.classes || "");
  }
  writeGraphText(cy);
}

function writeGraphText(cy) {
  // The same elements the canvas shows, as a list (read by screen readers and the tests).
  const list = document.getElementById("dag-text");
  list.replaceChildren();
  cy.nodes().forEach((n) => {
    const attrs = { "data-kind": n.data("kind"), "data-id": n.id().replace(/^(call|var):/, "") };
    if (n.data("kind") === "call") {
      attrs["data-state"] = n.data("state");
      attrs["data-critical"] = n.hasClass("critical") ? "true" : "false";
    }
    list.append(el("li", attrs, `${n.data("kind")} ${n.data("label")}`));
  });
  cy.edges().forEach((e) => {
    list.append(el("li", { "data-kind": "edge", "data-source": e.source().id(), "data-target": e.target().id(),
                           "data-critical": e.hasClass("critical") ? "true" : "false" },
                   `${e.source().id()} → ${e.target().id()}`));
  });
}

function showCall(callId) {
  const c = state.lastGraph && state.lastGraph.calls.find((x) => x.id === callId);
  if (!c) return;
  const ran = c.started != null ? fmtS((c.finished || Date.now() / 1000) - c.started) : "–";
  document.getElementById("call-detail").textContent =
    `${c.name || c.id} · ${c.state} · criterion ${c.criterion || "none"} · priority ${c.priority} · ` +
    `engine ${c.engine || "–"} · ran ${ran} · prompt ${c.prompt_tokens} (${c.cached_tokens} cached) · ` +
    `output ${c.output_tokens}` + (c.error ? ` · ${c.error}` : "");
}

// ---- engines: timeline and load charts ---------------------------------------------------
function drawEngines(resp) {
  const root = document.getElementById("engines");
  // The window spans the requests shown (at most WINDOW_S): a short app fills the width.
  const now = resp.time;
  const all = resp.data.flatMap((e) => e.requests);
  const t0 = Math.max(now - WINDOW_S, Math.min(now - 1, ...all.map((r) => r.opened)));
  const t1 = all.some((r) => !r.ended) || !all.length ? now : Math.max(...all.map((r) => r.ended));
  const span = Math.max(t1 - t0, 0.05);
  for (const eng of resp.data) {
    let box = document.getElementById(`engine-${eng.id}`);
    if (!box) {
      box = el("div", { class: "engine", id: `engine-${eng.id}`, "data-engine": eng.id });
      box.append(el("div", { class: "engine-head" }), el("div", { class: "timeline" }),
                 el("div", { class: "chart" }));
      root.append(box);
    }
    const load = eng.load || {};
    const head = box.querySelector(".engine-head");
    head.replaceChildren(
      el("strong", {}, `${eng.id}`), el("span", { class: "muted" }, `${eng.kind} · ${eng.model}`),
      el("span", {}, `batch ${load.num_running ?? "–"} · queue ${load.num_waiting ?? "–"}`),
      el("span", {}, `KV ${load.kv_tokens_total ? pct(load.kv_tokens_used / load.kv_tokens_total) : "–"}`),
      el("span", {}, `preemptions ${load.num_preemptions ?? 0}`),
      eng.up ? el("span", { class: "muted" }, "up") : el("span", { class: "down" }, `down: ${eng.down || "stopped"}`),
    );
    drawTimeline(box.querySelector(".timeline"), eng.requests, t0, span, now);
    box.querySelector(".timeline").dataset.window = `${t0},${t0 + span}`;
    drawChart(box.querySelector(".chart"), eng);
  }
}

function drawTimeline(box, requests, t0, span, now) {
  const width = box.clientWidth || 800;
  const lanes = []; // end time of the last bar in each lane
  const bars = [];
  const sorted = [...requests].filter((r) => (r.ended || now) >= t0).sort((a, b) => a.opened - b.opened);
  for (const r of sorted) {
    const start = Math.max(r.opened, t0), end = r.ended || now;
    let lane = lanes.findIndex((e) => e <= start);
    if (lane < 0) { lane = lanes.length; lanes.push(0); }
    lanes[lane] = end;
    const left = ((start - t0) / span) * width;
    const w = Math.max(2, ((end - start) / span) * width);
    const cls = ["tl-bar", r.objective, r.ended ? "" : "active",
                 r.session && r.session === state.session ? "selected-session" : ""].join(" ");
    const bar = el("div", {
      class: cls, "data-request": r.id, "data-call": r.call || "", "data-session": r.session || "",
      style: `left:${left.toFixed(1)}px;width:${w.toFixed(1)}px;top:${lane * 16 + 2}px`,
      title: `${r.call || r.id} · ${r.objective} · ${r.outcome || "running"} · ` +
             `${fmtS(end - r.opened)} · ${r.prompt_tokens} prompt (${r.cached_tokens} cached) · ${r.output_tokens} out`,
    }, r.call || r.id);
    if (r.first_token) {
      const ttft = Math.min(1, (r.first_token - start) / Math.max(end - start, 1e-6));
      bar.prepend(el("span", { class: "ttft", style: `width:${(ttft * 100).toFixed(1)}%` }));
    }
    bars.push(bar);
  }
  box.style.height = `${Math.max(1, lanes.length) * 16 + 16}px`;
  const ago = now - t0;
  box.replaceChildren(...bars,
    el("span", { class: "tl-axis", style: "left:4px" }, `${fmtS(ago)} ago`),
    el("span", { class: "tl-axis", style: "right:4px" }, now - (t0 + span) < 0.05 ? "now" : `${fmtS(now - t0 - span)} ago`));
}

function drawChart(box, eng) {
  const xs = eng.samples.map((s) => s.t);
  const data = [xs, eng.samples.map((s) => s.num_running), eng.samples.map((s) => s.num_waiting)];
  let chart = state.charts.get(eng.id);
  if (!chart) {
    chart = new uPlot({
      width: box.clientWidth || 800, height: 120,
      series: [{}, { label: "batch size", stroke: "#3fae6a", width: 1.5 },
               { label: "queue depth", stroke: "#e0a526", width: 1.5 }],
      axes: [{ stroke: "#8593a3", grid: { stroke: "#2a3440" } },
             { stroke: "#8593a3", grid: { stroke: "#2a3440" } }],
      scales: { y: { range: (u, min, max) => [0, Math.max(2, max + 1)] } },
    }, data, box);
    state.charts.set(eng.id, chart);
  } else {
    chart.setData(data);
  }
}

// ---- polling -----------------------------------------------------------------------------
let polling = false;
async function poll() {
  if (polling) return;
  polling = true;
  const status = document.getElementById("status");
  try {
    const tenant = document.getElementById("tenant-filter").value.trim();
    const q = tenant ? `?tenant=${encodeURIComponent(tenant)}` : "";
    const graphOf = (id) => api(`/v1/observe/sessions/${encodeURIComponent(id)}`).catch((err) => {
      if (String(err).includes("404")) return null; // deleted and forgotten: pick another
      throw err;
    });
    // Everything of one frame is fetched together, then drawn together, so the panels agree.
    let [summary, sessions, engines, graph] = await Promise.all([
      api("/v1/observe/summary"), api(`/v1/observe/sessions${q}`),
      api(`/v1/observe/engines?since=${Date.now() / 1000 - WINDOW_S}`),
      state.session ? graphOf(state.session) : Promise.resolve(null),
    ]);
    if (!graph) {
      state.session = sessions.data.length ? sessions.data[0].id : null;
      graph = state.session ? await graphOf(state.session) : null;
    }
    drawSummary(summary);
    drawSessions(sessions.data);
    if (graph) drawGraph(graph);
    drawEngines(engines);
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    status.classList.remove("error");
    document.body.dataset.ready = "true";
  } catch (err) {
    status.textContent = String(err.message || err);
    status.classList.add("error");
  } finally {
    polling = false;
  }
}

readHash();
document.getElementById("tenant-filter").value = state.tenant;
document.getElementById("tenant-filter").addEventListener("change", () => poll());
window.addEventListener("hashchange", () => { readHash(); state.graphKey = ""; poll(); });
poll();
setInterval(poll, POLL_MS);
