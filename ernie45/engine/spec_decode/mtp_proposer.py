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

    def _as_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """A hidden state (the main model's pre-norm output, or the head's own) as the head reads it."""
        return self.inner.norm(hidden) if self.config.mtp_hidden_state == "post_norm" else hidden

    def _draft_tokens(self, out_RH: torch.Tensor) -> list[int]:
        hidden = self.inner.norm(out_RH) if self.config.mtp_final_norm else out_RH
        return self.model.lm_head(hidden).argmax(dim=-1).tolist()

    def _run(self, spans: list[tuple[str, int, int]], token_ids: list[int], hidden_NH: torch.Tensor) -> torch.Tensor:
        device = hidden_NH.device
        positions = torch.tensor([[p for _, start, end in spans for p in range(start, end)]], device=device)
        ids = torch.tensor([token_ids], dtype=torch.long, device=device)
        metadata = self.runner.metadata_for(spans)
        return self.inner.mtp_forward(ids, self._as_input(hidden_NH).unsqueeze(0), positions, metadata, depth=0)[0]

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
