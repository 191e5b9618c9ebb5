// The interactive interaction graph of the degeneracy HTML report. Plain JavaScript, no library,
// no network. Reads the JSON in <script id="graph-data">, draws on a canvas: layers left to right,
// node radius by eigenvalue (log scale within a layer), edge width by strength, colour by module.
// The slider scales the threshold ε of every layer pair (edges with E >= ε are shown); the colours
// are either the modules saved with the run or the connected components of the edges shown,
// recomputed on every move of the slider. Hover a node for its facts; click it to highlight its
// incoming and outgoing edges (click the background to clear).
(function () {
  "use strict";
  var dataNode = document.getElementById("graph-data");
  var root = document.getElementById("graph-view");
  if (!dataNode || !root) { return; }
  var G = JSON.parse(dataNode.textContent);
  var canvas = root.querySelector("canvas");
  var slider = root.querySelector("#eps-slider");
  var epsLabel = root.querySelector("#eps-label");
  var stats = root.querySelector("#graph-stats");
  var tooltip = root.querySelector("#graph-tooltip");
  var legend = root.querySelector("#graph-legend");
  var colourInputs = root.querySelectorAll("input[name=colour-by]");
  var ctx = canvas.getContext("2d");

  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"];
  var NONE = "#c4c4c4";
  var nodes = G.nodes, edges = G.edges, layers = G.layers;
  var state = { t: 0, colourBy: G.has_modules ? "modules" : "components", selected: -1,
    shown: [], colour: [], numGroups: 0, width: 0, height: 0, drawnEdges: 0, drawnNodes: 0 };

  // slider range: from the weakest to the strongest edge, in log10 of (E / ε of its pair)
  var lo = 0, hi = 0;
  edges.forEach(function (e) {
    var r = Math.log10(e[2] / G.epsilon[nodes[e[0]].layer]);
    if (r < lo) { lo = r; }
    if (r > hi) { hi = r; }
  });
  slider.min = Math.floor(lo * 10) / 10 - 0.1;
  slider.max = Math.ceil(hi * 10) / 10 + 0.1;
  slider.step = 0.05;
  slider.value = 0;

  // layout: x by layer, y by (module, index) within the layer; radius by log eigenvalue in the layer
  var order = layers.map(function () { return []; });
  nodes.forEach(function (n, id) { order[n.layer].push(id); });
  order.forEach(function (ids) {
    ids.sort(function (a, b) {
      var ma = nodes[a].module < 0 ? 1e9 : nodes[a].module, mb = nodes[b].module < 0 ? 1e9 : nodes[b].module;
      return ma - mb || nodes[a].index - nodes[b].index;
    });
    ids.forEach(function (id, rank) { nodes[id].rank = rank; });
    var logs = ids.map(function (id) { return Math.log10(Math.max(nodes[id].eigenvalue, 1e-300)); });
    var top = Math.max.apply(null, logs), bottom = Math.min.apply(null, logs);
    ids.forEach(function (id, k) {
      var f = top > bottom ? (logs[k] - bottom) / (top - bottom) : 1;
      nodes[id].radius = 1.8 + 5.2 * f;
    });
  });

  function layout() {
    var width = Math.max(root.clientWidth, 480);
    var most = Math.max.apply(null, layers.map(function (l) { return l.dim; }));
    var height = Math.min(Math.max(360, most * 7 + 60), 760);
    var dpr = window.devicePixelRatio || 1;
    canvas.style.width = width + "px";
    canvas.style.height = height + "px";
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    state.width = width;
    state.height = height;
    var left = 70, right = 70, topPad = 34, bottomPad = 16;
    var step = layers.length > 1 ? (width - left - right) / (layers.length - 1) : 0;
    nodes.forEach(function (n) {
      var count = layers[n.layer].dim;
      var gap = (height - topPad - bottomPad) / Math.max(count, 1);
      n.x = left + step * n.layer;
      n.y = topPad + gap * (n.rank + 0.5);
    });
  }

  function epsilonOf(layer) { return G.epsilon[layer] * Math.pow(10, state.t); }

  function recompute() {
    var shown = [];
    for (var k = 0; k < edges.length; k++) {
      var e = edges[k];
      if (e[2] >= epsilonOf(nodes[e[0]].layer)) { shown.push(k); }
    }
    state.shown = shown;
    var colour = new Array(nodes.length);
    if (state.colourBy === "modules") {
      for (var i = 0; i < nodes.length; i++) { colour[i] = nodes[i].module; }
      state.numGroups = G.num_modules;
    } else {  // connected components of the shown edges (union-find), largest first
      var parent = nodes.map(function (_, id) { return id; });
      var find = function (a) { while (parent[a] !== a) { parent[a] = parent[parent[a]]; a = parent[a]; } return a; };
      shown.forEach(function (k) {
        var a = find(edges[k][0]), b = find(edges[k][1]);
        if (a !== b) { parent[a] = b; }
      });
      var size = {};
      nodes.forEach(function (_, id) { var r = find(id); size[r] = (size[r] || 0) + 1; });
      var roots = Object.keys(size).filter(function (r) { return size[r] > 1; })
        .sort(function (a, b) { return size[b] - size[a] || a - b; });
      var label = {};
      roots.forEach(function (r, k) { label[r] = k; });
      nodes.forEach(function (_, id) { var r = find(id); colour[id] = r in label ? label[r] : -1; });
      state.numGroups = roots.length;
    }
    state.colour = colour;
  }

  function colourOf(group) { return group < 0 ? NONE : PALETTE[group % PALETTE.length]; }

  function draw() {
    var w = state.width, h = state.height;
    ctx.clearRect(0, 0, w, h);
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, w, h);
    ctx.fillStyle = "#333";
    ctx.font = "12px sans-serif";
    layers.forEach(function (l, k) {  // the outer labels are aligned to the edges so they stay visible
      var n = nodes.find(function (x) { return x.layer === k; });
      if (!n) { return; }
      var label = l.name + " (" + l.dim + ")";
      var half = ctx.measureText(label).width / 2;
      ctx.textAlign = "center";
      ctx.fillText(label, Math.min(Math.max(n.x, half + 4), w - half - 4), 18);
    });
    var sel = state.selected;
    var maxLog = {};
    state.shown.forEach(function (k) {
      var e = edges[k], layer = nodes[e[0]].layer, r = Math.log(e[2] / epsilonOf(layer));
      if (!(layer in maxLog) || r > maxLog[layer]) { maxLog[layer] = r; }
    });
    // batch edges by stroke style: one path per (colour, width) bucket keeps thousands of edges smooth
    var buckets = {};
    var drawn = 0, incoming = 0, outgoing = 0;
    state.shown.forEach(function (k) {
      var e = edges[k], a = nodes[e[0]], b = nodes[e[1]];
      var touches = sel >= 0 && (e[0] === sel || e[1] === sel);
      if (e[1] === sel) { incoming++; }
      if (e[0] === sel) { outgoing++; }
      var r = Math.log(e[2] / epsilonOf(a.layer)), m = maxLog[a.layer] || 1;
      var width = 0.4 + 3.6 * Math.min(1, Math.max(0, m > 0 ? r / m : 1));
      var bucketWidth = Math.round(width * 2) / 2;
      var style;
      if (sel >= 0) {
        style = touches ? (e[1] === sel ? "#d62728" : "#111111") : "rgba(190,190,190,0.25)";
      } else {
        var same = state.colour[e[0]] === state.colour[e[1]] && state.colour[e[0]] >= 0;
        style = same ? colourOf(state.colour[e[0]]) : NONE;
      }
      var key = style + "|" + bucketWidth + "|" + (touches ? 1 : 0);
      (buckets[key] = buckets[key] || []).push([a, b]);
      drawn++;
    });
    var keys = Object.keys(buckets).sort(function (p, q) {  // highlighted edges last (on top)
      return Number(p.split("|")[2]) - Number(q.split("|")[2]);
    });
    keys.forEach(function (key) {
      var parts = key.split("|");
      ctx.strokeStyle = parts[0];
      ctx.lineWidth = Number(parts[1]);
      ctx.globalAlpha = sel >= 0 ? 0.9 : 0.55;
      ctx.beginPath();
      buckets[key].forEach(function (ab) {
        var a = ab[0], b = ab[1], mid = (a.x + b.x) / 2;
        ctx.moveTo(a.x, a.y);
        ctx.bezierCurveTo(mid, a.y, mid, b.y, b.x, b.y);
      });
      ctx.stroke();
    });
    ctx.globalAlpha = 1;
    nodes.forEach(function (n, id) {
      ctx.beginPath();
      ctx.arc(n.x, n.y, n.radius, 0, 2 * Math.PI);
      ctx.fillStyle = colourOf(state.colour[id]);
      ctx.fill();
      ctx.lineWidth = id === sel ? 2.5 : 0.6;
      ctx.strokeStyle = id === sel ? "#000" : "#555";
      ctx.stroke();
    });
    state.drawnEdges = drawn;
    state.drawnNodes = nodes.length;
    var eps = G.epsilon.map(function (_, k) { return epsilonOf(k).toPrecision(3); });
    epsLabel.textContent = "ε = 10^" + state.t.toFixed(2) + " × ε_run  (per layer pair: " + eps.join(", ") + ")";
    var noun = state.colourBy === "modules" ? "modules (saved with the run)" : "connected components (≥ 2 features) at this ε";
    stats.textContent = drawn + " of " + edges.length + " edges shown · " + nodes.length + " features · " +
      state.numGroups + " " + noun + (sel >= 0 ? " · selected: " + incoming + " in, " + outgoing + " out" : "");
    stats.dataset.nodes = String(nodes.length);
    stats.dataset.edgesShown = String(drawn);
    stats.dataset.groups = String(state.numGroups);
    stats.dataset.selectedIn = String(sel >= 0 ? incoming : -1);
    stats.dataset.selectedOut = String(sel >= 0 ? outgoing : -1);
    drawLegend();
  }

  function drawLegend() {
    var counts = {};
    state.colour.forEach(function (g) { if (g >= 0) { counts[g] = (counts[g] || 0) + 1; } });
    var groups = Object.keys(counts).map(Number).sort(function (a, b) { return a - b; }).slice(0, 15);
    legend.innerHTML = "";
    groups.forEach(function (g) {
      var item = document.createElement("span");
      item.className = "legend-item";
      var swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colourOf(g);
      item.appendChild(swatch);
      item.appendChild(document.createTextNode((state.colourBy === "modules" ? "module " : "component ") + g + ": " + counts[g]));
      legend.appendChild(item);
    });
  }

  function nodeAt(x, y) {
    var best = -1, bestDist = Infinity;
    nodes.forEach(function (n, id) {
      var d = Math.hypot(n.x - x, n.y - y);
      if (d <= n.radius + 4 && d < bestDist) { best = id; bestDist = d; }
    });
    return best;
  }

  function fmt(v) { return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-2 && v !== 0) ? v.toExponential(3) : v.toPrecision(4); }

  function showTooltip(id, x, y) {
    if (id < 0) { tooltip.hidden = true; return; }
    var n = nodes[id], inDeg = 0, outDeg = 0;
    state.shown.forEach(function (k) { if (edges[k][1] === id) { inDeg++; } if (edges[k][0] === id) { outDeg++; } });
    var lines = [
      "layer: " + layers[n.layer].name,
      "feature index: " + n.index,
      "eigenvalue Λ: " + fmt(n.eigenvalue),
      "module (saved): " + (n.module >= 0 ? n.module : "none (no edge above ε)"),
    ];
    if (state.colourBy !== "modules") { lines.push("component at this ε: " + (state.colour[id] >= 0 ? state.colour[id] : "none")); }
    if (n.frequency !== undefined) {
      lines.push("dominant frequency: " + n.frequency + " (power fraction " + n.fraction.toFixed(2) + ")");
    }
    lines.push("edges shown: " + inDeg + " in, " + outDeg + " out");
    tooltip.textContent = "";
    lines.forEach(function (line, k) {
      if (k) { tooltip.appendChild(document.createElement("br")); }
      tooltip.appendChild(document.createTextNode(line));
    });
    tooltip.hidden = false;
    var left = Math.min(x + 14, state.width - 260);  // canvas coordinates, shifted to the container's
    tooltip.style.left = (canvas.offsetLeft + left) + "px";
    tooltip.style.top = (canvas.offsetTop + y + 14) + "px";
  }

  function position(event) {
    var rect = canvas.getBoundingClientRect();
    return [event.clientX - rect.left, event.clientY - rect.top];
  }

  var pending = false;
  function schedule() {
    if (pending) { return; }
    pending = true;
    window.requestAnimationFrame(function () { pending = false; recompute(); draw(); });
  }

  slider.addEventListener("input", function () { state.t = Number(slider.value); schedule(); });
  Array.prototype.forEach.call(colourInputs, function (input) {
    input.checked = input.value === state.colourBy;
    input.disabled = input.value === "modules" && !G.has_modules;
    input.addEventListener("change", function () { state.colourBy = input.value; recompute(); draw(); });
  });
  canvas.addEventListener("mousemove", function (event) {
    var p = position(event);
    var id = nodeAt(p[0], p[1]);
    canvas.style.cursor = id >= 0 ? "pointer" : "default";
    showTooltip(id, p[0], p[1]);
  });
  canvas.addEventListener("mouseleave", function () { tooltip.hidden = true; });
  canvas.addEventListener("click", function (event) {
    var p = position(event);
    var id = nodeAt(p[0], p[1]);
    state.selected = id === state.selected ? -1 : id;
    draw();
  });
  window.addEventListener("resize", function () { layout(); draw(); });

  layout();
  recompute();
  draw();
  // for tests and the console: the state, a node's position, and a synchronous redraw
  window.degeneracyGraph = {
    state: state,
    nodePosition: function (id) { return [nodes[id].x, nodes[id].y]; },
    setThreshold: function (t) { slider.value = t; state.t = Number(slider.value); recompute(); draw(); return state.drawnEdges; },
  };
})();
