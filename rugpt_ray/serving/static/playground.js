// The rugpt-ray playground: plain JavaScript over the server's public API, with the user's key (if the server
// wants one) in sessionStorage. Each mode (MODES) says its endpoint, its request fields and how to read one streamed
// choice; everything else (settings, streaming, Stop, token colours, errors) is shared.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "rugpt-api-key";
const SETTINGS = ["temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed", "n"];
const SHOWN = 5;  // alternatives per token, where the server allows as many
let alternatives = SHOWN;
let defaults = {};
let running = null;  // the AbortController of the request in flight
let messageCount = 0;

class ApiFailure extends Error {}

// ------------------------------------------------------------------------------------------------ the API

async function api(path, init = {}) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (init.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {...init, headers});
  if (!response.ok) throw await failure(response);
  return response;
}

async function failure(response) {
  const text = await response.text();
  let message = text;
  try {
    const body = JSON.parse(text);
    message = body.error?.message ?? JSON.stringify(body.detail ?? body);
  } catch { /* not JSON: the text as it came */ }
  if (response.status === 401) askForKey();
  return new ApiFailure(`${response.status}: ${message}`);
}

async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ the modes

function completionTokens(logprobs) {
  if (!logprobs) return [];
  return logprobs.tokens.map((token, i) => ({
    token, logprob: logprobs.token_logprobs[i], offset: logprobs.text_offset[i],
    top: Object.entries(logprobs.top_logprobs[i] ?? {}),
  }));
}

function chatTokens(logprobs, out) {
  // chat's logprobs give each token's bytes: a character split over tokens counts at the token that completes it,
  // as /v1/completions' text_offset counts it
  return (logprobs?.content ?? []).map((t) => {
    const offset = out.chars;
    out.chars += Array.from(out.decoder.decode(new Uint8Array(t.bytes), {stream: true})).length;
    return {token: t.token, logprob: t.logprob, offset, top: t.top_logprobs.map((a) => [a.token, a.logprob])};
  });
}

const MODES = {
  completion: {
    endpoint: "v1/completions",
    body: () => ({prompt: $("prompt").value, logprobs: alternatives}),
    read: (choice) => ({text: choice.text ?? "", tokens: completionTokens(choice.logprobs)}),
  },
  chat: {
    endpoint: "v1/chat/completions",
    body: () => ({messages: readMessages(), logprobs: true, top_logprobs: alternatives}),
    read: (choice, out) => ({text: choice.delta?.content ?? "", tokens: chatTokens(choice.logprobs, out)}),
    finished: (outputs) => {  // the first answer joins the conversation, and the user's turn follows
      addMessage("assistant", outputs.get(0)?.text ?? "");
      addMessage("user", "").focus();
    },
  },
};

function currentMode() {
  return document.querySelector("input[name=mode]:checked").value;
}

// ------------------------------------------------------------------------------------------------ the controls

function askForKey() {
  $("key-form").hidden = false;
  $("api-key").focus();
}

async function loadServer() {
  const [models, settings] = await Promise.all([
    api("v1/models").then((r) => r.json()), api("playground/settings").then((r) => r.json())]);
  fillModels(models.data);
  defaults = settings.sampling;
  alternatives = Math.min(SHOWN, settings.max_top_logprobs);
  $("stop-label").textContent = `Stop strings, one a line (up to ${settings.max_stop_strings})`;
  applyDefaults();
  hideError();
  setStatus(`${models.data.length} served name(s); limits: ${settings.sampling.max_tokens.le} tokens, `
            + `n up to ${settings.sampling.n.le}, prompts up to ${settings.max_prompt_tokens} tokens`);
}

function fillModels(models) {
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren();
  for (const base of models.filter((m) => !m.parent)) {
    const group = document.createElement("optgroup");
    group.label = base.id;
    group.append(new Option(base.id, base.id));
    for (const adapter of models.filter((m) => m.parent === base.id)) {
      group.append(new Option(`${adapter.id} (adapter on ${base.id})`, adapter.id));
    }
    select.append(group);
  }
  if (chosen && models.some((m) => m.id === chosen)) select.value = chosen;
}

function applyDefaults() {
  for (const name of SETTINGS) {
    const input = $(name), rule = defaults[name];
    input.value = rule.default ?? "";
    input.min = rule.ge ?? rule.gt ?? "";
    input.max = rule.le ?? rule.lt ?? "";
  }
  $("stop").value = "";
}

function sampling() {
  const body = {};
  for (const name of SETTINGS) {
    const value = $(name).value.trim();
    if (value !== "") body[name] = Number(value);
  }
  const stop = $("stop").value.split("\n").filter((s) => s);
  if (stop.length) body.stop = stop;
  const schema = $("schema").value.trim();
  if (schema) {
    let parsed;
    try {
      parsed = JSON.parse(schema);
    } catch (e) {
      throw new ApiFailure(`JSON schema: not JSON (${e.message})`);
    }
    body.response_format = {type: "json_schema", json_schema: {name: "playground", schema: parsed}};
  }
  return body;
}

function addMessage(role, content) {
  const n = ++messageCount;
  const item = document.createElement("li");
  const roleSelect = document.createElement("select");
  roleSelect.setAttribute("aria-label", `Role of message ${n}`);
  for (const r of ["system", "user", "assistant"]) roleSelect.append(new Option(r, r));
  roleSelect.value = role;
  const text = document.createElement("textarea");
  text.rows = 2;
  text.value = content;
  text.setAttribute("aria-label", `Message ${n}`);
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "Remove";
  remove.setAttribute("aria-label", `Remove message ${n}`);
  remove.addEventListener("click", () => item.remove());
  item.append(roleSelect, text, remove);
  $("messages").append(item);
  return text;
}

function readMessages() {
  return Array.from($("messages").children, (item) => ({
    role: item.querySelector("select").value, content: item.querySelector("textarea").value}));
}

function showMode() {
  const chat = currentMode() === "chat";
  $("chat-input").hidden = !chat;
  $("completion-input").hidden = chat;
}

// ------------------------------------------------------------------------------------------------ generating

async function generate(event) {
  event.preventDefault();
  hideError();
  const mode = MODES[currentMode()];
  let body;
  try {
    body = {model: $("model").value, ...sampling(), ...mode.body(), stream: true,
            stream_options: {include_usage: true}};
  } catch (e) {
    showError(e);
    return;
  }
  const outputs = new Map();
  $("outputs").replaceChildren();
  running = new AbortController();
  setRunning(true);
  const started = performance.now();
  let firstToken = null, usage = null, stopped = false, failed = false;
  setStatus("waiting for the first token…");
  try {
    const response = await api(mode.endpoint, {method: "POST", body: JSON.stringify(body), signal: running.signal});
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiFailure(`${chunk.error.code ?? chunk.error.type}: ${chunk.error.message}`);
      usage = chunk.usage ?? usage;
      for (const choice of chunk.choices ?? []) {
        const out = output(outputs, choice.index);
        const {text, tokens} = mode.read(choice, out);
        if (firstToken === null && (text || tokens.length)) firstToken = performance.now() - started;
        out.text += text;
        out.tokens.push(...tokens);
        out.finish = choice.finish_reason ?? out.finish;
        render(out);
      }
    }
  } catch (e) {
    stopped = e.name === "AbortError";
    failed = !stopped;
    if (failed) showError(e);
  } finally {
    running = null;
    setRunning(false);
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  const parts = [stopped ? "stopped: the server dropped the request" : failed ? "failed" : "done"];
  if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} generated tokens`);
  if (firstToken !== null) parts.push(`first token after ${Math.round(firstToken)} ms`);
  parts.push(`${seconds} s in all`);
  setStatus(parts.join(" · "));
  $("status").dataset.ttftMs = firstToken === null ? "" : String(Math.round(firstToken));
  if (!stopped && !failed) mode.finished?.(outputs);
}

function output(outputs, index) {
  if (!outputs.has(index)) {
    const box = document.createElement("article");
    box.className = "choice";
    box.id = `choice-${index}`;
    const title = document.createElement("h2");
    const text = document.createElement("p");
    text.className = "text";
    box.append(title, text);
    const after = [...outputs.keys()].filter((i) => i > index).sort((a, b) => a - b)[0];
    $("outputs").insertBefore(box, after === undefined ? null : $(`choice-${after}`));
    outputs.set(index, {index, text: "", tokens: [], chars: 0, decoder: new TextDecoder(), finish: null, box});
  }
  return outputs.get(index);
}

function render(out) {
  // each token's text is the returned text from its offset to the next token's; a token whose text is empty (the
  // first bytes of a character) shares the span of the token that completes the character
  const chars = Array.from(out.text);
  const nodes = [];
  const first = out.tokens.length ? Math.min(out.tokens[0].offset, chars.length) : chars.length;
  if (first > 0) nodes.push(document.createTextNode(chars.slice(0, first).join("")));
  let pending = [];
  out.tokens.forEach((token, i) => {
    pending.push(token);
    const start = Math.min(pending[0].offset, chars.length);
    const end = Math.min(i + 1 < out.tokens.length ? out.tokens[i + 1].offset : chars.length, chars.length);
    if (end > start) {
      nodes.push(tokenSpan(chars.slice(start, end).join(""), pending));
      pending = [];
    }
  });
  out.box.querySelector(".text").replaceChildren(...nodes);
  out.box.querySelector("h2").textContent =
    `Sequence ${out.index + 1}` + (out.finish ? ` (finish reason: ${out.finish})` : "");
}

function colour(p) {
  return `hsl(${Math.round(120 * p)}, 75%, 82%)`;  // red (unsure) to green (sure), dark text stays readable
}

function tokenSpan(text, tokens) {
  const span = document.createElement("span");
  span.className = "tok";
  span.tabIndex = 0;
  span.textContent = text;
  const logprob = tokens.reduce((sum, t) => sum + t.logprob, 0);
  span.dataset.logprob = String(logprob);
  span.style.setProperty("background", colour(Math.exp(logprob)));
  span.setAttribute("aria-describedby", "token-info");
  span.tokens = tokens;
  return span;
}

// ------------------------------------------------------------------------------------------------ token details

function showToken(span) {
  const info = $("token-info");
  info.replaceChildren();
  for (const token of span.tokens) {
    const head = document.createElement("p");
    head.className = "chosen";
    head.dataset.logprob = String(token.logprob);
    head.textContent = `${JSON.stringify(token.token)}  logprob ${token.logprob.toFixed(4)}  `
                       + `(p ${percent(token.logprob)})`;
    const table = document.createElement("table");
    const caption = table.createCaption();
    caption.textContent = `likeliest ${alternatives}`;
    const top = [...token.top].sort((a, b) => b[1] - a[1]).slice(0, alternatives);
    for (const [text, logprob] of top) {
      const row = table.insertRow();
      row.className = "alternative";
      row.dataset.token = text;
      row.dataset.logprob = String(logprob);
      if (text === token.token) row.classList.add("chosen");
      for (const cell of [JSON.stringify(text), logprob.toFixed(4), percent(logprob)]) {
        row.insertCell().textContent = cell;
      }
    }
    info.append(head, table);
  }
  const box = span.getBoundingClientRect();
  info.style.setProperty("left", `${box.left + window.scrollX}px`);
  info.style.setProperty("top", `${box.bottom + window.scrollY + 4}px`);
  info.hidden = false;
}

function percent(logprob) {
  return `${(100 * Math.exp(logprob)).toFixed(1)}%`;
}

function hideToken() {
  $("token-info").hidden = true;
}

// ------------------------------------------------------------------------------------------------ the page

function setRunning(on) {
  $("generate").disabled = on;
  $("stop-button").disabled = !on;
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(error) {
  $("error").textContent = error.message;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function start() {
  for (const swatch of document.querySelectorAll(".swatch")) {
    swatch.style.setProperty("background", colour(Number(swatch.dataset.p)));
  }
  $("request").addEventListener("submit", generate);
  $("stop-button").addEventListener("click", () => running?.abort());
  $("greedy").addEventListener("click", () => { $("temperature").value = "0"; });
  $("reset").addEventListener("click", applyDefaults);
  $("add-message").addEventListener("click", () => addMessage("user", "").focus());
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", showMode);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("api-key").value);
    loadServer().catch(showError);
  });
  const outputs = $("outputs");
  outputs.addEventListener("mouseover", (e) => { if (e.target.classList.contains("tok")) showToken(e.target); });
  outputs.addEventListener("focusin", (e) => { if (e.target.classList.contains("tok")) showToken(e.target); });
  outputs.addEventListener("mouseout", hideToken);
  outputs.addEventListener("focusout", hideToken);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hideToken(); });
  addMessage("system", "Ты — полезный ассистент.");
  addMessage("user", "Кто такой Пушкин?");
  showMode();
  loadServer().catch(showError);
}

start();
