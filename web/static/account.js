// Account pages: API keys (list, create shown once, revoke), the virtual top-up, pairing.
(function () {
  const $ = (s) => document.querySelector(s);
  const keys = $("#keys");
  async function loadKeys() {
    const rows = (await A.api("GET", "/api/v1/api-keys")).data;
    keys.replaceChildren(...rows.map((k) => A.el("tr", { "data-testid": "key-row" },
      A.el("td", { text: k.name }), A.el("td", {}, A.el("code", { text: k.prefix + "…" })),
      A.el("td", { text: (k.scopes || []).join(", ") }), A.el("td", { text: (k.created_at || "").slice(0, 16).replace("T", " ") }),
      A.el("td", { text: k.last_used_at ? k.last_used_at.slice(0, 16).replace("T", " ") : "never" }),
      A.el("td", { class: "num" }, A.el("button", { class: "btn small danger", type: "button", "data-testid": "revoke-key",
        "aria-label": "Revoke key " + k.name, onclick: async () => {
          if (!confirm("Revoke the key “" + k.name + "”? Programs using it stop working at once.")) return;
          await A.api("DELETE", "/api/v1/api-keys/" + k.id); loadKeys();
        } }, "Revoke")))));
    if (!rows.length) keys.append(A.el("tr", {}, A.el("td", { colspan: "6", class: "hint", text: "No active keys." })));
  }
  if (keys) {
    loadKeys();
    $("#key-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const name = $("#key-name").value.trim(), box = $("#new-key");
      if (!name) return;
      try {
        const made = await A.api("POST", "/api/v1/api-keys", { name });
        box.replaceChildren(A.el("div", { class: "notice ok" }, "Copy your new key now: it is shown only once."),
          A.el("div", { class: "secret" }, A.el("code", { "data-testid": "new-key", text: made.key })));
        $("#key-name").value = ""; loadKeys();
      } catch (err) { box.replaceChildren(A.el("div", { class: "notice bad", role: "alert", text: err.message })); }
    });
  }
  const top = $("#topup");
  if (top) top.addEventListener("click", async () => {
    const msg = $("#topup-msg");
    try {
      const r = (await A.api("POST", "/web/api/topup")).data;
      msg.className = "notice ok"; msg.textContent = "Added " + A.credits(r.added) + " credits. Balance: " + A.credits(r.credits) + ".";
      A.refreshMe(); setTimeout(() => location.reload(), 900);
    } catch (err) { msg.className = "notice bad"; msg.textContent = err.message; }
    msg.hidden = false;
  });
  const pair = $("#pair-form");
  if (pair) pair.addEventListener("submit", async (e) => {
    e.preventDefault();
    const code = $("#pair-code").value.trim(), msg = $("#pair-msg");
    msg.hidden = false;
    try {
      const r = await A.api("POST", "/api/v1/islands/pair", { code });
      msg.className = "notice ok"; msg.textContent = "Paired: " + ((r.data && r.data.name) || "your Island") + " is now yours.";
    } catch (err) {
      msg.className = "notice bad";
      msg.textContent = err.status === 404 || err.status === 405 ? "Pairing by code is not available on this coordinator yet." : err.message;
    }
  });
  const vr = $("#verify-request");
  if (vr) vr.addEventListener("click", async () => {
    const msg = $("#verify-msg"); msg.hidden = false;
    try {
      await A.api("POST", "/api/v1/verification/request", {});
      msg.className = "notice ok"; msg.textContent = "Request sent: an operator will review it.";
      setTimeout(() => location.reload(), 900);
    }
    catch (err) {
      msg.className = "notice info";
      msg.textContent = err.status === 404 || err.status === 405 ? "This coordinator takes verification requests through its operator: write to them with your account email." : err.message;
    }
  });
})();
