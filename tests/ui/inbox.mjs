// The inbox widget, end to end, in Debian's headless Chromium: the demo page in two tabs
// of one user. The badge shows the unread count, a notification posted through the API
// appears without a reload, reading it in one tab updates the badge in the other; the
// bell and the panel work from the keyboard and name themselves to screen readers; mark
// all read, archive and load more. tests/it/inbox.rs runs this and checks herald's side.
import { launch, need } from "./lib.mjs";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";

const base = need("HERALD_URL");
const key = need("HERALD_KEY");
const user = need("INBOX_USER");
const shots = need("SCREENSHOTS");
mkdirSync(shots, { recursive: true });

const browser = await launch();
const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
context.setDefaultTimeout(20_000);
const problems = [];
async function tab() {
  const page = await context.newPage();
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") problems.push(`console: ${m.text()}`); });
  page.on("request", (r) => {
    const u = new URL(r.url());
    if (!["127.0.0.1", "localhost"].includes(u.hostname) && !["data:", "about:"].includes(u.protocol)) problems.push(`off-box request: ${r.url()}`);
  });
  await page.goto(`${base}/inbox/demo`);
  await page.waitForSelector(".hi-root[data-connected=true]");
  return page;
}

let n = 0;
async function step(name, fn) {
  const t = Date.now();
  await fn();
  console.log(`ok ${++n} - ${name} (${Date.now() - t} ms)`);
}

async function post(title, text) {
  const r = await fetch(`${base}/v1/events`, {
    method: "POST",
    headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
    body: JSON.stringify({ event_type: "note", recipients: { user_ids: [user] }, payload: { title, text } }),
  });
  assert.equal(r.status, 202, await r.text());
}

const unread = (page) => page.getAttribute("[data-herald=bell]", "data-unread");
const waitUnread = (page, count) => page.waitForFunction(
  (c) => document.querySelector("[data-herald=bell]")?.getAttribute("data-unread") === String(c), count, { timeout: 60_000 });

try {
  const one = await tab();
  const two = await tab();

  await step("the badge shows the unread count, and screen readers hear it", async () => {
    assert.equal(await unread(one), "1", "the item posted before the page opened");
    assert.equal(await one.getAttribute("[data-herald=bell]", "aria-label"), "Notifications, 1 unread");
    assert.equal(await one.textContent("[data-herald=badge]"), "1");
  });

  await step("the keyboard opens the panel, and Escape closes it back onto the bell", async () => {
    await one.focus("[data-herald=bell]");
    await one.keyboard.press("Enter");
    await one.waitForSelector(".hi-panel:not([hidden])");
    assert.equal(await one.getAttribute("[data-herald=bell]", "aria-expanded"), "true");
    assert.equal(await one.locator("[data-herald=item]").count(), 1);
    await one.keyboard.press("Escape");
    await one.waitForSelector(".hi-panel[hidden]", { state: "attached" });
    assert.equal(await one.evaluate(() => document.activeElement.dataset.herald), "bell");
    assert.equal(await one.getAttribute("[data-herald=bell]", "aria-expanded"), "false");
  });

  await step("a notification posted through the API appears without a reload", async () => {
    await one.click("[data-herald=bell]");
    // The panel's list is read; what comes next can only arrive over the socket.
    await one.waitForSelector(".hi-root:not([data-loading])");
    await post("Build finished", "main is green");
    await one.waitForSelector("[data-herald=item]:has-text('Build finished')", { timeout: 60_000 });
    await waitUnread(one, 2);
    await waitUnread(two, 2);
    assert.match(await one.textContent("[role=status]"), /New notification: Build finished/);
    await one.screenshot({ path: `${shots}/inbox.png` });
  });

  await step("reading it in one tab updates the badge in the other", async () => {
    await one.click("[data-herald=item]:has-text('Build finished')");
    await waitUnread(one, 1);
    await waitUnread(two, 1);
    assert.equal(await one.locator(".hi-unread").count(), 1);
  });

  await step("mark all read, archive, and load more", async () => {
    await one.click("[data-herald=read-all]");
    await waitUnread(one, 0);
    await waitUnread(two, 0);
    await one.waitForSelector(".hi-root:not([data-loading])");
    assert.equal(await one.locator(".hi-unread").count(), 0);
    await one.click("[data-herald=archive] >> nth=0");
    await one.waitForFunction(() => document.querySelectorAll("[data-herald=item]").length === 1);
    for (let i = 0; i < 21; i++) await post(`Bulk ${i}`, "one of many");
    await waitUnread(two, 21);
    await two.click("[data-herald=bell]");
    await two.waitForFunction(() => document.querySelectorAll("[data-herald=item]").length === 20);
    await two.click("[data-herald=more]");
    await two.waitForFunction(() => document.querySelectorAll("[data-herald=item]").length === 22);
  });

  assert.deepEqual(problems, []);
} finally {
  await browser.close();
}
