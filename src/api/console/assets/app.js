// herald console: hash-routed pages over the JSON API. No framework, no build step;
// every element is made with h() (text is never parsed as HTML).
"use strict";

// ---------- small helpers ----------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

const main = () => document.getElementById("main");
let pageToken = 0; // bumps on every navigation; late answers for an old page are dropped
const cleanups = [];

function render(...nodes) {
  main().replaceChildren(...nodes.flat());
}

function toast(text, bad) {
  const note = h("div", { class: bad ? "note bad" : "note" }, text);
  document.getElementById("toast").append(note);
  setTimeout(() => note.remove(), 5000);
}

function badge(status) {
  return status ? h("span", { class: `badge ${status}` }, status.replace(/_/g, " ")) : "";
}

const viewerZone = Intl.DateTimeFormat().resolvedOptions().timeZone;

function fmtTime(iso, zone) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString(undefined, {
    year: "numeric", month: "short", day: "2-digit", hour: "2-digit", minute: "2-digit",
    second: "2-digit", timeZone: zone || undefined, timeZoneName: zone ? "short" : undefined,
  });
}

function timeCell(iso) {
  return h("time", { datetime: iso || "" , title: iso || "" }, fmtTime(iso));
}

function num(n) {
  return n === null || n === undefined ? "—" : Number(n).toLocaleString();
}

function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) u.set(k, v);
  const t = u.toString();
  return t ? `?${t}` : "";
}

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || "http_" + status;
    this.details = e.details || [];
  }
}

async function api(path, opts = {}) {
  const init = { method: opts.method || "GET", headers: { "X-Herald-Console": "1", Accept: "application/json" }, credentials: "same-origin" };
  if (opts.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.body);
  }
  const r = await fetch(path, init);
  if (r.status === 401) {
    location.href = "/ui/login";
    throw new ApiError(401, { error: { code: "not_signed_in", message: "signed out" } });
  }
  const text = await r.text();
  const body = text ? JSON.parse(text) : null;
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}

function errorBox(err) {
  const details = (err.details || []).map((d) => h("li", {}, h("code", {}, d.field), ": ", d.message));
  return h("div", { class: "error-box", role: "alert" },
    h("strong", {}, err.message), " ", h("code", { class: "muted" }, `(${err.code || "error"})`),
    details.length ? h("ul", {}, details) : null);
}

function field(label, input, hint) {
  const id = input.id || `f-${label.toLowerCase().replace(/[^a-z0-9]+/g, "-")}`;
  input.id = id;
  const errId = `${id}-error`;
  input.setAttribute("aria-describedby", errId);
  return h("div", { class: "field" }, h("label", { for: id }, label), input,
    hint ? h("span", { class: "muted small" }, hint) : null,
    h("span", { class: "field-error", id: errId, "data-error-for": input.name || "" }));
}

function select(name, options, value, extra) {
  return h("select", { name, ...extra }, options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)));
}

// Puts the API's field errors next to their inputs (and returns the ones with no input).
function showFieldErrors(form, err) {
  form.querySelectorAll(".field-error").forEach((e) => (e.textContent = ""));
  form.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
  const rest = [];
  for (const d of err.details || []) {
    const name = String(d.field).split(/[.[]/)[0];
    const slot = form.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
    if (slot) {
      slot.textContent = d.message;
      const input = form.querySelector(`[name="${CSS.escape(name)}"]`);
      if (input) input.setAttribute("aria-invalid", "true");
    } else rest.push(d);
  }
  return rest;
}

function formValues(form) {
  const out = {};
  for (const [k, v] of new FormData(form).entries()) out[k] = typeof v === "string" ? v.trim() : v;
  return out;
}

const STATUSES = ["queued", "sending", "sent", "delivered", "bounced", "undelivered", "failed", "retrying", "dead", "skipped", "deferred"];
const CHANNELS = ["email", "sms", "push", "webhook", "in_app"];
const STATUS_COLORS = { sent: "#16a34a", delivered: "#15803d", failed: "#dc2626", bounced: "#b91c1c", undelivered: "#9f1239", dead: "#7f1d1d", retrying: "#d97706", deferred: "#f59e0b", skipped: "#9ca3af", queued: "#60a5fa", sending: "#2563eb" };
const CHANNEL_COLORS = { email: "#2563eb", sms: "#16a34a", push: "#9333ea", webhook: "#ea580c", in_app: "#0891b2" };

// ---------- routing ----------

const routes = [
  [/^#\/deliveries\/([^/?]+)$/, deliveryPage],
  [/^#\/deliveries(\?.*)?$/, deliveriesPage],
  [/^#\/live(\?.*)?$/, livePage],
  [/^#\/overview(\?.*)?$/, overviewPage],
  [/^#\/dead-letters(\?.*)?$/, deadLettersPage],
  [/^#\/campaigns\/new$/, (m) => campaignForm(null)],
  [/^#\/campaigns\/([^/?]+)\/edit$/, (m) => campaignForm(decodeURIComponent(m[1]))],
  [/^#\/campaigns\/([^/?]+)$/, campaignPage],
  [/^#\/campaigns(\?.*)?$/, campaignsPage],
  [/^#\/templates\/([^/?]+)\/([^/?]+)(\?.*)?$/, templatePage],
  [/^#\/templates(\?.*)?$/, templatesPage],
  [/^#\/webhooks\/([^/?]+)$/, endpointPage],
  [/^#\/webhooks(\?.*)?$/, endpointsPage],
];

function hashParams() {
  const i = location.hash.indexOf("?");
  return new URLSearchParams(i < 0 ? "" : location.hash.slice(i + 1));
}

async function route() {
  while (cleanups.length) cleanups.pop()();
  const token = ++pageToken;
  const hash = location.hash || "#/deliveries";
  const section = hash.slice(2).split(/[/?]/)[0];
  document.querySelectorAll("nav a").forEach((a) => {
    if (a.dataset.section === section) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  const found = routes.find(([re]) => re.test(hash));
  if (!found) {
    location.hash = "#/deliveries";
    return;
  }
  try {
    await found[1](hash.match(found[0]), token);
  } catch (err) {
    if (token === pageToken) render(h("h1", {}, "Something went wrong"), errorBox(err));
  }
}

const current = (token) => token === pageToken;

// ---------- deliveries ----------

async function deliveriesPage(m, token) {
  const p = hashParams();
  const filters = {};
  for (const k of ["user_id", "status", "channel", "event_type", "schedule_id", "notification_id", "since", "until"]) filters[k] = p.get(k) || "";
  const cursor = p.get("cursor") || "";
  const local = (iso) => (iso ? new Date(iso).toISOString().slice(0, 16) : "");
  const form = h("form", { class: "filters card", role: "search", "aria-label": "Filter deliveries" },
    field("User", h("input", { name: "user_id", value: filters.user_id, placeholder: "user id" })),
    field("Status", select("status", [["", "any"], ...STATUSES.map((x) => [x, x])], filters.status)),
    field("Channel", select("channel", [["", "any"], ...CHANNELS.map((x) => [x, x])], filters.channel)),
    field("Event type", h("input", { name: "event_type", value: filters.event_type })),
    field("Campaign (schedule id)", h("input", { name: "schedule_id", value: filters.schedule_id })),
    field("Notification", h("input", { name: "notification_id", value: filters.notification_id })),
    field("From (UTC)", h("input", { name: "since", type: "datetime-local", value: local(filters.since) })),
    field("To (UTC)", h("input", { name: "until", type: "datetime-local", value: local(filters.until) })),
    h("div", { class: "actions" }, h("button", { class: "primary", type: "submit" }, "Search"),
      h("button", { type: "button", onclick: () => (location.hash = "#/deliveries") }, "Clear")));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const v = formValues(form);
    for (const k of ["since", "until"]) if (v[k]) v[k] = `${v[k]}:00Z`;
    location.hash = `#/deliveries${qs(v)}`;
  });
  const results = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  render(h("h1", {}, "Deliveries"), form, results);
  let page;
  try {
    page = await api(`/v1/deliveries${qs({ ...filters, cursor, limit: 50 })}`);
  } catch (err) {
    if (current(token)) results.replaceChildren(errorBox(err));
    return;
  }
  if (!current(token)) return;
  const rows = page.items.map((d) =>
    h("tr", { class: "clickable", "data-delivery": d.delivery_id, onclick: () => (location.hash = `#/deliveries/${d.delivery_id}`) },
      h("td", {}, timeCell(d.created_at)),
      h("td", {}, h("a", { href: `#/deliveries/${encodeURIComponent(d.delivery_id)}` }, d.user_id)),
      h("td", {}, d.channel), h("td", {}, d.event_type), h("td", {}, badge(d.status)),
      h("td", {}, d.reason || ""), h("td", { class: "num" }, d.attempts), h("td", {}, d.provider || "")));
  const nav = h("div", { class: "actions" });
  if (cursor) nav.append(h("button", { type: "button", onclick: () => history.back() }, "← Newer"));
  if (page.next_cursor) {
    nav.append(h("button", { type: "button", onclick: () => {
      const q = hashParams(); q.set("cursor", page.next_cursor); location.hash = `#/deliveries?${q}`;
    } }, "Older →"));
  }
  results.replaceChildren(
    rows.length
      ? h("div", { class: "table-wrap" }, h("table", { "aria-label": "Deliveries, newest first" },
          h("thead", {}, h("tr", {}, ["Created", "User", "Channel", "Event type", "Status", "Reason", "Attempts", "Provider"].map((t) => h("th", { scope: "col", class: t === "Attempts" ? "num" : "" }, t)))),
          h("tbody", {}, rows)))
      : h("p", { class: "muted" }, "No deliveries match."),
    nav);
}

function renderedPreview(channel, r) {
  if (channel === "email") {
    const frame = h("iframe", { class: "preview", sandbox: "", title: "Email HTML preview", srcdoc: r.html || "" });
    return h("div", {},
      h("dl", { class: "facts" }, h("dt", {}, "Subject"), h("dd", { "data-preview": "subject" }, r.subject)),
      r.html ? [h("h3", {}, "HTML"), frame] : null,
      r.text ? [h("h3", {}, "Text"), h("pre", { "data-preview": "text" }, r.text)] : null);
  }
  if (channel === "sms") return h("div", {}, h("pre", { "data-preview": "text" }, r.text), h("p", { class: "muted" }, `${r.segments} segment(s)`));
  if (channel === "push") return h("div", {}, h("dl", { class: "facts" }, h("dt", {}, "Title"), h("dd", {}, r.title), h("dt", {}, "Body"), h("dd", {}, r.body)), h("pre", {}, JSON.stringify(r.data, null, 2)));
  if (channel === "in_app") return h("div", {}, h("dl", { class: "facts" }, h("dt", {}, "Title"), h("dd", {}, r.title), h("dt", {}, "Body"), h("dd", {}, r.body),
    h("dt", {}, "Link"), h("dd", {}, r.url || "—")), r.data ? h("pre", {}, JSON.stringify(r.data, null, 2)) : null);
  return h("pre", {}, r.body);
}

async function deliveryPage(m, token) {
  const id = decodeURIComponent(m[1]);
  const d = await api(`/v1/deliveries/${encodeURIComponent(id)}`);
  if (!current(token)) return;
  const preview = h("div", {}, h("p", { class: "muted" }, "Rendering…"));
  const attempts = d.attempt_log.map((a, i) =>
    h("tr", {}, h("td", { class: "num" }, i + 1), h("td", {}, timeCell(a.started_at)), h("td", {}, a.provider || "—"),
      h("td", {}, badge(a.status)), h("td", { class: "num" }, `${a.duration_ms} ms`),
      h("td", {}, a.error || ""), h("td", {}, a.response ? h("pre", {}, JSON.stringify(a.response, null, 2)) : "")));
  render(
    h("p", {}, h("a", { href: "#/deliveries" }, "← Deliveries")),
    h("h1", {}, "Delivery ", h("span", { class: "mono" }, d.delivery_id)),
    h("div", { class: "row" },
      h("section", { class: "card", "aria-label": "Summary" },
        h("dl", { class: "facts" },
          h("dt", {}, "Status"), h("dd", { id: "delivery-status" }, badge(d.status), d.reason ? ` — ${d.reason}` : ""),
          h("dt", {}, "User"), h("dd", {}, h("a", { href: `#/deliveries?user_id=${encodeURIComponent(d.user_id)}` }, d.user_id)),
          h("dt", {}, "Channel"), h("dd", {}, d.channel),
          h("dt", {}, "Event type"), h("dd", {}, d.event_type),
          h("dt", {}, "Priority"), h("dd", {}, d.priority),
          h("dt", {}, "Provider"), h("dd", {}, d.provider || "—"),
          h("dt", {}, "Notification"), h("dd", {}, h("a", { href: `#/deliveries?notification_id=${encodeURIComponent(d.notification_id)}` }, d.notification_id)),
          d.schedule_id ? [h("dt", {}, "Campaign"), h("dd", {}, h("a", { href: `#/campaigns/${encodeURIComponent(d.schedule_id)}` }, d.schedule_id))] : null,
          h("dt", {}, "Created"), h("dd", {}, timeCell(d.created_at)),
          h("dt", {}, "Updated"), h("dd", {}, timeCell(d.updated_at)),
          h("dt", {}, "Sent"), h("dd", {}, timeCell(d.sent_at)),
          d.complained_at ? [h("dt", {}, "Complained"), h("dd", {}, timeCell(d.complained_at))] : null,
          d.unsubscribed_at ? [h("dt", {}, "Unsubscribed"), h("dd", {}, timeCell(d.unsubscribed_at))] : null,
          d.seen_at ? [h("dt", {}, "Seen"), h("dd", {}, timeCell(d.seen_at))] : null,
          d.read_at ? [h("dt", {}, "Read"), h("dd", {}, timeCell(d.read_at))] : null,
          h("dt", {}, "Last error"), h("dd", {}, d.last_error || "—"))),
      h("section", { class: "card", "aria-label": "Message preview" }, h("h2", {}, "Message"),
        h("p", { class: "muted small" }, "Rendered now from the current template and the recipient's current profile."), preview)),
    h("h2", {}, `Attempts (${d.attempt_log.length})`),
    attempts.length
      ? h("div", { class: "table-wrap" }, h("table", { "aria-label": "Attempts" },
          h("thead", {}, h("tr", {}, ["#", "Started", "Provider", "Status", "Took", "Error", "Provider's answer"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, attempts)))
      : h("p", { class: "muted" }, "No attempt yet."),
    h("h2", {}, `Provider feedback (${d.feedback.length})`),
    d.feedback.length
      ? h("div", { class: "table-wrap" }, h("table", { "aria-label": "Provider feedback" },
          h("thead", {}, h("tr", {}, ["At", "Provider", "Report", "Detail"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, d.feedback.map((f) => h("tr", {}, h("td", {}, timeCell(f.at)), h("td", {}, f.provider),
            h("td", {}, badge(f.kind)), h("td", {}, f.detail || ""))))))
      : h("p", { class: "muted" }, "No report from the provider yet."));
  try {
    const p = await api(`/v1/deliveries/${encodeURIComponent(id)}/preview`);
    if (current(token)) preview.replaceChildren(renderedPreview(p.channel, p.rendered));
  } catch (err) {
    if (current(token)) preview.replaceChildren(errorBox(err));
  }
}

// ---------- live ----------

async function livePage(m, token) {
  const p = hashParams();
  const status = p.get("status") || "";
  const channel = p.get("channel") || "";
  const state = h("span", { class: "live-state off", id: "live-state" }, "connecting…");
  const held = [];
  let paused = false;
  const heldNote = h("span", { class: "muted", id: "live-held" });
  const body = h("tbody", {});
  const pause = h("button", { type: "button", id: "live-pause", "aria-pressed": "false", onclick: () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused) {
      held.splice(0).forEach(addRow);
      heldNote.textContent = "";
    }
  } }, "Pause");
  const filters = h("form", { class: "filters" },
    field("Status", select("status", [["", "any"], ...STATUSES.map((x) => [x, x])], status)),
    field("Channel", select("channel", [["", "any"], ...CHANNELS.map((x) => [x, x])], channel)));
  filters.addEventListener("change", () => (location.hash = `#/live${qs(formValues(filters))}`));
  function addRow(d) {
    body.prepend(h("tr", { class: "clickable", onclick: () => (location.hash = `#/deliveries/${d.delivery_id}`) },
      h("td", {}, timeCell(d.updated_at)), h("td", {}, h("a", { href: `#/deliveries/${encodeURIComponent(d.delivery_id)}` }, d.user_id)),
      h("td", {}, d.channel), h("td", {}, d.event_type), h("td", {}, badge(d.status)), h("td", {}, d.reason || "")));
    while (body.children.length > 300) body.lastChild.remove();
  }
  render(h("h1", {}, "Live"),
    h("div", { class: "card" }, h("div", { class: "actions" }, filters, pause, state, heldNote),
      h("p", { class: "muted small" }, "Every status change as it is committed (newest on top; the last 300).")),
    h("div", { class: "table-wrap" }, h("table", { "aria-label": "Status changes, newest first" },
      h("thead", {}, h("tr", {}, ["Changed", "User", "Channel", "Event type", "Status", "Reason"].map((t) => h("th", { scope: "col" }, t)))), body)));
  const source = new EventSource(`/v1/deliveries/stream${qs({ status, channel })}`);
  cleanups.push(() => source.close());
  source.onopen = () => { state.className = "live-state on"; state.textContent = "connected"; };
  source.onerror = () => { state.className = "live-state off"; state.textContent = "reconnecting…"; };
  source.addEventListener("delivery", (e) => {
    const d = JSON.parse(e.data);
    if (paused) {
      held.push(d);
      heldNote.textContent = `${held.length} change(s) held while paused`;
    } else addRow(d);
  });
}

// ---------- overview ----------

// One bar per hour of `hours` (epoch ms, every hour of the range, so a quiet hour shows
// as a gap), stacked by key; the same numbers as a table for screen readers.
function stackedBars(rows, keys, colors, label, hours) {
  const W = 640, H = 220, L = 44, B = 24, T = 8;
  const counts = new Map(); // "hour|key" -> count
  for (const r of rows) {
    const id = `${Date.parse(r.hour)}|${r.key}`;
    counts.set(id, (counts.get(id) || 0) + r.count);
  }
  const at = (t, k) => counts.get(`${t}|${k}`) || 0;
  const total = (t) => keys.reduce((a, k) => a + at(t, k), 0);
  const max = Math.max(1, ...hours.map(total));
  const bw = (W - L - 8) / Math.max(1, hours.length);
  const tick = (t) => new Date(t).toLocaleString(undefined, hours.length > 24 ? { weekday: "short", hour: "2-digit" } : { hour: "2-digit", minute: "2-digit" });
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": label });
  for (let i = 0; i <= 4; i++) {
    const y = T + (H - B - T) * (1 - i / 4);
    svg.append(s("line", { x1: L, x2: W, y1: y, y2: y, stroke: "#e5e7eb" }), s("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, num(Math.round((max * i) / 4))));
  }
  hours.forEach((t, i) => {
    let y = H - B;
    for (const k of keys) {
      const c = at(t, k);
      if (!c) continue;
      const hgt = ((H - B - T) * c) / max;
      y -= hgt;
      svg.append(s("rect", { x: L + i * bw + 0.5, y, width: Math.max(1, bw - 1), height: hgt, fill: colors[k] || "#94a3b8" },
        s("title", {}, `${fmtTime(t)} · ${k}: ${num(c)}`)));
    }
    if (i % Math.ceil(hours.length / 8) === 0) {
      svg.append(s("text", { x: L + i * bw + bw / 2, y: H - 6, "text-anchor": "middle" }, tick(t)));
    }
  });
  const shown = keys.filter((k) => hours.some((t) => at(t, k)));
  const busy = hours.filter((t) => total(t));
  const legend = h("div", { class: "legend" }, shown.map((k) => h("span", { style: `--c:${colors[k] || "#94a3b8"}` }, k)));
  const table = h("details", {}, h("summary", {}, "As a table"),
    h("table", {}, h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Hour"), shown.map((k) => h("th", { scope: "col", class: "num" }, k)))),
      h("tbody", {}, busy.map((t) => h("tr", {}, h("td", {}, fmtTime(t)), shown.map((k) => h("td", { class: "num" }, num(at(t, k)))))))));
  return h("div", {}, legend, busy.length ? svg : h("p", { class: "muted" }, "No deliveries in this range."), table);
}

function hbars(items, label, fmt, color) {
  const W = 520, row = 26, L = 150;
  const max = Math.max(1e-9, ...items.map((i) => i.value || 0));
  const svg = s("svg", { viewBox: `0 0 ${W} ${Math.max(row, items.length * row)}`, class: "chart", role: "img", "aria-label": label });
  items.forEach((it, i) => {
    const w = ((W - L - 70) * (it.value || 0)) / max;
    svg.append(s("text", { x: L - 6, y: i * row + 17, "text-anchor": "end" }, it.label),
      s("rect", { x: L, y: i * row + 5, width: Math.max(1, w), height: row - 10, fill: it.color || color, rx: 3 }, s("title", {}, `${it.label}: ${fmt(it.value)}`)),
      s("text", { x: L + w + 6, y: i * row + 17 }, fmt(it.value)));
  });
  return items.length ? svg : h("p", { class: "muted" }, "Nothing yet.");
}

async function overviewPage(m, token) {
  const range = hashParams().get("range") || "24h";
  const hoursBack = { "6h": 6, "24h": 24, "7d": 168 }[range] || 24;
  const firstHour = Math.floor((Date.now() - (hoursBack - 1) * 3600e3) / 3600e3) * 3600e3;
  const since = new Date(firstHour).toISOString();
  const hours = Array.from({ length: hoursBack }, (_, i) => firstHour + i * 3600e3);
  const picker = select("range", [["6h", "last 6 hours"], ["24h", "last 24 hours"], ["7d", "last 7 days"]], range, { id: "range" });
  picker.addEventListener("change", () => (location.hash = `#/overview?range=${picker.value}`));
  const queues = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  render(h("h1", {}, "Overview"), h("div", { class: "actions" }, h("label", { for: "range" }, "Range"), picker),
    h("p", { class: "muted" }, "Loading…"));
  const [byStatus, byChannel] = await Promise.all([
    api(`/v1/stats/deliveries${qs({ since, group_by: "hour,status" })}`),
    api(`/v1/stats/deliveries${qs({ since, group_by: "hour,channel" })}`),
  ]);
  if (!current(token)) return;
  const channels = Object.entries(byChannel.channels || {});
  const sent = channels.reduce((a, [, c]) => a + c.sent, 0);
  const failed = channels.reduce((a, [, c]) => a + c.failed + c.dead, 0);
  const pending = channels.reduce((a, [, c]) => a + c.pending, 0);
  // Per channel and provider: outcomes, rates, and what recipients reported.
  const providers = channels.flatMap(([c, v]) => Object.entries(v.providers || {}).map(([p, o]) => [`${c} · ${p}`, o]));
  const pct = (v) => (v === null || v === undefined ? "—" : `${(v * 100).toFixed(1)}%`);
  const ms = (v) => (v === null || v === undefined ? "—" : `${num(Math.round(v))} ms`);
  render(
    h("h1", {}, "Overview"),
    h("div", { class: "actions" }, h("label", { for: "range" }, "Range"), picker),
    h("div", { class: "kpis" },
      h("div", { class: "kpi" }, h("div", { class: "v", id: "kpi-total" }, num(byStatus.total)), h("div", { class: "k" }, "deliveries")),
      h("div", { class: "kpi" }, h("div", { class: "v" }, num(sent)), h("div", { class: "k" }, "sent")),
      h("div", { class: "kpi" }, h("div", { class: "v" }, num(failed)), h("div", { class: "k" }, "failed or dead")),
      h("div", { class: "kpi" }, h("div", { class: "v" }, num(pending)), h("div", { class: "k" }, "pending"))),
    h("div", { class: "row" },
      h("section", { class: "card", "aria-label": "Deliveries per hour by status" }, h("h2", {}, "Deliveries per hour, by status"),
        stackedBars(byStatus.rows.map((r) => ({ hour: r.hour, key: r.status, count: r.count })), STATUSES, STATUS_COLORS, "Deliveries per hour by status", hours)),
      h("section", { class: "card", "aria-label": "Deliveries per hour by channel" }, h("h2", {}, "Deliveries per hour, by channel"),
        stackedBars(byChannel.rows.map((r) => ({ hour: r.hour, key: r.channel, count: r.count })), CHANNELS, CHANNEL_COLORS, "Deliveries per hour by channel", hours))),
    h("div", { class: "row" },
      h("section", { class: "card", "aria-label": "Success rate per channel" }, h("h2", {}, "Success rate per channel"),
        hbars(channels.map(([c, v]) => ({ label: c, value: v.success_rate, color: CHANNEL_COLORS[c] })), "Success rate per channel", pct, "#2563eb")),
      h("section", { class: "card", "aria-label": "Success rate per provider" }, h("h2", {}, "Success rate per provider"),
        hbars(providers.map(([k, v]) => ({ label: k, value: v.success_rate })), "Success rate per provider", pct, "#0d9488"))),
    h("section", { class: "card", "aria-label": "Deliverability" }, h("h2", {}, "Deliverability"),
      h("p", { class: "muted small" }, "What the providers and recipients reported after sending. Mailbox providers expect complaints under 0.3%."),
      providers.length
        ? h("div", { class: "table-wrap" }, h("table", { class: "small", "aria-label": "Deliverability per provider" },
            h("thead", {}, h("tr", {}, ["Channel · provider", "Delivered", "Bounced", "Undelivered", "Complaints", "Unsubscribes", "Bounce rate", "Complaint rate"]
              .map((t, i) => h("th", { scope: "col", class: i ? "num" : "" }, t)))),
            h("tbody", {}, providers.map(([k, v]) => h("tr", {}, h("td", {}, k),
              [v.delivered, v.bounced, v.undelivered, v.complained, v.unsubscribed].map((n) => h("td", { class: "num" }, num(n))),
              h("td", { class: "num" }, pct(v.bounce_rate)),
              h("td", { class: v.complaint_rate >= 0.003 ? "num bad" : "num" }, pct(v.complaint_rate)))))))
        : h("p", { class: "muted" }, "Nothing handed to a provider in this range.")),
    h("div", { class: "row" },
      h("section", { class: "card", "aria-label": "Send latency" }, h("h2", {}, "Send latency (accept → sent)"),
        hbars(channels.flatMap(([c, v]) => ["p50", "p90", "p99"].map((p) => ({ label: `${c} ${p}`, value: (v.send_latency_ms || {})[p], color: CHANNEL_COLORS[c] }))),
          "Send latency percentiles per channel", ms, "#2563eb"),
        h("table", { class: "small" }, h("thead", {}, h("tr", {}, ["Channel", "p50", "p90", "p99"].map((t) => h("th", { scope: "col", class: t === "Channel" ? "" : "num" }, t)))),
          h("tbody", {}, channels.map(([c, v]) => h("tr", {}, h("td", {}, c), ["p50", "p90", "p99"].map((p) => h("td", { class: "num" }, ms((v.send_latency_ms || {})[p])))))))),
      h("section", { class: "card", "aria-label": "Queue depth" }, h("h2", {}, "Queue depth per priority lane"), queues,
        h("p", { class: "muted small" }, "Refreshed every 5 seconds."))));
  const refresh = async () => {
    try {
      const q = await api("/v1/queues");
      if (!current(token)) return;
      const lanes = Object.entries(q.lanes).map(([lane, depth]) => ({ label: lane, value: depth, color: { high: "#dc2626", normal: "#2563eb", low: "#64748b" }[lane] }));
      lanes.push({ label: "outbox", value: q.outbox, color: "#a855f7" });
      queues.replaceChildren(hbars(lanes, "Jobs waiting per lane", num, "#2563eb"));
    } catch (err) {
      if (current(token)) queues.replaceChildren(errorBox(err));
    }
  };
  await refresh();
  const timer = setInterval(refresh, 5000);
  cleanups.push(() => clearInterval(timer));
}

// ---------- dead letters ----------

async function deadLettersPage(m, token) {
  const p = hashParams();
  const filters = { notification_id: p.get("notification_id") || "", channel: p.get("channel") || "", reason: p.get("reason") || "" };
  const include = p.get("include_replayed") === "true";
  const form = h("form", { class: "filters card", role: "search", "aria-label": "Filter dead letters" },
    field("Notification", h("input", { name: "notification_id", value: filters.notification_id })),
    field("Channel", select("channel", [["", "any"], ...CHANNELS.map((x) => [x, x])], filters.channel)),
    field("Reason", h("input", { name: "reason", value: filters.reason })),
    h("div", { class: "checks" }, h("label", {}, h("input", { type: "checkbox", name: "include_replayed", value: "true", checked: include }), "include replayed")),
    h("div", { class: "actions" }, h("button", { class: "primary", type: "submit" }, "Filter")));
  form.addEventListener("submit", (e) => { e.preventDefault(); location.hash = `#/dead-letters${qs(formValues(form))}`; });
  const list = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  render(h("h1", {}, "Dead letters"), form, list);
  const { items } = await api(`/v1/dead-letters${qs({ ...filters, include_replayed: include ? "true" : "", limit: 200 })}`);
  if (!current(token)) return;
  const replayOne = async (letter, button) => {
    button.disabled = true;
    try {
      await api(`/v1/dead-letters/${encodeURIComponent(letter.dead_letter_id)}/replay`, { method: "POST" });
      toast(`Replayed the delivery to ${letter.user_id}`);
      button.closest("tr").querySelector(".state").replaceChildren(badge("replayed"));
      button.remove();
    } catch (err) {
      button.disabled = false;
      toast(`${err.message} (${err.code})`, true);
    }
  };
  const pendingCount = items.filter((l) => l.status !== "replayed").length;
  const bulk = h("button", { type: "button", class: "danger", id: "replay-all", disabled: pendingCount === 0, onclick: async () => {
    if (!confirm(`Replay every pending dead letter matching these filters (${pendingCount} shown)?`)) return;
    bulk.disabled = true;
    try {
      const r = await api("/v1/dead-letters/replay", { method: "POST", body: Object.fromEntries(Object.entries(filters).filter(([, v]) => v)) });
      toast(`Replayed ${r.replayed} dead letter(s)`);
      route();
    } catch (err) {
      bulk.disabled = false;
      toast(`${err.message} (${err.code})`, true);
    }
  } }, "Replay all matching");
  list.replaceChildren(
    h("div", { class: "actions" }, bulk, h("span", { class: "muted" }, `${items.length} shown`)),
    items.length
      ? h("div", { class: "table-wrap" }, h("table", { "aria-label": "Dead letters" },
          h("thead", {}, h("tr", {}, ["Died", "User", "Channel", "Event type", "Reason", "Last error", "Attempts", "State", ""].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, items.map((l) => {
            const btn = h("button", { type: "button", "aria-label": `Replay the delivery to ${l.user_id}` }, "Replay");
            btn.addEventListener("click", () => replayOne(l, btn));
            return h("tr", { "data-letter": l.dead_letter_id },
              h("td", {}, timeCell(l.created_at)), h("td", {}, h("a", { href: `#/deliveries/${encodeURIComponent(l.delivery_id)}` }, l.user_id)),
              h("td", {}, l.channel), h("td", {}, l.event_type), h("td", {}, l.reason), h("td", { class: "small" }, l.last_error || ""),
              h("td", { class: "num" }, l.attempts), h("td", { class: "state" }, badge(l.status), l.replay_count ? h("span", { class: "muted small" }, ` ×${l.replay_count}`) : ""),
              h("td", {}, l.status === "replayed" ? "" : btn));
          }))))
      : h("p", { class: "muted" }, "No dead letters. Everything was delivered or accounted for."));
}

// ---------- campaigns ----------

function firesList(items, zone) {
  return h("ol", { class: "fires" }, items.map((f) => h("li", {},
    h("time", { datetime: f.at }, fmtTime(f.at, zone)), h("span", { class: "muted" }, ` · your time ${fmtTime(f.at, viewerZone)}`))));
}

// A click handler that pauses, resumes or triggers a schedule, then redraws the page.
function scheduleAction(id, what) {
  return async (e) => {
    e.target.disabled = true;
    try {
      const r = await api(`/v1/schedules/${encodeURIComponent(id)}/${what}`, { method: "POST" });
      toast(what === "trigger" ? `Triggered: notification ${r.notification_id || "—"}` : `Campaign ${what === "pause" ? "paused" : "resumed"}`);
      route();
    } catch (err) {
      e.target.disabled = false;
      toast(`${err.message} (${err.code})`, true);
    }
  };
}

async function campaignsPage(m, token) {
  const { items } = await api("/v1/schedules?limit=500");
  if (!current(token)) return;
  const act = scheduleAction;
  render(h("h1", {}, "Campaigns"),
    h("div", { class: "actions" }, h("a", { href: "#/campaigns/new", class: "button primary", id: "new-campaign" }, "New campaign")),
    items.length
      ? h("div", { class: "table-wrap" }, h("table", { "aria-label": "Campaigns" },
          h("thead", {}, h("tr", {}, ["Name", "Status", "Cron", "Zone", "Next fire (its zone)", "Next fire (your time)", "Last fire", "Fired", ""].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, items.map((c) => h("tr", { "data-schedule": c.schedule_id },
            h("td", {}, h("a", { href: `#/campaigns/${encodeURIComponent(c.schedule_id)}` }, c.name)), h("td", {}, badge(c.status)),
            h("td", { class: "mono" }, c.cron), h("td", {}, c.timezone), h("td", {}, fmtTime(c.next_fire_at, c.timezone)),
            h("td", {}, fmtTime(c.next_fire_at, viewerZone)), h("td", {}, fmtTime(c.last_fire_at, c.timezone)), h("td", { class: "num" }, num(c.fire_count)),
            h("td", {}, h("div", { class: "actions" },
              c.status === "active" ? h("button", { type: "button", onclick: act(c.schedule_id, "pause") }, "Pause") : null,
              c.status === "paused" ? h("button", { type: "button", onclick: act(c.schedule_id, "resume") }, "Resume") : null,
              h("button", { type: "button", onclick: act(c.schedule_id, "trigger") }, "Trigger"))))))))
      : h("p", { class: "muted" }, "No campaigns yet."));
}

async function campaignPage(m, token) {
  const id = decodeURIComponent(m[1]);
  const [c, next, runs] = await Promise.all([
    api(`/v1/schedules/${encodeURIComponent(id)}`),
    api(`/v1/schedules/${encodeURIComponent(id)}/next?count=5`),
    api(`/v1/schedules/${encodeURIComponent(id)}/runs?limit=50`),
  ]);
  if (!current(token)) return;
  const act = (what) => scheduleAction(id, what);
  const r = c.recipients || {};
  render(
    h("p", {}, h("a", { href: "#/campaigns" }, "← Campaigns")),
    h("h1", {}, c.name, " ", h("span", { id: "campaign-status" }, badge(c.status))),
    h("div", { class: "actions" },
      c.status === "active" ? h("button", { type: "button", id: "pause", onclick: act("pause") }, "Pause") : null,
      c.status === "paused" ? h("button", { type: "button", id: "resume", onclick: act("resume") }, "Resume") : null,
      h("button", { type: "button", id: "trigger", onclick: act("trigger") }, "Trigger now"),
      h("a", { href: `#/campaigns/${encodeURIComponent(id)}/edit` }, "Edit"),
      h("a", { href: `#/deliveries?schedule_id=${encodeURIComponent(id)}` }, "Its deliveries")),
    h("div", { class: "row" },
      h("section", { class: "card", "aria-label": "Definition" }, h("h2", {}, "Definition"),
        h("dl", { class: "facts" },
          h("dt", {}, "Cron"), h("dd", { class: "mono" }, c.cron), h("dt", {}, "Zone"), h("dd", {}, c.timezone),
          h("dt", {}, "Event type"), h("dd", {}, c.event_type), h("dt", {}, "Priority"), h("dd", {}, c.priority),
          h("dt", {}, "Recipients"), h("dd", {}, [
            r.user_ids && r.user_ids.length ? `users: ${r.user_ids.join(", ")}` : null,
            r.group_id ? ` group: ${r.group_id}` : null,
            r.segment ? ` segment: ${JSON.stringify(r.segment)}` : null]),
          h("dt", {}, "Channels"), h("dd", {}, (c.channels || []).join(", ") || "the event type's templates"),
          h("dt", {}, "Misfires"), h("dd", {}, c.misfire_policy),
          h("dt", {}, "Window"), h("dd", {}, `${c.start_at ? fmtTime(c.start_at, c.timezone) : "now"} → ${c.end_at ? fmtTime(c.end_at, c.timezone) : "no end"}`),
          h("dt", {}, "Fired"), h("dd", {}, `${num(c.fire_count)} time(s); last ${fmtTime(c.last_fire_at, c.timezone)}`))),
      h("section", { class: "card", "aria-label": "Next fires" }, h("h2", {}, "Next fires"),
        c.status === "paused" ? h("p", { class: "muted small" }, "Paused: these slots will not fire until it is resumed.") : null,
        next.items.length ? h("div", { id: "next-fires" }, firesList(next.items, c.timezone)) : h("p", { class: "muted" }, "No more fire times."))),
    h("h2", {}, "Run history"),
    runs.items.length
      ? h("div", { class: "table-wrap" }, h("table", { "aria-label": "Run history" },
          h("thead", {}, h("tr", {}, ["Slot", "Kind", "Lag", "Deliveries", "Sent", "Failed", "Status", "Notification"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, runs.items.map((run) => h("tr", {},
            h("td", {}, fmtTime(run.fire_time, c.timezone)), h("td", {}, run.kind), h("td", { class: "num" }, run.lag_ms === null ? "—" : `${num(run.lag_ms)} ms`),
            h("td", { class: "num" }, num(run.deliveries)), h("td", { class: "num" }, num(run.counts && run.counts.sent)),
            h("td", { class: "num" }, num(run.counts && (run.counts.failed || 0) + (run.counts.dead || 0))),
            h("td", {}, badge(run.status || run.reason)),
            h("td", {}, run.notification_id ? h("a", { href: `#/deliveries?notification_id=${encodeURIComponent(run.notification_id)}` }, "deliveries") : "—"))))))
      : h("p", { class: "muted" }, "It has not fired yet."));
}

const ZONES = (Intl.supportedValuesOf ? Intl.supportedValuesOf("timeZone") : []).concat(["UTC"]);

async function campaignForm(id) {
  const token = pageToken;
  const c = id ? await api(`/v1/schedules/${encodeURIComponent(id)}`) : {
    name: "", cron: "0 9 * * MON", timezone: viewerZone || "UTC", event_type: "", priority: "normal",
    recipients: { user_ids: [] }, channels: [], payload: {}, misfire_policy: "fire_once",
  };
  if (!current(token)) return;
  const r = c.recipients || {};
  const seg = r.segment || null;
  const localInput = (iso) => (iso ? new Date(new Date(iso).getTime() - new Date(iso).getTimezoneOffset() * 60e3).toISOString().slice(0, 16) : "");
  const zones = h("datalist", { id: "zones" }, ZONES.map((z) => h("option", { value: z })));
  const preview = h("div", { id: "cron-preview", "aria-live": "polite" });
  const form = h("form", { class: "card", novalidate: true, "aria-label": id ? "Edit campaign" : "New campaign" },
    h("div", { class: "row" },
      field("Name", h("input", { name: "name", value: c.name, required: true, maxlength: 200 })),
      field("Event type", h("input", { name: "event_type", value: c.event_type, required: true }), "templates of this type are used"),
      field("Priority", select("priority", [["high", "high"], ["normal", "normal"], ["low", "low"]], c.priority))),
    h("div", { class: "row" },
      field("Cron", h("input", { name: "cron", value: c.cron, required: true, class: "mono", spellcheck: "false" }), "minute hour day-of-month month day-of-week, e.g. 0 9 * * MON-FRI"),
      field("Time zone", h("input", { name: "timezone", value: c.timezone, list: "zones", spellcheck: "false" }), "IANA name, e.g. Europe/Paris"),
      field("Starts (your time)", h("input", { name: "start_at", type: "datetime-local", value: localInput(c.start_at) })),
      field("Ends (your time)", h("input", { name: "end_at", type: "datetime-local", value: localInput(c.end_at) }))),
    zones,
    h("section", { class: "card", "aria-label": "Cron preview" }, h("h2", {}, "Next 5 fires"), preview),
    h("fieldset", {}, h("legend", {}, "Recipients"),
      h("div", { class: "row" },
        field("User ids", h("input", { name: "user_ids", value: (r.user_ids || []).join(", ") }), "comma-separated"),
        field("Group", h("input", { name: "group_id", value: r.group_id || "" })),
        field("Segment", select("segment", [["", "none"], ["all", "every user"], ["locale", "by locale"], ["tag", "by tag"]], seg ? (seg.all ? "all" : seg.locale ? "locale" : "tag") : "")),
        field("Segment value", h("input", { name: "segment_value", value: seg ? seg.locale || seg.tag || "" : "" }), "the locale or tag"))),
    h("fieldset", {}, h("legend", {}, "Channels (none: every channel the event type has templates for)"),
      h("div", { class: "checks" }, CHANNELS.map((ch) => h("label", {}, h("input", { type: "checkbox", name: "channels", value: ch, checked: (c.channels || []).includes(ch) }), ch))),
      h("span", { class: "field-error", "data-error-for": "channels" })),
    h("div", { class: "row" },
      h("div", { class: "field wide" }, h("label", { for: "f-payload" }, "Payload (JSON)"),
        h("textarea", { id: "f-payload", name: "payload", "aria-describedby": "f-payload-error", spellcheck: "false" }, JSON.stringify(c.payload || {}, null, 2)),
        h("span", { class: "field-error", id: "f-payload-error", "data-error-for": "payload" })),
      field("Missed slots", select("misfire_policy", [["skip", "skip"], ["fire_once", "fire once"], ["fire_all", "fire all"]], c.misfire_policy))),
    h("div", { class: "form-errors" }),
    h("div", { class: "actions" }, h("button", { class: "primary", type: "submit" }, id ? "Save changes" : "Create campaign"),
      h("a", { href: id ? `#/campaigns/${encodeURIComponent(id)}` : "#/campaigns" }, "Cancel")));
  render(h("p", {}, h("a", { href: "#/campaigns" }, "← Campaigns")), h("h1", {}, id ? `Edit ${c.name}` : "New campaign"), form);

  const toIso = (v) => (v ? new Date(v).toISOString() : null);
  let seq = 0;
  const refreshPreview = async () => {
    const mine = ++seq;
    const v = formValues(form);
    const body = { cron: v.cron, timezone: v.timezone || "UTC", start_at: toIso(v.start_at), end_at: toIso(v.end_at), count: 5 };
    try {
      const p = await api("/v1/schedules/preview", { method: "POST", body });
      if (mine !== seq || !current(token)) return;
      for (const n of ["cron", "timezone", "start_at", "end_at"]) {
        const slot = form.querySelector(`[data-error-for="${n}"]`);
        if (slot) slot.textContent = "";
        form.querySelector(`[name="${n}"]`).removeAttribute("aria-invalid");
      }
      preview.replaceChildren(p.items.length ? firesList(p.items, p.timezone) : h("p", { class: "muted" }, "It would never fire."));
    } catch (err) {
      if (mine !== seq || !current(token)) return;
      showFieldErrors(form, err);
      preview.replaceChildren(h("p", { class: "field-error", role: "alert" }, err.message));
    }
  };
  let timer;
  form.addEventListener("input", (e) => {
    if (["cron", "timezone", "start_at", "end_at"].includes(e.target.name)) {
      clearTimeout(timer);
      timer = setTimeout(refreshPreview, 200);
    }
  });
  refreshPreview();

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const v = formValues(form);
    const errors = form.querySelector(".form-errors");
    errors.replaceChildren();
    let payload;
    try {
      payload = v.payload ? JSON.parse(v.payload) : {};
    } catch (err) {
      showFieldErrors(form, { details: [{ field: "payload", message: `is not JSON: ${err.message}` }] });
      return;
    }
    const recipients = { user_ids: (v.user_ids || "").split(/[\s,]+/).filter(Boolean) };
    if (v.group_id) recipients.group_id = v.group_id;
    if (v.segment === "all") recipients.segment = { all: true };
    else if (v.segment) recipients.segment = { [v.segment]: v.segment_value };
    const body = {
      name: v.name, cron: v.cron, timezone: v.timezone || "UTC", start_at: toIso(v.start_at), end_at: toIso(v.end_at),
      event_type: v.event_type, priority: v.priority, recipients,
      channels: [...form.querySelectorAll('input[name="channels"]:checked')].map((i) => i.value),
      payload, misfire_policy: v.misfire_policy,
    };
    if (!body.channels.length) delete body.channels;
    try {
      const saved = id
        ? await api(`/v1/schedules/${encodeURIComponent(id)}`, { method: "PATCH", body })
        : await api("/v1/schedules", { method: "POST", body });
      toast(id ? "Campaign saved" : "Campaign created");
      location.hash = `#/campaigns/${encodeURIComponent(saved.schedule_id)}`;
    } catch (err) {
      const rest = showFieldErrors(form, err);
      errors.replaceChildren(errorBox({ ...err, message: err.message, code: err.code, details: rest }));
      const firstBad = form.querySelector('[aria-invalid="true"]');
      if (firstBad) firstBad.focus();
    }
  });
}

// ---------- templates ----------

// Parts edited on one line; the rest in a text area.
const ONE_LINE = ["subject", "title", "url"];
const PART_FIELDS = { email: ["subject", "html", "text"], sms: ["text"], push: ["title", "body", "data"], webhook: ["body"], in_app: ["title", "body", "url", "data"] };

async function templatesPage(m, token) {
  const { items } = await api("/v1/templates");
  if (!current(token)) return;
  render(h("h1", {}, "Templates"),
    h("p", { class: "muted" }, "Files under templates/ are the defaults; a template saved here overrides the files of its event type, channel and locale."),
    h("div", { class: "table-wrap" }, h("table", { "aria-label": "Templates" },
      h("thead", {}, h("tr", {}, ["Event type", "Channel", "Locale", "Parts", "From"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, items.map((t) => {
        const href = `#/templates/${encodeURIComponent(t.event_type)}/${t.channel}${qs({ locale: t.locale || "" })}`;
        return h("tr", {}, h("td", {}, h("a", { href }, t.event_type)), h("td", {}, t.channel), h("td", {}, t.locale || "default"),
          h("td", { class: "mono" }, t.parts.join(", ")), h("td", {}, t.origin === "api" ? "saved here" : "file"));
      })))));
}

async function templatePage(m, token) {
  const eventType = decodeURIComponent(m[1]);
  const channel = decodeURIComponent(m[2]);
  const locale = hashParams().get("locale") || "";
  const t = await api(`/v1/templates/${encodeURIComponent(eventType)}/${encodeURIComponent(channel)}${qs({ locale })}`);
  if (!current(token)) return;
  const parts = PART_FIELDS[channel] || [];
  const out = h("div", { id: "template-preview" }, h("p", { class: "muted" }, "Press Preview to render the draft."));
  const form = h("form", { class: "card", "aria-label": "Template" },
    parts.map((p) => h("div", { class: "field wide" }, h("label", { for: `part-${p}` }, p),
      h(ONE_LINE.includes(p) ? "input" : "textarea", { id: `part-${p}`, name: p, spellcheck: "false", "aria-describedby": `part-${p}-error`, class: "mono", value: ONE_LINE.includes(p) ? t.parts[p] || "" : null },
        ONE_LINE.includes(p) ? null : t.parts[p] || ""),
      h("span", { class: "field-error", id: `part-${p}-error`, "data-error-for": p }))),
    h("fieldset", {}, h("legend", {}, "Sample data"),
      h("div", { class: "row" },
        field("Preview locale", h("input", { name: "sample_locale", value: locale, placeholder: "e.g. pt-BR" })),
        h("div", { class: "field wide" }, h("label", { for: "sample-user" }, "User (JSON)"),
          h("textarea", { id: "sample-user", name: "sample_user", spellcheck: "false" }, JSON.stringify({ first_name: "Ana", last_name: "Silva", email: "ana@example.com" }, null, 2))),
        h("div", { class: "field wide" }, h("label", { for: "sample-payload" }, "Payload (JSON)"),
          h("textarea", { id: "sample-payload", name: "sample_payload", spellcheck: "false" }, JSON.stringify({ order_id: "A-1001", amount: "42.00" }, null, 2))))),
    h("div", { class: "form-errors" }),
    h("div", { class: "actions" },
      h("button", { type: "button", id: "preview", onclick: () => doPreview() }, "Preview"),
      h("button", { type: "submit", class: "primary" }, "Save"),
      t.origin === "api" ? h("button", { type: "button", class: "danger", onclick: () => revert() }, "Revert to the file") : null));
  render(h("p", {}, h("a", { href: "#/templates" }, "← Templates")),
    h("h1", {}, `${eventType} · ${channel}${locale ? ` · ${locale}` : ""}`),
    h("p", { class: "muted" }, t.origin === "api" ? "Saved through the console or API (overrides the files)." : "From the templates directory; saving stores an override."),
    h("div", { class: "row" }, h("div", { style: "flex:1 1 520px" }, form), h("section", { class: "card", style: "flex:1 1 420px", "aria-label": "Preview" }, h("h2", {}, "Preview"), out)));

  const draft = () => {
    const v = formValues(form);
    const d = {};
    for (const p of parts) if (v[p]) d[p] = v[p];
    return d;
  };
  const json = (name) => {
    const raw = formValues(form)[name];
    return raw ? JSON.parse(raw) : {};
  };
  async function doPreview() {
    form.querySelector(".form-errors").replaceChildren();
    let user, payload;
    try { user = json("sample_user"); payload = json("sample_payload"); } catch (err) {
      out.replaceChildren(errorBox({ message: `Sample data is not JSON: ${err.message}`, code: "invalid_json" }));
      return;
    }
    try {
      const r = await api("/v1/templates/preview", { method: "POST", body: {
        event_type: eventType, channel, locale: formValues(form).sample_locale || null, user, payload, draft: draft(),
      } });
      showFieldErrors(form, { details: [] });
      out.replaceChildren(renderedPreview(channel, r.rendered));
    } catch (err) {
      const rest = showFieldErrors(form, err);
      out.replaceChildren(errorBox({ ...err, message: err.message, code: err.code, details: rest }));
    }
  }
  async function revert() {
    if (!confirm("Remove the saved template? The files apply again.")) return;
    try {
      await api(`/v1/templates/${encodeURIComponent(eventType)}/${encodeURIComponent(channel)}${qs({ locale })}`, { method: "DELETE" });
      toast("Reverted to the file");
      location.hash = "#/templates";
    } catch (err) { toast(`${err.message} (${err.code})`, true); }
  }
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await api(`/v1/templates/${encodeURIComponent(eventType)}/${encodeURIComponent(channel)}`, { method: "PUT", body: { ...draft(), locale: locale || null } });
      showFieldErrors(form, { details: [] });
      toast("Template saved");
      doPreview();
    } catch (err) {
      const rest = showFieldErrors(form, err);
      form.querySelector(".form-errors").replaceChildren(errorBox({ ...err, message: err.message, code: err.code, details: rest }));
    }
  });
}

// ---------- status webhooks ----------

const EVENT_TYPES = ["message.sent", "message.delivered", "message.bounced", "message.undelivered", "message.failed", "message.dead",
  "message.skipped", "message.complained", "message.unsubscribed", "message.seen", "message.read", "notification.completed"];

// The secret of a new or rotated endpoint: shown this once.
function secretBox(secret) {
  return h("div", { class: "card secret", role: "alert", id: "secret" },
    h("p", {}, h("strong", {}, "Signing secret — shown once. "), "Verify with any Standard Webhooks library."),
    h("code", { class: "mono" }, secret));
}

async function endpointsPage(m, token) {
  const { items } = await api("/v1/webhook-endpoints");
  if (!current(token)) return;
  const form = h("form", { class: "card", id: "new-endpoint", "aria-label": "New endpoint" },
    h("h2", {}, "New endpoint"),
    field("URL", h("input", { name: "url", type: "url", required: true, placeholder: "https://example.com/hooks/herald" })),
    field("Description", h("input", { name: "description" })),
    h("fieldset", { class: "checks" }, h("legend", {}, "Events"),
      EVENT_TYPES.map((t) => h("label", {}, h("input", { type: "checkbox", name: "events", value: t }), t))),
    h("div", { class: "checks" }, h("label", {}, h("input", { type: "checkbox", name: "include_contact", value: "true" }), "include addresses and provider texts")),
    h("div", { class: "form-errors" }),
    h("div", { class: "actions" }, h("button", { class: "primary", type: "submit" }, "Create")));
  const shown = h("div", {});
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = {
      url: form.url.value, description: form.description.value,
      events: [...form.querySelectorAll("input[name=events]:checked")].map((i) => i.value),
      include_contact: form.include_contact.checked,
    };
    try {
      const made = await api("/v1/webhook-endpoints", { method: "POST", body });
      form.reset();
      shown.replaceChildren(secretBox(made.secret), h("p", {}, h("a", { href: `#/webhooks/${encodeURIComponent(made.id)}` }, `Open ${made.url}`)));
      toast("Endpoint created");
    } catch (err) {
      const rest = showFieldErrors(form, err);
      form.querySelector(".form-errors").replaceChildren(rest.length || !err.details ? errorBox({ ...err, details: rest }) : "");
    }
  });
  render(h("h1", {}, "Status webhooks"), shown,
    items.length
      ? h("div", { class: "table-wrap" }, h("table", { "aria-label": "Endpoints" },
          h("thead", {}, h("tr", {}, ["URL", "Events", "State", "Failing since", "Created"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, items.map((e) => h("tr", { "data-endpoint": e.id },
            h("td", {}, h("a", { href: `#/webhooks/${encodeURIComponent(e.id)}` }, e.url), e.description ? h("div", { class: "muted small" }, e.description) : ""),
            h("td", { class: "small" }, e.events.join(", ")),
            h("td", {}, badge(e.enabled ? "enabled" : "disabled"), e.disabled_reason ? h("div", { class: "muted small" }, e.disabled_reason) : ""),
            h("td", {}, e.failing_since ? timeCell(e.failing_since) : "—"), h("td", {}, timeCell(e.created_at)))))))
      : h("p", { class: "muted" }, "No endpoints yet."),
    form);
}

async function endpointPage(m, token) {
  const id = decodeURIComponent(m[1]);
  const path = `/v1/webhook-endpoints/${encodeURIComponent(id)}`;
  const [e, attempts, failed] = await Promise.all([api(path), api(`${path}/attempts?limit=50`), api(`${path}/messages?state=failed&limit=50`)]);
  if (!current(token)) return;
  const shown = h("div", {});
  const act = (what, body) => async (ev) => {
    ev.target.disabled = true;
    try {
      const r = await api(what === "toggle" ? path : `${path}/${what}`, { method: what === "toggle" ? "PATCH" : "POST", body });
      if (what === "rotate-secret") { shown.replaceChildren(secretBox(r.secret)); toast("Secret rotated: the previous one signs beside it for 24 hours"); ev.target.disabled = false; return; }
      toast(what === "toggle" ? (body.enabled ? "Enabled" : "Disabled") : "Done");
      route();
    } catch (err) {
      ev.target.disabled = false;
      toast(`${err.message} (${err.code})`, true);
    }
  };
  const replay = h("form", { class: "filters card", id: "replay", "aria-label": "Replay" },
    field("Since", h("input", { name: "since", type: "datetime-local", required: true })),
    field("Until", h("input", { name: "until", type: "datetime-local" })),
    h("div", { class: "checks" }, h("label", {}, h("input", { type: "checkbox", name: "include_delivered", value: "true" }), "also those delivered")),
    h("div", { class: "actions" }, h("button", { class: "primary", type: "submit" }, "Replay")));
  replay.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const iso = (v) => (v ? new Date(v).toISOString() : undefined);
    try {
      const r = await api(`${path}/replay`, { method: "POST", body: { since: iso(replay.since.value), until: iso(replay.until.value), include_delivered: replay.include_delivered.checked } });
      toast(`Replaying ${r.replayed} message(s)`);
    } catch (err) {
      toast(`${err.message} (${err.code})`, true);
    }
  });
  const retry = (msg) => async (ev) => {
    ev.target.disabled = true;
    try {
      await api(`/v1/webhook-messages/${encodeURIComponent(msg.id)}/retry`, { method: "POST" });
      toast("Sending it again");
    } catch (err) {
      ev.target.disabled = false;
      toast(`${err.message} (${err.code})`, true);
    }
  };
  render(h("h1", {}, e.url), shown,
    h("dl", { class: "card facts" },
      h("dt", {}, "Events"), h("dd", {}, e.events.join(", ")),
      h("dt", {}, "State"), h("dd", {}, badge(e.enabled ? "enabled" : "disabled"), e.disabled_reason ? ` ${e.disabled_reason}` : ""),
      h("dt", {}, "Failing since"), h("dd", {}, e.failing_since ? timeCell(e.failing_since) : "—"),
      h("dt", {}, "Contact data"), h("dd", {}, e.include_contact ? "included" : "ids, statuses and times only")),
    h("div", { class: "actions" },
      h("button", { type: "button", onclick: act("toggle", { enabled: !e.enabled }) }, e.enabled ? "Disable" : "Enable"),
      h("button", { type: "button", id: "rotate", onclick: act("rotate-secret") }, "Rotate secret")),
    h("h2", {}, "Recent tries"),
    attempts.items.length
      ? h("div", { class: "table-wrap" }, h("table", { "aria-label": "Tries" },
          h("thead", {}, h("tr", {}, ["Time", "Event", "Message", "Status", "Duration", "Error"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, attempts.items.map((a) => h("tr", {},
            h("td", {}, timeCell(a.at)), h("td", {}, a.type), h("td", { class: "mono small" }, a.message_id),
            h("td", {}, a.status_code ?? "—"), h("td", { class: "num" }, `${a.duration_ms} ms`), h("td", { class: "small" }, a.error || ""))))))
      : h("p", { class: "muted" }, "No tries yet."),
    h("h2", {}, "Failed messages"),
    failed.items.length
      ? h("div", { class: "table-wrap" }, h("table", { "aria-label": "Failed messages" },
          h("thead", {}, h("tr", {}, ["Created", "Event", "Tries", "Last error", ""].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, failed.items.map((msg) => h("tr", {},
            h("td", {}, timeCell(msg.created_at)), h("td", {}, msg.type), h("td", { class: "num" }, msg.attempts),
            h("td", { class: "small" }, msg.last_error || ""),
            h("td", {}, h("button", { type: "button", onclick: retry(msg) }, "Retry")))))))
      : h("p", { class: "muted" }, "None failed."),
    h("h2", {}, "Replay"), replay);
}

// ---------- start ----------

async function start() {
  try {
    const me = await api("/ui/session");
    document.getElementById("who").textContent = `${me.name} · ${me.scopes.join(", ")}`;
  } catch (err) {
    if (err.status !== 401) toast(err.message, true);
  }
  // The skip link moves focus without changing the route in the URL's hash.
  document.getElementById("skip").addEventListener("click", (e) => { e.preventDefault(); main().focus(); });
  window.addEventListener("hashchange", () => { route(); main().focus({ preventScroll: true }); });
  route();
}

document.addEventListener("DOMContentLoaded", start);
