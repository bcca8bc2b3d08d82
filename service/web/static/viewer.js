// CardioScan viewer: upload -> POST /api/v1/digitize -> draw the result. No framework, no build step.
"use strict";

const API = "/api/v1";
const GRID_ROWS = [["I", "aVR", "V1", "V4"], ["II", "aVL", "V2", "V5"], ["III", "aVF", "V3", "V6"]];
const RHYTHM_LEAD = "II";
const PAGE_SECONDS = 10;
const MM_PER_S = 25;
const MM_PER_MV = 10;
const OUTPUT_KINDS = [
  ["dicom", "DICOM 12-lead ECG waveform"],
  ["fhir", "FHIR Bundle (JSON)"],
  ["wfdb", "WFDB record (zip)"],
  ["csv", "CSV"],
  ["json", "Result JSON"],
];
const METRIC_LABELS = {
  hr_bpm: ["Heart rate", "bpm"], rr_ms: ["RR", "ms"], pr_ms: ["PR", "ms"], qrs_ms: ["QRS", "ms"],
  qt_ms: ["QT", "ms"], qtc_bazett_ms: ["QTc (Bazett)", "ms"],
  qtc_fridericia_ms: ["QTc (Fridericia)", "ms"], axis_deg: ["Frontal QRS axis", "°"],
};

const KEY_STORAGE = "cardioscan.apiKey";  // sessionStorage: gone when the tab closes

const $ = (sel) => document.querySelector(sel);

// The API key the user typed, as request headers (none when the server runs without auth).
function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function apiFetch(url, init = {}) {
  return fetch(url, { ...init, headers: { ...(init.headers || {}), ...authHeaders() } });
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function setMessage(text, isError = false) {
  const m = $("#message");
  m.textContent = text;
  m.className = isError ? "error" : "";
}

async function problemText(resp) {
  if (resp.status === 401) return "This server needs an API key: enter a valid one above.";
  try {
    const body = await resp.json();
    if (body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    if (body.title) return body.title;
  } catch (_) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}`;
}

async function checkHealth() {
  const badge = $("#health");
  try {
    const resp = await fetch("/readyz");
    badge.textContent = resp.ok ? "ready" : "not ready";
    badge.className = "badge " + (resp.ok ? "ok" : "bad");
  } catch (_) {
    badge.textContent = "offline";
    badge.className = "badge bad";
  }
}

// ---- drawing -------------------------------------------------------------------------------

function drawPaper(ctx, w, h, pxPerMm) {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, w, h);
  for (let mm = 0, x = 0; x <= w; mm++, x = mm * pxPerMm) {
    ctx.strokeStyle = mm % 5 === 0 ? "#e57373" : "#f8d0d0";
    ctx.lineWidth = mm % 5 === 0 ? 1 : 0.5;
    ctx.beginPath(); ctx.moveTo(x, 0); ctx.lineTo(x, h); ctx.stroke();
  }
  for (let mm = 0, y = 0; y <= h; mm++, y = mm * pxPerMm) {
    ctx.strokeStyle = mm % 5 === 0 ? "#e57373" : "#f8d0d0";
    ctx.lineWidth = mm % 5 === 0 ? 1 : 0.5;
    ctx.beginPath(); ctx.moveTo(0, y); ctx.lineTo(w, y); ctx.stroke();
  }
}

// The span [t0, t1) of `samples` to show in a cell: the cell's own time window when the lead
// was printed there, else the lead's first printed stretch of the same length.
function windowFor(samples, fs, t0, t1) {
  const a = Math.round(t0 * fs), b = Math.round(t1 * fs);
  const has = (i0, i1) => samples.slice(i0, i1).some((v) => v !== null);
  if (has(a, b)) return [a, b];
  const first = samples.findIndex((v) => v !== null);
  if (first < 0) return null;
  return [first, Math.min(samples.length, first + (b - a))];
}

function drawTrace(ctx, samples, i0, i1, fs, x0, yBase, pxPerMm) {
  ctx.strokeStyle = "#111";
  ctx.lineWidth = 1.3;
  ctx.beginPath();
  let pen = false;
  for (let i = i0; i < i1; i++) {
    const v = samples[i];
    if (v === null || v === undefined) { pen = false; continue; }
    const x = x0 + ((i - i0) / fs) * MM_PER_S * pxPerMm;
    const y = yBase - v * MM_PER_MV * pxPerMm;
    if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    pen = true;
  }
  ctx.stroke();
}

function drawLeads(result) {
  const canvas = $("#ecg");
  const ctx = canvas.getContext("2d");
  const pxPerMm = canvas.width / (PAGE_SECONDS * MM_PER_S);
  drawPaper(ctx, canvas.width, canvas.height, pxPerMm);
  const fs = result.sampling_hz;
  const rowH = canvas.height / (GRID_ROWS.length + 1);
  const colW = canvas.width / 4;
  ctx.font = "bold 14px system-ui";
  GRID_ROWS.forEach((row, r) => {
    const yBase = rowH * (r + 0.6);
    row.forEach((lead, c) => {
      const samples = result.leads[lead] || [];
      const span = windowFor(samples, fs, c * 2.5, (c + 1) * 2.5);
      ctx.fillStyle = "#000";
      ctx.fillText(lead, c * colW + 6, yBase - rowH * 0.3);
      if (!span) return;
      ctx.save();  // keep a wild trace inside its own cell
      ctx.beginPath(); ctx.rect(c * colW, r * rowH, colW, rowH); ctx.clip();
      drawTrace(ctx, samples, span[0], span[1], fs, c * colW, yBase, pxPerMm);
      ctx.restore();
    });
  });
  const rhythm = result.leads[RHYTHM_LEAD] || [];
  const yBase = rowH * (GRID_ROWS.length + 0.6);
  ctx.fillText(RHYTHM_LEAD, 6, yBase - rowH * 0.3);
  ctx.save();
  ctx.beginPath(); ctx.rect(0, GRID_ROWS.length * rowH, canvas.width, rowH); ctx.clip();
  drawTrace(ctx, rhythm, 0, rhythm.length, fs, 0, yBase, pxPerMm);
  ctx.restore();
}

// ---- result panels -------------------------------------------------------------------------

function fmt(v, digits = 0) {
  return v === null || v === undefined ? "—" : Number(v).toFixed(digits);
}

function showResult(result) {
  $("#result").hidden = false;
  $("#job-id").textContent = result.job_id ? `job ${result.job_id}` : "";
  const summary = $("#summary");
  summary.replaceChildren();
  const facts = [
    ["Layout", result.layout], ["Paper speed", `${fmt(result.paper_speed_mm_s)} mm/s`],
    ["Gain", `${fmt(result.gain_mm_mv)} mm/mV`], ["Sampling", `${result.sampling_hz} Hz`],
    ["Engine", result.engine],
  ];
  for (const [k, v] of facts) summary.append(el("dt", {}, k), el("dd", {}, v ?? "—"));

  const metrics = $("#metrics tbody");
  metrics.replaceChildren();
  for (const [key, [label, unit]] of Object.entries(METRIC_LABELS)) {
    const v = (result.metrics || {})[key];
    metrics.append(el("tr", { "data-metric": key }, el("td", {}, label), el("td", {}, `${fmt(v)} ${unit}`)));
  }
  const conf = $("#confidence tbody");
  conf.replaceChildren();
  for (const [lead, c] of Object.entries(result.confidence || {})) {
    conf.append(el("tr", {}, el("td", {}, lead), el("td", {}, fmt(c, 2))));
  }
  const dl = $("#downloads");
  dl.replaceChildren();
  if (result.job_id) {
    for (const [kind, label] of OUTPUT_KINDS) {
      const link = el("a", { href: `${API}/jobs/${result.job_id}/outputs/${kind}` }, label);
      link.addEventListener("click", download);
      dl.append(el("li", {}, link));
    }
  }
  const steps = $("#steps");
  steps.replaceChildren();
  for (const step of result.steps || []) {
    steps.append(el("figure", {}, el("img", { src: step.image, alt: step.title }),
      el("figcaption", {}, el("strong", {}, step.title), " — ", step.description || "")));
  }
  drawLeads(result);
}

// A plain link cannot carry the API key: fetch the file with it and save the bytes.
async function download(ev) {
  if (!sessionStorage.getItem(KEY_STORAGE)) return;  // no key: the link works as it is
  ev.preventDefault();
  const resp = await apiFetch(ev.currentTarget.href);
  if (!resp.ok) { setMessage(await problemText(resp), true); return; }
  const name = /filename="([^"]+)"/.exec(resp.headers.get("Content-Disposition") || "");
  const a = el("a", { href: URL.createObjectURL(await resp.blob()), download: name ? name[1] : "" });
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

// ---- jobs ----------------------------------------------------------------------------------

async function refreshJobs() {
  try {
    const resp = await apiFetch(`${API}/jobs?limit=20`);
    if (!resp.ok) return;
    const body = await resp.json();
    const jobs = Array.isArray(body) ? body : body.items || body.jobs || [];
    const tbody = $("#jobs-table tbody");
    tbody.replaceChildren();
    for (const job of jobs) {
      tbody.append(el("tr", {},
        el("td", {}, job.id ?? job.job_id), el("td", {}, job.route ?? ""),
        el("td", { class: `state-${job.state}` }, job.state),
        el("td", {}, job.created_at ?? job.received_at ?? ""), el("td", {}, job.error ?? "")));
    }
  } catch (_) { /* the badge already says offline */ }
}

// ---- upload --------------------------------------------------------------------------------

async function submit(ev) {
  ev.preventDefault();
  const file = $("#file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file, file.name);
  $("#submit").disabled = true;
  setMessage(`Digitizing ${file.name}…`);
  try {
    const resp = await apiFetch(`${API}/digitize`, { method: "POST", body: form });
    if (!resp.ok) { setMessage(await problemText(resp), true); return; }
    const result = await resp.json();
    setMessage("Done.");
    showResult(result);
  } catch (err) {
    setMessage(`Upload failed: ${err}`, true);
  } finally {
    $("#submit").disabled = false;
    refreshJobs();
  }
}

function wireDrop() {
  const zone = $(".drop");
  const input = $("#file");
  input.addEventListener("change", () => { $("#submit").disabled = !input.files.length; });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    input.files = e.dataTransfer.files;
    $("#submit").disabled = !input.files.length;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  wireDrop();
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    const value = key.value.trim();
    if (value) sessionStorage.setItem(KEY_STORAGE, value); else sessionStorage.removeItem(KEY_STORAGE);
    refreshJobs();
  });
  $("#upload-form").addEventListener("submit", submit);
  checkHealth();
  refreshJobs();
  setInterval(refreshJobs, 5000);
});
