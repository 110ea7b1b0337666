// gradvitals report renderer: a canvas heatmap and SVG charts, no libraries.
// Reads the JSON blob named by each .gv-report's data-payload; writes what it drew
// into data-* attributes (rows, cells, points, per-row luminance) so a headless
// browser test can check the page shows data, not just that it loaded.
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";
  // viridis: dark = small gradient, bright = large (colour-blind safe, prints in grey)
  var STOPS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"];
  var NAN_RGB = [230, 30, 60], INF_RGB = [255, 140, 0], ZERO_RGB = [0, 0, 0], MISSING_RGB = [236, 239, 243];
  var CODE_MISSING = 0, CODE_NAN = 1, CODE_INF = 2, CODE_ZERO = 3, FIRST = 4, MAXC = 65535;
  var FIRST_COLOR = "#98a2b3", LAST_COLOR = "#f0700a", LINE_COLORS = ["#1769aa", "#7a3eb1", "#0f8a7e", "#b26b00"];

  function hex(h) { return [parseInt(h.substr(1, 2), 16), parseInt(h.substr(3, 2), 16), parseInt(h.substr(5, 2), 16)]; }
  var LUT = (function () {
    var stops = STOPS.map(hex), lut = [];
    for (var i = 0; i < 256; i++) {
      var t = i / 255 * (stops.length - 1), k = Math.min(Math.floor(t), stops.length - 2), f = t - k;
      lut.push([0, 1, 2].map(function (j) { return Math.round(stops[k][j] + (stops[k + 1][j] - stops[k][j]) * f); }));
    }
    return lut;
  })();
  function rgb(c) { return "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")"; }

  function num(v) {
    if (v === null || v === undefined) return NaN;
    if (typeof v === "string") return v === "inf" ? Infinity : v === "-inf" ? -Infinity : v === "nan" ? NaN : parseFloat(v);
    return v;
  }
  function fmt(v) {
    if (isNaN(v)) return "NaN";
    if (!isFinite(v)) return v > 0 ? "Inf" : "-Inf";
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 1e-3 && a < 1e4) return String(parseFloat(v.toPrecision(4)));
    return v.toExponential(2);
  }
  function el(tag, attrs, parent, text) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function div(cls, parent, text) {
    var d = document.createElement("div");
    if (cls) d.className = cls;
    if (text !== undefined) d.textContent = text;
    if (parent) parent.appendChild(d);
    return d;
  }
  var tip = null;
  function tooltip(text, ev) {
    if (!tip) { tip = div("tooltip", document.body); }
    if (text === null) { tip.style.display = "none"; return; }
    tip.textContent = text;
    tip.style.display = "block";
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth - 4) x = ev.clientX - tip.offsetWidth - 10;
    if (y + tip.offsetHeight > window.innerHeight - 4) y = ev.clientY - tip.offsetHeight - 10;
    tip.style.left = x + "px"; tip.style.top = y + "px";
  }
  function niceTicks(a, b, n) {
    if (!(b > a)) return [a];
    var raw = (b - a) / n, p = Math.pow(10, Math.floor(Math.log10(raw))), m = raw / p;
    var step = (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10) * p, out = [];
    for (var t = Math.ceil(a / step) * step; t <= b + step * 1e-9; t += step) out.push(Math.round(t / step) * step);
    return out;
  }
  function bisect(arr, x) {  // index of the last element <= x (0 if none)
    var lo = 0, hi = arr.length - 1;
    if (hi < 0 || x < arr[0]) return 0;
    while (lo < hi) { var mid = (lo + hi + 1) >> 1; if (arr[mid] <= x) lo = mid; else hi = mid - 1; }
    return lo;
  }
  function nearest(arr, x) {
    var i = bisect(arr, x);
    return (i + 1 < arr.length && Math.abs(arr[i + 1] - x) < Math.abs(arr[i] - x)) ? i + 1 : i;
  }
  function decodeCodes(b64) {
    var bin = atob(b64), n = bin.length >> 1, out = new Uint16Array(n);
    for (var i = 0; i < n; i++) out[i] = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
    return out;
  }

  // One marker per step: the findings at that step share it, worst severity wins.
  var RANK = { critical: 0, warning: 1, info: 2 }, MAX_LABEL = 64;
  function rank(severity) { return severity in RANK ? RANK[severity] : 2; }
  function groupMarks(marks) {
    var byStep = {}, out = [];
    marks.forEach(function (m) {
      var g = byStep[m.step];
      if (!g) { g = byStep[m.step] = { step: m.step, labels: [], severity: m.severity }; out.push(g); }
      g.labels.push(m.label);
      if (rank(m.severity) < rank(g.severity)) g.severity = m.severity;
    });
    out.forEach(function (g) {
      var label = "", n = 0;
      while (n < g.labels.length && (n === 0 || label.length + g.labels[n].length < MAX_LABEL)) {
        label += (n ? " · " : "") + g.labels[n]; n++;
      }
      g.label = label + (n < g.labels.length ? " +" + (g.labels.length - n) : "");
    });
    return out;
  }
  // Marker labels sit in rows above the plot so that close steps do not overlap.
  function placeLabels(marks, xOf, charW) {
    var rowsEnd = [], out = [];
    groupMarks(marks).forEach(function (m) {
      var x = xOf(m.step), w = m.label.length * charW + 6, r = 0;
      while (r < rowsEnd.length && rowsEnd[r] > x) r++;
      rowsEnd[r] = x + w;
      out.push({ m: m, x: x, row: r });
    });
    return out;
  }

  // ------------------------------------------------------------ heatmap
  function heatmap(host, hm, markers, small) {
    var rows = hm.layers.length, cols = hm.steps.length;
    if (!rows || !cols) { div("empty", host, "No gradient norms were recorded."); return; }
    var codes = decodeCodes(hm.codes), ends = hm.ends || hm.steps;
    var span = hm.hi - hm.lo;
    function value(code) {
      if (code === CODE_NAN) return NaN;
      if (code === CODE_INF) return Infinity;
      if (code === CODE_ZERO) return 0;
      return Math.pow(10, hm.lo + (code - FIRST) / (MAXC - FIRST) * span);
    }
    function color(code) {
      if (code === CODE_MISSING) return MISSING_RGB;
      if (code === CODE_NAN) return NAN_RGB;
      if (code === CODE_INF) return INF_RGB;
      if (code === CODE_ZERO) return ZERO_RGB;
      return LUT[Math.round((code - FIRST) / (MAXC - FIRST) * 255)];
    }
    // cell colours at one pixel per cell; per-row luminance = what a reader sees
    var off = document.createElement("canvas");
    off.width = cols; off.height = rows;
    var octx = off.getContext("2d"), img = octx.createImageData(cols, rows);
    var luma = [], cells = 0, nonfinite = 0;
    for (var r = 0; r < rows; r++) {
      var sum = 0, n = 0;
      for (var c = 0; c < cols; c++) {
        var code = codes[r * cols + c], col = color(code), o = 4 * (r * cols + c);
        img.data[o] = col[0]; img.data[o + 1] = col[1]; img.data[o + 2] = col[2]; img.data[o + 3] = 255;
        if (code !== CODE_MISSING) { cells++; sum += 0.2126 * col[0] + 0.7152 * col[1] + 0.0722 * col[2]; n++; }
        if (code === CODE_NAN || code === CODE_INF) nonfinite++;
      }
      luma.push(n ? Math.round(sum / n) : -1);
    }
    octx.putImageData(img, 0, 0);

    var canvas = document.createElement("canvas");
    host.appendChild(canvas);
    var width = Math.max(320, host.clientWidth - (small ? 0 : 16));
    var probe = canvas.getContext("2d");
    probe.font = "11px system-ui, sans-serif";
    var labelW = 0;
    hm.layers.forEach(function (l) { labelW = Math.max(labelW, probe.measureText(l.name).width); });
    var left = Math.min(small ? 90 : 190, Math.ceil(labelW) + 10);
    var rowH = small ? Math.max(1, Math.min(24, Math.floor(240 / rows))) : Math.max(2, Math.min(48, Math.floor(520 / rows)));
    var plotH = rows * rowH, x0 = hm.steps[0], x1 = ends[cols - 1] + 1;
    var plotW = width - left - 12;
    function xOf(step) { return left + (step - x0) / Math.max(1e-9, x1 - x0) * plotW; }
    var marks = (markers || []).filter(function (m) { return m.step >= x0 && m.step <= x1; });
    var placed = placeLabels(marks, xOf, 6.2);
    var labelRows = placed.reduce(function (a, p) { return Math.max(a, p.row + 1); }, 0);
    var top = 6 + labelRows * 13, height = top + plotH + 30;
    var dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * dpr); canvas.height = Math.round(height * dpr);
    canvas.style.width = width + "px"; canvas.style.height = height + "px";
    var ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    ctx.imageSmoothingEnabled = false;
    var colX = [];
    for (c = 0; c < cols; c++) {
      var a = xOf(hm.steps[c]), b = xOf((c + 1 < cols ? hm.steps[c + 1] : x1));
      colX.push(a);
      ctx.drawImage(off, c, 0, 1, rows, a, top, Math.max(b - a, 0.6), plotH);
    }
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#475467"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
    var every = Math.max(1, Math.ceil(11 / rowH));
    for (r = 0; r < rows; r += every) {
      var name = hm.layers[r].name, maxW = left - 8;
      while (name.length > 3 && ctx.measureText(name).width > maxW) name = "…" + name.slice(2);
      ctx.fillText(name, left - 5, top + (r + 0.5) * rowH);
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    ctx.strokeStyle = "#98a2b3"; ctx.beginPath();
    niceTicks(x0, x1 - 1, small ? 4 : 8).forEach(function (t) {
      var x = xOf(t);
      ctx.moveTo(x, top + plotH); ctx.lineTo(x, top + plotH + 4);
      ctx.fillText(String(t), x, top + plotH + 6);
    });
    ctx.stroke();
    ctx.fillText("step", left + plotW / 2, top + plotH + 18);
    placed.forEach(function (p) {
      var colr = p.m.severity === "critical" ? "#c8102e" : p.m.severity === "warning" ? "#b26b00" : "#1769aa";
      ctx.strokeStyle = colr; ctx.fillStyle = colr; ctx.setLineDash([4, 3]); ctx.lineWidth = 1.5;
      ctx.beginPath(); ctx.moveTo(p.x, 4 + p.row * 13 + 11); ctx.lineTo(p.x, top + plotH); ctx.stroke();
      ctx.setLineDash([]); ctx.textAlign = "left"; ctx.textBaseline = "top";
      ctx.fillText(p.m.label + " @" + p.m.step, p.x + 2, 4 + p.row * 13);
    });
    canvas.setAttribute("data-rows", rows);
    canvas.setAttribute("data-cols", cols);
    canvas.setAttribute("data-cells", cells);
    canvas.setAttribute("data-nonfinite-cells", nonfinite);
    canvas.setAttribute("data-markers", marks.length);
    canvas.setAttribute("data-row-luma", luma.join(","));
    canvas.setAttribute("data-plot", [left, top, plotW, plotH].map(Math.round).join(","));
    canvas.className = "gv-heatmap";

    canvas.addEventListener("mousemove", function (ev) {
      var rect = canvas.getBoundingClientRect(), x = ev.clientX - rect.left, y = ev.clientY - rect.top;
      var r = Math.floor((y - top) / rowH);
      if (x < left || r < 0 || r >= rows) { tooltip(null); return; }
      var c = bisect(colX, x), code = codes[r * cols + c], l = hm.layers[r];
      var steps = hm.steps[c] === ends[c] ? "step " + hm.steps[c] : "steps " + hm.steps[c] + "–" + ends[c];
      tooltip(l.name + " (" + l.kind + (l.act ? " → " + l.act : "") + ")\n" + steps + "\ngrad norm " +
              (code === CODE_MISSING ? "not recorded" : fmt(value(code))), ev);
    });
    canvas.addEventListener("mouseleave", function () { tooltip(null); });
    legend(host, hm);
  }

  function legend(host, hm) {
    var lg = div("legend", host), bar = document.createElement("canvas");
    bar.width = 160; bar.height = 10; bar.style.width = "160px"; bar.style.height = "10px";
    var ctx = bar.getContext("2d");
    for (var i = 0; i < 160; i++) { ctx.fillStyle = rgb(LUT[Math.round(i / 159 * 255)]); ctx.fillRect(i, 0, 1, 10); }
    var scale = div("scale", lg);
    scale.appendChild(document.createTextNode("grad norm " + fmt(Math.pow(10, hm.lo)) + " "));
    scale.appendChild(bar);
    scale.appendChild(document.createTextNode(" " + fmt(Math.pow(10, hm.hi)) + " (log)"));
    [["NaN", NAN_RGB], ["Inf", INF_RGB], ["0", ZERO_RGB], ["not recorded", MISSING_RGB]].forEach(function (s) {
      var d = div("", lg), sw = document.createElement("span");
      sw.className = "swatch"; sw.style.background = rgb(s[1]);
      d.appendChild(sw); d.appendChild(document.createTextNode(s[0]));
    });
  }

  // ------------------------------------------------------------- charts
  function yScale(values, log, top, bottom) {
    var lo = Infinity, hi = -Infinity;
    values.forEach(function (v) {
      if (!isFinite(v) || (log && v <= 0)) return;
      var t = log ? Math.log10(v) : v;
      if (t < lo) lo = t; if (t > hi) hi = t;
    });
    if (lo === Infinity) { lo = 0; hi = 1; }
    if (hi - lo < 1e-12) { lo -= log ? 0.5 : Math.abs(lo) * 0.1 + 0.5; hi += log ? 0.5 : Math.abs(hi) * 0.1 + 0.5; }
    if (!log) { var pad = (hi - lo) * 0.05; lo -= pad; hi += pad; }
    var f = function (v) { var t = log ? Math.log10(v) : v; return bottom - (t - lo) / (hi - lo) * (bottom - top); };
    f.lo = lo; f.hi = hi; f.log = log;
    return f;
  }
  function yAxis(svg, y, L, R) {
    var ticks = [];
    if (y.log) {
      var a = Math.ceil(y.lo), b = Math.floor(y.hi), k = Math.max(1, Math.ceil((b - a + 1) / 7));
      for (var e = a; e <= b; e += k) ticks.push([Math.pow(10, e), "1e" + e]);
      if (ticks.length < 2) {  // less than a decade: plain numbers on the log axis
        ticks = niceTicks(Math.pow(10, y.lo), Math.pow(10, y.hi), 4).filter(function (t) { return t > 0; })
          .map(function (t) { return [t, fmt(t)]; });
      }
    } else {
      niceTicks(y.lo, y.hi, 5).forEach(function (t) { ticks.push([t, fmt(t)]); });
    }
    ticks.forEach(function (t) {
      var py = y(t[0]);
      el("line", { x1: L, x2: R, y1: py, y2: py, "class": "grid" }, svg);
      el("text", { x: L - 4, y: py + 3, "text-anchor": "end" }, svg, t[1]);
    });
  }

  function lineChart(host, title, series, opts) {
    var names = Object.keys(series).filter(function (k) { return series[k].steps.length; });
    var h = document.createElement("h3"); h.textContent = title; host.appendChild(h);
    if (!names.length) { div("empty", host, "Not recorded in this run."); return; }
    var W = 560, H = 230, L = 54, R = W - 12, B = H - 28;
    var all = [];
    names.forEach(function (k) { series[k].values.forEach(function (v) { all.push(num(v)); }); });
    var pos = all.filter(function (v) { return isFinite(v) && v > 0; }), fin = all.filter(isFinite);
    var log = opts.log === true ? pos.length > 0 :
      (opts.log === "auto" && pos.length === fin.length && pos.length > 1 &&
       Math.max.apply(null, pos) / Math.min.apply(null, pos) > 100);
    var marks = opts.markers || [], x0 = opts.x0, x1 = Math.max(opts.x1, x0 + 1);
    function xOf(s) { return L + (s - x0) / (x1 - x0) * (R - L); }
    var placed = placeLabels(marks, xOf, 5.6);
    var T = 8 + placed.reduce(function (a, p) { return Math.max(a, p.row + 1); }, 0) * 12;
    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, "class": "gv-chart", "data-chart": opts.id });
    host.appendChild(svg);
    var y = yScale(all, log, T + 6, B);
    yAxis(svg, y, L, R);
    el("line", { x1: L, x2: R, y1: B, y2: B, "class": "axis" }, svg);
    niceTicks(x0, x1, 6).forEach(function (t) {
      el("text", { x: xOf(t), y: B + 13, "text-anchor": "middle" }, svg, String(t));
    });
    el("text", { x: (L + R) / 2, y: H - 2, "text-anchor": "middle" }, svg, "step");
    var drawn = 0, nonfinite = 0;
    names.forEach(function (k, i) {
      var s = series[k], d = "", pen = false, colr = LINE_COLORS[i % LINE_COLORS.length], run = null;
      var dashed = k === "clip_max_norm";
      function closeRun(end) {
        if (!run) return;
        var a = xOf(run[0]) - 1.5, b = xOf(end) + 1.5;
        var rect = el("rect", { x: a, y: T - 2, width: Math.max(3, b - a), height: 5, "class": "nf" }, svg);
        el("title", {}, rect, k + ": " + run[2] + " from step " + run[0] + " to " + end);
        run = null;
      }
      var prev = null;
      function ok(j) { var v = num(s.values[j]); return isFinite(v) && !(log && v <= 0); }
      s.steps.forEach(function (st, j) {
        var v = num(s.values[j]);
        if (ok(j) && !(j > 0 && ok(j - 1)) && !(j + 1 < s.steps.length && ok(j + 1))) {
          el("circle", { cx: xOf(st), cy: y(v), r: 2.5, fill: colr }, svg);
        }
        if (!isFinite(v) || (log && v <= 0)) {
          pen = false;
          if (!isFinite(v)) { nonfinite++; if (!run) run = [st, st, fmt(v)]; }
        } else {
          closeRun(prev);
          d += (pen ? "L" : "M") + xOf(st).toFixed(1) + " " + y(v).toFixed(1);
          pen = true; drawn++;
        }
        prev = st;
      });
      closeRun(prev);
      el("path", { d: d, fill: "none", stroke: colr, "stroke-width": 1.4, "stroke-dasharray": dashed ? "5 3" : "none" }, svg);
      if (names.length > 1) el("text", { x: R - 4, y: T + 12 + 12 * i, "text-anchor": "end", fill: colr, style: "fill:" + colr }, svg, k);
    });
    placed.forEach(function (p) {
      var g = el("g", { "class": "marker " + p.m.severity, "data-step": p.m.step }, svg);
      el("title", {}, g, p.m.labels.map(function (l) { return l + " @" + p.m.step; }).join("\n"));
      el("line", { x1: p.x, x2: p.x, y1: 4 + p.row * 12 + 9, y2: B }, g);
      el("text", { x: p.x + 2, y: 4 + p.row * 12 + 8 }, g, p.m.label + " @" + p.m.step);
    });
    svg.setAttribute("data-points", drawn);
    svg.setAttribute("data-nonfinite", nonfinite);
    svg.setAttribute("data-markers", placed.length);
    var cursor = el("line", { y1: T, y2: B, stroke: "#98a2b3", visibility: "hidden" }, svg);
    var overlay = el("rect", { x: L, y: T, width: R - L, height: B - T, fill: "transparent" }, svg);
    overlay.addEventListener("mousemove", function (ev) {
      var rect = svg.getBoundingClientRect(), sx = (ev.clientX - rect.left) * W / rect.width;
      var step = x0 + (sx - L) / (R - L) * (x1 - x0), lines = [];
      names.forEach(function (k) {
        var s = series[k], j = nearest(s.steps, step);
        if (!lines.length) { lines.push("step " + s.steps[j]); cursor.setAttribute("x1", xOf(s.steps[j])); cursor.setAttribute("x2", xOf(s.steps[j])); }
        lines.push(k + " " + fmt(num(s.values[j])));
      });
      cursor.setAttribute("visibility", "visible");
      tooltip(lines.join("\n"), ev);
    });
    overlay.addEventListener("mouseleave", function () { tooltip(null); cursor.setAttribute("visibility", "hidden"); });
  }

  function depthPanel(host, p) {
    var box = div("panel", host);
    box.setAttribute("data-quantity", p.quantity);
    var h = document.createElement("h3"); h.textContent = p.title; box.appendChild(h);
    div("phint", box, p.hint);
    var n = p.names.length;
    if (!n) { div("empty", box, p.empty || "Not recorded in this run."); return; }
    var first = p.first.map(num), last = p.last.map(num);
    var W = 420, H = 200, L = 50, R = W - 10, T = 12, B = H - 30;
    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, "class": "gv-panel", "data-quantity": p.quantity });
    box.appendChild(svg);
    var vals = first.concat(last);
    if (p.guide) vals.push(p.guide);
    var log = p.log && vals.some(function (v) { return isFinite(v) && v > 0; });
    var y = p.log ? yScale(vals, log, T, B) : yScale([0, 1], false, T, B);
    yAxis(svg, y, L, R);
    function xOf(i) { return n === 1 ? (L + R) / 2 : L + 8 + i / (n - 1) * (R - L - 16); }
    el("line", { x1: L, x2: R, y1: B, y2: B, "class": "axis" }, svg);
    var ticks = n <= 10 ? p.names.map(function (_, i) { return i; }) : niceTicks(0, n - 1, 6);
    ticks.forEach(function (i) {
      var label = n <= 10 ? p.names[i] : String(i);
      if (label.length > 10) label = "…" + label.slice(-9);
      el("text", { x: xOf(i), y: B + 13, "text-anchor": "middle" }, svg, label);
    });
    el("text", { x: (L + R) / 2, y: H - 3, "text-anchor": "middle" }, svg, "layer, forward order →");
    if (p.guide) {
      var gy = y(p.guide);
      el("line", { x1: L, x2: R, y1: gy, y2: gy, stroke: "#1a7f37", "stroke-dasharray": "2 3" }, svg);
      el("text", { x: R - 2, y: gy - 3, "text-anchor": "end", style: "fill:#1a7f37" }, svg, "~" + fmt(p.guide));
    }
    var drawn = 0, lines = [[last, LAST_COLOR, p.last_step]];
    if (p.first_step !== p.last_step) lines.unshift([first, FIRST_COLOR, p.first_step]);
    lines.forEach(function (s) {
      var d = "", pen = false;
      s[0].forEach(function (v, i) {
        if (!isFinite(v)) {
          var t = el("text", { x: xOf(i), y: T - 2, "text-anchor": "middle", "class": "nf", style: "fill:#c8102e" }, svg, "×");
          el("title", {}, t, p.names[i] + ": " + fmt(v) + " at step " + s[2]);
          pen = false; return;
        }
        if (log && v <= 0) {  // e.g. an update below float resolution: exactly 0
          var z = el("circle", { cx: xOf(i), cy: B - 3, r: 2.4, fill: "none", stroke: s[1] }, svg);
          el("title", {}, z, p.names[i] + " (" + p.kinds[i] + "): 0 at step " + s[2]);
          pen = false; return;
        }
        var cx = xOf(i), cy = Math.max(T, Math.min(B, y(v)));
        d += (pen ? "L" : "M") + cx.toFixed(1) + " " + cy.toFixed(1); pen = true;
        var dot = el("circle", { cx: cx, cy: cy, r: n > 60 ? 1.6 : 2.6, fill: s[1] }, svg);
        el("title", {}, dot, p.names[i] + " (" + p.kinds[i] + "): " + fmt(v) + " at step " + s[2]);
        drawn++;
      });
      el("path", { d: d, fill: "none", stroke: s[1], "stroke-width": 1.3 }, svg);
    });
    var key = div("legend", box);
    lines.forEach(function (s) {
      var k = ["step " + s[2], s[1]];
      var d = div("", key), sw = document.createElement("span");
      sw.className = "swatch"; sw.style.background = k[1];
      d.appendChild(sw); d.appendChild(document.createTextNode(k[0]));
    });
    svg.setAttribute("data-points", drawn);
  }

  function render(report) {
    var id = report.getAttribute("data-payload"), blob = document.getElementById(id);
    var data = JSON.parse(blob.textContent);
    var hm = report.querySelector('[data-role="heatmap"]');
    var x0 = data.heatmap.steps.length ? data.heatmap.steps[0] : 0;
    var x1 = Math.max(data.steps - 1, x0 + 1);  // run.steps may be missing: cover every point
    var ends = data.heatmap.ends || data.heatmap.steps;
    if (ends.length) x1 = Math.max(x1, ends[ends.length - 1]);
    [data.curves && data.curves.loss, data.curves && data.curves.grad_norm].forEach(function (group) {
      for (var k in group || {}) { var st = group[k].steps; if (st.length) x1 = Math.max(x1, st[st.length - 1]); }
    });
    if (hm) heatmap(hm, data.heatmap, data.markers, hm.classList.contains("small"));
    var loss = report.querySelector('[data-role="loss"]');
    if (loss) lineChart(loss, "Loss", data.curves.loss, { log: "auto", markers: data.markers, x0: 0, x1: x1, id: "loss" });
    var gn = report.querySelector('[data-role="grad_norm"]');
    if (gn) lineChart(gn, "Global gradient norm (log)", data.curves.grad_norm, { log: true, markers: data.markers, x0: 0, x1: x1, id: "grad_norm" });
    var lz = report.querySelector('[data-role="log_z"]');
    if (lz && data.curves.log_z) lineChart(lz, "Output logits: log Z = logsumexp (mean, max over tokens)", data.curves.log_z, { log: false, markers: data.markers, x0: 0, x1: x1, id: "log_z" });
    var panels = report.querySelector('[data-role="panels"]');
    if (panels) data.panels.forEach(function (p) { depthPanel(panels, p); });
  }

  function main() {
    var reports = document.querySelectorAll(".gv-report"), ok = 0;
    for (var i = 0; i < reports.length; i++) {
      try { render(reports[i]); ok++; }
      catch (e) { console.error("gradvitals: could not draw report " + i + ": " + (e && e.stack || e)); }
    }
    document.body.setAttribute("data-gv-rendered", ok + "/" + reports.length);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
  else main();
})();
