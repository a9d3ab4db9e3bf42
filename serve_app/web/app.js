// imgserve web page: pick an image, choose a task, run it as a job, follow its progress, see and
// download the result. Plain JavaScript against the public HTTP API (GET /v1/models, POST /v1/jobs,
// GET /v1/jobs/{id}/events as Server-Sent Events, GET /v1/jobs/{id}/result, DELETE /v1/jobs/{id}).
// An API key typed into the page is kept in localStorage and sent as `Authorization: Bearer`.
// No framework, no build step, nothing loaded from elsewhere. URLs are relative, so the page also
// works when the application is served under a route prefix.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const FINAL_STATES = ["succeeded", "failed", "cancelled"];
  const DIFFUSION_STAGES = ["preprocess", "encode_prompt", "denoise", "decode", "postprocess"];
  const STAGES = { real: DIFFUSION_STAGES, layers: DIFFUSION_STAGES, anime: ["preprocess", "stylize", "postprocess"] };
  const STAGE_LABELS = {
    preprocess: "preprocess", encode_prompt: "encode prompt", denoise: "denoise", decode: "decode",
    stylize: "stylize", postprocess: "postprocess",
  };
  const ERROR_TITLES = {
    bad_image: "This file is not an image the service can read",
    unsupported_format: "This kind of file is not accepted",
    too_large: "The image is too large",
    invalid_parameter: "A setting is not valid",
    queue_full: "The service is busy",
    unavailable: "The service is briefly unavailable",
    out_of_memory: "The image is too large for the GPU",
    not_found: "Not found",
    not_ready: "The result is not ready",
    unauthorized: "An API key is needed",
    rate_limited: "Too many requests",
    replica_lost: "The model stopped while working on this job",
    internal: "The service failed on this request",
    network: "The service cannot be reached",
  };
  const FIELD_LABELS = {
    image: "Image", task: "Task", lora: "LoRA version", prompt: "Prompt", negative_prompt: "Negative prompt",
    steps: "Steps", cfg: "CFG scale", seed: "Seed", style: "Style", layers: "Number of layers",
    resolution: "Resolution", format: "Output format", cfg_normalize: "CFG normalize",
  };
  // Result headers (X-Imgserve-*) shown under the result, in this order; others follow.
  const PARAM_LABELS = {
    task: "Task", lora: "LoRA version", style: "Style", layers: "Layers", resolution: "Resolution",
    size: "Processed size", "layer-size": "Layer size", steps: "Steps", cfg: "CFG scale", seed: "Seed",
    scale: "Resize factor", "lora-load": "LoRA load", replica: "Replica",
  };
  const EXTENSIONS = {
    "image/png": "png", "image/webp": "webp", "image/jpeg": "jpg", "application/zip": "zip",
    "image/vnd.adobe.photoshop": "psd",
  };

  const state = {
    models: null,
    file: null,
    fileUrl: null,
    job: null,        // {task, fields, file, fileName, fileUrl}, then id once submitted
    urls: [],         // object URLs of the shown result, revoked when the next one comes
    advanced: {},     // task → {steps, cfg, seed, format} as the user left them
    task: "real",
  };

  // -- the API key and requests -------------------------------------------------------------------
  const KEY_STORAGE = "imgserve.apiKey";

  function storedKey() {
    try { return localStorage.getItem(KEY_STORAGE) || ""; } catch (_) { return ""; }
  }

  function storeKey(key) {
    try { key ? localStorage.setItem(KEY_STORAGE, key) : localStorage.removeItem(KEY_STORAGE); } catch (_) { /* private mode */ }
  }

  // fetch() with the API key, when there is one.
  function api(url, options = {}) {
    const key = storedKey();
    const headers = key ? { ...options.headers, Authorization: `Bearer ${key}` } : options.headers;
    return fetch(url, { ...options, headers });
  }

  // EventSource cannot send headers: with a key, the event stream is read with fetch. It looks like an
  // EventSource to follow(): progress listeners, close(), onerror with readyState CLOSED at the end.
  function keyedEventSource(url) {
    const controller = new AbortController();
    const listeners = [];
    const source = {
      readyState: 0, onerror: null,
      addEventListener(type, fn) { if (type === "progress") listeners.push(fn); },
      close() { source.readyState = EventSource.CLOSED; controller.abort(); },
    };
    (async () => {
      try {
        const response = await api(url, { signal: controller.signal });
        if (!response.ok || !response.body) throw new Error(`status ${response.status}`);
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const lines = buffer.slice(0, end).split("\n");
            buffer = buffer.slice(end + 2);
            const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
            if (lines.includes("event: progress") && data) listeners.forEach((fn) => fn({ data }));
          }
        }
      } catch (_) { /* closed, or the stream failed: onerror below falls back to polling */ }
      if (source.readyState !== EventSource.CLOSED) {
        source.readyState = EventSource.CLOSED;
        if (source.onerror) source.onerror();
      }
    })();
    return source;
  }

  // -- small helpers ------------------------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    node.append(...children);
    return node;
  }

  function option(value, label, selected) {
    const node = el("option", { value, text: label });
    node.selected = Boolean(selected);
    return node;
  }

  // Python's round(): halves go to the even neighbour (what the service uses for sizes).
  function roundHalfEven(x) {
    const floor = Math.floor(x);
    const diff = x - floor;
    if (diff > 0.5) return floor + 1;
    if (diff < 0.5) return floor;
    return floor % 2 === 0 ? floor : floor + 1;
  }

  // The size the service processes an upload at: the long edge capped, aspect kept.
  function processedSize(width, height, longEdge) {
    if (Math.max(width, height) <= longEdge) return [width, height];
    const scale = longEdge / Math.max(width, height);
    if (width >= height) return [longEdge, Math.max(1, roundHalfEven(height * scale))];
    return [Math.max(1, roundHalfEven(width * scale)), longEdge];
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} bytes`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  function stem(name) {
    const base = (name || "image").replace(/\.[^.]*$/, "");
    return base.replace(/[^\w.-]+/g, "_") || "image";
  }

  function objectUrl(blob) {
    const url = URL.createObjectURL(blob);
    state.urls.push(url);
    return url;
  }

  // -- errors -------------------------------------------------------------------------------------
  // Every error response of the service is {"error": {"code", "message", "field"?}}.
  async function errorFrom(response) {
    let error = null;
    try {
      error = (await response.json()).error;
    } catch (_) { /* not JSON: described below */ }
    if (!error || typeof error !== "object") {
      error = { code: "http_error", message: `the service answered ${response.status} ${response.statusText}` };
    }
    const retryAfter = response.headers.get("retry-after");
    if (retryAfter) error.retryAfter = retryAfter;
    return error;
  }

  function showError(error) {
    const title = ERROR_TITLES[error.code] || "Something went wrong";
    let message = error.message || "";
    if (message) message = message[0].toUpperCase() + message.slice(1);
    if (message && !/[.!?)]$/.test(message)) message += ".";
    if (error.field && FIELD_LABELS[error.field]) message = `${FIELD_LABELS[error.field]}: ${message}`;
    if (error.retryAfter) message += ` Please try again in ${error.retryAfter} s.`;
    $("error-title").textContent = title;
    $("error-message").textContent = message;
    $("error").dataset.code = error.code || "";
    $("error").hidden = false;
    for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
    if (error.code === "unauthorized") $("api-key").setAttribute("aria-invalid", "true");
    if (error.field) {
      const fieldset = document.querySelector(`.task-fields[data-task="${state.task}"]`);
      const input = fieldset.querySelector(`[name="${error.field}"]`) || $("advanced").querySelector(`[name="${error.field}"]`);
      if (input) {
        input.setAttribute("aria-invalid", "true");
        if (input.closest("details")) input.closest("details").open = true;
      } else if (error.field === "image") {
        $("drop-zone").setAttribute("aria-invalid", "true");
      }
    }
  }

  function hideError() {
    $("error").hidden = true;
    for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  }

  function networkError(exc) {
    return { code: "network", message: `${exc.message || exc}` };
  }

  // -- models: what the form offers ---------------------------------------------------------------
  async function loadModels() {
    let response;
    try {
      response = await api("v1/models");
    } catch (exc) {
      showError(networkError(exc));
      return;
    }
    if (!response.ok) {
      showError(await errorFrom(response));
      return;
    }
    state.models = await response.json();
    const tasks = state.models.tasks;
    for (const radio of document.querySelectorAll('input[name="task"]')) {
      radio.disabled = !(radio.value in tasks);
    }
    if (tasks.real) {
      const lora = tasks.real.lora;
      $("real-lora").replaceChildren(...lora.versions.map(
        (v) => option(v, v === "none" ? "none (base model only)" : v, v === lora.default)));
      $("real-prompt").value = tasks.real.defaults.prompt;
      $("real-negative").value = tasks.real.defaults.negative_prompt || "";
    }
    if (tasks.anime) {
      $("anime-style").replaceChildren(...tasks.anime.styles.map(
        (s) => option(s, s.replaceAll("_", " "), s === tasks.anime.default_style)));
    }
    if (tasks.layers) {
      const layers = tasks.layers;
      Object.assign($("layers-count"), { value: layers.default_layers, max: layers.max_layers });
      $("layers-resolution").replaceChildren(...layers.resolutions.map(
        (r) => option(String(r), `${r} (about ${r}×${r} pixels)`, r === layers.default_resolution)));
    }
    for (const task of Object.keys(tasks)) state.advanced[task] = defaultsFor(task);
    const checked = document.querySelector('input[name="task"]:checked');
    switchTask(checked && !checked.disabled ? checked.value : Object.keys(tasks)[0], false);
    updateSubmit();
    if (state.file) describeImage();
  }

  function defaultsFor(task) {
    const info = state.models.tasks[task];
    if (task === "real") return { steps: info.defaults.steps, cfg: info.defaults.cfg, seed: "", format: info.formats[0] };
    if (task === "layers") return { steps: info.default_steps, cfg: info.default_cfg, seed: "", format: "zip" };
    return { steps: "", cfg: "", seed: "", format: info.formats[0] };
  }

  function limitsFor(task) {
    const info = state.models.tasks[task];
    if (task === "real") return { steps: info.limits.steps, cfg: info.limits.cfg };
    if (task === "layers") return { steps: [2, info.max_steps], cfg: [1, info.max_cfg] };
    return null;
  }

  function switchTask(task, remember = true) {
    if (remember && state.models && state.task in state.advanced) {
      state.advanced[state.task] = {
        steps: $("steps").value, cfg: $("cfg").value, seed: $("seed").value, format: $("format").value,
      };
    }
    state.task = task;
    for (const radio of document.querySelectorAll('input[name="task"]')) radio.checked = radio.value === task;
    for (const fieldset of document.querySelectorAll(".task-fields")) fieldset.hidden = fieldset.dataset.task !== task;
    if (!state.models) return;
    const values = state.advanced[task];
    const limits = limitsFor(task);
    for (const node of document.querySelectorAll(".diffusion")) node.hidden = !limits;
    if (limits) {
      Object.assign($("steps"), { min: limits.steps[0], max: limits.steps[1], value: values.steps });
      Object.assign($("cfg"), { min: limits.cfg[0], max: limits.cfg[1], value: values.cfg });
      $("seed").value = values.seed;
    }
    const formats = task === "layers" ? [] : state.models.tasks[task].formats;
    $("format").replaceChildren(...formats.map((f) => option(f, f.toUpperCase(), f === values.format)));
    document.querySelector(".image-format").hidden = formats.length === 0;
    $("advanced-note").textContent = {
      anime: "Anime runs one pass of the generator: no steps, CFG or seed.",
      layers: "Layers come as a ZIP of PNGs; the PSD is offered with the result.",
      real: "Seed blank: a random one, shown with the result.",
    }[task] || "";
  }

  // -- the image ----------------------------------------------------------------------------------
  function setFile(file) {
    if (!file) return;
    hideError();
    // a running job still shows this upload as its "before"
    if (state.fileUrl && !(state.job && state.job.fileUrl === state.fileUrl)) URL.revokeObjectURL(state.fileUrl);
    state.file = file;
    state.fileUrl = URL.createObjectURL(file);
    state.imageSize = null;
    $("drop-zone").classList.add("has-image");
    const preview = $("preview");
    preview.hidden = true;
    $("image-info").textContent = `${file.name} · ${formatBytes(file.size)}`;
    const probe = new Image();
    probe.onload = () => {
      if (state.file !== file) return;  // another file was chosen meanwhile
      state.imageSize = [probe.naturalWidth, probe.naturalHeight];
      preview.src = state.fileUrl;
      preview.alt = `Your image: ${file.name}`;
      preview.hidden = false;
      describeImage();
    };
    probe.onerror = () => state.file === file && describeImage();
    probe.src = state.fileUrl;
    updateSubmit();
  }

  function describeImage() {
    const file = state.file;
    const info = $("image-info");
    const parts = [file.name];
    if (state.imageSize) {
      const [w, h] = state.imageSize;
      parts.push(`${w} × ${h} px`);
      if (state.models) {
        const [pw, ph] = processedSize(w, h, state.models.max_long_edge);
        parts.push(pw === w && ph === h ? "processed at this size"
          : `processed at ${pw} × ${ph} px (long edge capped at ${state.models.max_long_edge})`);
      }
    } else {
      parts.push(formatBytes(file.size), "the browser cannot preview this file; the service checks it when you start");
    }
    info.textContent = parts.join(" · ");
    info.dataset.processed = "";
    if (state.imageSize && state.models) {
      info.dataset.processed = processedSize(...state.imageSize, state.models.max_long_edge).join("x");
    }
    if (state.models && file.size > state.models.max_bytes) {
      showError({ code: "too_large", field: "image",
        message: `the file has ${formatBytes(file.size)}; the limit is ${formatBytes(state.models.max_bytes)}` });
    }
  }

  function updateSubmit() {
    const tooBig = state.file && state.models && state.file.size > state.models.max_bytes;
    $("submit").disabled = !state.models || !state.file || Boolean(state.job) || Boolean(tooBig);
  }

  // -- submitting and following a job ---------------------------------------------------------------
  function formFields(task) {
    const fields = {};
    const fieldset = document.querySelector(`.task-fields[data-task="${task}"]`);
    for (const input of fieldset.querySelectorAll("[name]")) {
      if (input.value !== "") fields[input.name] = input.value;
    }
    if (limitsFor(task)) {
      for (const name of ["steps", "cfg", "seed"]) {
        if ($(name).value !== "") fields[name] = $(name).value;
      }
    }
    fields.format = task === "layers" ? "zip" : $("format").value;
    return fields;
  }

  // POST /v1/jobs; returns the job's status, or null after showing the error.
  async function postJob(task, fields, file) {
    const body = new FormData();
    body.append("task", task);
    for (const [key, value] of Object.entries(fields)) body.append(key, value);
    body.append("image", file, file.name);
    let response;
    try {
      response = await api("v1/jobs", { method: "POST", body });
    } catch (exc) {
      return { error: networkError(exc) };
    }
    if (!response.ok) return { error: await errorFrom(response) };
    return { status: await response.json() };
  }

  async function submit(event) {
    event.preventDefault();
    if (!state.file || state.job) return;
    hideError();
    clearResult();
    const task = state.task;
    const fields = formFields(task);
    state.job = { task, fields, file: state.file, fileName: state.file.name, fileUrl: state.fileUrl };
    updateSubmit();
    const { status, error } = await postJob(task, fields, state.file);
    if (error) {
      state.job = null;
      updateSubmit();
      showError(error);
      return;
    }
    const job = state.job;
    job.id = status.id;
    $("cancel").hidden = false;
    $("cancel").disabled = false;
    $("progress").hidden = false;
    $("progress").dataset.job = status.id;
    renderProgress(task, status);
    follow(status.id, (ev) => renderProgress(task, ev), () => finish(job));
  }

  // The job's events (Server-Sent Events) until its final state. EventSource reconnects by itself
  // after a dropped connection (the stream restarts from the job's first event); if the stream
  // cannot be had at all, the job's status is polled instead.
  function follow(id, onEvent, onFinal) {
    const url = `v1/jobs/${encodeURIComponent(id)}/events`;
    const source = storedKey() ? keyedEventSource(url) : new EventSource(url);
    let done = false;
    const end = () => {
      if (done) return;
      done = true;
      source.close();
      onFinal();
    };
    source.addEventListener("progress", (message) => {
      const event = JSON.parse(message.data);
      onEvent(event);
      if (FINAL_STATES.includes(event.state)) end();
    });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED && !done) poll(id, onEvent, end);
    };
    return source;
  }

  async function poll(id, onEvent, onFinal) {
    for (;;) {
      try {
        const response = await api(`v1/jobs/${encodeURIComponent(id)}`);
        if (response.ok) {
          const status = await response.json();
          onEvent(status);
          if (FINAL_STATES.includes(status.state)) return onFinal();
        } else if (response.status === 404) {
          showError(await errorFrom(response));
          return onFinal();
        }
      } catch (_) { /* the service is restarting: keep trying */ }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  function progressFraction(task, event) {
    if (event.state === "succeeded") return 1;
    const stages = STAGES[task] || DIFFUSION_STAGES;
    const index = stages.indexOf(event.stage);
    if (event.state !== "running" || index < 0) return 0;
    let within = 0;
    if (event.stage === "denoise" && event.step && event.total_steps) within = event.step / event.total_steps;
    return (index + within) / stages.length;
  }

  function describeEvent(event) {
    switch (event.state) {
      case "queued":
        return event.queue_position == null ? "Waiting in the queue"
          : `Waiting in the queue: position ${event.queue_position + 1}`
            + (event.queue_position === 0 ? " (next to start)" : ` (${event.queue_position} ahead)`);
      case "running":
        if (!event.stage || event.stage === "queued") return "Starting…";
        if (event.stage === "denoise" && event.step) return `Running: denoise, step ${event.step}/${event.total_steps}`;
        return `Running: ${STAGE_LABELS[event.stage] || event.stage}`;
      case "succeeded": return "Done";
      case "cancelled": return "Cancelled";
      case "failed": return "Failed";
      default: return event.state;
    }
  }

  function renderProgress(task, event) {
    $("progress").dataset.state = event.state;
    $("progress-state").textContent = describeEvent(event);
    const bar = $("progress-bar");
    bar.value = Math.round(progressFraction(task, event) * 100);
    const stages = STAGES[task] || DIFFUSION_STAGES;
    const current = event.state === "succeeded" ? stages.length
      : event.state === "running" ? stages.indexOf(event.stage) : -1;
    const list = $("stages");
    if (list.dataset.task !== task || list.children.length !== stages.length) {
      list.dataset.task = task;
      list.replaceChildren(...stages.map((stage) => el("li", { "data-stage": stage, text: STAGE_LABELS[stage] || stage })));
    }
    [...list.children].forEach((item, i) => {
      const stage = stages[i];
      item.className = i < current ? "done" : i === current ? "current" : "";
      let text = STAGE_LABELS[stage] || stage;
      if (stage === "denoise" && event.stage === "denoise" && event.step) text += ` ${event.step}/${event.total_steps}`;
      else if (stage === "denoise" && i < current && event.total_steps) text += ` ${event.total_steps}/${event.total_steps}`;
      item.textContent = text;
    });
    if (FINAL_STATES.includes(event.state)) $("cancel").hidden = true;
  }

  async function cancel() {
    const job = state.job;
    if (!job || !job.id) return;
    $("cancel").disabled = true;
    try {
      const response = await api(`v1/jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" });
      if (!response.ok) {
        showError(await errorFrom(response));
        return;
      }
      const status = await response.json();
      if (status.state === "running") $("progress-state").textContent = "Cancelling: the job stops after the current step…";
    } catch (exc) {
      showError(networkError(exc));
      $("cancel").disabled = false;
    }
  }

  async function finish(job) {
    let status;
    try {
      const response = await api(`v1/jobs/${encodeURIComponent(job.id)}`);
      if (!response.ok) throw await errorFrom(response);
      status = await response.json();
    } catch (error) {
      showError(error.code ? error : networkError(error));
      return done();
    }
    renderProgress(job.task, status);
    if (status.state === "failed") {
      showError(status.error || { code: "internal", message: "the job failed" });
    } else if (status.state === "succeeded") {
      try {
        const response = await api(`v1/jobs/${encodeURIComponent(job.id)}/result`);
        if (!response.ok) throw await errorFrom(response);
        await showResult(job, await response.blob(), response.headers);
      } catch (error) {
        showError(error.code ? error : { code: "internal", message: `the result could not be shown: ${error.message || error}` });
      }
    }
    done();

    function done() {
      $("cancel").hidden = true;
      state.job = null;
      updateSubmit();
    }
  }

  // -- the result ---------------------------------------------------------------------------------
  function clearResult() {
    for (const url of state.urls) URL.revokeObjectURL(url);
    state.urls = [];
    $("result").hidden = true;
    $("layers").hidden = true;
    $("layer-grid").replaceChildren();
    $("params").replaceChildren();
    $("download-psd").hidden = true;
    $("psd-state").textContent = "";
    $("after").removeAttribute("src");
    $("after").classList.remove("checker");
  }

  function resultParams(headers) {
    const params = {};
    for (const [key, value] of headers.entries()) {
      if (key.toLowerCase().startsWith("x-imgserve-")) params[key.toLowerCase().slice("x-imgserve-".length)] = value;
    }
    return params;
  }

  function renderParams(params, extra) {
    const rows = [];
    for (const key of Object.keys(PARAM_LABELS)) if (key in params) rows.push([key, PARAM_LABELS[key], params[key]]);
    for (const key of Object.keys(params)) if (!(key in PARAM_LABELS)) rows.push([key, key, params[key]]);
    for (const [key, label, value] of extra) rows.push([key, label, value]);
    $("params").replaceChildren(...rows.flatMap(([key, label, value]) => [
      el("dt", { "data-param": key, text: label }), el("dd", { "data-param": key, text: String(value) }),
    ]));
  }

  function loadImage(img, src) {
    return new Promise((resolve, reject) => {
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the browser could not display the image"));
      img.src = src;
    });
  }

  async function showResult(job, blob, headers) {
    const params = resultParams(headers);
    const ext = EXTENSIONS[blob.type.split(";")[0]] || "bin";
    const download = $("download");
    download.href = objectUrl(blob);
    download.download = `${stem(job.fileName)}-${job.task}.${ext}`;
    download.textContent = `Download ${ext.toUpperCase()}`;
    const extra = [];
    if (job.task === "real") {
      extra.push(["prompt", "Prompt", job.fields.prompt || "(default)"]);
      if ((job.fields.negative_prompt || "").trim()) extra.push(["negative_prompt", "Negative prompt", job.fields.negative_prompt]);
    }
    let afterSrc = download.href;
    if (job.task === "layers") {
      const { composite, manifest } = await showLayers(blob);
      afterSrc = composite;
      if (manifest && manifest.prompt !== undefined) {
        extra.push(["prompt", manifest.prompt_source === "caption" ? "Prompt (the model's caption)" : "Prompt", manifest.prompt]);
      }
      $("after").classList.add("checker");
      const psd = $("download-psd");
      psd.hidden = false;
      psd.disabled = false;
      psd.onclick = () => downloadPsd(job, params.seed, manifest && manifest.prompt, psd);
    }
    renderParams(params, extra);
    $("before").hidden = false;
    $("compare").classList.remove("after-only");
    loadImage($("before"), job.fileUrl).catch(() => $("compare").classList.add("after-only"));
    const after = await loadImage($("after"), afterSrc);
    $("result").style.setProperty("--aspect", String(after.naturalWidth / after.naturalHeight));
    $("result").hidden = false;
    $("result").dataset.task = job.task;
  }

  // A layers result is a ZIP: layer_00.png … (bottom first), composite.png, manifest.json. The
  // page reads it here, so one download gives the tiles, the composite and the ZIP button.
  async function showLayers(blob) {
    const entries = await readZip(blob);
    let manifest = null;
    if (entries.has("manifest.json")) {
      manifest = JSON.parse(new TextDecoder().decode(await unzipEntry(entries.get("manifest.json"))));
    }
    const files = manifest && Array.isArray(manifest.layers)
      ? manifest.layers.map((layer) => [layer.name, layer.file])
      : [...entries.keys()].filter((n) => /^layer_\d+\.png$/.test(n)).sort().map((n) => [n.replace(/\.png$/, ""), n]);
    const tiles = [];
    for (const [index, [name, file]] of files.entries()) {
      const url = objectUrl(new Blob([await unzipEntry(entries.get(file))], { type: "image/png" }));
      const img = el("img", { class: "checker", alt: `Layer ${index}: ${name}` });
      const where = index === 0 ? " (bottom)" : index === files.length - 1 ? " (top)" : "";
      const link = el("a", { href: url, download: file, class: "tile-download", text: "PNG" });
      tiles.push(el("figure", { class: "layer-tile", "data-layer": String(index) }, img,
        el("figcaption", {}, el("span", { text: `${name}${where}` }), link)));
      await loadImage(img, url);
    }
    $("layer-grid").replaceChildren(...tiles);
    $("layers").hidden = false;
    const composite = entries.has("composite.png")
      ? objectUrl(new Blob([await unzipEntry(entries.get("composite.png"))], { type: "image/png" }))
      : tiles.length ? tiles[tiles.length - 1].querySelector("img").src : "";
    return { composite, manifest };
  }

  // The PSD comes from the same request run again with format=psd, the seed and the prompt the first
  // run used (its caption, when it made one): the service gives the same layers for the same input,
  // parameters and seed. It is only made when asked for.
  async function downloadPsd(job, seed, prompt, button) {
    if (button.dataset.url) return saveUrl(button.dataset.url, `${stem(job.fileName)}-layers.psd`);
    button.disabled = true;
    const show = (text) => { $("psd-state").textContent = text; };
    const fields = { ...job.fields, format: "psd" };
    if (seed !== undefined) fields.seed = seed;
    if (prompt) fields.prompt = prompt;
    show("Preparing the PSD…");
    const { status, error } = await postJob("layers", fields, job.file);
    if (error) {
      show("");
      showError(error);
      button.disabled = false;
      return;
    }
    follow(status.id, (event) => show(`Preparing the PSD: ${describeEvent(event).toLowerCase()}`), async () => {
      try {
        const response = await api(`v1/jobs/${encodeURIComponent(status.id)}/result`);
        if (!response.ok) throw await errorFrom(response);
        button.dataset.url = objectUrl(await response.blob());
        show("PSD ready");
        saveUrl(button.dataset.url, `${stem(job.fileName)}-layers.psd`);
      } catch (err) {
        show("");
        showError(err.code ? err : networkError(err));
      } finally {
        button.disabled = false;
      }
    });
  }

  function saveUrl(url, name) {
    const link = el("a", { href: url, download: name });
    document.body.append(link);
    link.click();
    link.remove();
  }

  // -- a minimal ZIP reader (central directory; stored or deflated entries) -----------------------
  async function readZip(blob) {
    const bytes = new Uint8Array(await blob.arrayBuffer());
    const view = new DataView(bytes.buffer);
    let end = -1;
    for (let i = bytes.length - 22; i >= Math.max(0, bytes.length - 22 - 65535); i--) {
      if (view.getUint32(i, true) === 0x06054b50) { end = i; break; }
    }
    if (end < 0) throw new Error("the result is not a ZIP file");
    const count = view.getUint16(end + 10, true);
    let offset = view.getUint32(end + 16, true);
    const entries = new Map();
    const decoder = new TextDecoder();
    for (let n = 0; n < count; n++) {
      if (view.getUint32(offset, true) !== 0x02014b50) throw new Error("broken ZIP central directory");
      const method = view.getUint16(offset + 10, true);
      const size = view.getUint32(offset + 20, true);
      const nameLength = view.getUint16(offset + 28, true);
      const extraLength = view.getUint16(offset + 30, true);
      const commentLength = view.getUint16(offset + 32, true);
      const local = view.getUint32(offset + 42, true);
      const name = decoder.decode(bytes.subarray(offset + 46, offset + 46 + nameLength));
      const start = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
      entries.set(name, { method, data: bytes.subarray(start, start + size) });
      offset += 46 + nameLength + extraLength + commentLength;
    }
    return entries;
  }

  async function unzipEntry(entry) {
    if (!entry) throw new Error("a file named in the manifest is missing from the ZIP");
    if (entry.method === 0) return entry.data;
    if (entry.method === 8) {
      const stream = new Blob([entry.data]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
      return new Uint8Array(await new Response(stream).arrayBuffer());
    }
    throw new Error(`ZIP compression method ${entry.method} is not supported`);
  }

  // -- wiring -------------------------------------------------------------------------------------
  function init() {
    const zone = $("drop-zone");
    $("file").addEventListener("change", (e) => setFile(e.target.files[0]));
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("dragging"); });
    }
    for (const type of ["dragleave", "drop"]) {
      zone.addEventListener(type, () => zone.classList.remove("dragging"));
    }
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      if (e.dataTransfer.files.length) setFile(e.dataTransfer.files[0]);
    });
    for (const radio of document.querySelectorAll('input[name="task"]')) {
      radio.addEventListener("change", () => radio.checked && switchTask(radio.value));
    }
    $("job-form").addEventListener("submit", submit);
    $("cancel").addEventListener("click", cancel);
    $("api-key").value = storedKey();
    $("api-key").addEventListener("change", (e) => {
      storeKey(e.target.value.trim());
      hideError();
      loadModels();
    });
    $("compare-slider").addEventListener("input", (e) => {
      $("compare").style.setProperty("--split", `${e.target.value}%`);
    });
    loadModels();
  }

  init();
})();
