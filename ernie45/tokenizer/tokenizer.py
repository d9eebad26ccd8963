"""`ErnieTokenizer`: the tokenizer of an ERNIE 4.5 checkpoint directory.

Backend: `tokenizer.json` (Hugging Face `tokenizers`) when present, else the SentencePiece `tokenizer.model` plus
the added tokens of `added_tokens.json` and `tokenizer_config.json`. Like the original, it never adds BOS unless
the checkpoint's `tokenizer_config.json` says `add_bos_token: true` and the caller asks for special tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .backends import SentencePieceBackend, TokenizersBackend
from .chat_template import BUILTIN_ERNIE45_CHAT_TEMPLATE, render_chat_template
from .files import (
    ADDED_TOKENS,
    CHAT_TEMPLATE_JINJA,
    ERNIE_DEFAULT_SPECIAL_TOKENS,
    SENTENCEPIECE_MODEL,
    SPECIAL_TOKEN_NAMES,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    read_tokenizer_files,
    write_json,
)

# tokenizer_config.json keys that save_pretrained rewrites from the tokenizer's state instead of copying through.
_REWRITTEN_CONFIG_KEYS = {
    "added_tokens_decoder", "additional_special_tokens", "extra_special_tokens", "chat_template", "tokenizer_class",
    "auto_map", "tokenizer_file", "name_or_path", "add_bos_token", "add_eos_token", *SPECIAL_TOKEN_NAMES,
}

# The tokens a generation stops on besides eos: ERNIE chat turns end with <|end_of_sentence|>.
_STOP_TOKENS = ("</s>", "<|end_of_sentence|>")


class ErnieTokenizer:
    """Encode/decode, special tokens, chat template and saving for one ERNIE 4.5 tokenizer."""

    def __init__(
        self,
        backend: SentencePieceBackend | TokenizersBackend,
        special_tokens: Mapping[str, str],
        additional_special_tokens: Sequence[str] = (),
        chat_template: str | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template = chat_template
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.add_eos_token = bool(self.config.get("add_eos_token", False))
        # A named token only counts if the vocabulary has it: a wrong name must not silently map to <unk>.
        known = backend.token_to_id
        self.special_tokens = {name: tok for name, tok in special_tokens.items() if known(tok) is not None}
        self.additional_special_tokens = [tok for tok in additional_special_tokens if known(tok) is not None]
        special_ids = {t.id for t in backend.added_tokens.values() if t.special}
        special_ids |= {known(tok) for tok in (*self.special_tokens.values(), *self.additional_special_tokens)}
        self._special_ids = frozenset(special_ids)

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ErnieTokenizer:
        """Load the tokenizer files of a checkpoint directory."""
        directory = Path(path).expanduser()
        looked_for = (
            f"{TOKENIZER_JSON} or {SENTENCEPIECE_MODEL} (with {TOKENIZER_CONFIG}, {SPECIAL_TOKENS_MAP}, {ADDED_TOKENS})"
        )
        if not directory.exists():
            raise FileNotFoundError(f"tokenizer directory {directory} does not exist (looked for {looked_for})")
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} is a file; pass the checkpoint directory holding {looked_for}")
        files = read_tokenizer_files(directory)
        # ERNIE's names for tokens the files leave unnamed; only those the vocabulary has are kept.
        files.special_tokens = {**ERNIE_DEFAULT_SPECIAL_TOKENS, **files.special_tokens}
        json_path, model_path = directory / TOKENIZER_JSON, directory / SENTENCEPIECE_MODEL
        if json_path.is_file():
            sentencepiece_model = model_path.read_bytes() if model_path.is_file() else None
            backend: SentencePieceBackend | TokenizersBackend = TokenizersBackend.from_file(
                json_path, files, sentencepiece_model
            )
        elif model_path.is_file():
            backend = SentencePieceBackend(model_path.read_bytes(), files, source=str(model_path))
        else:
            raise FileNotFoundError(f"no tokenizer in {directory}: looked for {looked_for}")
        return cls(backend, files.special_tokens, files.additional_special_tokens, files.chat_template, files.config)

    # ---------------------------------------------------------------- vocabulary

    def __len__(self) -> int:
        return self.backend.size

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary plus added tokens), i.e. `len(tokenizer)`."""
        return self.backend.size

    @property
    def base_vocab_size(self) -> int:
        """Size of the backend model's own vocabulary, without tokens added on top of it."""
        return self.backend.base_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Token strings for ids; ids outside the vocabulary give the unk token."""
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in ids]

    def _id_to_token(self, token_id: int) -> str:
        token = self.backend.id_to_token(token_id)
        return token if token is not None else self.special_tokens.get("unk_token", "")

    # ---------------------------------------------------------------- special tokens

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return self.backend.token_to_id(token) if token is not None else None

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    cls_token = property(lambda self: self.special_tokens.get("cls_token"))
    sep_token = property(lambda self: self.special_tokens.get("sep_token"))
    mask_token = property(lambda self: self.special_tokens.get("mask_token"))
    bos_token_id = property(lambda self: self._named_id("bos_token"))
    eos_token_id = property(lambda self: self._named_id("eos_token"))
    pad_token_id = property(lambda self: self._named_id("pad_token"))
    unk_token_id = property(lambda self: self._named_id("unk_token"))
    cls_token_id = property(lambda self: self._named_id("cls_token"))
    sep_token_id = property(lambda self: self._named_id("sep_token"))
    mask_token_id = property(lambda self: self._named_id("mask_token"))

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a generation: `</s>`, `<|end_of_sentence|>` and the eos token, those that exist."""
        ids = [self.backend.token_to_id(t) for t in _STOP_TOKENS] + [self.eos_token_id]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def all_special_ids(self) -> list[int]:
        """Ids dropped by `decode(..., skip_special_tokens=True)`."""
        return sorted(self._special_ids)

    @property
    def all_special_tokens(self) -> list[str]:
        return [self._id_to_token(i) for i in self.all_special_ids]

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """Named special tokens as chat templates see them (`bos_token`, `cls_token`, ...)."""
        mapping: dict[str, Any] = dict(self.special_tokens)
        if self.additional_special_tokens:
            mapping["additional_special_tokens"] = list(self.additional_special_tokens)
        return mapping

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special and added tokens written in the text become their single ids.

        `add_special_tokens` only adds BOS/EOS if tokenizer_config.json asks for them (ERNIE's does not).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self.backend.encode(text)
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token and self.eos_token_id is not None:
                ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, tuple, or 1-D tensor); ids outside the vocabulary decode to nothing."""
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self.backend.decode(ids)

    # ---------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation with the checkpoint's chat template (built-in ERNIE 4.5 one if it has none).

        `template_kwargs` are passed to the template (`tools`, `enable_thinking`, ...) and override the special
        tokens it otherwise sees. With `tokenize=True` the prompt's ids are returned (no BOS is added).
        """
        template = chat_template or self.chat_template or BUILTIN_ERNIE45_CHAT_TEMPLATE
        context = {**self.special_tokens_map, **template_kwargs}
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **context)
        return self.encode(text) if tokenize else text

    # ---------------------------------------------------------------- saving

    def save_pretrained(self, path: str | os.PathLike) -> list[Path]:
        """Write the released file layout (model file, tokenizer_config.json, special_tokens_map.json,
        added_tokens.json) so that `ErnieTokenizer.from_pretrained` and transformers' `AutoTokenizer` load it."""
        directory = Path(path).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        written = [directory / name for name in self.backend.save(directory)]

        added = sorted(self.backend.added_tokens.values(), key=lambda t: t.id)
        config = {k: v for k, v in self.config.items() if k not in _REWRITTEN_CONFIG_KEYS}
        config.update(
            {
                "add_bos_token": self.add_bos_token,
                "add_eos_token": self.add_eos_token,
                "added_tokens_decoder": {str(t.id): t.to_json() for t in added},
                **self.special_tokens,
                "additional_special_tokens": list(self.additional_special_tokens),
                "clean_up_tokenization_spaces": self.config.get("clean_up_tokenization_spaces", False),
                # transformers 5 builds this class from tokenizer.json, or converts tokenizer.model itself.
                "tokenizer_class": "TokenizersBackend",
            }
        )
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json(directory / TOKENIZER_CONFIG, config)
        write_json(directory / SPECIAL_TOKENS_MAP, self.special_tokens_map)
        write_json(directory / ADDED_TOKENS, {t.content: t.id for t in added if t.id >= self.backend.base_size})
        written += [directory / TOKENIZER_CONFIG, directory / SPECIAL_TOKENS_MAP, directory / ADDED_TOKENS]

        # A stale chat_template.jinja would win over the config entry on the next load.
        jinja_path = directory / CHAT_TEMPLATE_JINJA
        if jinja_path.exists():
            if self.chat_template is None:
                jinja_path.unlink()
            else:
                jinja_path.write_text(self.chat_template, encoding="utf-8")
                written.append(jinja_path)
        return written

    def __repr__(self) -> str:
        return (
            f"ErnieTokenizer(backend={self.backend.kind}, size={len(self)}, "
            f"chat_template={'yes' if self.chat_template else 'built-in'})"
        )


def load_tokenizer(path: str | os.PathLike) -> ErnieTokenizer:
    """Same as `ErnieTokenizer.from_pretrained(path)`."""
    return ErnieTokenizer.from_pretrained(path)
