// Every call the pages make to the coordinator goes through this module, so the API key is
// added in one place. EventSource cannot send headers, so server-sent events are read from a
// fetch body instead.

const KEY_STORAGE = "gputorrent.apiKey";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  window.dispatchEvent(new Event("gputorrent:key"));
}

function headers(json) {
  const h = new Headers();
  const key = apiKey();
  if (key) h.set("Authorization", `Bearer ${key}`);
  if (json) h.set("Content-Type", "application/json");
  return h;
}

async function failure(response) {
  let code = "http_error";
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    const error = body.error || body;
    code = error.code || error.type || code;
    message = error.message || message;
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) showKeyPanel(message);
  return new ApiError(response.status, code, message);
}

/** fetch(path) with the key; rejects with ApiError unless the answer is 2xx. */
export async function request(path, { method = "GET", body, signal } = {}) {
  const init = { method, headers: headers(body !== undefined), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response;
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

/** Read the server-sent events of `path`, calling onEvent(name, data) for each, until the stream ends. */
export async function events(path, { method = "GET", body, signal, onEvent }) {
  const response = await request(path, { method, body, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

/** An element with attributes and children (strings become text: data never becomes markup). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "style") node.style.cssText = value; // CSSOM, which the pages' CSP allows
    else if (name.startsWith("data-")) node.setAttribute(name, value);
    else if (name in node) node[name] = value;
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** The key panel in the page header: open it to type a key; it opens itself on a 401. */
export function showKeyPanel(reason) {
  const panel = document.getElementById("key-panel");
  if (!panel) return;
  panel.hidden = false;
  document.getElementById("key-reason").textContent = reason || "";
  const input = document.getElementById("key-input");
  input.value = apiKey();
  input.focus();
}

export function setUpKeyPanel() {
  const panel = document.getElementById("key-panel");
  document.getElementById("key-button").addEventListener("click", () => {
    if (panel.hidden) showKeyPanel("");
    else panel.hidden = true;
  });
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey(document.getElementById("key-input").value.trim());
    panel.hidden = true;
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    setApiKey("");
    document.getElementById("key-input").value = "";
  });
}

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(value >= 10 || unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
