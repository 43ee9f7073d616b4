/* qsched report viewer: draws report.html from the JSON in #report-data with inline SVG.
 * Vanilla JS, no library, nothing fetched. Every string from the data goes in through textContent or
 * setAttribute, never as markup, so prompts and layer names always render as text. */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var SVGNS = "http://www.w3.org/2000/svg";
  var root = document.getElementById("report");
  var state = { axis: "macs", selected: data.chosen, bitMode: "w" };
  var byId = {};
  data.points.forEach(function (p) { byId[p.id] = p; });

  // --- DOM helpers --------------------------------------------------------------------------------
  function build(node, attrs, children) {
    Object.keys(attrs || {}).forEach(function (k) {
      if (attrs[k] !== null && attrs[k] !== undefined) node.setAttribute(k, String(attrs[k]));
    });
    append.apply(null, [node].concat(children));
    return node;
  }
  // el("p", {attrs}, child, ...) for HTML; sv("rect", {attrs}, child, ...) for SVG
  function el(tag, attrs) { return build(document.createElement(tag), attrs, Array.prototype.slice.call(arguments, 2)); }
  function sv(tag, attrs) { return build(document.createElementNS(SVGNS, tag), attrs, Array.prototype.slice.call(arguments, 2)); }
  function append(node) {  // append(node, child, ...): elements, text, arrays of them; null is skipped
    for (var i = 1; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined) continue;
      if (Array.isArray(child)) child.forEach(function (c) { append(node, c); });
      else node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
    }
  }
  function tip(text) { return sv("title", {}, text); }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

  // --- formatting ---------------------------------------------------------------------------------
  function num(v, digits) { return v === null || v === undefined ? "n/a" : Number(v).toFixed(digits); }
  function scaled(v, units) {
    if (v === null || v === undefined) return "n/a";
    for (var i = 0; i < units.length; i++) {
      if (Math.abs(v) >= units[i][1]) return (v / units[i][1]).toPrecision(3) + " " + units[i][0];
    }
    return String(Math.round(v));
  }
  var FORMATS = {
    macs: function (v) { return scaled(v, [["TMAC", 1e12], ["GMAC", 1e9], ["MMAC", 1e6], ["kMAC", 1e3]]); },
    bytes: function (v) { return scaled(v, [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]); },
    seconds: function (v) { return v === null || v === undefined ? "n/a" : (v < 1 ? (v * 1e3).toPrecision(3) + " ms" : v.toPrecision(3) + " s"); }
  };
  function axisOf(key) { return data.axes.filter(function (a) { return a.key === key; })[0]; }
  function has(v) { return v !== null && v !== undefined; }

  // --- header and summary -------------------------------------------------------------------------
  function header() {
    append(root, el("h1", {}, "qsched report: " + data.title));
    append(root, el("p", { "class": "muted" }, "Compiled " + (data.created || "?") +
      ". Click a point of the front to see its sample images next to FP's."));
    data.notes.forEach(function (n) { append(root, el("p", { "class": "note" }, n)); });
  }

  function summary() {
    append(root, el("h2", {}, "Summary"));
    var rows = data.summary.map(function (r) { return el("tr", {}, el("td", {}, r.label), el("td", {}, r.value)); });
    append(root, el("table", { "class": "summary", id: "summary" }, el("tbody", {}, rows)));
  }

  // --- Pareto front -------------------------------------------------------------------------------
  var MARK = {
    fp: { shape: "diamond", color: "#111111", tag: "FP" },
    rtn: { shape: "square", color: "#d9730d", tag: "RTN" },
    fora: { shape: "triangle", color: "#2a9d4b", tag: "FORA" },
    front: { shape: "circle", color: "#1f6feb", tag: "" },
    compiled: { shape: "circle", color: "#1f6feb", tag: "" }
  };
  function markOf(p) {
    if (p.id === "fp") return MARK.fp;
    if (p.id === "rtn") return MARK.rtn;
    if (p.id.indexOf("fora-") === 0) return MARK.fora;
    return MARK[p.kind] || MARK.front;
  }
  function marker(p, x, y) {
    var m = markOf(p), r = p.chosen ? 8 : 5.5, attrs = { "class": "marker", fill: m.color, stroke: "#ffffff", "stroke-width": 1.5 };
    if (m.shape === "circle") return sv("circle", Object.assign({ cx: x, cy: y, r: r }, attrs));
    if (m.shape === "square") return sv("rect", Object.assign({ x: x - r, y: y - r, width: 2 * r, height: 2 * r }, attrs));
    var pts = m.shape === "diamond"
      ? [[x, y - r - 1.5], [x + r + 1.5, y], [x, y + r + 1.5], [x - r - 1.5, y]]
      : [[x, y - r - 1.5], [x + r + 1.5, y + r], [x - r - 1.5, y + r]];
    return sv("polygon", Object.assign({ points: pts.map(function (q) { return q.join(","); }).join(" ") }, attrs));
  }
  function ticks(lo, hi, n) {
    var span = hi - lo || Math.abs(hi) || 1, step = Math.pow(10, Math.floor(Math.log10(span / n)));
    [1, 2, 2.5, 5, 10].some(function (m) { if (span / (step * m) <= n) { step *= m; return true; } return false; });
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
    return out;
  }
  function padded(values) {
    var lo = Math.min.apply(null, values), hi = Math.max.apply(null, values), pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 1;
    return [lo - pad, hi + pad];
  }

  function frontSection() {
    append(root, el("h2", {}, "Pareto front"));
    append(root, el("p", { "class": "note" }, data.quality.label + ": " + data.quality.description + "."));
    var select = el("select", { id: "x-axis", "aria-label": "x axis" }, data.axes.map(function (a) {
      return el("option", { value: a.key }, a.label);
    }));
    select.value = state.axis;
    select.addEventListener("change", function () { state.axis = select.value; drawFront(); });
    append(root, el("div", { "class": "controls" }, el("label", { "for": "x-axis" }, "x axis: "), select));
    var wrap = el("div", { "class": "front-wrap" }, el("div", { id: "front" }), el("div", { id: "detail", "class": "panel" }));
    append(root, wrap);
    append(root, el("div", { id: "front-missing", "class": "note" }));
    drawFront();
  }

  function drawFront() {
    var holder = clear(document.getElementById("front")), key = state.axis, axis = axisOf(key), fmt = FORMATS[axis.format];
    var shown = data.points.filter(function (p) { return has(p[key]) && has(p.quality); });
    var missing = data.points.filter(function (p) { return shown.indexOf(p) < 0; });
    var W = 640, H = 400, L = 64, R = 16, T = 16, B = 48;
    var svg = sv("svg", { id: "front-svg", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "quality against " + axis.label });
    if (!shown.length) {
      append(svg, sv("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no point has both quality and " + axis.label));
    } else {
      var xs = padded(shown.map(function (p) { return p[key]; })), ys = padded(shown.map(function (p) { return p.quality; }));
      var X = function (v) { return L + (v - xs[0]) / (xs[1] - xs[0]) * (W - L - R); };
      var Y = function (v) { return H - B - (v - ys[0]) / (ys[1] - ys[0]) * (H - T - B); };
      var axes = sv("g", { "class": "axis" });
      ticks(xs[0], xs[1], 6).forEach(function (v) {
        append(axes, sv("line", { "class": "grid", x1: X(v), x2: X(v), y1: T, y2: H - B }));
        append(axes, sv("text", { x: X(v), y: H - B + 16, "text-anchor": "middle" }, fmt(v)));
      });
      ticks(ys[0], ys[1], 6).forEach(function (v) {
        append(axes, sv("line", { "class": "grid", x1: L, x2: W - R, y1: Y(v), y2: Y(v) }));
        append(axes, sv("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end" }, num(v, 3)));
      });
      append(axes, sv("line", { x1: L, x2: W - R, y1: H - B, y2: H - B }), sv("line", { x1: L, x2: L, y1: T, y2: H - B }));
      append(axes, sv("text", { x: (L + W - R) / 2, y: H - 10, "text-anchor": "middle" }, axis.label));
      append(axes, sv("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", transform: "rotate(-90 14 " + (T + H - B) / 2 + ")" }, data.quality.label));
      append(svg, axes);
      // the line joins the front where it is one: quality against MACs, the search's own objectives
      var front = shown.filter(function (p) { return p.kind === "front"; }).sort(function (a, b) { return a[key] - b[key]; });
      if (key === "macs" && front.length > 1) {
        append(svg, sv("polyline", { points: front.map(function (p) { return X(p[key]) + "," + Y(p.quality); }).join(" "),
          fill: "none", stroke: "#9ec1f7", "stroke-width": 1.5 }));
      }
      // chosen and baselines last, so they sit on top of the front
      shown.slice().sort(function (a, b) { return (a.kind === "front" && !a.chosen ? 0 : 1) - (b.kind === "front" && !b.chosen ? 0 : 1); })
        .forEach(function (p) {
          var x = X(p[key]), y = Y(p.quality), m = markOf(p);
          var g = sv("g", { "class": "pt" + (p.id === state.selected ? " selected" : ""), "data-point-id": p.id,
            tabindex: 0, role: "button", "aria-label": p.label }, tip(p.label + ": quality " + num(p.quality, 3) + ", " + fmt(p[key])), marker(p, x, y));
          var tag = p.chosen ? "chosen" : m.tag && (p.id.indexOf("fora-") === 0 ? "FORA-" + p.id.slice(5) : m.tag);
          if (tag) append(g, sv("text", { x: x + 9, y: y - 8, "font-weight": p.chosen ? 700 : 400 }, tag));
          g.addEventListener("click", function () { select(p.id); });
          g.addEventListener("keydown", function (ev) { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); select(p.id); } });
          append(svg, g);
        });
    }
    append(holder, svg);
    var legend = el("div", { "class": "legend" }, [["front", "Pareto front"], ["fp", "FP"], ["rtn", "uniform RTN"], ["fora", "FORA every N"]]
      .map(function (kv) { return el("span", {}, el("span", { "class": "swatch", style: "background:" + MARK[kv[0]].color }), kv[1]); }),
      el("span", {}, "large marker: the chosen point"));
    append(holder, legend);
    var note = clear(document.getElementById("front-missing"));
    missing.forEach(function (p) {
      var why = !has(p.quality) ? (p.quality_reason || p.reason || "quality not measured")
        : (key === "macs" ? p.macs_reason : "") || p.reason || axis.label + " not measured";
      append(note, el("div", {}, "Not plotted: " + p.label + " (" + why + ")"));
    });
  }

  function select(id) {
    var active = document.activeElement, hadFocus = !!(active && active.getAttribute && active.getAttribute("data-point-id"));
    state.selected = id;
    drawFront();
    drawDetail();
    drawSchedule();
    var points = document.querySelectorAll("#front-svg .pt");
    for (var i = 0; hadFocus && i < points.length; i++) {  // keep keyboard focus on the redrawn point
      if (points[i].getAttribute("data-point-id") === id) points[i].focus();
    }
  }

  function drawDetail() {
    var p = byId[state.selected], box = clear(document.getElementById("detail"));
    if (!p) { append(box, el("p", {}, "No point selected.")); return; }
    append(box, el("h3", { id: "detail-label" }, p.label + (p.chosen ? " (chosen)" : "")));
    var fmtQ = function (v) { return num(v, 4); };
    var rows = [
      ["quality", has(p.quality) ? fmtQ(p.quality) : "n/a" + (p.quality_reason ? " (" + p.quality_reason + ")" : "")],
      ["content score", has(p.content_score) ? fmtQ(p.content_score) : null],
      ["PSNR vs FP", has(p.psnr_vs_fp) ? num(p.psnr_vs_fp, 2) + " dB" : null],
      ["search quality", has(p.search_quality) ? fmtQ(p.search_quality) : null],
      ["MACs", has(p.macs) ? FORMATS.macs(p.macs) + " (" + num(100 * p.mac_fraction, 1) + "% of no cache)" : "n/a"],
      ["latency", has(p.latency_s) ? FORMATS.seconds(p.latency_s) + (p.latency_runs ? " (runs: " + p.latency_runs.map(FORMATS.seconds).join(", ") + ")" : "") +
        (p.latency_note ? "; " + p.latency_note : "") : "n/a"],
      ["size", FORMATS.bytes(p.size_bytes)],
      ["not measured", p.reason || null]
    ].filter(function (r) { return r[1] !== null && r[1] !== ""; });
    append(box, el("table", { "class": "numbers", id: "detail-numbers" }, el("tbody", {}, rows.map(function (r) {
      return el("tr", { "data-key": r[0] }, el("th", {}, r[0]), el("td", {}, r[1]));
    }))));
    var prompts = data.samples.prompts, fp = data.samples.fp_images;
    if (!prompts.length) { append(box, el("p", { "class": "note" }, "No sample images were recorded for this artifact.")); return; }
    var grid = el("div", { "class": "samples", id: "detail-images" },
      el("div", { "class": "head" }, "prompt (" + data.samples.source + ")"), el("div", { "class": "head" }, "FP"),
      el("div", { "class": "head" }, p.id === "fp" ? "FP" : "this point"));
    prompts.forEach(function (prompt, k) {
      var psnr = p.sample_psnr_vs_fp ? p.sample_psnr_vs_fp[k] : null;
      append(grid, el("div", { "class": "prompt" }, prompt),
        figure(fp[k], "FP: " + prompt, "FP"),
        figure(p.images && p.images[k], p.label + ": " + prompt, has(psnr) && p.id !== "fp" ? num(psnr, 1) + " dB vs FP" : p.id === "fp" ? "reference" : ""));
    });
    append(box, grid);
  }
  function figure(src, alt, caption) {
    if (!src) return el("figure", {}, el("figcaption", {}, "not measured"));
    return el("figure", {}, el("img", { src: src, alt: alt, "class": "sample" }), el("figcaption", {}, caption));
  }

  // --- bit plan heat map --------------------------------------------------------------------------
  var W_COLORS = { 2: "#b2182b", 3: "#e0694f", 4: "#f4a582", 5: "#d1e5f0", 6: "#92c5de", 8: "#2166ac" };
  var A_COLORS = { 4: "#f4a582", 8: "#4393c3" };
  var FP_COLOR = "#2d2d2d";
  function bitPlanSection() {
    var plan = data.bit_plan;
    append(root, el("h2", {}, "Bit plan"));
    append(root, el("p", { "class": "note" }, plan.count + " layers, " + plan.method + " at " + plan.target + "; " +
      plan.fp_weights + " keep FP weights, " + plan.fp_acts + " keep FP activations. Rows: blocks; columns: layers within a block."));
    var modes = [["w", "weight bits"], ["a", "activation bits"], ["fp", "FP-protected"]];
    var controls = el("div", { "class": "controls", id: "bit-mode" }, modes.map(function (m) {
      var input = el("input", { type: "radio", name: "bit-mode", value: m[0], id: "bit-mode-" + m[0] });
      input.checked = m[0] === state.bitMode;
      input.addEventListener("change", function () { state.bitMode = m[0]; drawBitPlan(); });
      return el("label", {}, input, " " + m[1]);
    }));
    append(root, controls, el("div", { id: "bitplan-legend", "class": "legend" }), el("div", { id: "bitplan", "class": "scroll" }));
    drawBitPlan();
  }
  function cellColor(c, mode) {
    if (mode === "w") return c.w === null ? FP_COLOR : W_COLORS[c.w] || "#cccccc";
    if (mode === "a") return c.a === null ? FP_COLOR : A_COLORS[c.a] || "#cccccc";
    return c.w === null && c.a === null ? FP_COLOR : c.w === null || c.a === null ? "#8c6bb1" : "#e8ecf0";
  }
  function drawBitPlan() {
    var plan = data.bit_plan, mode = state.bitMode, holder = clear(document.getElementById("bitplan"));
    var legend = clear(document.getElementById("bitplan-legend"));
    var entries = mode === "w" ? Object.keys(W_COLORS).map(function (b) { return [W_COLORS[b], "W" + b]; }).concat([[FP_COLOR, "FP"]])
      : mode === "a" ? Object.keys(A_COLORS).map(function (b) { return [A_COLORS[b], "A" + b]; }).concat([[FP_COLOR, "FP"]])
        : [["#e8ecf0", "quantized"], ["#8c6bb1", "weights or activations FP"], [FP_COLOR, "fully FP"]];
    entries.forEach(function (e) { append(legend, el("span", {}, el("span", { "class": "swatch", style: "background:" + e[0] }), e[1])); });
    if (!plan.blocks.length) { append(holder, el("p", { "class": "note" }, "No bit plan in this artifact.")); return; }
    var cw = Math.max(10, Math.min(26, Math.floor(820 / plan.layers.length))), ch = 18;
    var left = 8 + 7 * Math.max.apply(null, plan.blocks.map(function (b) { return b.length; }));
    var top = 8 + 6 * Math.max.apply(null, plan.layers.map(function (l) { return l.length; }));
    var W = left + cw * plan.layers.length + top * 0.6 + 10, H = top + ch * plan.blocks.length + 10;
    var svg = sv("svg", { id: "bitplan-svg", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "bit plan heat map" });
    plan.layers.forEach(function (name, j) {
      var x = left + j * cw + cw / 2 + 4, y = top - 6;
      append(svg, sv("text", { x: x, y: y, transform: "rotate(-60 " + x + " " + y + ")" }, name));
    });
    plan.blocks.forEach(function (block, i) {
      append(svg, sv("text", { x: left - 6, y: top + i * ch + ch / 2 + 4, "text-anchor": "end" }, block));
      plan.cells[i].forEach(function (c, j) {
        if (!c) return;
        var label = c.name + ": " + (c.w === null ? "FP" : "W" + c.w) + " " + (c.a === null ? "FP" : "A" + c.a) +
          " activations" + (c.reason ? " (" + c.reason + ")" : "");
        append(svg, sv("rect", { "class": "cell", x: left + j * cw, y: top + i * ch, width: cw - 1, height: ch - 1,
          fill: cellColor(c, mode), "data-layer": c.name }, tip(label)));
      });
    });
    append(holder, svg);
  }

  // --- cache schedule heat map --------------------------------------------------------------------
  function scheduleSection() {
    append(root, el("h2", {}, "Cache schedule"));
    append(root, el("p", { "class": "note", id: "schedule-caption" }));
    append(root, el("div", { id: "schedule", "class": "scroll" }));
    drawSchedule();
  }
  function drawSchedule() {
    var holder = clear(document.getElementById("schedule")), caption = clear(document.getElementById("schedule-caption"));
    var layout = data.cache_layout, p = byId[state.selected];
    if (!layout) { append(caption, "No cache schedule: the cache search did not run for this artifact (see Stages in the summary)."); return; }
    var grid = p && p.schedule;
    append(caption, "Steps × blocks for " + (p ? p.label : "?") + ": the share of each block's components that reuse their " +
      "stored output at that step (step 0 always computes)." + (grid ? "" : " This point uses no cache."));
    var cw = 64, ch = 22, left = 52, top = 8 + 6 * Math.max.apply(null, layout.blocks.map(function (b) { return b.length; }));
    var W = left + cw * layout.blocks.length + top + 10, H = top + ch * layout.steps + 30;
    var svg = sv("svg", { id: "schedule-svg", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "cache schedule heat map" });
    layout.blocks.forEach(function (name, b) {
      var x = left + b * cw + cw / 2, y = top - 6;
      append(svg, sv("text", { x: x, y: y, transform: "rotate(-45 " + x + " " + y + ")" }, name));
    });
    for (var s = 0; s < layout.steps; s++) {
      append(svg, sv("text", { x: left - 6, y: top + s * ch + ch / 2 + 4, "text-anchor": "end" }, "step " + s));
      layout.blocks.forEach(function (name, b) {
        var reused = grid ? grid.reused[s][b] : [], share = reused.length / layout.components[b].length;
        var shade = Math.round(245 - share * 180);
        append(svg, sv("rect", { "class": "cell", x: left + b * cw, y: top + s * ch, width: cw - 2, height: ch - 2,
          fill: "rgb(" + shade + "," + Math.round(shade * 0.9 + 20) + ",255)", "data-share": share.toFixed(3) },
          tip("step " + s + ", " + name + ": " + (reused.length ? "reuses " + reused.join(", ") : "recomputes everything"))));
      });
    }
    append(svg, sv("text", { x: left, y: H - 8 }, "light: recompute · dark: reuse"));
    append(holder, svg);
  }

  // --- Q-Sched coefficients -----------------------------------------------------------------------
  function coefficientSection() {
    var c = data.coefficients;
    append(root, el("h2", {}, "Q-Sched coefficients"));
    if (!c || !c.steps) {
      append(root, el("p", { "class": "note", id: "coefficients" }, "No coefficients: Q-Sched " + (c ? c.status : "did not run") +
        (c && c.reason ? " (" + c.reason + ")" : "") + "."));
      return;
    }
    append(root, el("p", { "class": "note" }, (c.applied ? "Applied: " : "Learned but not applied (" + (c.reason || c.status) + "): ") +
      "c^x multiplies the sample and c^ε the model output at each step; 1 is the unmodified scheduler." +
      (has(c.heldout_jaq) ? " Held-out JAQ " + num(c.heldout_jaq, 4) + " vs " + num(c.identity_heldout_jaq, 4) + " unmodified." : "")));
    var W = 480, H = 220, L = 48, R = 90, T = 12, B = 34;
    var all = c.cx.concat(c.ce, [1]), ys = padded(all);
    var X = function (i) { return L + (c.steps === 1 ? 0.5 : i / (c.steps - 1)) * (W - L - R); };
    var Y = function (v) { return H - B - (v - ys[0]) / (ys[1] - ys[0]) * (H - T - B); };
    var svg = sv("svg", { id: "coefficients", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "Q-Sched coefficients per step" });
    var axes = sv("g", { "class": "axis" });
    ticks(ys[0], ys[1], 5).forEach(function (v) {
      append(axes, sv("line", { "class": "grid", x1: L, x2: W - R, y1: Y(v), y2: Y(v) }), sv("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end" }, num(v, 2)));
    });
    for (var i = 0; i < c.steps; i++) append(axes, sv("text", { x: X(i), y: H - B + 16, "text-anchor": "middle" }, "step " + i));
    append(axes, sv("line", { x1: L, x2: W - R, y1: Y(1), y2: Y(1), stroke: "#8a949e", "stroke-dasharray": "4 3" }));
    append(svg, axes);
    var ends = [Y(c.cx[c.steps - 1]), Y(c.ce[c.steps - 1])];
    if (Math.abs(ends[0] - ends[1]) < 12) {  // keep the two end labels apart
      var mid = (ends[0] + ends[1]) / 2, up = ends[0] <= ends[1] ? -1 : 1;
      ends = [mid + 6 * up, mid - 6 * up];
    }
    [["cx", "c^x", "#1f6feb"], ["ce", "c^ε", "#d9730d"]].forEach(function (s, k) {
      var vals = c[s[0]];
      append(svg, sv("polyline", { points: vals.map(function (v, i) { return X(i) + "," + Y(v); }).join(" "), fill: "none", stroke: s[2], "stroke-width": 2 }));
      vals.forEach(function (v, i) { append(svg, sv("circle", { cx: X(i), cy: Y(v), r: 3.5, fill: s[2] }, tip(s[1] + " step " + i + ": " + num(v, 4)))); });
      append(svg, sv("text", { x: W - R + 8, y: ends[k] + 4, style: "fill:" + s[2] }, s[1]));
    });
    append(root, svg);
    var head = el("tr", {}, el("th", {}, "step"), c.cx.map(function (_, i) { return el("th", {}, String(i)); }));
    var row = function (name, vals) { return el("tr", {}, el("th", {}, name), vals.map(function (v) { return el("td", {}, num(v, 4)); })); };
    append(root, el("table", { "class": "numbers", id: "coefficient-table" }, el("tbody", {}, head, row("c^x", c.cx), row("c^ε", c.ce))));
  }

  header();
  summary();
  frontSection();
  drawDetail();
  bitPlanSection();
  scheduleSection();
  coefficientSection();
  document.documentElement.setAttribute("data-report-ready", "1");
})();
