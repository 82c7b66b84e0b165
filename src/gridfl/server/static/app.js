// gridfl dashboard. Plain DOM (every value goes in as text, never as HTML), hash routes:
//   #/  processes    #/process/<name>/<version>  one process    #/node  the node
// Live pages hold one request open at a time (the node answers when a cycle opens or
// closes), then ask again: one request per change, not a polling loop.
"use strict";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const WAIT = 25; // seconds the node may hold a live request
// at most one live reply every 4 s: with cycles of 0.3 s a reply brings a dozen cycles
// (none is lost, the page keeps them all). Each request costs Chromium 20 to 40 ms of
// CPU (its network, renderer and compositor work) whatever the reply, so fewer requests,
// not smaller replies, are what keep an open page from slowing training.
const MIN_INTERVAL_MS = 4000;
// the workers seen (most of a reply's bytes) are asked for at most every 10 s
const WORKERS_INTERVAL_MS = 10000;
const pause = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, {once: true});
});
let pageAbort = null; // aborts the current page's requests when the route changes

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const r = await fetch("api/" + path, {credentials: "same-origin", ...options,
    headers: {"content-type": "application/json", ...(options.headers || {})}});
  if (r.status === 401) throw new Unauthorized("sign in first");
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
    throw new Error(msg);
  }
  return r.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined)
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const fmtTime = (t) => t ? new Date(t * 1000).toLocaleString() : "—";
const fmtNum = (v, d = 3) => (v === null || v === undefined) ? "—"
  : (Math.abs(v) >= 1000 || Number.isInteger(v) ? String(Math.round(v * 100) / 100)
     : Number(v).toPrecision(d));
const fmtSecs = (s) => (s === null || s === undefined) ? "—" : s.toFixed(s < 10 ? 2 : 1) + " s";
const badge = (s) => el("span", {class: "badge " + s, text: s});
const enc = encodeURIComponent;

function table(headers, rows, caption) {
  return el("div", {class: "table-wrap", tabindex: "0", role: "region", "aria-label": caption},
    el("table", {},
      el("caption", {class: "sr-only", text: caption}),
      el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {scope: "col", text: h})))),
      el("tbody", {}, ...rows)));
}

function show(...nodes) {
  // a page replacing its loading state keeps the focus on its heading
  const headingFocused = document.activeElement?.tagName === "H1" && main.contains(document.activeElement);
  main.replaceChildren(...nodes);
  if (headingFocused) focusHeading();
}

function showError(err, retry) {
  if (err instanceof Unauthorized) return signIn();
  if (err.name === "AbortError") return;
  show(el("h1", {text: "Something went wrong"}),
       el("p", {class: "error", role: "alert", text: err.message}),
       el("button", {type: "button", onclick: retry, text: "Try again"}));
}

function focusHeading() {
  const h = main.querySelector("h1");
  if (h) { h.setAttribute("tabindex", "-1"); h.focus({preventScroll: true}); }
}

// ---------------------------------------------------------------- sign-in / out
function signIn(message) {
  nav.hidden = true;
  const input = el("input", {type: "password", id: "token", name: "token", required: true,
    autocomplete: "current-password", "aria-describedby": "signin-error"});
  const error = el("p", {id: "signin-error", class: "error", role: "alert", text: message || ""});
  const form = el("form", {class: "signin", onsubmit: async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    try {
      await api("session", {method: "POST", body: JSON.stringify({token: input.value})});
      input.value = "";
      route();
    } catch (e) {
      error.textContent = e instanceof Unauthorized ? "Wrong admin token." : e.message;
      input.focus();
    }
  }},
    el("h1", {text: "Sign in"}),
    el("p", {class: "muted", text: "Use the node's admin token (gridfl serve prints where it " +
      "is kept; gridfl demo prints the file). It is sent once and never stored in the page."}),
    el("label", {for: "token", text: "Admin token"}), input, error,
    el("button", {type: "submit", class: "primary", text: "Sign in"}));
  show(form);
  input.focus();
}

document.getElementById("sign-out").addEventListener("click", async () => {
  if (pageAbort) pageAbort.abort();
  try { await api("session", {method: "DELETE"}); } catch (_) { /* signed out anyway */ }
  signIn("Signed out.");
});

// ---------------------------------------------------------------- confirmation
function confirmAction(text, okLabel) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), {once: true});
    dialog.showModal();
  });
}

// ---------------------------------------------------------------- processes
async function processesPage(signal) {
  show(el("h1", {text: "Processes"}), el("p", {class: "loading", role: "status", text: "Loading…"}));
  focusHeading();
  let query = "processes";
  let lastAsked = 0;
  while (!signal.aborted) {
    await pause(lastAsked + MIN_INTERVAL_MS - Date.now(), signal);
    lastAsked = Date.now();
    const data = await api(query, {signal});
    query = `processes?wait=${WAIT}&after=${data.generation}`;
    const body = data.processes.length === 0
      ? el("p", {class: "empty", text: "No processes hosted yet. Host one with `gridfl host` " +
          "or run `gridfl demo`."})
      : table(["Name", "Version", "Status", "Cycle", "Reports", "Strategy", "ε", "Last activity"],
          data.processes.map((p) => el("tr", {},
            el("td", {class: "name"}, el("a", {href: `#/process/${enc(p.name)}/${enc(p.version)}`,
              text: p.name})),
            el("td", {text: p.version}), el("td", {}, badge(p.status)),
            el("td", {text: p.current_cycle ?? "—"}), el("td", {text: p.reports}),
            el("td", {text: p.strategy}), el("td", {text: fmtNum(p.epsilon)}),
            el("td", {text: fmtTime(p.last_activity)}))), "Hosted processes");
    // a re-render keeps the focus where it was (the heading, or the same process link)
    const active = main.contains(document.activeElement) ? document.activeElement : null;
    const href = active?.getAttribute("href");
    show(el("h1", {text: "Processes"}), body);
    if (href) main.querySelector(`a[href="${CSS.escape(href)}"]`)?.focus();
    else if (active?.tagName === "H1" || active === main) focusHeading();
  }
}

// ---------------------------------------------------------------- one process
const GROUPS = [
  ["Evaluation", (k) => /^(eval|val|test)[_-]/i.test(k)],
  ["Loss", (k) => /loss/i.test(k)],
  ["Accuracy", (k) => /acc/i.test(k)],
  ["Privacy budget ε", (k) => /^(epsilon|eps)$/i.test(k)],
  ["Other metrics", () => true],
];
// whole cycles and checkpoints only on the x axis
const STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000];
const COLORS = ["#0b5cad", "#d1495b", "#2e933c", "#8e44ad", "#e67e22", "#16a085"];

// A chart of metrics per cycle (or, for federated evaluations, per checkpoint): items
// carry their x in `x` ("sequence" or "checkpoint") and their values in `metrics`.
class Chart {
  constructor(title, x = "sequence", unit = "cycle") {
    this.title = title;
    this.x = x;
    this.unit = unit;
    this.keys = [];
    this.plot = el("div", {class: "plot"});
    this.figure = el("figure", {class: "chart", role: "img", "data-chart": title},
      el("figcaption", {text: title}), this.plot);
    this.u = null;
  }
  update(items) {
    const xs = items.map((c) => c[this.x]);
    const data = [xs, ...this.keys.map((k) => items.map((c) => c.metrics?.[k] ?? null))];
    const last = items.length ? items[items.length - 1] : null;
    const latest = last ? this.keys.map((k) => `${k} ${fmtNum(last.metrics?.[k])}`).join(", ")
      : "no values";
    this.figure.setAttribute("aria-label", `${this.title} per ${this.unit}: ${xs.length} ` +
      `${this.unit}s` + (last ? `, at ${this.unit} ${last[this.x]}: ${latest}` : ""));
    this.figure.dataset.points = String(xs.length);
    const width = Math.max(200, this.plot.clientWidth || 300);
    if (!this.u) {
      if (typeof uPlot === "undefined") return;
      this.u = new uPlot({width, height: 200, scales: {x: {time: false}},
        axes: [{label: this.unit, incrs: STEPS}, {}],
        series: [{label: this.unit}, ...this.keys.map((k, i) => ({label: k,
          stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true}))]}, data, this.plot);
    } else {
      if (Math.abs(this.u.width - width) > 2) this.u.setSize({width, height: 200});
      this.u.setData(data);
    }
  }
}

function metricKeys(cycles) {
  const keys = new Set();
  for (const c of cycles) for (const k of Object.keys(c.metrics || {})) keys.add(k);
  return [...keys].sort();
}

async function processPage(signal, name, version) {
  show(el("h1", {text: name}), el("p", {class: "loading", role: "status", text: "Loading…"}));
  focusHeading();
  const path = `processes/${enc(name)}/${enc(version)}`;
  const cycles = new Map(); // sequence -> cycle, kept over the held replies: no gaps
  const charts = new Map(); // group title -> Chart
  const chartBox = el("div", {class: "charts"});
  const live = el("p", {class: "muted", role: "status"});
  // sections below the fold are not laid out or painted until scrolled to
  const section = () => el("div", {class: "section"});
  const parts = {head: el("div"), cycles: section(), evals: section(), workers: section(),
    ckpts: section(), configs: section()};
  const evaluations = new Map(); // checkpoint -> federated evaluation, kept like the cycles
  let first = true;
  let after = null;
  let gap = false;
  let lastAsked = 0;
  let workersAsked = 0;
  while (!signal.aborted) {
    // the first reply (and one after a gap) lists up to 1000 cycles; held ones only the
    // newest 20, so a 0.3 s cycle costs the node a small read per reply
    let q = after === null || gap ? "?cycles=1000" : `?cycles=20&wait=${WAIT}&after=${after}`;
    let s;
    await pause(lastAsked + MIN_INTERVAL_MS - Date.now(), signal);
    lastAsked = Date.now();
    const withWorkers = lastAsked - workersAsked >= WORKERS_INTERVAL_MS;
    if (withWorkers) workersAsked = lastAsked; else q += "&workers=0";
    try {
      s = await api(path + q, {signal});
    } catch (e) {
      if (!first && !(e instanceof Unauthorized) && e.name !== "AbortError"
          && /no FL process/.test(e.message)) {
        show(el("h1", {text: name}), el("p", {class: "empty", text: "This process was deleted."}),
             el("a", {href: "#/", text: "Back to processes"}));
        return;
      }
      throw e;
    }
    for (const c of s.cycles) {
      // with DP, the node reports the ε spent after each completed cycle: chart it too
      if (c.epsilon !== undefined && c.epsilon !== null) c.metrics = {...c.metrics, epsilon: c.epsilon};
      cycles.set(c.sequence, c);
    }
    const oldest = s.cycles.length ? s.cycles[0].sequence : null;
    gap = after !== null && oldest !== null && oldest > after + 1 && !cycles.has(oldest - 1);
    const closed = s.cycles.filter((c) => c.status !== "open").map((c) => c.sequence);
    after = Math.max(after ?? 0, ...closed, 0);
    for (const e of s.evaluations || []) evaluations.set(e.checkpoint, e);
    const all = [...cycles.values()].sort((a, b) => a.sequence - b.sequence);
    const done = all.filter((c) => c.status !== "open");
    renderHead(parts.head, s);
    renderCharts(chartBox, charts, done);
    renderCycles(parts.cycles, all);
    renderEvaluations(parts.evals, s.server_config.evaluation,
      [...evaluations.values()].sort((a, b) => a.checkpoint - b.checkpoint));
    if (s.workers) renderWorkers(parts.workers, s.workers);
    renderCheckpoints(parts.ckpts, s, path);
    renderConfigs(parts.configs, s);
    live.textContent = s.status === "running"
      ? `Live: updates as each cycle closes (${done.length} closed so far).`
      : `The process is ${s.status}; no more updates.`;
    if (first) {
      // the loaded page takes the focus only from its loading state, not from elsewhere
      const refocus = main.contains(document.activeElement) || document.activeElement === document.body;
      show(parts.head, live, el("h2", {text: "Charts"}), chartBox, el("h2", {text: "Cycles"}),
        parts.cycles, el("h2", {text: "Federated evaluation"}), parts.evals,
        el("h2", {text: "Workers seen"}), parts.workers,
        el("h2", {text: "Checkpoints"}), parts.ckpts, el("h2", {text: "Configs"}), parts.configs);
      first = false;
      if (refocus) focusHeading();
      for (const c of charts.values()) c.update(done); // sized now that they are on the page
      parts.evals.chart?.update([...evaluations.values()].sort((a, b) => a.checkpoint - b.checkpoint));
    }
    if (s.status !== "running") return;
  }
}

// Each cycle's reply re-renders only what changed: rows are kept by key (a closed cycle's
// row never changes), a table's body is swapped only when its rows differ, and the head
// is built once. An open page then costs the browser little per cycle.
function keyedRows(box, items, key, build) {
  const old = box.rowCache || new Map();
  box.rowCache = new Map();
  return items.map((item) => {
    const k = key(item);
    const row = old.get(k) || build(item);
    box.rowCache.set(k, row);
    return row;
  });
}

function tableInto(box, headers, rows, caption, empty) {
  if (rows.length === 0) {
    if (box.dataset.state !== "empty") {
      box.replaceChildren(el("p", {class: "empty", text: empty}));
      box.dataset.state = "empty";
      box.tbody = null;
    }
    return;
  }
  if (!box.tbody) {
    box.replaceChildren(table(headers, [], caption));
    box.tbody = box.querySelector("tbody");
    box.dataset.state = "rows";
  }
  // move rows into place one by one: a new cycle is one insertion, not a rebuilt table
  const body = box.tbody;
  rows.forEach((row, i) => { if (body.children[i] !== row) body.insertBefore(row, body.children[i] || null); });
  while (body.children.length > rows.length) body.lastChild.remove();
}

function changed(box, value) {
  const key = JSON.stringify(value);
  if (box.dataset.key === key) return false;
  box.dataset.key = key;
  return true;
}

function renderHead(box, s) {
  if (!box.firstChild) {
    const stop = el("button", {type: "button", onclick: async () => {
      if (!await confirmAction(`Stop ${s.name} ${s.version}? Its open cycle closes and no ` +
        "new cycle opens.", "Stop")) return;
      try { await api(`processes/${enc(s.name)}/${enc(s.version)}/stop`, {method: "POST"}); }
      catch (e) { showError(e, route); }
    }, text: "Stop"});
    const del = el("button", {type: "button", class: "danger", onclick: async () => {
      if (!await confirmAction(`Delete ${s.name} ${s.version} and every checkpoint, cycle ` +
        "and worker it has? This cannot be undone.", "Delete")) return;
      try {
        if (pageAbort) pageAbort.abort();
        await api(`processes/${enc(s.name)}/${enc(s.version)}`, {method: "DELETE"});
        location.hash = "#/";
      } catch (e) { showError(e, route); }
    }, text: "Delete"});
    box.stop = stop;
    box.badge = badge(s.status);
    box.meta = el("p", {class: "muted"});
    box.replaceChildren(el("div", {class: "head"},
      el("h1", {}, `${s.name} `, el("span", {class: "muted", text: `version ${s.version}`})),
      box.badge, el("div", {class: "actions"}, stop, del)), box.meta);
  }
  box.badge.textContent = s.status;
  box.badge.className = "badge " + s.status;
  box.stop.disabled = s.status !== "running";
  box.meta.textContent = `Current cycle ${s.current_cycle ?? "—"} · latest checkpoint ` +
    `${s.latest_checkpoint ?? "—"} · hosted ${fmtTime(s.created_at)}`;
}

function renderCharts(box, charts, done) {
  const keys = metricKeys(done);
  if (keys.length === 0) {
    if (changed(box, "empty")) box.replaceChildren(el("p", {class: "empty", text: "No metrics " +
      "yet: charts appear when workers report loss or accuracy with their diffs."}));
    return;
  }
  const groups = new Map();
  for (const k of keys) {
    const [title] = GROUPS.find(([, match]) => match(k));
    if (!groups.has(title)) groups.set(title, []);
    groups.get(title).push(k);
  }
  for (const [title, ks] of groups) {
    let chart = charts.get(title);
    if (chart && chart.keys.join() !== ks.join()) { chart.u?.destroy(); chart = null; }
    if (!chart) { chart = new Chart(title); chart.keys = ks; charts.set(title, chart); }
  }
  const order = GROUPS.map(([t]) => t).filter((t) => groups.has(t));
  if (changed(box, order.map((t) => [t, charts.get(t).keys]))) {
    box.replaceChildren(...order.map((t) => charts.get(t).figure));
  }
  for (const t of order) charts.get(t).update(done);
}

function renderCycles(box, all) {
  const shown = all.slice(-50).reverse();
  // an open cycle that is closing (gathering the server processes' partial sums) says so
  const shownStatus = (c) => (c.closing ? "closing" : c.status);
  const key = (c) => `${c.sequence} ${shownStatus(c)}`;
  const rows = keyedRows(box, shown, key, (c) => {
    const end = c.closed_at ?? null;
    const expired = c.status === "open" ? "—" : String(c.accepted - c.reported);
    return el("tr", {}, el("td", {text: c.sequence}), el("td", {}, badge(shownStatus(c))),
      el("td", {text: fmtTime(c.start)}), el("td", {text: fmtTime(end)}),
      el("td", {text: end ? fmtSecs(end - c.start) : "—"}), el("td", {text: c.accepted}),
      el("td", {text: c.reported}), el("td", {text: c.rejected ?? 0}), el("td", {text: expired}));
  });
  // an open cycle's counts change as workers join, are turned away and report
  const open = shown.find((c) => c.status === "open");
  if (open) {
    const cells = box.rowCache.get(key(open)).children;
    cells[5].textContent = open.accepted;
    cells[6].textContent = open.reported;
    cells[7].textContent = open.rejected ?? 0;
  }
  tableInto(box, ["Cycle", "Status", "Start", "End", "Duration", "Accepted", "Reported",
    "Rejected", "Expired"], rows, "Cycles, newest first (50 shown)", "No cycles yet.");
}

// server_config.evaluation: the metrics workers reported on each evaluated checkpoint
// (their num_samples-weighted means), as a chart and a table
function renderEvaluations(box, config, list) {
  if (!config || list.length === 0) {
    if (changed(box, config ? "none yet" : "off")) {
      box.chart = null;
      box.replaceChildren(el("p", {class: "empty", text: config
        ? `No evaluations yet: one runs after every ${config.every ?? ""} completed cycles, ` +
          "when workers that can evaluate check in."
        : "Not configured: host the process with server_config.evaluation (and an " +
          "evaluation plan) to have workers evaluate its checkpoints on their own data."}));
    }
    return;
  }
  const keys = metricKeys(list);
  if (changed(box, keys)) {
    box.chart?.u?.destroy();
    box.chart = new Chart("Federated evaluation", "checkpoint", "checkpoint");
    box.chart.keys = keys;
    box.rows = el("div");
    box.replaceChildren(box.chart.figure, box.rows);
  }
  box.chart.update(list);
  const rows = keyedRows(box.rows, [...list].reverse(), (e) => JSON.stringify(e), (e) =>
    el("tr", {}, el("td", {text: e.checkpoint}), el("td", {text: fmtTime(e.opened_at)}),
      el("td", {text: e.accepted}), el("td", {text: e.reported}), el("td", {text: e.num_samples}),
      ...keys.map((k) => el("td", {text: fmtNum(e.metrics?.[k])}))));
  tableInto(box.rows, ["Checkpoint", "Opened", "Workers", "Reported", "Examples", ...keys], rows,
    "Federated evaluations, newest first", "No evaluations yet.");
}

function renderWorkers(box, workers) {
  const rows = keyedRows(box, workers,
    (w) => JSON.stringify([w.worker_id, w.ping, w.download, w.upload]),
    (w) => el("tr", {}, el("td", {class: "name", text: w.worker_id.slice(0, 12)}),
      el("td", {text: fmtTime(w.created_at)}), el("td", {text: fmtNum(w.ping)}),
      el("td", {text: fmtNum(w.download)}), el("td", {text: fmtNum(w.upload)})));
  tableInto(box, ["Worker", "Joined", "Ping (ms)", "Download (Mbps)", "Upload (Mbps)"], rows,
    "Workers seen, newest first", "No workers yet.");
}

function renderCheckpoints(box, s, path) {
  const list = [...s.checkpoints].reverse();
  const rows = keyedRows(box, list, (c) => `${c.number} ${c.alias}`, (c) => {
    const href = `api/${path}/checkpoints/${c.number}`;
    return el("tr", {}, el("td", {text: c.number + (c.alias ? ` (${c.alias})` : "")}),
      el("td", {text: fmtTime(c.created_at)}),
      el("td", {}, el("a", {href, download: true, text: "State bytes",
        "aria-label": `checkpoint ${c.number} as State bytes`}), " · ",
        el("a", {href: href + "?format=npz", download: true, text: ".npz",
          "aria-label": `checkpoint ${c.number} as npz`})));
  });
  tableInto(box, ["Checkpoint", "Created", "Download"], rows, "Checkpoints, newest first",
    "No checkpoints.");
}

function renderConfigs(box, s) {
  if (!changed(box, [s.server_config, s.client_config])) return;
  box.replaceChildren(el("h3", {text: "Server config"}),
    el("pre", {tabindex: "0", text: JSON.stringify(s.server_config, null, 2)}),
    el("h3", {text: "Client config"}),
    el("pre", {tabindex: "0", text: JSON.stringify(s.client_config, null, 2)}));
}

// ---------------------------------------------------------------- node
async function nodePage(signal) {
  show(el("h1", {text: "Node"}), el("p", {class: "loading", role: "status", text: "Loading…"}));
  focusHeading();
  while (!signal.aborted) {
    const n = await api("node", {signal});
    const db = n.database;
    const procs = db.server_processes;
    show(el("h1", {text: "Node"}), el("dl", {class: "facts"},
      el("dt", {text: "gridfl version"}), el("dd", {text: n.version}),
      el("dt", {text: "Python"}), el("dd", {text: n.python}),
      el("dt", {text: "Database"}), el("dd", {text: db.kind}),
      el("dt", {text: "Database health"}), el("dd", {},
        badge(db.healthy ? "ok" : "bad"), " ",
        db.healthy ? `answers in ${db.latency_ms} ms` : (db.error || "unreachable")),
      el("dt", {text: "Memory (this server process)"}),
      el("dd", {text: `${fmtNum(n.memory.rss_mb)} MiB now, ${fmtNum(n.memory.peak_rss_mb)} MiB peak`}),
      el("dt", {text: "Server process id"}), el("dd", {text: n.pid})),
      el("h2", {text: "Server processes on the database"}),
      procs === null ? el("p", {class: "muted", text: "Only PostgreSQL lists them (SQLite is " +
          "used by one server process)."})
        : table(["PID (database session)", "Client", "Since"], procs.map((p) => el("tr", {},
          el("td", {text: p.pid}), el("td", {text: p.client_addr ?? "local socket"}),
          el("td", {text: fmtTime(p.since)}))), "Server processes listening on the database"),
      el("p", {class: "muted", text: "Refreshed every 10 s."}));
    await new Promise((resolve) => setTimeout(resolve, 10000));
  }
}

// ---------------------------------------------------------------- router
async function route() {
  if (pageAbort) pageAbort.abort();
  const controller = pageAbort = new AbortController();
  const hash = location.hash || "#/";
  const parts = hash.slice(2).split("/").map(decodeURIComponent);
  try {
    await api("session", {signal: controller.signal});
    nav.hidden = false;
    for (const a of nav.querySelectorAll("a")) {
      const current = a.getAttribute("href") === "#/" + (parts[0] === "node" ? "node" : "");
      if (current) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    }
    if (parts[0] === "process" && parts.length === 3) {
      await processPage(controller.signal, parts[1], parts[2]);
    } else if (parts[0] === "node") await nodePage(controller.signal);
    else await processesPage(controller.signal);
  } catch (e) {
    if (controller === pageAbort) showError(e, route);
  }
}

// the skip link moves the focus without touching the route in the hash
document.querySelector(".skip").addEventListener("click", (ev) => {
  ev.preventDefault();
  main.focus();
});
window.addEventListener("hashchange", () => { if (!location.hash || location.hash.startsWith("#/")) route(); });
window.addEventListener("load", route);
