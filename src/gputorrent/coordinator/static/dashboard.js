// The dashboard: one server-sent event stream (/pool/events) redraws everything every couple of seconds.
import { ApiError, el, events, formatBytes, setUpKeyPanel, sleep } from "./api.js";

const HISTORY_S = 600;
const INTERVAL_S = 2;
let stream = null; // the AbortController of the open stream

function tile(label, value) {
  return el("div", { class: "tile" }, el("div", { class: "value" }, value), el("div", { class: "label" }, label));
}

function number(value, digits = 1) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

/** Every registered worker, whatever its state (`pool.workers` holds only some rows in a large pool). */
function registered(totals) {
  return Object.values(totals.workers).reduce((sum, n) => sum + n, 0);
}

function renderTiles(pool) {
  const t = pool.totals;
  const r = pool.rates;
  document.getElementById("tiles").replaceChildren(
    tile("workers alive", `${t.workers.alive} / ${registered(t)}`),
    tile("slots busy", `${t.slots_busy} / ${t.slots}`),
    tile("jobs in flight", t.in_flight),
    tile("jobs queued", t.queued),
    tile(`requests/s (last ${r.window_s} s)`, number(r.jobs_per_s, 2)),
    tile("tokens/s", number(r.tokens_per_s, 1)),
    tile("time to first token", r.ttft_avg_s === null ? "–" : `${(r.ttft_avg_s * 1000).toFixed(0)} ms`),
    tile("errors/s", number(r.failed_per_s, 2)),
  );
}

function chart(id, points, value, unit) {
  const figure = document.getElementById(id);
  const caption = figure.querySelector("figcaption");
  const values = points.map(value);
  const known = values.filter((v) => v !== null);
  const top = Math.max(...known, 0) || 1;
  const width = Math.max(points.length - 1, 1);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} 100`);
  svg.setAttribute("preserveAspectRatio", "none");
  const base = document.createElementNS(ns, "line");
  base.setAttribute("class", "baseline");
  base.setAttribute("x1", 0);
  base.setAttribute("x2", width);
  base.setAttribute("y1", 99);
  base.setAttribute("y2", 99);
  svg.append(base);
  // One polyline per run of known values: a bucket without a figure (no token yet) is a gap, not a zero.
  let run = [];
  const flush = () => {
    if (run.length) {
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("points", (run.length === 1 ? [run[0], run[0]] : run).join(" "));
      svg.append(line);
    }
    run = [];
  };
  values.forEach((v, i) => {
    if (v === null) flush();
    else run.push(`${i},${(100 - (v / top) * 96 - 2).toFixed(2)}`);
  });
  flush();
  const last = known.length ? known[known.length - 1] : null;
  const title = caption.dataset.title || caption.textContent;
  caption.dataset.title = title;
  caption.replaceChildren(el("span", {}, title), el("span", {}, `now ${number(last, 2)}${unit} · max ${number(top, 2)}${unit}`));
  figure.querySelector("svg")?.remove();
  figure.append(svg);
}

function hardware(w) {
  const machine = w.telemetry?.machine;
  const lines = [];
  if (machine?.gpus?.length) {
    for (const g of machine.gpus) {
      const used = g.memory_used_bytes;
      const total = g.memory_total_bytes;
      const share = used !== null && total ? used / total : 0;
      lines.push(
        el("div", { class: "gpu" },
          `${g.name}: `,
          el("span", { class: "meter", title: "memory" }, el("span", { style: `width:${(share * 100).toFixed(0)}%` })),
          ` ${formatBytes(used)} / ${formatBytes(total)}`,
          g.utilization_ratio === null ? "" : ` · ${(g.utilization_ratio * 100).toFixed(0)}% busy`,
          g.temperature_celsius === null ? "" : ` · ${g.temperature_celsius.toFixed(0)} °C`),
      );
    }
  } else if (machine) {
    const share = machine.ram_total_bytes ? machine.ram_used_bytes / machine.ram_total_bytes : 0;
    lines.push(el("div", { class: "cpu" },
      `CPU ${(machine.cpu_utilization_ratio * 100).toFixed(0)}% of ${w.hardware.cpu_cores ?? "?"} cores`));
    lines.push(el("div", { class: "ram" }, "RAM ",
      el("span", { class: "meter" }, el("span", { style: `width:${(share * 100).toFixed(0)}%` })),
      ` ${formatBytes(machine.ram_used_bytes)} / ${formatBytes(machine.ram_total_bytes)}`));
  } else {
    const gpus = w.hardware.gpus.map((g) => g.name).join(", ");
    lines.push(gpus || `${w.hardware.cpu_cores ?? "?"} CPU cores`);
  }
  return el("td", { class: "hw" }, lines);
}

// A split model: where each part lies (the leader first), layers and memory lent.
function group(g) {
  const parts = g.hosts.map((h) => `${h.shard_id === null ? "leader" : `${h.address}:${h.port}`} ${h.layers} ${h.layers === 1 ? "layer" : "layers"}` +
    (h.memory_bytes ? ` (${formatBytes(h.memory_bytes)})` : ""));
  return `split: ${parts.join(" · ")}`;
}

function jobsDone(w) {
  const counters = Object.values(w.telemetry?.jobs ?? {});
  const completed = counters.reduce((sum, c) => sum + c.completed, 0);
  const failed = counters.reduce((sum, c) => sum + c.failed, 0);
  return failed ? `${completed} ok, ${failed} failed` : `${completed}`;
}

function renderWorkers(pool) {
  const rows = pool.workers.map((w) => {
    const beat = w.last_heartbeat_at === null ? "–" : `${Math.max(0, pool.at - w.last_heartbeat_at).toFixed(1)} s ago`;
    return el("tr", { "data-worker-id": w.worker_id, "data-state": w.state },
      el("td", { class: "worker-id" }, w.worker_id),
      el("td", { class: "state" }, el("span", { class: `badge ${w.state}` }, w.state),
        w.state_reason ? el("span", { class: "reason" }, w.state_reason) : null),
      el("td", {}, w.backend),
      el("td", { class: "models" }, w.models.join(", "), w.group ? el("div", { class: "group" }, group(w.group)) : null),
      el("td", { class: "number slots" }, `${w.jobs_in_flight} / ${w.slots}`),
      el("td", { class: "number queue" }, w.queue_length),
      hardware(w),
      el("td", { class: "number jobs" }, jobsDone(w)),
      el("td", { class: "number" }, beat));
  });
  document.querySelector("#workers tbody").replaceChildren(...rows);
  document.getElementById("no-workers").hidden = pool.workers.length > 0;
  const total = registered(pool.totals);
  const shown = document.getElementById("workers-shown");
  shown.hidden = pool.workers.length >= total;
  shown.textContent = `Showing ${pool.workers.length} of ${total} workers: those not alive first, then the busiest.`;
  const models = pool.models.map((m) => el("tr", { "data-model": m.model },
    el("td", {}, m.model), el("td", { class: "number" }, `${m.workers} (${m.live_workers})`),
    el("td", { class: "number" }, m.queued), el("td", { class: "number" }, m.in_flight)));
  document.querySelector("#models tbody").replaceChildren(...models);
}

function renderTransfers(pool) {
  const rows = pool.transfers.map((t) => {
    const share = t.done_bytes / t.total_bytes;
    const left = t.paused ? "paused: no holder is sending"
      : t.rate_bps > 0 ? `${((t.total_bytes - t.done_bytes) / t.rate_bps).toFixed(0)} s` : "–";
    return el("tr", { "data-model": t.model, "data-peer": `${t.peer.address}:${t.peer.port}`, "data-paused": String(t.paused) },
      el("td", {}, t.model),
      el("td", { class: "mono" }, `${t.peer.address}:${t.peer.port}`),
      el("td", { class: "progress" },
        el("span", { class: "meter" }, el("span", { style: `width:${(share * 100).toFixed(0)}%` })),
        ` ${formatBytes(t.done_bytes)} / ${formatBytes(t.total_bytes)}`),
      el("td", { class: "number" }, `${formatBytes(t.rate_bps)}/s`),
      el("td", { class: "number" }, t.peers),
      el("td", { class: "left" }, left));
  });
  document.querySelector("#transfers tbody").replaceChildren(...rows);
  document.getElementById("no-transfers").hidden = rows.length > 0;
}

function renderFailures(pool) {
  const note = document.getElementById("failures-note");
  const body = document.querySelector("#failures tbody");
  if (pool.failures === null) {
    body.replaceChildren();
    note.hidden = false;
    note.textContent = "Failures and their reasons are shown to admin keys only.";
    return;
  }
  note.hidden = pool.failures.length > 0;
  note.textContent = "No failure in the recent past.";
  body.replaceChildren(...pool.failures.map((f) => el("tr", { "data-request-id": f.request_id },
    el("td", {}, new Date(f.at * 1000).toLocaleTimeString()), el("td", { class: "mono" }, f.request_id),
    el("td", {}, f.model), el("td", {}, f.worker_id), el("td", { class: "code" }, f.code),
    el("td", { class: "reason-text" }, f.message))));
}

function render(pool) {
  renderTiles(pool);
  const history = pool.history;
  chart("chart-requests", history, (p) => p.jobs_per_s, "");
  chart("chart-ttft", history, (p) => (p.ttft_avg_s === null ? null : p.ttft_avg_s * 1000), " ms");
  chart("chart-tokens", history, (p) => p.tokens_per_s, "");
  chart("chart-errors", history, (p) => p.failed_per_s, "");
  renderWorkers(pool);
  renderTransfers(pool);
  renderFailures(pool);
  document.body.dataset.updatedAt = String(pool.at);
}

function setConnection(text, live) {
  const node = document.getElementById("connection");
  node.textContent = text;
  node.className = `connection ${live ? "live" : "down"}`;
}

async function follow() {
  stream?.abort();
  const controller = new AbortController();
  stream = controller;
  let delay = 1000;
  while (!controller.signal.aborted) {
    try {
      await events(`/pool/events?history_s=${HISTORY_S}&interval_s=${INTERVAL_S}`, {
        signal: controller.signal,
        onEvent(name, data) {
          if (name === "pool") {
            render(data);
            setConnection("live", true);
            delay = 1000;
          } else if (name === "error") {
            setConnection(data.error?.message ?? "error", false);
          }
        },
      });
      setConnection("reconnecting…", false);
    } catch (error) {
      if (controller.signal.aborted) return;
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
        setConnection(error.status === 401 ? "API key needed" : error.message, false);
        return; // a new key (the key panel) starts again
      }
      setConnection("reconnecting…", false);
    }
    await sleep(delay);
    delay = Math.min(delay * 2, 10000);
  }
}

setUpKeyPanel();
window.addEventListener("gputorrent:key", follow);
follow();
