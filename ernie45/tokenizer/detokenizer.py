"""Streaming detokenization: token ids in, newly completed text out.

Decoding one token at a time is wrong for SentencePiece: a piece's leading space depends on what precedes it, and
byte-fallback pieces (`<0xE4>`, `<0xBD>`, `<0xA0>`) only form a character together. The technique of vLLM and TGI:
keep a short window of already-emitted tokens (`prefix_offset..read_offset`), decode the window with and without
the new tokens, and emit the difference once it no longer ends in an incomplete character (U+FFFD). Each step
decodes a few tokens, so the cost per token does not grow with the sequence.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals `tokenizer.decode(all_ids)`."""

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        # token_ids[prefix_offset:read_offset] were emitted already and give the next token its context;
        # token_ids[read_offset:] are pending (they did not yet decode to complete characters).
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while it ends in a partial UTF-8 character)."""
        self.token_ids.append(int(token_id))
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            # Either nothing printable yet (a skipped special token) or half a character: wait for more tokens.
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :]

    def push_many(self, token_ids: list[int]) -> str:
        """Add several tokens; return the text they complete."""
        return "".join(self.push(token_id) for token_id in token_ids)

    def flush(self) -> str:
        """Return whatever is still pending (an unfinished character decodes to U+FFFD, as in `decode`)."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset :])
        # Keep the emitted tokens as context in case the caller pushes more after all.
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text[len(prefix_text) :]
