"""A VL checkpoint served by a real `ernie45 serve` process: the official `openai` client sends base64 PNGs in chat
requests; bad images, too many images and too many pixels come back as 400s."""

import base64
import io
import struct
import zlib

import numpy as np
import openai
import pytest
from PIL import Image

from ..tiny_checkpoint import make_tiny_vl_checkpoint
from .conftest import MODEL_NAME, ServerProcess


@pytest.fixture(scope="module")
def vl_client(tmp_path_factory):
    checkpoint = make_tiny_vl_checkpoint(tmp_path_factory.mktemp("vlserver") / "ckpt")
    proc = ServerProcess(checkpoint, tmp_path_factory.mktemp("logs") / "vl.log", "--limit-images", "2")
    yield openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert proc.stop() == 0, proc.log()[-3000:]
    assert "Traceback" not in proc.log(), proc.log()[-5000:]


def png_uri(h=56, w=84, seed=0) -> str:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def huge_png_uri(side=9000) -> str:
    """A PNG whose header claims side x side pixels (refused before decoding)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(client, *urls, text="What is in the picture?", **kwargs):
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls] + [{"type": "text", "text": text}]
    return client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": parts}], max_tokens=5, temperature=0, **kwargs
    )


def test_openai_client_sends_a_png(vl_client):
    text_only = vl_client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "What is in the picture?"}], max_tokens=5
    )
    response = ask(vl_client, png_uri())
    assert isinstance(response.choices[0].message.content, str)
    assert response.usage.completion_tokens == 5
    # 56x84 pixels -> 4x6 patches -> 6 image tokens, plus "Picture 1:" and the start / end tokens
    assert response.usage.prompt_tokens >= text_only.usage.prompt_tokens + 8
    again = ask(vl_client, png_uri())
    assert again.choices[0].message.content == response.choices[0].message.content
    stream = ask(vl_client, png_uri(), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == response.choices[0].message.content


@pytest.mark.parametrize(
    "url, message",
    [
        ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not a decodable image"),
        ("data:image/png;base64,@@", "base64"),
        (huge_png_uri(), "exceeds the limit"),
        ("/etc/hostname", "local media paths are not allowed"),
        ("file:///etc/passwd", "local media paths are not allowed"),
    ],
)
def test_bad_image_is_400(vl_client, url, message):
    with pytest.raises(openai.BadRequestError, match=message):
        ask(vl_client, url)


def test_too_many_images_is_400(vl_client):
    with pytest.raises(openai.BadRequestError, match="at most 2"):
        ask(vl_client, png_uri(seed=1), png_uri(seed=2), png_uri(seed=3))
    assert ask(vl_client, png_uri(seed=1), png_uri(seed=2)).usage.completion_tokens == 5
