// nanoseek chat: a static page over /v1/chat/completions (streaming), /api/conversations and /api/tools.
// All model and user text is inserted as text or through `markdown`, which escapes it first,
// so a reply containing <script> or <img onerror=...> is shown, never run (tool calls and results too).
// With tools on, a reply that calls the server's built-in tools is followed by their results
// (run through POST /api/tools/{name}) and another reply, at most MAX_TOOL_ROUNDS rounds a message.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { list: [], conv: null, abort: null, busy: false, tools: [] };
const SETTINGS = ["temperature", "top_p", "max_tokens", "thinking", "tools", "api_key"];
const MAX_TOOL_ROUNDS = 4;

// ---------- settings ----------
function loadSettings() {
  for (const k of SETTINGS) {
    const v = localStorage.getItem("nanoseek." + k);
    if (v === null) continue;
    if ($(k).type === "checkbox") $(k).checked = v === "true"; else $(k).value = v;
  }
}
function saveSetting(e) {
  const el = e.target;
  localStorage.setItem("nanoseek." + el.id, el.type === "checkbox" ? el.checked : el.value);
}

// ---------- server calls ----------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
async function api(path, method = "GET", body, signal) {
  const r = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body), signal });
  if (!r.ok) throw await apiError(r);
  return r.json();
}
async function apiError(r) {
  let msg = r.status + " " + r.statusText;
  try { msg = (await r.json()).error.message; } catch (_) { /* not JSON */ }
  if (r.status === 401) { msg += " — enter the server's API key in Settings."; $("settings").open = true; openSide(); }
  return new Error(msg);
}
function showError(e) { $("error").textContent = e.message || String(e); $("error").hidden = false; }
function clearError() { $("error").hidden = true; }

// ---------- markdown (escape first, then a small safe subset) ----------
function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}
function inline(s) {  // s is already escaped
  return s.replace(/`([^`]+)`/g, "<code>$1</code>")
          .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
          .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>");
}
function markdown(text) {
  const out = [];
  const parts = text.split(/```/);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {  // a code block: first line may name the language
      const nl = part.indexOf("\n");
      const code = nl >= 0 ? part.slice(nl + 1) : part;
      out.push("<pre><code>" + escapeHtml(code.replace(/\n$/, "")) + "</code></pre>");
      return;
    }
    for (const block of escapeHtml(part).split(/\n{2,}/)) {
      if (!block.trim()) continue;
      const lines = block.split("\n");
      if (lines.every((l) => /^\s*([-*]|\d+\.)\s+/.test(l))) {
        const tag = /^\s*\d+\./.test(lines[0]) ? "ol" : "ul";
        out.push(`<${tag}>` + lines.map((l) => "<li>" + inline(l.replace(/^\s*([-*]|\d+\.)\s+/, "")) + "</li>").join("") + `</${tag}>`);
      } else if (/^#{1,6}\s/.test(block)) {
        const level = block.match(/^#+/)[0].length;
        out.push(`<h${level + 2 > 6 ? 6 : level + 2}>` + inline(block.replace(/^#+\s/, "")) + `</h${level + 2 > 6 ? 6 : level + 2}>`);
      } else {
        out.push("<p>" + inline(block).replace(/\n/g, "<br>") + "</p>");
      }
    }
  });
  return out.join("");
}

// ---------- rendering ----------
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function toolName(id, index) {  // the name of the function a tool message answers
  for (let i = index - 1; i >= 0; i--) {
    const call = (state.conv.messages[i].tool_calls || []).find((c) => c.id === id);
    if (call) return call.function.name;
  }
  return "tool";
}
function renderCall(call) {
  const box = el("div", "tool-call");
  box.append(el("span", "tool-name", call.function.name), el("code", "tool-args", call.function.arguments));
  return box;
}
function renderMessage(m, index) {
  const box = el("div", "msg " + m.role);
  const who = el("div", "who", m.role === "user" ? "You" : m.role === "tool" ? toolName(m.tool_call_id, index) + " result" : "nanoseek");
  box.appendChild(who);
  if (m.role === "tool") {
    box.appendChild(el("pre", "body tool-result", m.content));
  } else if (m.role === "user") {
    const edit = el("button", "edit", "Edit");
    edit.onclick = () => startEdit(box, index);
    who.appendChild(edit);
    box.appendChild(el("div", "body", m.content));
  } else {
    if (index === state.conv.messages.length - 1) {
      const regen = el("button", "regenerate", "Regenerate");
      regen.onclick = () => regenerate();
      who.appendChild(regen);
    }
    const details = el("details", "thinking");
    details.appendChild(el("summary", "", "Thinking"));
    const reasoning = el("div", "reasoning", m.reasoning_content || "");
    details.appendChild(reasoning);
    details.hidden = !m.reasoning_content;
    box.appendChild(details);
    const body = el("div", "body");
    body.innerHTML = markdown(m.content || "");
    box.appendChild(body);
    const calls = el("div", "tool-calls");
    calls.append(...(m.tool_calls || []).map(renderCall));
    box.appendChild(calls);
  }
  return box;
}
function renderConversation() {
  const c = state.conv;
  $("title").textContent = c ? c.title : "nanoseek";
  $("system").value = c ? c.system : $("system").value;
  const box = $("messages");
  box.replaceChildren(...(c ? c.messages.map(renderMessage) : []));
  box.scrollTop = box.scrollHeight;
  for (const li of $("conversations").children) li.classList.toggle("active", c && li.dataset.id === c.id);
}
function renderList() {
  $("conversations").replaceChildren(...state.list.map((c) => {
    const li = el("li", "", c.title);
    li.dataset.id = c.id;
    li.title = c.title;
    li.onclick = () => { openConversation(c.id); closeSide(); };
    return li;
  }));
  renderConversation();
}

// ---------- tools ----------
async function loadTools() {  // the server's built-in tools this model can call (none: no toggle)
  try { state.tools = (await api("/api/tools")).data; } catch (_) { state.tools = []; }
  const names = state.tools.map((t) => t.function.name);
  $("tools-toggle").hidden = !names.length;
  $("tools-names").textContent = " (" + names.join(", ") + ")";
}
async function runTools(c, reply) {  // each call's result as a tool message; a stop answers the rest
  const signal = state.abort.signal;
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
    $("messages").appendChild(renderMessage(msg, c.messages.length - 1));
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
async function refreshList() { state.list = (await api("/api/conversations")).data; renderList(); }
async function openConversation(id) {
  if (state.busy) return;
  clearError();
  state.conv = await api("/api/conversations/" + id);
  renderConversation();
}
async function newConversation() {
  if (state.busy) return;
  state.conv = await api("/api/conversations", "POST", { title: "New chat", system: $("system").value });
  await refreshList();
}
async function saveMessages() {
  const c = state.conv;
  await api(`/api/conversations/${c.id}/messages`, "PUT", { messages: c.messages });
  if (c.title === "New chat" && c.messages.length) {
    const first = c.messages[0].content.trim().replace(/\s+/g, " ");
    c.title = first.length > 40 ? first.slice(0, 40) + "…" : first || "New chat";
    await api("/api/conversations/" + c.id, "PATCH", { title: c.title });
  }
  await refreshList();
}

// ---------- talking to the model ----------
async function send(text) {
  if (state.busy || !text.trim()) return;
  clearError();
  if (!state.conv) await newConversation();
  state.conv.messages.push({ role: "user", content: text });
  await stream();
}
async function regenerate() {  // the whole turn again: replies and tool results after the last user message
  if (state.busy) return;
  const msgs = state.conv.messages;
  while (msgs.length && msgs[msgs.length - 1].role !== "user") msgs.pop();
  await stream();
}
function startEdit(box, index) {
  if (state.busy) return;
  const body = box.querySelector(".body");
  const area = el("textarea", "edit-box");
  area.value = state.conv.messages[index].content;
  area.rows = 3;
  const ok = el("button", "", "Send");
  const cancel = el("button", "", "Cancel");
  ok.onclick = async () => {
    state.conv.messages = state.conv.messages.slice(0, index);
    state.conv.messages.push({ role: "user", content: area.value });
    await stream();
  };
  cancel.onclick = renderConversation;
  body.replaceWith(area);
  box.appendChild(ok);
  box.appendChild(cancel);
  area.focus();
}

async function stream() {  // one turn: replies, and the tools they call, until one calls none
  const c = state.conv;
  renderConversation();
  const system = $("system").value.trim();
  if (system !== c.system) { c.system = system; api("/api/conversations/" + c.id, "PATCH", { system }).catch(() => {}); }
  const before = c.messages.length;
  setBusy(true);
  state.abort = new AbortController();
  try {
    for (let round = 0; ; round++) {
      const reply = await streamReply(c, system, round < MAX_TOOL_ROUNDS);
      if (!reply.tool_calls) break;
      await runTools(c, reply);
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e);
  } finally {
    setBusy(false);
    state.abort = null;
    if (c.messages.length > before) await saveMessages().catch(showError);
    renderConversation();
  }
}
async function streamReply(c, system, mayCall) {  // one reply, streamed into a new message; empty: dropped
  const reply = { role: "assistant", content: "", reasoning_content: "" };
  c.messages.push(reply);
  const node = renderMessage(reply, c.messages.length - 1);
  $("messages").appendChild(node);
  const thinking = node.querySelector(".thinking"), reasoningEl = node.querySelector(".reasoning");
  const bodyEl = node.querySelector(".body"), callsEl = node.querySelector(".tool-calls");
  const useThinking = $("thinking").checked;
  if (useThinking) { thinking.hidden = false; thinking.open = true; }
  const history = c.messages.slice(0, -1).map(wire);
  const body = {
    model: "nanoseek", stream: true, messages: (system ? [{ role: "system", content: system }] : []).concat(history),
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value), thinking: { type: useThinking ? "enabled" : "disabled" },
  };
  if ($("tools").checked && state.tools.length) Object.assign(body, { tools: state.tools, tool_choice: mayCall ? "auto" : "none" });
  const calls = [];
  let finish = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.abort.signal });
    if (!r.ok) throw await apiError(r);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        for (const ch of chunk.choices || []) {
          const d = ch.delta || {};
          if (d.reasoning_content) { reply.reasoning_content += d.reasoning_content; reasoningEl.textContent = reply.reasoning_content; }
          if (d.content) {
            if (!reply.content) thinking.open = false;  // the answer starts: fold the thinking
            reply.content += d.content;
            bodyEl.innerHTML = markdown(reply.content);
          }
          for (const t of d.tool_calls || []) {  // OpenAI's deltas: id and name first, then the arguments in pieces
            thinking.open = false;
            const f = t.function || {};
            if (!calls[t.index]) calls[t.index] = { id: t.id, type: "function", function: { name: f.name || "", arguments: "" } };
            calls[t.index].function.arguments += f.arguments || "";
            callsEl.replaceChildren(...calls.filter(Boolean).map(renderCall));
          }
          finish = ch.finish_reason || finish;
        }
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
  } finally {
    thinking.open = false;
    if (!reply.reasoning_content) thinking.hidden = true;
    if (calls.length && finish === "tool_calls") Object.assign(reply, { content: reply.content || null, tool_calls: calls.filter(Boolean) });
    else if (calls.length && finish) showError(new Error("The reply ended inside a tool call: raise Max tokens in Settings."));
    if (!reply.content && !reply.reasoning_content && !reply.tool_calls) c.messages.pop();
  }
  return reply;
}
function setBusy(b) {
  state.busy = b;
  $("send").hidden = b;
  $("stop").hidden = !b;
}

// ---------- wiring ----------
function openSide() { $("sidebar").classList.add("open"); }
function closeSide() { $("sidebar").classList.remove("open"); }
$("composer").onsubmit = (e) => { e.preventDefault(); const t = $("input").value; $("input").value = ""; send(t); };
$("input").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); } };
$("stop").onclick = () => state.abort && state.abort.abort();
$("new-chat").onclick = () => { closeSide(); newConversation().catch(showError); };
$("rename").onclick = async () => {
  if (!state.conv) return;
  const t = prompt("Rename conversation", state.conv.title);
  if (t && t.trim()) { state.conv = await api("/api/conversations/" + state.conv.id, "PATCH", { title: t.trim() }); await refreshList(); }
};
$("delete").onclick = async () => {
  if (!state.conv || !confirm("Delete this conversation?")) return;
  await api("/api/conversations/" + state.conv.id, "DELETE");
  state.conv = null;
  await refreshList();
};
$("open-side").onclick = openSide;
$("close-side").onclick = closeSide;
for (const k of SETTINGS) $(k).addEventListener("change", saveSetting);
$("api_key").addEventListener("change", loadTools);
loadSettings();
loadTools();
refreshList().then(() => { if (state.list.length) return openConversation(state.list[0].id); }).catch(showError);
