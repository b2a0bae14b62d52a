// The studio: submit a photo (or a short video) and a prompt as a job, follow it, review its mask, look at the 3D result.
//
// Every call goes to the job API (/v1/jobs) with the bearer token from the URL fragment (/#token=...), kept in
// this tab's session storage and sent only as "Authorization: Bearer". A job waiting for review is reviewed
// with the review page's own module (review.js: candidate masks, click refinement by the in-browser decoder or
// the server fallback, confirm), which drives the #review section of this page. Each job has its own address
// (/jobs/<id>); opening a job loads the page afresh, so each page reviews at most one round.
import { fetchFile as fetchRunFile, openRun, state as review } from "/static/review.js";

const $ = (id) => document.getElementById(id);
// One server serves the studio, the job API and the review page with one token: one session key for both pages.
const TOKEN_KEY = "sam3d-review-token";
const VIEWER_JS = "/vendor/model-viewer/model-viewer.min.js";
const FINAL = new Set(["completed", "no_object", "rejected", "failed", "cancelled"]);
const JOB_PATH = /^\/jobs\/([0-9a-f-]{36})\/?$/;
const STATUS_TEXT = {
  queued: "Queued: waiting for a worker…",
  running: "Running…",
  awaiting_review: "Waiting for your review: check the mask, click to refine it, then Confirm.",
  completed: "Completed.",
  no_object: "Finished: nothing matching the prompt was found in the photo.",
  rejected: "Finished: the mask was rejected at review, nothing was reconstructed.",
  failed: "Failed.",
  cancelled: "Cancelled.",
};
const HTTP_TEXT = { 400: "bad request", 401: "not authorised", 404: "not found", 409: "conflict",
  411: "length required", 413: "too large", 422: "not accepted", 503: "service unavailable" };
const POLL_FAST_MS = 250;
const POLL_REVIEW_MS = 1500;
const POLL_SLOW_MS = 2000;
const LONG_POLL_S = 10;  // the longest the server holds a request for a job's next status
const SLOW_AFTER_MS = 120_000;

// marks: name → epoch ms of the job's steps as this page saw them (submit sent, job created, each status first seen,
// review open, final status, GLB fetched, loaded, painted).
const studio = { token: null, job: null, shown: new Set(), viewer: null, marks: {} };
window.studio = studio;  // read by the tests and the benchmark
const mark = (name) => { studio.marks[name] = Math.round(performance.timeOrigin + performance.now()); };

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// A token goes into an HTTP header: printable ASCII without spaces. Anything else (a newline, a non-Latin-1
// character) would make every fetch throw, and the page would wrongly say the server is down.
const TOKEN_RE = /^[\x21-\x7e]{1,512}$/;

function readToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash !== null) {
    sessionStorage.setItem(TOKEN_KEY, fromHash);
    history.replaceState(null, "", location.pathname);
  }
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token !== null && !TOKEN_RE.test(token)) {
    sessionStorage.removeItem(TOKEN_KEY);
    studio.badToken = true;
    return null;
  }
  return token;
}

function askForToken() {
  $("login").hidden = false;
  if (studio.badToken) {
    showText("error", "That token cannot be right: a token is printable ASCII without spaces. Paste it again.");
  }
  $("token-input").focus();
}

// FastAPI's validation errors are a list of {loc, msg}: one readable clause each ("prompt: Field required").
function readableDetail(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => {
      const where = (d.loc || []).filter((part) => part !== "body").join(".");
      return where ? `${where}: ${d.msg}` : d.msg;
    }).join("; ");
  }
  return JSON.stringify(detail);
}

async function api(path, options = {}) {
  let response;
  try {
    const headers = { Authorization: `Bearer ${studio.token}`, ...(options.headers || {}) };
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiError(0, `the server did not answer (${err.message}); is \`sam3d-pipeline web\` running?`);
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = readableDetail((await response.json()).detail ?? detail); } catch (e) { /* not JSON */ }
    if (response.status === 401) askForToken();
    const what = HTTP_TEXT[response.status] || response.statusText;
    throw new ApiError(response.status, `${response.status} ${what}: ${detail}`);
  }
  return response;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// An output: a presigned S3 URL (fetched directly), or this server's route, absolute or not (with the token).
function fetchFile(url) {
  const parsed = new URL(url, location.href);
  return fetchRunFile(parsed.origin === location.origin ? parsed.pathname + parsed.search : url);
}

function showText(id, text) {
  $(id).textContent = text;
  $(id).hidden = !text;
}

function term(list, name, value) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  if (value instanceof Node) dd.append(value); else dd.textContent = value;
  list.append(dt, dd);
}

// -- the form -------------------------------------------------------------------------------------------------

// The containers the pipeline reads (the server tells them apart by their bytes; this only picks the preview).
const VIDEO_NAME = /\.(mp4|mov|m4v|webm)$/i;
const isVideo = (file) => file.type.startsWith("video/") || VIDEO_NAME.test(file.name);

// A photo is previewed as an image, a clip as a muted looping <video>; the video-only field shows for a clip.
function chooseFile(file) {
  const photo = $("photo-preview");
  const video = $("video-preview");
  for (const preview of [photo, video]) {
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.removeAttribute("src");
    preview.hidden = true;
  }
  const kind = file ? (isVideo(file) ? "video" : "photo") : "";
  document.body.dataset.chosen = kind;
  $("video-frames-field").hidden = kind !== "video";
  if (!file) { $("drop-text").textContent = "Drop a photo or a short video here, or choose one"; return; }
  const preview = kind === "video" ? video : photo;
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").textContent = `${kind === "video" ? "video " : ""}${file.name} `
    + `(${Math.ceil(file.size / 1024)} KiB): drop or choose another`;
}

function bindForm() {
  const drop = $("drop");
  const input = $("image");
  input.addEventListener("change", () => chooseFile(input.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (!e.dataTransfer.files.length) return;
    input.files = e.dataTransfer.files;
    chooseFile(input.files[0]);
  });
  $("job-form").addEventListener("submit", submit);
}

async function submit(event) {
  event.preventDefault();
  showText("form-error", "");
  const file = $("image").files[0];
  const prompt = $("job-prompt").value.trim();
  if (!file) { showText("form-error", "Choose or drop a photo or a video first."); return; }
  if (!prompt) { showText("form-error", "Type what to reconstruct (the prompt)."); $("job-prompt").focus(); return; }
  const body = new FormData();
  body.append("image", file, file.name);
  body.append("prompt", prompt);
  body.append("review", $("review-mode").value);
  if (isVideo(file)) body.append("video_frames", $("video-frames").value);
  const button = $("submit");
  button.disabled = true;
  button.textContent = "Uploading…";
  try {
    mark("submit-sent");
    const job = await (await api("/v1/jobs", { method: "POST", body })).json();
    mark("job-created");
    // The job's page, without loading this page again (the reload competed with the job's start for the CPU).
    history.pushState(null, "", `/jobs/${encodeURIComponent(job.id)}`);
    $("new").hidden = true;
    // The list of recent jobs is read again once this job's first mask is on screen (or it ends): listing reads
    // every listed job's report, work that would compete with this job's start for the CPU.
    followJob(job.id).catch((err) => showText("error", err.message));
  } catch (err) {
    showText("form-error", `The job was not created: ${err.message}`);
    button.disabled = false;
    button.textContent = "Create 3D";
  }
}

// -- one job --------------------------------------------------------------------------------------------------

function renderJob(job) {
  studio.job = job;
  document.body.dataset.jobStatus = job.status;
  $("job-status").textContent = STATUS_TEXT[job.status] || job.status;
  $("job-status").className = `status-${job.status}`;
  const details = $("job-details");
  details.replaceChildren();
  term(details, "prompt", job.prompt ?? "");
  if (job.input?.kind) term(details, "input", inputText(job.input));
  if (job.created_at) term(details, "submitted", new Date(job.created_at).toLocaleString());
  if (job.updated_at) term(details, "updated", new Date(job.updated_at).toLocaleString());
  if (job.output_prefix) term(details, "outputs under", job.output_prefix);
  for (const [role, info] of Object.entries(job.backends || {})) {
    const made = info.produced?.length ? `: made ${info.produced.join(", ")}` : "";
    term(details, role, `${backendText(info)}${info.planned ? " (planned)" : ""}${made}`);
  }
  const error = job.error ? `${job.error.code ? `${job.error.code}: ` : ""}${job.error.message || ""}` : "";
  showText("job-error", error);
  showPreviews(job.outputs || {});
}

// What the submission's check found: a photo's size, or a clip's size, length and frames.
function inputText(input) {
  const size = input.width && input.height ? ` ${input.width}×${input.height}` : "";
  if (input.kind !== "video") return `photo${size}`;
  const parts = [`video${input.container ? ` (${input.container.toUpperCase()}` : ""}`
    + `${input.codec ? `, ${input.codec}` : ""}${input.container ? ")" : ""}${size}`];
  if (input.duration_s !== undefined) parts.push(`${Number(input.duration_s).toFixed(2)} s`);
  if (input.frames_read !== undefined) {
    parts.push(`${input.frames_read} frames${input.fps ? ` at ${Number(input.fps).toFixed(3).replace(/\.?0+$/, "")} fps`
      : ""}`);
  }
  return parts.join(", ");
}

// The overlay and mask appear as soon as the job lists them (fetched with the token, shown from object URLs).
async function showPreviews(outputs) {
  for (const name of ["overlay.png", "mask.png", "preview.png"]) {
    if (!outputs[name] || studio.shown.has(name)) continue;
    studio.shown.add(name);
    try {
      const blob = await (await fetchFile(outputs[name])).blob();
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = URL.createObjectURL(blob);
      img.alt = `${name} of this job`;
      const caption = document.createElement("figcaption");
      caption.textContent = name;
      figure.append(img, caption);
      $("previews").append(figure);
    } catch (err) {
      studio.shown.delete(name);  // try again at the next poll
    }
  }
}

// The review module needs the run's review context, saved a moment after the run pauses: until then, false.
async function openReview(id) {
  review.token = studio.token;
  try {
    await openRun(id);
  } catch (err) {
    $("status").textContent = `review not ready yet (${err.message}); retrying…`;
    return false;
  }
  return true;
}

function leaveReview() {
  $("review").hidden = true;
}

async function followJob(id) {
  $("job").hidden = false;
  $("job-title").textContent = `Job ${id}`;
  document.title = `job ${id.slice(0, 8)} · sam3d-pipeline studio`;
  let changedAt = performance.now();  // the last status change: polling slows down when nothing happens
  let reviewing = false;  // the review section shows this job's paused round
  let resumedSeen = false;  // after a confirm, the run left the pause (a new pause is a new round)
  let last = null;  // the job as last read
  for (;;) {
    let job;
    // Until its first review round (or while queued), the job's next status is all this page waits for: the
    // server answers when it changes, within a fraction of a second, instead of at the next poll.
    const waitFor = last && !reviewing && !resumedSeen
      && (last.status === "queued" || (last.status === "running" && last.review === "required")) ? last.status : null;
    const asked = performance.now();
    try {
      const query = waitFor ? `?changed_from=${waitFor}&wait_s=${LONG_POLL_S}` : "";
      job = await (await api(`/v1/jobs/${encodeURIComponent(id)}${query}`)).json();
    } catch (err) {
      if ([401, 404, 422].includes(err.status)) { showText("job-error", err.message); return; }
      $("job-status").textContent = `${err.message}; retrying…`;
      await sleep(POLL_SLOW_MS);
      continue;
    }
    if (job.status !== studio.job?.status) {
      changedAt = performance.now();
      if (studio.marks[`status-${job.status}`] === undefined) mark(`status-${job.status}`);
      // The list shows the new status too, but not while the first mask is on its way: listing the recent jobs
      // competes with this one for the CPU. It is listed again once the review is open.
      if (studio.job && !waitFor) listJobs(id);
    }
    renderJob(job);
    last = job;
    if (job.status === "awaiting_review") {
      if (resumedSeen) { location.reload(); return; }  // paused again (re-prompt): open the new round
      if (!reviewing && (reviewing = await openReview(id)) && waitFor) { mark("review-open"); listJobs(id); }
    } else if (reviewing) {
      resumedSeen = true;
      leaveReview();
    }
    const early = job.early_outputs?.["object.glb"];
    if (early && !studio.earlyGlb && !FINAL.has(job.status)) {
      // The run writes object.glb before its other files: show it while the run finishes them.
      mark("early-glb");
      $("result").hidden = false;
      studio.earlyGlb = showGlb(early).then(() => true, () => false);
    }
    if (FINAL.has(job.status)) {
      mark("final-status");
      await showResult(job);
      return;
    }
    const answered = job.status === "awaiting_review" && !!document.body.dataset.resumed;  // the run resumes now
    if (answered) changedAt = performance.now();
    if (reviewing && !answered) warmWhenIdle();
    if (answered || resumedSeen || (job.status === "running" && job.review === "none")) loadViewer();
    const waitingForPerson = job.status === "awaiting_review" && reviewing && !answered;
    if (waitFor && job.status !== waitFor) continue;  // it changed: read on at once
    if (waitFor && performance.now() - asked >= LONG_POLL_S * 1000 / 2) continue;  // it waited its time
    await sleep(waitingForPerson ? POLL_REVIEW_MS
      : performance.now() - changedAt > SLOW_AFTER_MS ? POLL_SLOW_MS : POLL_FAST_MS);
  }
}

// -- the result -----------------------------------------------------------------------------------------------

// The 3D viewer's script.
function loadViewer() {
  studio.viewer ??= import(VIEWER_JS).then(() => customElements.whenDefined("model-viewer")).then(() => {
    mark("viewer-ready");
  });
  return studio.viewer;
}

// The first model a page shows pays a one-off set-up: lighting, shader programs (about a second with a software
// renderer, and it holds the page's main thread). A reviewer looking at the mask leaves the page idle: the
// result's own viewer, out of sight, renders a triangle then, so after Confirm only object.glb itself is left to
// show. Not while the run works: on a machine that also runs the stack, the set-up and the run slow each other
// down, and two viewers set up at once can stall for a long time.
const WARM_AFTER_IDLE_MS = 1500;  // no pointer or key input for this long while a round waits for the reviewer
const WARM_GIVE_UP_MS = 15_000;
let lastInput = performance.now();
for (const type of ["pointerdown", "pointermove", "keydown", "wheel"]) {
  addEventListener(type, () => { lastInput = performance.now(); }, { capture: true, passive: true });
}

function warmWhenIdle() {
  if (studio.warmTimer || studio.warm) return;
  const look = () => {
    if (document.body.dataset.resumed) { studio.warmTimer = null; return; }  // confirmed: too late
    const quiet = performance.now() - lastInput;
    if (quiet < WARM_AFTER_IDLE_MS) { studio.warmTimer = setTimeout(look, WARM_AFTER_IDLE_MS - quiet); return; }
    warmViewer();
  };
  studio.warmTimer = setTimeout(look, WARM_AFTER_IDLE_MS);
}

// One triangle with the material of the pipeline's web GLB (vertex colours, double-sided, metallic 0, roughness
// 0.85; float attributes: the shaders are the same for quantised ones).
function warmUpGltf() {
  const floats = new Float32Array([0, 0, 0, 1, 0, 0, 0, 1, 0, /* normals */ 0, 0, 1, 0, 0, 1, 0, 0, 1,
    /* colours */ 1, 1, 1, 1, 1, 1, 1, 1, 1]);
  const base64 = btoa(String.fromCharCode(...new Uint8Array(floats.buffer)));
  const view = (i) => ({ buffer: 0, byteOffset: 36 * i, byteLength: 36 });
  const accessor = (i) => ({ bufferView: i, componentType: 5126, count: 3, type: "VEC3" });
  return JSON.stringify({
    asset: { version: "2.0" }, scene: 0, scenes: [{ nodes: [0] }], nodes: [{ mesh: 0 }],
    materials: [{ doubleSided: true,
      pbrMetallicRoughness: { baseColorFactor: [1, 1, 1, 1], metallicFactor: 0, roughnessFactor: 0.85 } }],
    meshes: [{ primitives: [{ attributes: { POSITION: 0, NORMAL: 1, COLOR_0: 2 }, material: 0 }] }],
    buffers: [{ byteLength: 108, uri: `data:application/octet-stream;base64,${base64}` }],
    bufferViews: [view(0), view(1), view(2)],
    accessors: [{ ...accessor(0), min: [0, 0, 0], max: [1, 1, 0] }, accessor(1), accessor(2)],
  });
}

// The result section, out of sight (class "warming": laid out off-screen, so the viewer has its size), renders the
// triangle once; resolves when it has (or failed: the result then pays the set-up itself).
function warmViewer() {
  studio.warm ??= loadViewer().then(() => new Promise((resolve) => {
    const viewer = $("viewer");
    if (viewer.src || !$("result").hidden) { resolve(); return; }
    mark("viewer-warm-start");
    $("result").classList.add("warming");
    $("result").setAttribute("aria-hidden", "true");
    $("result").hidden = false;
    const src = URL.createObjectURL(new Blob([warmUpGltf()], { type: "model/gltf+json" }));
    let finished = false;
    const done = () => {
      if (finished) return;
      finished = true;
      URL.revokeObjectURL(src);
      if ($("result").classList.contains("warming")) { $("result").hidden = true; unwarm(); }
      mark("viewer-warm");
      resolve();
    };
    viewer.addEventListener("load", done, { once: true });
    viewer.addEventListener("error", done, { once: true });
    setTimeout(done, WARM_GIVE_UP_MS);  // the result never waits on a set-up that does not end
    viewer.src = src;
  }));
  return studio.warm;
}

function unwarm() {
  $("result").classList.remove("warming");
  $("result").removeAttribute("aria-hidden");
}

async function showGlb(url) {
  const viewer = $("viewer");
  const [blob] = await Promise.all([fetchFile(url).then((r) => r.blob()), loadViewer()]);
  studio.shownGlbBytes = blob.size;
  mark("glb-fetched");
  await studio.warm;  // a warm-up still rendering: its load event must not be taken for this one's
  unwarm();
  $("result").hidden = false;
  const loaded = new Promise((resolve, reject) => {
    viewer.addEventListener("load", resolve, { once: true });
    viewer.addEventListener("error", (e) => reject(new Error(
      e.detail?.sourceError?.message || e.detail?.type || "model-viewer could not read object.glb")), { once: true });
  });
  viewer.src = URL.createObjectURL(blob);
  await loaded;
  mark("glb-loaded");
  // rAF then a task: the frame with the model has been painted.
  await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
  mark("glb-painted");
  document.body.dataset.glbLoadedAt = studio.marks["glb-painted"];
  document.body.dataset.glbLoaded = "1";
}

// Which part of the pipeline made each file: the segmenter the mask and overlay, the reconstructor (and the
// exporter) the 3D files and the preview, the pipeline the report.
function producer(name, result) {
  if (name === "result.json") return "the run's report";
  const backends = studio.job?.backends || {};
  let role = Object.keys(backends).find((r) => backends[r].produced?.includes(name));
  role ??= /^(mask|overlay|frame|track)\./.test(name.split("/").pop()) ? "segmenter" : "reconstructor";
  const info = result?.[role] || backends[role];
  return info?.name ? `made by the ${role} ${info.name}` : `made by the ${role}`;
}

function backendText(info) {
  if (!info || typeof info !== "object") return String(info ?? "");
  const parts = [info.name, info.version && `version ${info.version}`, info.device && `on ${info.device}`,
    info.weights && info.weights !== "none" && `weights ${info.weights}`].filter(Boolean);
  const text = parts.join(", ");
  return info.chosen_because ? `${text} (${info.chosen_because})` : text;
}

function showDownloads(outputs, result) {
  const list = $("downloads");
  list.replaceChildren();
  for (const [name, url] of Object.entries(outputs)) {
    const li = document.createElement("li");
    const link = document.createElement("a");
    link.textContent = name;
    link.download = name.split("/").pop();
    if (new URL(url, location.href).origin === location.origin) {  // this server's route: needs the token
      link.href = "#";
      link.addEventListener("click", async (e) => {
        e.preventDefault();
        const blob = await (await fetchFile(url)).blob();
        const save = document.createElement("a");
        save.href = URL.createObjectURL(blob);
        save.download = link.download;
        save.click();
        setTimeout(() => URL.revokeObjectURL(save.href), 10_000);
      });
    } else {
      link.href = url;
    }
    li.append(link, ` · ${producer(name, result)}`);
    list.append(li);
  }
}

// An exported asset's per-rule checks (rule, limit, value, pass): one row each, failures marked.
function checksTable(checks) {
  const table = document.createElement("table");
  table.className = "checks";
  const passed = checks.filter((c) => c.pass).length;
  table.createCaption().textContent = `${passed}/${checks.length} pass`;
  for (const c of checks) {
    const row = table.insertRow();
    for (const value of [c.rule, JSON.stringify(c.limit), JSON.stringify(c.value), c.pass ? "pass" : "FAIL"]) {
      row.insertCell().textContent = value;
    }
    row.className = c.pass ? "pass" : "fail";
  }
  return table;
}

function showSummary(result) {
  const summary = $("summary");
  summary.replaceChildren();
  if (!result) return;
  const count = (n) => Number(n || 0).toLocaleString();
  term(summary, "status", result.status);
  if (result.segmenter) {
    let text = `${backendText(result.segmenter)}: made the mask and overlay`
      + `${result.video ? ", the track and the chosen frame" : ""}`;
    if (result.prompt_used_by_segmenter === false) {
      text += `; it cannot read text, so the prompt “${result.prompt}” was recorded, not used`;
    }
    term(summary, "segmenter", text);
  }
  if (result.reconstructor) {
    term(summary, "reconstructor", `${backendText(result.reconstructor)}: made the 3D mesh and preview`);
  }
  const instances = result.instances || [];
  const chosen = instances.find((inst) => inst.index === result.selected) || instances[result.selected];
  const which = chosen ? `; #${result.selected} reconstructed (score ${Number(chosen.score).toFixed(2)}, `
    + `${count(chosen.area)} px)` : "";
  term(summary, "instances", `${instances.length} found${which}`);
  if (result.mesh) term(summary, "mesh", `${count(result.mesh.vertices)} vertices, ${count(result.mesh.faces)} faces`);
  if (result.review) {  // mode, outcome (approved, rejected, timeout-…), edited_mask, waited_s
    const r = result.review;
    const parts = [r.mode && `mode ${r.mode}`, r.outcome, r.edited_mask && "mask refined by clicks",
      r.waited_s !== undefined && `waited ${Number(r.waited_s).toFixed(0)} s`];
    term(summary, "review", parts.filter(Boolean).join(", ") || r.reason || "");
  }
  for (const obj of result.objects || []) {
    const checks = obj.export?.checks || [];
    if (checks.length) term(summary, `#${obj.index} checks (${obj.export.profile})`, checksTable(checks));
  }
  const timings = Object.entries(result.timings_s || {});
  if (timings.length) term(summary, "timings", timings.map(([k, v]) => `${k} ${Number(v).toFixed(1)} s`).join(", "));
  for (const message of new Set(result.messages || [])) term(summary, "note", message);
  if (result.error) term(summary, "error", `${result.error.code || ""} ${result.error.message || ""}`.trim());
}

async function readResult(job) {
  if (job.result && typeof job.result === "object") return job.result;
  const url = job.outputs?.["result.json"];
  if (!url) return null;
  try { return await (await fetchFile(url)).json(); } catch (err) { return null; }
}

// A video job: the track (the mask over the sampled frames, animated), the frame chosen for 3D, and the figures
// from result.json's video section (which frame, when, its view score, how many frames were tracked).
async function showTrack(outputs, result) {
  const video = result?.video;
  if (!video && !outputs["track.webp"] && !outputs["frame.png"]) return;
  $("track").hidden = false;
  const info = $("video-info");
  info.replaceChildren();
  const chosen = video?.chosen;
  if (chosen) {
    const text = `frame ${chosen.index} at ${Number(chosen.time_s).toFixed(2)} s, `
      + `view score ${Number(chosen.view_score).toFixed(2)}`;
    term(info, "chosen frame", text);
    $("frame-caption").textContent = `frame.png: ${text}, the frame reconstructed`;
  }
  if (video) {
    term(info, "frames tracked", `${video.frames_tracked} of ${video.frames_sampled} sampled frames `
      + `(${video.frames_read} read, every ${video.stride})`);
    if (video.found_at_index !== null && video.found_at_index !== undefined) {
      term(info, "object found at", `frame ${video.found_at_index}`);
    }
    term(info, "clip", `${video.width}×${video.height}, ${Number(video.duration_s).toFixed(2)} s at `
      + `${Number(video.fps).toFixed(3).replace(/\.?0+$/, "")} fps (${video.format} ${video.codec})`);
    const candidates = video.candidates || [];
    if (candidates.length > 1) {
      term(info, "frames tried", candidates.map((c) => `${c.index} (view ${Number(c.view_score).toFixed(2)}`
        + `${c.reconstructor_score !== undefined ? `, 3D ${Number(c.reconstructor_score).toFixed(2)}` : ""})`)
        .join(", "));
    }
    if (video.tracker) term(info, "tracker", video.tracker);
  }
  const shown = [];
  for (const [name, id] of [["track.webp", "track-image"], ["frame.png", "frame-image"]]) {
    const img = $(id);
    if (!outputs[name]) { img.closest("figure").hidden = true; continue; }
    shown.push(fetchFile(outputs[name]).then((r) => r.blob()).then((blob) => {
      img.src = URL.createObjectURL(blob);
      return img.decode();
    }));
  }
  try {
    await Promise.all(shown);
    document.body.dataset.trackShown = "1";
  } catch (err) {
    showText("job-error", `The video's track could not be shown: ${err.message}`);
  }
}

async function showResult(job) {
  const outputs = job.outputs || {};
  const result = await readResult(job);
  await studio.warm;
  unwarm();
  $("result").hidden = false;
  showDownloads(outputs, result);
  showSummary(result);
  await showTrack(outputs, result);
  document.body.dataset.summary = result ? "1" : "0";
  if (job.status === "completed" && outputs["object.glb"]) {
    try {
      const shownEarly = studio.earlyGlb ? await studio.earlyGlb : false;
      // The run hands over a new GLB when the byte budget made it simplify again: show the final one.
      const finalBytes = result?.objects?.find((o) => o.selected)?.export?.bytes?.["object.glb"];
      if (!shownEarly || (finalBytes && finalBytes !== studio.shownGlbBytes)) await showGlb(outputs["object.glb"]);
    } catch (err) {
      showText("job-error", `The 3D viewer could not show object.glb: ${err.message}`);
    }
  } else {
    $("viewer").hidden = true;
  }
}

// -- recent jobs ----------------------------------------------------------------------------------------------

async function listJobs(current) {
  $("list").hidden = false;
  let jobs;
  try {
    const data = await (await api("/v1/jobs?limit=10")).json();
    jobs = Array.isArray(data) ? data : data.jobs || data.items || [];
  } catch (err) {
    showText("error", `Recent jobs could not be listed: ${err.message}`);
    return;
  }
  const ul = $("jobs");
  ul.replaceChildren();
  if (!jobs.length) {
    const li = document.createElement("li");
    li.textContent = "No jobs yet.";
    ul.append(li);
  }
  // Prompts come from people and uploads: text only, never markup.
  for (const job of jobs) {
    const li = document.createElement("li");
    const link = document.createElement("a");
    link.href = `/jobs/${encodeURIComponent(job.id)}`;
    link.textContent = job.id.slice(0, 8);
    if (job.id === current) link.setAttribute("aria-current", "page");
    const when = job.created_at ? new Date(job.created_at).toLocaleString() : "";
    const status = document.createElement("span");
    status.className = `badge status-${job.status}`;
    status.textContent = job.status;
    li.append(link, " ", status, ` “${job.prompt ?? ""}” ${when}`);
    ul.append(li);
  }
}

async function main() {
  studio.token = readToken();
  window.addEventListener("popstate", () => location.reload());  // back from a job to the form, and forward
  $("token-save").addEventListener("click", () => {
    sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    location.reload();
  });
  if (!studio.token) { askForToken(); return; }
  const match = location.pathname.match(JOB_PATH);
  if (match) {
    listJobs(match[1]);
    await followJob(match[1]);
  } else {
    $("new").hidden = false;
    bindForm();
    await listJobs(null);
  }
  document.body.dataset.studioReady = "1";
}

main().catch((err) => showText("error", err.message));
