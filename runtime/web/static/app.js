// The shmflow dashboard: one page, three views, fed by the server's event stream (/events, once a second).
// No framework and no build step: the DOM is rebuilt from each document, which is small.
"use strict";

const $ = (id) => document.getElementById(id);
const PALETTE = ["#3d7eff", "#7b61ff", "#2fb5a6", "#f2a33a", "#e4587a", "#20a4f3", "#9c6ade", "#4caf50"];
let state = { page: "overview", job: "", doc: null, source: null };

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  n = Number(n) || 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n < 10 ? n.toFixed(1) : n.toFixed(0)) + " " + u[i];
}
function num(n) { return Math.round(Number(n) || 0).toLocaleString("en-US"); }
function rate(n) {
  n = Number(n) || 0;
  return n >= 1e6 ? (n / 1e6).toFixed(2) + " M/s" : n >= 1e3 ? (n / 1e3).toFixed(1) + " k/s" : n.toFixed(0) + " /s";
}
function dur(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor(s / 60) % 60}m` : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}
function pct(x) { return (100 * (Number(x) || 0)).toFixed(1) + "%"; }

// ------------------------------------------------------------------ routing and the event stream
function route() {
  const [page, job] = (location.hash.slice(1) || "overview").split("/");
  state.page = ["overview", "job", "memory"].includes(page) ? page : "overview";
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === state.page));
  document.querySelectorAll(".page").forEach((p) => p.classList.toggle("active", p.id === "page-" + state.page));
  if ((job || "") !== state.job) { state.job = job || ""; connect(); }
  if (state.doc) render(state.doc);
}
function connect() {
  if (state.source) state.source.close();
  const src = new EventSource("/events" + (state.job ? "?job=" + encodeURIComponent(state.job) : ""));
  state.source = src;
  src.onmessage = (e) => {
    state.doc = JSON.parse(e.data);
    $("live").classList.add("on");
    $("live-text").textContent = "live · " + new Date().toLocaleTimeString();
    render(state.doc);
  };
  src.onerror = () => { $("live").classList.remove("on"); $("live-text").textContent = "reconnecting"; };
}
function render(doc) {
  if (state.page === "overview") renderOverview(doc);
  if (state.page === "job") renderJob(doc.job);
  if (state.page === "memory") renderMemory(doc.memory);
}

// ------------------------------------------------------------------ overview
function renderOverview(doc) {
  const o = doc.overview, r = o.region;
  const cards = [["Workers", o.taskmanagers], ["Running jobs", o["jobs-running"]], ["Finished", o["jobs-finished"]],
    ["Region", bytes(r.size)], ["Free", bytes(r.free_bytes)], ["Largest free block", bytes(r.largest_free_block)],
    ["Fragmentation", pct(r.fragmentation)]];
  $("ov-cards").innerHTML = cards.map(([k, v]) => `<div class="stat"><div class="k">${k}</div><div class="v">${esc(v)}</div></div>`).join("");
  $("ov-workers").innerHTML = "<tr><th>Worker</th><th class=n>PID</th><th class=n>Uptime</th><th class=n>RSS</th>" +
    "<th class=n>GC time</th><th class=n>Heartbeats</th><th class=n>Last heard</th></tr>" +
    doc.taskmanagers.map((t) => `<tr><td>worker ${esc(t.id)}</td><td class=n>${t.pid}</td><td class=n>${dur(t.uptime)}</td>` +
      `<td class=n>${bytes(t.memory.rss)}</td><td class=n>${t.memory["gc-time-ms"].toFixed(0)} ms</td>` +
      `<td class=n>${num(t.heartbeats)}</td><td class=n>${(t.timeSinceLastHeartbeat / 1000).toFixed(1)} s</td></tr>`).join("");
  const mem = doc.memory;
  $("ov-memory").innerHTML = `<h3>region · ${bytes(mem.region.size)}</h3><div class="membar small">${bar(mem.region, (b) => b.kind === "free" ? "free" : b.owner)}</div>` +
    mem.workers.filter((w) => w.arena).map((w) => `<h3>worker ${w.id} arena · ${bytes(w.arena.free_bytes)} free · largest free block ${bytes(w.arena.largest_free_block)}</h3>` +
      `<div class="membar small">${bar(w.arena, (b) => b.kind === "free" ? "free" : b.owner.replace(/^worker-\d+ /, ""))}</div>`).join("");
  const jobs = doc.jobs.slice().reverse();
  $("ov-jobs").innerHTML = jobs.length ? "<tr><th>Job</th><th>State</th><th class=n>Duration</th><th class=n>Tasks</th></tr>" +
    jobs.map((j) => `<tr><td><a href="#job/${j.jid}">${esc(j.name)}</a></td><td><span class="badge ${j.state}">${j.state}</span></td>` +
      `<td class=n>${dur(j.duration)}</td><td class=n>${j.tasks.total}</td></tr>`).join("")
    : `<tr><td class="empty">no job has run yet</td></tr>`;
}

// ------------------------------------------------------------------ job
// Flink colours a vertex by its busiest subtask: light blue (idle) to red (busy), towards grey when backpressured.
function vertexColour(busyMs, backMs) {
  const busy = Math.min(1, busyMs / 1000), back = Math.min(1, backMs / 1000);
  const idle = [206, 226, 252], hot = [232, 78, 72], grey = [158, 158, 158];
  const rgb = idle.map((c, i) => c + (hot[i] - c) * busy).map((c, i) => c + (grey[i] - c) * back);
  return `rgb(${rgb.map((c) => c.toFixed(0)).join(",")})`;
}
function levels(job) {
  const byId = Object.fromEntries(job.plan.nodes.map((n) => [n.id, n]));
  const level = {};
  const depth = (id) => {
    if (level[id] !== undefined) return level[id];
    const ins = byId[id].inputs;
    return (level[id] = ins.length ? 1 + Math.max(...ins.map((i) => depth(i.id))) : 0);
  };
  job.plan.nodes.forEach((n) => depth(n.id));
  return level;
}
function renderJob(job) {
  if (!job) {
    $("job-head").innerHTML = `<div class="empty">no job has run yet: start one with <code>shmflow run job.py --ui</code></div>`;
    $("job-graph").innerHTML = ""; $("job-subtasks").innerHTML = ""; $("job-checkpoints").innerHTML = "";
    return;
  }
  const inTotal = job.vertices.reduce((a, v) => a + (v.metrics.numRecordsInPerSecond || 0), 0);
  $("job-head").innerHTML = `<span class="name">${esc(job.name)}</span><span class="badge ${job.state}">${job.state}</span>` +
    `<span class="meta">${job["job-type"].toLowerCase()} · ${dur(job.duration)} · ${job.vertices.length} vertices · ` +
    `${rate(inTotal)} in · id <code>${job.jid.slice(0, 12)}</code></span>`;
  $("graph-legend").innerHTML = `idle <i></i> busy &nbsp; <b></b> backpressured`;
  drawGraph(job);
  drawChart(job);
  $("job-subtasks").innerHTML = "<tr><th>Vertex</th><th class=n>#</th><th>Status</th><th class=n>Records in</th>" +
    "<th class=n>Records out</th><th class=n>In/s</th><th class=n>Out/s</th><th class=n>Busy ms/s</th>" +
    "<th class=n>Idle ms/s</th><th class=n>Backpressured ms/s</th><th class=n>In pool</th><th class=n>Out pool</th></tr>" +
    job.vertices.map((v) => v.subtasks.map((s) => {
      const m = s.metrics;
      return `<tr data-vertex="${v.id}" data-subtask="${s.subtask}"><td>${esc(v.name)}</td><td class=n>${s.subtask}</td>` +
        `<td><span class="badge ${s.status}">${s.status}</span></td>` +
        `<td class=n data-metric="read-records">${num(m["read-records"])}</td><td class=n data-metric="write-records">${num(m["write-records"])}</td>` +
        `<td class=n>${rate(m.numRecordsInPerSecond)}</td><td class=n>${rate(m.numRecordsOutPerSecond)}</td>` +
        `<td class=n>${m.busyTimeMsPerSecond.toFixed(0)}</td><td class=n>${m.idleTimeMsPerSecond.toFixed(0)}</td>` +
        `<td class=n>${m.backPressuredTimeMsPerSecond.toFixed(0)}</td><td class=n>${pct(m["buffers.inPoolUsage"])}</td>` +
        `<td class=n>${pct(m["buffers.outPoolUsage"])}</td></tr>`;
    }).join("")).join("");
  fetch(`/jobs/${job.jid}/checkpoints`).then((r) => r.json()).then((c) => {
    const rows = Object.entries(c.summary || {}).filter(([, v]) => typeof v !== "object");
    $("job-checkpoints").innerHTML = `<div class="kv"><span class="k">restarts</span><span>${c.restarts}</span>` +
      (rows.length ? rows.map(([k, v]) => `<span class="k">${esc(k.replace(/_/g, " "))}</span><span class="num">${esc(typeof v === "number" ? (Number.isInteger(v) ? num(v) : v.toFixed(3)) : v)}</span>`).join("")
        : `<span class="k">checkpoints</span><span>off for this job</span>`) + "</div>";
  }).catch(() => {});
}
function drawGraph(job) {
  const svg = $("job-graph");
  const level = levels(job);
  const cols = {};
  job.vertices.forEach((v) => (cols[level[v.id]] = cols[level[v.id]] || []).push(v));
  const ncol = Object.keys(cols).length, W = svg.clientWidth || 1000, H = 230, bw = 270, bh = 92;
  const gap = ncol > 1 ? (W - 40 - bw) / (ncol - 1) : 0;
  const pos = {};
  Object.entries(cols).forEach(([c, vs]) => vs.forEach((v, i) => {
    pos[v.id] = { x: 20 + Number(c) * gap, y: (H - vs.length * bh - (vs.length - 1) * 18) / 2 + i * (bh + 18) };
  }));
  let out = `<defs><marker id="arr" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto">` +
    `<path d="M0,0 L10,5 L0,10 z" fill="#9aa6bd"/></marker></defs>`;
  job.plan.nodes.forEach((n) => n.inputs.forEach((inp) => {
    const a = pos[inp.id], b = pos[n.id];
    if (!a || !b) return;
    const x1 = a.x + bw, y1 = a.y + bh / 2, x2 = b.x - 2, y2 = b.y + bh / 2, mx = (x1 + x2) / 2;
    out += `<path class="edge" marker-end="url(#arr)" d="M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}"/>` +
      `<text class="ship" x="${mx}" y="${(y1 + y2) / 2 - 6}" text-anchor="middle">${inp.ship_strategy}</text>`;
  }));
  job.vertices.forEach((v) => {
    const p = pos[v.id], m = v.metrics;
    const fill = vertexColour(m["max-busyTimeMsPerSecond"], m["max-backPressuredTimeMsPerSecond"]);
    const dark = m["max-busyTimeMsPerSecond"] > 550 || m["max-backPressuredTimeMsPerSecond"] > 700;
    const ink = dark ? "#fff" : "#12182a";
    const name = v.name.length > 34 ? v.name.slice(0, 33) + "…" : v.name;
    out += `<g class="vertex" data-vertex="${v.id}"><title>${esc(v.name)}</title>` +
      `<rect x="${p.x}" y="${p.y}" rx="9" width="${bw}" height="${bh}" fill="${fill}"/>` +
      `<text class="title" x="${p.x + 12}" y="${p.y + 21}" fill="${ink}" style="fill:${ink}">${esc(name)}</text>` +
      `<text x="${p.x + 12}" y="${p.y + 41}" style="fill:${ink}">Parallelism ${v.parallelism} · ${v.status.toLowerCase()}</text>` +
      `<text x="${p.x + 12}" y="${p.y + 60}" style="fill:${ink}" data-metric="read-records">in ${num(m["read-records"])} · out ${num(m["write-records"])}</text>` +
      `<text x="${p.x + 12}" y="${p.y + 79}" style="fill:${ink}">busy ${(m["max-busyTimeMsPerSecond"] / 10).toFixed(0)}% · backpressured ${(m["max-backPressuredTimeMsPerSecond"] / 10).toFixed(0)}%</text></g>`;
  });
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.innerHTML = out;
}
function drawChart(job) {
  const canvas = $("job-chart"), ctx = canvas.getContext("2d");
  const dpr = window.devicePixelRatio || 1, W = canvas.clientWidth || 1000, H = 170;
  canvas.width = W * dpr; canvas.height = H * dpr; ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, W, H);
  const series = job.vertices.map((v, i) => ({ name: v.name, colour: PALETTE[i % PALETTE.length], pts: v.history || [] }));
  const all = series.flatMap((s) => s.pts);
  const L = 64, R = 12, T = 10, B = 24;
  ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#6b7488"; ctx.strokeStyle = "#e3e7ef";
  if (!all.length) {
    ctx.fillText(job.state === "RUNNING" ? "waiting for the first samples…" : "the job has ended", L, H / 2);
    $("chart-legend").innerHTML = "";
    return;
  }
  const t1 = Math.max(...all.map((p) => p[0])), t0 = Math.min(t1 - 60, Math.min(...all.map((p) => p[0])));
  const ymax = Math.max(1, ...all.map((p) => p[1])) * 1.15;
  for (let i = 0; i <= 4; i++) {
    const y = T + (H - T - B) * (1 - i / 4);
    ctx.beginPath(); ctx.moveTo(L, y); ctx.lineTo(W - R, y); ctx.stroke();
    ctx.fillText(rate(ymax * i / 4), 4, y + 4);
  }
  ctx.fillText(`${Math.round(t1 - t0)} s`, L, H - 6); ctx.fillText("now", W - R - 22, H - 6);
  const x = (t) => L + (W - L - R) * (t - t0) / Math.max(1e-9, t1 - t0), y = (v) => T + (H - T - B) * (1 - v / ymax);
  series.forEach((s) => {
    if (!s.pts.length) return;
    ctx.beginPath(); ctx.lineWidth = 2; ctx.strokeStyle = s.colour;
    s.pts.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
    ctx.stroke();
    ctx.lineTo(x(s.pts[s.pts.length - 1][0]), y(0)); ctx.lineTo(x(s.pts[0][0]), y(0)); ctx.closePath();
    ctx.globalAlpha = 0.07; ctx.fillStyle = s.colour; ctx.fill(); ctx.globalAlpha = 1;
  });
  ctx.strokeStyle = "#e3e7ef"; ctx.lineWidth = 1;
  $("chart-legend").innerHTML = series.map((s) => `<span style="--c:${s.colour}">${esc(s.name)} · ${rate(s.pts.length ? s.pts[s.pts.length - 1][1] : 0)}</span>`).join("");
}

// ------------------------------------------------------------------ memory
const owners = {};
function ownerColour(owner) {
  if (/ network$/.test(owner)) return "var(--net)";
  if (/ checkpoints$/.test(owner)) return "var(--ckpt)";
  if (/ arena$/.test(owner)) {
    const w = Number((owner.match(/worker-(\d+)/) || [0, 0])[1]);
    return ["#3d7eff", "#5b6cf0", "#2e9bd6", "#4a5fc1"][w % 4];
  }
  if (!(owner in owners)) owners[owner] = ["#7b61ff", "#9c6ade", "#e4587a", "#f2a33a", "#20a4f3", "#4caf50"][Object.keys(owners).length % 6];
  return owners[owner];
}
function bar(doc, labelFn) {
  const items = doc.blocks.map((b) => ({ ...b, kind: "used" })).concat(doc.free.map((f) => ({ ...f, owner: "free", kind: "free" })))
    .sort((a, b) => a.offset - b.offset);
  return items.map((b) => {
    const w = 100 * b.bytes / doc.size;
    const label = w > 7 ? labelFn(b) : "";
    return `<div class="blk ${b.kind}" title="${esc(b.owner)} · ${bytes(b.bytes)}${b.count ? " · " + b.count + " blocks" : ""} @ ${b.offset}" ` +
      `style="width:${w}%;${b.kind === "free" ? "" : "background:" + ownerColour(b.owner)}">${esc(label)}</div>`;
  }).join("");
}
function orders(doc, id) {
  if (!doc.free_by_order.length) return `<div class="empty">no free block</div>`;
  const max = Math.max(...doc.free_by_order.map((o) => o.blocks));
  return doc.free_by_order.map((o) => `<div class="col" data-order="${o.order}" title="${o.blocks} free blocks of ${bytes(o.block_bytes)}">` +
    `<div class="cnt" data-blocks="${o.blocks}">${o.blocks}</div><div class="bar" style="height:${Math.max(3, 62 * o.blocks / max)}%"></div>` +
    `<div class="lbl">${bytes(o.block_bytes)}</div></div>`).join("");
}
function legend(doc) {
  const seen = {};
  doc.blocks.forEach((b) => { seen[b.owner] = (seen[b.owner] || 0) + b.bytes; });
  return Object.entries(seen).map(([o, n]) => `<span style="--c:${ownerColour(o)}">${esc(o)} · ${bytes(n)}</span>`).join("") +
    `<span style="--c:#e3e7ef">free · ${bytes(doc.free_bytes)} in ${doc.free.length} blocks</span>`;
}
function gauge(used, total, colour) {
  return `<div class="gauge"><div style="width:${total ? 100 * used / total : 0}%;background:${colour}"></div></div>`;
}
function renderMemory(mem) {
  const r = mem.region;
  $("region-sub").textContent = `${bytes(r.size)} · ${bytes(r.used_bytes)} granted · largest free block ${bytes(r.largest_free_block)} · fragmentation ${pct(r.fragmentation)} · min block ${bytes(r.min_block)}`;
  $("region-bar").innerHTML = bar(r, (b) => b.kind === "free" ? "free " + bytes(b.bytes) : b.owner.replace("worker-", "w") + " · " + bytes(b.bytes));
  $("region-legend").innerHTML = legend(r);
  $("region-orders").innerHTML = orders(r);
  $("region-orders").classList.toggle("orderchart", r.free_by_order.length > 0);
  $("arenas").innerHTML = mem.workers.map((w) => {
    const a = w.arena, n = w.network, m = w.managed;
    if (!a) return `<div class="card"><h2>Worker ${w.id}</h2><div class="empty">no arena reported yet</div></div>`;
    const used = n.segments - n.available;
    const ops = m.operators.length ? `<table class="table"><tr><th>Operator</th><th class=n>Pages</th><th class=n>Used</th><th class=n>Peak</th><th class=n>Spilled</th><th class=n>State</th></tr>` +
      m.operators.map((o) => `<tr><td><span style="color:${ownerColour(o.owner)}">■</span> ${esc(o.owner)}</td><td class=n>${num(o.blocks)}</td><td class=n>${bytes(o.bytes)}</td>` +
        `<td class=n>${o.chain_peak === null ? "—" : bytes(o.chain_peak)}</td><td class=n>${o.chain_spilled === null ? "—" : bytes(o.chain_spilled)}</td>` +
        `<td class=n>${o.state ? num(o.state.entries) + " entries · " + bytes(o.state.bytes_in_memory) + (o.state.bytes_on_disk ? " + " + bytes(o.state.bytes_on_disk) + " on disk" : "") : "—"}</td></tr>` +
        (o.state && o.state.bins.length ? `<tr><td colspan=6><div class="kv" style="grid-template-columns:repeat(4,auto)">` +
          o.state.bins.map((b) => `<span class="k">bin ${b.size ? bytes(b.size) : "large"}</span><span>${num(b.objects)} objects · ${bytes(b.bytes)} · ${pct(b.slots ? b.objects / b.slots : 0)} full</span>`).join("") +
          `</div></td></tr>` : "")).join("") + "</table>"
      : `<div class="empty">no operator holds managed pages now</div>`;
    return `<div class="card arena" data-worker="${w.id}"><h2>Worker ${w.id} arena <span class="sub">pid ${w.pid} · ${bytes(a.size)} at offset ${bytes(a.offset)} · ` +
      `${bytes(a.free_bytes)} free · largest free block ${bytes(a.largest_free_block)} · fragmentation ${pct(a.fragmentation)}</span></h2>` +
      `<div class="membar">${bar(a, (b) => b.kind === "free" ? "free" : b.owner.replace(/^worker-\d+ /, "") + " · " + bytes(b.bytes))}</div>` +
      `<div class="memlegend">${legend(a)}</div>` +
      `<div class="arena-grid"><div><h3>Network buffer pool</h3>${gauge(used, n.segments, "var(--net)")}` +
      `<div class="kv"><span class="k">segments in use</span><span class="num">${num(used)} of ${num(n.segments)} × ${bytes(n.segment_size)}</span>` +
      `<span class="k">available</span><span class="num">${num(n.available)}</span></div>` +
      `<h3>Managed memory</h3>${gauge(m.used, m.budget, "var(--managed)")}` +
      `<div class="kv"><span class="k">used</span><span class="num">${bytes(m.used)} of ${bytes(m.budget)}</span>` +
      `<span class="k">peak</span><span class="num">${bytes(m.peak)}</span><span class="k">spilled</span><span class="num">${bytes(m.spilled)}</span></div>` +
      `<h3>Free blocks per order</h3><div class="orderchart">${orders(a)}</div></div>` +
      `<div><h3>Managed memory per operator</h3>${ops}</div></div></div>`;
  }).join("");
}

window.addEventListener("hashchange", route);
window.addEventListener("resize", () => state.doc && render(state.doc));
route();
if (!state.source) connect();
