// The nomoat dashboard: reads /api/snapshot once, then follows /api/events (server-sent events)
// and redraws on every change; it never reloads. Every value from the coordinator is written as
// text (textContent, SVG attributes), never as HTML: job and worker names are other people's input.
"use strict";

const token = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null && value !== false) node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const fmt = {
  loss: (x) => (x === null || x === undefined ? "–" : x.toFixed(4)),
  rate: (x) => (x ? `${x >= 100 ? x.toFixed(0) : x.toFixed(1)} tok/s` : "–"),
  pct: (x) => `${(100 * x).toFixed(0)} %`,
  bytes: (n) => (n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${(n / 1024).toFixed(0)} KiB`),
  duration(s) {
    if (s === null || s === undefined) return "unknown";
    if (s < 90) return `${Math.round(s)} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  },
  ago(t, now) {
    if (!t) return "never";
    const s = Math.max(0, now - t);
    return s < 60 ? `${Math.round(s)} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
  },
  time: (t) => new Date(t * 1000).toLocaleTimeString(),
};

function fill(tbody, rows, empty, columns) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", { class: "empty" }, el("td", { colspan: columns }, empty))]));
}

function renderSummary(d) {
  const latest = d.versions[0];
  const active = d.workers.filter((w) => w.state === "active").length;
  const running = d.jobs.filter((j) => j.state === "running").length;
  $("summary").replaceChildren(
    el("span", {}, "version ", el("b", { id: "latest-version" }, latest ? latest.version : "–")),
    el("span", {}, "held-out loss ", el("b", {}, fmt.loss(d.loss_curve.length ? d.loss_curve[d.loss_curve.length - 1].loss : null))),
    el("span", {}, el("b", {}, active), " active workers"),
    el("span", {}, el("b", {}, fmt.rate(d.tokens_per_s))),
    el("span", {}, el("b", {}, running), " running jobs"),
  );
}

function renderJobs(d) {
  if (!d.jobs.length) return;
  $("jobs").replaceChildren(...d.jobs.map((j) => {
    const finished = (j.tasks.done || 0) + (j.tasks.failed || 0);
    const facts = [
      `${finished} of ${j.total_tasks} tasks finished`,
      `${j.tasks.leased || 0} training`,
      `${j.adapters_folded} adapters folded`,
      j.adapters_rejected ? `${j.adapters_rejected} rejected` : null,
      j.state === "running" ? `ETA ${fmt.duration(j.eta_s)}` : null,
      j.training ? `trains at ${j.training}` : null,
    ].filter(Boolean);
    return el("article", { class: `job ${j.state}`, "data-job": j.job_id, "data-finished": finished },
      el("div", { class: "job-head" },
        el("span", { class: "job-name" }, j.name || j.job_id),
        el("span", { class: "job-id" }, j.job_id),
        el("span", { class: `badge ${j.state}` }, j.state)),
      el("div", { class: "job-bar" },
        el("progress", { class: "job-progress", max: j.total_tasks || 1, value: finished }),
        el("span", { class: "job-pct" }, fmt.pct(j.progress))),
      el("p", { class: "job-facts" }, facts.join(" · ")),
      j.warning ? el("p", { class: "warning" }, j.warning) : null,
      j.error ? el("p", { class: "error" }, j.error) : null);
  }));
}

// Optional columns appear when the coordinator's worker summaries carry the field (trust, kind).
const OPTIONAL = [["kind", "kind", (w) => w.kind], ["trust", "trust", (w) => (typeof w.trust === "number" ? w.trust.toFixed(2) : w.trust)]];

function renderWorkers(d) {
  const optional = OPTIONAL.filter(([field]) => d.workers.some((w) => w[field] !== undefined && w[field] !== ""));
  const head = ["name", ...optional.map(([, label]) => label), "card", "tokens/s", "tasks done", "state", "last seen"];
  $("workers").tHead.rows[0].replaceChildren(...head.map((h) => el("th", {}, h)));
  fill($("workers").tBodies[0], d.workers.map((w) => {
    const card = w.card || {};
    const cardText = card.name ? `${card.name}${card.vram_gb ? ` · ${card.vram_gb} GB` : ""}${card.simulated ? " (simulated)" : ""}${card.loads_4bit ? " · 4-bit" : ""}` : "–";
    return el("tr", { class: w.state, "data-worker": w.worker_id },
      el("td", {}, el("span", { class: "worker-name" }, w.name), el("span", { class: "dim" }, ` ${w.worker_id}`)),
      ...optional.map(([, , get]) => el("td", {}, get(w) ?? "–")),
      el("td", {}, cardText),
      el("td", { class: "num" }, fmt.rate(w.tokens_per_s)),
      el("td", { class: "num" }, w.tasks_done),
      el("td", {}, el("span", { class: `badge ${w.state}` }, w.state)),
      el("td", {}, fmt.ago(w.last_seen, d.at)));
  }), "No workers yet: nomoat worker start --coordinator HOST:PORT", head.length);
}

function renderChart(points) {
  const svg = $("loss-chart");
  const W = 720, H = 240, L = 56, R = 16, T = 14, B = 32;
  const children = [];
  if (!points.length) {
    children.push(el("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis" }, "no held-out loss measured yet"));
    svg.replaceChildren(...children);
    return;
  }
  const vs = points.map((p) => p.version), ls = points.map((p) => p.loss);
  const v0 = Math.min(...vs), v1 = Math.max(...vs);
  let l0 = Math.min(...ls), l1 = Math.max(...ls);
  if (l1 - l0 < 1e-9) { l0 -= 0.05; l1 += 0.05; }
  const pad = (l1 - l0) * 0.08;
  l0 -= pad; l1 += pad;
  const x = (v) => (v1 === v0 ? (L + W - R) / 2 : L + ((v - v0) / (v1 - v0)) * (W - L - R));
  const y = (l) => T + ((l1 - l) / (l1 - l0)) * (H - T - B);
  const digits = Math.min(6, Math.max(2, Math.ceil(-Math.log10((l1 - l0) / 4)) + 1));  // labels that differ
  for (let i = 0; i <= 4; i++) {  // horizontal grid with loss labels
    const l = l0 + ((l1 - l0) * i) / 4;
    children.push(el("svg:line", { x1: L, x2: W - R, y1: y(l), y2: y(l), class: "grid" }));
    children.push(el("svg:text", { x: L - 6, y: y(l) + 4, "text-anchor": "end", class: "axis" }, l.toFixed(digits)));
  }
  const ticks = [...new Set([v0, Math.round((v0 + v1) / 2), v1])];
  for (const v of ticks) {
    children.push(el("svg:text", { x: x(v), y: H - 10, "text-anchor": "middle", class: "axis" }, `v${v}`));
  }
  children.push(el("svg:polyline", { points: points.map((p) => `${x(p.version)},${y(p.loss)}`).join(" "), class: "curve" }));
  for (const p of points) {
    children.push(el("svg:circle", { cx: x(p.version), cy: y(p.loss), r: 4, class: `point ${p.measured_as}`,
                                     "data-version": p.version, "data-loss": p.loss },
      el("svg:title", {}, `version ${p.version}: ${p.loss.toFixed(4)}${p.measured_as === "base" ? " (before the first fold)" : ""}`)));
  }
  svg.replaceChildren(...children);
}

function renderVersions(d) {
  renderChart(d.loss_curve);
  const losses = new Map(d.loss_curve.map((p) => [p.version, p.loss]));
  const names = new Map(d.workers.map((w) => [w.worker_id, w.name]));
  fill($("versions").tBodies[0], d.versions.map((v) => {
    const made = v.operation || (v.version === 0 ? "base model" : `fold of ${v.adapters}`);
    const chips = v.contributions.map((c) => el("span", {
      class: "chip", title: `adapter ${c.adapter_id} by worker ${c.worker || "?"}: ${c.tokens} tokens, train loss ${fmt.loss(c.train_loss)}`,
    }, `${names.get(c.worker) || c.worker || "?"} · ${(100 * c.weight).toFixed(0)} %`));
    return el("tr", { "data-version": v.version },
      el("td", { class: "num" }, v.version),
      el("td", { class: "num" }, v.parent >= 0 ? v.parent : "–"),
      el("td", { class: "num" }, fmt.loss(losses.has(v.version) ? losses.get(v.version) : v.eval_loss)),
      el("td", {}, made),
      el("td", {}, ...(chips.length ? chips : ["–"])),
      el("td", {}, fmt.time(v.created)));
  }), "No versions yet.", 6);
}

function renderRefusals(d) {
  fill($("refusals").tBodies[0], d.refusals.map((r) => el("tr", {},
    el("td", {}, fmt.time(r.at)),
    el("td", {}, r.stage),
    el("td", {}, el("span", { class: "chip" }, r.kind)),
    el("td", { class: "reason" }, r.reason),
    el("td", { class: "dim" }, r.task || "–"),
    el("td", { class: "dim" }, r.worker || "–"))), "Nothing refused.", 6);
}

function render(d) {
  renderSummary(d);
  renderJobs(d);
  renderVersions(d);
  renderWorkers(d);
  renderRefusals(d);
  document.body.dataset.updated = String(d.at);
}

function setLive(state, text) {
  $("live").dataset.state = state;
  $("live").textContent = text;
}

function problem(text) {
  $("problem").textContent = text;
  $("problem").hidden = !text;
}

async function start() {
  const reply = await fetch("/api/snapshot", { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
  if (!reply.ok) {
    problem(await reply.text());
    setLive("refused", "refused");
    return;
  }
  render(await reply.json());
  const events = new EventSource(`/api/events?token=${encodeURIComponent(token)}`);
  events.addEventListener("open", () => { setLive("live", "live"); problem(""); });
  events.addEventListener("snapshot", (e) => { render(JSON.parse(e.data)); setLive("live", "live"); });
  events.addEventListener("refused", (e) => { events.close(); setLive("refused", "refused"); problem(JSON.parse(e.data)); });
  events.addEventListener("error", () => setLive("reconnecting", "reconnecting…"));
}

start().catch((err) => { setLive("reconnecting", "unreachable"); problem(`The coordinator did not answer: ${err}`); });
