"""The grammar backend interface: what the engine needs from a structured-output library (xgrammar today; another,
such as llguidance, plugs in by implementing these two classes and registering its name).

Token bitmask format (shared by xgrammar and llguidance): int32 words [rows, ceil(V / 32)], token v allowed iff bit
v % 32 of word v // 32 is set.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .params import StructuredOutputsParams


class RequestGrammar(abc.ABC):
    """One sequence's position in its grammar: which tokens may come next, advanced token by token."""

    @abc.abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) when the grammar does not allow it."""

    @abc.abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (rejected speculative tokens)."""

    @abc.abstractmethod
    def fill_bitmask(self, bitmask_SW: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of an int32 bitmask."""

    @abc.abstractmethod
    def is_terminated(self) -> bool:
        """The grammar accepted its end (a stop token after a complete output): nothing more may follow."""


class GrammarBackend(abc.ABC):
    """Compiles constraints against one tokenizer's vocabulary and makes per-sequence grammars."""

    name: str

    @classmethod
    @abc.abstractmethod
    def validate(cls, params: StructuredOutputsParams) -> None:
        """Raise ValueError naming the field when the constraint cannot compile (needs no tokenizer)."""

    @abc.abstractmethod
    def grammar_for(self, params: StructuredOutputsParams) -> RequestGrammar:
        """A fresh grammar state for one sequence (the compiled grammar is cached by `params.cache_key`)."""

    @abc.abstractmethod
    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        """An int32 bitmask [num_rows, ceil(V / 32)] with every token allowed."""

    def stats(self) -> dict[str, float | int]:
        """Counters for metrics (compiles, cache hits, compile seconds)."""
        return {}


def backend_class(name: str = "xgrammar") -> type[GrammarBackend]:
    """The backend registered under `name`."""
    if name == "xgrammar":
        from .xgrammar_backend import XgrammarBackend

        return XgrammarBackend
    raise ValueError(f"unknown structured output backend {name!r}; available: xgrammar")


def default_backend() -> type[GrammarBackend]:
    return backend_class("xgrammar")


def apply_token_bitmask(logits_RV: torch.Tensor, bitmask_RW: torch.Tensor) -> None:
    """-inf, in place, on every token whose bit is clear. Tokens past 32 * W (none with a full mask) stay."""
    vocab = min(logits_RV.shape[1], 32 * bitmask_RW.shape[1])
    # One AND with the 32 bit weights gives [R, W, 32], laid out as token ids: bit b of word w is token 32 w + b.
    bits_RW32 = bitmask_RW.to(logits_RV.device)[:, :, None] & _bit_weights(logits_RV.device)
    blocked_RV = (bits_RW32 == 0).view(bitmask_RW.shape[0], -1)[:, :vocab]
    logits_RV[:, :vocab].masked_fill_(blocked_RV, float("-inf"))


def _bit_weights(device: torch.device) -> torch.Tensor:
    # 1 << 31 is the int32 sign bit: written as its int32 value.
    return torch.tensor([1 << b if b < 31 else -(1 << 31) for b in range(32)], dtype=torch.int32, device=device)
