// AutoGLM ops console: renders what /events pushes (Server-Sent Events), posts control events.
// No build step, no dependency: the charts are hand-drawn SVG.
"use strict";

const HORIZON_MS = 15 * 60 * 1000;
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];
const view = { workers: [], models: {}, pipelines: {}, history: new Map(), commands: new Map(), deadLetters: [], skewMs: 0 };

const $ = (sel, root = document) => root.querySelector(sel);
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else if (k === "title") node.title = v;
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}
const fmt = (v, digits = 1) => (v === null || v === undefined ? "-" : Number(v).toFixed(digits));
const int = (v) => (v === null || v === undefined ? "-" : String(Math.round(v)));
const colorOf = (name) => {
  const names = [...new Set(view.workers.map((w) => w.worker))].sort();
  const i = names.indexOf(name);
  return PALETTE[(i < 0 ? names.length : i) % PALETTE.length];
};

// ---- control ----------------------------------------------------------------------

async function publish(body) {
  const error = $("#control-error");
  error.textContent = "";
  let response;
  try {
    response = await fetch("/api/control", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-AutoGLM-Console": "1" },
      body: JSON.stringify(body),
    });
  } catch (exc) {
    error.textContent = `not sent: ${exc}`;
    return;
  }
  const doc = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) {
    error.textContent = doc.error || `HTTP ${response.status}`;
    return;
  }
  // the Server-Sent Events stream may have brought this command already, with acks newer than
  // this response (a fast worker acks before the POST's answer reaches the page): keep those
  if (!view.commands.has(doc.event_id)) view.commands.set(doc.event_id, doc);
  renderCommands();
}

// what a control target selects, in words: its keys combine with "and" (processors/control.py)
function describeTarget(target, none = "all models") {
  const parts = [];
  if (target.model) parts.push(`model ${target.model}`);
  if (target.pipeline) parts.push(target.step ? `step ${target.step} of pipeline ${target.pipeline}` : `pipeline ${target.pipeline}`);
  return `${parts.length ? parts.join(" and ") : none} on ${target.worker ? "worker " + target.worker : "all workers"}`;
}

// pause/resume (and drain for a whole worker) for a target {model?, pipeline?, step?, worker?}
function controlButtons(target) {
  const box = el("span", { class: "buttons" });
  const actions = target.model || target.pipeline ? ["pause", "resume"] : ["pause", "resume", "drain"];
  for (const action of actions) {
    const body = { command: action, model: target.model || "", worker: target.worker || "",
      pipeline: target.pipeline || "", step: target.step || "" };
    box.append(el("button", {
      type: "button", class: `act ${action}`, "data-action": action,
      "data-model": body.model, "data-worker": body.worker, "data-pipeline": body.pipeline, "data-step": body.step,
      title: `${action} ${describeTarget(target, "every model")}`,
      onclick: () => publish(body),
    }, action));
  }
  return box;
}

// enables the form's fields that the chosen command takes (set up by setupForm)
let toggleForm = () => {};

function setupForm() {
  const form = $("#control-form");
  const toggle = () => {
    const command = $("#control-command").value;
    $("#configure-fields").disabled = command !== "configure";
    $("#control-model").disabled = ["drain", "load"].includes(command);
    $("#control-model-name").disabled = command !== "load";
    // load/unload/reload act on a model's own topic, drain on whole workers: no pipeline (guard.py)
    $("#control-pipeline").disabled = ["drain", "load", "unload", "reload"].includes(command);
    $("#control-step").disabled = $("#control-pipeline").disabled || !$("#control-pipeline").value;
  };
  $("#control-command").addEventListener("change", toggle);
  $("#control-pipeline").addEventListener("change", () => { syncSteps(); toggle(); });
  toggleForm = toggle;
  toggle();
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const data = new FormData(form);
    const command = data.get("command");
    const model = command === "drain" ? "" : command === "load" ? (data.get("model_name") || "").trim() : data.get("model") || "";
    const body = { command, model, worker: data.get("worker") || "",
      pipeline: data.get("pipeline") || "", step: data.get("pipeline") ? data.get("step") || "" : "" };
    if (command === "configure") {
      body.params = {};
      for (const name of ["latency_target_s", "max_batch_size", "max_wait_s", "mode"]) {
        const value = (data.get(name) || "").trim();
        if (value !== "") body.params[name] = value;
      }
    }
    publish(body);
  });
}

function syncSteps() {
  const pipeline = view.pipelines[$("#control-pipeline").value];
  syncSelect($("#control-step"), pipeline ? pipeline.steps.map((s) => s.step) : [], "every step");
}

function syncSelect(select, values, allLabel) {
  const current = select.value;
  const wanted = ["", ...values];
  const have = [...select.options].map((o) => o.value);
  if (wanted.join("\n") === have.join("\n")) return;
  select.replaceChildren(...wanted.map((v) => el("option", { value: v }, v === "" ? allLabel : v)));
  select.value = wanted.includes(current) ? current : "";
}

// ---- rendering --------------------------------------------------------------------

// the streams of a worker that are models on their own topics (pipeline steps carry `pipeline`)
const plainModels = (w) => Object.keys(w.models).filter((m) => !w.models[m].pipeline).sort();

function renderWorkers() {
  const body = $("#workers tbody");
  const rows = view.workers.map((w) => {
    const models = Object.keys(w.models).sort();
    const plain = plainModels(w);
    const pipes = Object.keys(w.pipelines || {}).sort();
    const served = plain.concat(pipes.map((p) => `${p} [${Object.keys(w.pipelines[p].steps).join(", ")}]`));
    const states = plain.map((m) => `${m}: ${w.models[m].state}`).concat(pipes.map((p) => `${p}: ${w.pipelines[p].state}`));
    const totals = w.totals || {};
    const servedTotal = models.reduce((s, m) => s + (w.models[m].served_total || 0), 0);
    // errors since start: the worker's totals, else the per-model status totals, else unknown
    const perModel = models.filter((m) => w.models[m].totals);
    const errors = totals.results_error ?? (perModel.length
      ? perModel.reduce((s, m) => s + Object.entries(w.models[m].totals).filter(([k]) => k !== "ok")
        .reduce((a, [, v]) => a + v, 0), 0)
      : null);
    return el("tr", { "data-worker": w.worker, class: w.liveness },
      el("td", {}, el("span", { class: `badge ${w.liveness}` }, w.liveness)),
      el("td", { class: "id" }, w.worker),
      el("td", {}, served.join(", ")),
      el("td", { class: "state" }, w.state === "running" ? states.join(", ") : w.state),
      el("td", { class: "num" }, w.max_in_flight ? `${int(w.in_flight)} / ${w.max_in_flight}` : int(w.in_flight)),
      el("td", { class: "num age" }, w.age_s === null ? "-" : `${fmt(w.age_s)} s`),
      el("td", { class: "num" }, String(servedTotal)),
      el("td", { class: "num" }, errors === null ? "-" : String(errors)),
      el("td", { class: "num" }, totals.dead_letters === undefined ? "-" : String(totals.dead_letters)),
      el("td", {}, w.liveness === "live" ? controlButtons({ worker: w.worker }) : ""));
  });
  body.replaceChildren(...rows);
  const live = view.workers.filter((w) => w.liveness === "live").length;
  $("#summary").textContent = `${live} live worker(s), ${Object.keys(view.models).length} model(s), `
    + `${Object.keys(view.pipelines).length} pipeline(s)`;
  syncSelect($("#control-worker"), view.workers.map((w) => w.worker).sort(), "all workers");
  // a model target selects its own topic and every pipeline step running it
  syncSelect($("#control-model"), [...new Set(view.workers.flatMap((w) =>
    Object.values(w.models).filter((f) => f.pipeline).map((f) => f.runs).concat(plainModels(w))))].sort(), "all models");
  syncSelect($("#control-pipeline"), Object.keys(view.pipelines).sort(), "no pipeline");
  syncSteps();
  toggleForm();
}

// one row per worker serving the stream `model` (a model, or a step `<pipeline>/<step>`);
// targetOf(worker) is what that row's buttons act on
function modelRows(model, targetOf = (worker) => ({ model, worker })) {
  const rows = [];
  for (const w of view.workers) {
    const f = w.models[model];
    if (!f || w.liveness === "stopped") continue;
    rows.push(el("tr", { "data-worker": w.worker, "data-model": model },
      el("td", {}, el("span", { class: "swatch" }), w.worker),
      el("td", { class: "state" }, f.state),
      el("td", { class: "num" }, fmt(f.throughput_per_s)),
      el("td", { class: "num" }, fmt(f.p50_ms)),
      el("td", { class: "num" }, fmt(f.p99_ms)),
      el("td", { class: "num" }, fmt(f.mean_batch_size)),
      el("td", { class: "num" }, int(f.target_size)),
      el("td", { class: "num" }, `${f.mode || "-"} ${f.latency_target_s ? fmt(f.latency_target_s * 1000, 0) + " ms" : ""}`),
      el("td", { class: "num", title: "EWMA fixed cost a, per-task cost b, spread sigma (ms)" },
        `${fmt(f.service_fixed_ms, 2)} + ${fmt(f.service_per_task_ms, 3)}·n ± ${fmt(f.service_spread_ms, 2)}`),
      el("td", { class: "num" }, int(f.queue_depth)),
      el("td", { class: "num" }, int(f.lag)),
      el("td", { class: "num" }, String(f.served_total ?? "-")),
      el("td", {}, w.liveness === "live" ? controlButtons(targetOf(w.worker)) : "")));
    rows[rows.length - 1].firstChild.firstChild.style.background = colorOf(w.worker);
  }
  return rows;
}

// the aggregate figures of a model or a pipeline step over the live workers (state.py aggregate_model)
function kpis(agg) {
  return [
    el("span", { class: "kpi" }, el("b", {}, fmt(agg.throughput_per_s)), " tasks/s"),
    el("span", { class: "kpi" }, el("b", {}, fmt(agg.p99_ms)), " ms p99 (worst)"),
    el("span", { class: "kpi" }, el("b", {}, fmt(agg.mean_batch_size)), " mean batch"),
    el("span", { class: "kpi" }, el("b", {}, int(agg.queue_depth)), " queued"),
    el("span", { class: "kpi" }, el("b", {}, int(agg.lag)), " lag"),
    el("span", { class: "kpi" }, el("b", {}, String(agg.served_total ?? "-")), " served"),
  ];
}

function perWorkerTable(stream, targetOf) {
  return el("table", { class: "per-worker" },
    el("thead", {}, el("tr", {}, ...["worker", "state", "tasks/s", "p50 ms", "p99 ms", "batch", "target",
      "mode, SLO", "EWMA a + b·n ± σ (ms)", "queue", "lag", "served", "control"].map((h, i) =>
      el("th", { class: i >= 2 && i <= 11 ? "num" : "" }, h)))),
    el("tbody", {}, ...modelRows(stream, targetOf)));
}

function charts(stream) {
  return el("div", { class: "charts" },
    chart(stream, "throughput_per_s", "throughput, tasks/s"),
    chart(stream, "p99_ms", "p99 end to end, ms", targetLine(stream)),
    chart(stream, "mean_batch_size", "mean batch (solid) vs adaptive target (dashed), log scale", null,
      "target_size", true));
}

function renderModels() {
  const box = $("#models");
  const names = [...new Set(view.workers.flatMap(plainModels))].sort();
  const cards = names.map((model) => {
    const agg = view.models[model] || {};
    return el("article", { class: "model", "data-model": model },
      el("div", { class: "model-head" }, el("h3", {}, model), ...kpis(agg), controlButtons({ model })),
      perWorkerTable(model), charts(model));
  });
  box.replaceChildren(...cards);
}

// a pipeline: its state per worker (paused = every step paused there), pause/resume for the whole
// pipeline (target {pipeline}), then each step as a model card (target {pipeline, step})
function renderPipelines() {
  const names = Object.keys(view.pipelines).sort();
  $("#pipelines-section").hidden = names.length === 0;
  $("#pipelines").replaceChildren(...names.map((p) => {
    const pipe = view.pipelines[p];
    const byWorker = new Map(view.workers.map((w) => [w.worker, w]));
    const workerRows = Object.entries(pipe.workers).sort().map(([worker, state]) => {
      const steps = byWorker.get(worker)?.pipelines?.[p]?.steps || {};
      const row = el("tr", { "data-worker": worker },
        el("td", {}, el("span", { class: "swatch" }), worker),
        el("td", { class: "state" }, state),
        el("td", { class: "steps" }, Object.entries(steps).map(([s, st]) => `${s}: ${st}`).join(", ")),
        el("td", {}, controlButtons({ pipeline: p, worker })));
      row.firstChild.firstChild.style.background = colorOf(worker);
      return row;
    });
    return el("article", { class: "pipeline", "data-pipeline": p },
      el("div", { class: "model-head pipeline-head" },
        el("h3", {}, p),
        el("span", { class: `state pstate ${pipe.state.replace(" ", "-")}` }, pipe.state),
        el("span", { class: "kpi" }, `${pipe.steps.length} step(s): `,
          el("b", {}, pipe.steps.map((s) => `${s.step} (${s.runs})`).join(" \u2192 "))),
        controlButtons({ pipeline: p })),
      el("table", { class: "pipeline-workers" },
        el("thead", {}, el("tr", {}, ...["worker", "pipeline state", "steps", "control"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...workerRows)),
      ...pipe.steps.map((s) => el("section", { class: "step", "data-step": s.step, "data-stream": s.stream },
        el("div", { class: "model-head step-head" },
          el("h4", {}, s.step), el("span", { class: "runs", title: "the model this step runs" }, `runs ${s.runs}`),
          ...kpis(s), controlButtons({ pipeline: p, step: s.step })),
        perWorkerTable(s.stream, (worker) => ({ pipeline: p, step: s.step, worker })),
        charts(s.stream))));
  }));
}

function targetLine(model) {
  const targets = view.workers.map((w) => w.models[model]?.latency_target_s).filter((v) => v);
  return targets.length ? Math.max(...targets) * 1000 : null;
}

// ---- charts (SVG) -----------------------------------------------------------------

function chart(model, field, title, refValue = null, dashedField = null, logScale = false) {
  const W = 420, H = 150, L = 44, R = 8, T = 18, B = 20;
  const now = Date.now() - view.skewMs;
  const series = [];
  for (const [key, points] of view.history) {
    const [worker, m] = key.split("\u0000");
    if (m !== model) continue;
    series.push({ worker, field, points, dashed: false });
    if (dashedField) series.push({ worker, field: dashedField, points, dashed: true });
  }
  let max = refValue || 0;
  for (const s of series) for (const p of s.points) if (p[s.field] !== null && p[s.field] > max) max = p[s.field];
  max = logScale ? Math.max(2, max * 1.2) : max > 0 ? max * 1.1 : 1;
  // the x axis spans the data kept, from 2 minutes up to the 15-minute horizon
  let oldest = now;
  for (const s of series) if (s.points.length && s.points[0].t < oldest) oldest = s.points[0].t;
  const span = Math.min(HORIZON_MS, Math.max(2 * 60000, Math.ceil((now - oldest) / 60000) * 60000));
  const x = (t) => L + ((t - (now - span)) / span) * (W - L - R);
  // log scale (batch sizes: a target of 256 and batches of 4 on one chart): log2, from 1
  const y = logScale
    ? (v) => T + (1 - Math.log2(Math.max(v, 1)) / Math.log2(max)) * (H - T - B)
    : (v) => T + (1 - v / max) * (H - T - B);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("data-field", field);
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  add("text", { x: L, y: 12, class: "chart-title" }, title);
  const ticks = logScale
    ? [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536].filter((v) => v <= max)
    : [0, 0.5, 1].map((frac) => max * frac);
  for (const v of ticks) {
    add("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" });
    add("text", { x: L - 4, y: y(v) + 4, class: "tick", "text-anchor": "end" },
      logScale || v >= 100 ? v.toFixed(0) : v.toFixed(1));
  }
  const step = span > 6 * 60000 ? 5 : span > 3 * 60000 ? 2 : 1;
  for (let minutes = Math.floor(span / 60000 / step) * step; minutes >= 0; minutes -= step) {
    add("text", { x: x(now - minutes * 60000), y: H - 4, class: "tick", "text-anchor": "middle" },
      minutes ? `-${minutes} min` : "now");
  }
  if (refValue) add("line", { x1: L, x2: W - R, y1: y(refValue), y2: y(refValue), class: "ref" });
  for (const s of series) {
    const pts = s.points.filter((p) => p[s.field] !== null && p[s.field] !== undefined && p.t >= now - span);
    if (!pts.length) continue;
    const d = pts.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p[s.field]).toFixed(1)}`).join("");
    add("path", { d, class: s.dashed ? "line dashed" : "line", stroke: colorOf(s.worker) });
    if (pts.length === 1) add("circle", { cx: x(pts[0].t), cy: y(pts[0][s.field]), r: 2.5, fill: colorOf(s.worker) });
  }
  return svg;
}

function renderCommands() {
  const items = [...view.commands.values()].sort((a, b) => b.issued_ms - a.issued_ms).slice(0, 12);
  $("#commands").replaceChildren(...items.map((c) => {
    const what = `${c.command} ${describeTarget(c.target)}`
      + (Object.keys(c.params || {}).length ? " " + JSON.stringify(c.params) : "");
    const acks = Object.entries(c.acks).sort().map(([worker, a]) =>
      el("li", { "data-worker": worker, class: `ack ${a.status}` },
        el("b", {}, worker), `: ${a.status}`, a.latency_ms !== null ? ` in ${a.latency_ms} ms` : "",
        a.reason ? ` (${a.reason})` : ""));
    if (!acks.length) acks.push(el("li", { class: "ack none" }, "no live worker targeted; the state is kept in the control topic"));
    return el("div", { class: "command", "data-event": c.event_id, "data-command": c.command,
      "data-pipeline": c.target.pipeline || "", "data-step": c.target.step || "", "data-model": c.target.model || "" },
      el("span", { class: "when" }, new Date(c.issued_ms).toLocaleTimeString()), " ", what,
      el("ul", {}, ...acks));
  }));
}

function renderDeadLetters() {
  $("#dead-letters tbody").replaceChildren(...view.deadLetters.slice().reverse().map((d) =>
    el("tr", {},
      el("td", {}, d.time_ms ? new Date(d.time_ms).toLocaleTimeString() : "-"),
      el("td", { class: "code" }, d.code), el("td", { class: "message" }, d.message),
      el("td", {}, d.source_topic), el("td", { class: "num" }, d.source_partition),
      el("td", { class: "num" }, d.source_offset), el("td", {}, d.worker))));
}

function renderAll() {
  renderWorkers();
  renderPipelines();
  renderModels();
  renderCommands();
  renderDeadLetters();
}

// ---- the event stream -------------------------------------------------------------

function apply(msg) {
  switch (msg.type) {
    case "snapshot":
      view.skewMs = Date.now() - msg.now_ms;
      view.workers = msg.workers;
      view.models = msg.models;
      view.pipelines = msg.pipelines || {};
      view.history = new Map(msg.history.map((h) => [`${h.worker}\u0000${h.model}`, h.points]));
      view.commands = new Map(msg.commands.map((c) => [c.event_id, c]));
      view.deadLetters = msg.dead_letters;
      renderAll();
      break;
    case "workers":
      view.skewMs = Date.now() - msg.now_ms;
      view.workers = msg.workers;
      view.models = msg.models;
      view.pipelines = msg.pipelines || {};
      renderWorkers();
      renderPipelines();
      renderModels();
      break;
    case "points":
      for (const [model, point] of Object.entries(msg.points)) {
        const key = `${msg.worker}\u0000${model}`;
        const pts = view.history.get(key) || [];
        pts.push(point);
        while (pts.length && pts[0].t < point.t - HORIZON_MS) pts.shift();
        view.history.set(key, pts);
      }
      break;
    case "command":
      view.commands.set(msg.command.event_id, msg.command);
      renderCommands();
      break;
    case "dead_letter":
      view.deadLetters.push(msg.dead_letter);
      if (view.deadLetters.length > 50) view.deadLetters.shift();
      renderDeadLetters();
      break;
  }
}

function connect() {
  const badge = $("#connection");
  const source = new EventSource("/events");
  source.onopen = () => { badge.textContent = "live"; badge.className = "badge live"; };
  source.onerror = () => { badge.textContent = "reconnecting"; badge.className = "badge stale"; };
  source.onmessage = (ev) => apply(JSON.parse(ev.data));
}

document.addEventListener("DOMContentLoaded", () => {
  setupForm();
  connect();
});
