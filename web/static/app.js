// Shared helpers of the web app (no build step). Everything that shows model or user
// text uses textContent or server-rendered Markdown (web/markdown.py): never raw HTML.
(function () {
  const A = (window.A = {});
  A.csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  A.api = async function (method, path, body) {
    const opts = { method, credentials: "same-origin", headers: { "x-csrf-token": A.csrf() } };
    if (body !== undefined) { opts.headers["content-type"] = "application/json"; opts.body = JSON.stringify(body); }
    const r = await fetch(path, opts);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) {
      const msg = (data && data.error && data.error.message) || ("HTTP " + r.status);
      const err = new Error(msg); err.status = r.status; err.data = data; throw err;
    }
    return data;
  };
  A.el = function (tag, attrs, ...kids) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") n.textContent = v; else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
      else n.setAttribute(k, v === true ? "" : v);
    }
    for (const k of kids) if (k !== null && k !== undefined) n.append(k);
    return n;
  };
  A.credits = function (v) {
    const n = Number(v);
    if (!isFinite(n)) return String(v);
    return n.toLocaleString("en-US", { maximumFractionDigits: 6 });
  };
  A.refreshMe = async function () {
    try {
      const me = (await A.api("GET", "/web/api/me")).data;
      const b = document.querySelector('[data-testid="balance"]');
      if (b) { b.querySelector(".amt").textContent = A.credits(me.credits); b.setAttribute("aria-label", "Balance: " + A.credits(me.credits) + " credits"); }
      document.dispatchEvent(new CustomEvent("me", { detail: me }));
      return me;
    } catch (e) { return null; }
  };
  // One Job's events over SSE (GET /api/v1/jobs/{id}/stream, the session authenticates).
  A.stream = function (jobId, onEvent) {
    // id: lines so that EventSource resumes after a dropped connection with Last-Event-ID
    const es = new EventSource("/api/v1/jobs/" + encodeURIComponent(jobId) + "/stream?id_lines=true");
    let ended = false;
    es.onmessage = function (m) {
      let ev; try { ev = JSON.parse(m.data); } catch (e) { return; }
      onEvent(ev);
      if (ev.type === "done" || ev.type === "error") { ended = true; es.close(); }
    };
    es.onerror = function () { if (ended) es.close(); };
    return { close: () => { ended = true; es.close(); } };
  };
  A.lowNudge = function (container, me, what) {
    const old = container.querySelector('[data-testid="low-credits"]');
    if (!me || !me.low_credits) { if (old) old.remove(); return; }
    if (old) return;
    const n = A.el("div", { class: "notice warn", "data-testid": "low-credits" },
      "You have " + A.credits(me.credits) + " credits left. ", A.el("a", { href: "/account/credits", text: "Add credits" }),
      " to keep " + what + ".");
    container.prepend(n);
  };
  A.quote = async function (workload, input) {
    // The Compute Exchange's quote (POST /api/v1/market/quote): what the Job would cost now.
    const q = (await A.api("POST", "/api/v1/market/quote", { workload, input })).data;
    return { expected: q.expected_price, max: q.max_price, surge: q.surge_active, source: q.budget_source };
  };
})();
