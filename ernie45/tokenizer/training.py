"""Training a SentencePiece tokenizer in ERNIE 4.5's released layout.

The layout: tokenizer.model (BPE, byte fallback, `<unk>`/`<s>`/`</s>` = 0/1/2, ERNIE's control and user-defined
pieces), tokenizer_config.json with a chat template and added_tokens_decoder, special_tokens_map.json, and
added_tokens.json with placeholders appended after the SentencePiece vocabulary, as the released checkpoints have.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

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


def train_sentencepiece_model(
    sentences: Iterable[str],
    vocab_size: int,
    add_dummy_prefix: bool = False,
    character_coverage: float = 0.995,
    split_digits: bool = False,
    max_sentence_length: int = 4192,
    num_threads: int = 1,
) -> bytes:
    """Serialized SentencePiece BPE model with ERNIE's special pieces and byte fallback.

    Characters left out by `character_coverage` still round-trip through byte fallback. `add_dummy_prefix=True`
    gives the Llama-style variant whose decode drops a leading space. Training is deterministic for a given
    input order with `num_threads=1`.
    """
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=writer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=character_coverage,
        split_digits=split_digits,
        max_sentence_length=max_sentence_length,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        control_symbols=list(CONTROL_PIECES),
        user_defined_symbols=list(USER_DEFINED_PIECES),
        # ERNIE's model keeps text as is: no dummy prefix space, no whitespace folding, no normalization.
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=num_threads,
        minloglevel=2,
    )
    return writer.getvalue()


def write_tokenizer_dir(out_dir: str | Path, model: bytes, chat_template: str | None,
                        extra_added_tokens: tuple[str, ...] = EXTRA_ADDED_TOKENS) -> Path:
    """Write a SentencePiece model and its config files in ERNIE 4.5's released layout; returns the directory.

    `extra_added_tokens` come after the SentencePiece vocabulary, in order (the VL tests add the image / video
    start, end and placeholder tokens)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
