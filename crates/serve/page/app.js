// The planner page: form <-> URL, calls to /api/estimate and /api/plan (the same JSON as
// `scaletrain estimate --json` / `plan --json`), and the views drawn from that JSON.
// Every shown number carries its raw JSON value in data-value and its JSON path in data-key.
"use strict";

const $ = s => document.querySelector(s);
const $$ = s => Array.from(document.querySelectorAll(s));

const MODEL_KEYS = {
  preset: ["model"],
  params: ["params"],
  shape: ["layers", "hidden", "heads", "kv-heads", "ffn-hidden", "vocab"],
  hf: ["hf-config-json"],
};
const COMMON_KEYS = ["seq-len", "gpu", "gpus", "gpus-per-node", "price-per-gpu-hour",
  "tokens", "global-batch", "precision", "optimizer", "recompute"];
const LAYOUT_KEYS = ["dp", "tp", "pp", "vpp", "micro-batch", "zero", "sequence-parallel", "pp-layers"];
const PLAN_KEYS = ["objective", "top", "deadline-days", "budget-usd"];
const DEFAULT_TOP = "20";

const state = { seq: 0, shown: 0, sort: { key: null, desc: false }, est: null, plan: null, timer: null };

// ---------- formatting ----------
const GIB = 1024 ** 3;
const fmtGiB = v => `${(v / GIB).toFixed(2)} GiB`;
function fmtSecs(s) {
  if (!isFinite(s)) return String(s);
  if (s >= 86400) return `${(s / 86400).toFixed(2)} d`;
  if (s >= 1) return `${s.toFixed(3)} s`;
  if (s >= 1e-3) return `${(s * 1e3).toFixed(2)} ms`;
  return `${(s * 1e6).toFixed(1)} us`;
}
const fmtPct = v => `${(v * 100).toFixed(1)}%`;
const fmtInt = v => Math.round(v).toLocaleString("en-US");
const fmtUsd = v => `$${Math.round(v).toLocaleString("en-US")}`;
const fmtDays = v => `${v.toFixed(1)}`;
function fmtCount(v) {
  const units = [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "K"]];
  for (const [d, u] of units) if (Math.abs(v) >= d) return `${(v / d).toFixed(3)}${u}`;
  return String(v);
}
function fmtExplainValue(l) {
  switch (l.unit) {
    case "bytes": return fmtGiB(l.value);
    case "s": return fmtSecs(l.value);
    case "ratio": return fmtPct(l.value);
    case "params": return fmtCount(l.value);
    default: return `${Math.abs(l.value) >= 1e6 ? l.value.toExponential(4) : l.value.toFixed(4)} ${l.unit}`;
  }
}
function get(obj, path) { return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj); }
function esc(s) { return String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }

// ---------- form and URL ----------
function field(name) { return document.querySelector(`#inputs [name="${name}"]`); }
function valueOf(name) {
  const f = field(name);
  if (!f) return "";
  if (f.type === "checkbox") return f.checked ? "true" : "";
  return f.value.trim();
}
function setValue(name, v) {
  const f = field(name);
  if (!f) return;
  if (f.type === "checkbox") f.checked = v === "true" || v === "1" || v === "on";
  else f.value = v;
}
const source = () => $("#source").value;
const auto = () => $("#auto").checked;

// The flags one command gets: {name: value} with empty values left out.
function inputsFor(kind) {
  const keys = [...MODEL_KEYS[source()], ...COMMON_KEYS];
  if (kind === "estimate" && !auto()) keys.push(...LAYOUT_KEYS);
  if (kind === "plan") keys.push(...PLAN_KEYS);
  const out = {};
  for (const k of keys) {
    const v = valueOf(k);
    if (v !== "") out[k] = v;
  }
  if (kind === "plan" && !out.top) out.top = DEFAULT_TOP;
  return out;
}

function writeUrl() {
  const p = new URLSearchParams();
  p.set("source", source());
  if (!auto()) p.set("auto", "0");
  const keys = new Set([...MODEL_KEYS[source()], ...COMMON_KEYS, ...(auto() ? [] : LAYOUT_KEYS), ...PLAN_KEYS]);
  for (const k of keys) {
    const v = valueOf(k);
    if (v !== "" && !(k === "top" && v === DEFAULT_TOP)) p.set(k, v);
  }
  if (state.sort.key) p.set("sort", (state.sort.desc ? "-" : "") + state.sort.key);
  history.replaceState(null, "", "?" + p.toString());
}

function readUrl() {
  const p = new URLSearchParams(location.search);
  let src = p.get("source");
  if (!src) src = p.has("hf-config-json") ? "hf" : p.has("params") ? "params" : p.has("layers") && !p.has("model") ? "shape" : "preset";
  $("#source").value = MODEL_KEYS[src] ? src : "preset";
  // A link without `auto` that names layout flags (hand-written) means those flags.
  $("#auto").checked = p.has("auto") ? p.get("auto") !== "0" : !LAYOUT_KEYS.some(k => p.has(k));
  for (const [k, v] of p) {
    if (k === "sort") {
      state.sort = { key: v.replace(/^-/, ""), desc: v.startsWith("-") };
    } else if (field(k)) {
      setValue(k, v);
    }
  }
}

function showSource() {
  for (const el of $$(".src")) el.hidden = !el.classList.contains(`src-${source()}`);
  $("#layout-fields").classList.toggle("off", auto());
}

// ---------- the equivalent command lines ----------
function shq(s) { return /^[A-Za-z0-9_.,:/=+@%-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`; }
function commandFor(kind, inputs) {
  const parts = ["scaletrain", kind];
  for (const [k, v] of Object.entries(inputs)) {
    if (k === "hf-config-json") { parts.push("--hf-config", "config.json"); continue; }
    if (k === "sequence-parallel") { if (v === "true") parts.push("--sequence-parallel"); continue; }
    parts.push(`--${k}`, shq(v));
  }
  let s = parts.join(" ");
  if (inputs["hf-config-json"]) s += "   # the pasted text saved as config.json";
  return s;
}
function copyText(text, button) {
  const done = () => { const t = button.textContent; button.textContent = "Copied"; setTimeout(() => { button.textContent = t; }, 1200); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
  } else fallbackCopy(text, done);
}
function fallbackCopy(text, done) {
  const ta = document.createElement("textarea");
  ta.value = text; document.body.appendChild(ta); ta.select();
  try { document.execCommand("copy"); done(); } catch (_) { /* the text stays visible to copy by hand */ }
  ta.remove();
}

// ---------- errors ----------
function clearErrors() {
  for (const e of $$(".err")) e.textContent = "";
  for (const f of $$(".invalid")) f.classList.remove("invalid");
}
function showError(err) {
  const target = err.field && document.querySelector(`.err[data-for="${err.field}"]`);
  const f = err.field && field(err.field);
  // Under its field when that field is on screen (not in a hidden model source or layout).
  if (target && f && f.offsetParent !== null && !f.closest(".off")) {
    if (!target.textContent.includes(err.error)) target.textContent += (target.textContent ? "\n" : "") + err.error;
    f.classList.add("invalid");
  } else {
    const g = $("#err-global");
    const text = (err.field ? `${err.field}: ` : "") + err.error;
    if (!g.textContent.includes(text)) g.textContent += (g.textContent ? "\n" : "") + text;
  }
}

// ---------- API ----------
async function call(path, body) {
  let r;
  try {
    r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  } catch (e) {
    return { error: { error: `cannot reach the scaletrain server (${e.message}); is \`scaletrain serve\` still running?`, field: null } };
  }
  const text = await r.text();
  let json;
  try { json = JSON.parse(text); } catch (_) { return { error: { error: `HTTP ${r.status}: ${text.slice(0, 300)}`, field: null } }; }
  return r.ok ? { json } : { error: json };
}

function schedule() {
  clearTimeout(state.timer);
  state.timer = setTimeout(update, 150);
  document.body.dataset.state = "loading";
}

async function update() {
  const seq = ++state.seq;
  document.body.dataset.state = "loading";
  writeUrl();
  const ei = inputsFor("estimate"), pi = inputsFor("plan");
  $("#cmd-estimate").textContent = commandFor("estimate", ei);
  $("#cmd-plan").textContent = commandFor("plan", pi);
  const [e, p] = await Promise.all([call("/api/estimate", { ...ei, explain: true }), call("/api/plan", pi)]);
  if (seq !== state.seq) return; // a newer update is on its way
  clearErrors();
  if (e.error) showError(e.error); else renderEstimate(e.json);
  if (p.error) showError(p.error); else renderPlan(p.json);
  // Views whose inputs failed keep their last numbers, marked stale.
  for (const id of ["#summary-line", "#cards", ".charts"]) $(id).classList.toggle("stale", !!e.error);
  for (const id of [".plan", "#rejected"]) $(id).classList.toggle("stale", !!p.error);
  document.body.dataset.state = e.error || p.error ? "error" : "ready";
  document.body.dataset.seq = String(seq);
}

// ---------- explain ----------
function openExplain(spec, title) {
  if (!state.est || !spec) return;
  const [section, quantity] = spec.split("|");
  const lines = (state.est.explain || []).filter(l => l.section === section);
  $("#explain-title").textContent = `${title || quantity || section}: how it was computed`;
  const box = $("#explain-lines");
  box.innerHTML = "";
  for (const l of lines) {
    const d = document.createElement("div");
    d.className = "line" + (quantity && l.quantity === quantity ? " hit" : "");
    d.innerHTML = `<span class="q">${esc(l.quantity)}</span> = ${esc(fmtExplainValue(l))}<br><span class="f">= ${esc(l.formula)}</span><br><span class="s">source: ${esc(l.source)}</span>`;
    box.appendChild(d);
  }
  $("#explain").hidden = false;
  const hit = box.querySelector(".hit");
  if (hit) hit.scrollIntoView({ block: "nearest" });
}

// ---------- estimate views ----------
const MEM = [
  ["weights", "weights", "#4263eb", "memory|weights"],
  ["gradients", "gradients", "#74c0fc", "memory|gradients"],
  ["master_weights", "master weights", "#9775fa", "memory|master weights"],
  ["optimizer_states", "optimizer", "#f783ac", "memory|optimizer states"],
  ["activations", "activations", "#ffa94d", "memory|activations in flight"],
  ["comm_buffers", "buffers", "#69db7c", "memory|communication buffers"],
  ["runtime_overhead", "overhead", "#adb5bd", "memory|runtime overhead"],
];
const TIME = [
  ["compute", "compute", "#4263eb", "time|compute per step"],
  ["tp_comm", "tp comm", "#ae3ec9", "time|tensor-parallel communication per layer"],
  ["pp_comm", "pp comm", "#f08c00", "time|pipeline sends"],
  ["dp_exposed", "dp comm exposed", "#e8590c", "time|data-parallel gradient sync"],
  ["bubble", "bubble", "#adb5bd", "time|pipeline bubble"],
  ["optimizer", "optimizer", "#2f9e44", "time|optimizer step"],
];

function card(label, key, value, text, explain, cls) {
  const d = document.createElement("div");
  d.className = "card" + (cls ? " " + cls : "");
  d.innerHTML = `<div class="label">${esc(label)}</div>`;
  const n = document.createElement("div");
  n.className = "num";
  n.dataset.key = key;
  n.dataset.value = String(value);
  n.textContent = text;
  if (explain) {
    n.dataset.explain = explain;
    n.title = "click: how it was computed";
    n.addEventListener("click", () => openExplain(explain, label));
  }
  d.appendChild(n);
  return d;
}

function renderEstimate(est) {
  state.est = est;
  const m = est.memory_per_device_bytes, t = est.step_time_secs, l = est.layout;
  $("#summary-line").textContent =
    `${est.model.name}: ${fmtCount(est.parameters)} parameters on ${est.gpus} x ${est.gpu} — dp ${l.dp} x tp ${l.tp} x pp ${l.pp}` +
    `${l.vpp > 1 ? ` (vpp ${l.vpp})` : ""}${l.sp ? ", sequence parallel" : ""}, ZeRO-${l.zero}, micro-batch ${l.micro_batch}, grad-accum ${l.grad_accum}` +
    (Array.isArray(l.stage_layers) && l.stage_layers.length > 1 ? `, layers per stage ${l.stage_layers.join(",")}${l.partition ? ` (${l.partition})` : ""}` : "") +
    (!auto() ? "" : est.fits ? " (the fastest layout that fits, as `scaletrain plan` ranks first)"
      : " (no layout fits, so this is the default layout; try recompute full, more GPUs or a larger GPU)");
  const cards = $("#cards");
  cards.innerHTML = "";
  cards.append(
    card("memory / device", "memory_per_device_bytes.total", m.total, fmtGiB(m.total), "memory|total per device", est.fits ? "good" : "bad"),
    card(est.fits ? "headroom" : "over capacity", "memory_per_device_bytes.headroom", m.headroom, fmtGiB(Math.abs(m.headroom)), "memory|total per device", est.fits ? "good" : "bad"),
    card("step time", "step_time_secs.total", t.total, fmtSecs(t.total), "time|step total"),
    card("MFU", "mfu", est.mfu, fmtPct(est.mfu), "time|MFU"),
    card("tokens / s", "tokens_per_sec", est.tokens_per_sec, fmtInt(est.tokens_per_sec), "time|step total"),
    card("training days", "training_days", est.training_days, fmtDays(est.training_days), "cost|training time"),
    card("GPU-hours", "gpu_hours", est.gpu_hours, fmtInt(est.gpu_hours), "cost|GPU-hours"),
    card("cost", "cost_usd", est.cost_usd, fmtUsd(est.cost_usd), "cost|cost"),
    card("parameters", "parameters", est.parameters, fmtCount(est.parameters), "parameters|total"),
  );
  // One bar per pipeline stage when the estimate lists them; otherwise the worst stage's.
  const stages = Array.isArray(m.stages) && m.stages.length > 1 ? m.stages : [m];
  const rows = stages.map((s, i) => ({
    label: stages.length > 1 ? `stage ${i}` : l.pp > 1 ? `stage ${m.worst_stage} (worst)` : "each GPU",
    cap: m.capacity, capLabel: `capacity ${fmtGiB(m.capacity)}`,
    segs: MEM.map(([k, label, color, ex]) => ({ key: `memory_per_device_bytes.${k}`, label, value: s[k] || 0, color, explain: ex })),
  }));
  stackedBars($("#chart-memory"), rows, { scale: GIB, fmt: v => `${+v.toPrecision(4)}` }, fmtGiB, s => openExplain(s.explain, s.label));
  $("#mem-caption").textContent = `GiB: ${fmtGiB(m.total)} of ${fmtGiB(m.capacity)} — ${est.fits ? "fits" : "does NOT fit"}`;
  stackedBars($("#chart-time"), [{
    label: "one step",
    segs: TIME.map(([k, label, color, ex]) => ({ key: `step_time_secs.${k}`, label, value: t[k], color, explain: ex })),
  }], t.total >= 1 ? { scale: 1, fmt: v => `${+v.toPrecision(4)} s` } : { scale: 1e-3, fmt: v => `${+v.toPrecision(4)} ms` },
  fmtSecs, s => openExplain(s.explain, s.label));
  $("#time-caption").textContent = `${fmtSecs(t.total)}; data-parallel sync ${fmtSecs(t.dp_comm)}, ${fmtSecs(t.dp_exposed)} of it exposed`;
}

// ---------- plan views ----------
const COLS = [
  ["gpus", "gpus", e => e.gpus, String],
  ["dp", "dp", e => e.layout.dp, String],
  ["tp", "tp", e => e.layout.tp, String],
  ["pp", "pp", e => e.layout.pp, String],
  ["vpp", "vpp", e => e.layout.vpp, String],
  ["sp", "sp", e => (e.layout.sp ? 1 : 0), v => (v ? "on" : "off")],
  ["zero", "ZeRO", e => e.layout.zero, String],
  ["mb", "mb", e => e.layout.micro_batch, String],
  ["ga", "accum", e => e.layout.grad_accum, String],
  ["mem", "GiB/GPU", e => e.memory_per_device_bytes.total, v => (v / GIB).toFixed(1)],
  ["step", "step", e => e.step_time_secs.total, fmtSecs],
  ["mfu", "MFU", e => e.mfu, fmtPct],
  ["tps", "tokens/s", e => e.tokens_per_sec, fmtInt],
  ["days", "days", e => e.training_days, fmtDays],
  ["cost", "cost", e => e.cost_usd, fmtUsd],
];

function renderPlan(plan) {
  state.plan = plan;
  $("#plan-caption").textContent =
    `searched ${fmtInt(plan.candidates)} candidate layouts (${fmtInt(plan.evaluated)} costed) in ${fmtSecs(plan.search_secs)}: ${fmtInt(plan.accepted)} fit`;
  const pts = plan.top.map((e, i) => ({ x: e.training_days, y: e.cost_usd, id: i }));
  const front = paretoFront(pts);
  pts.forEach((p, i) => {
    const e = plan.top[i];
    p.front = front[i];
    p.label = `#${i + 1}: ${e.gpus} GPUs, dp ${e.layout.dp} tp ${e.layout.tp} pp ${e.layout.pp}, ${fmtDays(e.training_days)} days, ${fmtUsd(e.cost_usd)}`;
  });
  const short = v => { for (const [d, u] of [[1e9, "B"], [1e6, "M"], [1e3, "K"]]) if (Math.abs(v) >= d) return `${+(v / d).toPrecision(4)}${u}`; return `${+v.toPrecision(4)}`; };
  scatter($("#chart-scatter"), pts, v => `${+v.toPrecision(4)}`, v => `$${short(v)}`, "training days", "cost (USD)", p => useLayout(plan.top[p.id]));
  drawTable(front);
  const rej = $("#rejected");
  rej.innerHTML = plan.rejected.length ? "<strong>Rejected:</strong> " : "";
  rej.append(...plan.rejected.map(r => {
    const s = document.createElement("div");
    s.className = "rej";
    s.dataset.count = String(r.count);
    s.textContent = `${fmtInt(r.count)} layouts: ${r.reason}`;
    return s;
  }));
}

function drawTable(front) {
  const plan = state.plan;
  const thead = $("#plan-table thead"), tbody = $("#plan-table tbody");
  thead.innerHTML = "";
  const hr = document.createElement("tr");
  hr.innerHTML = `<th data-col="rank">#</th>` + COLS.map(([k, label]) => `<th data-col="${k}">${label}</th>`).join("");
  for (const th of hr.children) {
    const k = th.dataset.col;
    if (state.sort.key === k) th.className = "sorted" + (state.sort.desc ? " desc" : "");
    th.addEventListener("click", () => {
      state.sort = { key: k, desc: state.sort.key === k ? !state.sort.desc : false };
      drawTable(front);
      writeUrl();
    });
  }
  thead.appendChild(hr);
  const order = plan.top.map((e, i) => i);
  const col = COLS.find(c => c[0] === state.sort.key);
  if (col) order.sort((a, b) => (col[2](plan.top[a]) - col[2](plan.top[b])) * (state.sort.desc ? -1 : 1) || a - b);
  else if (state.sort.key === "rank" && state.sort.desc) order.reverse();
  tbody.innerHTML = "";
  if (!plan.top.length) {
    tbody.innerHTML = `<tr><td colspan="${COLS.length + 1}" style="text-align:left">No layout fits. Try more GPUs, a GPU with more memory, ZeRO-3, recompute, or a smaller micro-batch.</td></tr>`;
  }
  for (const i of order) {
    const e = plan.top[i];
    const tr = document.createElement("tr");
    tr.dataset.rank = String(i + 1);
    if (front[i]) tr.className = "pareto";
    tr.innerHTML = `<td>${i + 1}</td>` + COLS.map(([k, , f, show]) => `<td data-col="${k}" data-value="${f(e)}">${esc(show(f(e)))}</td>`).join("");
    tr.title = "click: show this layout in detail";
    tr.addEventListener("click", () => useLayout(e));
    tbody.appendChild(tr);
  }
}

// Fills the layout fields from a ranked layout and shows it in detail.
function useLayout(e) {
  $("#auto").checked = false;
  setValue("gpus", String(e.gpus));
  setValue("dp", String(e.layout.dp));
  setValue("tp", String(e.layout.tp));
  setValue("pp", String(e.layout.pp));
  setValue("vpp", String(e.layout.vpp));
  setValue("micro-batch", String(e.layout.micro_batch));
  setValue("zero", e.layout.zero ? String(e.layout.zero) : "");
  setValue("sequence-parallel", e.layout.sp ? "true" : "");
  showSource();
  schedule();
}

// ---------- validation ----------
async function loadValidation() {
  const r = await fetch("/api/validate");
  const box = $("#validation");
  if (!r.ok) { box.textContent = `validation table unavailable: HTTP ${r.status}`; return; }
  const tables = await r.json();
  box.innerHTML = "";
  for (const t of tables) {
    const h = document.createElement("h3");
    h.textContent = `${t.title} — mean |error| ${fmtPct(t.mean_abs_error)} (${t.in_sample ? "in sample" : "out of sample"})`;
    const tab = document.createElement("table");
    tab.innerHTML = "<thead><tr><th>row</th><th>metric</th><th>published</th><th>predicted</th><th>unit</th><th>error</th></tr></thead>";
    const tb = document.createElement("tbody");
    for (const row of t.rows) {
      const tr = document.createElement("tr");
      const num = v => (Math.abs(v) >= 1e4 ? v.toExponential(3) : +v.toPrecision(4));
      tr.innerHTML = `<td>${esc(row.id)}</td><td>${esc(row.metric)}</td><td data-value="${row.published}">${num(row.published)}</td>` +
        `<td data-value="${row.predicted}">${num(row.predicted)}</td><td>${esc(row.unit)}</td><td data-value="${row.rel_error}">${(row.rel_error * 100).toFixed(1)}%</td>`;
      tb.appendChild(tr);
    }
    tab.appendChild(tb);
    box.append(h, tab);
  }
}

// ---------- start ----------
async function start() {
  const r = await fetch("/api/presets");
  if (r.ok) {
    const p = await r.json();
    $("#f-model").innerHTML = `<option value="">(none: a 10B GPT)</option>` +
      p.models.map(m => `<option value="${esc(m.name)}">${esc(m.name)} — ${fmtCount(m.parameters)}</option>`).join("");
    $("#f-gpu").innerHTML = `<option value="">h100-sxm (default)</option>` +
      p.gpus.filter(g => g.name !== "h100-sxm").map(g => `<option value="${esc(g.name)}">${esc(g.name)}</option>`).join("");
    if (!location.search) $("#f-model").value = "llama3-8b";
  }
  readUrl();
  showSource();
  for (const f of $$("#inputs input, #inputs select, #inputs textarea")) {
    f.addEventListener(f.tagName === "SELECT" || f.type === "checkbox" ? "change" : "input", () => { showSource(); schedule(); });
  }
  $("#copy-estimate").addEventListener("click", e => copyText($("#cmd-estimate").textContent, e.target));
  $("#copy-plan").addEventListener("click", e => copyText($("#cmd-plan").textContent, e.target));
  $("#explain-close").addEventListener("click", () => { $("#explain").hidden = true; });
  loadValidation();
  await update();
}

start();
