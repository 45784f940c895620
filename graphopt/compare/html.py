"""The compare report as one self-contained HTML page: no network, no CDN.

The report's JSON is embedded verbatim (`<script type="application/json" id="report-data">`)
and the page's own inline script draws every chart (SVG) and table from it, so the page and
the JSON file always carry the same numbers.
"""
from __future__ import annotations

import json

from graphopt.fileutil import json_text

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d232a;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #dde2e7;padding-bottom:4px}
.sub{color:#5b6670} .side{display:grid;grid-template-columns:max-content max-content;gap:24px;align-items:start}
.stack{display:flex;flex-direction:column;gap:16px} @media (max-width:1100px){.side{grid-template-columns:max-content}} .row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.panel{background:#fff;border:1px solid #dde2e7;border-radius:6px;padding:12px}
table{border-collapse:collapse;font-size:13px} th,td{padding:3px 8px;text-align:right;border-bottom:1px solid #eef1f4}
th{background:#f3f5f7;font-weight:600} td:first-child,th:first-child{text-align:left}
.err{color:#b42318} .anchor{color:#5b6670;font-style:italic} svg text{font-size:12px;fill:#1d232a}
svg .axis{stroke:#8a949e} svg .grid{stroke:#eef1f4} .legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
"""

_JS = r"""
(function () {
  "use strict";
  const R = JSON.parse(document.getElementById("report-data").textContent);
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = {torch: "#7a869a", ort: "#2f6fdb", tvm: "#d9822b"};
  const $ = (id) => document.getElementById(id);
  function el(tag, attrs, parent, text) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function h(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  const fmtMs = (x) => x.toFixed(2);
  const fmtErr = (x) => x === 0 ? "0" : x.toExponential(1);
  function fmtBytes(n) {
    if (n === null || n === undefined) return "-";
    const u = [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
    for (const [name, s] of u) if (n >= s) return (n / s).toFixed(1) + " " + name;
    return n + " B";
  }
  const decoder = R.model.kind === "decoder";
  const cells = R.cells;
  const base = cells.find((c) => c.id === R.baseline);
  const shapes = cells.length ? cells[0].results.map((r) => [r.batch, r.seq]) : [];
  const color = (c) => COLORS[c.backend] || "#6b4fbb";

  $("title").textContent = "graphopt compare: " + (R.model.source || R.model.arguments.join(", "));
  $("subtitle").textContent = `${R.model.kind}; accuracy against ${R.reference.what}; ratios against ${R.baseline} ` +
    `(baseline p50 / p50, higher is faster); ${R.settings.threads} threads; created ${R.created}`;

  // Latency: one horizontal bar chart per shape (bar = p50, whisker = p90, tick = p99).
  const charts = $("latency");
  shapes.forEach(([b, s], i) => {
    const rows = cells.map((c) => ({c, r: c.results[i]}));
    const ok = rows.filter((x) => x.r && x.r.p50_ms !== undefined);
    const max = Math.max(1e-9, ...ok.map((x) => x.r.p99_ms));
    const W = 470, left = 150, right = 110, rowH = 24, top = 28;
    const H = top + rows.length * rowH + 24;
    const panel = h("div", undefined, "panel");
    const svg = el("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "chart latency-chart",
                           "data-shape": `${b}x${s}`, role: "img"}, panel);
    el("text", {x: 0, y: 16, "font-weight": 600}, svg, `batch ${b} x seq ${s}: latency (ms)`);
    const scale = (v) => (W - left - right) * v / max;
    for (let k = 0; k <= 4; k++) {
      const x = left + (W - left - right) * k / 4;
      el("line", {x1: x, x2: x, y1: top - 4, y2: H - 20, class: "grid"}, svg);
      el("text", {x: x, y: H - 6, "text-anchor": "middle"}, svg, (max * k / 4).toPrecision(3));
    }
    rows.forEach(({c, r}, j) => {
      const y = top + j * rowH;
      el("text", {x: left - 6, y: y + 16, "text-anchor": "end"}, svg, c.id);
      if (!r || r.p50_ms === undefined) {
        el("text", {x: left + 4, y: y + 16, class: "err", fill: "#b42318"}, svg,
           "failed: " + ((r && r.error) || c.error || "no result")).classList.add("err");
        return;
      }
      const bar = el("rect", {x: left, y: y + 4, width: Math.max(1, scale(r.p50_ms)), height: rowH - 10,
                              fill: color(c), class: "bar", "data-cell": c.id, "data-p50": r.p50_ms}, svg);
      el("title", {}, bar, `${c.id}: p50 ${fmtMs(r.p50_ms)} ms, p90 ${fmtMs(r.p90_ms)}, p99 ${fmtMs(r.p99_ms)}, ` +
                           `${r.runs} runs, ${r.tokens_per_s.toFixed(0)} tokens/s`);
      const yc = y + rowH / 2 - 1;
      el("line", {x1: left + scale(r.p50_ms), x2: left + scale(r.p90_ms), y1: yc, y2: yc, class: "axis"}, svg);
      el("line", {x1: left + scale(r.p99_ms), x2: left + scale(r.p99_ms), y1: yc - 5, y2: yc + 5, class: "axis"}, svg);
      const k = base && base.results[i] && base.results[i].p50_ms ? base.results[i].p50_ms / r.p50_ms : null;
      el("text", {x: left + scale(r.p99_ms) + 6, y: y + 16, class: "p50-label", "data-cell": c.id}, svg,
         fmtMs(r.p50_ms) + (k ? ` (${k.toFixed(2)}x)` : ""));
    });
    charts.appendChild(panel);
  });

  // Accuracy and cost table, beside the charts.
  function worst(c) {
    const a = c.results.filter((r) => r.accuracy).map((r) => r.accuracy);
    if (!a.length) return null;
    const out = {max_abs_err: Math.max(...a.map((x) => x.max_abs_err)),
                 nonfinite: a.reduce((n, x) => n + (x.nonfinite || 0), 0)};
    for (const key of ["top1_agreement", "pooled_cosine"]) {
      const v = a.filter((x) => key in x).map((x) => x[key]);
      if (v.length) out[key] = Math.min(...v);
    }
    return out;
  }
  const acc = $("accuracy");
  const head = ["backend/variant", "max |Δ| vs ref", decoder ? "top-1 agreement" : "pooled cosine"];
  if (R.perplexity) head.push("perplexity");
  head.push("size", "build", "peak memory", "model + run");
  const thead = h("tr");
  head.forEach((t) => thead.appendChild(h("th", t)));
  acc.appendChild(thead);
  cells.forEach((c) => {
    const tr = h("tr");
    tr.dataset.cell = c.id;
    tr.appendChild(h("td", c.id, c.anchor ? "anchor" : ""));
    if (c.status === "error") {
      const td = h("td", "failed: " + c.error, "err");
      td.colSpan = head.length - 1;
      td.style.textAlign = "left";
      tr.appendChild(td);
      acc.appendChild(tr);
      return;
    }
    const w = worst(c);
    tr.appendChild(h("td", w ? fmtErr(w.max_abs_err) + (w.nonfinite ? ` (+${w.nonfinite} NaN/inf)` : "") : "-",
                     "max-abs-err" + (w && w.nonfinite ? " err" : "")));
    const key = decoder ? "top1_agreement" : "pooled_cosine";
    tr.appendChild(h("td", w && key in w ? (decoder ? (w[key] * 100).toFixed(1) + "%" : w[key].toFixed(6)) : "-"));
    if (R.perplexity) {
      const p = c.perplexity || {};
      tr.appendChild(h("td", p.perplexity !== undefined ? p.perplexity.toFixed(3) : (p.error || "-"), p.error ? "err" : ""));
    }
    tr.appendChild(h("td", fmtBytes(c.size_bytes)));
    tr.appendChild(h("td", (c.build_seconds === null ? "-" : c.build_seconds.toFixed(1) + " s") +
                     (c.tuning_seconds ? ` + ${(c.tuning_seconds / 60).toFixed(1)} min tuning` : "")));
    const mem = c.memory || {};
    tr.appendChild(h("td", mem.error ? "-" : fmtBytes(mem.peak_bytes), "peak-memory"));
    tr.appendChild(h("td", mem.error ? mem.error : fmtBytes(mem.model_and_run_bytes), mem.error ? "err" : ""));
    acc.appendChild(tr);
  });
  if (R.perplexity && R.perplexity.reference !== undefined) {
    $("accuracy-note").textContent = `Perplexity of the reference: ${R.perplexity.reference.toFixed(3)} on ` +
      `${R.perplexity.data} (${R.perplexity.tokens} tokens, windows of ${R.perplexity.window}). `;
  }
  $("accuracy-note").textContent += "Errors are the worst over the shapes, on unpadded positions. " +
    "Memory: " + ((cells.find((c) => c.memory && c.memory.how) || {}).memory || {how: "not measured"}).how + ".";

  // --generate: time to first token and decode tokens/s per cell (bars: tokens/s).
  (function generation() {
    const G = R.generation;
    if (!G) return;
    $("generation-section").hidden = false;
    const rows = cells.filter((c) => c.generation);
    const ok = rows.filter((c) => c.generation.decode_tokens_per_s !== undefined && c.generation.decode_tokens_per_s !== null);
    const max = Math.max(1e-9, ...ok.map((c) => c.generation.decode_tokens_per_s));
    const W = 470, left = 150, right = 70, rowH = 24, top = 28;
    const H = top + rows.length * rowH + 24;
    const svg = el("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "chart generation-chart", role: "img"},
                   $("generation-chart"));
    el("text", {x: 0, y: 16, "font-weight": 600}, svg, `decode tokens/s (${G.new_tokens} new tokens, higher is faster)`);
    rows.forEach((c, j) => {
      const y = top + j * rowH, g = c.generation;
      el("text", {x: left - 6, y: y + 16, "text-anchor": "end"}, svg, c.id);
      if (g.error) {
        el("text", {x: left + 4, y: y + 16, class: "err", fill: "#b42318"}, svg, "failed: " + g.error);
        return;
      }
      const w = (W - left - right) * (g.decode_tokens_per_s || 0) / max;
      el("rect", {x: left, y: y + 4, width: Math.max(1, w), height: rowH - 10, fill: color(c), class: "bar",
                  "data-cell": c.id, "data-tokens-per-s": g.decode_tokens_per_s}, svg);
      el("text", {x: left + w + 6, y: y + 16}, svg, g.decode_tokens_per_s === null ? "-" : g.decode_tokens_per_s.toFixed(0));
    });
    const t = $("generation");
    const head = h("tr");
    ["backend/variant", "time to first token", "decode tokens/s", "same tokens as " + (G.reference || "-"), "build"]
      .forEach((x) => head.appendChild(h("th", x)));
    t.appendChild(head);
    rows.forEach((c) => {
      const tr = h("tr"), g = c.generation;
      tr.dataset.cell = c.id;
      tr.appendChild(h("td", c.id));
      if (g.error) {
        const td = h("td", "failed: " + g.error, "err");
        td.colSpan = 4;
        td.style.textAlign = "left";
        tr.appendChild(td);
      } else {
        tr.appendChild(h("td", fmtMs(g.ttft_ms) + " ms", "ttft"));
        tr.appendChild(h("td", g.decode_tokens_per_s === null ? "-" : g.decode_tokens_per_s.toFixed(1), "decode-tps"));
        tr.appendChild(h("td", g.same_tokens === null ? "-" : `${g.same_tokens}/${G.new_tokens}`));
        tr.appendChild(h("td", g.build_seconds.toFixed(1) + " s"));
      }
      t.appendChild(tr);
    });
    $("generation-note").textContent = `Prompt: ${G.batch} x ${G.prompt_tokens} tokens; ${G.how}.`;
  })();

  // Latency vs accuracy at the largest shape: the trade-off a user chooses from.
  (function scatter() {
    const i = shapes.length - 1;
    const pts = cells.filter((c) => c.results[i] && c.results[i].p50_ms !== undefined && c.results[i].accuracy)
      .map((c) => ({c, x: c.results[i].p50_ms, e: c.results[i].accuracy.max_abs_err}));
    const W = 620, H = 340, L = 70, B = 44, T = 28, Rt = 150;
    const svg = el("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "chart scatter-chart", role: "img"}, $("scatter"));
    el("text", {x: 0, y: 16, "font-weight": 600}, svg,
       shapes.length ? `batch ${shapes[i][0]} x seq ${shapes[i][1]}: p50 latency vs max |Δ| (log)` : "no shapes");
    if (!pts.length) return;
    const floor = 1e-9;
    const ly = (e) => Math.log10(Math.max(e, floor));
    const xs = pts.map((p) => p.x), ys = pts.map((p) => ly(p.e));
    const x0 = 0, x1 = Math.max(...xs) * 1.1;
    let y0 = Math.floor(Math.min(...ys)), y1 = Math.ceil(Math.max(...ys));
    if (y1 === y0) { y0 -= 1; y1 += 1; }
    const sx = (v) => L + (W - L - Rt) * (v - x0) / (x1 - x0);
    const sy = (v) => H - B - (H - B - T) * (v - y0) / (y1 - y0);
    el("line", {x1: L, x2: W - Rt, y1: H - B, y2: H - B, class: "axis"}, svg);
    el("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis"}, svg);
    for (let k = 0; k <= 4; k++) {
      const v = x0 + (x1 - x0) * k / 4;
      el("text", {x: sx(v), y: H - B + 16, "text-anchor": "middle"}, svg, v.toPrecision(3));
    }
    for (let v = y0; v <= y1; v++) {
      el("line", {x1: L, x2: W - Rt, y1: sy(v), y2: sy(v), class: "grid"}, svg);
      el("text", {x: L - 6, y: sy(v) + 4, "text-anchor": "end"}, svg, v === Math.log10(floor) ? "0" : "1e" + v);
    }
    el("text", {x: (L + W - Rt) / 2, y: H - 6, "text-anchor": "middle"}, svg, "p50 latency (ms)");
    el("text", {x: 14, y: (T + H - B) / 2, transform: `rotate(-90 14 ${(T + H - B) / 2})`, "text-anchor": "middle"},
       svg, "max |Δ| vs reference");
    // Labels go right of their dot, nudged down until they overlap no other label or dot.
    const boxes = pts.map((p) => ({x: sx(p.x) - 7, y: sy(ly(p.e)) + 4, w: 14}));
    pts.forEach((p, j) => {
      const cx = sx(p.x), cy = sy(ly(p.e));
      const dot = el("circle", {cx: cx, cy: cy, r: 6, fill: color(p.c), class: "point", "data-cell": p.c.id}, svg);
      el("title", {}, dot, `${p.c.id}: ${fmtMs(p.x)} ms, max |Δ| ${fmtErr(p.e)}`);
      const w = 7 * p.c.id.length;
      let y = cy + 4;
      const hits = (b) => cx + 9 < b.x + b.w && b.x < cx + 9 + w && Math.abs(b.y - y) < 13;
      for (let k = 0; k < 20 && boxes.some((b, i) => i !== j && hits(b)); k++) y += 13;
      boxes.push({x: cx + 9, y: y, w: w});
      el("text", {x: cx + 9, y: y}, svg, p.c.id);
    });
  })();

  // Machine, settings and versions.
  function kv(tableId, obj) {
    const t = $(tableId);
    for (const k in obj) {
      let v = obj[k];
      if (v === null || v === undefined) continue;
      if (Array.isArray(v)) v = v.join(", ");
      else if (typeof v === "object") v = Object.entries(v).map(([a, b]) =>
        `${a}: ${b !== null && typeof b === "object" ? JSON.stringify(b) : b}`).join("; ");
      const tr = h("tr");
      tr.appendChild(h("td", k));
      const td = h("td", String(v));
      td.style.textAlign = "left";
      tr.appendChild(td);
      t.appendChild(tr);
    }
  }
  kv("machine", R.machine);
  kv("settings", Object.assign({}, R.settings, {export_seconds: R.model.export_seconds}));
  kv("versions", R.versions);
  const legend = $("legend");
  for (const b in COLORS) {
    const s = h("span"); s.style.background = COLORS[b]; legend.appendChild(s); legend.appendChild(document.createTextNode(b));
  }
  document.body.dataset.rendered = "1";
})();
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>graphopt compare</title>
<style>{css}</style></head>
<body>
<h1 id="title">graphopt compare</h1>
<div class="sub" id="subtitle"></div>
<h2>Latency and accuracy</h2>
<div class="legend sub" id="legend">backend:</div>
<div class="side">
  <div id="latency" class="stack"></div>
  <div class="panel"><table id="accuracy"></table><p class="sub" id="accuracy-note" style="max-width:520px"></p></div>
</div>
<h2>Latency vs accuracy</h2>
<div class="panel" id="scatter" style="display:inline-block"></div>
<div id="generation-section" hidden>
<h2>Generation</h2>
<div class="row">
  <div class="panel" id="generation-chart"></div>
  <div class="panel"><table id="generation"></table><p class="sub" id="generation-note" style="max-width:520px"></p></div>
</div>
</div>
<h2>Machine, settings and versions</h2>
<div class="row">
  <div class="panel"><table id="machine"></table></div>
  <div class="panel"><table id="settings"></table></div>
  <div class="panel"><table id="versions"></table></div>
</div>
<script type="application/json" id="report-data">{data}</script>
<script>{js}</script>
</body></html>
"""


def report_json(report: dict) -> str:
    """The report as JSON text: the one serialization the .json file and the page share."""
    return json_text(report, indent=1, default=_jsonable)  # a diverged metric is null, as in report.json


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def render_html(report: dict) -> str:
    # "<" escaped as \\u003c keeps "</script>" in any string from ending the data block; JSON.parse undoes it.
    data = report_json(report).replace("<", "\\u003c")
    return _PAGE.format(css=_CSS, js=_JS, data=data)


def embedded_report(html: str) -> dict:
    """The report embedded in a page `render_html` wrote."""
    start = html.index('<script type="application/json" id="report-data">') + len(
        '<script type="application/json" id="report-data">')
    return json.loads(html[start:html.index("</script>", start)])
