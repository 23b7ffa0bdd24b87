// ditkit serve page: plain JavaScript, no build step. Talks to the JSON API of the same server:
// GET /v1/models to fill the form, POST /v1/images or /v1/text to generate, and
// GET /v1/progress/{request_id} (polled while the POST runs) for the progress bar.
// Image models that take a picture (takes_image): an uploaded image is cropped and resized to the
// model's size in a canvas, the mask is painted on a canvas of that size over its preview (white =
// regenerate), and both go in the request as PNG data: URLs with the strength.
// Server text is inserted with textContent only, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
let serverLimits = {};
let busy = false;
// the start-from-an-image state: the uploaded picture (an <img>), and its PNG at the model's size
const edit = { source: null, size: 0, image: null, painting: false, last: null };

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.appendChild(child);
  return node;
}

function option(value, label) {
  return el("option", { value: String(value), text: label });
}

function currentModel() {
  return models.find((m) => m.name === $("model").value);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function checkHealth() {
  try {
    const response = await fetch("/health");
    const body = await response.json();
    const queued = Object.values(body.models).reduce((n, m) => n + m.queued + (m.running ? 1 : 0), 0);
    $("health").textContent = `${body.status} · ${queued} in progress`;
    $("health").className = "health " + (response.ok ? "ok" : "bad");
  } catch (err) {
    $("health").textContent = "server unreachable";
    $("health").className = "health bad";
  }
}

async function loadModels() {
  const response = await fetch("/v1/models");
  if (!response.ok) throw new Error(`GET /v1/models: HTTP ${response.status}`);
  const listing = await response.json();
  models = listing.models;
  serverLimits = listing.limits || {};
  const select = $("model");
  select.replaceChildren(...models.map((m) => option(m.name, `${m.name} (${m.modality})`)));
  selectModel();
}

function selectModel() {
  const m = currentModel();
  if (!m) return;
  const isText = m.modality === "text";
  $("image-options").hidden = isText;
  if (isText) $("edit-options").hidden = true;
  $("text-options").hidden = !isText;
  const d = m.defaults, lim = m.limits;
  $("steps").value = d.steps;
  $("steps").max = lim.max_steps;
  $("seed").value = d.seed;
  if (isText) {
    $("model-info").textContent =
      `${m.architecture} · ${m.objective} · trained ${m.step} steps · ${m.tokenizer} tokenizer, window ${m.seq_len}`;
    $("length").value = d.length;
    $("length").max = lim.max_text_length;
    $("temperature").value = d.temperature;
    $("num-samples").max = lim.max_text_samples;
    $("template").disabled = !m.supports_infill;
    $("prompt").maxLength = lim.max_prompt_chars;
    $("template").maxLength = lim.max_prompt_chars;
  } else {
    const shape = m.modality === "audio" ? `${m.trained_duration} s at ${m.sample_rate} Hz`
      : m.modality === "video" ? `${m.trained_frames} frames of ${m.image_size}×${m.image_size}` : `${m.image_size}×${m.image_size}`;
    $("model-info").textContent =
      `${m.architecture} · ${m.objective} · trained ${m.step} steps · ${shape}` +
      (m.conditional ? ` · ${m.num_classes} classes` : " · unconditional");
    const classes = [option("", m.conditional ? "each class in turn" : "unconditional")];
    for (const c of m.classes) classes.push(option(c.label, c.name === String(c.label) ? c.name : `${c.label}: ${c.name}`));
    $("class").replaceChildren(...classes);
    $("class").disabled = !m.conditional;
    $("sampler").replaceChildren(...m.samplers.map((s) => option(s, s)));
    $("sampler").value = d.sampler;
    $("num-images").value = d.num_images ?? d.num_samples;
    $("num-images").max = lim.max_images_per_request;
    $("cfg-scale").value = d.cfg_scale;
    $("cfg-scale").min = lim.min_cfg_scale;
    $("cfg-scale").max = lim.max_cfg_scale;
    $("cfg-scale").disabled = !m.conditional && !m.prompts;
    $("prompt-options").hidden = !m.prompts;  // text-to-image: a prompt box instead of classes
    $("edit-options").hidden = !m.takes_image;
    if (m.takes_image && edit.source && edit.size !== m.image_size) renderInitImage();  // another size: redo, mask cleared
    if (m.prompts) $("model-info").textContent += ` · prompts up to ${m.max_prompt_tokens} tokens`;
  }
}

function intOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number.parseInt(value, 10);
}

function floatOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number.parseFloat(value);
}

function buildRequest(m, requestId) {
  const body = { model: m.name, steps: intOrNull("steps"), seed: intOrNull("seed"), request_id: requestId };
  if (m.modality === "text") {
    const template = $("template").value;
    if (template) body.template = template;
    else {
      body.prompt = $("prompt").value;
      body.length = intOrNull("length");
    }
    body.temperature = floatOrNull("temperature");
    body.num_samples = intOrNull("num-samples") ?? 1;
    return ["/v1/text", body];
  }
  const count = intOrNull("num-images") ?? 1;
  if (m.modality === "audio" || m.modality === "video") body.num_samples = count;
  else body.num_images = count;
  body.sampler = $("sampler").value || null;
  if (m.prompts) {
    body.prompt = $("image-prompt").value;
    const negative = $("negative-prompt").value;
    if (negative) body.negative_prompt = negative;
    body.cfg_scale = floatOrNull("cfg-scale");
  } else if (m.conditional) {
    body.cfg_scale = floatOrNull("cfg-scale");
    const label = $("class").value;
    body.class_labels = label === "" ? null : [Number.parseInt(label, 10)];
  }
  if (m.takes_image && edit.image) {  // one picture (and mask) for every image drawn
    body.image = edit.image;
    const mask = maskDataUrl();
    if (mask) body.mask_image = mask;
    if ($("use-strength").checked) body.strength = Number.parseFloat($("strength").value);
  }
  return [{ audio: "/v1/audio", video: "/v1/videos" }[m.modality] || "/v1/images", body];
}

function setBusy(on, text = "") {
  busy = on;
  $("generate").disabled = on;
  $("status").hidden = !on;
  $("status-text").textContent = text;
  if (on) $("progress").removeAttribute("value"); // indeterminate until the first report
}

async function pollProgress(requestId, started) {
  while (busy) {
    await new Promise((resolve) => setTimeout(resolve, 250));
    if (!busy) return;
    const elapsed = ((performance.now() - started) / 1000).toFixed(1);
    try {
      const response = await fetch(`/v1/progress/${requestId}`);
      if (!response.ok) continue;
      const p = await response.json();
      if (!busy) return;
      if (p.state === "queued") {
        $("progress").removeAttribute("value");
        $("status-text").textContent = `queued (${p.queue_position} ahead) · ${elapsed} s`;
      } else {
        $("progress").value = p.fraction;
        $("status-text").textContent = `step ${p.done} / ${p.total} · ${elapsed} s`;
      }
    } catch (err) {
      /* a missed poll is harmless */
    }
  }
}

function settingsLine(meta) {
  const parts = [meta.model, `step ${meta.step}`, meta.sampler, `${meta.num_sampling_steps} steps`];
  if (meta.cfg_scale !== undefined) parts.push(`cfg ${meta.cfg_scale}`);
  if (meta.control) parts.push(`from your image: ${meta.control}`);
  return parts.join(" · ");
}

function addImageCard(modelName, body) {
  const card = el("article", { class: "card" });
  const grid = el("div", { class: "images" });
  for (const image of body.images) {
    const src = `data:image/png;base64,${image.png_base64}`;
    const caption = image.class_name ? `${image.class_name} · seed ${image.seed}` : `seed ${image.seed}`;
    const link = el("a", { href: src, download: `${modelName}-seed${image.seed}.png`, title: "download PNG" }, [
      el("img", { src, alt: caption, width: "128", height: "128", class: "sample" }),
    ]);
    grid.appendChild(el("figure", {}, [link, el("figcaption", { text: caption })]));
  }
  card.appendChild(grid);
  card.appendChild(el("p", { class: "settings", text: `${modelName} · ${settingsLine(body.metadata)} · ${body.elapsed_s} s` }));
  prepend(card);
}

function addAudioCard(modelName, body) {
  const card = el("article", { class: "card" });
  const grid = el("div", { class: "images" });
  for (const clip of body.clips) {
    const caption = (clip.class_name ? `${clip.class_name} · ` : "") + `seed ${clip.seed} · ${clip.seconds} s`;
    const wav = `data:audio/wav;base64,${clip.wav_base64}`;
    grid.appendChild(el("figure", {}, [
      el("img", { src: `data:image/png;base64,${clip.spectrogram_png_base64}`, alt: `spectrogram: ${caption}`, class: "sample" }),
      el("audio", { controls: "", src: wav, preload: "auto" }),
      el("a", { href: wav, download: `${modelName}-seed${clip.seed}.wav`, text: "download WAV" }),
      el("figcaption", { text: caption }),
    ]));
  }
  card.appendChild(grid);
  card.appendChild(el("p", { class: "settings", text: `${modelName} · ${settingsLine(body.metadata)} · ${body.elapsed_s} s` }));
  prepend(card);
}

function addVideoCard(modelName, body) {
  const card = el("article", { class: "card" });
  const grid = el("div", { class: "images" });
  for (const clip of body.clips) {
    const caption = (clip.class_name ? `${clip.class_name} · ` : "") + `seed ${clip.seed} · ${clip.num_frames} frames`;
    const gif = `data:image/gif;base64,${clip.gif_base64}`;
    grid.appendChild(el("figure", {}, [
      el("a", { href: gif, download: `${modelName}-seed${clip.seed}.gif`, title: "download GIF" }, [
        el("img", { src: gif, alt: caption, width: "128", height: "128", class: "sample" }),
      ]),
      el("figcaption", { text: caption }),
    ]));
  }
  card.appendChild(grid);
  card.appendChild(el("p", { class: "settings", text: `${modelName} · ${settingsLine(body.metadata)} · ${body.elapsed_s} s` }));
  prepend(card);
}

function addTextCard(modelName, body) {
  const card = el("article", { class: "card" });
  for (const sample of body.samples) {
    card.appendChild(el("pre", { class: "text-sample", text: sample.text }));
    card.appendChild(el("p", { class: "settings", text: `seed ${sample.seed}` + (sample.class_name ? ` · ${sample.class_name}` : "") }));
  }
  const meta = body.metadata;
  const what = meta.prompt ? `prompt "${meta.prompt}"` : meta.infill ? `template "${meta.infill}"` : "unconditional";
  card.appendChild(el("p", { class: "settings", text: `${modelName} · ${what} · ${settingsLine(meta)} · T ${meta.temperature} · ${body.elapsed_s} s` }));
  prepend(card);
}

function prepend(card) {
  $("empty").hidden = true;
  $("gallery").prepend(card);
}

async function generate(event) {
  event.preventDefault();
  if (busy) return;
  const m = currentModel();
  if (!m) return;
  showError("");
  const requestId = `page-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
  const [url, body] = buildRequest(m, requestId);
  const payload = JSON.stringify(body);
  if (serverLimits.max_body_bytes && payload.length > serverLimits.max_body_bytes) {
    showError(`the request is ${payload.length} bytes with the image, over the server's limit of ` +
      `${serverLimits.max_body_bytes} (max_body_bytes): use a simpler image, or ask for a larger --max-body-bytes`);
    return;
  }
  const started = performance.now();
  setBusy(true, "sending…");
  const polling = pollProgress(requestId, started);
  try {
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: payload,
    });
    const reply = await response.json().catch(() => ({}));
    if (!response.ok) {
      const retry = response.headers.get("Retry-After");
      showError(`${response.status}: ${reply.detail || response.statusText}` + (retry ? ` (retry in ${retry} s)` : ""));
      return;
    }
    if (m.modality === "text") addTextCard(m.name, reply);
    else if (m.modality === "audio") addAudioCard(m.name, reply);
    else if (m.modality === "video") addVideoCard(m.name, reply);
    else addImageCard(m.name, reply);
  } catch (err) {
    showError(`request failed: ${err}`);
  } finally {
    setBusy(false);
    await polling;
    checkHealth();
  }
}

// ---- start from an image: upload, preview, mask painting -----------------------------------------

function readImage(file) {
  // a chosen file -> a decoded <img> (via a data: URL, which the page's CSP allows)
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.onload = () => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error(`${file.name} is not an image the browser can decode`));
      img.src = reader.result;
    };
    reader.readAsDataURL(file);
  });
}

function squareCanvas(img, size, smooth) {
  // the centre square of img, resized to size x size
  const canvas = el("canvas", { width: String(size), height: String(size) });
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = smooth;
  const side = Math.min(img.naturalWidth, img.naturalHeight);
  ctx.drawImage(img, (img.naturalWidth - side) / 2, (img.naturalHeight - side) / 2, side, side, 0, 0, size, size);
  return canvas;
}

function renderInitImage() {
  const m = currentModel();
  if (!m || !edit.source) return;
  edit.size = m.image_size;
  edit.image = squareCanvas(edit.source, edit.size, true).toDataURL("image/png");
  $("image-preview").src = edit.image;
  const mask = $("mask-canvas");
  mask.width = edit.size;  // resizing a canvas clears it
  mask.height = edit.size;
  $("brush-size").max = String(Math.max(1, Math.floor(edit.size / 2)));
  $("image-editor").hidden = false;
}

function removeImage() {
  edit.source = null;
  edit.image = null;
  $("init-image").value = "";
  $("mask-file").value = "";
  $("image-editor").hidden = true;
}

function clearMask() {
  const mask = $("mask-canvas");
  mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  $("mask-file").value = "";
}

function maskPoint(event) {
  // pointer position -> model pixel (the canvas is shown scaled up)
  const mask = $("mask-canvas");
  const rect = mask.getBoundingClientRect();
  return [(event.clientX - rect.left) * mask.width / rect.width, (event.clientY - rect.top) * mask.height / rect.height];
}

function paintAt(x, y) {
  // a square brush on whole pixels, so the mask stays pure white / transparent
  const size = Number.parseInt($("brush-size").value, 10) || 1;
  const ctx = $("mask-canvas").getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(Math.round(x - size / 2), Math.round(y - size / 2), size, size);
}

function paintStroke(event) {
  const [x, y] = maskPoint(event);
  const [x0, y0] = edit.last || [x, y];
  const steps = Math.max(1, Math.ceil(Math.hypot(x - x0, y - y0) * 2));  // fill the gap since the last event
  for (let i = 1; i <= steps; i++) paintAt(x0 + (x - x0) * i / steps, y0 + (y - y0) * i / steps);
  edit.last = [x, y];
}

function maskDataUrl() {
  // the painted mask as a white-on-black PNG data: URL, or null when nothing is painted
  const mask = $("mask-canvas");
  const painted = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height).data;
  let any = false;
  for (let i = 3; i < painted.length; i += 4) if (painted[i] > 0) { any = true; break; }
  if (!any) return null;
  const out = el("canvas", { width: String(mask.width), height: String(mask.height) });
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(mask, 0, 0);
  return out.toDataURL("image/png");
}

async function loadMaskFile(file) {
  // a mask file -> the mask canvas (white where the file is light), so it can be edited further
  const img = await readImage(file);
  const mask = $("mask-canvas");
  const pixels = squareCanvas(img, mask.width, false).getContext("2d").getImageData(0, 0, mask.width, mask.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) {
    const light = 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2] >= 128 && d[i + 3] >= 128;
    d[i] = d[i + 1] = d[i + 2] = 255;
    d[i + 3] = light ? 255 : 0;
  }
  mask.getContext("2d").putImageData(pixels, 0, 0);
}

function setupImageEditor() {
  $("init-image").addEventListener("change", async () => {
    const file = $("init-image").files[0];
    if (!file) return removeImage();
    try {
      edit.source = await readImage(file);
      showError("");
      renderInitImage();
    } catch (err) {
      removeImage();
      showError(String(err.message || err));
    }
  });
  $("mask-file").addEventListener("change", async () => {
    const file = $("mask-file").files[0];
    if (!file) return;
    try {
      await loadMaskFile(file);
    } catch (err) {
      showError(String(err.message || err));
    }
  });
  const mask = $("mask-canvas");
  mask.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    mask.setPointerCapture(event.pointerId);
    edit.painting = true;
    edit.last = null;
    paintStroke(event);
  });
  mask.addEventListener("pointermove", (event) => {
    if (edit.painting) paintStroke(event);
  });
  for (const end of ["pointerup", "pointercancel"]) mask.addEventListener(end, () => { edit.painting = false; });
  $("clear-mask").addEventListener("click", clearMask);
  $("remove-image").addEventListener("click", removeImage);
  $("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
  $("use-strength").addEventListener("change", () => { $("strength").disabled = !$("use-strength").checked; });
}

document.addEventListener("DOMContentLoaded", () => {
  setupImageEditor();
  $("model").addEventListener("change", selectModel);
  $("controls").addEventListener("submit", generate);
  $("random-seed").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * 2 ** 31);
  });
  loadModels().catch((err) => showError(`cannot load the model list: ${err}`));
  checkHealth();
  setInterval(checkHealth, 5000);
});
