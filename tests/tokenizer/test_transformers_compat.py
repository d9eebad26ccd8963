"""The saved layout loads in transformers' AutoTokenizer, and its tokenizer.json drives our `tokenizers` backend."""

import shutil

import pytest

from ernie45.tokenizer import BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE, ErnieTokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "  two  spaces\n\nnewlines",
    "你好，世界！模型正在学习中文句子。罕见的字：龘",
    "emoji 😀🎉 ok",
    "<|begin_of_sentence|>hi<think>x</think><|IMAGE_PLACEHOLDER|><mask:1> <s></s><unk>",
]
MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "你好"},
]

TOOL_MESSAGES = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "<think>need a tool</think>",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": {"temperature": "20°C", "sky": "晴"}},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def hf_dirs(tokenizer, tmp_path_factory):
    """(our save_pretrained output, transformers' re-save of it with a tokenizer.json)."""
    ours = tmp_path_factory.mktemp("ours")
    tokenizer.save_pretrained(ours)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(ours)
    resaved = tmp_path_factory.mktemp("hf_resaved")
    hf_tokenizer.save_pretrained(resaved)
    return ours, resaved, hf_tokenizer


def test_auto_tokenizer_matches_our_ids_and_text(tokenizer, hf_dirs):
    _, _, hf_tokenizer = hf_dirs
    assert len(hf_tokenizer) == len(tokenizer)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
        assert hf_tokenizer.decode(ids) == tokenizer.decode(ids)
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("template", [None, BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE], ids=["checkpoint", "thinking"])
def test_chat_rendering_matches_transformers(tokenizer, hf_dirs, template):
    _, _, hf_tokenizer = hf_dirs
    expected = hf_tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True, chat_template=template
    )
    assert tokenizer.apply_chat_template(MESSAGES, chat_template=template) == expected


def test_thinking_template_with_tools_matches_transformers(tokenizer, hf_dirs):
    _, _, hf_tokenizer = hf_dirs
    template = BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE
    expected = hf_tokenizer.apply_chat_template(
        TOOL_MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True, chat_template=template
    )
    assert "<tool_list>" in expected and "<tool_output>" in expected
    assert tokenizer.apply_chat_template(TOOL_MESSAGES, tools=TOOLS, chat_template=template) == expected


def test_tokenizer_json_backend_matches_sentencepiece_backend(tokenizer, hf_dirs):
    _, resaved, _ = hf_dirs
    assert (resaved / "tokenizer.json").is_file()
    from_json = ErnieTokenizer.from_pretrained(resaved)
    assert from_json.backend.kind == "tokenizers"
    assert from_json.all_special_ids == tokenizer.all_special_ids
    assert from_json.chat_template == tokenizer.chat_template
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert from_json.encode(text) == ids
        assert from_json.decode(ids) == tokenizer.decode(ids)
        assert from_json.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)


def test_tokenizer_json_backend_saves_tokenizer_json(hf_dirs, tmp_path):
    ours, resaved, _ = hf_dirs
    from_json = ErnieTokenizer.from_pretrained(resaved)
    written = {p.name for p in from_json.save_pretrained(tmp_path / "a")}
    assert "tokenizer.json" in written and "tokenizer.model" not in written
    again = ErnieTokenizer.from_pretrained(tmp_path / "a")
    assert again.backend.kind == "tokenizers"
    assert [again.encode(t) for t in TEXTS] == [from_json.encode(t) for t in TEXTS]

    # Released checkpoints ship both files; saving keeps both.
    both = shutil.copytree(resaved, tmp_path / "both")
    shutil.copy(ours / "tokenizer.model", both / "tokenizer.model")
    written = {p.name for p in ErnieTokenizer.from_pretrained(both).save_pretrained(tmp_path / "b")}
    assert {"tokenizer.json", "tokenizer.model"} <= written
    assert (tmp_path / "b" / "tokenizer.model").read_bytes() == (ours / "tokenizer.model").read_bytes()
