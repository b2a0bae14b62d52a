// The review page: shows a paused run's photo and masks, refines with clicks, and resumes the run.
const $ = (id) => document.getElementById(id);
const state = { token: null, run: null, photo: null, mask: null, points: [], box: null, instance: null, edited: false,
  decoder: null, decoderLoading: null, busy: false, pending: false, frame: null };
// Per click: {decoder: "onnx-web" | "lite-server", decodeMs, totalMs} (read by the benchmarks and tests).
window.reviewClicks = [];
window.reviewState = state;

// The token comes in the URL fragment (/#token=...), which browsers never send to a server; it is kept in this
// tab's session storage, taken out of the address bar, and sent only as "Authorization: Bearer" (files too:
// fetched with the header and shown from object URLs, never with the token in a URL).
// A token goes into an HTTP header: printable ASCII without spaces; anything else would make every fetch throw.
function readToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash !== null) {
    sessionStorage.setItem("sam3d-review-token", fromHash);
    history.replaceState(null, "", location.pathname);
  }
  const token = sessionStorage.getItem("sam3d-review-token");
  if (token !== null && !/^[\x21-\x7e]{1,512}$/.test(token)) {
    sessionStorage.removeItem("sam3d-review-token");
    return null;
  }
  return token;
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "Authorization": `Bearer ${state.token}`, "Content-Type": "application/json", ...(options.headers || {}) },
  });
  if (response.status === 401) { showLogin(); throw new Error("wrong or missing token"); }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return response;
}

function status(text) { $("status").textContent = text; }

// Errors that leave nothing else on screen (the run list, or a run, could not load): shown above everything.
function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function showLogin() {
  $("login").hidden = false; $("list").hidden = true; $("review").hidden = true;
}

// An image from fetched bytes, through an object URL (the photo's lives as long as the page).
async function loadImage(blob) {
  const img = new Image();
  img.src = URL.createObjectURL(blob);
  await img.decode();
  return img;
}

// Mask as Uint8Array (1 = object) from a PNG blob.
async function maskFromPng(blob, width, height) {
  const img = await loadImage(blob);
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  URL.revokeObjectURL(img.src);
  const data = ctx.getImageData(0, 0, width, height).data;
  const mask = new Uint8Array(width * height);
  for (let i = 0; i < mask.length; i++) mask[i] = data[i * 4] > 127 ? 1 : 0;
  return mask;
}

async function maskToPngBase64(mask, width, height) {
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(width, height);
  for (let i = 0; i < mask.length; i++) {
    const v = mask[i] ? 255 : 0;
    image.data[i * 4] = v; image.data[i * 4 + 1] = v; image.data[i * 4 + 2] = v; image.data[i * 4 + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  const blob = await canvas.convertToBlob({ type: "image/png" });
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function draw() {
  const { run, photo, mask } = state;
  const canvas = $("canvas");
  canvas.width = run.width; canvas.height = run.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(photo, 0, 0);
  if (mask) {
    const over = ctx.getImageData(0, 0, run.width, run.height);
    for (let i = 0; i < mask.length; i++) {
      if (mask[i]) {
        over.data[i * 4] = over.data[i * 4] * 0.55 + 30 * 0.45;
        over.data[i * 4 + 1] = over.data[i * 4 + 1] * 0.55 + 144 * 0.45;
        over.data[i * 4 + 2] = over.data[i * 4 + 2] * 0.55 + 255 * 0.45;
      }
    }
    ctx.putImageData(over, 0, 0);
  }
  for (const p of state.points) {
    ctx.beginPath(); ctx.arc(p.x, p.y, Math.max(4, run.width / 150), 0, 2 * Math.PI);
    ctx.fillStyle = p.label ? "#16c60c" : "#e81123"; ctx.fill();
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 2; ctx.stroke();
  }
  if (state.box) {
    const [x0, y0, x1, y1] = state.box;
    ctx.strokeStyle = "#ffb900"; ctx.lineWidth = 3; ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  canvas.dataset.maskPixels = mask ? mask.reduce((a, b) => a + b, 0) : 0;
}

async function selectInstance(index) {
  state.instance = index; state.points = []; state.box = null; state.edited = false;
  const blob = await (await fetchFile(state.run.files.masks[index])).blob();
  state.mask = await maskFromPng(blob, state.run.width, state.run.height);
  draw();
}

// Fetch the decoder (kept in the browser's cache per model version), the photo's embeddings, build the
// onnxruntime-web session and warm it up, so the first real click is as fast as the rest.
async function loadDecoder(run) {
  const started = performance.now();
  const { ClickDecoder } = await import("/static/clickdecoder.js");
  const [model, embeddings] = await Promise.all([cachedFetch(run.decoder_url, run.decoder_cache_key), fetchBytes(run.embeddings_url)]);
  const decoder = await ClickDecoder.create(model);
  decoder.setEmbeddings(embeddings, run.width, run.height);
  const centre = [{ x: run.width / 2, y: run.height / 2, label: 1 }];
  for (let i = 0; i < 3; i++) await decoder.decode(i === 2 ? [...centre, { x: 1, y: 1, label: 0 }] : centre, null);
  document.body.dataset.decoderReadyMs = Math.round(performance.now() - started);
  document.body.dataset.embeddingsBytes = embeddings.byteLength;
  document.body.dataset.decoderThreads = decoder.threads;
  return decoder;
}

// A run's file: this server's route (with the token), or a presigned S3 URL fetched directly (CORS, no token).
async function fetchFile(url) {
  if (url.startsWith("/")) return api(url);
  const response = await fetch(url, { mode: "cors", credentials: "omit" });
  if (!response.ok) throw new Error(`${response.status} fetching a run file (expired link? reload the page)`);
  return response;
}

async function fetchBytes(url) { return (await fetchFile(url)).arrayBuffer(); }

async function cachedFetch(url, cacheKey) {
  if (!self.caches) return fetchBytes(url);
  const cache = await caches.open("sam3d-click-decoders");
  const name = `/cache/${encodeURIComponent(cacheKey)}`;
  const hit = await cache.match(name);
  if (hit) { document.body.dataset.decoderFromCache = "1"; return hit.arrayBuffer(); }
  const bytes = await fetchBytes(url);
  await cache.put(name, new Response(bytes.slice(0)));
  return bytes;
}

async function refine() {
  if (state.busy) { state.pending = true; return; }  // decode the latest clicks once the current one ends
  state.busy = true;
  try {
    do {
      state.pending = false;
      await refineOnce();
    } while (state.pending);
  } finally {
    state.busy = false;
  }
}

async function refineOnce() {
  const started = performance.now();
  let decoder = state.decoder;
  if (!decoder && state.decoderLoading) {
    status("waiting for the in-browser decoder…");
    decoder = await state.decoderLoading.catch(() => null);
  }
  if (decoder) {
    const result = await decoder.decode(state.points, state.box);
    state.mask = result.mask; state.edited = true;
    draw();
    const total = performance.now() - started;
    window.reviewClicks.push({ decoder: "onnx-web", decodeMs: result.ms, totalMs: total });
    document.body.dataset.lastRefineMs = Math.round(total);
    status(`decoded in this browser (onnxruntime-web, ${decoder.threads} thread(s)): mask ${result.index}, `
      + `predicted IoU ${result.score.toFixed(2)}, ${Math.round(total)} ms`);
    return;
  }
  status("refining on the server…");
  const body = { points: state.points, box: state.box, instance_index: state.instance };
  const result = await (await api(`/api/runs/${state.run.id}/refine`, { method: "POST", body: JSON.stringify(body) })).json();
  if (result.mask_png_base64) {
    const bytes = Uint8Array.from(atob(result.mask_png_base64), (c) => c.charCodeAt(0));
    state.mask = await maskFromPng(new Blob([bytes], { type: "image/png" }), state.run.width, state.run.height);
    state.edited = true;
  }
  draw();
  const ms = Math.round(performance.now() - started);
  window.reviewClicks.push({ decoder: "lite-server", decodeMs: ms, totalMs: ms });
  document.body.dataset.lastRefineMs = ms;
  status(`${result.message} (${result.backend}, score ${result.score}, ${ms} ms)`);
}

function imagePoint(event) {
  const canvas = $("canvas");
  const rect = canvas.getBoundingClientRect();
  return { x: (event.clientX - rect.left) * canvas.width / rect.width, y: (event.clientY - rect.top) * canvas.height / rect.height };
}

function bindCanvas() {
  const canvas = $("canvas");
  let down = null;
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("pointerdown", (e) => { down = { ...imagePoint(e), negative: e.shiftKey || e.button === 2 }; });
  canvas.addEventListener("pointerup", async (e) => {
    if (!down) return;
    const up = imagePoint(e);
    const dragged = Math.hypot(up.x - down.x, up.y - down.y) > 8;
    if (dragged) {
      state.box = [Math.min(down.x, up.x), Math.min(down.y, up.y), Math.max(down.x, up.x), Math.max(down.y, up.y)];
    } else {
      state.points.push({ x: Math.round(down.x), y: Math.round(down.y), label: down.negative ? 0 : 1 });
    }
    down = null;
    try { await refine(); } catch (err) { status(`refine failed: ${err.message}`); }
  });
}

// A video: its best tracked frames (thumbnail with the tracked mask, index, time, mask and view scores), the shown
// one marked. A click picks the frame to reconstruct from (state.frame; null: the shown one). The masks, clicks and
// edits above are on the shown frame only, so approving another frame sends just the frame: its tracked mask is used.
function showFrames(run) {
  const strip = $("frames");
  state.frame = null;
  const frames = run.frames || [];
  document.body.dataset.frames = frames.length;
  if (!strip) return;
  strip.replaceChildren();
  strip.hidden = !frames.length;
  frames.forEach((f, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = f.chosen ? "frame shown" : "frame";
    button.dataset.frameIndex = f.index;
    button.setAttribute("aria-pressed", String(f.chosen));
    const img = document.createElement("img");
    img.alt = `frame ${f.index} with its tracked mask`;
    const caption = document.createElement("span");
    caption.textContent = `#${f.index} · ${f.time_s.toFixed(2)} s · mask ${f.score.toFixed(2)} · `
      + `view ${f.view_score.toFixed(2)}${f.chosen ? " · shown" : ""}`;
    button.append(img, caption);
    button.addEventListener("click", () => pickFrame(f));
    strip.append(button);
    fetchFile(run.files.frames[i]).then((r) => r.blob()).then((blob) => { img.src = URL.createObjectURL(blob); })
      .catch((err) => { caption.textContent += ` (no thumbnail: ${err.message})`; });
  });
}

function pickFrame(f) {
  state.frame = f.chosen ? null : f.index;
  for (const button of $("frames").children) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.frameIndex) === f.index));
  }
  status(f.chosen ? `frame ${f.index} (shown): approving reconstructs from it with the mask above`
    : `frame ${f.index} picked: approving reconstructs from it with its tracked mask (clicks and edits apply to `
      + "the shown frame only)");
}

async function resume(kind, body) {
  status(`${kind}…`);
  const result = await (await api(`/api/runs/${state.run.id}/${kind}`, { method: "POST", body: JSON.stringify(body) })).json();
  status(`${kind} sent: the run resumes`);
  document.body.dataset.resumed = kind;
  return result;
}

async function openRun(id) {
  $("review").hidden = false;
  const run = await (await api(`/api/runs/${id}`)).json();
  state.run = run;
  $("meta").textContent = `${run.input_uri} · prompt “${run.prompt}” · round ${run.round} · ${run.width}×${run.height}`;
  $("decoder").textContent = run.decoder_label;
  state.photo = await loadImage(await (await fetchFile(run.files.image)).blob());
  const list = $("instances");
  list.replaceChildren();
  run.instances.forEach((inst) => {
    const label = document.createElement("label");
    label.innerHTML = `<input type="radio" name="instance" value="${inst.index}"> #${inst.index} score ${inst.score.toFixed(2)}`;
    label.querySelector("input").checked = inst.index === run.selected;
    label.querySelector("input").addEventListener("change", () => selectInstance(inst.index));
    list.append(label);
  });
  showFrames(run);
  if (run.selected !== null && run.selected !== undefined) await selectInstance(run.selected); else draw();
  // The decoder loads once the first mask is on screen (it would compete with it for the CPU); a click
  // before it is ready waits for it. rAF then a task: the frame with the mask has been painted.
  await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
  document.body.dataset.firstMaskMs = Math.round(performance.now());  // since navigation started
  if (run.decoder === "onnx-web") {
    state.decoderLoading = loadDecoder(run);
    state.decoderLoading.then((decoder) => {
      state.decoder = decoder;
      document.body.dataset.decoder = "onnx-web";
      $("decoder").textContent = `${run.decoder_label}; ready, ${decoder.threads} thread(s)`;
    }).catch((err) => {
      document.body.dataset.decoder = "lite-server";
      $("decoder").textContent = `in-browser decoder unavailable (${err.message}): clicks are refined on the server `
        + "with the lite segmenter (GrabCut)";
    });
  } else {
    document.body.dataset.decoder = "lite-server";
  }

  bindCanvas();
  $("approve").onclick = async () => {
    const body = state.frame !== null ? { frame: state.frame }
      : state.edited && state.mask ? { mask_png_base64: await maskToPngBase64(state.mask, run.width, run.height) }
        : { instance_index: state.instance };
    try { await resume("approve", body); } catch (err) { status(`approve refused: ${err.message}`); }
  };
  $("reject").onclick = async () => { try { await resume("reject", {}); } catch (err) { status(err.message); } };
  $("reprompt").onclick = async () => {
    const prompt = $("prompt").value.trim();
    const body = { ...(prompt ? { prompt } : {}), points: state.points, ...(state.box ? { boxes: [state.box] } : {}) };
    try { await resume("reprompt", body); } catch (err) { status(`re-prompt refused: ${err.message}`); }
  };
  $("reset").onclick = () => selectInstance(state.instance ?? 0);
  document.body.dataset.ready = "1";
  status("ready");
}

async function listRuns() {
  $("list").hidden = false;
  const runs = await (await api("/api/runs")).json();
  const ul = $("runs");
  ul.replaceChildren();
  if (!runs.length) {
    const li = document.createElement("li");
    li.textContent = "No runs are waiting.";
    ul.append(li);
  }
  // Names, keys and prompts come from uploads (S3 metadata): text only, never markup.
  for (const run of runs) {
    const li = document.createElement("li");
    const link = document.createElement("a");
    link.href = `/runs/${encodeURIComponent(run.id)}`;
    link.textContent = run.name;
    li.append(link, ` · ${run.image} · “${run.prompt}”`);
    ul.append(li);
  }
}

async function main() {
  state.token = readToken();
  $("token-save").onclick = () => {
    sessionStorage.setItem("sam3d-review-token", $("token-input").value);
    location.reload();
  };
  if (!state.token) { showLogin(); return; }
  const match = location.pathname.match(/^\/runs\/([0-9a-f-]{36})$/);
  try {
    if (match) await openRun(match[1]); else await listRuns();
  } catch (err) {
    status(err.message);
    showError(err.message);
  }
}

// The studio embeds the review section (marked data-embedded) and opens its job's run itself with these.
export { fetchFile, openRun, state };
if (!document.getElementById("review")?.dataset.embedded) main();
