"use strict";
(function () {
  const errors = [];
  window.addEventListener("error", (e) => { errors.push(String(e.message)); document.body.dataset.errors = errors.join(" | "); });
  const NS = "http://www.w3.org/2000/svg";
  const data = JSON.parse(document.getElementById("data").textContent);
  const COLORS = ["#2a7", "#36c", "#d62", "#a3c", "#c92", "#555"];
  let drawn = 0;

  function el(tag, attrs, parent, text) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }

  function frame(host, w, h, xlabel, ylabel) {
    const svg = el("svg", { class: "chart", width: w, height: h, viewBox: `0 0 ${w} ${h}` });
    document.getElementById(host).appendChild(svg);
    el("line", { x1: 60, y1: h - 40, x2: w - 10, y2: h - 40, class: "axis" }, svg);
    el("line", { x1: 60, y1: 10, x2: 60, y2: h - 40, class: "axis" }, svg);
    el("text", { x: (w + 60) / 2, y: h - 6, "text-anchor": "middle", class: "label" }, svg, xlabel);
    el("text", { x: 14, y: h / 2, transform: `rotate(-90 14 ${h / 2})`, "text-anchor": "middle", class: "label" }, svg, ylabel);
    drawn += 1;
    return svg;
  }

  function scale(lo, hi, a, b) {
    const span = hi - lo || 1;
    return (v) => a + ((v - lo) / span) * (b - a);
  }

  function ticks(svg, lo, hi, sx, sy, w, h, horizontal) {
    for (let i = 0; i <= 4; i++) {
      const v = lo + ((hi - lo) * i) / 4;
      if (horizontal) el("text", { x: sx(v), y: h - 26, "text-anchor": "middle", class: "label" }, svg, v.toPrecision(3));
      else el("text", { x: 56, y: sy(v) + 4, "text-anchor": "end", class: "label" }, svg, v.toPrecision(3));
    }
  }

  function scatter() {
    const r = data.result, W = 760, H = 360;
    const trials = r.trials.filter((t) => t.p50_ms !== null && !(t.note || "").startsWith("failed"));
    const finite = trials.map((t) => t.metrics.sqnr_db).filter((v) => v !== null && isFinite(v));
    const top = finite.length ? Math.max(...finite) + 10 : 60;
    const y = (t) => (t.metrics.sqnr_db === null || !isFinite(t.metrics.sqnr_db) ? top : t.metrics.sqnr_db);
    const xs = trials.map((t) => t.p50_ms), ys = trials.map(y);
    const svg = frame("scatter", W, H, "p50 latency (ms)", "output SQNR vs FP32 (dB; FP32 drawn on top)");
    const x0 = Math.min(...xs) * 0.95, x1 = Math.max(...xs) * 1.05, y0 = Math.min(...ys) - 3, y1 = Math.max(...ys) + 3;
    const sx = scale(x0, x1, 60, W - 20), sy = scale(y0, y1, H - 40, 14);
    ticks(svg, x0, x1, sx, sy, W, H, true);
    ticks(svg, y0, y1, sx, sy, W, H, false);
    const front = trials.filter((t) => r.pareto.includes(t.index)).sort((a, b) => a.p50_ms - b.p50_ms);
    if (front.length > 1) el("polyline", { points: front.map((t) => `${sx(t.p50_ms)},${sy(y(t))}`).join(" "), fill: "none", stroke: "#36c", "stroke-dasharray": "4 3" }, svg);
    for (const t of trials) {
      const c = t.spec.precision === "fp32" ? COLORS[1] : COLORS[0];
      const dot = el("circle", { cx: sx(t.p50_ms), cy: sy(y(t)), r: 5, fill: t.met ? c : "white", stroke: c, "stroke-width": 2, class: "trial" }, svg);
      el("title", {}, dot, `#${t.index} ${t.label}: ${t.p50_ms.toFixed(3)} ms, ${t.met ? "meets" : "misses"} the budget`);
      if (t.index === r.chosen.index) el("circle", { cx: sx(t.p50_ms), cy: sy(y(t)), r: 11, fill: "none", stroke: "#d62", "stroke-width": 2, class: "chosen-mark" }, svg);
    }
  }

  function bars(host, labels, series, names, xlabel) {
    const W = 760, rowH = 14 * names.length + 6, H = Math.max(120, labels.length * rowH + 60);
    const svg = frame(host, W, H, xlabel, "");
    const max = Math.max(1e-9, ...series.flat());
    const sx = scale(0, max, 200, W - 20);
    labels.forEach((lab, i) => {
      el("text", { x: 196, y: 20 + i * rowH + 10, "text-anchor": "end", class: "label" }, svg, lab);
      series.forEach((s, j) => {
        el("rect", { x: 200, y: 14 + i * rowH + j * 14, width: Math.max(1, sx(s[i]) - 200), height: 12, fill: COLORS[j % COLORS.length], class: "bar" }, svg);
      });
    });
    names.forEach((n, j) => {
      el("rect", { x: W - 214, y: 10 + j * 16, width: 10, height: 10, fill: COLORS[j % COLORS.length] }, svg);
      el("text", { x: W - 200, y: 19 + j * 16, class: "label" }, svg, n);
    });
  }

  function sensitivity() {
    const s = data.result.sensitivity;
    if (!s || !s.length) return;
    document.getElementById("sensitivity").innerHTML = "<p class='note'>Output noise-to-signal power when the node alone is quantized (exact ranking), most sensitive first.</p>";
    const top = s.slice(0, 20);
    bars("sensitivity", top.map((g) => `${g.node} (${g.op_type})`), [top.map((g) => g.score)], ["output NSR"], "noise-to-signal power ratio");
  }

  function optypes() {
    const o = data.op_types;
    const types = Array.from(new Set([...Object.keys(o.fp32), ...Object.keys(o.chosen)]));
    types.sort((a, b) => Math.max(o.fp32[b] || 0, o.chosen[b] || 0) - Math.max(o.fp32[a] || 0, o.chosen[a] || 0));
    const t = types.slice(0, 15);
    bars("optypes", t, [t.map((k) => o.fp32[k] || 0), t.map((k) => o.chosen[k] || 0)], ["FP32", "chosen"], "µs per run");
  }

  function sweep() {
    const s = data.sweep, W = 760, H = 320;
    const threads = Array.from(new Set(s.points.map((p) => p.threads)));
    const xs = s.points.map((p) => p.batch), ys = s.points.map((p) => p.throughput_per_s);
    const svg = frame("sweep", W, H, "batch size", "throughput (samples/s)");
    const sx = scale(Math.min(...xs), Math.max(...xs), 80, W - 40), sy = scale(0, Math.max(...ys) * 1.1, H - 40, 14);
    ticks(svg, Math.min(...xs), Math.max(...xs), sx, sy, W, H, true);
    ticks(svg, 0, Math.max(...ys) * 1.1, sx, sy, W, H, false);
    threads.forEach((t, j) => {
      const pts = s.points.filter((p) => p.threads === t).sort((a, b) => a.batch - b.batch);
      el("polyline", { points: pts.map((p) => `${sx(p.batch)},${sy(p.throughput_per_s)}`).join(" "), fill: "none", stroke: COLORS[j], "stroke-width": 2, class: "series" }, svg);
      pts.forEach((p) => el("circle", { cx: sx(p.batch), cy: sy(p.throughput_per_s), r: 3, fill: COLORS[j] }, svg));
      el("text", { x: W - 120, y: 24 + j * 14, class: "label", style: `fill: ${COLORS[j]}` }, svg, `${t || "default"} thread(s)`);
      const knee = s.knees.find((k) => k.axis === "batch" && k.fixed.threads === t);
      if (knee) {
        const p = pts.find((q) => q.batch === knee.at);
        if (p) el("text", { x: sx(p.batch), y: sy(p.throughput_per_s) - 8, "text-anchor": "middle", class: "label knee", style: `fill: ${COLORS[j]}` }, svg, "knee");
      }
    });
  }

  for (const f of [scatter, sensitivity, optypes, sweep]) {
    try { f(); } catch (e) { errors.push(`${f.name}: ${e.message}`); }
  }
  document.body.dataset.rendered = String(drawn);
  document.body.dataset.errors = errors.join(" | ");
})();
