// /chat: each message is a Job (POST /api/v1/jobs) streamed over SSE; the conversation is
// kept server side (projections/conversations.py) by the conversation id in the input.
(function () {
  const $ = (s) => document.querySelector(s);
  const root = $("#chat"); if (!root) return;
  const input = $("#input"), sendBtn = $("#send"), stopBtn = $("#stop"), list = $("#messages");
  const modelSel = $("#model"), costEl = $("#cost"), convs = $("#convs");
  let conversationId = root.dataset.conversation || "";
  let turns = [];        // {user, history, jobId, status, text, node}
  let live = null;       // the turn being streamed

  const newId = () => "c" + Array.from(crypto.getRandomValues(new Uint8Array(12)), (b) => b.toString(16).padStart(2, "0")).join("");

  function settings() {
    const t = parseFloat($("#temperature").value), m = parseInt($("#max_tokens").value, 10);
    return { temperature: isFinite(t) ? Math.min(2, Math.max(0, t)) : 0.7,
             max_tokens: isFinite(m) ? Math.min(4096, Math.max(1, m)) : 2048,
             system_prompt: $("#system_prompt").value.trim() };
  }
  function prefs() {
    const p = {};
    if ($("#pref_region").value) p.region = $("#pref_region").value;
    if ($("#pref_platform").value) p.platform = $("#pref_platform").value;
    if ($("#pref_quality").value) p.min_hardware_tier = parseInt($("#pref_quality").value, 10);
    if ($("#pref_latency").value) p.max_latency_ms = parseInt($("#pref_latency").value, 10);
    return p;
  }
  function chosen() {
    const [model, workload] = (modelSel.value || "|llm-chat").split("|");
    return { model: model || null, workload: workload || "llm-chat" };
  }
  function historyBefore(index) {
    const msgs = [];
    for (const t of turns.slice(0, index)) {
      if (t.status !== "completed") continue;
      msgs.push({ role: "user", content: t.user }, { role: "assistant", content: t.text });
    }
    return msgs;
  }
  function jobInput(history, text) {
    const s = settings(), { model } = chosen();
    const inp = { messages: [...history, { role: "user", content: text }], temperature: s.temperature,
                  max_tokens: s.max_tokens };
    if (conversationId) inp.conversation_id = conversationId;
    if (s.system_prompt) inp.system_prompt = s.system_prompt;
    if (model) inp.model = model;
    return inp;
  }

  // ---------------------------------------------------------------- rendering
  function hideEmpty() { const e = $("#empty"); if (e) e.hidden = true; }
  function userNode(text) { return A.el("div", { class: "msg user", "data-testid": "user-message" }, text); }
  function assistantNode(turn) {
    const body = A.el("div", { class: "body streaming" });
    const status = A.el("div", { class: "status", "data-testid": "job-status", role: "status" });
    const meta = A.el("div", { class: "meta", "data-testid": "message-meta", hidden: true });
    const actions = A.el("div", { class: "actions" });
    const foot = A.el("div", { class: "foot" }, meta, actions);
    const node = A.el("div", { class: "msg assistant", "data-testid": "assistant-message", tabindex: "0" }, status, body, foot);
    turn.node = node; turn.body = body; turn.statusEl = status; turn.meta = meta; turn.actions = actions;
    return node;
  }
  function setStatus(turn, s) { turn.status = s; turn.statusEl.textContent = s; turn.statusEl.hidden = !s || s === "completed"; }
  function showMeta(turn, job) {
    const bits = [];
    bits.push(job.island_name ? "Island " + job.island_name : "Island —");
    if (job.duration_ms != null) bits.push((job.duration_ms / 1000).toFixed(2) + " s");
    if (job.model) bits.push(job.model);
    if (job.tokens_per_second != null) bits.push(Number(job.tokens_per_second).toFixed(1) + " tokens/s");
    turn.meta.replaceChildren(...bits.map((b) => A.el("span", { text: b })));
    turn.meta.hidden = false;
  }
  function showActions(turn, index) {
    turn.actions.replaceChildren();
    if (turn.status === "completed") {
      turn.actions.append(A.el("button", { class: "btn small", type: "button", "data-testid": "regenerate",
        "aria-label": "Regenerate this answer", onclick: () => run(index, turn.user) }, "↻ Regenerate"));
    } else if (["failed", "cancelled", "timeout"].includes(turn.status)) {
      turn.actions.classList.add("always");
      turn.actions.append(A.el("button", { class: "btn small", type: "button", "data-testid": "retry",
        "aria-label": "Retry this message", onclick: () => run(index, turn.user) }, "Retry"));
    }
  }
  function showError(turn, message) {
    turn.body.replaceChildren(A.el("div", { class: "err", "data-testid": "message-error", text: message }));
  }

  // ---------------------------------------------------------------- a turn = a Job
  async function run(index, text) {
    if (live) return;
    hideEmpty();
    let turn = turns[index];
    if (!turn) {
      turn = { user: text };
      turns[index] = turn;
      list.append(userNode(text), assistantNode(turn));
    } else {
      turn.body.className = "body streaming"; turn.body.replaceChildren(); turn.meta.hidden = true; turn.actions.replaceChildren();
      turn.actions.classList.remove("always");
    }
    turn.text = ""; setStatus(turn, "submitting");
    turn.node.scrollIntoView({ block: "end" });
    const { workload } = chosen();
    let job;
    try {
      job = (await A.api("POST", "/api/v1/jobs", { workload, input: jobInput(historyBefore(index), text), ...prefs() })).data;
    } catch (e) {
      setStatus(turn, "failed"); showError(turn, e.message); showActions(turn, index); return;
    }
    if (!location.pathname.startsWith("/chat/")) history.replaceState(null, "", "/chat/" + conversationId);
    turn.jobId = job.id; turn.node.dataset.jobId = job.id; live = turn; busy(true);
    setStatus(turn, job.status);
    const started = performance.now();
    turn.sub = A.stream(job.id, async (ev) => {
      if (ev.type === "status") setStatus(turn, ev.content);
      else if (ev.type === "token") { turn.text += ev.content; turn.body.textContent = turn.text; list.scrollTop = list.scrollHeight; }
      else if (ev.type === "done" || ev.type === "error") {
        live = null; busy(false);
        try {
          const j = (await A.api("GET", "/api/v1/jobs/" + job.id)).data;
          setStatus(turn, j.status);
          if (j.status === "completed") {
            turn.text = j.output || turn.text;
            const html = (await A.api("POST", "/web/api/render", { job_id: job.id })).data.html;
            turn.body.className = "body"; turn.body.innerHTML = html; // server-rendered, raw HTML stripped
            showMeta(turn, j.duration_ms == null ? { ...j, duration_ms: performance.now() - started } : j);
          } else { showError(turn, j.error || ev.error || j.status); }
        } catch (e) { setStatus(turn, ev.type === "done" ? "completed" : "failed"); if (ev.type === "error") showError(turn, ev.error); }
        showActions(turn, index);
        A.refreshMe(); loadConversations(); input.focus();
      }
    });
  }
  function busy(on) { stopBtn.hidden = !on; sendBtn.disabled = on; }

  stopBtn.addEventListener("click", async () => {
    if (!live || !live.jobId) return;
    try { await A.api("DELETE", "/api/v1/jobs/" + live.jobId); } catch (e) { /* the stream tells the outcome */ }
  });
  $("#composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || live) return;
    if (!conversationId) conversationId = newId();
    input.value = ""; costEl.textContent = "";
    run(turns.length, text);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("#composer").requestSubmit(); }
  });
  for (const chip of document.querySelectorAll('[data-testid="suggestion"]')) {
    chip.addEventListener("click", () => { input.value = chip.textContent; input.focus(); quoteSoon(); });
  }
  $("#new-conv").addEventListener("click", () => { location.href = "/chat"; });
  const panel = $("#settings-panel"), sbtn = $("#settings-btn");
  const toggle = (open) => { panel.hidden = !open; sbtn.setAttribute("aria-expanded", String(open)); if (open) $("#temperature").focus(); };
  sbtn.addEventListener("click", () => toggle(panel.hidden));
  $("#settings-close").addEventListener("click", () => { toggle(false); sbtn.focus(); });
  panel.addEventListener("keydown", (e) => { if (e.key === "Escape") { toggle(false); sbtn.focus(); } });

  // ---------------------------------------------------------------- cost quote
  let qt = null;
  function quoteSoon() { clearTimeout(qt); qt = setTimeout(quote, 350); }
  async function quote() {
    const text = input.value.trim();
    if (!text) { costEl.textContent = ""; return; }
    const { workload } = chosen();
    try {
      const q = await A.quote(workload, jobInput(historyBefore(turns.length), text));
      costEl.textContent = "Expected cost ≈ " + A.credits(q.expected) + " credits (at most " + A.credits(q.max) + ")" +
        (q.surge ? " · surge pricing" : "") + " · exchange quote";
    } catch (e) { costEl.textContent = e.message; }
  }
  input.addEventListener("input", quoteSoon);
  modelSel.addEventListener("change", quoteSoon);
  for (const id of ["#temperature", "#max_tokens", "#system_prompt"]) $(id).addEventListener("change", quoteSoon);

  // ---------------------------------------------------------------- loading
  async function loadModels() {
    try {
      const models = (await A.api("GET", "/web/api/models")).data;
      modelSel.replaceChildren();
      if (!models.length) { modelSel.append(A.el("option", { value: "", text: "No model online now" })); return; }
      for (const m of models) modelSel.append(A.el("option", { value: m.id + "|" + m.workload_slug,
        text: m.id + " · " + m.online_hosts + " online" }));
    } catch (e) { modelSel.replaceChildren(A.el("option", { value: "", text: "Models unavailable" })); }
  }
  async function loadConversations() {
    try {
      const items = (await A.api("GET", "/web/api/conversations")).data;
      convs.replaceChildren(...items.map((c) => A.el("li", {}, A.el("a", { href: "/chat/" + encodeURIComponent(c.id),
        "data-testid": "conversation", "aria-current": c.id === conversationId ? "true" : null, text: c.title }))));
      if (!items.length) convs.append(A.el("li", { class: "hint", style: "padding:8px 10px", text: "Your conversations will show up here." }));
    } catch (e) { /* the list stays as it was */ }
  }
  async function loadConversation() {
    if (!conversationId) return;
    let data;
    try { data = (await A.api("GET", "/web/api/conversations/" + encodeURIComponent(conversationId))).data; }
    catch (e) { return; }
    hideEmpty();
    data.turns.forEach((t, i) => {
      const turn = { user: t.user, jobId: t.job_id, text: t.text };
      turns[i] = turn;
      list.append(userNode(t.user), assistantNode(turn));
      turn.node.dataset.jobId = t.job_id;
      setStatus(turn, t.status);
      if (t.status === "completed") { turn.body.className = "body"; turn.body.innerHTML = t.html; showMeta(turn, t); }
      else if (t.terminal) showError(turn, t.error || t.status);
      else turn.body.textContent = t.text;
      showActions(turn, i);
    });
    list.scrollTop = list.scrollHeight;
  }
  document.addEventListener("me", (e) => { const em = $("#empty"); if (em) A.lowNudge(em, e.detail, "chatting"); });
  input.focus();
  loadModels(); loadConversations(); loadConversation();
})();
