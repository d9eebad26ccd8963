"""A tiny ERNIE-4.5-shaped tokenizer directory, trained in well under a second, for tests and examples.

It has the released file layout (see `training.py`): tokenizer.model, tokenizer_config.json with a chat template
and added_tokens_decoder, special_tokens_map.json, added_tokens.json, ERNIE's special tokens at the same kinds of
places (<unk>/<s>/</s> = 0/1/2, control and user-defined pieces in the SentencePiece model, placeholders in
added_tokens.json) and byte fallback, so Chinese characters it did not learn and emoji still round-trip.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from .chat_template import BUILTIN_ERNIE45_CHAT_TEMPLATE
from .training import (  # noqa: F401  (re-exported: tests name the pieces through this module)
    CONTROL_PIECES,
    EXTRA_ADDED_TOKENS,
    NON_SPECIAL_TOKENS,
    USER_DEFINED_PIECES,
    train_sentencepiece_model,
    write_tokenizer_dir,
)

_ENGLISH_SUBJECTS = ("The model", "A small tokenizer", "The engineer", "Our team", "The assistant", "This test")
_ENGLISH_VERBS = ("reads", "writes", "predicts", "explains", "checks", "streams")
_ENGLISH_OBJECTS = ("the next token.", "a short answer.", "the chat template.", "every byte of the text.",
                    "the reasoning first.", "a Python function.")
_CHINESE_SUBJECTS = ("模型", "我们", "这个助手", "工程师", "今天的测试")
_CHINESE_VERBS = ("正在学习", "可以理解", "会生成", "需要检查")
_CHINESE_OBJECTS = ("中文句子。", "下一个词。", "语言模型。", "简单的问题。", "天气很好。")


def training_sentences() -> list[str]:
    """A few hundred English and Chinese sentences, deterministic."""
    english = [" ".join(words) for words in itertools.product(_ENGLISH_SUBJECTS, _ENGLISH_VERBS, _ENGLISH_OBJECTS)]
    chinese = ["".join(words) for words in itertools.product(_CHINESE_SUBJECTS, _CHINESE_VERBS, _CHINESE_OBJECTS)]
    chat = ["User: hello there\nAssistant: Hi, how can I help you today?", "你好，世界！Hello, world!"]
    return english + chinese + chat


def train_tiny_sentencepiece_model(vocab_size: int = 600, add_dummy_prefix: bool = False) -> bytes:
    """Serialized SentencePiece BPE model with ERNIE's special pieces and byte fallback.

    `add_dummy_prefix=True` gives the Llama-style variant whose decode drops a leading space, the case
    streaming detokenization has to get right.
    """
    # Leave rare Chinese characters to byte fallback.
    return train_sentencepiece_model(training_sentences(), vocab_size, add_dummy_prefix, character_coverage=0.995)


def build_tiny_sentencepiece_tokenizer(
    out_dir: str | Path,
    chat_template: str | None = BUILTIN_ERNIE45_CHAT_TEMPLATE,
    vocab_size: int = 600,
    add_dummy_prefix: bool = False,
    extra_added_tokens: tuple[str, ...] = EXTRA_ADDED_TOKENS,
) -> Path:
    """Write a tiny tokenizer directory in ERNIE 4.5's released layout and return its path.

    `extra_added_tokens` come after the SentencePiece vocabulary, in order (the VL tests add the image / video
    start, end and placeholder tokens)."""
    model = train_tiny_sentencepiece_model(vocab_size, add_dummy_prefix)
    return write_tokenizer_dir(out_dir, model, chat_template, extra_added_tokens)
