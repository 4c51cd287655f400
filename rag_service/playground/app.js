// rag-service playground: one ES module, no dependencies, no build step.
//
// Every call goes to this service's own HTTP API (/health, /ready, /v1/...). With a key set,
// calls carry "Authorization: Bearer <key>"; a 401 from any call opens the key prompt, and the
// call is retried once a key is entered (calls waiting at the same time share one prompt).
// Text from the service is put into the page with textContent and DOM nodes only, never as
// HTML, so a document cannot inject markup or script.

const KEY_STORAGE = "rag-service.api-key";
const COLLECTION_STORAGE = "rag-service.collection";

const $ = (id) => document.getElementById(id);

const storage = {
  get(name) {
    try { return localStorage.getItem(name) || ""; } catch { return ""; }
  },
  set(name, value) {
    try {
      if (value) localStorage.setItem(name, value); else localStorage.removeItem(name);
    } catch { /* storage disabled: the value lasts until the page is closed */ }
  },
};

const state = {
  key: storage.get(KEY_STORAGE),
  collection: storage.get(COLLECTION_STORAGE),
  collections: [],
  history: [], // the conversation sent with each chat request: [{role, content}]
  abort: null, // the AbortController of the answer being streamed
  ready: false,
};

// ---- small helpers ----------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status = 0, code = null, param = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

function errorFrom(status, body, fallback) {
  const error = body && body.error;
  if (error && error.message) return new ApiError(error.message, status, error.code, error.param);
  return new ApiError(fallback || `The service answered HTTP ${status}`, status);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name === "testid") node.dataset.testid = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function formatScore(value) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(3) : String(value);
}

/** "p. 14" or "pp. 14-15" from a result's or source's page fields (or its metadata's). */
function pageLabel(item) {
  const meta = item.metadata || {};
  const page = item.page ?? meta.page;
  if (page === undefined || page === null || page === "") return "";
  const end = item.page_end ?? meta.page_end;
  if (end !== undefined && end !== null && end !== "" && String(end) !== String(page)) {
    return `pp. ${page}-${end}`;
  }
  return `p. ${page}`;
}

function sectionOf(item) {
  const section = item.section ?? (item.metadata || {}).section;
  return typeof section === "string" ? section : section ? String(section) : "";
}

/** Metadata as "key: value" pairs, short, leaving out what is shown elsewhere. */
function compactMetadata(metadata) {
  const skip = new Set(["page", "page_end", "section"]);
  const parts = [];
  for (const [key, raw] of Object.entries(metadata || {})) {
    if (skip.has(key) || raw === null || raw === undefined || raw === "") continue;
    let value = typeof raw === "object" ? JSON.stringify(raw) : String(raw);
    if (value.length > 80) value = `${value.slice(0, 77)}…`;
    parts.push(`${key}: ${value}`);
    if (parts.length === 6) break;
  }
  return parts.join(" · ");
}

/** The path of a document: each segment of its id encoded, the "/" between them kept. */
function documentPath(collection, id) {
  const segments = id.split("/").map(encodeURIComponent).join("/");
  return `/v1/collections/${encodeURIComponent(collection)}/documents/${segments}`;
}

function collectionPath(collection, tail = "") {
  return `/v1/collections/${encodeURIComponent(collection)}${tail}`;
}

const WORD = /[\p{L}\p{N}_]+/gu;
// Words too common to be worth marking in every line of a passage.
const COMMON = new Set(("the and for are was were with that this these those from have has had "
  + "not but you your what which who whom whose when where why how can does did its into "
  + "than then them they there their our out all any").split(" "));

/** ``text`` as DOM nodes with the query's words (3 letters or more, whole words, any case,
 * the most common English words left out) in <mark>. */
function highlighted(text, query) {
  const words = [...new Set((query.match(WORD) || [])
    .filter((w) => w.length >= 3 && !COMMON.has(w.toLowerCase())))]
    .map((w) => w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"))
    .sort((a, b) => b.length - a.length);
  const fragment = document.createDocumentFragment();
  if (!words.length) {
    fragment.append(text);
    return fragment;
  }
  const pattern = new RegExp(`(?<![\\p{L}\\p{N}_])(${words.join("|")})(?![\\p{L}\\p{N}_])`, "giu");
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > last) fragment.append(text.slice(last, match.index));
    fragment.append(el("mark", { text: match[0] }));
    last = match.index + match[0].length;
  }
  if (last < text.length) fragment.append(text.slice(last));
  return fragment;
}

let toastTimer = null;
function toast(message) {
  const box = $("toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.hidden = true; }, 7000);
}

// ---- the API key ------------------------------------------------------------------------

let keyRequest = null; // {promise, resolve, reject} while calls wait for a key

function authHeaders() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

function renderKeyButton() {
  $("key-button-label").textContent = state.key ? "API key ✓" : "API key";
  $("key-button").title = state.key ? "A key is stored in this browser" : "No key set";
}

function openKeyDialog(message) {
  $("key-message").textContent = message;
  $("key-input").value = "";
  $("key-forget").hidden = !state.key;
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

/** Resolves once the person has entered a key (calls refused with 401 wait on it). */
function askForKey(reason) {
  if (!keyRequest) {
    let resolve;
    let reject;
    const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
    keyRequest = { promise, resolve, reject };
    const why = reason ? ` (${reason})` : "";
    openKeyDialog(state.key
      ? `The service refused the stored key${why}. Enter another one.`
      : `This service needs an API key${why}.`);
  }
  return keyRequest.promise;
}

function saveKey(event) {
  event.preventDefault();
  const value = $("key-input").value.trim();
  if (!value) {
    $("key-input").focus();
    return;
  }
  state.key = value;
  storage.set(KEY_STORAGE, value);
  renderKeyButton();
  const pending = keyRequest;
  keyRequest = null;
  $("key-dialog").close("saved");
  if (pending) pending.resolve();
  else loadAll();
}

function forgetKey() {
  state.key = "";
  storage.set(KEY_STORAGE, "");
  renderKeyButton();
  $("key-forget").hidden = true;
  if (keyRequest) {
    $("key-message").textContent = "Key forgotten. This service needs one to continue.";
    return;
  }
  $("key-dialog").close("forgotten");
  loadAll();
}

function keyDialogClosed() {
  // A close event that comes after the prompt opened again (calls refused the new key) is
  // stale: the new prompt stays.
  if (!keyRequest || $("key-dialog").open) return;
  const pending = keyRequest;
  keyRequest = null;
  pending.reject(new ApiError("An API key is needed: use the API key button", 401, "no_key"));
}

// ---- calling the API --------------------------------------------------------------------

async function readJson(response) {
  const text = await response.text();
  if (!text) return null;
  try { return JSON.parse(text); } catch { return null; }
}

async function send(path, { method = "GET", body, signal, accept = "application/json" } = {}) {
  for (;;) {
    const headers = { Accept: accept, ...authHeaders() };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
        cache: "no-store",
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(`The service cannot be reached (${err.message})`, 0, "network_error");
    }
    if (response.status === 401) {
      const data = await readJson(response);
      await askForKey(data && data.error && data.error.message);
      continue; // again, with the new key
    }
    if (!response.ok) {
      throw errorFrom(response.status, await readJson(response), `${method} ${path}`);
    }
    return response;
  }
}

async function api(path, options = {}) {
  const response = await send(path, options);
  return response.status === 204 ? null : readJson(response);
}

/** The ``data:`` payloads of a server-sent event stream, one string per event. */
async function* serverEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        let line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
      }
    }
    if (data.length) yield data.join("\n");
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---- status -----------------------------------------------------------------------------

let statusTimer = null;

function setStatus(kind, text, detail = "") {
  const box = $("status");
  box.dataset.state = kind;
  $("status-text").textContent = text;
  box.title = detail || text;
}

async function refreshStatus() {
  clearTimeout(statusTimer);
  let next = 30000;
  try {
    const health = await fetch("/health", { cache: "no-store" });
    if (!health.ok) throw new Error(`HTTP ${health.status}`);
    const ready = await fetch("/ready", { cache: "no-store" });
    const info = await readJson(ready);
    if (ready.ok && info) {
      const model = String(info.embedding_model || "").split("/").pop();
      setStatus("ready", model ? `Ready · ${model} on ${info.device || "?"}` : "Ready",
        `GET /ready: ${JSON.stringify(info)}`);
      if (!state.ready) {
        state.ready = true;
        loadAll();
      }
    } else {
      state.ready = false;
      const message = (info && info.error && info.error.message) || "loading";
      setStatus("loading", `Starting · ${message}`, message);
      next = 2000;
    }
  } catch (err) {
    state.ready = false;
    setStatus("down", "Service unreachable", String(err.message || err));
    next = 5000;
  }
  statusTimer = setTimeout(refreshStatus, next);
}

// ---- collections ------------------------------------------------------------------------

function selectedCollection() {
  return state.collections.find((c) => c.name === state.collection) || null;
}

function renderCollections() {
  const select = $("collection-select");
  select.replaceChildren();
  if (!state.collections.length) {
    select.append(el("option", { value: "", text: "No collections yet: create one" }));
    select.disabled = true;
  } else {
    for (const c of state.collections) {
      const label = `${c.name} (${plural(c.documents, "doc")}, ${plural(c.chunks, "chunk")})`;
      select.append(el("option", { value: c.name, text: label }));
    }
    select.disabled = false;
    select.value = state.collection;
  }
  renderCollectionStats();
}

function renderCollectionStats() {
  const c = selectedCollection();
  const stats = $("collection-stats");
  if (!c) {
    stats.textContent = state.collections.length ? "" : "Create a collection, then add files.";
  } else {
    const model = c.embedding_model ? ` · ${String(c.embedding_model).split("/").pop()}` : "";
    stats.textContent = `${plural(c.documents, "document")} · ${plural(c.chunks, "chunk")}${model}`;
  }
  $("chat-scope").textContent = c ? `Answers from “${c.name}”` : "No collection selected";
}

function chooseCollection(name) {
  state.collection = name;
  storage.set(COLLECTION_STORAGE, name);
  renderCollectionStats();
}

async function loadCollections() {
  try {
    const data = await api("/v1/collections");
    state.collections = (data && data.data) || [];
    if (!selectedCollection()) {
      chooseCollection(state.collections.length ? state.collections[0].name : "");
    }
    renderCollections();
  } catch (err) {
    $("collection-stats").textContent = err.status === 503 ? "The service is starting…" : err.message;
  }
}

async function createCollection(event) {
  event.preventDefault();
  const input = $("new-collection-name");
  const error = $("collection-error");
  const name = input.value.trim();
  if (!name) return;
  error.hidden = true;
  $("new-collection-create").disabled = true;
  try {
    await api("/v1/collections", { method: "POST", body: { name } });
    input.value = "";
    chooseCollection(name);
    await loadCollections();
  } catch (err) {
    error.textContent = err.message;
    error.hidden = false;
  } finally {
    $("new-collection-create").disabled = false;
  }
}

// ---- upload -----------------------------------------------------------------------------

function uploadRow(file) {
  const badge = el("span", { class: "badge", testid: "upload-state", "data-state": "uploading",
    text: "uploading" });
  const bar = el("progress", { max: "100", value: "0" });
  const detail = el("p", { class: "upload-detail small", testid: "upload-detail",
    text: `${(file.size / 1024).toFixed(file.size < 10240 ? 1 : 0)} KB` });
  const row = el("li", { class: "upload-item", testid: "upload-item", "data-filename": file.name },
    el("div", { class: "upload-head" },
      el("span", { class: "upload-name", title: file.name, text: file.name }), badge),
    bar, detail);
  return {
    row,
    progress(fraction) {
      bar.value = Math.round(fraction * 100);
      if (fraction >= 1) this.state("processing");
    },
    state(kind, text = kind) {
      badge.dataset.state = kind;
      badge.textContent = text;
      row.dataset.state = kind;
      if (kind !== "uploading" && kind !== "processing") bar.hidden = true;
    },
    detail(text, isError = false) {
      detail.textContent = text;
      detail.classList.toggle("error", isError);
    },
  };
}

function postFiles(collection, files, onProgress) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", collectionPath(collection, "/files"));
    xhr.setRequestHeader("Accept", "application/json");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    });
    xhr.upload.addEventListener("load", () => onProgress(1));
    xhr.addEventListener("load", () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
      resolve({ status: xhr.status, data });
    });
    xhr.addEventListener("error", () => reject(new ApiError("The upload failed: the service cannot be reached", 0)));
    xhr.addEventListener("abort", () => reject(new ApiError("The upload was cancelled", 0)));
    xhr.send(form);
  });
}

function showFileResult(row, result) {
  const status = result.status || "failed";
  row.state(status);
  if (result.error) {
    row.detail(result.error.message || "failed", true);
    return;
  }
  const docs = (result.documents || []).map(
    (d) => `${d.id} · ${plural(d.chunks ?? 0, "chunk")}${d.status ? ` · ${d.status}` : ""}`);
  row.detail(docs.join("\n") || status);
}

async function uploadFiles(fileList) {
  const files = Array.from(fileList || []);
  if (!files.length) return;
  const list = $("upload-list");
  const rows = files.map(uploadRow);
  for (const r of rows.slice().reverse()) list.prepend(r.row);
  const collection = state.collection;
  if (!collection) {
    for (const r of rows) {
      r.state("failed");
      r.detail("Create or choose a collection first.", true);
    }
    return;
  }
  const progress = (fraction) => rows.forEach((r) => r.progress(fraction));
  try {
    for (;;) {
      const { status, data } = await postFiles(collection, files, progress);
      if (status === 401) {
        await askForKey(data && data.error && data.error.message);
        rows.forEach((r) => { r.state("uploading"); r.progress(0); });
        continue;
      }
      if (status >= 200 && status < 300 && data && Array.isArray(data.files)) {
        rows.forEach((r, i) => {
          const result = data.files[i] && data.files[i].filename === files[i].name
            ? data.files[i]
            : data.files.find((f) => f.filename === files[i].name) || data.files[i];
          showFileResult(r, result || { status: "failed", error: { message: "no result" } });
        });
      } else {
        const message = errorFrom(status, data, `The upload failed (HTTP ${status})`).message;
        rows.forEach((r) => { r.state("failed"); r.detail(message, true); });
      }
      break;
    }
  } catch (err) {
    rows.forEach((r) => { r.state("failed"); r.detail(err.message, true); });
  }
  await loadCollections();
}

// ---- search -----------------------------------------------------------------------------

function scoresText(scores, matched) {
  const parts = Object.entries(scores || {}).map(([name, value]) => `${name} ${formatScore(value)}`);
  if (matched === "question") parts.push("matched a known question");
  return parts.join(" · ");
}

function renderResult(result, rank, query, collection) {
  const page = pageLabel(result);
  const section = sectionOf(result);
  const meta = compactMetadata(result.metadata);
  const scores = scoresText(result.scores, result.matched);
  return el("li", { class: "result", testid: "search-result" },
    el("div", { class: "result-head" },
      el("span", { class: "rank", testid: "result-rank", text: `#${rank}` }),
      el("span", { class: "result-doc", testid: "result-document", text: result.document_id }),
      page && el("span", { class: "pill", testid: "result-page", text: page }),
      section && el("span", { class: "pill", testid: "result-section", text: section }),
      el("span", { class: "score", testid: "result-score", title: "score",
        text: formatScore(result.score) })),
    scores && el("div", { class: "scores", testid: "result-scores", text: scores }),
    meta && el("p", { class: "result-meta", testid: "result-metadata", text: meta }),
    el("p", { class: "result-text", testid: "result-text" }, highlighted(result.text, query)),
    el("div", { class: "result-foot" },
      el("button", { class: "button ghost small-button", type: "button", testid: "result-open",
        text: "Open passage",
        onclick: () => openSource({ ...result, label: `#${rank}` }, collection) })));
}

async function runSearch(event) {
  event.preventDefault();
  const query = $("search-query").value.trim();
  const summary = $("search-summary");
  const results = $("search-results");
  if (!query) return;
  const collection = state.collection;
  if (!collection) {
    summary.textContent = "Create or choose a collection first.";
    return;
  }
  const mode = document.querySelector('input[name="mode"]:checked').value;
  const topK = Math.min(50, Math.max(1, Number.parseInt($("search-top-k").value, 10) || 5));
  summary.classList.remove("error");
  summary.textContent = "Searching…";
  $("search-submit").disabled = true;
  const started = performance.now();
  try {
    const data = await api(collectionPath(collection, "/search"), {
      method: "POST",
      body: { query, top_k: topK, mode, debug: true },
    });
    const items = (data && data.results) || [];
    const ms = data && data.timings_ms && data.timings_ms.total !== undefined
      ? data.timings_ms.total
      : performance.now() - started;
    results.replaceChildren(...items.map((r, i) => renderResult(r, i + 1, query, collection)));
    summary.textContent = items.length
      ? `${plural(items.length, "result")} from “${collection}” · ${mode} · ${Math.round(ms)} ms`
      : `No results in “${collection}”.`;
  } catch (err) {
    results.replaceChildren();
    summary.textContent = err.message;
    summary.classList.add("error");
  } finally {
    $("search-submit").disabled = false;
  }
}

// ---- the source panel -------------------------------------------------------------------

let panelSource = null;

function openSource(source, collection) {
  panelSource = { source, collection };
  const label = source.label || (source.index !== undefined ? `[${source.index}]` : "");
  $("source-kicker").textContent = label ? `Source ${label}` : "Source";
  $("source-title").textContent = source.document_id;
  const rows = [
    ["Document", source.document_id],
    ["Collection", collection],
    ["Page", pageLabel(source)],
    ["Section", sectionOf(source)],
    ["Score", source.score !== undefined ? formatScore(source.score) : ""],
    ["Chunk", source.chunk_id !== undefined ? String(source.chunk_id) : ""],
    ["Metadata", compactMetadata(source.metadata)],
  ];
  $("source-meta").replaceChildren(...rows.filter(([, value]) => value).flatMap(([name, value]) => [
    el("dt", { text: name }),
    el("dd", { testid: `source-${name.toLowerCase()}`, text: value }),
  ]));
  $("source-text").textContent = source.text || "";
  $("source-document").hidden = true;
  $("source-document").replaceChildren();
  $("source-document-error").hidden = true;
  $("source-load-document").disabled = !collection;
  const dialog = $("source-panel");
  if (!dialog.open) dialog.showModal();
  $("source-close").focus();
}

async function loadWholeDocument() {
  if (!panelSource) return;
  const { source, collection } = panelSource;
  const box = $("source-document");
  const error = $("source-document-error");
  const button = $("source-load-document");
  error.hidden = true;
  button.disabled = true;
  try {
    const doc = await api(documentPath(collection, source.document_id));
    const text = (doc && doc.text) || "";
    const at = source.text ? text.indexOf(source.text) : -1;
    if (at >= 0) {
      const passage = el("mark", { text: source.text });
      box.replaceChildren(text.slice(0, at), passage, text.slice(at + source.text.length));
      box.hidden = false;
      passage.scrollIntoView({ block: "center" });
    } else {
      box.replaceChildren(text);
      box.hidden = false;
    }
  } catch (err) {
    error.textContent = err.message;
    error.hidden = false;
  } finally {
    button.disabled = false;
  }
}

function closeOnBackdrop(event) {
  const dialog = event.currentTarget;
  if (event.target !== dialog) return;
  const box = dialog.getBoundingClientRect();
  const inside = event.clientX >= box.left && event.clientX <= box.right
    && event.clientY >= box.top && event.clientY <= box.bottom;
  if (!inside) dialog.close();
}

// ---- chat -------------------------------------------------------------------------------

const CITATION = /\[(\d+(?:\s*,\s*\d+)*)\]/g;

function sourceLabel(source) {
  const page = pageLabel(source);
  return `${source.document_id}${page ? `, ${page}` : ""}`;
}

/** The answer as DOM nodes, each [n] naming a source as a button that opens it. */
function answerNodes(text, sources, collection) {
  const byIndex = new Map(sources.map((s) => [Number(s.index), s]));
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(CITATION)) {
    const numbers = match[1].split(",").map((n) => Number(n.trim()));
    if (!numbers.every((n) => byIndex.has(n))) continue;
    if (match.index > last) nodes.push(text.slice(last, match.index));
    numbers.forEach((n) => {
      const source = byIndex.get(n);
      nodes.push(el("button", { class: "cite", type: "button", testid: "cite", "data-index": n,
        title: sourceLabel(source), text: `[${n}]`,
        onclick: () => openSource(source, collection) }));
    });
    last = match.index + match[0].length;
  }
  if (last < text.length) nodes.push(text.slice(last));
  return nodes;
}

function addMessage(role) {
  $("chat-empty").hidden = true;
  const bubble = el("div", { class: "bubble", testid: role === "user" ? "user-text" : "answer" });
  const root = el("div", { class: `message ${role}`, testid: `${role}-message` },
    el("span", { class: "who", text: role === "user" ? "You" : "Assistant" }), bubble);
  $("chat-log").append(root);
  return { root, bubble };
}

function scrollChat(force = false) {
  const log = $("chat-log");
  if (force || log.scrollHeight - log.scrollTop - log.clientHeight < 120) {
    log.scrollTop = log.scrollHeight;
  }
}

function renderSources(root, sources, collection) {
  if (!sources.length) return;
  const chips = sources.map((source) =>
    el("button", { class: "chip", type: "button", testid: "source-chip",
      "data-index": source.index, title: source.text ? source.text.slice(0, 200) : "",
      onclick: () => openSource(source, collection) },
    el("span", { class: "chip-index", text: `[${source.index}]` }), " ",
    el("span", { class: "chip-label", text: sourceLabel(source) })));
  root.append(el("div", { class: "sources", testid: "sources" }, chips));
}

function setBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").hidden = !busy;
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text || state.abort) return;
  input.value = "";
  autosize();
  addMessage("user").bubble.textContent = text;
  state.history.push({ role: "user", content: text });

  const collection = state.collection;
  const body = { messages: state.history.slice(), stream: true };
  const model = $("model-select").value;
  if (model) body.model = model;
  if (collection) body.rag = { collection };

  const view = addMessage("assistant");
  view.root.classList.add("streaming");
  scrollChat(true);
  const controller = new AbortController();
  state.abort = controller;
  setBusy(true);
  let answer = "";
  let sources = [];
  let retrieval = null;
  try {
    const response = await send("/v1/chat/completions", {
      method: "POST", body, signal: controller.signal, accept: "text/event-stream",
    });
    for await (const payload of serverEvents(response.body)) {
      if (payload === "[DONE]") break;
      let chunk;
      try { chunk = JSON.parse(payload); } catch { continue; }
      if (chunk.error) throw errorFrom(response.status, chunk, "The answer stream failed");
      if (Array.isArray(chunk.sources)) sources = chunk.sources;
      if (chunk.retrieval) retrieval = chunk.retrieval;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        answer += delta.content;
        view.bubble.replaceChildren(...answerNodes(answer, sources, collection));
        scrollChat();
      }
    }
    state.history.push({ role: "assistant", content: answer });
    if (!answer) view.bubble.textContent = "(empty answer)";
  } catch (err) {
    if (err.name === "AbortError") {
      state.history.push({ role: "assistant", content: answer });
      view.root.append(el("span", { class: "retrieval-note", text: "Stopped." }));
    } else {
      state.history.pop(); // the question goes unanswered: leave it out of the next request
      if (!answer) view.bubble.remove();
      view.root.append(el("div", { class: "failure", testid: "chat-error", text: err.message }));
    }
  } finally {
    view.root.classList.remove("streaming");
    if (answer) view.bubble.replaceChildren(...answerNodes(answer, sources, collection));
    renderSources(view.root, sources, collection);
    if (!sources.length && retrieval && retrieval.reason) {
      view.root.append(el("span", { class: "retrieval-note", testid: "retrieval-note",
        text: `No sources: ${String(retrieval.reason).replaceAll("_", " ")}` }));
    }
    state.abort = null;
    setBusy(false);
    scrollChat();
  }
}

function clearChat() {
  if (state.abort) state.abort.abort();
  state.history = [];
  for (const node of [...$("chat-log").children]) {
    if (node.id !== "chat-empty") node.remove();
  }
  $("chat-empty").hidden = false;
  $("chat-input").focus();
}

function autosize() {
  const input = $("chat-input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight + 2, 200)}px`;
}

// ---- models and adapters ----------------------------------------------------------------

async function loadModels() {
  const select = $("model-select");
  try {
    const data = await api("/v1/models");
    const chat = ((data && data.data) || []).filter((m) => m.type !== "embedding");
    const base = chat.filter((m) => !m.parent);
    const adapters = chat.filter((m) => m.parent);
    const previous = select.value;
    select.replaceChildren(...base.map((m) => el("option", { value: m.id, text: m.id })));
    if (!chat.length) select.append(el("option", { value: "", text: "no chat model" }));
    if (adapters.length) {
      select.append(el("optgroup", { label: "Adapters" },
        adapters.map((m) => el("option", { value: m.id, text: m.id }))));
    }
    if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  } catch (err) {
    if (err.status !== 503) toast(`Models: ${err.message}`);
  }
}

async function loadAdapters() {
  const list = $("adapter-list");
  try {
    const data = await api("/v1/adapters");
    const adapters = (data && data.data) || [];
    list.replaceChildren(...(adapters.length
      ? adapters.map((a) => el("li", { testid: "adapter", title: a.path || "" },
        el("span", { class: "adapter-name", text: a.name }),
        el("span", { class: "muted small", text: a.rank ? `r=${a.rank}` : "" })))
      : [el("li", { class: "muted small", text: "None loaded. Load one with POST /v1/adapters." })]));
  } catch (err) {
    list.replaceChildren(el("li", { class: "muted small", text: err.message }));
  }
}

async function loadAll() {
  await Promise.allSettled([loadCollections(), loadModels(), loadAdapters()]);
}

// ---- wiring -----------------------------------------------------------------------------

function selectTab(name) {
  for (const tab of ["chat", "search"]) {
    const active = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(active));
    $(`${tab}-panel`).hidden = !active;
  }
  $(name === "chat" ? "chat-input" : "search-query").focus();
}

function wireDropZone() {
  const zone = $("drop-zone");
  const stop = (event) => { event.preventDefault(); event.stopPropagation(); };
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => { stop(event); zone.classList.add("dragging"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, (event) => { stop(event); zone.classList.remove("dragging"); });
  }
  zone.addEventListener("drop", (event) => uploadFiles(event.dataTransfer.files));
  // A file dropped next to the zone would replace the page: ignore it.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  $("file-input").addEventListener("change", (event) => {
    uploadFiles(event.target.files);
    event.target.value = "";
  });
}

function init() {
  renderKeyButton();
  $("key-button").addEventListener("click", () => openKeyDialog(state.key
    ? "A key is stored in this browser. Enter a new one to replace it, or forget it."
    : "No key is set. Services started with RAG_API_KEY need one."));
  $("key-form").addEventListener("submit", saveKey);
  $("key-forget").addEventListener("click", forgetKey);
  $("key-cancel").addEventListener("click", () => $("key-dialog").close("cancel"));
  $("key-dialog").addEventListener("close", keyDialogClosed);

  $("collection-select").addEventListener("change", (e) => chooseCollection(e.target.value));
  $("new-collection-form").addEventListener("submit", createCollection);
  wireDropZone();

  $("tab-chat").addEventListener("click", () => selectTab("chat"));
  $("tab-search").addEventListener("click", () => selectTab("search"));
  $("search-form").addEventListener("submit", runSearch);

  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("input", autosize);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("chat-clear").addEventListener("click", clearChat);

  const panel = $("source-panel");
  $("source-close").addEventListener("click", () => panel.close());
  $("source-load-document").addEventListener("click", loadWholeDocument);
  panel.addEventListener("click", closeOnBackdrop);

  refreshStatus();
}

init();
