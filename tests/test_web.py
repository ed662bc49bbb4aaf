"""The chat web app in headless Chromium (Debian's package, driven by Playwright)."""

import json
import os
import shutil
import time

import httpx
import pytest
import torch

from conftest import randomize_
from nanoseek.data.builtin import task_texts
from nanoseek.inference import Engine
from nanoseek.model import build_model, get_preset
from nanoseek.serve import create_app
from nanoseek.serve.store import ChatStore
from nanoseek.tokenizer import DeepSeekTokenizer
from test_server import LiveServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (.ci/run installs it)")
KEY = "web-key"
XSS = "<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script> **bold**"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = DeepSeekTokenizer.train(list(task_texts(300)), vocab_size=360)
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                   max_position_embeddings=1024)).eval()
    randomize_(model, std=0.08)
    db = tmp_path_factory.mktemp("web") / "chats.db"
    engine = Engine(model, decode=tok.decode, max_batch=4, max_len=1024, eos_token_id=tok.eos_id)
    with LiveServer(create_app(engine, tok, api_key=KEY, store=ChatStore(db))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_chat_flow_thinking_panel_history_and_escaping(server, browser):
    page = browser.new_page()
    page.goto(server)
    page.wait_for_selector("#error:not([hidden])")  # no key yet: the page says so and opens settings
    assert "API key" in page.inner_text("#error")
    page.fill("#api_key", KEY)
    page.dispatch_event("#api_key", "change")
    kept = "[localStorage.getItem('nanoseek.api_key'), sessionStorage.getItem('nanoseek.api_key')]"
    assert page.evaluate(kept) == [None, KEY]  # not remembered: kept only while the tab is open
    page.check("#remember_key")
    assert page.evaluate(kept) == [KEY, None]
    page.uncheck("#remember_key")
    assert page.evaluate(kept) == [None, KEY]
    page.fill("#max_tokens", "40")
    page.dispatch_event("#max_tokens", "change")
    page.click("#new-chat")
    page.fill("#input", "What is 2 + 3?")
    # a store slow to answer: Send comes back only once the turn is stored, so a reload finds it
    page.route("**/api/conversations/*/messages", lambda route: time.sleep(1.0) or route.continue_())
    with page.expect_response("**/v1/chat/completions"):  # (a 40-token reply can be over before #stop is polled)
        page.press("#input", "Enter")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)  # done
    assert page.get_attribute("#messages", "aria-busy") == "false"  # and read out
    auth = {"Authorization": f"Bearer {KEY}"}
    stored = httpx.get(f"{server}/api/conversations", headers=auth).json()["data"]
    messages = httpx.get(f"{server}/api/conversations/{stored[0]['id']}", headers=auth).json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "What is 2 + 3?"
    page.unroute("**/api/conversations/*/messages")
    reply = page.locator(".msg.assistant").last
    reasoning = reply.locator(".reasoning").text_content()
    assert reasoning.strip(), "the Thinking panel shows the streamed reasoning"
    assert reply.locator("details.thinking").get_attribute("open") is None  # folded when done
    # the conversation is stored server-side: reload and find it
    page.reload()
    page.wait_for_selector("#conversations li")
    assert "What is 2 + 3?" in page.inner_text("#conversations")
    page.click("#conversations li")
    page.wait_for_selector(".msg.user")
    assert page.locator(".msg.user .body").first.inner_text() == "What is 2 + 3?"
    # HTML typed by the user, and HTML in a (stored) assistant reply, is shown as text, never run
    page.fill("#input", XSS)
    page.press("#input", "Enter")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    assert page.locator(".msg.user .body").last.inner_text() == XSS
    cid = page.evaluate("state.conv.id")
    msgs = page.evaluate("state.conv.messages")
    msgs.append({"role": "user", "content": "show html"})
    msgs.append({"role": "assistant", "content": XSS + "\n\n```html\n<script>window.__pwned=3</script>\n```"})
    r = httpx.put(f"{server}/api/conversations/{cid}/messages", json={"messages": msgs},
                  headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    page.reload()
    page.wait_for_selector("#conversations li")
    page.click("#conversations li")
    page.wait_for_selector(".msg.assistant")
    last = page.locator(".msg.assistant .body").last
    assert "<img" in last.inner_text() and "<script>" in last.inner_text()
    assert last.locator("strong").inner_text() == "bold"  # markdown still renders
    assert last.locator("img, script").count() == 0
    assert page.evaluate("window.__pwned") is None
    page.close()


def test_stop_regenerate_edit_and_phone_layout(server, browser):
    page = browser.new_page(viewport={"width": 390, "height": 800})
    page.add_init_script(f"localStorage.setItem('nanoseek.api_key', '{KEY}'); "  # the key remembered from before
                         "localStorage.setItem('nanoseek.remember_key', 'true')")
    page.add_init_script("localStorage.setItem('nanoseek.tools', 'false')")  # plain replies (no calculator)
    page.goto(server)
    page.wait_for_load_state("networkidle")
    # phone-sized: the conversation list is off screen until opened
    assert page.evaluate("document.getElementById('sidebar').getBoundingClientRect().right") <= 0
    assert page.is_visible("#open-side") and page.is_visible("#input")
    page.click("#open-side")
    page.wait_for_timeout(300)
    page.click("#new-chat")
    page.wait_for_timeout(300)
    assert page.evaluate("document.getElementById('sidebar').getBoundingClientRect().right") <= 0
    page.evaluate("document.getElementById('max_tokens').value = '600'")
    page.fill("#input", "Tell me a long story")
    page.press("#input", "Enter")
    page.wait_for_selector("#stop:not([hidden])")
    page.wait_for_timeout(300)
    page.click("#stop")
    page.wait_for_selector("#send:not([hidden])", timeout=20_000)
    assert page.locator(".msg.assistant").count() == 1
    page.evaluate("document.getElementById('max_tokens').value = '20'")
    page.click(".msg.assistant button.regenerate")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    assert page.locator(".msg.assistant").count() == 1
    page.click(".msg.user button.edit")
    page.fill(".edit-box", "draft")
    page.press(".edit-box", "Escape")  # cancels, as Esc does in the message box
    assert page.locator(".edit-box").count() == 0 and page.locator(".msg.user .body").first.inner_text() != "draft"
    page.click(".msg.user button.edit")
    page.fill(".edit-box", "Edited question \n")
    page.press(".edit-box", "Enter")  # sends, trimmed
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    assert page.locator(".msg.user .body").first.inner_text() == "Edited question"
    assert page.locator(".msg").count() == 2
    assert page.is_visible("#input") and page.is_visible("#send")
    assert page.evaluate("state.conv.messages[0].content") == "Edited question"
    page.click("#open-side")  # each conversation in the list is a button: reachable from the keyboard
    first = page.locator("#conversations li button.conv-title").first
    first.focus()
    assert page.evaluate("document.activeElement.classList.contains('conv-title')")
    page.close()


def test_a_reload_mid_reply_keeps_the_question_and_what_came(server, browser):
    """A message is stored before its reply streams, and leaving the page mid-reply stores the reply so
    far, marked stopped (the question vanished with the reload); a new chat does not inherit the last
    conversation's system prompt; the Markdown export shows reasoning and titles as written."""
    auth = {"Authorization": f"Bearer {KEY}"}
    page = browser.new_page()
    page.add_init_script(f"localStorage.setItem('nanoseek.api_key', '{KEY}'); localStorage.setItem('nanoseek.remember_key', 'true');"
                         "localStorage.setItem('nanoseek.tools', 'false')")
    french = httpx.post(f"{server}/api/conversations", json={"title": "fr", "system": "Answer in French."},
                        headers=auth).json()["id"]
    page.goto(f"{server}/#{french}")
    page.wait_for_load_state("networkidle")
    assert page.input_value("#system") == "Answer in French."
    page.click("#new-chat")
    assert page.input_value("#system") == ""  # the new chat's own, empty
    page.evaluate("document.getElementById('max_tokens').value = '900'")
    page.fill("#input", "Tell me a long story")
    page.press("#input", "Enter")
    page.wait_for_selector("#stop:not([hidden])")
    page.wait_for_timeout(300)
    assert page.evaluate("state.busy")  # mid-reply
    assert page.get_attribute("#messages", "aria-busy") == "true"  # a screen reader waits for the whole reply
    cid = page.evaluate("state.conv.id")
    # the reloaded page reads the conversation before the save made as the old one left has landed
    before = httpx.get(f"{server}/api/conversations/{cid}", headers=auth).json()
    assert [m["role"] for m in before["messages"]] == ["user"]
    stale = [before]
    page.route(f"**/api/conversations/{cid}", lambda route: route.fulfill(json=stale.pop()) if stale and
               route.request.method == "GET" else route.continue_())
    page.reload()
    for _ in range(50):  # the page's last request arrives as it goes
        got = httpx.get(f"{server}/api/conversations/{cid}", headers=auth).json()
        assert "messages" in got, got
        messages = got["messages"]
        if len(messages) == 2:
            break
        time.sleep(0.1)
    assert messages[0] == {"role": "user", "content": "Tell me a long story"}, messages
    assert messages[1]["role"] == "assistant" and messages[1]["info"]["stopped"], messages[1]
    page.wait_for_selector(".msg.assistant", timeout=10_000)  # the reload opened it (#id), the reply shown as stopped
    assert "stopped" in page.locator(".msg.assistant .notes").inner_text()
    md = page.evaluate("""asMarkdown({title: 'Sums <b>& more</b>', system: '', messages: [
        {role: 'user', content: 'q'}, {role: 'assistant', reasoning_content: '2*3=6 no\\nkeep 4 ```', content: '**6**'}]})""")
    assert "# Sums \\<b\\>& more\\</b\\>" in md and "````text\n2*3=6 no\nkeep 4 ```\n````" in md and "**6**" in md
    page.close()


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """A model whose template writes DeepSeek's tool calls, biased to call a tool whenever it may."""
    from test_app_tools import tool_calling_model

    model, tok = tool_calling_model(tmp_path_factory.mktemp("v31"))
    engine = Engine(model, decode=tok.decode, max_batch=2, max_len=2048, eos_token_id=tok.eos_id)
    db = tmp_path_factory.mktemp("web-tools") / "chats.db"
    with LiveServer(create_app(engine, tok, api_key=KEY, store=ChatStore(db))) as url:
        yield url


def shown_rounds(page) -> tuple[list[tuple[str, str]], list[str]]:
    """The tool calls on the page as (name, arguments), and the tool results, in order."""
    calls = [(c.locator(".tool-name").inner_text(), c.locator(".tool-args").inner_text())
             for c in page.locator(".msg.assistant .tool-call").all()]
    return calls, [r.inner_text() for r in page.locator(".msg.tool .body").all()]


def test_tool_calls_run_show_continue_and_persist(tool_server, browser):
    from nanoseek.tools import run_calculator

    page = browser.new_page()
    settings = {"api_key": KEY, "remember_key": "true", "thinking": "false", "max_tokens": "30"}  # thinking off: V3.1 calls tools without it
    page.add_init_script("".join(f"localStorage.setItem('nanoseek.{k}', '{v}');" for k, v in settings.items()))
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    page.goto(tool_server)
    page.wait_for_selector("#tools-toggle:not([hidden])")  # the server lists a tool: the toggle shows, on
    assert page.is_checked("#tools") and "calculator" in page.inner_text("#tools-toggle")
    page.click("#new-chat")
    page.fill("#input", "What is 17 * 23?")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.tool", timeout=120_000)  # a call ran and its result is shown
    page.wait_for_selector("#send:not([hidden])", timeout=240_000)  # and the conversation went on to an answer
    calls, results = shown_rounds(page)
    rounds = page.locator(".msg.assistant:has(.tool-call)").count()
    assert 1 <= rounds <= 4 and len(sent) == rounds + 1 and calls and len(results) == len(calls)
    for (name, args), result in zip(calls, results):
        assert name == "calculator" and result == run_calculator(args)  # the real calculator's answer
    assert [b["tool_choice"] for b in sent] == ["auto"] * rounds + ["none" if rounds == 4 else "auto"]
    assert sent[0]["tools"][0]["function"]["name"] == "calculator"
    assert sent[1]["messages"][-1]["role"] == "tool" and sent[1]["messages"][-2]["tool_calls"]
    last = page.locator(".msg").last
    assert "assistant" in last.get_attribute("class") and last.locator(".tool-call").count() == 0
    assert last.locator(".body").inner_text().strip()
    # stored with the conversation: after a reload, the calls and results are shown again
    page.reload()
    page.wait_for_selector(".msg.tool")
    assert shown_rounds(page) == (calls, results)
    cid = page.evaluate("state.conv.id")
    stored = httpx.get(f"{tool_server}/api/conversations/{cid}", headers={"Authorization": f"Bearer {KEY}"}).json()
    tool_msgs = [m for m in stored["messages"] if m["role"] == "tool"]
    ids = [c["id"] for m in stored["messages"] for c in m.get("tool_calls", [])]
    assert [m["tool_call_id"] for m in tool_msgs] == ids and len(ids) == len(calls)
    # HTML in a call's arguments or a result is shown as text
    msgs = stored["messages"] + [
        {"role": "user", "content": "html"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_x", "type": "function", "function": {
            "name": "calculator", "arguments": json.dumps({"expression": XSS})}}]},
        {"role": "tool", "tool_call_id": "call_x", "content": XSS}, {"role": "assistant", "content": "done"}]
    r = httpx.put(f"{tool_server}/api/conversations/{cid}/messages", json={"messages": msgs},
                  headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    page.reload()
    page.wait_for_selector(".msg.tool")
    assert page.locator(".msg.tool .body").last.inner_text() == XSS
    assert "<script>" in page.locator(".tool-call .tool-args").last.inner_text()
    assert page.locator("#messages img, #messages script").count() == 0 and page.evaluate("window.__pwned") is None
    # the toggle is remembered; off, no tools are sent
    page.uncheck("#tools")
    page.reload()
    page.wait_for_selector("#tools-toggle:not([hidden])")
    assert not page.is_checked("#tools")
    page.evaluate("document.getElementById('max_tokens').value = '4'")
    sent.clear()
    page.fill("#input", "no tools now")
    page.press("#input", "Enter")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    assert len(sent) == 1 and "tools" not in sent[0]
    page.close()
