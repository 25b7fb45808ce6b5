// The dashboard in a real browser: Debian's headless Chromium driven by playwright-core.
// Run by tests/tests/dashboard.rs, which starts sluice-ingest (with an API key) and a
// collector, sends a known set of events, and waits until the collector has written them.
// This script then does what a user does and checks what a user sees:
//
//   1. opens /ui/, is asked for the API key, types it;
//   2. reads the totals and the top values of each dimension off the page and compares them
//      with what was sent (SLUICE_UI_EXPECT);
//   3. in live mode, sends more events through ingest and waits for the page's total and
//      top values to change, without a reload;
//   4. saves a screenshot (SLUICE_UI_SCREENSHOT) and fails on any error the page logged.
//
// Environment: SLUICE_UI_BASE (ingest's base URL), SLUICE_UI_STREAM, SLUICE_UI_API_KEY,
// SLUICE_UI_EXPECT ({"total": n, "dimensions": {pointer: [{value, count}]}}),
// SLUICE_UI_LIVE ({"count": n, "dimension": pointer, "value": v}: what to send in live
// mode), SLUICE_UI_SCREENSHOT, and CHROMIUM (/usr/bin/chromium by default).
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

const base = env("SLUICE_UI_BASE");
const stream = env("SLUICE_UI_STREAM");
const apiKey = env("SLUICE_UI_API_KEY");
const expected = JSON.parse(env("SLUICE_UI_EXPECT"));
const live = JSON.parse(env("SLUICE_UI_LIVE"));
const screenshot = env("SLUICE_UI_SCREENSHOT");
const WAIT_MS = 60_000;
const numbers = new Intl.NumberFormat("en-US");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  // No network beyond this machine: nothing in the background may try to reach out.
  args: [
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
  ],
});
const problems = [];
try {
  const context = await browser.newContext({
    viewport: { width: 1280, height: 900 },
    colorScheme: "light",
    locale: "en-US",
  });
  const page = await context.newPage();
  page.on("console", (m) => m.type() === "error" && problems.push(`console: ${m.text()}`));
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) => {
    // The page aborts a request it no longer needs when the view changes.
    if (r.failure()?.errorText !== "net::ERR_ABORTED") {
      problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`);
    }
  });

  await page.goto(`${base}/ui/?stream=${encodeURIComponent(stream)}&range=1h`);

  // 1. Ingest asks for a key: the page says so, and works once it is typed.
  await page.locator("#key-form").waitFor({ state: "visible", timeout: WAIT_MS });
  await page.locator("#key").fill(apiKey);
  await page.getByRole("button", { name: "Use key" }).click();
  await page.locator("#key-form").waitFor({ state: "hidden", timeout: WAIT_MS });
  // The browser logs the 401 that made the page ask; nothing else may go wrong from here.
  assert.ok(problems.every((p) => p.includes("401")), `before the key: ${problems}`);
  problems.length = 0;
  assert.equal(await page.locator("#stream").inputValue(), stream, "the stream in the address is picked");
  // A marker that a reload would lose.
  await page.evaluate(() => {
    window.sluiceNotReloaded = true;
  });

  const text = (testId) => page.locator(`[data-testid="${testId}"]`).textContent();
  const waitForTotal = async (total) => {
    const want = numbers.format(total);
    await page.waitForFunction(
      (w) => document.querySelector('[data-testid="total"]')?.textContent === w,
      want,
      { timeout: WAIT_MS },
    ).catch(async (e) => {
      throw new Error(`the page's total stayed ${await text("total")}, not ${want}: ${e.message}`);
    });
  };
  const topValues = async (pointer) => {
    const rows = page.locator(`section[data-dimension="${pointer}"] tbody tr`);
    return (await rows.evaluateAll((trs) => trs.map((tr) => [...tr.cells].map((c) => c.textContent)))).map(
      ([value, count]) => ({ value, count: Number(String(count).replaceAll(",", "")) }),
    );
  };

  // 2. What the page shows is what was sent.
  await waitForTotal(expected.total);
  for (const [pointer, top] of Object.entries(expected.dimensions)) {
    assert.deepEqual(await topValues(pointer), top, `top values of ${pointer}`);
  }
  const dimensionCards = await page.locator("section[data-dimension]").count();
  assert.equal(dimensionCards, Object.keys(expected.dimensions).length, "a card per dimension");
  const seriesLabel = await page.locator("#series").getAttribute("aria-label");
  assert.match(seriesLabel ?? "", new RegExp(`${numbers.format(expected.total)} in all`));
  assert.ok((await page.locator("#status").textContent()).startsWith("live"), "live mode is on");
  const canvases = await page.locator("canvas").evaluateAll((cs) => cs.map((c) => c.width * c.height));
  assert.ok(canvases.length === 1 + dimensionCards && canvases.every((a) => a > 0), "every chart is drawn");
  console.log(`page shows ${await text("total")} events, as sent`);

  // 3. Live: more events arrive; the page follows without a reload.
  const events = Array.from({ length: live.count }, (_, i) => ({
    [live.dimension.slice(1)]: live.value,
    n: i,
  }));
  const response = await fetch(`${base}/v1/streams/${encodeURIComponent(stream)}/events`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${apiKey}` },
    body: JSON.stringify(events),
  });
  assert.equal(response.status, 202, `ingest took the live events: ${await response.text()}`);
  await waitForTotal(expected.total + live.count);
  const after = await topValues(live.dimension);
  assert.ok(
    after.some((t) => t.value === live.value && t.count >= live.count),
    `${live.value} appears in the top values of ${live.dimension}: ${JSON.stringify(after)}`,
  );
  assert.equal(await page.evaluate(() => window.sluiceNotReloaded), true, "the page was not reloaded");
  console.log(`live mode: the page went to ${await text("total")} events without a reload`);

  // 4. A picture of it, and a page that logged nothing wrong.
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`screenshot: ${screenshot}`);
  assert.deepEqual(problems, [], "the page logged no errors");
} finally {
  await browser.close();
}
