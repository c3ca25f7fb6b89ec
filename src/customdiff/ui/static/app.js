// The customdiff page: three tabs over the JSON API of app.py. State lives on the server; this page polls it,
// so a reload or a second tab shows the same jobs. Text from the server is always set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
let INFO = null;
let DELTAS = [];
let selectedJob = null;
let lastJobsJSON = "";
let chosenPhotos = [];
const QUEUED = "queued: training starts as soon as the worker is free";
let queuedNotice = null;  // the job the QUEUED message is about, until it leaves the queue

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function showMessage(text, kind = "error") {
  $("message-text").textContent = text;
  $("message").className = kind === "error" ? "" : "info";
  $("message").hidden = false;
}
function clearMessage() { $("message").hidden = true; }

async function api(path, options = {}) {
  const opts = { ...options, headers: { ...(options.headers || {}) } };
  if (opts.method && opts.method !== "GET") opts.headers["X-Customdiff"] = "1";
  if (opts.json !== undefined) {
    opts.body = JSON.stringify(opts.json);
    opts.headers["Content-Type"] = "application/json";
    delete opts.json;
  }
  let res;
  try { res = await fetch(path, opts); } catch (e) { throw new Error("the server does not answer (stopped?)"); }
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) throw new Error((body && body.error) || `the server answered ${res.status}`);
  return body;
}

async function waitTask(id, status) {
  for (;;) {
    const t = await api(`/api/tasks/${encodeURIComponent(id)}`);
    if (t.state === "done") return t.result;
    if (t.state === "failed") throw new Error(t.error);
    if (status) status.textContent = t.state === "queued" ? "waiting for the task before it..." : "working...";
    await new Promise((r) => setTimeout(r, 400));
  }
}

function clock(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const mm = h ? String(m).padStart(2, "0") : String(m);
  return (h ? h + ":" : "") + mm + ":" + String(sec).padStart(2, "0");
}

function human(n) {
  const u = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

// ---------------------------------------------------------------- tabs

function showTab(name) {
  for (const b of document.querySelectorAll("nav button")) b.setAttribute("aria-selected", String(b.dataset.tab === name));
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== name;
  if (name !== "teach") refreshLibrary();
  history.replaceState(null, "", "#" + name);
}

// ---------------------------------------------------------------- teach

function setPhotos(files) {
  chosenPhotos = Array.from(files).filter((f) => f.type.startsWith("image/") || /\.(png|jpe?g|webp|bmp|gif|tiff?)$/i.test(f.name));
  const thumbs = $("thumbs");
  thumbs.replaceChildren();
  for (const f of chosenPhotos) thumbs.append(el("img", { src: URL.createObjectURL(f), alt: f.name, title: f.name }));
  if (files.length && !chosenPhotos.length) showMessage("none of these files is an image");
  else if (chosenPhotos.length && $("message").className !== "info") clearMessage();  // the old error is answered
}

function regChanged() {
  const v = $("reg").value;
  $("n-class-label").hidden = v !== "generated";
  $("reg-files-label").hidden = v !== "upload";
}

async function teach(ev) {
  ev.preventDefault();
  clearMessage();
  const form = new FormData();
  for (const f of chosenPhotos) form.append("photos", f, f.name);
  for (const [id, key] of [["class-word", "class_word"], ["token", "token"], ["name", "name"], ["steps", "steps"],
    ["learning-rate", "learning_rate"], ["seed", "seed"], ["batch-size", "batch_size"], ["reg", "reg"],
    ["num-class-images", "num_class_images"], ["preview-every", "preview_every"],
    ["preview-steps", "preview_steps"], ["checkpoint-every", "checkpoint_every"], ["template", "template"]]) {
    form.append(key, $(id).value);
  }
  if ($("reg").value === "upload") for (const f of $("reg-files").files) form.append("reg_files", f, f.name);
  if (!chosenPhotos.length) form.append("photos", new Blob([]), "");
  $("teach-button").disabled = true;
  try {
    const r = await api("/api/jobs", { method: "POST", body: form });
    selectedJob = r.id;
    queuedNotice = r.id;
    showMessage(QUEUED, "info");
    await pollJobs();
  } catch (e) {
    showMessage(e.message);
  } finally {
    $("teach-button").disabled = false;
  }
}

function curve(losses) {
  const svg = $("job-curve");
  svg.replaceChildren();
  $("job-curve-range").textContent = "";
  if (losses.length < 2) return;
  const ys = losses.map((p) => p[1]);
  const lo = Math.min(...ys), hi = Math.max(...ys), span = hi - lo || 1;
  const x0 = losses[0][0], xs = (losses[losses.length - 1][0] - x0) || 1;
  const pt = (x, y) => `${((x - x0) / xs * 300).toFixed(1)},${(58 - (y - lo) / span * 56).toFixed(1)}`;
  // the diffusion loss is noisy step to step (random timesteps): a running mean shows the trend
  let mean = ys[0];
  const k = Math.min(0.2, 10 / losses.length);
  const smooth = losses.map((p) => { mean += k * (p[1] - mean); return pt(p[0], mean); });
  for (const [points, cls] of [[losses.map((p) => pt(p[0], p[1])), ""], [smooth, "smooth"]]) {
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.join(" "));
    if (cls) line.setAttribute("class", cls);
    svg.append(line);
  }
  $("job-curve-range").textContent = `${lo.toFixed(3)} – ${hi.toFixed(3)}`;
}

function renderJob(job) {
  $("no-job").hidden = !!job;
  $("job").hidden = !job;
  if (!job) return;
  $("job").dataset.id = job.id;
  $("job").dataset.state = job.state;
  $("job-name").textContent = job.name;
  $("job-state").textContent = job.state;
  $("job-state").className = "badge " + job.state;
  $("job-prompt").textContent = `"${job.instance_prompt}", ${job.photos} photos`;
  const pct = job.total ? Math.floor(100 * job.step / job.total) : 0;
  $("job-bar-fill").style.width = pct + "%";
  $("job-percent").textContent = pct + "%";
  $("job-percent").classList.toggle("on-fill", pct >= 50);  // the label's middle lies on the fill from 50%
  $("job-bar").setAttribute("aria-valuenow", String(pct));
  $("job-step").textContent = job.step;
  $("job-total").textContent = job.total;
  $("job-loss").textContent = job.loss === null ? "–" : job.loss.toFixed(4);
  $("job-elapsed").textContent = clock(job.elapsed);
  $("job-remaining").textContent = job.state === "done" ? "0:00" : clock(job.remaining);
  $("job-phase").textContent = job.phase || "";
  $("job-message").textContent = job.message || "";
  $("job-error").textContent = job.error || "";
  $("job-stop").hidden = !["queued", "running"].includes(job.state);
  $("job-resume").hidden = !["stopped", "failed"].includes(job.state);
  $("job-sample").hidden = job.state !== "done";
  curve(job.losses);
  const box = $("previews");
  const want = job.previews.slice().reverse().slice(0, 3);
  $("previews-title").hidden = want.length === 0;
  const key = job.id + want.map((p) => p.file).join();
  if (box.dataset.key !== key) {
    box.dataset.key = key;
    box.replaceChildren(...want.map((p) => el("figure", {},
      el("img", { src: `/api/jobs/${job.id}/previews/${p.file}`, alt: `samples at step ${p.step}` }),
      el("figcaption", { text: `"${job.instance_prompt}" at step ${p.step}` }))));
  }
}

function renderJobList(snap) {
  const list = $("job-list");
  list.replaceChildren(...snap.jobs.map((j) => {
    const pos = snap.queue.indexOf(j.id);
    const where = j.state === "queued" && pos >= 0 ? `queued #${pos + 1}` : j.state;
    const li = el("li", { "data-id": j.id, onclick: () => { selectedJob = j.id; lastJobsJSON = ""; pollJobs(); } },
      el("span", { text: `${j.name} (${j.token} ${j.class_word})` }),
      el("span", { class: "muted", text: `${where} · ${j.step}/${j.total}` }));
    if (j.id === shownJobId(snap)) li.classList.add("selected");
    return li;
  }));
}

function shownJobId(snap) {
  if (selectedJob && snap.jobs.some((j) => j.id === selectedJob)) return selectedJob;
  if (snap.current) return snap.current;
  return snap.jobs.length ? snap.jobs[0].id : null;
}

let finished = new Set();
let serverDown = null;  // the message shown while the server does not answer, cleared when it answers again
async function pollJobs() {
  let snap;
  try { snap = await api("/api/jobs"); } catch (e) {
    if (!serverDown) { serverDown = e.message + "; the page goes on once it answers again"; showMessage(serverDown); }
    return;
  }
  if (serverDown) {
    if (!$("message").hidden && $("message-text").textContent === serverDown) clearMessage();
    serverDown = null;
    lastJobsJSON = "";
  }
  const text = JSON.stringify(snap);
  if (text === lastJobsJSON) return;
  lastJobsJSON = text;
  const id = shownJobId(snap);
  renderJob(snap.jobs.find((j) => j.id === id) || null);
  const noticed = snap.jobs.find((j) => j.id === queuedNotice);
  if (queuedNotice && (!noticed || noticed.state !== "queued")) {  // it started (or ended): the notice is stale
    if (!$("message").hidden && $("message-text").textContent === QUEUED) clearMessage();
    queuedNotice = null;
  }
  renderJobList(snap);
  const done = snap.jobs.filter((j) => j.state === "done").map((j) => j.id);
  if (done.some((d) => !finished.has(d))) { finished = new Set(done); refreshLibrary(); }
}

async function jobAction(action) {
  clearMessage();
  try { await api(`/api/jobs/${$("job").dataset.id}/${action}`, { method: "POST" }); } catch (e) { showMessage(e.message); }
  lastJobsJSON = "";
  pollJobs();
}

// ---------------------------------------------------------------- library

async function refreshLibrary() {
  let r;
  try { r = await api("/api/deltas"); } catch (e) { showMessage(e.message); return; }
  DELTAS = r.deltas;
  renderLibrary();
  renderSampleDeltas();
}

function renderLibrary() {
  const body = $("deltas").tBodies[0];
  $("no-deltas").hidden = DELTAS.length > 0;
  $("deltas").hidden = DELTAS.length === 0;
  const checked = new Set(Array.from(document.querySelectorAll(".pick:checked")).map((c) => c.value));
  body.replaceChildren(...DELTAS.map((d) => {
    const notes = [];
    if (d.error) notes.push(d.error);
    if (d.merged_from && d.merged_from.length) notes.push(`merged from ${d.merged_from.join(", ")}`);
    if (d.worst_residual !== null && d.worst_residual !== undefined) notes.push(`worst residual ${d.worst_residual.toExponential(2)}`);
    if (d.ranks) notes.push(`ranks ${d.ranks[0]}–${d.ranks[1]}`);
    const pick = el("input", { type: "checkbox", class: "pick", value: d.name, "aria-label": "select " + d.name });
    pick.checked = checked.has(d.name);
    const enc = encodeURIComponent(d.name);
    return el("tr", { "data-name": d.name },
      el("td", {}, pick),
      el("td", { text: d.name }),
      el("td", { text: d.base || "" }),
      el("td", { text: (d.tokens || []).map((t) => t.token).join(" ") }),
      el("td", { text: (d.tokens || []).map((t) => t.class).join(" ") }),
      el("td", { text: d.steps ?? "" }),
      el("td", { text: d.storage || "" }),
      el("td", { text: human(d.bytes) }),
      el("td", { class: "muted", text: notes.join("; ") }),
      el("td", {},
        el("a", { class: "button", href: `/api/deltas/${enc}/download`, download: d.name, text: "Download" }),
        el("button", { type: "button", text: "Compress", onclick: () => compress(d.name) }),
        el("button", { type: "button", text: "Export LoRA", onclick: () => exportLora(d.name) }),
        el("button", { type: "button", text: "Delete", onclick: () => deleteDelta(d.name) })));
  }));
}

async function libraryTask(label, path, json) {
  clearMessage();
  const status = $("library-status");
  status.textContent = label + "...";
  try {
    const r = await api(path, { method: "POST", json });
    const result = await waitTask(r.task, status);
    status.textContent = "";
    await refreshLibrary();
    return result;
  } catch (e) {
    status.textContent = "";
    showMessage(e.message);
    return null;
  }
}

async function compress(name) {
  const typed = $("compress-energy").value.trim();
  const energy = Number(typed);
  if (!typed || !Number.isFinite(energy)) { showMessage(`energy: give a number in (0, 1], e.g. 0.9 (got '${typed}')`); return; }
  const r = await libraryTask("compressing " + name, `/api/deltas/${encodeURIComponent(name)}/compress`, { energy });
  if (r) showMessage(`${r.delta}: ${human(r.before)} → ${human(r.after)}`, "info");
}

async function exportLora(name) {
  const r = await libraryTask("exporting " + name, `/api/deltas/${encodeURIComponent(name)}/export`, {});
  if (!r) return;
  showMessage(`${r.zip} (${human(r.bytes)}): a diffusers LoRA plus embeddings; downloading`, "info");
  const a = el("a", { href: `/api/exports/${encodeURIComponent(r.zip)}`, download: r.zip });
  document.body.append(a);
  a.click();
  a.remove();
}

async function deleteDelta(name) {
  if (!confirm(`Delete ${name} from the work folder?`)) return;
  clearMessage();
  try { await api(`/api/deltas/${encodeURIComponent(name)}`, { method: "DELETE" }); } catch (e) { showMessage(e.message); }
  refreshLibrary();
}

async function merge() {
  const names = Array.from(document.querySelectorAll(".pick:checked")).map((c) => c.value);
  if (names.length < 2) { showMessage("select two or more deltas to merge"); return; }
  const r = await libraryTask("merging " + names.join(" + "), "/api/deltas/merge", { deltas: names, name: $("merge-name").value });
  if (!r) return;
  $("merge-result").hidden = false;
  const renamed = r.renamed.length ? ` (renamed, as two deltas used one token: ${r.renamed.join("; ")})` : "";
  $("merge-summary").textContent = `${r.delta}: tokens ${r.tokens.join(", ")}${renamed}; worst constraint residual ${r.worst.toExponential(2)} (exact merge: near 1e-7; plain averaging: about 0.9)`;
  $("residuals").tBodies[0].replaceChildren(...Object.entries(r.residuals).map(([k, v]) =>
    el("tr", {}, el("td", { text: k }), el("td", { text: v.toExponential(2) }))));
}

async function uploadDelta() {
  const f = $("delta-upload").files[0];
  if (!f) return;
  clearMessage();
  const form = new FormData();
  form.append("file", f, f.name);
  try {
    const r = await api("/api/deltas", { method: "POST", body: form });
    showMessage(`added ${r.delta}`, "info");
  } catch (e) { showMessage(e.message); }
  $("delta-upload").value = "";
  refreshLibrary();
}

// ---------------------------------------------------------------- sample

function renderSampleDeltas(preselect) {
  const box = $("sample-deltas");
  const checked = new Set(preselect || Array.from(box.querySelectorAll("input:checked")).map((c) => c.value));
  box.replaceChildren(...DELTAS.filter((d) => !d.error).map((d) => {
    const c = el("input", { type: "checkbox", value: d.name, onchange: suggestPrompts });
    c.checked = checked.has(d.name);
    const toks = (d.tokens || []).map((t) => `${t.token} ${t.class}`).join(", ");
    return el("label", {}, c, el("span", { text: `${d.name} (${toks})` }));
  }));
  if (!DELTAS.length) box.append(el("span", { class: "muted", text: "none yet: the base model alone" }));
  if (preselect) suggestPrompts();
}

function suggestPrompts() {
  const names = Array.from($("sample-deltas").querySelectorAll("input:checked")).map((c) => c.value);
  const tpl = INFO.defaults.template;
  const lines = [];
  for (const d of DELTAS.filter((x) => names.includes(x.name))) {
    for (const t of d.tokens || []) lines.push(tpl.replace("{token}", t.token).replace("{class}", t.class));
  }
  if (lines.length) $("prompts").value = lines.join("\n");
}

async function sample() {
  clearMessage();
  const deltas = Array.from($("sample-deltas").querySelectorAll("input:checked")).map((c) => c.value);
  const body = { deltas, prompts: $("prompts").value.split("\n"), n: $("sample-n").value, seed: $("sample-seed").value,
    steps: $("sample-steps").value, guidance: $("sample-guidance").value };
  $("sample-button").disabled = true;
  const status = $("sample-status");
  status.textContent = "sampling...";
  try {
    const r = await api("/api/sample", { method: "POST", json: body });
    const res = await waitTask(r.task, status);
    status.textContent = "";
    const dir = `/api/samples/${encodeURIComponent(res.folder)}`;
    $("sample-result").hidden = false;
    $("sample-info").textContent = `seed ${res.seed}, ${res.steps} steps, guidance ${res.guidance}` +
      (res.deltas.length ? `, deltas ${res.deltas.join(" + ")}` : ", base model only") + ` · ${res.seconds} s`;
    $("sample-grid").src = `${dir}/${res.grid}`;
    $("sample-images").replaceChildren(...res.images.map((im) => el("figure", {},
      el("img", { src: `${dir}/${im.file}`, alt: im.prompt, title: `${im.prompt} (seed ${im.seed})` }),
      el("figcaption", {}, el("a", { href: `${dir}/${im.file}?download=1`, download: im.file, text: "download " + im.file })))));
    $("sample-zip").href = `${dir}/images.zip`;
  } catch (e) {
    status.textContent = "";
    showMessage(e.message);
  } finally {
    $("sample-button").disabled = false;
  }
}

// ---------------------------------------------------------------- start

async function start() {
  INFO = await api("/api/info");
  const d = INFO.defaults;
  const family = INFO.pipeline === "StableDiffusionXLPipeline" ? " (SDXL)" : "";
  $("base-info").textContent = `base: ${INFO.base}${family} · work folder: ${INFO.workdir}`;
  $("token").value = d.token;
  $("steps").value = d.steps;
  $("learning-rate").value = d.learning_rate;
  $("seed").value = d.seed;
  $("batch-size").value = d.batch_size;
  $("reg").value = d.reg;
  if (!INFO.toy) $("reg").querySelector('option[value="toy"]').remove();
  $("num-class-images").value = d.num_class_images;
  $("preview-every").value = d.preview_every;
  $("preview-steps").value = d.preview_steps;
  $("checkpoint-every").value = d.checkpoint_every;
  $("template").value = d.template;
  $("sample-n").value = d.n;
  $("sample-seed").value = 0;
  $("sample-steps").value = d.sample_steps;
  $("sample-guidance").value = d.guidance;
  if (INFO.toy) $("class-word").placeholder = INFO.toy_classes.join(", ");
  regChanged();

  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("message-close").addEventListener("click", clearMessage);
  $("photos").addEventListener("change", () => setPhotos($("photos").files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setPhotos(e.dataTransfer.files); });
  $("reg").addEventListener("change", regChanged);
  $("teach-form").addEventListener("submit", teach);
  // a field the browser finds invalid inside a folded section cannot be pointed at, so Teach did nothing: open it
  // first (Enter in a field clicks this button too)
  $("teach-button").addEventListener("click", () => {
    const bad = $("teach-form").querySelector(":invalid");
    if (bad && bad.closest("details")) bad.closest("details").open = true;
  });
  $("job-stop").addEventListener("click", () => jobAction("stop"));
  $("job-resume").addEventListener("click", () => jobAction("resume"));
  $("job-sample").addEventListener("click", async () => {
    await refreshLibrary();
    const job = lastJobsJSON ? JSON.parse(lastJobsJSON).jobs.find((j) => j.id === $("job").dataset.id) : null;
    showTab("sample");
    if (job && job.delta && !DELTAS.some((d) => d.name === job.delta)) showMessage(`${job.delta} is no longer in the library (deleted?)`);
    else if (job && job.delta) renderSampleDeltas([job.delta]);
  });
  $("sample-button").addEventListener("click", sample);
  $("merge-button").addEventListener("click", merge);
  $("delta-upload").addEventListener("change", uploadDelta);

  await refreshLibrary();
  await pollJobs();
  setInterval(pollJobs, 1000);
  const tab = location.hash.slice(1);
  if (["teach", "sample", "library"].includes(tab)) showTab(tab);
  document.body.dataset.ready = "1";
}

start().catch((e) => showMessage("the page could not start: " + e.message));
