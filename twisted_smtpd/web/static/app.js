// The catcher's UI: plain JavaScript, no build step, nothing fetched from
// elsewhere. Mail text only ever goes into the page as textContent; the HTML
// part is shown by the server-sandboxed /view/ID.html in a sandboxed iframe.
"use strict";

(function () {
  const PAGE = 50;
  const state = { mailbox: "", query: "", start: 0, selected: null, total: 0 };
  const $ = (id) => document.getElementById(id);

  function el(tag, props, children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children || []) {
      node.append(child);
    }
    return node;
  }

  async function api(method, path, body) {
    const options = { method, headers: {} };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(path, options);
    if (!response.ok) {
      throw new Error((await response.text()) || response.statusText);
    }
    const type = response.headers.get("Content-Type") || "";
    return type.startsWith("application/json") ? response.json() : response.text();
  }

  function address(a) {
    if (!a || !a.Address) return "";
    return a.Name ? `${a.Name} <${a.Address}>` : a.Address;
  }

  function when(iso) {
    const date = new Date(iso);
    return isNaN(date) ? "" : date.toLocaleString();
  }

  // -- list ------------------------------------------------------------------
  async function loadList() {
    const params = new URLSearchParams({ start: state.start, limit: PAGE });
    if (state.mailbox) params.set("mailbox", state.mailbox);
    let path = "/api/v1/messages";
    if (state.query) {
      params.set("query", state.query);
      path = "/api/v1/search";
    }
    const result = await api("GET", `${path}?${params}`);
    state.total = result.messages_count;
    const list = $("messages");
    list.replaceChildren(...result.messages.map(renderSummary));
    $("empty").hidden = result.messages.length > 0;
    const shown = result.messages.length;
    $("summary").textContent = state.query
      ? `${result.messages_count} of ${result.total} match`
      : `${result.total} messages, ${result.unread} unread`;
    $("prev").disabled = state.start === 0;
    $("next").disabled = state.start + shown >= result.messages_count;
  }

  function renderSummary(m) {
    const item = el("li", { className: "message" + (m.Read ? "" : " unread") }, [
      el("span", { className: "from", textContent: address(m.From) || "(no sender)" }),
      el("span", { className: "date", textContent: when(m.Created) }),
      el("span", { className: "subject", textContent: m.Subject || "(no subject)" }),
      el("span", { className: "snippet", textContent: m.Snippet }),
    ]);
    item.dataset.id = m.ID;
    if (m.ID === state.selected) item.classList.add("selected");
    item.addEventListener("click", () => openMessage(m.ID));
    return item;
  }

  async function loadMailboxes() {
    const boxes = await api("GET", "/api/v1/mailboxes");
    const stats = await api("GET", "/api/v1/info");
    const entry = (name, label, total, unread) => {
      const link = el("a", { href: "#", textContent: label }, [
        el("span", { className: "count", textContent: unread ? `${unread}/${total}` : `${total}` }),
      ]);
      link.dataset.mailbox = name;
      if (name === state.mailbox) link.classList.add("active");
      link.addEventListener("click", (event) => {
        event.preventDefault();
        state.mailbox = name;
        state.start = 0;
        refresh();
      });
      return el("li", {}, [link]);
    };
    $("mailboxes").replaceChildren(
      entry("", "All mail", stats.Messages, stats.Unread),
      ...boxes.map((b) => entry(b.Name, b.Name, b.Total, b.Unread)),
    );
  }

  let pending = null;
  function refresh() {
    // Live events can come in bursts: one reload for a burst.
    if (pending) return pending;
    pending = Promise.resolve().then(async () => {
      try {
        await Promise.all([loadList(), loadMailboxes()]);
      } finally {
        pending = null;
      }
    });
    return pending;
  }

  // -- one message -------------------------------------------------------------
  let opening = 0; // a message closed or deleted while it loads stays closed
  async function openMessage(id) {
    const token = ++opening;
    const m = await api("GET", `/api/v1/message/${encodeURIComponent(id)}`);
    if (token !== opening) return;
    state.selected = m.ID;
    for (const item of document.querySelectorAll(".message")) {
      item.classList.toggle("selected", item.dataset.id === m.ID);
      if (item.dataset.id === m.ID) item.classList.remove("unread");
    }
    $("viewer").hidden = false;
    $("viewer").dataset.id = m.ID;
    $("message-subject").textContent = m.Subject || "(no subject)";
    const meta = [
      ["From", address(m.From)],
      ["To", m.To.map(address).join(", ")],
      ["Cc", m.Cc.map(address).join(", ")],
      ["Bcc", m.Bcc.map(address).join(", ")],
      ["Date", when(m.Date)],
      ["Size", `${m.Size} bytes`],
    ].filter(([, value]) => value);
    $("message-meta").replaceChildren(
      ...meta.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: v })]),
    );
    const base = `/api/v1/message/${encodeURIComponent(m.ID)}`;
    $("download-raw").href = `${base}/raw?dl=1`;
    const frame = $("html-frame");
    frame.hidden = !m.HTML;
    $("no-html").hidden = !!m.HTML;
    frame.src = m.HTML ? `/view/${encodeURIComponent(m.ID)}.html` : "about:blank";
    $("message-text").textContent = m.Text;
    $("message-raw").textContent = "";
    $("message-headers").replaceChildren();
    const files = [...m.Attachments, ...m.Inline];
    $("message-attachments").replaceChildren(
      ...files.map((a) =>
        el("li", {}, [
          el("a", {
            href: `${base}/part/${encodeURIComponent(a.PartID)}`,
            textContent: a.FileName || a.ContentID || `part ${a.PartID}`,
          }),
          ` ${a.ContentType}, ${a.Size} bytes`,
        ]),
      ),
    );
    if (files.length === 0) {
      $("message-attachments").append(el("li", { textContent: "No attachments." }));
    }
    $("tab-attachments").textContent = `Attachments (${files.length})`;
    showTab(m.HTML ? "html" : "text");
    loadMailboxes();
  }

  async function showTab(name) {
    for (const button of document.querySelectorAll(".tabs button")) {
      button.classList.toggle("active", button.dataset.tab === name);
    }
    for (const panel of document.querySelectorAll(".panel")) {
      panel.hidden = panel.dataset.panel !== name;
    }
    const id = state.selected;
    if (!id) return;
    const base = `/api/v1/message/${encodeURIComponent(id)}`;
    if (name === "raw" && !$("message-raw").textContent) {
      $("message-raw").textContent = await api("GET", `${base}/raw`);
    }
    if (name === "headers" && !$("message-headers").childElementCount) {
      const headers = await api("GET", `${base}/headers`);
      $("message-headers").replaceChildren(
        ...Object.entries(headers).flatMap(([k, values]) =>
          values.map((v) => el("tr", {}, [el("th", { textContent: k }), el("td", { textContent: v })])),
        ),
      );
    }
  }

  function closeMessage() {
    opening++;
    state.selected = null;
    $("viewer").hidden = true;
    $("html-frame").src = "about:blank";
    for (const item of document.querySelectorAll(".message.selected")) {
      item.classList.remove("selected");
    }
  }

  // -- actions -----------------------------------------------------------------
  async function deleteMessage() {
    if (!state.selected) return;
    await api("DELETE", "/api/v1/messages", { IDs: [state.selected] });
    closeMessage();
    refresh();
  }

  async function deleteAll() {
    const what = state.query ? "every message matching this search" : "every message";
    if (!window.confirm(`Delete ${what}?`)) return;
    if (state.query) {
      await api("DELETE", `/api/v1/search?${new URLSearchParams({ query: state.query })}`);
    } else if (state.mailbox) {
      await api("DELETE", `/api/v1/search?${new URLSearchParams({ query: `mailbox:${state.mailbox}` })}`);
    } else {
      await api("DELETE", "/api/v1/messages");
    }
    closeMessage();
    refresh();
  }

  async function openRelease() {
    if (!state.selected) return;
    const ui = await api("GET", "/api/v1/webui");
    if (!$("release-relay").value) $("release-relay").value = ui.MessageRelay.SMTPServer;
    $("release-status").textContent = "";
    $("release-dialog").showModal();
  }

  async function sendRelease(event) {
    event.preventDefault();
    const to = $("release-to").value.split(/[\s,;]+/).filter(Boolean);
    const body = { To: to };
    if ($("release-relay").value.trim()) body.Relay = $("release-relay").value.trim();
    $("release-status").textContent = "Sending…";
    try {
      await api("POST", `/api/v1/message/${encodeURIComponent(state.selected)}/release`, body);
      $("release-status").textContent = "Sent.";
      setTimeout(() => $("release-dialog").close(), 600);
    } catch (error) {
      $("release-status").textContent = error.message;
    }
  }

  // -- live updates ------------------------------------------------------------
  function listen() {
    const source = new EventSource("/api/v1/events");
    source.onopen = () => {
      $("live").textContent = "live";
      $("live").classList.add("on");
      refresh();
    };
    source.onerror = () => {
      $("live").textContent = "reconnecting";
      $("live").classList.remove("on");
    };
    source.onmessage = (event) => {
      const change = JSON.parse(event.data);
      const gone =
        change.Type === "truncate" ||
        ((change.Type === "delete" || change.Type === "prune") && change.Data.IDs.includes(state.selected));
      if (gone) closeMessage();
      refresh();
    };
  }

  function start() {
    $("search-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.query = $("search").value.trim();
      state.start = 0;
      refresh();
    });
    $("search").addEventListener("search", () => {
      state.query = $("search").value.trim();
      state.start = 0;
      refresh();
    });
    $("home").addEventListener("click", (event) => {
      event.preventDefault();
      Object.assign(state, { mailbox: "", query: "", start: 0 });
      $("search").value = "";
      closeMessage();
      refresh();
    });
    $("prev").addEventListener("click", () => { state.start = Math.max(0, state.start - PAGE); refresh(); });
    $("next").addEventListener("click", () => { state.start += PAGE; refresh(); });
    $("close-message").addEventListener("click", closeMessage);
    $("delete-message").addEventListener("click", deleteMessage);
    $("delete-all").addEventListener("click", deleteAll);
    $("mark-all-read").addEventListener("click", async () => {
      await api("PUT", "/api/v1/messages", { Read: true });
      refresh();
    });
    $("release-message").addEventListener("click", openRelease);
    $("release-form").addEventListener("submit", sendRelease);
    $("release-cancel").addEventListener("click", () => $("release-dialog").close());
    for (const button of document.querySelectorAll(".tabs button")) {
      button.addEventListener("click", () => showTab(button.dataset.tab));
    }
    refresh();
    listen();
  }

  start();
})();
