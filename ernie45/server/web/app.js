// The chat page: talks to this server's OpenAI endpoints (GET /v1/models, streaming POST /v1/chat/completions),
// keeps the conversation and the settings in localStorage, renders answers as Markdown while they stream
// (message_view.js).

import { describeError, sseData } from "./api.js";
import { renderMessage as renderMessageIn } from "./message_view.js";

const STORE = { conversation: "ernie45.webui.conversation", settings: "ernie45.webui.settings",
  apiKey: "ernie45.webui.apiKey" };

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), status: $("status"), form: $("composer"), prompt: $("prompt"), send: $("send"),
  stop: $("stop"), attach: $("attach"), imageInput: $("image-input"), attachments: $("attachments"),
  thinking: $("thinking"), apiKey: $("api-key"), system: $("system-prompt"), temperature: $("temperature"),
  maxTokens: $("max-tokens"), extraBody: $("extra-body"), settingsError: $("settings-error"),
  settings: $("settings"), settingsToggle: $("settings-toggle"), newChat: $("new-chat"),
  modelName: $("model-name"), modelLen: $("model-len"),
};

const state = {
  model: null, // the served model's id, from /v1/models
  maxModelLen: null,
  messages: [], // {role: "user"|"assistant", content, reasoning?, images?: [dataURL], error?, meta?, state?}
  pendingImages: [],
  controller: null, // the AbortController of the request in flight
};

// ---- persistence ----------------------------------------------------------------------------------------------

function load(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

function saveConversation() {
  try {
    localStorage.setItem(STORE.conversation, JSON.stringify(state.messages));
  } catch (err) {
    // localStorage holds ~5 MB; attached images are what fills it
    setStatus(`This conversation is too large to keep in the browser (${err.name}); it stays until the page closes.`);
  }
}

function saveSettings() {
  localStorage.setItem(STORE.settings, JSON.stringify({
    system: els.system.value, temperature: els.temperature.value, maxTokens: els.maxTokens.value,
    thinking: els.thinking.checked, extraBody: els.extraBody.value,
    settingsOpen: !els.settings.hidden,
  }));
  localStorage.setItem(STORE.apiKey, els.apiKey.value);
}

function restore() {
  const s = load(STORE.settings, {});
  if (s.system !== undefined) els.system.value = s.system;
  if (s.temperature !== undefined) els.temperature.value = s.temperature;
  if (s.maxTokens !== undefined) els.maxTokens.value = s.maxTokens;
  if (s.extraBody !== undefined) els.extraBody.value = s.extraBody;
  els.thinking.checked = Boolean(s.thinking);
  // open by default where there is room beside the chat (the narrow layout stacks it above the messages)
  setSettingsOpen(s.settingsOpen ?? window.matchMedia("(min-width: 801px)").matches);
  els.apiKey.value = localStorage.getItem(STORE.apiKey) || "";
  state.messages = load(STORE.conversation, []).map((m) => (m.state === "streaming" ? { ...m, state: "stopped" } : m));
  for (const message of state.messages) renderMessage(message);
}

// ---- the server -----------------------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = els.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadModel() {
  els.modelName.textContent = "loading…";
  els.modelLen.textContent = "";
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (err) {
    els.modelName.textContent = "server unreachable";
    setStatus(`Cannot reach the server: ${err.message}`, true);
    return;
  }
  if (!response.ok) {
    const message = await describeError(response);
    els.modelName.textContent = response.status === 401 ? "API key needed" : "no model";
    setStatus(message, true);
    if (response.status === 401) {
      setSettingsOpen(true);
      els.apiKey.classList.add("needs-value");
      els.apiKey.focus();
    }
    return;
  }
  const model = ((await response.json()).data || [])[0];
  if (!model) {
    els.modelName.textContent = "no model";
    return;
  }
  state.model = model.id;
  state.maxModelLen = model.max_model_len ?? null;
  els.apiKey.classList.remove("needs-value");
  els.modelName.textContent = model.id;
  els.modelName.title = model.root ? `${model.id} (${model.root})` : model.id;
  els.modelLen.textContent = state.maxModelLen ? `context ${state.maxModelLen.toLocaleString("en")} tokens` : "";
  setStatus("");
}

// The request body of the next turn: the system prompt, the conversation so far (failed turns left out), the
// settings, then the extra fields the user wrote as JSON (they win).
function requestBody() {
  const extra = els.extraBody.value.trim();
  let extraFields = {};
  if (extra) {
    extraFields = JSON.parse(extra); // a SyntaxError is shown by the caller
    if (typeof extraFields !== "object" || Array.isArray(extraFields) || extraFields === null) {
      throw new SyntaxError("extra request fields must be a JSON object");
    }
  }
  const messages = [];
  if (els.system.value.trim()) messages.push({ role: "system", content: els.system.value });
  for (const m of state.messages) {
    if (m.error || m.state === "streaming") continue;
    if (m.role === "user" && m.images && m.images.length) {
      messages.push({ role: "user", content: [
        { type: "text", text: m.content },
        ...m.images.map((url) => ({ type: "image_url", image_url: { url } })),
      ] });
    } else {
      messages.push({ role: m.role, content: m.content });
    }
  }
  const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true },
    chat_template_kwargs: { enable_thinking: els.thinking.checked } };
  if (els.temperature.value !== "") body.temperature = Number(els.temperature.value);
  if (els.maxTokens.value !== "") body.max_tokens = Number(els.maxTokens.value);
  return { ...body, ...extraFields };
}

async function send(text) {
  if (!state.model) await loadModel();
  if (!state.model) {
    els.prompt.value = text; // nothing was sent: keep what the user wrote (the status line says why)
    return;
  }
  let body;
  const user = { role: "user", content: text, images: state.pendingImages.slice() };
  state.messages.push(user);
  try {
    body = requestBody();
  } catch (err) {
    state.messages.pop();
    els.prompt.value = text;
    els.settingsError.textContent = `Extra request fields: ${err.message}`;
    setSettingsOpen(true);
    return;
  }
  els.settingsError.textContent = "";
  state.pendingImages = [];
  renderAttachments();
  renderMessage(user);
  const reply = { role: "assistant", content: "", reasoning: "", state: "streaming" };
  state.messages.push(reply);
  const view = renderMessage(reply);
  saveConversation();
  setBusy(true);
  const controller = (state.controller = new AbortController());
  const started = performance.now();
  let firstToken = null;
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await describeError(response));
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(`Error: ${chunk.error.message}`); // e.g. the engine shut down mid-stream
      if (chunk.usage) usage = chunk.usage;
      const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
      if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
      if (delta.content) reply.content += delta.content;
      if ((delta.reasoning_content || delta.content) && firstToken === null) firstToken = performance.now();
      view.update();
    }
    reply.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      reply.state = "stopped";
    } else {
      reply.state = "error";
      reply.error = err.message;
    }
  } finally {
    state.controller = null;
    reply.meta = describeUsage(usage, started, firstToken, reply.state);
    view.update(true);
    saveConversation();
    setBusy(false);
  }
}

function describeUsage(usage, started, firstToken, how) {
  const parts = [];
  if (usage) {
    parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
    const seconds = (performance.now() - (firstToken ?? started)) / 1000;
    if (usage.completion_tokens > 1 && seconds > 0) parts.push(`${(usage.completion_tokens / seconds).toFixed(1)} tok/s`);
  }
  if (firstToken !== null) parts.push(`first token ${Math.round(firstToken - started)} ms`);
  if (how === "stopped") parts.push("stopped");
  return parts.join(" · ");
}

// ---- rendering ------------------------------------------------------------------------------------------------

function renderMessage(message) {
  return renderMessageIn(message, els.messages, state.model);
}

function setStatus(text, isError = false) {
  els.status.textContent = text;
  els.status.classList.toggle("is-error", isError);
}

function setBusy(busy) {
  els.send.hidden = busy;
  els.stop.hidden = !busy;
  els.prompt.disabled = false;
  if (!busy) els.prompt.focus();
}

function setSettingsOpen(open) {
  els.settings.hidden = !open;
  els.settingsToggle.setAttribute("aria-expanded", String(open));
}

function renderAttachments() {
  els.attachments.replaceChildren(...state.pendingImages.map((url, i) => {
    const item = document.createElement("button");
    item.type = "button";
    item.className = "attachment";
    item.title = "remove this image";
    const img = document.createElement("img");
    img.src = url;
    img.alt = `image ${i + 1}`;
    item.append(img);
    item.addEventListener("click", () => {
      state.pendingImages.splice(i, 1);
      renderAttachments();
    });
    return item;
  }));
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ---- events ---------------------------------------------------------------------------------------------------

els.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = els.prompt.value.trim();
  if (!text || state.controller) return;
  els.prompt.value = "";
  send(text);
});

els.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    els.form.requestSubmit();
  } else if (event.key === "Escape" && state.controller) {
    state.controller.abort();
  }
});

// Aborting the fetch closes the connection; the server sees the disconnect, aborts the request and frees its KV.
els.stop.addEventListener("click", () => state.controller && state.controller.abort());

els.newChat.addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  els.messages.replaceChildren();
  saveConversation();
  setStatus("");
});

els.settingsToggle.addEventListener("click", () => {
  setSettingsOpen(els.settings.hidden);
  saveSettings();
});

for (const el of [els.system, els.temperature, els.maxTokens, els.thinking, els.extraBody]) {
  el.addEventListener("change", saveSettings);
}
els.apiKey.addEventListener("change", () => {
  saveSettings();
  loadModel();
});

els.messages.addEventListener("click", async (event) => {
  const button = event.target.closest(".copy-code");
  if (!button) return;
  const code = button.closest(".code-block").querySelector("code").textContent;
  try {
    await navigator.clipboard.writeText(code);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed"; // clipboard access needs https or localhost
  }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
});

if (document.body.dataset.multimodal === "true") {
  els.attach.hidden = false;
  els.attach.addEventListener("click", () => els.imageInput.click());
  els.imageInput.addEventListener("change", async () => {
    for (const file of els.imageInput.files) {
      state.pendingImages.push(await readAsDataUrl(file));
    }
    els.imageInput.value = "";
    renderAttachments();
  });
}

restore();
loadModel();
