// One message of the conversation in the DOM. An assistant message re-renders (Markdown re-parsed whole) at most
// every RENDER_INTERVAL_MS while it streams, and carries data-state: "streaming" | "done" | "stopped" | "error",
// so a person (and the browser test) can tell where a reply stands.

import { renderMarkdown } from "./markdown.js";

const RENDER_INTERVAL_MS = 30;

export function renderMessage(message, container, assistantName) {
  const el = document.createElement("div");
  el.className = `message ${message.role}`;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role === "user" ? "You" : assistantName || "assistant";
  el.append(role);
  if (message.role === "user") {
    const content = document.createElement("div");
    content.className = "content plain";
    content.textContent = message.content;
    el.append(content);
    for (const url of message.images || []) {
      const img = document.createElement("img");
      img.className = "attached";
      img.src = url;
      img.alt = "attached image";
      el.append(img);
    }
    container.append(el);
    container.scrollTop = container.scrollHeight;
    return { update() {} };
  }
  const reasoning = document.createElement("details");
  reasoning.className = "reasoning";
  reasoning.hidden = true;
  const summary = document.createElement("summary");
  const reasoningBody = document.createElement("div");
  reasoningBody.className = "reasoning-body";
  reasoning.append(summary, reasoningBody);
  const content = document.createElement("div");
  content.className = "content markdown";
  const meta = document.createElement("div");
  meta.className = "meta";
  const error = document.createElement("div");
  error.className = "error";
  error.setAttribute("role", "alert");
  el.append(reasoning, content, meta, error);
  container.append(el);

  let lastRender = 0;
  let timer = null;
  let folded = false;
  const draw = () => {
    timer = null;
    lastRender = performance.now();
    el.dataset.state = message.state || "done";
    if (message.reasoning) {
      reasoning.hidden = false;
      reasoningBody.textContent = message.reasoning;
      const thinking = message.state === "streaming" && !message.content;
      summary.textContent = thinking ? "Thinking…" : `Thought (${message.reasoning.length.toLocaleString("en")} characters)`;
      // open while the model thinks, folded once the answer starts (the reader can unfold it)
      if (thinking) reasoning.open = true;
      else if (!folded) { reasoning.open = false; folded = true; }
    }
    content.innerHTML = renderMarkdown(message.content);
    meta.textContent = message.meta || "";
    error.textContent = message.error || "";
    error.hidden = !message.error;
    container.scrollTop = container.scrollHeight;
  };
  draw();
  return {
    update(now = false) {
      if (now || performance.now() - lastRender >= RENDER_INTERVAL_MS) {
        if (timer !== null) clearTimeout(timer);
        draw();
      } else if (timer === null) {
        timer = setTimeout(draw, RENDER_INTERVAL_MS);
      }
    },
  };
}
