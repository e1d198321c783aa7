// The podembed dashboard: reads /fleet and /jobs with the token typed once (kept in sessionStorage,
// sent as a bearer header, never in a URL), and redraws every REFRESH_MS.
"use strict";
const REFRESH_MS = 2000;
// The 24 h chart is read again after this, or as soon as a job's counts moved (new batches in the ledger).
const CHART_MS = 60000;
const TOKEN_KEY = "podembed-token";
let ended = new Set();  // the states in which a job has ended, as /fleet names them
const seen = new Map();  // job id -> {done, at}: chunks/s between two refreshes
let timer = null;
let chart = {at: 0, progress: null};

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function row(cells) {
  const tr = el("tr");
  for (const c of cells) tr.append(c instanceof Node ? c : el("td", c));
  return tr;
}

function cell(node) { const td = el("td"); td.append(node); return td; }

function fill(id, rows) { document.querySelector(`#${id} tbody`).replaceChildren(...rows); }

function seconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "-";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

class Unauthorized extends Error {}

async function api(path, method) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? {Authorization: `Bearer ${token}`} : {};
  const response = await fetch(path, {method: method || "GET", headers, cache: "no-store"});
  if (response.status === 401) throw new Unauthorized();
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = JSON.stringify((await response.json()).detail); } catch (e) { /* not JSON */ }
    throw new Error(`${method || "GET"} ${path}: HTTP ${response.status} ${detail}`);
  }
  return response.json();
}

function showLogin(message) {
  document.getElementById("data").hidden = true;
  fill("jobs", []); fill("failed", []); fill("workers", []); fill("queues", []);
  document.getElementById("login").hidden = false;
  document.getElementById("error").textContent = message;
  document.getElementById("token").focus();
}

function action(job, verb) {
  const button = el("button", verb, {"data-action": verb, "data-job": job});
  button.addEventListener("click", async () => {
    button.disabled = true;
    try { await api(`/jobs/${encodeURIComponent(job)}/${verb}`, "POST"); } catch (e) { report(e); }
    refresh();
  });
  return button;
}

function jobRow(job, now) {
  const c = job.chunks;
  const done = c.embedded + c.skipped + c.failed + c.cancelled;
  const pct = c.total ? Math.floor(100 * done / c.total) : (ended.has(job.state) ? 100 : 0);
  const before = seen.get(job.job_id);
  const embedded = c.embedded + c.skipped + c.in_progress;  // cancelled and failed chunks are not throughput
  seen.set(job.job_id, {done: embedded, at: now});
  let rate = null;
  if (before && now > before.at) rate = (embedded - before.done) / ((now - before.at) / 1000);
  const bar = el("span", null, {class: "bar", "data-percent": String(pct)});
  const filled = el("span");
  filled.style.width = `${pct}%`;  // through the CSSOM: the page's policy refuses style attributes
  bar.append(filled);
  const progress = el("td"); progress.append(bar, el("span", `${pct} %`, {class: "pct"}));
  const buttons = el("td");
  if (job.batches.failed && job.state !== "cancelled") buttons.append(action(job.job_id, "retry"));
  const over = ended.has(job.state);
  if (!over) buttons.append(action(job.job_id, "cancel"));
  const eta = !over && rate > 0 ? seconds(c.pending / rate) : "-";
  const tr = row([job.job_id, job.kind, job.state, progress, over || rate === null ? "-" : rate.toFixed(1), eta,
                  cell(el("span", `$${job.cost_usd.toFixed(6)}`, {class: "cost"})), buttons]);
  tr.setAttribute("data-job", job.job_id);
  tr.setAttribute("data-state", job.state);
  return tr;
}

function drawChart(points) {
  const svg = document.getElementById("chart");
  const ns = "http://www.w3.org/2000/svg";
  const lines = [];
  const peaks = [];
  for (const [key, cls, unit] of [["chunks_per_second", "chunks", "chunks/s"], ["usd_per_hour", "usd", "$/h"]]) {
    const top = Math.max(...points.map(p => p[key]), 1e-9);
    const coords = points.map((p, i) => `${(i / Math.max(1, points.length - 1) * 960).toFixed(1)},` +
                                        `${(155 - p[key] / top * 150).toFixed(1)}`);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", coords.join(" "));
    line.setAttribute("class", cls);
    lines.push(line);
    peaks.push(`peak ${unit === "$/h" ? "$" + top.toFixed(4) : top.toFixed(2)} ${unit}`);
  }
  svg.replaceChildren(...lines);
  document.getElementById("peaks").textContent = peaks.join(", ");
}

function report(error) {
  if (error instanceof Unauthorized) {
    const had = sessionStorage.getItem(TOKEN_KEY);
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(had ? "wrong token: the API refused it" : "this API needs its token");
  } else {
    document.getElementById("updated").textContent = `error: ${error.message}`;
  }
}

async function refresh() {
  clearTimeout(timer);
  try {
    const [fleet, jobs] = await Promise.all([api("/fleet"), api("/jobs?limit=20")]);
    const now = Date.now();
    const progress = jobs.map(j => `${j.job_id}:${j.chunks.embedded + j.chunks.skipped + j.chunks.failed}`).join();
    if (now - chart.at > CHART_MS || progress !== chart.progress) {
      drawChart(await api("/fleet/ledger"));
      chart = {at: now, progress};
    }
    ended = new Set(fleet.ended_states);
    document.getElementById("login").hidden = true;
    document.getElementById("data").hidden = false;
    fill("queues", fleet.queues.map(q => row([q.queue, q.batches.queued, seconds(q.oldest_age_seconds),
                                              q.batches.scheduled, q.batches.started, q.batches.failed])));
    fill("jobs", jobs.map(j => jobRow(j, now)));
    fill("workers", fleet.workers.map(w => row([w.name, w.device, w.state,
      w.billed_seconds ? `${seconds(w.busy_seconds)} / ${seconds(w.billed_seconds)}` : "-",
      w.last_heartbeat || "-", w.current_batch || "-"])));
    const failed = [];
    for (const j of jobs) {
      for (const [batch, reason] of Object.entries(j.errors)) {
        const buttons = el("td");
        if (j.state !== "cancelled") buttons.append(action(j.job_id, "retry"));
        if (!ended.has(j.state)) buttons.append(action(j.job_id, "cancel"));
        failed.push(row([j.job_id, batch, el("td", reason, {class: "error"}), buttons]));
      }
    }
    fill("failed", failed);
    document.getElementById("updated").textContent = `updated ${new Date(now).toLocaleTimeString()}` +
      (fleet.workers_lost ? `, ${fleet.workers_lost} containers lost` : "");
  } catch (error) {
    report(error);
    if (error instanceof Unauthorized) return;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

document.getElementById("login").addEventListener("submit", event => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
  document.getElementById("token").value = "";
  refresh();
});
refresh();
