"""`LLM.chat` with OpenAI-style content parts on a VL checkpoint: numbered picture placeholders in the prompt, images
from data: URIs and paths, and the same tokens as the plain model on the same processed inputs."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

import ernie45
from ernie45 import LLM, SamplingParams
from ernie45.generation.generate_vl import generate_vl
from ernie45.processing import expand_placeholders, load_processors
from tests.tiny_checkpoint import make_tiny_vl_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_vl_checkpoint(tmp_path_factory.mktemp("vlchat") / "ckpt")


def png_data_uri(seed: int) -> str:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_chat_with_image_and_video_parts(checkpoint, tmp_path):
    llm = LLM(str(checkpoint), max_num_batched_tokens=8)
    picture = tmp_path / "p.png"
    picture.write_bytes(base64.b64decode(png_data_uri(2).split(",", 1)[1]))
    frames = np.random.default_rng(3).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image_url", "image_url": {"url": png_data_uri(1)}},
                {"type": "text", "text": " and "},
                {"type": "image_url", "image_url": {"url": str(picture)}},
                {"type": "video", "video": frames},
                {"type": "text", "text": " please."},
            ],
        }
    ]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    prompt = out.prompt
    assert "Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" in prompt
    assert "Picture 2:<|IMAGE_START|>" in prompt and "Video 1:<|VIDEO_START|><|VIDEO_PLACEHOLDER|>" in prompt

    model = ernie45.load_model(checkpoint)
    images, videos = load_processors(checkpoint)
    media = {**images([png_data_uri(1), picture]), **videos([frames])}
    inputs = expand_placeholders(
        llm.tokenizer.encode(prompt), model.config, media["image_grid_thw"], media["video_grid_thw"]
    )
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    expected = generate_vl(model, inputs["input_ids"], max_new_tokens=6, **media)[0, inputs["input_ids"].shape[1] :]
    assert out.outputs[0].token_ids == expected.tolist()


def test_chat_rejects_bad_parts(checkpoint):
    llm = LLM(str(checkpoint))
    with pytest.raises(ValueError, match="not a decodable image"):
        llm.chat(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
        )
    with pytest.raises(ValueError, match="unsupported content part"):
        llm.chat([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "x"}}]}])
    assert not llm.engine.has_unfinished_requests()
