// SVG charts drawn by the page itself (no library, no network): stacked horizontal bars and a
// scatter plot with a highlighted front. Every drawn value keeps its raw number in data-value.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, parent) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

// A "nice" tick step for a span (1, 2 or 5 times a power of ten).
function niceStep(span, ticks) {
  const raw = span / Math.max(1, ticks);
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  const m = raw / p;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
}

// rows: [{label, segs: [{key, label, value, color, explain}], cap, capLabel}]
// axis: {scale, fmt} (ticks are nice numbers of value/scale); fmt: value -> text for legend and
// tooltips; onSeg(seg) on click.
function stackedBars(el, rows, axis, fmt, onSeg) {
  el.textContent = "";
  const W = 560, left = 90, right = 14, barH = 26, gap = 12, top = 8, axisH = 20;
  const H = top + rows.length * (barH + gap) + axisH;
  const max = Math.max(1e-30, ...rows.map(r => Math.max(r.cap || 0, r.segs.reduce((a, s) => a + s.value, 0))));
  const step = niceStep(max / axis.scale, 5) * axis.scale;
  const xmax = Math.ceil(max / step) * step;
  const x = v => left + (W - left - right) * v / xmax;
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img" }, el);
  for (let t = 0; t <= xmax + step / 2; t += step) {
    svgEl("line", { x1: x(t), x2: x(t), y1: top - 4, y2: H - axisH, stroke: "#e3e7ec" }, svg);
    svgEl("text", { x: x(t), y: H - 6, "text-anchor": "middle" }, svg).textContent = axis.fmt(t / axis.scale);
  }
  rows.forEach((r, i) => {
    const y = top + i * (barH + gap);
    svgEl("text", { x: left - 6, y: y + barH / 2 + 4, "text-anchor": "end" }, svg).textContent = r.label;
    let acc = 0;
    for (const s of r.segs) {
      if (s.value <= 0) { continue; }
      const rect = svgEl("rect", {
        class: "seg", x: x(acc), y, width: Math.max(0.5, x(acc + s.value) - x(acc)), height: barH,
        fill: s.color, "data-key": s.key, "data-value": String(s.value),
      }, svg);
      if (s.explain) rect.setAttribute("data-explain", s.explain);
      svgEl("title", {}, rect).textContent = `${s.label}: ${fmt(s.value)}`;
      rect.addEventListener("click", () => onSeg && onSeg(s));
      acc += s.value;
    }
    if (r.cap) {
      svgEl("line", { x1: x(r.cap), x2: x(r.cap), y1: y - 4, y2: y + barH + 4, stroke: "#b71c1c", "stroke-width": 2, "stroke-dasharray": "4 2" }, svg);
      const t = svgEl("text", { x: Math.min(x(r.cap), W - right) - 3, y: y - 1, "text-anchor": "end", fill: "#b71c1c" }, svg);
      t.textContent = r.capLabel || "";
    }
  });
  const legend = document.createElement("div");
  legend.className = "legend";
  const seen = new Set();
  for (const r of rows) for (const s of r.segs) {
    if (seen.has(s.key)) continue;
    seen.add(s.key);
    const item = document.createElement("span");
    item.className = "item";
    item.innerHTML = `<span class="sw" style="background:${s.color}"></span>`;
    item.appendChild(document.createTextNode(`${s.label} ${fmt(s.value)}`));
    item.addEventListener("click", () => onSeg && onSeg(s));
    legend.appendChild(item);
  }
  el.appendChild(legend);
}

// points: [{x, y, label, front, id}]; the front (sorted by x) is joined by a line.
function scatter(el, points, fx, fy, xLabel, yLabel, onPoint) {
  el.textContent = "";
  if (!points.length) { el.textContent = "no layout fits"; return; }
  const W = 440, H = 280, l = 70, r = 12, t = 10, b = 36;
  const xs = points.map(p => p.x), ys = points.map(p => p.y);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const pad = (a, c) => { const s = (c - a) || Math.abs(a) || 1; return [a - s * 0.08, c + s * 0.08]; };
  [x0, x1] = pad(x0, x1); [y0, y1] = pad(y0, y1);
  const X = v => l + (W - l - r) * (v - x0) / (x1 - x0);
  const Y = v => H - b - (H - t - b) * (v - y0) / (y1 - y0);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img" }, el);
  const xs_ = niceStep(x1 - x0, 5), ys_ = niceStep(y1 - y0, 5);
  for (let v = Math.ceil(x0 / xs_) * xs_; v <= x1; v += xs_) {
    svgEl("line", { x1: X(v), x2: X(v), y1: t, y2: H - b, stroke: "#eceff3" }, svg);
    svgEl("text", { x: X(v), y: H - b + 14, "text-anchor": "middle" }, svg).textContent = fx(v);
  }
  for (let v = Math.ceil(y0 / ys_) * ys_; v <= y1; v += ys_) {
    svgEl("line", { x1: l, x2: W - r, y1: Y(v), y2: Y(v), stroke: "#eceff3" }, svg);
    svgEl("text", { x: l - 4, y: Y(v) + 4, "text-anchor": "end" }, svg).textContent = fy(v);
  }
  svgEl("text", { x: (l + W - r) / 2, y: H - 4, "text-anchor": "middle" }, svg).textContent = xLabel;
  const yl = svgEl("text", { x: 10, y: (t + H - b) / 2, "text-anchor": "middle", transform: `rotate(-90 10 ${(t + H - b) / 2})` }, svg);
  yl.textContent = yLabel;
  const front = points.filter(p => p.front).sort((a, c) => a.x - c.x);
  if (front.length > 1) {
    svgEl("polyline", { points: front.map(p => `${X(p.x)},${Y(p.y)}`).join(" "), fill: "none", stroke: "#d9480f", "stroke-width": 1.5 }, svg);
  }
  for (const p of points) {
    const c = svgEl("circle", {
      cx: X(p.x), cy: Y(p.y), r: p.front ? 5 : 3.5, fill: p.front ? "#d9480f" : "#5c7cfa",
      "fill-opacity": p.front ? 1 : 0.6, class: p.front ? "pt front" : "pt", "data-id": String(p.id),
    }, svg);
    svgEl("title", {}, c).textContent = p.label;
    c.addEventListener("click", () => onPoint && onPoint(p));
  }
}

// Indices of the points no other point beats in both coordinates (lower is better in both).
function paretoFront(points) {
  return points.map((p, i) => !points.some((q, j) => j !== i && q.x <= p.x && q.y <= p.y && (q.x < p.x || q.y < p.y)));
}
