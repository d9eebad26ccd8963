"""MTP drafting: the checkpoint's multi-token-prediction head proposes the next tokens from the main model's
hidden states, with its own KV cache (the layer after the main stack: index num_hidden_layers).

After every step the head runs once over every position the main model just verified, reading position p's
hidden state and token p + 1: that writes its KV for those positions and, at a decoding sequence's last verified
position e - 1, gives the logits of token e + 1, the first draft. Further drafts rerun the same depth one position
on, feeding its own output hidden state back in place of the main model's (FastDeploy's num_model_steps and vLLM's
MTP proposer do the same with one depth). Drafts are greedy (argmax), so the verifier treats them as
distribution-free (q = 1) and stays lossless.

Its KV rows share the sequence's block table: a position the main model has verified holds the head's KV for that
position too, so prefix-cache hits bring the head's KV along. Draft positions beyond the verified ones are
overwritten when the main model verifies them. While drafting is off (batch too large) the head does not run, and
drafts after it comes back read stale KV for the positions it missed: fewer accepted, never a different output.
"""

from __future__ import annotations

import torch

from ...models import fused_decode
from ..scheduler import ScheduledBatch
from .config import SpeculativeConfig


class MtpProposer:
    def __init__(self, model, runner, block_manager, config: SpeculativeConfig):
        inner = model.model
        if not inner.num_mtp_layers:
            source = getattr(model, "source_dir", None) or "this model"
            raise ValueError(f"speculative_config.method {config.method!r}: {source} has no MTP layers "
                             f"(num_nextn_predict_layers 0); use method \"ngram\", or a checkpoint with MTP "
                             f"weights (model.mtp_block.0.*)")
        self.model = model
        self.inner = inner
        self.runner = runner
        self.block_manager = block_manager
        self.config = config
        self.block_table_of = runner.block_table_of
        self._plans: dict = {}
        """(rows, dtype) -> the fused plan of the MTP block for that many rows, or None: not fusable."""

    def _as_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """A hidden state (the main model's pre-norm output, or the head's own) as the head reads it."""
        return self.inner.norm(hidden) if self.config.mtp_hidden_state == "post_norm" else hidden

    def _draft_tokens(self, out_RH: torch.Tensor) -> list[int]:
        hidden = self.inner.norm(out_RH) if self.config.mtp_final_norm else out_RH
        return self.model.lm_head(hidden).argmax(dim=-1).tolist()

    def _run(self, spans: list[tuple[str, int, int]], token_ids: list[int], hidden_NH: torch.Tensor) -> torch.Tensor:
        """The head over the spans' positions (request id, start, end): its output hidden states [tokens, H]."""
        device = hidden_NH.device
        positions = torch.tensor([[p for _, start, end in spans for p in range(start, end)]], device=device)
        ids = torch.tensor([token_ids], dtype=torch.long, device=device)
        fused = self._run_fused(spans, ids, hidden_NH, positions)
        if fused is not None:
            return fused
        metadata = self.runner.metadata_for(spans)
        return self.inner.mtp_forward(ids, self._as_input(hidden_NH).unsqueeze(0), positions, metadata, depth=0)[0]

    def _run_fused(self, spans, ids_1N: torch.Tensor, hidden_NH: torch.Tensor, positions_1N: torch.Tensor):
        """The MTP block in one C call (models/fused_decode.py), each token its own row: row p writes its KV to
        position p's slot and attends positions 0..p through its sequence's blocks, and as every row's KV is
        written before any row attends, a span's rows see each other causally. None where the fused step does
        not apply (non-CPU, too many rows, hooks); the caller then runs the head op by op."""
        cache, inner = self.runner.cache, self.inner
        rows = ids_1N.shape[1]
        if not (cache.k.is_cpu and fused_decode.fusable_step(hidden_NH)):
            return None
        plan = self._plans.get((rows, hidden_NH.dtype), False)
        if plan is False:
            plan = self._plans[(rows, hidden_NH.dtype)] = fused_decode.plan_for(
                inner, cache.k, cache.v, hidden_NH, layers=[inner.mtp_block[0]])
        if plan is None:
            return None
        bs = cache.block_size
        slots, tables, lens = [], [], []
        for request_id, start, end in spans:
            table = self.block_table_of(request_id)[: -(-end // bs)]
            for p in range(start, end):
                slots.append(table[p // bs] * bs + p % bs)
                tables.append(table)
                lens.append(p + 1)
        width = max(map(len, tables))
        tables_MB = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        slots_M, lens_M = torch.tensor(slots, dtype=torch.long), torch.tensor(lens, dtype=torch.int32)
        attention = fused_decode.paged_attention(slots_M, tables_MB, lens_M, bs, cache.num_blocks)
        if attention is None:
            return None
        emb = inner.mtp_emb_norm[0](inner.embed_tokens(ids_1N[0]))
        x_NH = inner.mtp_linear_proj[0](torch.cat([emb, inner.mtp_hidden_norm[0](self._as_input(hidden_NH))], -1))
        cos, sin = inner.rotary_emb(positions_1N)
        x_NH = x_NH.contiguous()
        plan(x_NH, attention, cos.contiguous(), sin.contiguous())
        return x_NH

    @torch.inference_mode()
    def propose(self, batch: ScheduledBatch, num_rejected: list[int] | None,
                budgets: dict[str, int]) -> dict[str, list[int]]:
        """After `batch` ran and was verified: the head's catch-up run over every sequence still running, then up
        to `budgets[request_id]` greedy drafts for each sequence named there. Returns request id -> drafts."""
        hidden_NH = self.runner.last_hidden_NH
        spans, token_ids, rows = [], [], []
        last_row: dict[str, int] = {}
        requests = {}
        q = 0
        for i, (request, num_new) in enumerate(batch.requests):
            verified = num_new - (num_rejected[i] if num_rejected else 0)
            if not request.finished and verified > 0:
                end = request.num_computed_tokens
                start = end - verified
                spans.append((request.request_id, start, end))
                token_ids.extend(request.token_ids[start + 1:end + 1])  # token p + 1 at position p
                rows.extend(range(q, q + verified))
                last_row[request.request_id] = len(rows) - 1
                requests[request.request_id] = request
            q += num_new
        if not spans:
            return {}
        out_NH = self._run(spans, token_ids, hidden_NH[rows])
        drafting = [rid for rid in budgets if rid in last_row and budgets[rid] > 0]
        if not drafting:
            return {}
        out_RH = out_NH[[last_row[rid] for rid in drafting]]
        drafts = {rid: [token] for rid, token in zip(drafting, self._draft_tokens(out_RH))}
        for j in range(1, max(budgets[rid] for rid in drafting)):
            # Draft j comes from the head at position e - 1 + j: its KV slot must exist before it is written (the
            # verification step needs those slots anyway); a sequence the pool cannot grow for stops here.
            going = []
            for r, rid in enumerate(drafting):
                position = requests[rid].num_computed_tokens - 1 + j
                if budgets[rid] > j and self.block_manager.allocate_slots(rid, position + 1):
                    going.append((r, rid, position))
            if not going:
                break
            out_RH = self._run([(rid, p, p + 1) for _, rid, p in going], [drafts[rid][-1] for _, rid, _ in going],
                               out_RH[[r for r, _, _ in going]])
            drafting = [rid for _, rid, _ in going]
            for rid, token in zip(drafting, self._draft_tokens(out_RH)):
                drafts[rid].append(token)
        return drafts
