// ember's web page: submits native jobs, follows their SSE progress, shows the gallery.
"use strict";

const $ = (id) => document.getElementById(id);
let currentJob = null;
let events = null;
let nextCursor = null;

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

async function api(path, options) {
  const res = await fetch(path, options);
  if (!res.ok) {
    let detail = res.statusText;
    try {
      const body = await res.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (e) { /* not JSON */ }
    throw new Error(`${res.status}: ${detail}`);
  }
  return res.json();
}

async function loadSamplers() {
  const samplers = await api("/sdapi/v1/samplers");
  const select = $("sampler");
  for (const s of samplers) {
    const opt = document.createElement("option");
    opt.value = s.aliases[0] || s.name;
    opt.textContent = s.name;
    select.appendChild(opt);
  }
  const opts = await api("/sdapi/v1/options");
  $("model").textContent = opts.sd_model_checkpoint;
}

function readFileAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// --- mask drawing -------------------------------------------------------------------------------
let drawing = false;

async function showInit() {
  const file = $("init").files[0];
  if (!file) return;
  const img = new Image();
  img.src = await readFileAsDataURL(file);
  await img.decode();
  const w = Number($("width").value), h = Number($("height").value);
  for (const id of ["init-canvas", "mask-canvas"]) {
    const c = $(id);
    c.width = w;
    c.height = h;
    c.style.width = Math.max(256, w) + "px";
  }
  $("init-canvas").getContext("2d").drawImage(img, 0, 0, w, h);
  clearMask();
}

function clearMask() {
  const c = $("mask-canvas");
  const ctx = c.getContext("2d");
  ctx.fillStyle = "black";
  ctx.fillRect(0, 0, c.width, c.height);
}

function paint(ev) {
  if (!drawing) return;
  const c = $("mask-canvas");
  const r = c.getBoundingClientRect();
  const x = (ev.clientX - r.left) * c.width / r.width;
  const y = (ev.clientY - r.top) * c.height / r.height;
  const ctx = c.getContext("2d");
  ctx.fillStyle = "white";
  ctx.beginPath();
  ctx.arc(x, y, Math.max(2, c.width / 16), 0, 2 * Math.PI);
  ctx.fill();
}

// --- submitting and following a job --------------------------------------------------------------
async function submit(ev) {
  ev.preventDefault();
  const mode = $("mode").value;
  const body = {
    mode,
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler: $("sampler").value,
    steps: Number($("steps").value),
    cfg: $("cfg").value === "" ? null : Number($("cfg").value),
    seed: Number($("seed").value),
    width: Number($("width").value),
    height: Number($("height").value),
    batch: Number($("batch").value),
  };
  try {
    if (mode !== "txt2img") {
      const file = $("init").files[0];
      if (!file) throw new Error("choose an input image");
      body.init_image = await readFileAsDataURL(file);
      body.strength = Number($("strength").value);
      if (mode === "inpaint") body.mask = $("mask-canvas").toDataURL("image/png");
    }
    const job = await api("/v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify(body),
    });
    follow(job);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function follow(job) {
  currentJob = job.id;
  $("cancel").disabled = false;
  $("progress").value = 0;
  setStatus(job.position ? `queued (position ${job.position})` : "queued");
  if (events) events.close();
  events = new EventSource(`/v1/jobs/${job.id}/events`);
  events.addEventListener("queued", (e) => {
    const d = JSON.parse(e.data);
    setStatus(`queued (position ${d.position})`);
  });
  events.addEventListener("progress", (e) => {
    const d = JSON.parse(e.data);
    $("progress").value = d.step / d.total;
    setStatus(`step ${d.step} of ${d.total}`);
    if (d.preview) {
      $("preview").src = d.preview;
      $("preview").hidden = false;
    }
  });
  for (const kind of ["done", "failed", "cancelled", "interrupted", "gone"]) {
    events.addEventListener(kind, (e) => finish(kind, e.data ? JSON.parse(e.data) : {}));
  }
}

function finish(kind, view) {
  if (events) events.close();
  events = null;
  currentJob = null;
  $("cancel").disabled = true;
  $("progress").value = kind === "done" ? 1 : 0;
  setStatus(kind === "done" ? "done" : `${kind}${view.error ? ": " + view.error : ""}`,
            kind !== "done");
  loadGallery(true);
}

async function cancel() {
  if (!currentJob) return;
  try {
    await api(`/v1/jobs/${currentJob}`, { method: "DELETE" });
  } catch (e) {
    setStatus(e.message, true);
  }
}

// --- gallery ----------------------------------------------------------------------------------------
function useSettings(p) {
  $("prompt").value = p.prompt || "";
  $("negative_prompt").value = p.negative_prompt || "";
  for (const k of ["steps", "cfg", "seed", "width", "height"]) {
    if (p[k] !== undefined && p[k] !== null) $(k).value = p[k];
  }
  $("batch").value = 1;
  const s = $("sampler");
  if ([...s.options].some((o) => o.value === p.sampler)) s.value = p.sampler;
  $("prompt").focus();
}

function galleryItem(item) {
  const li = document.createElement("li");
  li.dataset.id = item.id;
  const img = document.createElement("img");
  img.src = item.url;
  img.alt = `generated image: ${item.params.prompt || "(no prompt)"}, seed ${item.seed}`;
  img.loading = "lazy";
  const pre = document.createElement("pre");
  pre.textContent = item.infotext;
  const btn = document.createElement("button");
  btn.type = "button";
  btn.textContent = "Use these settings";
  btn.addEventListener("click", () => useSettings(item.params));
  li.append(img, pre, btn);
  return li;
}

async function loadGallery(reset) {
  const list = $("gallery");
  let url = "/v1/images?limit=24";
  if (!reset && nextCursor !== null) url += `&before=${nextCursor}`;
  try {
    const page = await api(url);
    if (reset) list.replaceChildren();
    for (const item of page.images) list.appendChild(galleryItem(item));
    nextCursor = page.next;
    $("more").hidden = page.next === null;
  } catch (e) {
    setStatus(e.message, true);
  }
}

function onModeChange() {
  const mode = $("mode").value;
  $("image-inputs").hidden = mode === "txt2img";
  $("mask-area").hidden = mode !== "inpaint";
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("mode").addEventListener("change", onModeChange);
  $("init").addEventListener("change", showInit);
  $("clear-mask").addEventListener("click", clearMask);
  $("more").addEventListener("click", () => loadGallery(false));
  const mc = $("mask-canvas");
  mc.addEventListener("pointerdown", (e) => { drawing = true; paint(e); });
  mc.addEventListener("pointermove", paint);
  window.addEventListener("pointerup", () => { drawing = false; });
  loadSamplers().catch((e) => setStatus(e.message, true));
  loadGallery(true);
});
