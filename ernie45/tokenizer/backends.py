"""The two ways a checkpoint's vocabulary is stored: a SentencePiece `tokenizer.model` or a `tokenizer.json`.

Both backends expose the same small surface: encode text (added tokens written in the text become their single
ids), decode ids (ids the vocabulary does not know decode to nothing), id <-> token lookups, the table of added
tokens, and writing their model file back. Special-token policy (what to skip, BOS/EOS) lives in `ErnieTokenizer`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from .files import ADDED_TOKENS, SENTENCEPIECE_MODEL, TOKENIZER_CONFIG, TOKENIZER_JSON, AddedToken, TokenizerFiles


class AddedTokenSplitter:
    """Cuts text into ordinary spans and whole added tokens, longest token first (`<mask:10>` before `<mask:1>`)."""

    def __init__(self, tokens: Iterable[AddedToken]):
        tokens = sorted(tokens, key=lambda t: len(t.content), reverse=True)
        self._id_of = {t.content: t.id for t in tokens}
        self._by_content = {t.content: t for t in tokens}
        parts = [
            ("\\s*" if t.lstrip else "") + re.escape(t.content) + ("\\s*" if t.rstrip else "")
            for t in tokens
            if t.content
        ]
        self._pattern = re.compile("|".join(parts)) if parts else None

    def split(self, text: str) -> list[str | int]:
        """Ordinary text spans (str) interleaved with added-token ids (int), in order."""
        if self._pattern is None:
            return [text] if text else []
        pieces: list[str | int] = []
        start = 0
        for match in self._pattern.finditer(text):
            if match.start() > start:
                pieces.append(text[start : match.start()])
            pieces.append(self._match_id(match.group()))
            start = match.end()
        if start < len(text):
            pieces.append(text[start:])
        return pieces

    def _match_id(self, matched: str) -> int:
        # An lstrip/rstrip token's match includes the whitespace it swallowed.
        for candidate in (matched, matched.lstrip(), matched.rstrip(), matched.strip()):
            if candidate in self._id_of:
                return self._id_of[candidate]
        raise RuntimeError(f"matched {matched!r} but it is no added token")  # unreachable: the pattern is the table


class SentencePieceBackend:
    """`tokenizer.model` plus the added tokens of the JSON files, matched before SentencePiece sees the text.

    Encoding each span separately is what the original (Paddle and transformers' slow, `legacy=True`) ERNIE
    tokenizer does; for a model without a dummy-prefix space it is the same as encoding the whole text at once.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, files: TokenizerFiles, source: str = SENTENCEPIECE_MODEL):
        try:
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(model_proto)
            if not proto.pieces:
                raise ValueError("no vocabulary pieces (empty file?)")
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except Exception as err:  # protobuf DecodeError / RuntimeError / the check above: not a usable model
            raise ValueError(f"{source}: not a valid SentencePiece model ({type(err).__name__}: {err})") from err
        self._model_proto = model_proto
        self.base_size = self._sp.get_piece_size()
        self.added_tokens = self._build_added_tokens(proto, files)
        self._splitter = AddedTokenSplitter(self.added_tokens.values())
        self._added_id_of = {t.content: t.id for t in self.added_tokens.values()}
        self.size = max([self.base_size - 1, *self.added_tokens]) + 1

    def _build_added_tokens(self, proto, files: TokenizerFiles) -> dict[int, AddedToken]:
        table: dict[int, AddedToken] = {}
        piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
        # Control pieces (<s>, </s>, and often ERNIE's <|begin_of_sentence|>) are never produced from text by
        # SentencePiece, and <unk> decodes to " ⁇ "; user-defined pieces are matched whole anyway. Treating all of
        # them as added tokens makes their text map to their id and decode to their text.
        for i, piece in enumerate(proto.pieces):
            if piece.type in (piece_type.CONTROL, piece_type.UNKNOWN):
                table[i] = AddedToken(piece.piece, i, special=True)
            elif piece.type == piece_type.USER_DEFINED:
                table[i] = AddedToken(piece.piece, i, special=False)

        named = set(files.special_tokens.values()) | set(files.additional_special_tokens)
        directory = files.directory
        for content, token_id in files.added_tokens_json.items():
            self._check_consistent(content, token_id, directory / ADDED_TOKENS)
            table[token_id] = AddedToken(content, token_id, special=content in named)
        for token_id, token in files.added_tokens_decoder.items():
            self._check_consistent(token.content, token_id, directory / TOKENIZER_CONFIG)
            table[token_id] = token
        # Named special tokens that are plain pieces of the model still have to be matched whole and skippable.
        by_content = {t.content: t for t in table.values()}
        for content in named:
            if content not in by_content:
                token_id = self._sp.piece_to_id(content)
                if self._sp.id_to_piece(token_id) == content:
                    table[token_id] = AddedToken(content, token_id, special=True)
        return table

    def _check_consistent(self, content: str, token_id: int, path: Path) -> None:
        if token_id < 0:
            raise ValueError(f"{path}: token {content!r} has a negative id {token_id}")
        if token_id < self.base_size and self._sp.id_to_piece(token_id) != content:
            raise ValueError(
                f"{path}: token {content!r} has id {token_id}, but tokenizer.model has "
                f"{self._sp.id_to_piece(token_id)!r} at that id"
            )

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._splitter.split(text):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(self._sp.encode(piece, out_type=int))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token = self.added_tokens.get(token_id)
            if token is None and 0 <= token_id < self.base_size:
                run.append(token_id)
                continue
            if run:
                parts.append(self._sp.decode(run))
                run = []
            if token is not None:
                parts.append(token.content)
            # Anything else is outside the vocabulary (e.g. the padded rows of the embedding): decodes to nothing.
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self.added_tokens:
            return self.added_tokens[token_id].content
        if 0 <= token_id < self.base_size:
            return self._sp.id_to_piece(token_id)
        return None

    def token_to_id(self, token: str) -> int | None:
        if token in self._added_id_of:
            return self._added_id_of[token]
        token_id = self._sp.piece_to_id(token)
        # piece_to_id answers the <unk> id for pieces it does not know.
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def save(self, directory: Path) -> list[str]:
        (directory / SENTENCEPIECE_MODEL).write_bytes(self._model_proto)
        return [SENTENCEPIECE_MODEL]


class TokenizersBackend:
    """`tokenizer.json` through the Hugging Face `tokenizers` library, which matches added tokens itself.

    A `tokenizer.model` shipped next to it is not used for tokenizing but is written back by `save`, so that a
    saved checkpoint keeps the released layout for tools that read the SentencePiece file.
    """

    kind = "tokenizers"

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, files: TokenizerFiles, sentencepiece_model: bytes | None = None
    ):
        self._tk = tokenizer
        self._sentencepiece_model = sentencepiece_model
        self.base_size = tokenizer.get_vocab_size(with_added_tokens=False)
        table = {
            token_id: AddedToken(
                t.content, token_id, special=t.special, lstrip=t.lstrip, rstrip=t.rstrip,
                normalized=t.normalized, single_word=t.single_word,
            )
            for token_id, t in tokenizer.get_added_tokens_decoder().items()
        }
        # tokenizer_config.json's flags win: it is what says whether e.g. <think> survives skip_special_tokens.
        for token_id, token in files.added_tokens_decoder.items():
            if token_id in table and table[token_id].content == token.content:
                table[token_id] = token
        named = set(files.special_tokens.values()) | set(files.additional_special_tokens)
        known = {t.content for t in table.values()}
        for content in sorted(named - known):
            token_id = tokenizer.token_to_id(content)
            if token_id is not None:
                # Registering an existing vocabulary entry keeps its id and makes it match whole in text.
                tokenizer.add_special_tokens([tokenizers.AddedToken(content, special=True, normalized=False)])
                table[token_id] = AddedToken(content, token_id, special=True)
        self.added_tokens = table
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.size = max(vocab.values(), default=-1) + 1

    @classmethod
    def from_file(
        cls, path: Path, files: TokenizerFiles, sentencepiece_model: bytes | None = None
    ) -> TokenizersBackend:
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the library raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({err})") from err
        return cls(tokenizer, files, sentencepiece_model)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        known = [i for i in ids if 0 <= i < self.size]
        return self._tk.decode(known, skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id) if token_id >= 0 else None

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def save(self, directory: Path) -> list[str]:
        self._tk.save(str(directory / TOKENIZER_JSON))
        if self._sentencepiece_model is None:
            return [TOKENIZER_JSON]
        (directory / SENTENCEPIECE_MODEL).write_bytes(self._sentencepiece_model)
        return [TOKENIZER_JSON, SENTENCEPIECE_MODEL]
