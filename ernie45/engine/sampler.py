"""`Sampler`: one next token for each running sequence, from the model's last-position logits.

Order of the logits processors (HF / vLLM): grammar bitmask -> logit_bias -> min_tokens -> repetition penalty -> presence and
frequency penalties -> temperature -> top_k -> top_p -> min_p -> draw. Greedy rows take the argmax after the
penalties. Logprobs are those of the raw logits (vLLM's default `raw_logprobs`), so they do not depend on the
sampling settings.

Randomness: a seeded row draws its noise from its own generator, V exponentials per step, so its tokens depend only
on its seed and its logits, never on what else is in the batch; rows without a generator share one batched draw.

Legend: S sequences (rows), V vocabulary, R a subset of the rows, L longest token list, K number of top logprobs,
T prompt positions.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from .sampling_params import SamplingParams
from .structured_output.backend import apply_token_bitmask

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence for one step."""

    params: SamplingParams
    """The sequence's sampling settings."""
    prompt_token_ids: Sequence[int] = field(default_factory=list)
    """Prompt ids; the repetition penalty counts them as seen."""
    output_token_ids: Sequence[int] = field(default_factory=list)
    """Ids generated so far (penalties, min_tokens)."""
    generator: torch.Generator | None = None
    """The sequence's own random generator; None draws from the sampler's shared one."""
    forced_token_id: int | None = None
    """When set, the row's token is this one (e.g. closing a thinking block whose budget is spent)."""
    eos_token_ids: Collection[int] = ()
    """Ids that end the sequence: masked while fewer than min_tokens were generated, unless ignore_eos."""
    token_bitmask: torch.Tensor | None = None
    """int32 [ceil(V / 32)]: the tokens its grammar allows (bit v % 32 of word v // 32); None: unconstrained."""


@dataclass
class SamplerOutput:
    """The tokens of one step and their logprobs under the raw logits."""

    token_ids: list[int]
    """The chosen token of each row."""
    logprobs: list[float]
    """log_softmax(raw logits)[chosen token] of each row."""
    top_logprobs: list[list[tuple[int, float]] | None]
    """Per row, the params.logprobs best (token id, raw logprob) pairs, best first; None when not asked for."""


@dataclass
class TokenLogprob:
    """A prompt token's logprob given the tokens before it, with the best alternatives at that position."""

    token_id: int
    """The prompt token."""
    logprob: float
    """Its logprob."""
    top_logprobs: list[tuple[int, float]]
    """The k best (token id, logprob) pairs at the position, best first."""


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The generator of a seeded request (None without a seed: such rows use the shared draw)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    """Turns logits [S, V] into one token per row, following each row's SamplingParams."""

    def __init__(self, generator: torch.Generator | None = None):
        # The shared noise of rows without their own generator; None uses torch's default generator.
        self.generator = generator

    def __call__(self, logits_SV: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        if logits_SV.dim() != 2 or logits_SV.shape[0] != len(rows):
            raise ValueError(f"logits must be [S, V] with S = {len(rows)} rows, got shape {tuple(logits_SV.shape)}")
        if not rows:
            return SamplerOutput([], [], [])
        logits_SV = logits_SV.float()
        # Plain greedy rows draw from the raw logits: no processed copy of [S, V] (it shows at batch 1).
        processed_SV = self.process_logits(logits_SV, rows) if any(map(_needs_processing, rows)) else logits_SV
        token_ids_S = self._draw(processed_SV, rows)
        chosen_logits_S = logits_SV.gather(1, token_ids_S[:, None])[:, 0]
        if all(row.params.logprobs is None for row in rows):
            # Only the chosen tokens' logprobs are needed: logit - logsumexp, no [S, V] log_softmax written.
            chosen_S = chosen_logits_S - logits_SV.logsumexp(dim=-1)
            return SamplerOutput(token_ids_S.tolist(), chosen_S.tolist(), [None] * len(rows))
        raw_logprobs_SV = torch.log_softmax(logits_SV, dim=-1)
        chosen_S = raw_logprobs_SV.gather(1, token_ids_S[:, None])[:, 0]
        return SamplerOutput(token_ids_S.tolist(), chosen_S.tolist(), _top_logprobs(raw_logprobs_SV, rows))

    def process_logits(self, logits_SV: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """The logits each row draws from (a new tensor): -inf marks the tokens outside the row's support.

        Greedy rows get bias, min_tokens and penalties only: their token is the argmax of this.
        """
        logits_SV = logits_SV.to(torch.float32, copy=True)
        apply_grammar(logits_SV, rows)
        apply_logit_bias(logits_SV, rows)
        apply_min_tokens(logits_SV, rows)
        apply_penalties(logits_SV, rows)
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if not sampled:
            return logits_SV
        device, vocab = logits_SV.device, logits_SV.shape[1]
        temperatures = [rows[i].params.temperature for i in sampled]
        if any(t != 1.0 for t in temperatures):
            idx = torch.tensor(sampled, device=device)
            logits_SV[idx] = logits_SV[idx] / torch.tensor(temperatures, device=device)[:, None]

        truncated = [i for i in sampled if 0 < rows[i].params.top_k < vocab or rows[i].params.top_p < 1.0]
        if truncated:
            idx = torch.tensor(truncated, device=device)
            top_k_R = torch.tensor([rows[i].params.top_k for i in truncated], device=device)
            top_p_R = torch.tensor([rows[i].params.top_p for i in truncated], device=device)
            logits_SV[idx] = apply_top_k_top_p(logits_SV[idx], top_k_R, top_p_R)
        with_min_p = [i for i in sampled if rows[i].params.min_p > 0]
        if with_min_p:
            idx = torch.tensor(with_min_p, device=device)
            min_p_R = torch.tensor([rows[i].params.min_p for i in with_min_p], device=device)
            logits_SV[idx] = apply_min_p(logits_SV[idx], min_p_R)
        return logits_SV

    def _draw(self, logits_SV: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Token ids [S]: argmax for greedy rows, an exponential race for the others, then forced tokens."""
        device, vocab = logits_SV.device, logits_SV.shape[1]
        token_ids_S = logits_SV.argmax(dim=-1)
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            # argmax(p / q) with q ~ Exp(1) i.i.d. picks token v with probability p_v (the exponential race),
            # so each row's draw is just its own V exponentials: no multinomial over the batch.
            probs_RV = logits_SV[torch.tensor(sampled, device=device)].softmax(dim=-1)
            noise_RV = torch.empty_like(probs_RV)
            shared = [j for j, i in enumerate(sampled) if rows[i].generator is None]
            if shared:
                noise_device = self.generator.device if self.generator is not None else device
                draw = torch.empty(len(shared), vocab, device=noise_device).exponential_(generator=self.generator)
                noise_RV[torch.tensor(shared, device=device)] = draw.to(device)
            for j, i in enumerate(sampled):
                # Every seeded row consumes its V draws each step (forced or not), so its stream stays aligned
                # with its step count.
                gen = rows[i].generator
                if gen is not None:
                    noise_RV[j] = torch.empty(vocab, device=gen.device).exponential_(generator=gen).to(device)
            # A zero draw would make 0/0 = NaN for a masked token, and argmax prefers NaN.
            noise_RV.clamp_min_(torch.finfo(noise_RV.dtype).tiny)
            token_ids_S[torch.tensor(sampled, device=device)] = (probs_RV / noise_RV).argmax(dim=-1)

        forced = [i for i, row in enumerate(rows) if row.forced_token_id is not None]
        if forced:
            forced_ids = [rows[i].forced_token_id for i in forced]
            bad = [t for t in forced_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"forced_token_id {bad[0]} is outside the vocabulary [0, {vocab})")
            token_ids_S[torch.tensor(forced, device=device)] = torch.tensor(forced_ids, device=device)
        return token_ids_S


# ------------------------------------------------------------------------------------------ logits processors


def _needs_processing(row: SamplingRow) -> bool:
    """Whether any logits processor would change the row's logits (sampled rows always go through them)."""
    params = row.params
    return (not params.greedy or row.token_bitmask is not None or bool(params.logit_bias) or len(row.output_token_ids) < params.min_tokens
            or params.repetition_penalty != 1.0 or bool(params.presence_penalty)
            or bool(params.frequency_penalty))


def apply_grammar(logits_SV: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """-inf, in place, on the tokens each constrained row's grammar does not allow next."""
    constrained = [i for i, row in enumerate(rows) if row.token_bitmask is not None]
    if not constrained:
        return
    if len(constrained) == len(rows):  # every row: mask in place, no gather / scatter of [S, V]
        apply_token_bitmask(logits_SV, torch.stack([row.token_bitmask for row in rows]))
        return
    idx = torch.tensor(constrained, device=logits_SV.device)
    logits_RV = logits_SV[idx]
    apply_token_bitmask(logits_RV, torch.stack([rows[i].token_bitmask for i in constrained]))
    logits_SV[idx] = logits_RV


def apply_logit_bias(logits_SV: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Add each row's logit_bias in place."""
    vocab = logits_SV.shape[1]
    row_idx, token_idx, values = [], [], []
    for i, row in enumerate(rows):
        for token_id, bias in (row.params.logit_bias or {}).items():
            if token_id >= vocab:
                raise ValueError(f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab})")
            row_idx.append(i)
            token_idx.append(token_id)
            values.append(bias)
    if row_idx:
        device = logits_SV.device
        index = (torch.tensor(row_idx, device=device), torch.tensor(token_idx, device=device))
        logits_SV.index_put_(index, torch.tensor(values, device=device), accumulate=True)


def apply_min_tokens(logits_SV: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Ban, in place, the tokens that would end a sequence that has fewer than min_tokens tokens."""
    vocab = logits_SV.shape[1]
    row_idx, token_idx = [], []
    for i, row in enumerate(rows):
        params = row.params
        if len(row.output_token_ids) >= params.min_tokens:
            continue
        stops = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stops |= set(row.eos_token_ids)
        # Ids beyond the logits (a tokenizer larger than the model's head) can never be sampled anyway.
        stops = [t for t in stops if 0 <= t < vocab]
        row_idx += [i] * len(stops)
        token_idx += stops
    if row_idx:
        device = logits_SV.device
        logits_SV[torch.tensor(row_idx, device=device), torch.tensor(token_idx, device=device)] = _NEG_INF


def apply_penalties(logits_SV: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Repetition (prompt + output, HF) and presence / frequency (output only, OpenAI) penalties, in place."""
    device, vocab = logits_SV.device, logits_SV.shape[1]
    repeated = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if repeated:
        idx = torch.tensor(repeated, device=device)
        seen_RV = token_counts([[*rows[i].prompt_token_ids, *rows[i].output_token_ids] for i in repeated],
                               vocab, device) > 0
        penalty_R1 = torch.tensor([rows[i].params.repetition_penalty for i in repeated], device=device)[:, None]
        logits_RV = logits_SV[idx]
        # Dividing a negative logit would raise it: HF multiplies those instead, so a penalty > 1 always lowers.
        penalised_RV = torch.where(logits_RV > 0, logits_RV / penalty_R1, logits_RV * penalty_R1)
        logits_SV[idx] = torch.where(seen_RV, penalised_RV, logits_RV)

    additive = [i for i, row in enumerate(rows) if row.params.presence_penalty or row.params.frequency_penalty]
    if additive:
        idx = torch.tensor(additive, device=device)
        counts_RV = token_counts([rows[i].output_token_ids for i in additive], vocab, device)
        presence_R1 = torch.tensor([rows[i].params.presence_penalty for i in additive], device=device)[:, None]
        frequency_R1 = torch.tensor([rows[i].params.frequency_penalty for i in additive], device=device)[:, None]
        logits_SV[idx] = logits_SV[idx] - frequency_R1 * counts_RV - presence_R1 * (counts_RV > 0)


def token_counts(token_lists: Sequence[Sequence[int]], vocab: int, device: torch.device | str) -> torch.Tensor:
    """Occurrences [R, V] (float32) of each token id in each list; ids outside [0, V) are ignored."""
    longest = max(1, max(len(ids) for ids in token_lists))
    # Pad with V: the extra column collects the padding and out-of-vocabulary ids and is cut off.
    padded_RL = torch.tensor([[*ids, *[vocab] * (longest - len(ids))] for ids in token_lists], dtype=torch.long)
    padded_RL.masked_fill_((padded_RL < 0) | (padded_RL > vocab), vocab)
    padded_RL = padded_RL.to(device)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, padded_RL, torch.ones_like(padded_RL, dtype=counts.dtype))
    return counts[:, :vocab]


def apply_top_k_top_p(logits_RV: torch.Tensor, top_k_R: torch.Tensor, top_p_R: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's top_k (<= 0: off) and then outside its top_p nucleus (1: off); a new tensor.

    top_k keeps ties with the k-th logit (HF, vLLM); top_p keeps the smallest prefix of the sorted distribution
    whose mass reaches top_p, which always includes the most likely token.
    """
    vocab = logits_RV.shape[1]
    sorted_RV, order_RV = logits_RV.sort(dim=-1, descending=True)
    k_R = torch.where(top_k_R > 0, top_k_R, vocab).clamp(max=vocab)
    kth_R1 = sorted_RV.gather(1, (k_R - 1)[:, None].long())
    sorted_RV = sorted_RV.masked_fill(sorted_RV < kth_R1, _NEG_INF)
    probs_RV = sorted_RV.softmax(dim=-1)
    mass_before_RV = probs_RV.cumsum(dim=-1) - probs_RV  # exactly 0 for the first token
    top_p_R1 = top_p_R[:, None].to(probs_RV.dtype)
    # Rows with top_p = 1 are exempt: rounding can push the running sum to 1 before the tail is reached.
    drop_RV = (mass_before_RV >= top_p_R1) & (top_p_R1 < 1)
    sorted_RV = sorted_RV.masked_fill(drop_RV, _NEG_INF)
    return torch.empty_like(logits_RV).scatter_(1, order_RV, sorted_RV)


def apply_min_p(logits_RV: torch.Tensor, min_p_R: torch.Tensor) -> torch.Tensor:
    """-inf where a token's probability is below min_p times the row's largest; a new tensor."""
    probs_RV = logits_RV.softmax(dim=-1)
    threshold_R1 = min_p_R[:, None].to(probs_RV.dtype) * probs_RV.amax(dim=-1, keepdim=True)
    return logits_RV.masked_fill(probs_RV < threshold_R1, _NEG_INF)


# ------------------------------------------------------------------------------------------ logprobs


def _top_logprobs(logprobs_SV: torch.Tensor, rows: Sequence[SamplingRow]) -> list[list[tuple[int, float]] | None]:
    counts = [row.params.logprobs for row in rows]
    k = min(max((c for c in counts if c is not None), default=0), logprobs_SV.shape[1])
    if k == 0:
        return [None if c is None else [] for c in counts]
    values_SK, ids_SK = logprobs_SV.topk(k, dim=-1)  # one topk for the batch, sliced per row below
    values, ids = values_SK.tolist(), ids_SK.tolist()
    return [None if c is None else list(zip(ids[i][:c], values[i][:c])) for i, c in enumerate(counts)]


def prompt_logprobs(logits_TV: torch.Tensor, prompt_token_ids: Sequence[int], k: int) -> list[TokenLogprob | None]:
    """Logprob of each prompt token given the ones before it, and the k best alternatives there (vLLM).

    `logits_TV[t]` are the logits after prompt token t, so they score token t + 1; rows past T - 1 are ignored.
    Position 0 has no prefix and gives None. For a chunk of a prompt, pass `prompt_token_ids[a : b + 1]` with the
    chunk's logits and drop the leading None.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    num = len(prompt_token_ids)
    if num == 0:
        return []
    if logits_TV.dim() != 2 or logits_TV.shape[0] < num - 1:
        raise ValueError(f"need logits for at least {num - 1} positions, got shape {tuple(logits_TV.shape)}")
    logprobs_TV = torch.log_softmax(logits_TV[: num - 1].float(), dim=-1)
    targets_T = torch.tensor(list(prompt_token_ids[1:]), dtype=torch.long, device=logits_TV.device)
    chosen = logprobs_TV.gather(1, targets_T[:, None])[:, 0].tolist()
    k = min(k, logprobs_TV.shape[1])
    if k > 0:
        values_TK, ids_TK = logprobs_TV.topk(k, dim=-1)
        tops = [list(zip(ids, values)) for ids, values in zip(ids_TK.tolist(), values_TK.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [None] + [
        TokenLogprob(int(token_id), logprob, top)
        for token_id, logprob, top in zip(prompt_token_ids[1:], chosen, tops)
    ]
