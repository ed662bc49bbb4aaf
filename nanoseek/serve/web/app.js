// nanoseek chat: a static page over /v1/chat/completions (streaming), /v1/models, /api/conversations,
// /api/tools and /api/examples. No dependencies, nothing from the internet.
// All model and user text is inserted with textContent (markdown builds elements, never HTML), so a
// reply containing <script> or <img onerror=...> is shown, never run (tool calls and results too).
// With tools on, a reply that calls the server's built-in tools is followed by their results
// (run through POST /api/tools/{name}) and another reply, at most MAX_TOOL_ROUNDS rounds a message.
// A turn (a message and its replies) that fails leaves no trace: the conversation is as before, the
// message goes back to the input box, and Retry sends it again. A message is stored before its reply
// streams (a new conversation with its first message, under an id the page picks, so saving it twice
// stores it once), and a reload or a closed tab mid-reply stores what came, marked stopped, as Stop
// does; the open conversation's id is in the address (#id), so a reload returns to it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { list: [], conv: null, abort: null, busy: false, tools: [], models: [], contexts: {}, examples: null, retry: null,
  leaving: false };
const SETTINGS = ["temperature", "top_p", "max_tokens", "thinking", "tools", "remember_key", "api_key"];
const MAX_TOOL_ROUNDS = 4;
const FINISHED = ["stop", "length", "tool_calls"];  // the finish reasons of a reply that ended well
const OFFLINE = "Can't reach the nanoseek server: it may be stopped or restarting.";

// ---------- settings and theme ----------
function storage(k) {  // the API key stays in this tab (sessionStorage) unless "remember" is ticked
  return k === "api_key" && !$("remember_key").checked ? sessionStorage : localStorage;
}
function loadSettings() {
  for (const k of SETTINGS) {
    const v = storage(k).getItem("nanoseek." + k);
    if (v === null) continue;
    if ($(k).type === "checkbox") $(k).checked = v === "true"; else $(k).value = v;
  }
}
function saveSetting(e) {
  const el = e.target;
  storage(el.id).setItem("nanoseek." + el.id, el.type === "checkbox" ? el.checked : el.value);
  if (el.id === "remember_key") {  // move the key to where it now belongs
    (el.checked ? sessionStorage : localStorage).removeItem("nanoseek.api_key");
    storage("api_key").setItem("nanoseek.api_key", $("api_key").value);
  }
}
const systemDark = matchMedia("(prefers-color-scheme: dark)");
function theme() { return localStorage.getItem("nanoseek.theme") || (systemDark.matches ? "dark" : "light"); }
function applyTheme() {  // the system's preference until the toggle picks one
  const t = theme();
  document.documentElement.dataset.theme = t;
  $("theme").textContent = t === "dark" ? "\u2600" : "\u263E";
  $("theme").title = t === "dark" ? "Light mode" : "Dark mode";
}

// ---------- server calls ----------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
async function request(path, options) {  // fetch, with a network failure said plainly
  try {
    return await fetch(path, { headers: headers(), ...options });
  } catch (e) {
    throw e.name === "AbortError" ? e : new Error(OFFLINE);
  }
}
async function api(path, method = "GET", body, signal) {
  const r = await request(path, { method, body: body === undefined ? undefined : JSON.stringify(body), signal });
  if (!r.ok) throw await apiError(r);
  return r.json();
}
async function apiError(r) {
  let msg = r.status + " " + r.statusText, error = {};
  try { error = (await r.json()).error || {}; msg = error.message || msg; } catch (_) { /* not JSON */ }
  if (r.status === 401) {  // the server's wording is for API clients (an Authorization header)
    msg = "This server needs its API key (the one `nanoseek serve` was started with): enter it in Settings.";
    $("settings").open = true;
    openSide();
  }
  return Object.assign(new Error(msg), { status: r.status, code: error.code, param: error.param });
}
function showError(e, retry) {  // retry: what the Retry button does (none: no button)
  $("error-text").textContent = e.message || String(e);
  state.retry = retry || null;
  $("retry").hidden = !retry;
  $("error").hidden = false;
  requestAnimationFrame(() => { $("messages").scrollTop = $("messages").scrollHeight; });  // the banner hid the end
  if (e.message === OFFLINE) watchServer();
}
let watching = null;
function watchServer() {  // while the server is unreachable: ask every few seconds, and when it answers, say so
  if (watching) return;
  watching = setInterval(async () => {
    try { await fetch("/v1/models", { headers: headers() }); } catch (_) { return; }  // any answer: it is back
    clearInterval(watching);
    watching = null;
    if ($("error-text").textContent === OFFLINE) {
      if (state.retry) $("error-text").textContent = "The server is back: Retry sends the message again.";
      else clearError();
    }
    if (!state.busy) { loadServer(); refreshList().catch(showError); }  // what it could not load while away
  }, 3000);
}
addEventListener("online", () => { if (watching) { clearInterval(watching); watching = null; watchServer(); } });
function busyNote() {  // a click that would leave or change the conversation while its reply streams: say why nothing happens
  if (!state.busy) return false;
  $("busy-note").hidden = false;
  clearTimeout(busyNote.timer);
  busyNote.timer = setTimeout(() => { $("busy-note").hidden = true; }, 4000);
  return true;
}
function clearError() { $("error").hidden = true; state.retry = null; }

// ---------- markdown: elements built from text, never HTML ----------
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
// `code`, **bold** and *italic*, where the stars open after a space or punctuation and close before
// one: maths such as 58*3*2, a*b, 2 * 3 or 2**10 is left as written; [links](https://...) and bare
// http(s) addresses (never ending in the punctuation after them; an address, bare or a link's, may hold one level
// of parentheses, as Wikipedia's do), opened in a new tab.
const INLINE = /`([^`\n]+)`|(\*\*|\*)(?=[^\s*])([^\n]*?[^\s*])\2|\[([^\]\n]+)\]\((https?:\/\/(?:[^\s()]|\([^\s()]*\))+)\)|(https?:\/\/(?:[^\s<>()"']|\([^\s<>()"']*\))*(?:[^\s<>()"'.,;:!?]|\([^\s<>()"']*\)))/g;
const WORDLIKE = /[\p{L}\p{N}*]/u;
function inline(s) {  // -> nodes (strings and elements)
  const nodes = [];
  const re = new RegExp(INLINE);
  let last = 0, m;
  while ((m = re.exec(s))) {
    const end = m.index + m[0].length;
    if (m[2] && (WORDLIKE.test(s[m.index - 1] || " ") || WORDLIKE.test(s[end] || " "))) {
      re.lastIndex = m.index + 1;  // not emphasis: look again one character on
      continue;
    }
    nodes.push(s.slice(last, m.index));
    if (m[1] !== undefined) nodes.push(el("code", "", m[1]));
    else if (m[5] !== undefined || m[6] !== undefined) nodes.push(link(m[5] || m[6], m[4] || m[6]));
    else { const e = el(m[2] === "**" ? "strong" : "em"); e.append(...inline(m[3])); nodes.push(e); }
    last = end;
  }
  nodes.push(s.slice(last));
  return nodes;
}
function link(url, text) {  // only http(s) reaches here: no javascript: or data: addresses
  const a = el("a", "", text);
  a.href = url;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  return a;
}
function withInline(tag, text) { const e = el(tag); e.append(...inline(text)); return e; }
function lines(tag, text) {  // a paragraph: its lines, with line breaks
  const e = el(tag);
  text.split("\n").forEach((line, i) => { if (i) e.append(el("br")); e.append(...inline(line)); });
  return e;
}
function codeBlock(part) {  // the text between ``` fences; its first line may name the language
  const nl = part.indexOf("\n");
  const code = (nl >= 0 ? part.slice(nl + 1) : part).replace(/\n$/, "");
  const box = el("div", "code");
  const bar = el("div", "code-bar", nl >= 0 ? part.slice(0, nl).trim() : "");
  bar.append(copyButton(() => code, "Copy code"));
  const pre = el("pre");
  pre.append(el("code", "", code));
  box.append(bar, pre);
  return box;
}
const LIST_ITEM = /^\s*([-*]|\d+\.)\s+/;
function markdown(text) {  // -> a DocumentFragment
  const out = document.createDocumentFragment();
  text.split(/```/).forEach((part, i) => {
    if (i % 2 === 1) { out.append(codeBlock(part)); return; }
    for (const block of part.split(/\n{2,}/)) {  // line by line: a heading is one line, list items may follow a paragraph
      let para = [], items = [];
      const endPara = () => { if (para.length) out.append(lines("p", para.join("\n"))); para = []; };
      const endList = () => {
        if (!items.length) return;
        const list = el(/^\s*\d+\./.test(items[0]) ? "ol" : "ul");
        list.append(...items.map((l) => withInline("li", l.replace(LIST_ITEM, ""))));
        out.append(list);
        items = [];
      };
      for (const row of block.split("\n")) {
        const heading = row.match(/^(#{1,6})\s+/);
        if (heading) {
          endPara(); endList();
          out.append(lines("h" + Math.min(6, heading[1].length + 2), row.slice(heading[0].length)));
        } else if (LIST_ITEM.test(row)) {
          endPara();
          if (items.length && /^\s*\d/.test(items[0]) !== /^\s*\d/.test(row)) endList();  // bullets, then numbers: two lists
          items.push(row);
        } else if (items.length && /^\s+\S/.test(row)) {
          items[items.length - 1] += " " + row.trim();  // an item's continued line
        } else if (row.trim()) {
          endList();
          para.push(row);
        }
      }
      endPara(); endList();
    }
  });
  return out;
}

// ---------- copying and exporting ----------
async function copyText(text) {  // the clipboard API needs a secure context (localhost, https); else the old way
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
}
function copyButton(text, title) {  // text: a function, read when clicked
  const b = button("copy", "Copy", async () => {
    await copyText(text());
    b.textContent = "Copied";
    setTimeout(() => { b.textContent = "Copy"; }, 1500);
  }, title);
  return b;
}
function speaker(m, i, messages) {
  if (m.role === "user") return "You";
  if (m.role === "tool") return toolName(messages, m.tool_call_id, i) + " result";
  return "nanoseek";
}
function fenced(text, info = "") {  // a code block that holds any text: its fence is longer than any run of ` in it
  const longest = Math.max(2, ...Array.from(text.matchAll(/`+/g), (m) => m[0].length));
  const fence = "`".repeat(longest + 1);
  return [fence + info, text, fence];
}
function plain(text) {  // text as Markdown shows it: no emphasis from 2*3*4, no HTML
  return text.replace(/[\\`*_<>#[\]]/g, "\\$&");
}
function inert(md) {  // a reply's Markdown with its raw HTML as text, as the page shows it: < escaped outside code
  let fence = null;
  return md.split("\n").map((line) => {
    const f = line.match(/^ {0,3}(`{3,}|~{3,})(.*)$/);
    if (fence) {  // inside a fenced block: as written, until a fence as long that closes it
      if (f && f[1][0] === fence[0] && f[1].length >= fence.length && !f[2].trim()) fence = null;
      return line;
    }
    if (f) { fence = f[1]; return line; }
    return line.replace(/(`+)[^`]*?\1(?!`)|</g, (m) => (m === "<" ? "\\<" : m));  // code spans kept
  }).join("\n");
}
function asMarkdown(c) {  // replies stay Markdown (as the page renders them); reasoning and results are shown as written
  const out = ["# " + plain(c.title), ""];
  if (c.system) out.push("> System: " + plain(c.system), "");
  c.messages.forEach((m, i) => {
    out.push("**" + speaker(m, i, c.messages) + "**", "");
    if (m.reasoning_content) out.push("<details><summary>Thinking</summary>", "", ...fenced(m.reasoning_content, "text"), "", "</details>", "");
    if (m.role === "tool") out.push(...fenced(m.content), "");
    else if (m.role === "user") out.push(plain(m.content), "");  // the page shows it as written, not as Markdown
    else if (m.content) out.push(inert(m.content), "");
    for (const call of m.tool_calls || []) out.push(...fenced(call.function.name + "(" + call.function.arguments + ")"), "");
  });
  return out.join("\n");
}
function download(name, text, type) {
  const a = el("a");
  a.href = URL.createObjectURL(new Blob([text], { type }));
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}
function exportConversation(kind) {
  const c = state.conv;
  const name = (c.title.replace(/[^\p{L}\p{N}]+/gu, "-").replace(/^-|-$/g, "") || "conversation").slice(0, 60);
  if (kind === "json") {
    const data = { title: c.title, system: c.system, messages: c.messages };
    download(name + ".json", JSON.stringify(data, null, 2), "application/json");
  } else {
    download(name + ".md", asMarkdown(c), "text/markdown");
  }
  $("conv-menu").open = false;
}

// ---------- rendering ----------
function toolName(messages, id, index) {  // the name of the function a tool message answers
  for (let i = index - 1; i >= 0; i--) {
    const call = (messages[i].tool_calls || []).find((c) => c.id === id);
    if (call) return call.function.name;
  }
  return "tool";
}
function renderCall(call) {
  const box = el("div", "tool-call");
  box.append(el("span", "tool-name", call.function.name), el("code", "tool-args", call.function.arguments));
  return box;
}
function button(cls, text, onclick, title) {
  const b = el("button", cls, text);
  b.type = "button";
  b.onclick = onclick;
  if (title) b.title = title;
  return b;
}
function notes(info) {  // under a reply: stopped or cut off, its length and speed
  const parts = [];
  if (info.stopped) parts.push("stopped");
  if (info.cut === "context") parts.push("cut off: the model's context is full");
  else if (info.cut) parts.push("cut off at the token limit (Max tokens in Settings)");
  if (info.no_answer) parts.push("no answer: the model ended after its reasoning");
  if (info.left_out) parts.push(`the ${info.left_out} oldest messages left out (past the model's context)`);
  if (info.tokens) parts.push(info.tokens + " tokens" + (info.tok_s ? `, ${fixed(info.tok_s, 0)} tokens/s` : ""));
  return parts.join(" · ");
}
function thinkingLabel(m, streaming) {
  if (streaming) return "Thinking…";
  return m.info && m.info.thought_s !== undefined ? `Thought for ${fixed(m.info.thought_s, 1)} s` : "Thinking";
}
function fixed(v, digits) {  // a stored note's number (one stored through the API may be text: shown as it is)
  return Number.isFinite(Number(v)) ? Number(v).toFixed(digits) : String(v);
}
function renderMessage(m, index, messages, streaming = false) {  // actions only on finished messages
  const box = el("div", "msg " + m.role);
  const who = el("div", "who", speaker(m, index, messages));
  box.append(who);
  const actions = !state.busy;
  if (m.role === "tool") {
    box.append(el("pre", "body tool-result", m.content));
    return box;
  }
  if (m.role === "user") {
    box.append(Object.assign(el("div", "body", m.content), { dir: "auto" }));  // right-to-left text laid out so
    if (actions) who.append(copyButton(() => m.content, "Copy this message"), button("edit", "Edit", () => startEdit(box, index)));
    if (actions && index === messages.length - 1) who.append(button("regenerate", "Answer", regenerate, "Stopped before a reply: ask again"));
    return box;
  }
  const details = el("details", "thinking");
  details.append(el("summary", "", thinkingLabel(m, streaming)),
    Object.assign(el("div", "reasoning", m.reasoning_content || ""), { dir: "auto" }));
  details.hidden = !m.reasoning_content;
  const body = Object.assign(el("div", "body"), { dir: "auto" });
  body.append(markdown(m.content || ""));
  const calls = el("div", "tool-calls");
  calls.append(...(m.tool_calls || []).map(renderCall));
  box.append(details, body, calls, el("div", "notes", notes(m.info || {})));
  if (actions && m.content) who.append(copyButton(() => m.content, "Copy this reply"));
  if (actions && index === messages.length - 1) who.append(button("regenerate", "Regenerate", regenerate));
  return box;
}
function renderWelcome() {  // what this model does well, from its folder (examples.json), or a generic welcome
  const ex = state.examples || { about: "", examples: [] };
  $("welcome-title").textContent = chosenModel() ? "Chat with " + chosenModel() : "nanoseek chat";
  $("about").textContent = ex.about || "Ask anything. With thinking on, the model's reasoning streams into a panel first.";
  const examples = ex.examples.length ? ex.examples : [{ title: "Say hello", prompt: "Hello! What can you do?" }];
  $("examples").replaceChildren(...examples.map((e) => {
    const b = button("example", "", () => send(e.prompt), "Send this");
    b.append(el("strong", "", e.title), el("span", "", e.prompt));
    return b;
  }));
}
function renderHeader() {  // the title, the conversation's menu (once it is stored), its place in the list
  const c = state.conv;
  $("title").textContent = c && c.saved ? c.title : "New chat";
  $("conv-menu").hidden = !(c && c.saved);
  for (const li of $("conversations").children) li.classList.toggle("active", !!c && li.dataset.id === c.id);
}
function renderConversation() {
  const c = state.conv;
  const empty = !c || !c.messages.length;
  renderHeader();
  if (c) $("system").value = c.system;
  $("welcome").hidden = !empty;
  $("messages").hidden = empty;
  const box = $("messages");
  box.replaceChildren(...(empty ? [] : c.messages.map((m, i) => renderMessage(m, i, c.messages))));
  box.scrollTop = box.scrollHeight;
}
function renderList() {
  $("conversations").replaceChildren(...state.list.map((c) => {
    const li = el("li");
    li.dataset.id = c.id;
    li.title = c.title;
    const open = () => { openConversation(c.id).catch(showError); closeSide(); };
    li.onclick = open;
    const stop = (fn) => (e) => { e.stopPropagation(); fn().catch(showError); };
    const title = button("conv-title", c.title, (e) => { e.stopPropagation(); open(); }, "Open this conversation");
    title.dir = "auto";
    li.append(title,
              button("act rename", "\u270E", stop(() => rename(c)), "Rename"),
              button("act delete", "\u00D7", stop(() => remove(c)), "Delete"));
    return li;
  }));
  $("no-match").hidden = !!state.list.length || !$("search").value;
  renderHeader();  // not the messages: a reply may be streaming into them
}

// ---------- the model, its tools and examples ----------
async function loadServer() {  // what the server serves: models (a picker when several), then the chosen one's
  const models = await api("/v1/models").catch((e) => {
    if (e.message === OFFLINE) showError(e);  // shown until it answers, then loaded again (watchServer)
    return { data: [] };
  });
  state.models = models.data.filter((m) => !m.parent).map((m) => m.id);
  state.contexts = Object.fromEntries(models.data.map((m) => [m.id, m.max_model_len]));
  const picker = $("model");
  picker.replaceChildren(...state.models.map((id) => el("option", "", id)));
  picker.value = localStorage.getItem("nanoseek.model");
  if (!picker.value) picker.value = state.models[0] || "";  // none remembered, or no longer served
  picker.hidden = state.models.length < 2;
  await loadModel();
}
async function loadModel() {  // the chosen model's built-in tools and examples
  const query = chosenModel() ? "?model=" + encodeURIComponent(chosenModel()) : "";
  const [tools, examples] = await Promise.allSettled([api("/api/tools" + query), api("/api/examples" + query)]);
  state.tools = tools.status === "fulfilled" ? tools.value.data : [];
  state.examples = examples.status === "fulfilled" ? examples.value : null;
  const names = state.tools.map((t) => t.function.name);
  $("tools-toggle").hidden = !names.length;
  $("tools-names").textContent = " (" + names.join(", ") + ")";
  renderWelcome();
}
function chosenModel() { return $("model").value || undefined; }  // none: the server's own
async function runTools(c, reply, signal) {  // each call's result as a tool message; a stop answers the rest
  for (const call of reply.tool_calls) {
    let content = "error: stopped before the tool ran";
    if (!signal.aborted) {
      try {
        const path = "/api/tools/" + encodeURIComponent(call.function.name);
        content = (await api(path, "POST", { arguments: call.function.arguments }, signal)).content;
      } catch (e) {
        if (e.name !== "AbortError") content = "error: " + e.message;
      }
    }
    const msg = { role: "tool", tool_call_id: call.id, content };
    c.messages.push(msg);
    $("messages").append(renderMessage(msg, c.messages.length - 1, c.messages));
    $("messages").scrollTop = $("messages").scrollHeight;
  }
  if (signal.aborted) throw new DOMException("stopped", "AbortError");
}
function wire(m) {  // a stored message as the API takes it
  const out = { role: m.role, content: m.content };
  if (m.tool_calls) Object.assign(out, { content: m.content || null, tool_calls: m.tool_calls });
  if (m.tool_call_id) out.tool_call_id = m.tool_call_id;
  return out;
}

// ---------- conversations ----------
function newId() { return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join(""); }
async function refreshList() {
  const q = $("search").value.trim();
  state.list = (await api("/api/conversations" + (q ? "?q=" + encodeURIComponent(q) : ""))).data;
  renderList();
}
addEventListener("pagehide", keepOnLeaving);
addEventListener("hashchange", () => {  // a conversation's link pasted into the address bar, or Back and Forward
  const id = location.hash.slice(1);
  if (busyNote()) { remember(state.conv); return; }  // the address stays the conversation's on screen
  if (id && (!state.conv || state.conv.id !== id)) openConversation(id).catch(showError);
  else if (!id && state.conv && state.conv.saved) newChat();  // back to the new chat it was left for
});
// the address of the conversation on screen, so that a reload returns to it; opening another one (push) is a step in
// the browser's history, which Back returns from (it left the app)
function remember(c, push = false) {
  const url = c && c.saved ? "#" + c.id : location.pathname;
  if (push && url !== (location.hash || location.pathname)) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}
async function openConversation(id) {
  if (busyNote()) return;
  clearError();
  await settleUndone().catch(() => {});  // a failed turn's question the server was back too late to forget: gone now
  state.conv = { ...(await api("/api/conversations/" + id)), saved: true };
  remember(state.conv, true);
  renderConversation();
  if (sessionStorage.getItem("nanoseek.left_mid_reply") === id) await awaitLeftReply(id);
}
async function awaitLeftReply(id) {  // the reply the page before a reload was writing, stored as it left
  sessionStorage.removeItem("nanoseek.left_mid_reply");
  for (let i = 0; i < 20 && state.conv && state.conv.id === id && !state.busy; i++) {
    const stored = await api("/api/conversations/" + id);
    if (stored.messages.length > state.conv.messages.length) {
      state.conv = { ...stored, saved: true };
      renderConversation();
      return;
    }
    await new Promise((r) => setTimeout(r, 150));
  }
}
function newChat() {  // stored only once it has a message
  if (busyNote()) return;
  clearError();
  closeSide();
  state.conv = null;
  $("system").value = "";  // the last conversation's system prompt is its own, not the new one's
  remember(null, true);
  renderConversation();
  $("input").focus();
}
async function rename(c) {
  const t = prompt("Rename conversation", c.title);
  if (!t || !t.trim()) return;
  const updated = await api("/api/conversations/" + c.id, "PATCH", { title: t.trim() });
  if (state.conv && state.conv.id === c.id) state.conv.title = updated.title;
  await refreshList();
}
async function remove(c) {
  if (busyNote() || !confirm(`Delete "${c.title}"?`)) return;
  await api("/api/conversations/" + c.id, "DELETE");
  if (state.conv && state.conv.id === c.id) { state.conv = null; remember(null); clearError(); renderConversation(); }
  await refreshList();
}
function titleOf(messages) {
  const first = messages.find((m) => m.role === "user").content.trim().replace(/\s+/g, " ");
  const chars = Array.from(first);  // characters, not UTF-16 units: an emoji is never cut in half
  return (chars.length > 40 ? chars.slice(0, 40).join("") + "…" : first) || "New chat";
}
async function store(c) {  // idempotent: the create names its id, the messages replace the stored ones
  if (!c.saved) {
    const created = await api("/api/conversations", "POST", { id: c.id, title: titleOf(c.messages), system: c.system });
    Object.assign(c, { saved: true, title: titleOf(c.messages), revision: created.revision });
    if (state.conv === c) remember(c);
  }
  // base: the messages this tab last read; changed since (another tab), the server refuses with a 409
  const stored = await api(`/api/conversations/${c.id}/messages`, "PUT", { messages: c.messages, base: c.revision });
  c.revision = stored.revision;
  await refreshList();
}
async function save(c) {
  try {
    await store(c);
  } catch (e) {
    if (state.conv !== c) return;
    const elsewhere = { 404: "this chat was deleted (in another tab?)", 409: "another tab changed this chat" }[e.status];
    if (elsewhere) {  // never written over the other tab's turn, never lost: kept as a new chat
      showError(new Error(`Not saved: ${elsewhere}. Retry keeps this tab's version as a new chat.`), () => {
        clearError();
        Object.assign(c, { id: newId(), saved: false, revision: undefined });
        return save(c);
      });
    } else showError(new Error("Not saved: " + e.message), () => { clearError(); return save(c); });
  }
}
async function unstore(c, before, wasSaved) {  // a failed turn: the stored conversation as it was (a new one: gone)
  const asked = c.revision;  // the stored conversation with the failed turn's question
  c.messages = before;
  try {
    if (wasSaved) await store(c);
    else if (c.saved) {
      await api("/api/conversations/" + c.id, "DELETE");
      c.saved = false;
      if (state.conv === c) remember(null);
      await refreshList();
    }
  } catch (_) {  // the server is gone: the turn was never answered there either, and is undone when the page next starts
    if (c.saved) undoLater({ id: c.id, revision: asked, keep: before.length, wasSaved });
  }
}
const UNDO = "nanoseek.undo";  // failed turns whose question the server could not be told to forget
function undoLater(u) {
  const pending = JSON.parse(localStorage.getItem(UNDO) || "[]").filter((p) => p.id !== u.id);
  localStorage.setItem(UNDO, JSON.stringify([...pending, u]));
}
async function settleUndone() {  // at start: forget those questions, where the conversation is still as the turn left it
  const left = [];
  for (const u of JSON.parse(localStorage.getItem(UNDO) || "[]")) {
    try {
      const stored = await api("/api/conversations/" + u.id);
      if (stored.revision !== u.revision) continue;  // changed since (answered, edited): kept as it is
      if (u.wasSaved) await api(`/api/conversations/${u.id}/messages`, "PUT", { messages: stored.messages.slice(0, u.keep), base: u.revision });
      else await api("/api/conversations/" + u.id, "DELETE");
    } catch (e) {
      if (e.status === undefined || e.status >= 500) left.push(u);  // still unreachable: next time
    }
  }
  localStorage.setItem(UNDO, JSON.stringify(left));
}
function keepOnLeaving() {  // a reload or a closed tab mid-reply: the reply so far is stored, stopped
  const c = state.conv;
  if (!state.busy || !c || !c.saved) return;
  state.leaving = true;  // the reply's request is about to fail: that is not the turn failing
  const last = c.messages[c.messages.length - 1];
  if (last.role === "assistant") last.info = { ...last.info, stopped: true };
  fetch(`/api/conversations/${c.id}/messages`, { method: "PUT", headers: headers(), keepalive: true,
    body: JSON.stringify({ messages: c.messages, base: c.revision }) }).catch(() => {});
  sessionStorage.setItem("nanoseek.left_mid_reply", c.id);  // a reload may open it before that save lands
}

// ---------- talking to the model ----------
async function send(text) {
  if (!text.trim() || busyNote()) return;
  if (!state.conv) state.conv = { id: newId(), title: "New chat", system: $("system").value.trim(), messages: [], saved: false };
  const c = state.conv;
  $("input").value = "";
  await turn(c, c.messages.concat({ role: "user", content: text }), () => send($("input").value), text);
}
async function regenerate() {  // the whole turn again: replies and tool results after the last user message
  const c = state.conv;
  const last = c.messages.map((m) => m.role).lastIndexOf("user");
  await turn(c, c.messages.slice(0, last + 1), regenerate);
}
function startEdit(box, index) {
  if (busyNote()) return;
  const c = state.conv;
  const body = box.querySelector(".body");
  const area = el("textarea", "edit-box");
  area.value = c.messages[index].content;
  area.rows = 3;
  const later = c.messages.length - index - 1;  // the turns after it, which the edit replaces
  const resend = (text) => {
    if (!text.trim() || (later > 1 && !confirm(`Send the edited message? The ${later} messages after it will be replaced.`))) return;
    turn(c, c.messages.slice(0, index).concat({ role: "user", content: text.trim() }), () => resend(text));
  };
  area.addEventListener("keydown", (e) => {  // as in the message box: Enter sends, Shift+Enter a new line, Esc cancels
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); resend(area.value); }
    if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); renderConversation(); }
  });
  body.replaceWith(area);
  box.append(button("", "Send", () => resend(area.value)), button("", "Cancel", renderConversation));
  area.focus();
}
async function turn(c, messages, retry, text = "") {  // messages: the history with the new user message
  if (state.busy) return;
  clearError();
  const before = c.messages, wasSaved = c.saved;
  c.messages = messages;
  setBusy(true);
  try { await store(c); } catch (_) { /* the reply's request will say what is wrong */ }  // the question first
  const failure = await stream(c);
  if (state.leaving) return;
  if (!failure) await save(c);  // before Send comes back: a reload or a closed tab then finds the turn stored
  if (failure) await unstore(c, before, wasSaved);
  setBusy(false);
  if (failure) {  // nothing of a failed turn stays: the message goes back to the input box
    c.messages = before;
    if (text && !$("input").value) $("input").value = text;
    if (state.conv === c) {
      renderConversation();
      const said = /[.!?)]$/.test(failure.message) ? failure.message : failure.message + ".";
      showError(new Error(said + (text ? " Your message is back in the input box." : "")), () => { clearError(); return retry(); });
    }
    return;
  }
  renderConversation();
}
async function stream(c) {  // one turn: replies, and the tools they call, until one calls none -> null, or the error; leaves busy set
  const system = $("system").value.trim();
  if (c.saved && system !== c.system) api("/api/conversations/" + c.id, "PATCH", { system }).catch(() => {});
  c.system = system;
  setBusy(true);
  renderConversation();
  state.abort = new AbortController();
  try {
    for (let round = 0; ; round++) {
      const reply = await streamReply(c, round < MAX_TOOL_ROUNDS, state.abort.signal);
      if (!reply.tool_calls) return null;
      await runTools(c, reply, state.abort.signal);
    }
  } catch (e) {
    return e.name === "AbortError" ? null : e;  // a stop keeps what came
  } finally {
    state.abort = null;  // (busy until the caller has stored the turn)
  }
}
function requestBody(c, mayCall) {
  const history = c.messages.map(wire);
  const body = {
    stream: true, stream_options: { include_usage: true }, model: chosenModel(),
    messages: (c.system ? [{ role: "system", content: c.system }] : []).concat(history),
    temperature: numberSetting("temperature", 0, 2), top_p: numberSetting("top_p", 0.01, 1),
    max_tokens: numberSetting("max_tokens", 1, Infinity, true),
    thinking: { type: $("thinking").checked ? "enabled" : "disabled" },
  };
  if ($("tools").checked && state.tools.length) Object.assign(body, { tools: state.tools, tool_choice: mayCall ? "auto" : "none" });
  return body;
}
// the field's number; undefined (the server's default) if empty; a value out of range stops the send with a message
// that names the setting (it was left out of the request without a word, and 2.5 max tokens sent as 2)
function numberSetting(id, min, max, integer = false) {
  const input = $(id), text = input.value.trim(), v = Number(text);
  if (!text ? input.validity.valid : integer && v === 0) return undefined;  // empty, or Max tokens 0: as many as fit
  if (!text || !(v >= min && v <= max) || (integer && !Number.isInteger(v))) {
    const name = input.parentElement.firstChild.textContent.trim();
    const range = integer ? `a whole number from ${min}` : `a number from ${min} to ${max}`;
    throw new Error(`Settings: ${name} must be ${range}${text ? `, not ${text}` : ""}.`);
  }
  return v;
}
async function* events(r) {  // the parsed chunks of a server-sent event stream; leaving early closes it
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      let part;
      try { part = await reader.read(); } catch (e) { throw e.name === "AbortError" ? e : new Error(OFFLINE); }
      if (part.done) return;
      buf += decoder.decode(part.value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 2);
        if (line.startsWith("data: ") && line !== "data: [DONE]") yield JSON.parse(line.slice(6));
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // the server stops generating for a reader that went away
  }
}
function foldThinking(details, reply, first) {  // -> now; the panel folds and says how long the thinking took
  const now = performance.now();
  details.open = false;
  if (reply.reasoning_content && first !== null) {
    reply.info.thought_s = (now - first) / 1000;
    details.querySelector("summary").textContent = thinkingLabel(reply, false);
  }
  return now;
}
async function fitted(c, history, mayCall, signal, reply) {  // the reply's request; past the model's context, without the oldest turns
  const last = history.findLastIndex((m) => m.role === "user");
  // where the history may start: at a user message (never inside a turn), from where the last reply's did on
  const starts = [0, ...history.map((m, i) => i).filter((i) => i > 0 && i <= last && history[i].role === "user")]
    .filter((i) => i >= ((c.skip || 0) <= last ? c.skip || 0 : 0));
  // once turns are left out, as many more as leave the reply room (else it was cut off at once): a quarter of
  // the model's context, at most 1024 tokens, unless Max tokens is set
  const roomy = Math.min(1024, Math.floor(contextLength() / 4));
  let room = starts[0] > 0 ? roomy : undefined;
  if (!room && starts.length > 1 && requestBody(c, mayCall).max_tokens === undefined) {
    // the whole history fits, but may leave the reply a few tokens (it was cut off after 2): counted first
    const { model, messages, tools, thinking } = requestBody({ ...c, messages: history }, mayCall);
    const counted = await api("/v1/tokenize", "POST", { model, messages, tools, thinking }, signal).catch(() => null);
    if (counted && counted.max_model_len - counted.count < roomy) { starts.shift(); room = roomy; }
  }
  const post = (body) => request("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal });
  for (const [k, skip] of starts.entries()) {
    const body = requestBody({ ...c, messages: history.slice(skip) }, mayCall);
    const ours = skip > 0 && body.max_tokens === undefined;  // the room asked for is the page's, not Max tokens
    if (ours) body.max_tokens = room;
    let r = await post(body);
    if (!r.ok) {
      const e = await apiError(r);  // a refusal before any generation: cheap to try again with less
      const over = e.code === "context_length_exceeded";
      if (over && k < starts.length - 1 && (e.param === "messages" || (room && e.param === "max_tokens"))) {
        room = roomy;
        continue;
      }
      // the last message alone leaves the reply less than that room: it gets what is left, as a first message does
      // (a large follow-up was refused, blaming a max_tokens of 512 the user never set)
      if (!(over && ours && e.param === "max_tokens")) throw e;
      delete body.max_tokens;
      r = await post(body);
      if (!r.ok) throw await apiError(r);
    }
    c.skip = skip;
    if (skip) reply.info.left_out = skip;
    return r;
  }
}
function contextLength() {  // the chosen model's context in tokens (as /v1/models says; 2048 until it has)
  return state.contexts[chosenModel() || state.models[0]] || 2048;
}
async function streamReply(c, mayCall, signal) {  // one reply, streamed into a new message; empty: dropped
  const body = requestBody(c, mayCall), history = c.messages.slice();
  const reply = { role: "assistant", content: "", reasoning_content: "", info: {} };
  c.messages.push(reply);
  const node = renderMessage(reply, c.messages.length - 1, c.messages, true);
  $("messages").append(node);
  const thinking = node.querySelector(".thinking"), reasoningEl = node.querySelector(".reasoning");
  const bodyEl = node.querySelector(".body"), callsEl = node.querySelector(".tool-calls");
  if (body.thinking.type === "enabled") { thinking.hidden = false; thinking.open = true; }
  const calls = [], sent = performance.now();
  let finish = null, usage = null, first = null, answer = null;  // first: the first token's time; answer: the answer's
  try {
    const r = await fitted(c, history, mayCall, signal, reply);
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message || "the server failed while writing the reply");
      usage = chunk.usage || usage;
      for (const ch of chunk.choices || []) {
        const d = ch.delta || {};
        if ((d.reasoning_content || d.content || d.tool_calls) && first === null) first = performance.now();
        if (d.reasoning_content) { reply.reasoning_content += d.reasoning_content; reasoningEl.textContent = reply.reasoning_content; }
        if (d.content) {
          if (answer === null) answer = foldThinking(thinking, reply, first);  // the answer starts: fold the thinking
          reply.content += d.content;
          bodyEl.replaceChildren(markdown(reply.content));
        }
        for (const t of d.tool_calls || []) {  // OpenAI's deltas: id and name first, then the arguments in pieces
          if (answer === null) answer = foldThinking(thinking, reply, first);
          const f = t.function || {};
          if (!calls[t.index]) calls[t.index] = { id: t.id, type: "function", function: { name: f.name || "", arguments: "" } };
          calls[t.index].function.arguments += f.arguments || "";
          callsEl.replaceChildren(...calls.filter(Boolean).map(renderCall));
        }
        finish = ch.finish_reason || finish;
      }
      $("messages").scrollTop = $("messages").scrollHeight;
    }
    if (!finish) throw new Error("The connection closed before the reply was finished.");
    if (!FINISHED.includes(finish)) throw new Error(`The server could not finish this reply (${finish}).`);
  } catch (e) {
    if (e.name === "AbortError") reply.info.stopped = true;
    throw e;
  } finally {
    const end = performance.now();
    if (reply.reasoning_content && first !== null) reply.info.thought_s = ((answer ?? end) - first) / 1000;
    const tokens = usage && usage.completion_tokens;
    // tokens/s from the first token on; a reply whose tokens arrived bunched (a busy machine) is timed from the request
    const span = first !== null && end - first >= 250 ? [tokens - 1, end - first] : [tokens, end - sent];
    if (tokens) Object.assign(reply.info, { tokens, tok_s: span[1] > 0 ? span[0] / (span[1] / 1000) : 0 });
    if (finish === "stop" && !calls.length && reply.reasoning_content && !(reply.content || "").trim()) {
      reply.info.no_answer = true;  // (the reply showed only "Thought for N s", with nothing to say why)
    }
    if (finish === "length") {  // at the reply's token limit, or where the model's context ran out
      const used = usage ? usage.prompt_tokens + usage.completion_tokens : 0;
      reply.info.cut = used >= contextLength() ? "context" : true;
    }
    if (calls.length && finish === "tool_calls") Object.assign(reply, { content: reply.content || null, tool_calls: calls.filter(Boolean) });
    else if (calls.length && finish) showError(new Error("The reply ended inside a tool call: raise Max tokens in Settings."));
    if (!reply.content && !reply.reasoning_content && !reply.tool_calls) c.messages.pop();
  }
  return reply;
}
function setBusy(b) {
  state.busy = b;
  if (!b) $("busy-note").hidden = true;
  $("messages").setAttribute("aria-busy", String(b));  // a screen reader reads the reply once, when it is done, not every token
  $("send").hidden = b;
  $("stop").hidden = !b;
}
function stop() { if (state.abort) state.abort.abort(); }

// ---------- wiring ----------
function openSide() { $("sidebar").classList.add("open"); }
function closeSide() { $("sidebar").classList.remove("open"); }
function focusSearch() { openSide(); $("search").focus(); $("search").select(); }
function shortcut(e) {  // the keys listed in the help dialog
  const mod = e.ctrlKey || e.metaKey, menu = $("conv-menu");
  if (e.key === "Escape" && menu.open) { e.preventDefault(); menu.open = false; menu.querySelector("summary").focus(); }
  else if (e.key === "Escape" && state.busy) { e.preventDefault(); stop(); }
  else if (mod && e.key.toLowerCase() === "k") { e.preventDefault(); focusSearch(); }
  else if (mod && e.shiftKey && e.key.toLowerCase() === "o") { e.preventDefault(); newChat(); }
  else if (mod && e.key === "/") { e.preventDefault(); $("help").showModal(); }
}
let searchTimer = null;
$("composer").onsubmit = (e) => { e.preventDefault(); send($("input").value); };
$("input").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); } };
$("stop").onclick = stop;
$("new-chat").onclick = newChat;
$("rename").onclick = () => { $("conv-menu").open = false; rename(state.conv).catch(showError); };
$("delete").onclick = () => { $("conv-menu").open = false; remove(state.conv).catch(showError); };
$("export-md").onclick = () => exportConversation("md");
$("export-json").onclick = () => exportConversation("json");
$("retry").onclick = () => state.retry && state.retry();
$("dismiss").onclick = clearError;
$("theme").onclick = () => { localStorage.setItem("nanoseek.theme", theme() === "dark" ? "light" : "dark"); applyTheme(); };
$("help-open").onclick = () => $("help").showModal();
$("model").onchange = () => { localStorage.setItem("nanoseek.model", $("model").value); loadModel(); };
$("search").oninput = () => { clearTimeout(searchTimer); searchTimer = setTimeout(() => refreshList().catch(showError), 200); };
$("search").onkeydown = (e) => { if (e.key === "Escape" && $("search").value) { e.stopPropagation(); $("search").value = ""; refreshList().catch(showError); } };
$("skip").onclick = (e) => { e.preventDefault(); $("input").focus(); };  // (not the address: #input is no conversation)
$("open-side").onclick = openSide;
$("close-side").onclick = closeSide;
document.addEventListener("keydown", shortcut);
document.addEventListener("click", (e) => {  // a click anywhere else closes the conversation's menu
  if ($("conv-menu").open && !$("conv-menu").contains(e.target)) $("conv-menu").open = false;
});
systemDark.addEventListener("change", applyTheme);
const narrow = matchMedia("(max-width: 700px)");  // a phone: the box's hint in a few words, not cut at its second line
function placeholder() { $("input").placeholder = narrow.matches ? "Ask anything" : "Ask anything (Enter to send, Shift+Enter for a new line)"; }
narrow.addEventListener("change", placeholder);
placeholder();
for (const k of SETTINGS) $(k).addEventListener("change", saveSetting);
$("api_key").addEventListener("change", () => { clearError(); loadServer(); refreshList().catch(showError); });
applyTheme();
loadSettings();
renderConversation();
loadServer();
settleUndone().catch(() => {}).then(() => {
  refreshList().catch(showError);
  if (location.hash.length > 1) openConversation(location.hash.slice(1)).catch(() => remember(null));
});
