// imgserve web page: pick an image, choose a task, run it as a job, follow its progress, see and
// download the result. Plain JavaScript against the public HTTP API (GET /v1/models, GET openapi.json,
// POST /v1/jobs, GET /v1/jobs/{id}/events as Server-Sent Events, GET /v1/jobs/{id}/result,
// DELETE /v1/jobs/{id}).
// The page names no task: the tasks are the service's (/v1/models, in its order), each with the
// summary and the request fields of its `POST /v1/{task}` operation in openapi.json (JSON schemas:
// type, description, minimum, maximum, default, enum, maxLength). Controls, stages and the result
// view are chosen by field names, formats and media types.
// An API key typed into the page is kept in localStorage and sent as `Authorization: Bearer`.
// No framework, no build step, nothing loaded from elsewhere. URLs are relative, so the page also
// works when the application is served under a route prefix.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const FINAL_STATES = ["succeeded", "failed", "cancelled"];
  // A task with a `steps` field denoises: these stages. Any other task starts with the first and last
  // of them and shows each further stage its job reports, in the order they come, before the last.
  const DIFFUSION_STAGES = ["preprocess", "encode_prompt", "denoise", "decode", "postprocess"];
  const ONE_PASS_STAGES = ["preprocess", "postprocess"];
  // Fields every task shows in the shared "Advanced parameters" area (fixed ids there), in this order.
  const ADVANCED = ["steps", "cfg", "seed", "cfg_normalize", "format"];
  // generic request fields the page does not offer: `size` (the result keeps the upload's size within the limit)
  const NOT_OFFERED = ["size"];
  // A ZIP result (layer PNGs) is read and shown by the page; a task offering it also gets its other
  // formats (PSD) made on request, from the same parameters.
  const ZIP = "zip";
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
    resolution: "Resolution", format: "Output format", cfg_normalize: "CFG normalize", preset: "Speed",
    lora_scale: "LoRA weight",
  };
  // How a choice (`enum`) of a field is shown; other fields show the value itself.
  const OPTION_LABELS = {
    lora: (v) => (v === "none" ? "none (base model only)" : v),
    style: (v) => v.replaceAll("_", " "),
    resolution: (v) => `${v} (about ${v}×${v} pixels)`,
    format: (v) => v.toUpperCase(),
  };
  // Placeholders by field name; BLANK_PLACEHOLDERS only where the field has no default.
  const PLACEHOLDERS = { seed: "random", negative_prompt: "(blank: nothing in particular avoided)" };
  const BLANK_PLACEHOLDERS = { prompt: "(blank: the model describes the image itself)" };
  const NUMBER_STEPS = { cfg: "0.5" };  // other numbers: "any"; integers: 1
  // Result headers (X-Imgserve-*) shown under the result, in this order; others follow.
  const PARAM_LABELS = {
    task: "Task", lora: "LoRA version", style: "Style", layers: "Layers", resolution: "Resolution",
    size: "Processed size", "layer-size": "Layer size", steps: "Steps", cfg: "CFG scale", seed: "Seed",
    scale: "Resize factor", preset: "Speed", adapters: "Adapters", "lora-load": "LoRA load", replica: "Replica",
  };
  const EXTENSIONS = {
    "image/png": "png", "image/webp": "webp", "image/jpeg": "jpg", "application/zip": "zip",
    "image/vnd.adobe.photoshop": "psd",
  };

  const state = {
    models: null,
    tasks: {},        // task → {summary, fields: {field: JSON schema}} from openapi.json
    file: null,
    fileUrl: null,
    job: null,        // {task, fields, stages, file, fileName, fileUrl}, then id once submitted
    urls: [],         // object URLs of the shown result, revoked when the next one comes
    advanced: {},     // task → {steps, cfg, seed, cfg_normalize, format} as the user left them
    task: null,
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

  function capitalised(text) {
    return text ? text[0].toUpperCase() + text.slice(1) : text;
  }

  // A field's label: the table's, else its name in words.
  function fieldLabel(name) {
    return FIELD_LABELS[name] || capitalised(name.replaceAll("_", " "));
  }

  function stageLabel(stage) {
    return stage.replaceAll("_", " ");
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
  // Every error response of the service is {"error": {"code", "message", "field"?, "type", "param"}}.
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
    if (error.field) message = `${fieldLabel(error.field)}: ${message}`;
    if (error.retryAfter) message += ` Please try again in ${error.retryAfter} s.`;
    $("error-title").textContent = title;
    $("error-message").textContent = message;
    $("error").dataset.code = error.code || "";
    $("error").hidden = false;
    for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
    if (error.code === "unauthorized") $("api-key").setAttribute("aria-invalid", "true");
    if (error.field) {
      const input = $(`${state.task}-${error.field}`) || (ADVANCED.includes(error.field) ? $(error.field) : null);
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

  // -- the tasks and their fields: what the form offers ---------------------------------------------
  async function getJson(url) {
    const response = await api(url);
    if (!response.ok) throw await errorFrom(response);
    return response.json();
  }

  async function loadModels() {
    let models, doc;
    try {
      [models, doc] = await Promise.all([getJson("v1/models"), getJson("openapi.json")]);
    } catch (error) {
      showError(error && error.code ? error : networkError(error));
      return;
    }
    state.models = models;
    state.tasks = tasksFrom(doc, models);
    buildForm();
    state.advanced = {};
    const names = Object.keys(state.tasks);
    for (const task of names) state.advanced[task] = advancedDefaults(task);
    switchTask(names.includes(state.task) ? state.task : names[0], false);
    updateSubmit();
    if (state.file) describeImage();
  }

  // Each task /v1/models lists, with the summary and the multipart fields of its `POST /v1/{task}`
  // operation (marked `x-imgserve-task`; found by that mark, so a route prefix does not matter).
  function tasksFrom(doc, models) {
    const described = {};
    for (const item of Object.values((doc && doc.paths) || {})) {
      const operation = item && item.post;
      const meta = operation && operation["x-imgserve-task"];
      if (!meta || !meta.name) continue;
      const form = ((operation.requestBody || {}).content || {})["multipart/form-data"];
      const fields = { ...(((form || {}).schema || {}).properties || {}) };
      delete fields.image;
      described[meta.name] = { summary: meta.summary || "", fields };
    }
    const tasks = {};
    for (const [name, info] of Object.entries(models.tasks)) {
      const formats = info.formats || [];
      tasks[name] = described[name]
        || { summary: "", fields: { format: { type: "string", enum: formats, default: formats[0] } } };
    }
    return tasks;
  }

  function fieldsOf(task) {
    return (state.tasks[task] || { fields: {} }).fields;
  }

  function formatsOf(task) {
    return (fieldsOf(task).format || {}).enum || [];
  }

  // A task offering a ZIP is run as a ZIP; its other formats (PSD) are made on request, with the result.
  function offeredFormats(task) {
    const formats = formatsOf(task);
    return formats.includes(ZIP) ? formats.filter((f) => f !== ZIP) : [];
  }

  // A field's default, from its schema. A blank text counts as none.
  function defaultOf(task, name) {
    const value = (fieldsOf(task)[name] || {}).default;
    if (value === null || (typeof value === "string" && !value.trim())) return undefined;
    return value;
  }

  // min, max and step of a number input from a field's schema.
  function configureNumber(input, name, schema, value) {
    input.step = schema.type === "integer" ? "1" : NUMBER_STEPS[name] || "any";
    for (const [attribute, keyword] of [["min", "minimum"], ["max", "maximum"]]) {
      if (schema[keyword] === undefined) input.removeAttribute(attribute);
      else input.setAttribute(attribute, String(schema[keyword]));
    }
    input.value = value === undefined || value === null ? "" : String(value);
  }

  function placeholderFor(name, schema, value) {
    if (PLACEHOLDERS[name]) return PLACEHOLDERS[name];
    if (value !== undefined) return "";
    if (BLANK_PLACEHOLDERS[name]) return BLANK_PLACEHOLDERS[name];
    return schema.type === "string" && schema.description ? schema.description : "";
  }

  // A task's presets (GET /v1/models: `presets.choices`, name → the steps and cfg it defaults to).
  function presetChoices(task) {
    const info = (state.models && state.models.tasks[task]) || {};
    return (info.presets && info.presets.choices) || {};
  }

  function presetLabel(task, name) {
    const choice = presetChoices(task)[name];
    if (!choice) return name;
    return `${name} (${choice.steps} steps, ${choice.cfg > 1 ? `CFG ${choice.cfg}` : "no CFG"})`;
  }

  // Choosing a preset sets the steps and CFG it stands for; the user may still change them.
  function applyPreset(task, name) {
    const choice = presetChoices(task)[name];
    if (!choice) return;
    for (const field of ["steps", "cfg"]) {
      if (choice[field] === undefined || !(field in fieldsOf(task))) continue;
      state.advanced[task][field] = choice[field];
      if (state.task === task) $(field).value = String(choice[field]);
    }
  }

  // One field of a task, from its JSON schema: {label, long} (long: a text, shown after the others).
  function fieldControl(task, name, schema) {
    const value = defaultOf(task, name);
    let input;
    let long = false;
    if (Array.isArray(schema.enum)) {
      const show = name === "preset" ? (v) => presetLabel(task, v) : OPTION_LABELS[name] || String;
      input = el("select");
      input.append(...schema.enum.map((v) => option(String(v), show(String(v)), String(v) === String(value))));
      if (name === "preset") input.addEventListener("change", () => applyPreset(task, input.value));
    } else if (schema.type === "boolean") {
      input = el("input", { type: "checkbox" });
      input.checked = value === true;
    } else if (schema.type === "integer" || schema.type === "number") {
      input = el("input", { type: "number" });
      configureNumber(input, name, schema, value);
    } else {
      long = true;
      input = name.endsWith("prompt") ? el("textarea", { rows: value === undefined ? "2" : "3" }) : el("input", { type: "text" });
      input.value = value === undefined ? "" : String(value);
      if (schema.maxLength !== undefined) input.maxLength = schema.maxLength;
    }
    input.id = `${task}-${name}`;
    input.name = name;
    const placeholder = placeholderFor(name, schema, value);
    if (placeholder && input.tagName !== "SELECT" && input.type !== "checkbox") input.placeholder = placeholder;
    if (schema.description) input.title = schema.description;
    const label = input.type === "checkbox"
      ? el("label", { class: "check" }, input, ` ${fieldLabel(name)}`)
      : el("label", {}, `${fieldLabel(name)} `, input);
    return { label, long };
  }

  // The task radios and one fieldset per task with its own fields (the shared ones: ADVANCED).
  function buildForm() {
    const radios = [];
    const fieldsets = [];
    for (const [task, info] of Object.entries(state.tasks)) {
      const radio = el("input", { type: "radio", name: "task", value: task });
      radio.addEventListener("change", () => radio.checked && switchTask(task));
      const label = el("label", {}, radio, " ", el("b", { text: capitalised(task) }));
      if (info.summary) label.append(" ", el("small", { text: info.summary }));
      radios.push(label);
      const controls = Object.entries(info.fields)
        .filter(([name]) => !ADVANCED.includes(name) && !NOT_OFFERED.includes(name))
        .map(([name, schema]) => fieldControl(task, name, schema));
      // choices, numbers and switches first, then the texts (a stable sort keeps the schema's order)
      controls.sort((a, b) => Number(a.long) - Number(b.long));
      const fieldset = el("fieldset", { class: "task-fields", "data-task": task },
        el("legend", { text: capitalised(task) }), ...controls.map((c) => c.label));
      fieldset.hidden = true;
      fieldsets.push(fieldset);
    }
    $("tasks").replaceChildren(...radios);
    $("task-fields").replaceChildren(...fieldsets);
  }

  function advancedDefaults(task) {
    const values = {};
    const fields = fieldsOf(task);
    for (const name of ADVANCED) {
      if (!(name in fields)) continue;
      if (name === "format") values.format = formatsOf(task).includes(ZIP) ? ZIP : defaultOf(task, name) ?? formatsOf(task)[0];
      else values[name] = defaultOf(task, name) ?? "";
    }
    return values;
  }

  // The shared advanced inputs the task has: name → value (a checkbox: true/false).
  function readAdvanced(task) {
    const values = {};
    for (const name of ADVANCED) {
      if (!(name in fieldsOf(task))) continue;
      const input = $(name);
      values[name] = input.type === "checkbox" ? input.checked : input.value;
    }
    return values;
  }

  function advancedNote(task) {
    const fields = fieldsOf(task);
    if (!fields.steps) return "One pass of the model: no steps, CFG or seed.";
    const others = offeredFormats(task);
    if (formatsOf(task).includes(ZIP)) {
      return others.length
        ? `Layers come as a ZIP of PNGs; the ${others.map((f) => f.toUpperCase()).join(" or ")} is offered with the result.`
        : "Layers come as a ZIP of PNGs.";
    }
    return "Seed blank: a random one, shown with the result.";
  }

  function switchTask(task, remember = true) {
    if (remember && state.models && state.task in state.advanced) {
      const kept = readAdvanced(state.task);
      if (formatsOf(state.task).includes(ZIP)) delete kept.format;
      Object.assign(state.advanced[state.task], kept);
    }
    state.task = task;
    for (const radio of document.querySelectorAll('input[name="task"]')) radio.checked = radio.value === task;
    for (const fieldset of document.querySelectorAll(".task-fields")) fieldset.hidden = fieldset.dataset.task !== task;
    if (!state.models) return;
    const fields = fieldsOf(task);
    const values = state.advanced[task];
    const zip = formatsOf(task).includes(ZIP);
    for (const name of ADVANCED) {
      const schema = fields[name];
      const shown = Boolean(schema) && !(name === "format" && zip);
      document.querySelector(`.advanced-grid [data-field="${name}"]`).hidden = !shown;
      const input = $(name);
      if (!shown) continue;
      if (name === "format") {
        input.replaceChildren(...formatsOf(task).map((f) => option(f, OPTION_LABELS.format(f), f === values.format)));
      } else if (input.type === "checkbox") {
        input.checked = values[name] === true;
      } else {
        configureNumber(input, name, schema, values[name]);
      }
      input.title = schema.description || "";
    }
    $("advanced-note").textContent = advancedNote(task);
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
  // The task's fields as the form has them: blanks left out (the service's defaults), a checkbox
  // "true"/"false"; a ZIP task is run as a ZIP.
  function formFields(task) {
    const fields = {};
    const read = (input) => {
      if (input.type === "checkbox") fields[input.name] = input.checked ? "true" : "false";
      else if (input.value !== "") fields[input.name] = input.value;
    };
    const fieldset = document.querySelector(`.task-fields[data-task="${task}"]`);
    for (const input of fieldset.querySelectorAll("[name]")) read(input);
    const schemas = fieldsOf(task);
    for (const name of ADVANCED) if (name !== "format" && name in schemas) read($(name));
    if ("format" in schemas) fields.format = formatsOf(task).includes(ZIP) ? ZIP : $("format").value;
    return fields;
  }

  // The stages a job of `task` shows before its events say more.
  function initialStages(task) {
    return [...("steps" in fieldsOf(task) ? DIFFUSION_STAGES : ONE_PASS_STAGES)];
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
    state.job = { task, fields, stages: initialStages(task), file: state.file, fileName: state.file.name,
      fileUrl: state.fileUrl };
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
    renderProgress(job, status);
    follow(status.id, (ev) => renderProgress(job, ev), () => finish(job));
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

  function progressFraction(stages, event) {
    if (event.state === "succeeded") return 1;
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
        return `Running: ${stageLabel(event.stage)}`;
      case "succeeded": return "Done";
      case "cancelled": return "Cancelled";
      case "failed": return "Failed";
      default: return event.state;
    }
  }

  // A stage the list does not have yet (a one-pass model's own, e.g. stylize) goes before the last.
  function noteStage(stages, event) {
    const stage = event.state === "running" ? event.stage : null;
    if (!stage || stage === "queued" || stages.includes(stage)) return;
    const last = stages.indexOf("postprocess");
    stages.splice(last < 0 ? stages.length : last, 0, stage);
  }

  function renderProgress(job, event) {
    const stages = job.stages;
    noteStage(stages, event);
    $("progress").dataset.state = event.state;
    $("progress-state").textContent = describeEvent(event);
    const bar = $("progress-bar");
    bar.value = Math.round(progressFraction(stages, event) * 100);
    const current = event.state === "succeeded" ? stages.length
      : event.state === "running" ? stages.indexOf(event.stage) : -1;
    const list = $("stages");
    if (list.dataset.stages !== stages.join(" ")) {
      list.dataset.stages = stages.join(" ");
      list.replaceChildren(...stages.map((stage) => el("li", { "data-stage": stage, text: stageLabel(stage) })));
    }
    [...list.children].forEach((item, i) => {
      const stage = stages[i];
      item.className = i < current ? "done" : i === current ? "current" : "";
      let text = stageLabel(stage);
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
    renderProgress(job, status);
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
    $("layer-view").hidden = true;
    $("layer-grid").replaceChildren();
    $("params").replaceChildren();
    for (const node of document.querySelectorAll(".downloads [data-format]")) node.remove();
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
    for (const key of Object.keys(params)) if (!(key in PARAM_LABELS)) rows.push([key, fieldLabel(key), params[key]]);
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

  // Media types the browser shows as an image (a PSD is an image/* type it cannot show).
  function viewable(type) {
    return type.startsWith("image/") && type !== "image/vnd.adobe.photoshop";
  }

  // By the result's media type: a ZIP of layers → the tiles and their composite; an image → before
  // and after; anything else → its download only.
  async function showResult(job, blob, headers) {
    const params = resultParams(headers);
    const type = blob.type.split(";")[0].trim().toLowerCase();
    const ext = EXTENSIONS[type] || "bin";
    const download = $("download");
    download.href = objectUrl(blob);
    download.download = `${stem(job.fileName)}-${job.task}.${ext}`;
    download.textContent = `Download ${ext.toUpperCase()}`;
    const schemas = fieldsOf(job.task);
    const extra = [];
    let afterSrc = viewable(type) ? download.href : null;
    let manifest = null;
    if (type === "application/zip") {
      const view = await showLayers(blob);
      manifest = view.manifest;
      afterSrc = view.composite;
      $("after").classList.add("checker");
      for (const format of offeredFormats(job.task)) offerFormat(job, format, params, manifest);
    }
    if (manifest && manifest.prompt !== undefined) {
      extra.push(["prompt", manifest.prompt_source === "caption" ? "Prompt (the model's caption)" : "Prompt", manifest.prompt]);
    } else if ("prompt" in schemas) {
      extra.push(["prompt", "Prompt", job.fields.prompt || "(default)"]);
    }
    if ("negative_prompt" in schemas && (job.fields.negative_prompt || "").trim()) {
      extra.push(["negative_prompt", "Negative prompt", job.fields.negative_prompt]);
    }
    renderParams(params, extra);
    const compare = $("compare");
    compare.hidden = !afterSrc;
    $("compare-slider").closest("label").hidden = !afterSrc;
    if (afterSrc) {
      $("before").hidden = false;
      compare.classList.remove("after-only");
      loadImage($("before"), job.fileUrl).catch(() => compare.classList.add("after-only"));
      const after = await loadImage($("after"), afterSrc);
      $("result").style.setProperty("--aspect", String(after.naturalWidth / after.naturalHeight));
    }
    $("result").hidden = false;
    $("result").dataset.task = job.task;
  }

  // A ZIP result holds layers: layer_00.png … (bottom first), composite.png, manifest.json. The
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
    $("layer-view").hidden = false;
    const composite = entries.has("composite.png")
      ? objectUrl(new Blob([await unzipEntry(entries.get("composite.png"))], { type: "image/png" }))
      : tiles.length ? tiles[tiles.length - 1].querySelector("img").src : "";
    return { composite, manifest };
  }

  // A button for another format of a ZIP task (PSD), next to the ZIP's, with its state beside it.
  function offerFormat(job, format, params, manifest) {
    const button = el("button", { id: `download-${format}`, type: "button", class: "button rerun",
      "data-format": format, text: `Download ${format.toUpperCase()}` });
    const status = el("span", { id: `${format}-state`, class: "info", "aria-live": "polite", "data-format": format });
    button.onclick = () => downloadAs(job, format, params.seed, manifest && manifest.prompt, button, status);
    $("download").closest(".downloads").append(button, status);
  }

  // Another format comes from the same request run again with that format, the seed and the prompt
  // the first run used (its caption, when it made one): the service gives the same layers for the
  // same input, parameters and seed. It is only made when asked for.
  async function downloadAs(job, format, seed, prompt, button, status) {
    const name = `${stem(job.fileName)}-${job.task}.${format}`;
    if (button.dataset.url) return saveUrl(button.dataset.url, name);
    const label = format.toUpperCase();
    button.disabled = true;
    const show = (text) => { status.textContent = text; };
    const schemas = fieldsOf(job.task);
    const fields = { ...job.fields, format };
    if (seed !== undefined && "seed" in schemas) fields.seed = seed;
    if (prompt && "prompt" in schemas) fields.prompt = prompt;
    show(`Preparing the ${label}…`);
    const { status: queued, error } = await postJob(job.task, fields, job.file);
    if (error) {
      show("");
      showError(error);
      button.disabled = false;
      return;
    }
    follow(queued.id, (event) => show(`Preparing the ${label}: ${describeEvent(event).toLowerCase()}`), async () => {
      try {
        const response = await api(`v1/jobs/${encodeURIComponent(queued.id)}/result`);
        if (!response.ok) throw await errorFrom(response);
        button.dataset.url = objectUrl(await response.blob());
        show(`${label} ready`);
        saveUrl(button.dataset.url, name);
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
