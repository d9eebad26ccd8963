"""The chat page against a VL checkpoint's real `ernie45 serve`: the image button appears, an attached PNG goes to
/v1/chat/completions as a data-URL image_url part (the prompt grows by its image tokens) and stays in the
conversation."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from ..tiny_checkpoint import make_tiny_vl_checkpoint
from .conftest import MODEL_NAME, ServerProcess
from .test_vl_server import png_uri
from .web_browser import launched_chromium, require_browser

require_browser()


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory):
    checkpoint = make_tiny_vl_checkpoint(tmp_path_factory.mktemp("vlweb") / "ckpt")
    proc = ServerProcess(checkpoint, tmp_path_factory.mktemp("logs") / "vl_web.log")
    yield proc
    assert proc.stop() == 0, proc.log()[-3000:]
    assert "Traceback" not in proc.log(), proc.log()[-5000:]


def test_attached_image_is_sent_as_a_data_url_part(vl_server, tmp_path):
    image_uri = png_uri(h=56, w=84, seed=1)
    image = tmp_path / "picture.png"
    image.write_bytes(base64.b64decode(image_uri.split(",", 1)[1]))
    text_only = httpx.post(vl_server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "What is in the picture?"}], "max_tokens": 1,
    }).json()["usage"]["prompt_tokens"]
    with launched_chromium() as browser:
        context = browser.new_context(bypass_csp=True)  # wait_for_function evaluates strings
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(vl_server.url + "/")
        page.wait_for_function(f"document.getElementById('model-name').textContent === {json.dumps(MODEL_NAME)}")
        assert page.is_visible("#attach")
        page.set_input_files("#image-input", str(image))
        page.wait_for_selector("#attachments .attachment img")
        page.fill("#max-tokens", "4")
        page.fill("#temperature", "0")
        page.fill("#extra-body", '{"ignore_eos": true}')  # random weights: no early eos
        page.fill("#prompt", "What is in the picture?")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".message.assistant[data-state='done']")
        sent = page.get_attribute(".message.user img.attached", "src")
        meta = page.text_content(".message.assistant .meta")
        assert page.locator("#attachments .attachment").count() == 0  # the composer is cleared for the next turn
        stored = json.loads(page.evaluate("localStorage.getItem('ernie45.webui.conversation')"))
        context.close()
    assert sent == image_uri  # the file read back as the same data URL
    assert stored[0]["images"] == [image_uri]
    prompt_tokens = int(meta.split(" prompt")[0])
    # 56x84 pixels -> 4x6 patches -> 6 image tokens, plus "Picture 1:" and the start / end tokens
    assert prompt_tokens >= text_only + 8, meta
    assert "4 completion tokens" in meta
