// The console, end to end, in Debian's headless Chromium: sign in, find a delivery by its
// user and open it, watch the live tail (and pause it), read the overview, replay a dead
// letter, create a campaign and see its next fires, pause it, edit and preview a template,
// add a status webhook endpoint (its secret shown once), see its tries and replay them.
// tests/it/console.rs seeds herald and runs this; it checks herald's side afterwards.
// Every page is screenshotted into $SCREENSHOTS.
import { launch, need } from "./lib.mjs";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";

const base = need("HERALD_URL");
const key = need("HERALD_KEY");
const shots = need("SCREENSHOTS");
const findUser = need("FIND_USER");
const deadUser = need("DEAD_USER");
const campaignName = need("CAMPAIGN_NAME");
const hookUrl = need("HOOK_URL");
mkdirSync(shots, { recursive: true });

const browser = await launch();
const context = await browser.newContext({ viewport: { width: 1366, height: 860 }, timezoneId: "America/New_York" });
context.setDefaultTimeout(15_000);
const page = await context.newPage();
const problems = [];
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
page.on("console", (m) => { if (m.type() === "error" && !/401|403|404|422/.test(m.text())) problems.push(`console: ${m.text()}`); });
// Nothing may leave loopback: every asset comes from herald itself.
page.on("request", (r) => {
  const u = new URL(r.url());
  if (!["127.0.0.1", "localhost"].includes(u.hostname) && !["data:", "about:"].includes(u.protocol)) problems.push(`off-box request: ${r.url()}`);
});

let n = 0;
async function step(name, fn) {
  const t = Date.now();
  await fn();
  console.log(`ok ${++n} - ${name} (${Date.now() - t} ms)`);
}
const shot = (name) => page.screenshot({ path: `${shots}/${name}.png`, fullPage: false });

// Every form control on the page has a name a screen reader can read.
async function labelled(where) {
  const unlabelled = await page.$$eval("input:not([type=hidden]), select, textarea", (els) =>
    els.filter((e) => e.offsetParent !== null && !(e.labels && e.labels.length) && !e.getAttribute("aria-label"))
      .map((e) => e.outerHTML.slice(0, 80)));
  assert.deepEqual(unlabelled, [], `unlabelled controls on ${where}`);
}

async function post(path, body) {
  const r = await fetch(`${base}${path}`, { method: "POST", headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const text = await r.text();
  assert.ok(r.ok, `${path}: ${r.status} ${text}`);
  return JSON.parse(text);
}

try {
  await step("signing in needs a live key", async () => {
    await page.goto(`${base}/ui`);
    await page.waitForURL(`${base}/ui/login`);
    await labelled("sign-in");
    await page.fill("#key", "hrld_nope_0000");
    await page.click("button[type=submit]");
    await page.waitForSelector("#login-error");
    assert.match(await page.textContent("#login-error"), /unknown or revoked/);
    await shot("login");
    await page.fill("#key", key);
    await page.click("button[type=submit]");
    await page.waitForURL(/\/ui#?\/?.*$/);
    await page.waitForSelector("h1:text('Deliveries')");
    assert.match(await page.textContent("#who"), /console-e2e/);
  });

  await step("the keyboard reaches the skip link first, and it moves focus to the page", async () => {
    await page.keyboard.press("Tab");
    assert.equal(await page.evaluate(() => document.activeElement.id), "skip");
    await page.keyboard.press("Enter");
    assert.equal(await page.evaluate(() => document.activeElement.id), "main");
  });

  let deliveryId;
  await step("find a delivery by its user and open it", async () => {
    await labelled("deliveries");
    await page.fill("input[name=user_id]", findUser);
    await page.press("input[name=user_id]", "Enter");
    await page.waitForURL(new RegExp(`user_id=${findUser}`));
    // The unfiltered table may still be on screen while the filtered one loads: wait for
    // the filtered rows themselves.
    await page.waitForFunction((user) => {
      const cells = [...document.querySelectorAll("tbody tr[data-delivery] td:nth-child(2)")];
      return cells.length >= 1 && cells.every((c) => c.textContent === user);
    }, findUser);
    const row = page.locator("tbody tr[data-delivery]").first();
    const users = await page.$$eval("tbody tr[data-delivery] td:nth-child(2)", (tds) => tds.map((t) => t.textContent));
    assert.ok(users.length >= 1 && users.every((u) => u === findUser), `only ${findUser}'s deliveries: ${users}`);
    await shot("deliveries");
    deliveryId = await row.getAttribute("data-delivery");
    await row.locator("a").click();
    await page.waitForURL(new RegExp(`#/deliveries/${deliveryId}$`));
    await page.waitForSelector("#delivery-status .badge.sent");
    await page.waitForSelector("[data-preview=subject]");
    assert.match(await page.textContent("[data-preview=subject]"), /Hello/);
    assert.ok((await page.locator("table[aria-label=Attempts] tbody tr").count()) >= 1, "an attempt is listed");
    await page.waitForSelector("text=Provider feedback (0)");
    await shot("delivery");
  });

  await step("the live tail shows a new status change, and holds changes while paused", async () => {
    await page.click("nav a[data-section=live]");
    await page.waitForSelector("#live-state.on");
    const live = await post("/v1/events", { event_type: "greeting", channels: ["email"], recipients: { user_ids: [findUser] }, payload: { note: "live" } });
    // These wait on herald's whole pipeline, which shares two cores with the other tests.
    const pipeline = { timeout: 60_000 };
    await page.waitForSelector("table[aria-label^='Status changes'] tbody tr", pipeline).catch(async (e) => {
      const r = await fetch(`${base}/v1/deliveries?notification_id=${live.notification_id}`, { headers: { Authorization: `Bearer ${key}` } });
      throw new Error(`${e.message}\nthe live event's deliveries meanwhile: ${await r.text()}; stream state: ${await page.textContent("#live-state")}`);
    });
    await page.waitForFunction(() => [...document.querySelectorAll("tbody .badge")].some((b) => b.textContent === "sent"), null, pipeline);
    await page.click("#live-pause");
    assert.equal(await page.getAttribute("#live-pause", "aria-pressed"), "true");
    const before = await page.locator("tbody tr").count();
    await post("/v1/events", { event_type: "greeting", channels: ["email"], recipients: { user_ids: [findUser] }, payload: { note: "paused" } });
    await page.waitForFunction(() => /held while paused/.test(document.getElementById("live-held").textContent), null, pipeline);
    assert.equal(await page.locator("tbody tr").count(), before, "no row added while paused");
    await shot("live");
    await page.click("#live-pause");
    await page.waitForFunction((b) => document.querySelectorAll("tbody tr").length > b, before);
  });

  await step("the overview draws its charts", async () => {
    await page.click("nav a[data-section=overview]");
    await page.waitForSelector("svg[aria-label='Deliveries per hour by status'] rect");
    await page.waitForSelector("svg[aria-label='Jobs waiting per lane']");
    await page.waitForSelector("svg[aria-label='Send latency percentiles per channel'] rect");
    await page.waitForSelector("svg[aria-label='Success rate per provider'] rect");
    await page.waitForSelector("table[aria-label='Deliverability per provider'] tbody tr");
    assert.ok(Number((await page.textContent("#kpi-total")).replace(/\D/g, "")) >= 2, "deliveries counted");
    await labelled("overview");
    await shot("overview");
  });

  await step("replay a dead letter", async () => {
    await page.click("nav a[data-section=dead-letters]");
    const row = page.locator("tr[data-letter]", { hasText: deadUser });
    await row.waitFor();
    assert.match(await row.textContent(), /provider_rejected/);
    await labelled("dead letters");
    await shot("dead-letters");
    await row.getByRole("button", { name: `Replay the delivery to ${deadUser}` }).click();
    await row.locator(".state .badge.replayed").waitFor();
    await page.waitForSelector("#toast .note:text('Replayed')");
  });

  let scheduleUrl;
  await step("create a campaign: the cron preview follows the typing and shows errors", async () => {
    await page.click("nav a[data-section=campaigns]");
    await page.click("#new-campaign");
    await page.waitForSelector("#cron-preview ol li");
    await labelled("new campaign");
    await page.fill("input[name=cron]", "61 9 * * *");
    await page.waitForSelector("[data-error-for=cron]:not(:empty)");
    assert.equal(await page.getAttribute("input[name=cron]", "aria-invalid"), "true");
    await page.fill("input[name=cron]", "30 8 * * MON-FRI");
    await page.fill("input[name=timezone]", "Europe/Paris");
    await page.waitForFunction(() => !document.querySelector("[data-error-for=cron]").textContent
      && document.querySelectorAll("#cron-preview li").length === 5
      && [...document.querySelectorAll("#cron-preview li time")].every((t) => /T0[67]:30:00Z$/.test(t.getAttribute("datetime"))));
    await page.fill("input[name=name]", campaignName);
    await page.fill("input[name=event_type]", "greeting");
    await page.fill("input[name=user_ids]", findUser);
    await page.check("input[name=channels][value=email]");
    await shot("campaign-new");
    await page.click("main button[type=submit]");
    await page.waitForURL(/#\/campaigns\/[^/]+$/);
    scheduleUrl = page.url();
    await page.waitForSelector("#campaign-status .badge.active");
    assert.equal(await page.locator("#next-fires li").count(), 5);
    await shot("campaign");
  });

  await step("pause the campaign", async () => {
    await page.click("#pause");
    await page.waitForSelector("#campaign-status .badge.paused");
    await page.waitForSelector("#resume");
    await page.click("nav a[data-section=campaigns]");
    const row = page.locator("tr[data-schedule]", { hasText: campaignName });
    await row.locator(".badge.paused").waitFor();
    await shot("campaigns");
    assert.ok(scheduleUrl);
  });

  await step("edit a template, see a compile error, preview the draft, save it", async () => {
    await page.click("nav a[data-section=templates]");
    await page.click("a[href='#/templates/greeting/email']");
    await page.waitForSelector("#part-subject");
    assert.equal(await page.inputValue("#part-subject"), "Hello {{user.first_name}}");
    await labelled("template");
    await page.fill("#part-subject", "Welcome {{user.first_name");
    await page.click("#preview");
    await page.waitForSelector("#part-subject-error:not(:empty)");
    await page.fill("#part-subject", "Welcome aboard, {{user.first_name}}");
    await page.click("#preview");
    await page.waitForSelector("#template-preview .error-box:has-text('payload.note')");
    await page.fill("#sample-payload", JSON.stringify({ note: "from the console" }));
    await page.click("#preview");
    await page.waitForSelector("#template-preview [data-preview=subject]:text('Welcome aboard, Ana')");
    await shot("template");
    await page.click("main button[type=submit]");
    await page.waitForSelector("#toast .note:text('Template saved')");
  });

  await step("add a status webhook endpoint, see its secret once, its tries, and replay", async () => {
    await page.click("nav a[data-section=webhooks]");
    await page.waitForSelector("#new-endpoint");
    await labelled("webhooks");
    await page.fill("#new-endpoint input[name=url]", "ftp://nowhere");
    await page.check("#new-endpoint input[name=events][value='message.sent']");
    await page.click("#new-endpoint button[type=submit]");
    await page.waitForSelector("#new-endpoint [aria-invalid=true], #new-endpoint .form-errors :text('url')");
    await page.fill("#new-endpoint input[name=url]", hookUrl);
    await page.click("#new-endpoint button[type=submit]");
    const secret = await page.locator("#secret code").textContent();
    assert.match(secret, /^whsec_/);
    await page.click("#secret + p a");
    await page.waitForSelector("#rotate");
    // An event after the endpoint exists: its message.sent arrives and is listed as a try.
    await post("/v1/events", { event_type: "greeting", channels: ["email"], recipients: { user_ids: [findUser] }, payload: { note: "hook" } });
    for (let i = 0; i < 100 && !(await page.locator("table[aria-label=Tries] tbody tr").count()); i++) {
      await page.waitForTimeout(200);
      await page.evaluate(() => window.dispatchEvent(new HashChangeEvent("hashchange")));
    }
    assert.match(await page.locator("table[aria-label=Tries] tbody tr").first().textContent(), /message\.sent.*200/);
    assert.equal(await page.locator("#secret").count(), 0, "the secret is not shown again");
    await labelled("endpoint");
    await shot("webhook");
    await page.fill("#replay input[name=since]", "2026-01-01T00:00");
    await page.check("#replay input[name=include_delivered]");
    await page.click("#replay button[type=submit]");
    await page.waitForSelector("#toast .note:text('Replaying 1 message')");
    await page.click("nav a[data-section=webhooks]");
    await page.locator("tr[data-endpoint]").first().waitFor();
    await shot("webhooks");
  });

  assert.deepEqual(problems, [], "no script errors, no request off the machine");
  console.log(`all ${n} steps passed; screenshots in ${shots}`);
} catch (e) {
  await page.screenshot({ path: `${shots}/failure.png`, fullPage: true }).catch(() => {});
  console.error(`not ok - ${e.stack || e}`);
  console.error(`at ${page.url()}:\n${await page.$eval("main", (m) => m.outerHTML.slice(0, 4000)).catch(() => "(no page)")}`);
  if (problems.length) console.error(problems.join("\n"));
  process.exitCode = 1;
} finally {
  await browser.close();
}
