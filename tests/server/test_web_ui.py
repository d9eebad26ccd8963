"""The chat page at GET / in a real browser (headless chromium through Playwright) against a real `ernie45 serve` of
the embedded default model with an API key: the page loads without the key and asks for it, answers stream token
by token, the thinking switch shows the reasoning folded apart from the answer, Stop aborts the request and the
server frees its KV blocks, a 400 from the API is shown as a message, the conversation survives a reload."""

from __future__ import annotations

import json
import re
import time
from contextlib import ExitStack

import httpx
import pytest

from ernie45.default_model import DEFAULT_MODEL_DIR

from .conftest import MODEL_NAME, ServerProcess
from .web_browser import launched_chromium

API_KEY = "web-ui-test-key"
TIMEOUT_MS = 60_000
LAST_REPLY = ".message.assistant:last-of-type"


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    # one sequence at a time and a queue of one, so two held requests make the next a 429
    proc = ServerProcess(DEFAULT_MODEL_DIR, tmp_path_factory.mktemp("logs") / "web_ui.log", "--api-key", API_KEY,
                         "--seed", "0", "--max-num-seqs", "1", "--max-queue", "1")
    yield proc
    assert proc.stop() == 0, proc.log()[-3000:]
    assert "Traceback" not in proc.log(), proc.log()[-5000:]


@pytest.fixture(scope="module")
def browser():
    """Skips the browser tests (only) when chromium or playwright is missing."""
    with launched_chromium() as b:
        yield b


@pytest.fixture
def page(browser, web_server):
    """A fresh browser context (empty localStorage) on the page, with the API key entered. The page's CSP forbids
    eval, which Playwright's wait_for_function needs, so these contexts bypass it; test_page_keeps_to_its_own_csp
    runs the page under it."""
    context = browser.new_context(viewport={"width": 1200, "height": 800}, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(web_server.url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent === 'API key needed'")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function(f"document.getElementById('model-name').textContent === {json.dumps(MODEL_NAME)}")
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def configure(page, *, temperature="0", max_tokens="64", thinking=False, extra=""):
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.fill("#extra-body", extra)
    page.set_checked("#thinking", thinking)


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_finished(page) -> str:
    page.wait_for_function(f"['done', 'stopped', 'error'].includes(document.querySelector({LAST_REPLY!r})"
                           "?.dataset.state)")
    return page.get_attribute(LAST_REPLY, "data-state")


def stored_conversation(page) -> list[dict]:
    return json.loads(page.evaluate("localStorage.getItem('ernie45.webui.conversation')"))


def chat(web_server, text: str, **fields) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": text}], **fields}
    response = httpx.post(web_server.url + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text
    return response.json()


def test_page_and_assets_need_no_key_but_the_api_does(web_server):
    page = httpx.get(web_server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'data-multimodal="false"' in page.text  # a text model: no image button
    scripts = ("app.js", "api.js", "message_view.js", "markdown.js")
    for name, kind in [(n, "text/javascript") for n in scripts] + [("style.css", "text/css")]:
        asset = httpx.get(f"{web_server.url}/web/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
    assert httpx.get(web_server.url + "/web/../app.py").status_code == 404
    assert httpx.get(web_server.url + "/web/nothing.js").status_code == 404
    assert httpx.get(web_server.url + "/v1/models").status_code == 401
    assert f"chat page: {web_server.url}/ (--no-web-ui turns it off)" in web_server.log()


def test_page_keeps_to_its_own_csp(browser, web_server):
    """Under the page's Content-Security-Policy (no inline script or style, no eval, this origin only) the page
    loads, takes the key and renders an answer, and the browser reports no violation."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    console = []
    page.on("console", lambda message: console.append(message.text))
    page.goto(web_server.url + "/")
    page.wait_for_selector("#status.is-error")
    assert "Error 401" in page.text_content("#status")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.fill("#max-tokens", "8")
    page.fill("#extra-body", '{"ignore_eos": true}')
    send(page, "Hello")
    page.wait_for_selector(f"{LAST_REPLY}[data-state='done']")
    assert page.text_content("#model-name") == MODEL_NAME
    context.close()
    assert not [m for m in console if "Content Security Policy" in m], console


def test_model_name_and_context_length_come_from_v1_models(page, web_server):
    models = httpx.get(web_server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    max_model_len = models["data"][0]["max_model_len"]
    assert page.text_content("#model-name") == models["data"][0]["id"] == MODEL_NAME
    assert page.text_content("#model-len") == f"context {max_model_len:,} tokens"
    assert page.is_hidden("#attach")


def test_answer_streams_token_by_token_and_adds_up_to_the_full_answer(page, web_server):
    configure(page, max_tokens="48", extra='{"ignore_eos": true}')
    # every distinct length the answer's text goes through while it streams
    page.evaluate("""() => {
        window.answerLengths = new Set();
        new MutationObserver(() => {
            const content = document.querySelector('.message.assistant:last-of-type .content');
            if (content) window.answerLengths.add(content.textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    send(page, "Tell me a story about a cat.")
    assert wait_finished(page) == "done"
    lengths = page.evaluate("[...window.answerLengths].filter(n => n > 0)")
    assert len(lengths) >= 3, f"the answer appeared in {len(lengths)} DOM updates: {lengths}"
    assert "48 completion tokens" in page.text_content(f"{LAST_REPLY} .meta")
    assert page.is_hidden(f"{LAST_REPLY} .reasoning")  # thinking off: no reasoning block
    user, reply = stored_conversation(page)
    assert user == {"role": "user", "content": "Tell me a story about a cat.", "images": []}
    # the streamed deltas add up to the answer the same greedy request gets without streaming
    expected = chat(web_server, user["content"], max_tokens=48, temperature=0, ignore_eos=True,
                    chat_template_kwargs={"enable_thinking": False})
    assert reply["content"] == expected["choices"][0]["message"]["content"]
    assert reply["state"] == "done"


def test_thinking_switch_shows_the_reasoning_folded_apart_from_the_answer(page, web_server, tmp_path):
    configure(page, max_tokens="200", thinking=True)
    send(page, "What is 347 + 85?")
    assert wait_finished(page) == "done"
    _, reply = stored_conversation(page)
    expected = chat(web_server, "What is 347 + 85?", max_tokens=200, temperature=0,
                    chat_template_kwargs={"enable_thinking": True})["choices"][0]["message"]
    assert expected["reasoning_content"], "the default model thinks about arithmetic when thinking is on"
    assert (reply["reasoning"], reply["content"]) == (expected["reasoning_content"], expected["content"])
    block = page.locator(f"{LAST_REPLY} details.reasoning")
    assert block.is_visible() and block.get_attribute("open") is None  # folded once the answer started
    assert re.fullmatch(r"Thought \([\d,]+ characters\)", page.text_content(f"{LAST_REPLY} .reasoning summary"))
    assert page.text_content(f"{LAST_REPLY} .reasoning-body") == expected["reasoning_content"]
    assert expected["reasoning_content"] not in page.text_content(f"{LAST_REPLY} .content")
    page.click(f"{LAST_REPLY} .reasoning summary")
    assert block.get_attribute("open") is not None
    screenshot = tmp_path / "web_ui_thinking.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"web UI screenshot: {screenshot}")
    assert screenshot.stat().st_size > 0

    # the conversation and the settings are kept in the browser
    page.reload()
    page.wait_for_selector(f"{LAST_REPLY}[data-state='done']")
    assert page.locator(".message").count() == 2
    assert page.text_content(f"{LAST_REPLY} .reasoning-body") == expected["reasoning_content"]
    assert page.is_checked("#thinking") and page.input_value("#max-tokens") == "200"


def test_stop_aborts_the_request_and_the_server_frees_its_kv(page, web_server):
    before = web_server.wait_idle()
    configure(page, max_tokens="3000", extra='{"ignore_eos": true}')
    send(page, "Tell me a very long story.")
    page.wait_for_function(f"document.querySelector({LAST_REPLY!r} + ' .content').textContent.length > 20")
    during = web_server.metrics()
    assert during["ernie45:num_requests_running"] == 1
    assert during["ernie45:num_free_kv_blocks"] < during["ernie45:num_kv_blocks"]
    assert during["ernie45:kv_cache_usage_perc"] > 0
    page.click("#stop")
    assert wait_finished(page) == "stopped"
    assert page.is_visible("#send") and page.is_hidden("#stop")
    assert "stopped" in page.text_content(f"{LAST_REPLY} .meta")
    after = web_server.wait_idle(timeout=30)
    assert after["ernie45:num_requests_running"] == 0 and after["ernie45:num_requests_waiting"] == 0
    assert after["ernie45:num_free_kv_blocks"] == after["ernie45:num_kv_blocks"]
    assert after["ernie45:kv_cache_usage_perc"] == 0
    generated = after["ernie45:generation_tokens_total"] - before["ernie45:generation_tokens_total"]
    assert 0 < generated < 3000  # aborted, not run to its 3,000 tokens
    # the partial answer stays in the conversation, so the next turn can build on it
    assert stored_conversation(page)[-1]["state"] == "stopped"


def test_api_errors_are_shown_as_messages(page, web_server):
    configure(page, max_tokens="100000")  # more than the context holds: a 400 from the server
    send(page, "Hello")
    assert wait_finished(page) == "error"
    error = page.text_content(f"{LAST_REPLY} .error")
    assert error.startswith("Error 400: invalid_request_error, context_length_exceeded: ")
    assert "maximum context length is 4096 tokens" in error
    assert page.is_visible(f"{LAST_REPLY} .error")

    configure(page, extra="{not json")  # caught in the page: nothing is sent
    count = page.locator(".message").count()
    send(page, "Hello again")
    assert page.text_content("#settings-error").startswith("Extra request fields: ")
    assert page.locator(".message").count() == count
    assert page.input_value("#prompt") == "Hello again"  # kept for the next try


def wait_for(web_server, condition) -> dict:
    for _ in range(400):
        m = web_server.metrics()
        if condition(m):
            return m
        time.sleep(0.05)
    raise AssertionError(f"the server's metrics never met the condition: {m}")


def test_a_full_queue_429_is_shown_with_a_hint(page, web_server):
    long = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 3000,
            "ignore_eos": True, "stream": True}
    configure(page, max_tokens="8")
    with ExitStack() as held:  # two streams held open: one running, one queued behind it
        client = held.enter_context(httpx.Client(base_url=web_server.url, timeout=60,
                                                 headers={"Authorization": f"Bearer {API_KEY}"}))
        first = held.enter_context(client.stream("POST", "/v1/chat/completions", json=long))
        assert first.status_code == 200
        wait_for(web_server, lambda m: m["ernie45:num_requests_running"] == 1)
        second = held.enter_context(client.stream("POST", "/v1/chat/completions", json=long))
        assert second.status_code == 200
        wait_for(web_server, lambda m: m["ernie45:num_requests_queued"] == 1)
        send(page, "Hello")
        assert wait_finished(page) == "error"
    error = page.text_content(f"{LAST_REPLY} .error")
    assert error.startswith("Error 429: rate_limit_error, queue_full: the server is busy"), error
    assert error.endswith("(the server's queue is full; try again in a moment)")
    after = web_server.wait_idle(timeout=30)  # both held requests were aborted when their connections closed
    assert after["ernie45:num_free_kv_blocks"] == after["ernie45:num_kv_blocks"]


MARKDOWN = """# Title
Some **bold**, *italic*, `a <b> tag` and <script>alert(1)</script>.

- one
- two
  - nested

1. first
2. second

```python
print("<x>")
```

| a | b |
|---|--:|
| 1 | 2 |

> quoted

[ok](https://example.com/?a=1&b=2) [bad](javascript:alert(1)) <img src=x onerror=alert(1)>
```js
still streaming"""


def test_markdown_is_rendered_with_every_source_character_escaped(page):
    html = page.evaluate("async (text) => (await import('/web/markdown.js')).renderMarkdown(text)", MARKDOWN)
    assert html.startswith("<h1>Title</h1><p>Some <strong>bold</strong>, <em>italic</em>, <code>a &lt;b&gt; tag</code>"
                           " and &lt;script&gt;alert(1)&lt;/script&gt;.</p>")
    assert "<ul><li>one</li><li>two<ul><li>nested</li></ul></li></ul><ol><li>first</li><li>second</li></ol>" in html
    assert '<pre><code class="language-python">print(&quot;&lt;x&gt;&quot;)</code></pre>' in html
    assert '<th>a</th><th class="align-right">b</th>' in html and '<td class="align-right">2</td>' in html
    assert "<blockquote><p>quoted</p></blockquote>" in html
    assert '<a href="https://example.com/?a=1&amp;b=2" target="_blank" rel="noopener noreferrer">ok</a>' in html
    assert "[bad](javascript:alert(1))" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.endswith('<code class="language-js">still streaming</code></pre></div>')  # an unclosed fence
    # the browser's own parse of it: the only elements are the renderer's, nothing executable
    tags = page.evaluate("""(html) => {
        const box = document.createElement('div');
        box.innerHTML = html;
        return [...new Set([...box.querySelectorAll('*')].map(e => e.tagName.toLowerCase()))].sort();
    }""", html)
    assert set(tags) <= {"a", "blockquote", "button", "code", "div", "em", "h1", "li", "ol", "p", "pre", "span",
                         "strong", "table", "tbody", "td", "th", "thead", "tr", "ul"}, tags
