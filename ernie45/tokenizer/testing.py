"""A tiny ERNIE-4.5-shaped tokenizer directory, trained in well under a second, for tests and examples.

It has the released file layout (tokenizer.model, tokenizer_config.json with a chat template and
added_tokens_decoder, special_tokens_map.json, added_tokens.json), ERNIE's special tokens at the same kinds of
places (<unk>/<s>/</s> = 0/1/2, control and user-defined pieces in the SentencePiece model, placeholders in
added_tokens.json) and byte fallback, so Chinese characters it did not learn and emoji still round-trip.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import sentencepiece as spm

from .chat_template import BUILTIN_ERNIE45_CHAT_TEMPLATE
from .files import ADDED_TOKENS, SENTENCEPIECE_MODEL, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, write_json

# Pieces the model can never produce from text itself (SentencePiece control symbols), as in ERNIE's model.
CONTROL_PIECES = ("<|begin_of_sentence|>", "<|end_of_sentence|>")
# Pieces SentencePiece matches whole in text.
USER_DEFINED_PIECES = (
    "<mask:1>", "<mask:4>", "<mask:5>", "<mask:6>", "<mask:7>",
    "<think>", "</think>", "<response>", "</response>", "<tool_call>", "</tool_call>",
    "<tool_output>", "</tool_output>", "<|im_start|>", "<|im_end|>",
)
# Tokens appended after the SentencePiece vocabulary through added_tokens.json, like ERNIE's image placeholders.
EXTRA_ADDED_TOKENS = ("<|IMAGE_PLACEHOLDER|>", "<|AUDIO_PLACEHOLDER|>")
# Tags the reasoning parser reads: they must survive decode(skip_special_tokens=True).
NON_SPECIAL_TOKENS = ("<think>", "</think>", "<response>", "</response>", "<tool_call>", "</tool_call>",
                      "<tool_output>", "</tool_output>")

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
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_sentences()),
        model_writer=writer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=0.995,  # leave rare Chinese characters to byte fallback
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        control_symbols=list(CONTROL_PIECES),
        user_defined_symbols=list(USER_DEFINED_PIECES),
        # ERNIE's model keeps text as is: no dummy prefix space, no whitespace folding, no normalization.
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return writer.getvalue()


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = train_tiny_sentencepiece_model(vocab_size, add_dummy_prefix)
    (out / SENTENCEPIECE_MODEL).write_bytes(model)

    processor = spm.SentencePieceProcessor(model_proto=model)
    base_size = processor.get_piece_size()
    added_ids = {token: base_size + i for i, token in enumerate(extra_added_tokens)}
    decoder_tokens = ["<unk>", "<s>", "</s>", *CONTROL_PIECES, *USER_DEFINED_PIECES]
    decoder = {processor.piece_to_id(token): token for token in decoder_tokens}
    decoder.update({token_id: token for token, token_id in added_ids.items()})
    special = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "cls_token": "<|begin_of_sentence|>",
        "sep_token": "<|end_of_sentence|>",
        "mask_token": "<mask:1>",
    }
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": token not in NON_SPECIAL_TOKENS,
            }
            for token_id, token in sorted(decoder.items())
        },
        **special,
        "additional_special_tokens": list(extra_added_tokens),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "padding_side": "left",
        "tokenizer_class": "TokenizersBackend",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    write_json(out / TOKENIZER_CONFIG, config)
    write_json(out / SPECIAL_TOKENS_MAP, {**special, "additional_special_tokens": list(extra_added_tokens)})
    write_json(out / ADDED_TOKENS, added_ids)
    return out
