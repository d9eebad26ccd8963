"""Verification of draft tokens against the model's distribution at each drafted position: lossless, so the
output follows exactly the distribution of decoding without drafts (Leviathan et al. 2023; vLLM's rejection
sampler).

For a sequence with drafts d_1..d_k, the model ran on [last token, d_1..d_k] and gave k + 1 logits rows; row j is
its distribution p_j for the token after d_j (row 0: after the last token). Every row goes through the same logits
processors as normal sampling, with the drafts before it counted as output (penalties, min_tokens).

- greedy: accept while d_{j+1} = argmax p_j; then append argmax at the first mismatch (or the bonus argmax p_k);
- sampling: drafts without a distribution (n-gram) have q = one-hot, so d_{j+1} is accepted with probability
  min(1, p_j(d) / 1) = p_j(d); on rejection the token is drawn from max(p_j - q, 0) normalised, i.e. p_j with d
  removed; when all k are accepted, a bonus token is drawn from p_k.

Legend: K drafts, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..sampler import Sampler, SamplingRow, _top_logprobs


@dataclass
class Verified:
    """The tokens a sequence gets from one verification step, with their raw logprobs."""

    token_ids: list[int]
    """Accepted drafts, then the correction or bonus token: 1 to K + 1 tokens."""
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]] | None]
    num_accepted: int
    """How many of the K drafts were accepted."""


def _position_rows(row: SamplingRow, drafts: Sequence[int],
                   bitmasks: Sequence[torch.Tensor] | None) -> list[SamplingRow]:
    """One sampling row per verified position: the drafts before it count as generated output."""
    outputs = list(row.output_token_ids)
    return [SamplingRow(params=row.params, prompt_token_ids=row.prompt_token_ids,
                        output_token_ids=outputs + list(drafts[:j]), eos_token_ids=row.eos_token_ids,
                        token_bitmask=bitmasks[j] if bitmasks is not None else None)
            for j in range(len(drafts) + 1)]


def verify(sampler: Sampler, logits_KV: torch.Tensor, row: SamplingRow, drafts: Sequence[int],
           bitmasks: Sequence[torch.Tensor] | None = None) -> Verified:
    """Accept a prefix of `drafts` and add one token, given the model's logits at the K + 1 positions.

    `bitmasks[j]`: a constrained sequence's grammar mask at position j (after drafts[:j]); the drafts must fit
    the grammar (see `StructuredOutputManager.draft_bitmasks`)."""
    num_drafts = len(drafts)
    if logits_KV.shape[0] != num_drafts + 1:
        raise ValueError(f"need {num_drafts + 1} logits rows for {num_drafts} drafts, got {logits_KV.shape[0]}")
    logits_KV = logits_KV.float()
    rows = _position_rows(row, drafts, bitmasks)
    processed_KV = sampler.process_logits(logits_KV, rows)
    if row.params.greedy:
        targets = processed_KV.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < num_drafts and drafts[accepted] == targets[accepted]:
            accepted += 1
        tokens = list(drafts[:accepted]) + [targets[accepted]]
    else:
        probs_KV = processed_KV.softmax(dim=-1)
        gen = row.generator
        accepted, tokens = 0, []
        uniforms = torch.rand(num_drafts, generator=gen, device=gen.device if gen is not None else "cpu").tolist()
        for j, draft in enumerate(drafts):
            if uniforms[j] < float(probs_KV[j, draft]):
                accepted += 1
                tokens.append(int(draft))
                continue
            residual_V = probs_KV[j].clone()
            residual_V[draft] = 0.0
            tokens.append(int(torch.multinomial(residual_V, 1, generator=gen)))
            break
        else:
            tokens.append(int(torch.multinomial(probs_KV[num_drafts], 1, generator=gen)))
    used = logits_KV[: len(tokens)]
    index = torch.tensor(tokens, device=used.device)[:, None]
    if row.params.logprobs is None:
        chosen = (used.gather(1, index)[:, 0] - used.logsumexp(dim=-1)).tolist()
        return Verified(tokens, chosen, [None] * len(tokens), accepted)
    raw_KV = torch.log_softmax(used, dim=-1)
    chosen = raw_KV.gather(1, index)[:, 0].tolist()
    return Verified(tokens, chosen, _top_logprobs(raw_KV, rows[: len(tokens)]), accepted)
