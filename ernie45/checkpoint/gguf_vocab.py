"""A SentencePiece tokenizer as GGUF tokenizer metadata, as llama.cpp's converter writes it for ERNIE 4.5
(`_set_vocab_sentencepiece` + `Ernie4_5Model.set_vocab`): model "llama", pre "default", every piece with its score
and type, added tokens (added_tokens.json, tokenizer_config.json `added_tokens_decoder`) over them, the list padded
with `[PAD{id}]` up to the config's vocab_size, special ids / add_bos / add_eos from `gguf.SpecialVocab`, and the chat
template ernie45 renders (the checkpoint's, else the built-in ERNIE 4.5 one)."""

from __future__ import annotations

import json
from pathlib import Path

from .loader import read_optional_json


def _vocab(source: Path, vocab_size: int, gguf) -> tuple[list[bytes], list[float], list[int]]:
    from sentencepiece import SentencePieceProcessor

    T = gguf.TokenType  # the converter's SentencePieceTokenTypes: NORMAL 1 .. BYTE 6
    model_file = source / "tokenizer.model"
    if not model_file.is_file():
        raise ValueError(f"{source}: GGUF export needs a SentencePiece tokenizer.model (llama.cpp's 'llama' vocab); "
                         f"none found")
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_file))
    if sp.vocab_size() > vocab_size:
        raise ValueError(f"{model_file}: {sp.vocab_size()} pieces, more than config.json's vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [T.UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        kind = T.NORMAL
        if sp.IsUnknown(i):
            kind = T.UNKNOWN
        elif sp.IsControl(i):
            kind = T.CONTROL
        elif sp.IsUnused(i):
            kind = T.UNUSED
        elif sp.IsByte(i):
            kind = T.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), kind
    added_file = source / "added_tokens.json"
    if added_file.is_file():
        for text, i in json.loads(added_file.read_text(encoding="utf-8")).items():
            if i < vocab_size:
                tokens[i], scores[i], types[i] = text.encode(), -1000.0, T.USER_DEFINED
    config = _tokenizer_config(source)
    for key, data in (config.get("added_tokens_decoder") or {}).items():
        i, text = int(key), data["content"]
        if i >= vocab_size:
            continue
        if data.get("special"):
            types[i] = T.CONTROL
        else:
            text = text.replace("\u2581", " ")  # user-defined pieces are matched pre-normalisation
            types[i] = T.USER_DEFINED
        tokens[i], scores[i] = text.encode(), -1000.0
    return tokens, scores, types


def _tokenizer_config(source: Path) -> dict:
    return read_optional_json(source / "tokenizer_config.json")


def add_space_prefix(source: Path) -> bool:
    """tokenizer_config.json `add_prefix_space`, else the SentencePiece model's own add_dummy_prefix."""
    config = _tokenizer_config(source)
    if "add_prefix_space" in config:
        return bool(config["add_prefix_space"])
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((source / "tokenizer.model").read_bytes())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def chat_template_of(source: Path) -> str:
    """The template ernie45 renders for this tokenizer directory."""
    from ..tokenizer import load_tokenizer
    from ..tokenizer.chat_template import BUILTIN_ERNIE45_CHAT_TEMPLATE

    return load_tokenizer(source).chat_template or BUILTIN_ERNIE45_CHAT_TEMPLATE


def add_tokenizer(writer, source: Path, vocab_size: int, gguf) -> None:
    tokens, scores, types = _vocab(source, vocab_size, gguf)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(source, load_merges=False, n_vocab=len(tokens))
    special.chat_template = chat_template_of(source)
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(add_space_prefix(source))
