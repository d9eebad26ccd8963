"""Encoding, decoding, special tokens, saving and loading errors of ErnieTokenizer on the tiny tokenizer."""

import json
import shutil

import pytest

from ernie45.tokenizer import ErnieTokenizer, load_tokenizer
from ernie45.tokenizer.testing import EXTRA_ADDED_TOKENS

ROUND_TRIP_TEXTS = [
    "Hello world",
    "The model predicts the next token.",
    "  leading spaces,  double  spaces\n\nand newlines\t",
    "你好，世界！模型正在学习中文句子。",
    "罕见的字：龘靐齉",  # characters the model never saw: byte fallback
    "emoji 😀🎉👍🏽 and ✓",
    "mixed 中文 and English 😀 <think>tags</think> <|begin_of_sentence|>",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_unknown_characters_use_byte_fallback_pieces(tokenizer):
    ids = tokenizer.encode("😀")
    assert tokenizer.convert_ids_to_tokens(ids) == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tokenizer.unk_token_id not in ids


@pytest.mark.parametrize(
    "token",
    ["<|begin_of_sentence|>", "<|end_of_sentence|>", "<s>", "</s>", "<mask:1>", "<think>", "</think>",
     "<|IMAGE_PLACEHOLDER|>", "<|AUDIO_PLACEHOLDER|>"],
)
def test_special_tokens_written_in_text_are_single_ids(tokenizer, token):
    token_id = tokenizer.token_to_id(token)
    assert token_id is not None
    ids = tokenizer.encode(f"a{token}b")
    assert ids == tokenizer.encode("a") + [token_id] + tokenizer.encode("b")
    assert tokenizer.convert_ids_to_tokens(token_id) == token


def test_special_token_ids(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == 0
    assert tokenizer.cls_token == "<|begin_of_sentence|>"
    assert tokenizer.sep_token == "<|end_of_sentence|>"
    assert tokenizer.cls_token_id == tokenizer.token_to_id("<|begin_of_sentence|>")
    assert tokenizer.sep_token_id == tokenizer.token_to_id("<|end_of_sentence|>")
    assert tokenizer.mask_token_id == tokenizer.token_to_id("<mask:1>")
    assert tokenizer.stop_token_ids == [2, tokenizer.sep_token_id]
    assert {0, 1, 2, tokenizer.cls_token_id, tokenizer.sep_token_id} <= set(tokenizer.all_special_ids)


def test_added_tokens_extend_the_vocabulary(tokenizer):
    base = tokenizer.base_vocab_size
    assert [tokenizer.token_to_id(t) for t in EXTRA_ADDED_TOKENS] == [base, base + 1]
    assert len(tokenizer) == tokenizer.vocab_size == base + len(EXTRA_ADDED_TOKENS)
    assert tokenizer.token_to_id("no-such-token") is None


def test_no_bos_is_added(tokenizer):
    ids = tokenizer.encode("Hello world")
    assert tokenizer.encode("Hello world", add_special_tokens=True) == ids
    assert tokenizer.bos_token_id not in ids


def test_decode_skip_special_tokens_keeps_reasoning_tags(tokenizer):
    text = "<|begin_of_sentence|>User: hi\nAssistant: <think>hmm</think>ok<|end_of_sentence|></s>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "User: hi\nAssistant: <think>hmm</think>ok"


def test_decode_ignores_ids_outside_the_vocabulary(tokenizer):
    # The model's embedding is padded past the tokenizer (103424 > 103367 in ERNIE): such ids decode to nothing.
    ids = tokenizer.encode("abc")
    assert tokenizer.decode([*ids, len(tokenizer) + 5]) == "abc"
    assert tokenizer.convert_ids_to_tokens([len(tokenizer) + 5]) == ["<unk>"]


def test_save_pretrained_round_trip(tokenizer, tmp_path):
    written = tokenizer.save_pretrained(tmp_path / "saved")
    names = {p.name for p in written}
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"} <= names
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tokenizer.chat_template
    assert config["added_tokens_decoder"][str(tokenizer.token_to_id("<think>"))]["special"] is False
    reloaded = load_tokenizer(tmp_path / "saved")
    for text in ROUND_TRIP_TEXTS:
        assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.all_special_ids == tokenizer.all_special_ids
    assert reloaded.chat_template == tokenizer.chat_template
    assert len(reloaded) == len(tokenizer)


def test_chat_template_jinja_file_wins_over_config(tiny_tokenizer_dir, tmp_path):
    directory = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    (directory / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    tok = ErnieTokenizer.from_pretrained(directory)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


def test_checkpoint_without_template_falls_back_to_builtin(tiny_tokenizer_dir, tmp_path):
    directory = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tok = ErnieTokenizer.from_pretrained(directory)
    assert tok.chat_template is None
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|begin_of_sentence|>User: hi\nAssistant: "
    )


def test_missing_directory_error_names_the_path_and_files(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*tokenizer.json or tokenizer.model"):
        ErnieTokenizer.from_pretrained(missing)


def test_directory_without_model_file_errors(tiny_tokenizer_dir, tmp_path):
    directory = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    (directory / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*tok.*tokenizer\.json or tokenizer\.model"):
        ErnieTokenizer.from_pretrained(directory)


def test_corrupt_sentencepiece_model_error_names_the_file(tiny_tokenizer_dir, tmp_path):
    directory = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    (directory / "tokenizer.model").write_bytes(b"this is not a sentencepiece model \x00\xff" * 10)
    with pytest.raises(ValueError, match=r"tokenizer\.model: not a valid SentencePiece model"):
        ErnieTokenizer.from_pretrained(directory)


def test_corrupt_json_error_names_the_file(tiny_tokenizer_dir, tmp_path):
    directory = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    (directory / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not a valid JSON file"):
        ErnieTokenizer.from_pretrained(directory)


def test_corrupt_tokenizer_json_error_names_the_file(tiny_tokenizer_dir, tmp_path):
    directory = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        ErnieTokenizer.from_pretrained(directory)


def test_added_token_that_contradicts_the_model_errors(tiny_tokenizer_dir, tmp_path):
    directory = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    (directory / "added_tokens.json").write_text(json.dumps({"<|IMAGE_PLACEHOLDER|>": 5}))
    with pytest.raises(ValueError, match=r"added_tokens\.json: token '<\|IMAGE_PLACEHOLDER\|>' has id 5"):
        ErnieTokenizer.from_pretrained(directory)
