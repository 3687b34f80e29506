// The tokenmill dashboard: polls dashboard/data (relative, so a path prefix in front of the server works)
// every second and draws each series on its own <canvas>. Plain browser JavaScript, nothing to build.
"use strict";

const COLORS = ["#3367d6", "#e8710a", "#c5221f", "#188038", "#9334e6", "#12a4af"];
const PERCENTILES = ["p50", "p90", "p99"];

const count = v => v == null ? "–" : v.toFixed(0);
const percent = v => v == null ? "–" : (100 * v).toFixed(1) + " %";
const rate = v => v == null ? "–" : v.toFixed(1);
const ms = v => v == null ? "–" : (1000 * v).toFixed(v < 0.01 ? 2 : 1) + " ms";
const percentiles = key => p => PERCENTILES.map(name => p[key][name]);
// A legend: each line's name in its plot colour, with its figure.
const legend = entries => entries.map(([name, figure], i) =>
  `<span style="color:${COLORS[i % COLORS.length]}">■</span> ${name} ${figure}`).join(" &nbsp; ");
const percentileDetail = (key, format) => p => legend(PERCENTILES.map(name => [name, format(p[key][name])]));

// Each tile: its series (one line per value `lines` returns for a point) and how its figures read.
const TILES = [
  {id: "running", label: "running batch", lines: p => [p.running], format: count},
  {id: "waiting", label: "queue", lines: p => [p.waiting], format: count},
  {id: "kv_cache", label: "KV-cache usage", lines: p => [p.kv_cache_usage], format: percent},
  {id: "prefix_cache", label: "prefix-cache hit rate", lines: p => [p.prefix_cache_hit_rate], format: percent},
  {id: "tokens", label: "output tokens / s", lines: p => [p.output_tokens_per_s], format: rate},
  {id: "ttft", label: "time to first token", lines: percentiles("ttft_s"), format: ms,
   detail: percentileDetail("ttft_s", ms)},
  {id: "itl", label: "inter-token latency", lines: percentiles("inter_token_s"), format: ms,
   detail: percentileDetail("inter_token_s", ms)},
  {id: "load", label: "in flight per replica", lines: null, format: count},
];

function buildTiles() {
  const container = document.getElementById("tiles");
  for (const tile of TILES) {
    const element = document.createElement("div");
    element.className = "tile";
    element.dataset.tile = tile.id;
    element.innerHTML = `<div class="label">${tile.label}</div><div class="value" id="value-${tile.id}">–</div>` +
      `<div class="detail" id="detail-${tile.id}"></div><canvas id="plot-${tile.id}"></canvas>`;
    container.appendChild(element);
  }
}

// Lines over the last `span` seconds, y from 0 to the largest value; gaps (null) break a line.
// The canvas records how many values it drew, which the browser test reads.
function plot(canvas, times, lines, span) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth * ratio, height = canvas.clientHeight * ratio;
  canvas.width = width;
  canvas.height = height;
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, width, height);
  const values = lines.flat().filter(v => v != null && isFinite(v));
  const top = Math.max(...values, 0) * 1.1 || 1;
  const end = times[times.length - 1];
  const x = t => width - (end - t) / span * width;
  const y = v => height - 1 - v / top * (height - 2);
  lines.forEach((line, index) => {
    g.strokeStyle = COLORS[index % COLORS.length];
    g.lineWidth = 1.5 * ratio;
    g.beginPath();
    let drawing = false;
    line.forEach((v, i) => {
      if (v == null || !isFinite(v)) { drawing = false; return; }
      drawing ? g.lineTo(x(times[i]), y(v)) : g.moveTo(x(times[i]), y(v));
      drawing = true;
    });
    g.stroke();
  });
  canvas.dataset.points = values.length;
}

const escapeHtml = text => text.replace(/[&<>"]/g, c => `&#${c.charCodeAt(0)};`);

function showReplicas(replicas) {
  const health = r => r.draining ? "draining" : (r.healthy ? "healthy" : "unhealthy");
  const rows = replicas.map(r => `<tr><td>${escapeHtml(r.address)}</td>` +
    `<td class="${r.healthy && !r.draining ? "healthy" : "unhealthy"}">${health(r)}</td>` +
    `<td>${count(r.in_flight)}</td><td>${count(r.running)}</td><td>${count(r.waiting)}</td>` +
    `<td>${percent(r.kv_cache_usage)}</td><td>${count(r.requests)}</td><td>${count(r.failures)}</td></tr>`);
  document.querySelector("#replicas tbody").innerHTML = rows.join("");
}

function show(data) {
  const points = data.points;
  if (!points.length) return;
  const times = points.map(p => p.t), latest = points[points.length - 1];
  const span = Math.max(times[times.length - 1] - times[0], 10 * data.interval_s);  // the plots fill their width
  const addresses = data.replicas.map(r => r.address);
  for (const tile of TILES) {
    const lines = tile.lines ? tile.lines : p => addresses.map(a => p.load[a]);
    const series = lines(latest).map((_, i) => points.map(p => lines(p)[i]));
    plot(document.getElementById(`plot-${tile.id}`), times, series, span);
    const values = lines(latest);
    document.getElementById(`value-${tile.id}`).textContent =
      tile.lines ? tile.format(values[0]) : tile.format(values.reduce((a, b) => a + (b || 0), 0));
    document.getElementById(`detail-${tile.id}`).innerHTML = tile.detail ? tile.detail(latest)
      : (tile.lines ? "" : legend(addresses.map((a, i) => [escapeHtml(a), count(values[i])])));
  }
  showReplicas(data.replicas);
  const changes = Object.entries(data.replica_changes || {});  // a set that grows and shrinks (--ray)
  document.getElementById("replica-changes").textContent =
    changes.length ? "since start: " + changes.map(([why, n]) => `${n} ${why}`).join(", ") : "";
  document.getElementById("model").textContent = data.model;
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("dashboard/data", {cache: "no-store"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    show(await response.json());
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "";
  } catch (error) {
    status.textContent = "server unreachable: " + error.message;
    status.className = "down";
  }
}

buildTiles();
poll();
setInterval(poll, 1000);
