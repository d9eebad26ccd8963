"""Streaming detokenization: deltas add up to decode(all) and never contain half a character."""

import pytest

from ernie45.tokenizer import ErnieTokenizer, IncrementalDetokenizer
from ernie45.tokenizer.testing import build_tiny_sentencepiece_tokenizer

STREAMED_TEXTS = [
    "Hello world, the model streams the next token.",
    "你好，世界！模型正在学习中文句子。罕见的字：龘靐齉",
    "emoji 😀🎉👍🏽 mixed with 中文 and  double  spaces\n\nnewlines",
    "<|begin_of_sentence|>User: 你好\nAssistant: <think>想一想</think>答案😀<|end_of_sentence|>",
]


class _CountingTokenizer:
    """Wraps a tokenizer to record how many ids each decode call sees."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.longest_decode = 0

    def decode(self, ids, skip_special_tokens=False):
        self.longest_decode = max(self.longest_decode, len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def dummy_prefix_tokenizer(tmp_path_factory):
    """A variant whose decode drops the leading space of the first piece, so one token decoded alone is wrong."""
    directory = build_tiny_sentencepiece_tokenizer(tmp_path_factory.mktemp("dummy_prefix"), add_dummy_prefix=True)
    tok = ErnieTokenizer.from_pretrained(directory)
    ids = tok.encode("hello world")
    assert tok.decode(ids[1:]) == "world"  # the space belongs to "▁world" but is dropped at the start
    return tok


@pytest.mark.parametrize("text", STREAMED_TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [False, True])
@pytest.mark.parametrize("variant", ["ernie", "dummy_prefix"])
def test_deltas_add_up_to_decode(tokenizer, dummy_prefix_tokenizer, text, skip_special_tokens, variant):
    tokenizer = tokenizer if variant == "ernie" else dummy_prefix_tokenizer
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [detok.push(token_id) for token_id in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in delta for delta in deltas)
    if not skip_special_tokens:
        assert "".join(deltas) == text


def test_multibyte_characters_wait_for_their_last_byte(tokenizer):
    ids = tokenizer.encode("😀")  # four byte-fallback pieces
    assert len(ids) == 4
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push(i) for i in ids] == ["", "", "", "😀"]
    assert detok.flush() == ""


def test_unfinished_character_is_released_by_flush_like_decode(tokenizer):
    ids = tokenizer.encode("ok😀")[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(tokenizer)
    streamed = detok.push_many(ids)
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == tokenizer.decode(ids)


def test_each_step_decodes_a_short_window(tokenizer):
    text = "The model streams the next token. " * 40 + "你好😀" * 20
    ids = tokenizer.encode(text)
    counting = _CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)
    assert detok.push_many(ids) + detok.flush() == text
    # Never the whole sequence: the window holds the last emitted step (at most one character's 4 byte pieces)
    # plus the pending pieces of an unfinished character (at most 4).
    assert len(ids) > 200
    assert counting.longest_decode <= 8
