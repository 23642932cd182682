// /exchange (public): the Compute Exchange's market endpoints (docs/EXCHANGE.md): the
// current rate and surge per Cargo, the history chart and the order book of asks. When
// the endpoints cannot be reached, the page says the market data is unavailable.
(function () {
  const $ = (s) => document.querySelector(s);
  const sel = $("#cargo"); if (!sel) return;
  let win = "24h";
  const num = (v) => (v === null || v === undefined || v === "" ? null : Number(v));
  function unavailable(on) { $("#market-unavailable").hidden = !on; }
  async function get(path) { return (await A.api("GET", path)).data; }
  function pick(o, ...names) { for (const n of names) if (o && o[n] !== undefined && o[n] !== null) return o[n]; return null; }
  function chart(points) {
    const svg = $("#chart"), NS = "http://www.w3.org/2000/svg";
    svg.replaceChildren();
    const ys = points.map((p) => num(pick(p, "avg_price", "current_rate"))).filter((v) => v !== null);
    $("#chart-empty").hidden = ys.length >= 2;
    if (ys.length < 2) return;
    const lo = Math.min(...ys), hi = Math.max(...ys), span = hi - lo || 1;
    const d = ys.map((y, i) => (i ? "L" : "M") + (i * 600 / (ys.length - 1)).toFixed(1) + " " + (220 - (y - lo) / span * 200).toFixed(1)).join(" ");
    const path = document.createElementNS(NS, "path");
    path.setAttribute("d", d); path.setAttribute("fill", "none"); path.setAttribute("stroke", "#2f5bea"); path.setAttribute("stroke-width", "2.5");
    path.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(path);
    svg.setAttribute("aria-label", "Price history, " + win + ": from " + A.credits(ys[0]) + " to " + A.credits(ys[ys.length - 1]) + " credits");
  }
  async function load() {
    const slug = encodeURIComponent(sel.value);
    try {
      const [rate, hist, book] = await Promise.all([get("/api/v1/market/rates/" + slug),
        get("/api/v1/market/history/" + slug + "?window=" + win), get("/api/v1/market/orderbook/" + slug)]);
      unavailable(false);
      $("#rate").textContent = A.credits(pick(rate, "current_rate", "avg_price") ?? "—");
      $("#rate-unit").textContent = "credits per " + (rate.billing_unit || "billing unit");
      const surge = pick(rate, "surge_active");
      $("#surge").textContent = surge ? "×" + (pick(rate, "surge_multiplier") ?? "?") : "none";
      chart(hist || []);
      const buckets = (book && book.buckets) || [];
      $("#book").replaceChildren(...buckets.map((b) => A.el("tr", {}, A.el("td", { text: A.credits(b.min_price) + " – " + A.credits(b.max_price) }),
        A.el("td", { class: "num", text: String(b.hosts) }))));
      if (!buckets.length) $("#book").append(A.el("tr", {}, A.el("td", { colspan: "2", class: "hint", text: "No asks right now." })));
    } catch (e) {
      unavailable(true);
      $("#rate").textContent = "—"; $("#surge").textContent = "—"; chart([]);
      $("#book").replaceChildren(A.el("tr", {}, A.el("td", { colspan: "2", class: "hint", text: "Unavailable." })));
    }
  }
  for (const b of document.querySelectorAll("[data-window]")) b.addEventListener("click", () => {
    win = b.dataset.window;
    for (const o of document.querySelectorAll("[data-window]")) o.setAttribute("aria-pressed", String(o === b));
    load();
  });
  sel.addEventListener("change", load);
  load();
})();
