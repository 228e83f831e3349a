// The playground: pick a model, send a prompt, watch the tokens arrive (POST /inference with "stream": true).
import { ApiError, events, getJSON, setUpKeyPanel } from "./api.js";

const form = document.getElementById("prompt-form");
const modelSelect = document.getElementById("model");
const output = document.getElementById("output");
const status = document.getElementById("run-status");
const send = document.getElementById("send");
const stop = document.getElementById("stop");
const connection = document.getElementById("connection");
let running = null; // the AbortController of the request in flight

function setConnection(text, live) {
  connection.textContent = text;
  connection.className = `connection ${live ? "live" : "down"}`;
}

async function loadModels() {
  try {
    const { data } = await getJSON("/v1/models");
    const chosen = modelSelect.value;
    modelSelect.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    if (data.some((m) => m.id === chosen)) modelSelect.value = chosen;
    send.disabled = data.length === 0;
    setConnection(data.length ? `${data.length} model${data.length > 1 ? "s" : ""} served` : "no model served", data.length > 0);
    modelSelect.dataset.loaded = "true";
  } catch (error) {
    setConnection(error instanceof ApiError && error.status === 401 ? "API key needed" : error.message, false);
  }
}

function finish(result, startedAt, firstTokenAt, tokenEvents) {
  if (result.status === "completed") {
    const seconds = result.timings.inference_ms / 1000;
    const rate = seconds > 0 ? (result.usage.completion_tokens / seconds).toFixed(1) : "–";
    const ttft = firstTokenAt ? `${(firstTokenAt - startedAt).toFixed(0)} ms to first token, ` : "";
    status.textContent = `completed on ${result.worker_id}: ${result.usage.completion_tokens} tokens, ${ttft}${rate} tokens/s (${result.finish_reason})`;
  } else {
    output.classList.add("failed");
    status.textContent = `failed: ${result.error?.code}: ${result.error?.message}`;
  }
  output.dataset.status = result.status;
  output.dataset.tokenEvents = String(tokenEvents);
}

async function run(event) {
  event.preventDefault();
  running?.abort();
  const controller = new AbortController();
  running = controller;
  const text = document.getElementById("prompt").value;
  const body = {
    model: modelSelect.value,
    stream: true,
    options: {
      max_tokens: Number(document.getElementById("max-tokens").value),
      temperature: Number(document.getElementById("temperature").value),
    },
  };
  if (document.getElementById("chat").checked) body.messages = [{ role: "user", content: text }];
  else body.prompt = text;
  output.textContent = "";
  output.classList.remove("failed");
  output.dataset.status = "running";
  output.dataset.tokenEvents = "0";
  send.disabled = true;
  stop.disabled = false;
  status.textContent = "sending…";
  const startedAt = performance.now();
  let firstTokenAt = null;
  let tokenEvents = 0;
  try {
    await events("/inference", {
      method: "POST",
      body,
      signal: controller.signal,
      onEvent(name, data) {
        if (name === "queued") {
          status.textContent = `queued on ${data.worker_id} (request ${data.request_id})`;
          output.dataset.requestId = data.request_id;
        } else if (name === "token") {
          firstTokenAt ??= performance.now();
          tokenEvents += 1;
          output.dataset.tokenEvents = String(tokenEvents);
          output.append(data.text);
          status.textContent = "streaming…";
        } else if (name === "result") {
          finish(data, startedAt, firstTokenAt, tokenEvents);
        } else if (name === "error") {
          output.classList.add("failed");
          output.dataset.status = "failed";
          status.textContent = `error: ${data.error?.code}: ${data.error?.message}`;
        }
      },
    });
  } catch (error) {
    output.dataset.status = controller.signal.aborted ? "stopped" : "failed";
    status.textContent = controller.signal.aborted ? "stopped (the request was cancelled)" : `error: ${error.message}`;
    if (!controller.signal.aborted) output.classList.add("failed");
  } finally {
    send.disabled = false;
    stop.disabled = true;
    if (running === controller) running = null;
  }
}

form.addEventListener("submit", run);
stop.addEventListener("click", () => running?.abort());
setUpKeyPanel();
window.addEventListener("gputorrent:key", loadModels);
loadModels();
