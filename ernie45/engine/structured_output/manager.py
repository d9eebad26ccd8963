"""`StructuredOutputManager`: the engine's side of structured output. It gives each constrained sequence its
grammar state when the request is added, fills the token bitmask of the rows a step samples under a grammar, and
advances a sequence's grammar by the token it then got.

A row is constrained when its sequence has a grammar that has not terminated, the engine is not forcing its next
token (closing a thinking block), and it is not inside a thinking block (unless the request asked to constrain
the reasoning too): the grammar describes the answer, so `<think>...</think>` stays free, as in vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .backend import GrammarBackend, backend_class

if TYPE_CHECKING:
    from ..request import Request

logger = logging.getLogger(__name__)


def is_constrained(request: Request) -> bool:
    """Whether the request's next token is sampled under its grammar."""
    grammar = request.grammar
    if grammar is None or request.forced_token_ids or grammar.is_terminated():
        return False
    return not (request.in_reasoning and request.params.structured_outputs.disable_in_reasoning)


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int], backend: str = "xgrammar"):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.backend_name = backend
        self._backend: GrammarBackend | None = None  # built on the first constrained request (vocab scan)
        self.think_end_id = tokenizer.token_to_id("</think>")

    @property
    def backend(self) -> GrammarBackend:
        if self._backend is None:
            self._backend = backend_class(self.backend_name)(self.tokenizer, self.vocab_size, self.stop_token_ids)
        return self._backend

    def init_requests(self, sequences: Sequence[Request]) -> None:
        """Give each sequence of a constrained request its own grammar state (raises ValueError before any is
        scheduled if the constraint does not compile)."""
        params = sequences[0].params.structured_outputs if sequences else None
        if params is None:
            return
        for seq in sequences:
            seq.grammar = self.backend.grammar_for(params)

    def bitmasks(self, requests: Sequence[Request]) -> list[torch.Tensor | None]:
        """Per request, its bitmask row [W] for this step, or None when it samples unconstrained."""
        constrained = [i for i, r in enumerate(requests) if is_constrained(r)]
        rows: list[torch.Tensor | None] = [None] * len(requests)
        if not constrained:
            return rows
        bitmask_RW = self.backend.allocate_bitmask(len(constrained))
        for j, i in enumerate(constrained):
            requests[i].grammar.fill_bitmask(bitmask_RW, j)
            rows[i] = bitmask_RW[j]
        return rows

    def draft_bitmasks(self, request: Request, drafts: list[int]) -> tuple[list[int], list[torch.Tensor] | None]:
        """(the longest prefix of `drafts` the grammar allows, the grammar's mask at each of its positions and the
        one after it). The grammar walks the drafts and is rolled back, so its state is unchanged."""
        if not is_constrained(request):
            if request.grammar is not None and self.think_end_id in drafts:
                # The grammar starts after </think>: drafts past it would go unmasked.
                drafts = drafts[: drafts.index(self.think_end_id) + 1]
            return drafts, None
        grammar = request.grammar
        bitmask_KW = self.backend.allocate_bitmask(len(drafts) + 1)
        accepted = 0
        for j, token in enumerate(drafts):
            grammar.fill_bitmask(bitmask_KW, j)
            if grammar.is_terminated() or not grammar.accept_token(token):
                break
            accepted = j + 1
        if accepted == len(drafts):
            grammar.fill_bitmask(bitmask_KW, accepted)
        grammar.rollback(accepted)
        return drafts[:accepted], list(bitmask_KW[: accepted + 1])

    @staticmethod
    def accept(request: Request, token: int) -> bool:
        """Advance the request's grammar by a token it sampled under it; False when the grammar refused it (a
        token no mask allowed: every token was masked, e.g. min_tokens banning the only allowed stop token)."""
        if request.grammar.accept_token(token):
            return True
        logger.warning("request %s: token %d does not fit its grammar; ending the sequence", request.request_id,
                       token)
        return False

    def stats(self) -> dict[str, float | int]:
        return self._backend.stats() if self._backend is not None else {}
