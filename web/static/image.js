// /image: a Job per Generate, progress over SSE, the picture served by the coordinator
// (/web/images/{job}.png, owner only), the last 10 as thumbnails.
(function () {
  const $ = (s) => document.querySelector(s);
  const root = $("#image"); if (!root) return;
  const workload = root.dataset.workload, out = $("#output"), costEl = $("#cost"), gen = $("#generate");
  const prompt = $("#prompt");
  function input() {
    const size = parseInt($("#size").value, 10), steps = parseInt($("#steps").value, 10), seed = $("#seed").value.trim();
    const inp = { prompt: prompt.value.trim(), width: size, height: size, steps };
    const neg = $("#negative").value.trim(); if (neg) inp.negative_prompt = neg;
    if (seed !== "") inp.seed = parseInt(seed, 10);
    return inp;
  }
  function show(...nodes) { out.replaceChildren(...nodes); }
  function result(jobId, promptText) {
    const url = location.origin + "/web/images/" + jobId + ".png";
    const img = A.el("img", { src: "/web/images/" + jobId + ".png", alt: "Generated image: " + promptText, "data-testid": "image-result" });
    const copied = A.el("span", { class: "hint", role: "status" });
    const copy = A.el("button", { class: "btn", type: "button", "data-testid": "copy-url", onclick: async () => {
      try { await navigator.clipboard.writeText(url); copied.textContent = "URL copied"; }
      catch (e) { copied.textContent = url; }
    } }, "Copy URL");
    const dl = A.el("a", { class: "btn", href: "/web/images/" + jobId + ".png?download=1", download: "archipelag-" + jobId.slice(0, 8) + ".png",
      "data-testid": "download" }, "Download");
    show(img, A.el("div", { style: "display:flex;gap:8px;flex-wrap:wrap;justify-content:center" }, dl, copy, copied));
  }
  function failure(message) {
    show(A.el("div", { class: "notice bad", role: "alert", "data-testid": "image-error", text: message }),
      A.el("button", { class: "btn primary", type: "button", "data-testid": "try-again", onclick: generate }, "Try Again"));
  }
  async function generate() {
    const inp = input();
    if (!inp.prompt) { prompt.focus(); return; }
    gen.disabled = true;
    const bar = A.el("progress", { max: "1", value: "0", "aria-label": "Generation progress" });
    const label = A.el("div", { class: "status", role: "status", "data-testid": "job-status", text: "submitting" });
    const steps = A.el("div", { "data-testid": "image-progress", text: "Waiting for an Island…" });
    show(label, bar, steps);
    let job;
    try { job = (await A.api("POST", "/api/v1/jobs", { workload, input: inp })).data; }
    catch (e) { gen.disabled = false; failure(e.message); return; }
    label.textContent = job.status;
    A.stream(job.id, async (ev) => {
      if (ev.type === "status") label.textContent = ev.content;
      else if (ev.type === "progress") { bar.max = ev.total; bar.value = ev.step; steps.textContent = "Step " + ev.step + " of " + ev.total; }
      else if (ev.type === "done") { gen.disabled = false; result(job.id, inp.prompt); loadThumbs(); A.refreshMe(); }
      else if (ev.type === "error") { gen.disabled = false; failure(ev.error || "The image could not be generated."); A.refreshMe(); }
    });
  }
  $("#image-form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  for (const chip of document.querySelectorAll('[data-testid="image-example"]')) {
    chip.addEventListener("click", () => { prompt.value = chip.textContent; prompt.focus(); quoteSoon(); });
  }
  async function loadThumbs() {
    try {
      const items = (await A.api("GET", "/web/api/images")).data;
      $("#thumbs").replaceChildren(...items.map((it) => A.el("button", { type: "button", "data-testid": "image-thumb",
        "aria-label": "Show image: " + it.prompt, onclick: () => result(it.job_id, it.prompt) },
        A.el("img", { src: it.url, alt: "", loading: "lazy" }))));
      if (!items.length) $("#thumbs").append(A.el("p", { class: "hint", text: "Your images will show up here." }));
    } catch (e) { /* keep */ }
  }
  let qt = null;
  function quoteSoon() { clearTimeout(qt); qt = setTimeout(quote, 300); }
  async function quote() {
    const inp = input();
    if (!inp.prompt) { costEl.textContent = ""; return; }
    try {
      const q = await A.quote(workload, inp);
      costEl.textContent = "Expected cost ≈ " + A.credits(q.expected) + " credits" + (q.surge ? " · surge pricing" : "") +
        (q.source === "catalog" ? " · catalog price" : " · exchange quote");
    } catch (e) { costEl.textContent = e.message; }
  }
  for (const id of ["#prompt", "#negative", "#size", "#steps", "#seed"]) $(id).addEventListener("input", quoteSoon);
  loadThumbs();
})();
