/* herald inbox widget: Herald.inbox({element, apiUrl, userId, userHash}).
 * A bell with the unread count and a panel listing the user's notifications, kept live
 * over the inbox socket. No dependencies; served by herald at /inbox.js. */
(function (global) {
  "use strict";

  var CSS =
    ".hi-root{position:relative;display:inline-block;font:14px/1.4 system-ui,sans-serif}" +
    ".hi-bell{position:relative;display:inline-flex;align-items:center;background:none;border:1px solid #ccd;border-radius:6px;padding:6px 8px;cursor:pointer;color:#223}" +
    ".hi-bell:focus-visible,.hi-panel button:focus-visible,.hi-item:focus-visible{outline:2px solid #2457d6;outline-offset:2px}" +
    ".hi-badge{position:absolute;top:-6px;right:-8px;min-width:18px;padding:0 5px;border-radius:9px;background:#c62828;color:#fff;font-size:12px;line-height:18px;text-align:center}" +
    ".hi-badge[hidden]{display:none}" +
    ".hi-panel{position:absolute;right:0;z-index:1000;width:340px;max-height:440px;overflow:auto;margin-top:6px;background:#fff;color:#111;border:1px solid #ccd;border-radius:8px;box-shadow:0 6px 24px rgba(0,0,0,.15)}" +
    ".hi-head{display:flex;justify-content:space-between;align-items:center;padding:8px 12px;border-bottom:1px solid #eef}" +
    ".hi-head h2{font-size:15px;margin:0}" +
    ".hi-list{list-style:none;margin:0;padding:0}" +
    ".hi-row{display:flex;gap:6px;border-bottom:1px solid #f0f0f4}" +
    ".hi-item{flex:1;text-align:left;background:none;border:0;padding:10px 12px;cursor:pointer;color:inherit;font:inherit}" +
    ".hi-unread .hi-item{background:#f2f6ff}" +
    ".hi-unread .hi-title::before{content:'';display:inline-block;width:8px;height:8px;margin-right:6px;border-radius:4px;background:#2457d6}" +
    ".hi-title{font-weight:600;display:block}.hi-time{display:block;color:#667;font-size:12px}" +
    ".hi-link{background:none;border:0;color:#2457d6;cursor:pointer;padding:4px 8px;font:inherit}" +
    ".hi-empty,.hi-status{padding:16px 12px;color:#667}" +
    ".hi-sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}";

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) {
      if (k === "class") e.className = attrs[k];
      else e.setAttribute(k, attrs[k]);
    }
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function when(iso) {
    var d = new Date(iso);
    return isNaN(d) ? "" : d.toLocaleString();
  }

  function inbox(options) {
    var root = typeof options.element === "string" ? document.querySelector(options.element) : options.element;
    if (!root) throw new Error("Herald.inbox: no element");
    var api = (options.apiUrl || "").replace(/\/$/, "");
    var pageSize = options.pageSize || 20;
    var state = { token: null, expires: 0, unread: 0, items: [], cursor: null, lastSeq: null, socket: null, retry: 0, open: false, stopped: false };
    var uid = "hi-" + Math.random().toString(36).slice(2, 8);

    if (!document.getElementById("herald-inbox-css")) {
      var style = el("style", { id: "herald-inbox-css" });
      style.textContent = CSS;
      document.head.appendChild(style);
    }
    var wrap = el("div", { class: "hi-root" });
    var bell = el("button", { type: "button", class: "hi-bell", "aria-haspopup": "dialog", "aria-expanded": "false", "aria-controls": uid + "-panel", "data-herald": "bell" });
    // A drawn bell: no icon font or emoji font needed.
    var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("width", "20");
    svg.setAttribute("height", "20");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    var path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("fill", "currentColor");
    path.setAttribute("d", "M12 22a2.5 2.5 0 0 0 2.45-2h-4.9A2.5 2.5 0 0 0 12 22zm7-6V11a7 7 0 0 0-5.5-6.84V3.5a1.5 1.5 0 0 0-3 0v.66A7 7 0 0 0 5 11v5l-2 2v1h18v-1l-2-2z");
    svg.appendChild(path);
    bell.appendChild(svg);
    var badge = el("span", { class: "hi-badge", "aria-hidden": "true", "data-herald": "badge", hidden: "" }, "0");
    bell.appendChild(badge);
    var panel = el("div", { id: uid + "-panel", class: "hi-panel", role: "dialog", "aria-label": "Notifications", hidden: "" });
    var head = el("div", { class: "hi-head" });
    head.appendChild(el("h2", {}, "Notifications"));
    var readAll = el("button", { type: "button", class: "hi-link", "data-herald": "read-all" }, "Mark all as read");
    head.appendChild(readAll);
    panel.appendChild(head);
    var list = el("ul", { class: "hi-list", "aria-label": "Notifications", "data-herald": "list" });
    panel.appendChild(list);
    var more = el("button", { type: "button", class: "hi-link", "data-herald": "more", hidden: "" }, "Load more");
    panel.appendChild(more);
    var status = el("div", { class: "hi-status", hidden: "" });
    panel.appendChild(status);
    var live = el("div", { class: "hi-sr", "aria-live": "polite", role: "status" });
    wrap.appendChild(bell);
    wrap.appendChild(panel);
    wrap.appendChild(live);
    root.appendChild(wrap);

    function setUnread(n) {
      state.unread = n;
      badge.textContent = n > 99 ? "99+" : String(n);
      if (n > 0) badge.removeAttribute("hidden");
      else badge.setAttribute("hidden", "");
      bell.setAttribute("aria-label", n === 1 ? "Notifications, 1 unread" : "Notifications, " + n + " unread");
      bell.setAttribute("data-unread", String(n));
    }

    function session() {
      return fetch(api + "/v1/inbox/session", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ user_id: options.userId, user_hash: options.userHash })
      }).then(function (r) {
        if (!r.ok) throw new Error("inbox session refused: " + r.status);
        return r.json();
      }).then(function (s) {
        state.token = s.token;
        state.expires = Date.parse(s.expires_at);
        setUnread(s.unread_count);
      });
    }

    function call(method, path) {
      var go = function () {
        return fetch(api + path, { method: method, headers: { Authorization: "Bearer " + state.token } });
      };
      var fresh = state.token && Date.now() < state.expires - 5000 ? Promise.resolve() : session();
      return fresh.then(go).then(function (r) {
        if (r.status === 401) return session().then(go);
        return r;
      }).then(function (r) {
        if (!r.ok) throw new Error(method + " " + path + ": " + r.status);
        return r.json();
      });
    }

    function render(item) {
      var li = el("li", { class: "hi-row" + (item.read_at ? "" : " hi-unread"), "data-id": item.id });
      var open = el("button", { type: "button", class: "hi-item", "data-herald": "item" });
      open.appendChild(el("span", { class: "hi-title" }, item.title || item.body));
      if (item.title && item.body) open.appendChild(el("span", {}, item.body));
      open.appendChild(el("span", { class: "hi-time" }, when(item.created_at)));
      open.setAttribute("aria-label", (item.read_at ? "" : "Unread: ") + (item.title || "") + ". " + (item.body || ""));
      open.addEventListener("click", function () {
        var done = item.read_at ? Promise.resolve() : call("POST", "/v1/inbox/notifications/" + encodeURIComponent(item.id) + "/read").then(function (updated) {
          item.read_at = updated.read_at;
          li.classList.remove("hi-unread");
          open.setAttribute("aria-label", (item.title || "") + ". " + (item.body || ""));
        });
        done.then(function () {
          if (item.url) window.location.assign(item.url);
        }).catch(report);
      });
      var archive = el("button", { type: "button", class: "hi-link", "data-herald": "archive", "aria-label": "Archive: " + (item.title || item.body) }, "Archive");
      archive.addEventListener("click", function () {
        call("POST", "/v1/inbox/notifications/" + encodeURIComponent(item.id) + "/archive").then(function () {
          state.items = state.items.filter(function (i) { return i.id !== item.id; });
          li.remove();
          if (!state.items.length) empty();
        }).catch(report);
      });
      li.appendChild(open);
      li.appendChild(archive);
      return li;
    }

    function empty() {
      list.innerHTML = "";
      list.appendChild(el("li", { class: "hi-empty" }, "Nothing here yet."));
    }

    function report(e) {
      status.textContent = "Could not reach notifications. " + (e && e.message ? e.message : "");
      status.removeAttribute("hidden");
    }

    var loads = 0;
    var countsSeen = 0;
    function load(reset) {
      var q = "?limit=" + pageSize + (reset || !state.cursor ? "" : "&cursor=" + encodeURIComponent(state.cursor));
      var mine = ++loads;
      var counts = countsSeen;
      wrap.setAttribute("data-loading", "true");
      return call("GET", "/v1/inbox/notifications" + q).then(function (page) {
        // A later load, or a page older than what the socket has shown since: the
        // newest answer wins, and items that arrived after the page was read stay.
        if (mine !== loads) return;
        wrap.removeAttribute("data-loading");
        var known = state.items;
        if (reset) {
          state.items = known.filter(function (i) { return i.seq > page.latest_seq; });
          list.innerHTML = "";
          state.items.forEach(function (i) { list.appendChild(render(i)); });
        }
        page.items.forEach(function (i) {
          if (state.items.some(function (k) { return k.id === i.id; })) return;
          state.items.push(i);
          list.appendChild(render(i));
        });
        // The socket resumes after the newest item the first page knew of (listed or
        // archived); a "load more" page lists older items only and moves nothing.
        if (reset && (state.lastSeq === null || page.latest_seq > state.lastSeq)) state.lastSeq = page.latest_seq;
        state.cursor = page.next_cursor;
        if (state.cursor) more.removeAttribute("hidden");
        else more.setAttribute("hidden", "");
        if (!state.items.length) empty();
        // The socket's counts are newer than the page's if any came meanwhile.
        if (counts === countsSeen) setUnread(page.unread_count);
        status.setAttribute("hidden", "");
      }).catch(function (e) {
        if (mine === loads) wrap.removeAttribute("data-loading");
        report(e);
      });
    }

    function received(item) {
      if (state.lastSeq === null || item.seq > state.lastSeq) state.lastSeq = item.seq;
      if (state.items.some(function (i) { return i.id === item.id; })) return;
      state.items.unshift(item);
      var first = list.querySelector(".hi-empty");
      if (first) first.remove();
      list.insertBefore(render(item), list.firstChild);
      live.textContent = "New notification: " + (item.title || item.body);
    }

    function connect() {
      if (state.stopped) return;
      var ready = state.token && Date.now() < state.expires - 5000 ? Promise.resolve() : session();
      ready.then(function () {
        var base = api || window.location.origin;
        var url = base.replace(/^http/, "ws") + "/v1/inbox/ws?token=" + encodeURIComponent(state.token) +
          (state.lastSeq !== null ? "&after_seq=" + state.lastSeq : "");
        var ws = new WebSocket(url);
        var opened = false;
        state.socket = ws;
        ws.onopen = function () {
          opened = true;
          wrap.setAttribute("data-connected", "true");
        };
        ws.onmessage = function (m) {
          var msg;
          try { msg = JSON.parse(m.data); } catch (e) { return; }
          if (msg.type === "notification_received") received(msg.item);
          else if (msg.type === "counts_changed") {
            // The server answered: the socket works, so the next drop starts over.
            state.retry = 0;
            countsSeen++;
            // Unread, or the total (an archive): another tab or device changed the list.
            var changed = msg.unread !== state.unread || msg.total !== state.total;
            state.total = msg.total;
            setUnread(msg.unread);
            // Another tab or device read or archived something: show it here too.
            if (changed && state.open) load(true);
          }
        };
        ws.onclose = function (e) {
          wrap.removeAttribute("data-connected");
          if (state.stopped) return;
          // Expired, or refused before opening (a token this page's clock thought fresh):
          // a new session first.
          if (e.code === 4001 || !opened) state.token = null;
          // Back off: 0.5 s, 1 s, 2 s ... up to 30 s, with jitter.
          var wait = Math.min(30000, 500 * Math.pow(2, state.retry++)) * (0.5 + Math.random() / 2);
          setTimeout(connect, wait);
        };
      }).catch(function () {
        var wait = Math.min(30000, 500 * Math.pow(2, state.retry++));
        setTimeout(connect, wait);
      });
    }

    function toggle(open) {
      state.open = open;
      bell.setAttribute("aria-expanded", String(open));
      if (open) {
        panel.removeAttribute("hidden");
        load(true).then(function () {
          return call("POST", "/v1/inbox/seen");
        }).catch(report);
        var first = panel.querySelector("button");
        if (first) first.focus();
      } else {
        panel.setAttribute("hidden", "");
      }
    }

    bell.addEventListener("click", function () { toggle(!state.open); });
    panel.addEventListener("keydown", function (e) {
      if (e.key === "Escape") {
        toggle(false);
        bell.focus();
      }
    });
    readAll.addEventListener("click", function () {
      call("POST", "/v1/inbox/read").then(function (m) {
        setUnread(m.unread);
        // Everything listed is read now; the reload brings what came meanwhile.
        Array.prototype.forEach.call(list.querySelectorAll(".hi-unread"), function (li) {
          li.classList.remove("hi-unread");
        });
        return load(true);
      }).catch(report);
    });
    more.addEventListener("click", function () { load(false); });

    setUnread(0);
    session().then(function () {
      return load(true);
    }).then(connect).catch(function (e) {
      report(e);
      connect();
    });

    return {
      open: function () { toggle(true); },
      close: function () { toggle(false); },
      unread: function () { return state.unread; },
      destroy: function () {
        state.stopped = true;
        if (state.socket) state.socket.close();
        root.removeChild(wrap);
      }
    };
  }

  global.Herald = global.Herald || {};
  global.Herald.inbox = inbox;
})(window);
