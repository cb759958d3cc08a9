// rbee's dashboard: one event stream swaps server-rendered fragments into the page; the
// buttons and forms post with the session's CSRF token; the playground follows its job's
// link events. No inline script anywhere: the page's Content-Security-Policy forbids it.
"use strict";

(() => {
  const meta = document.querySelector('meta[name="rbee-csrf"]');
  if (!meta) {
    login();
    window.addEventListener("hashchange", login); // a link pasted into the open login page
    return;
  }
  const csrf = meta.content;
  const notice = document.getElementById("notice");

  function tell(message) {
    notice.textContent = message;
    notice.hidden = !message;
  }

  async function send(path, method, body) {
    const response = await fetch(path, {
      method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Rbee-Csrf": csrf },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = answer.error || {};
      throw new Error(error.message || `${response.status} ${response.statusText}`);
    }
    return answer;
  }

  // live views
  const state = document.getElementById("link-state");
  const stream = new EventSource("api/events");
  stream.onopen = () => { state.textContent = "live"; state.dataset.state = "live"; };
  stream.onerror = () => { state.textContent = "reconnecting…"; state.dataset.state = "down"; };
  for (const view of document.querySelectorAll("[data-view]")) {
    stream.addEventListener(view.dataset.view, (event) => {
      const incoming = document.createElement("template");
      incoming.innerHTML = JSON.parse(event.data).html;
      morph(view, incoming.content);
    });
  }

  // A view's new markup is applied in place: a node whose kind and tag are unchanged is kept,
  // its attributes and text brought up to date, so a job's Cancel button is not swapped for a
  // copy while the pointer presses it (its token count changes several times a second).
  function morph(into, from) {
    const old = [...into.childNodes];
    const next = [...from.childNodes];
    if (old.length !== next.length) {
      into.replaceChildren(...next);
      return;
    }
    old.forEach((node, i) => {
      const fresh = next[i];
      if (node.nodeType !== fresh.nodeType || node.nodeName !== fresh.nodeName) {
        node.replaceWith(fresh);
      } else if (node.nodeType === Node.ELEMENT_NODE) {
        for (const { name } of [...node.attributes]) {
          if (!fresh.hasAttribute(name)) node.removeAttribute(name);
        }
        for (const { name, value } of [...fresh.attributes]) {
          if (node.getAttribute(name) !== value) node.setAttribute(name, value);
        }
        morph(node, fresh);
      } else if (node.nodeValue !== fresh.nodeValue) {
        node.nodeValue = fresh.nodeValue;
      }
    });
  }
  // the log: each (re)connected stream first sends recent lines; keep only the ones not shown
  const logLines = document.getElementById("log-lines");
  let shown = 0;
  stream.addEventListener("log", (event) => {
    const incoming = document.createElement("template");
    incoming.innerHTML = JSON.parse(event.data).html;
    for (const line of [...incoming.content.children]) {
      const seq = Number(line.dataset.seq);
      if (seq > shown) {
        shown = seq;
        logLines.append(line);
      }
    }
    while (logLines.children.length > 1000) logLines.firstElementChild.remove();
    filterLog();
  });

  // buttons: data-post="PATH" [data-method="DELETE"]
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-post]");
    if (!button) return;
    button.disabled = true;
    try {
      await send(button.dataset.post, button.dataset.method || "POST", button.dataset.method ? undefined : {});
      tell("");
      if (button.dataset.then === "reload") location.reload();
    } catch (error) {
      tell(error.message);
      button.disabled = false;
    }
  });

  document.getElementById("pull-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    try {
      await send("api/pull", "POST", { ref: form.ref.value.trim(), node: form.node.value });
      form.ref.value = "";
      tell("");
    } catch (error) {
      tell(error.message);
    }
  });

  // log filter
  const logHost = document.getElementById("log-host");
  const logActor = document.getElementById("log-actor");
  function filterLog() {
    const host = logHost.value;
    const actor = logActor.value.trim();
    for (const line of logLines.children) {
      line.hidden = (host && line.dataset.host !== host) || (actor && !line.dataset.actor.includes(actor));
    }
  }
  logHost.addEventListener("change", filterLog);
  logActor.addEventListener("input", filterLog);

  // playground: a chat is a link job; its stream carries narration, tokens and the end
  const chat = document.getElementById("chat-form");
  const turns = document.getElementById("chat-turns");
  const stats = document.getElementById("chat-stats");
  const where = document.getElementById("chat-narration");
  const stopButton = document.getElementById("chat-stop");
  let history = [];
  let running = null;

  function turn(role, text) {
    const item = document.createElement("li");
    item.className = role;
    item.textContent = text;
    turns.append(item);
    return item;
  }

  document.getElementById("chat-clear").addEventListener("click", () => {
    history = [];
    turns.replaceChildren();
    where.replaceChildren();
    stats.textContent = "";
  });

  stopButton.addEventListener("click", async () => {
    if (running) await send(`api/jobs/${running.job}`, "DELETE").catch((error) => tell(error.message));
  });

  chat.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (running) return;
    const prompt = chat.prompt.value.trim();
    if (!prompt) return;
    history.push({ role: "user", content: prompt });
    turn("user", prompt);
    chat.prompt.value = "";
    where.replaceChildren();
    stats.textContent = "starting…";
    const answer = turn("assistant", "");
    answer.classList.add("streaming");
    let created;
    try {
      created = await send("api/jobs", "POST", {
        model: chat.model.value.trim(),
        messages: history,
        max_tokens: Number(chat.max_tokens.value) || 256,
        temperature: Number(chat.temperature.value),
      });
    } catch (error) {
      answer.remove();
      history.pop();
      stats.textContent = error.message;
      return;
    }
    const started = performance.now();
    let tokens = 0;
    let first = null;
    const follow = new EventSource(created.sse_url);
    running = { job: created.job_id, stream: follow };
    stopButton.disabled = false;
    const finish = (text) => {
      follow.close();
      running = null;
      stopButton.disabled = true;
      answer.classList.remove("streaming");
      stats.textContent = text;
    };
    follow.onmessage = (message) => {
      if (message.data === "[DONE]") {
        if (running) finish(stats.textContent);
        return;
      }
      const link = JSON.parse(message.data);
      if (link.type === "token") {
        tokens += 1;
        first = first ?? performance.now();
        answer.textContent += link.text;
        const seconds = (performance.now() - first) / 1000;
        stats.textContent = `${tokens} tokens` + (seconds > 0 ? `, ${(tokens / seconds).toFixed(1)} tokens/s` : "");
      } else if (link.type === "narration") {
        const item = document.createElement("li");
        item.textContent = `${link.actor} ${link.action}: ${link.message}`;
        where.append(item);
      } else if (link.type === "end") {
        history.push({ role: "assistant", content: answer.textContent });
        const ttft = first === null ? "" : `, first token after ${Math.round(first - started)} ms`;
        finish(`${link.tokens} tokens, ${link.tokens_per_s} tokens/s (${link.finish_reason})${ttft}`);
      } else if (link.type === "error") {
        history.pop();
        finish(`${link.actor}: ${link.message}`);
        answer.classList.add("failed");
      }
    };
    follow.onerror = () => {
      if (running && follow.readyState === EventSource.CLOSED) finish("the stream broke");
    };
  });
})();

// The login URL carries a one-time token in its fragment (never sent to a server, never in
// a log); the page trades it for its session cookie, then reloads without it.
function login() {
  const notice = document.getElementById("login-notice");
  const found = /(?:^#|&)login=([A-Za-z0-9_-]+)/.exec(location.hash);
  if (!found) return;
  history.replaceState(null, "", location.pathname);
  fetch("login", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: found[1] }),
  }).then(async (response) => {
    if (response.ok) {
      location.reload();
      return;
    }
    const answer = await response.json().catch(() => ({}));
    notice.textContent = (answer.error && answer.error.message) || `login refused (${response.status})`;
  });
}
