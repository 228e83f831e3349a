// Drives Debian's Chromium (never a downloaded browser) through playwright-core for tests/e2e/test_dashboard.py.
// Usage: node drive.mjs <dashboard|playground> <base url> <screenshot path> [JSON options]
// Prints one JSON object: what the page showed, and every console error or page error it raised.
import { chromium } from "playwright-core";

const [scenario, baseUrl, screenshot, optionsJson] = process.argv.slice(2);
const options = JSON.parse(optionsJson || "{}");
const timeout = options.timeout_ms ?? 30000;
const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";

// The machine has no network beyond localhost: keep Chromium from trying its own services.
const args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync"];
const browser = await chromium.launch({ executablePath, headless: true, args });
const report = { scenario, errors: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.setDefaultTimeout(timeout);
  page.on("console", (message) => {
    // A 401 before the key is typed is expected; the page logs it as a failed resource load.
    if (message.type() === "error" && !message.text().includes("401")) report.errors.push(message.text());
  });
  page.on("pageerror", (error) => report.errors.push(String(error)));
  await ({ dashboard, playground }[scenario])(page, report);
  await page.screenshot({ path: screenshot, fullPage: true });
} catch (error) {
  report.errors.push(`driver: ${error.message}`);
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));

async function typeKeyIfAsked(page, report) {
  if (!options.api_key) return;
  await page.locator("#key-panel").waitFor({ state: "visible" });
  report.key_reason = await page.locator("#key-reason").textContent();
  await page.fill("#key-input", options.api_key);
  await page.click("#key-form button[type=submit]");
}

async function dashboard(page, report) {
  await page.goto(`${baseUrl}/dashboard`);
  await typeKeyIfAsked(page, report);
  const row = page.locator(`#workers tr[data-worker-id="${options.worker_id}"][data-state="alive"]`);
  await row.waitFor();
  if (options.jobs_done) {
    // Wait for the heartbeat that carries the jobs the test ran, and for the chart point they land in.
    await page.waitForFunction(
      ([id, want]) => {
        const cell = document.querySelector(`#workers tr[data-worker-id="${id}"] .jobs`);
        return cell && parseInt(cell.textContent, 10) >= want;
      },
      [options.worker_id, options.jobs_done],
    );
  }
  report.row = await row.locator("td").allTextContents();
  report.states = await page.locator("#workers tbody tr").evaluateAll((rows) =>
    rows.map((r) => [r.dataset.workerId, r.querySelector(".state").textContent]));
  report.tiles = await page.locator("#tiles .tile").allTextContents();
  report.models = await page.locator("#models tbody tr").allTextContents();
  report.failures = await page.locator("#failures tbody tr").allTextContents();
  report.transfers = await page.locator("#transfers tbody tr").allTextContents();
  report.groups = await page.locator("#workers .group").allTextContents();
  report.failures_note = await page.locator("#failures-note").textContent();
  report.connection = await page.locator("#connection").textContent();
  report.charts = await page.locator(".chart svg").count();
  report.local_storage_key = await page.evaluate(() => localStorage.getItem("gputorrent.apiKey"));
  const first = await page.getAttribute("body", "data-updated-at");
  // Live: a later event redraws the page without a reload.
  await page.waitForFunction((seen) => document.body.dataset.updatedAt !== seen, first);
  report.updated = true;
}

async function playground(page, report) {
  await page.goto(`${baseUrl}/dashboard/playground`);
  await typeKeyIfAsked(page, report);
  await page.locator("#model[data-loaded=true]").waitFor({ state: "attached" });
  report.models = await page.locator("#model option").allTextContents();
  await page.selectOption("#model", options.model);
  await page.fill("#prompt", options.prompt);
  await page.fill("#max-tokens", String(options.max_tokens ?? 32));
  await page.fill("#temperature", String(options.temperature ?? 0));
  if (options.chat === false) await page.uncheck("#chat");
  // Sample the output while it streams: several distinct partial texts prove tokens arrived one by one.
  await page.evaluate(() => {
    window.partials = [];
    const output = document.getElementById("output");
    new MutationObserver(() => window.partials.push(output.textContent)).observe(output, { childList: true, characterData: true, subtree: true });
  });
  await page.click("#send");
  await page.locator("#output[data-status=completed], #output[data-status=failed]").waitFor({ state: "attached" });
  report.status = await page.getAttribute("#output", "data-status");
  report.output = await page.locator("#output").textContent();
  report.token_events = Number(await page.getAttribute("#output", "data-token-events"));
  report.request_id = await page.getAttribute("#output", "data-request-id");
  report.run_status = await page.locator("#run-status").textContent();
  report.partials = await page.evaluate(() => [...new Set(window.partials)].length);
}
