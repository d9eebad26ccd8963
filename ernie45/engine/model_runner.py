"""Runs the model on one scheduled batch: flattened tokens (no padding), per-token positions, paged attention
metadata; logits only for the rows that sample. The model files are used as they are.
"""

from __future__ import annotations

import torch

from ..models import spec_for
from ..models.ernie45 import Ernie45ForCausalLM
from ..models.inputs import ModelInputs
from .multimodal import vl_step_inputs
from .paged_attention import KVCache, PagedAttentionMetadata
from .scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: Ernie45ForCausalLM, cache: KVCache, block_table_of, keep_hidden: bool = False):
        """`block_table_of(request_id) -> list[int]` reads the block manager's table for a request.
        `keep_hidden`: keep each step's pre-norm hidden states in `last_hidden_NH` (the MTP drafter reads them)."""
        self.model = model
        self.cache = cache
        self.block_table_of = block_table_of
        self.device = model.device
        self.is_multimodal = spec_for(model).is_multimodal
        self.keep_hidden = keep_hidden
        self.last_hidden_NH: torch.Tensor | None = None

    def metadata_for(self, spans: list[tuple[str, int, int]]) -> PagedAttentionMetadata:
        """Attention metadata of one forward over, per sequence, the positions start .. end - 1 of the span
        (request id, start, end): the slot each new token is written to, and per sequence its blocks (int32
        [S, most blocks], rows padded with block 0, never read), context length and new-token count."""
        bs = self.cache.block_size
        slots, tables, context_lens, query_lens = [], [], [], []
        for request_id, start, end in spans:
            table = self.block_table_of(request_id)[: -(-end // bs)]
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            tables.append(table)
            context_lens.append(end)
            query_lens.append(end - start)
        width = max(map(len, tables))
        tables_SM = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=self.device)
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=self.device)
        return PagedAttentionMetadata(self.cache, slot_mapping, tables_SM, context_lens, query_lens)

    def _metadata(self, batch: ScheduledBatch) -> PagedAttentionMetadata:
        return self.metadata_for([(r.request_id, r.num_computed_tokens, r.num_computed_tokens + n)
                                  for r, n in batch.requests])

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int], dict[str, torch.Tensor]]:
        """Returns (fp32 logits of the sampling rows, indices into batch.requests of those rows, and for
        requests that asked for prompt logprobs the fp32 logits of this step's prompt positions).

        A request samples when this step computes its last known token (decode, or the last prefill chunk). A
        request verifying k drafts (batch.num_spec) gets k + 1 consecutive logits rows, one per drafted position;
        every other sampling request one.
        """
        input_ids, positions, sample_rows, sample_positions = [], [], [], []
        prompt_rows: dict[str, slice] = {}
        q_start = 0
        for i, (request, num_new) in enumerate(batch.requests):
            start = request.num_computed_tokens
            end = start + num_new
            num_spec = batch.num_spec.get(request.request_id, 0)
            tokens = request.token_ids + request.spec_token_ids[:num_spec] if num_spec else request.token_ids
            input_ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            if request.params.prompt_logprobs is not None and start < request.num_prompt_tokens - 1:
                # Position t scores prompt token t + 1: positions up to the second-to-last prompt token.
                last = min(end, request.num_prompt_tokens - 1)
                prompt_rows[request.request_id] = slice(q_start, q_start + last - start)
            q_start += num_new
            if end - num_spec == request.num_tokens:
                sample_rows.append(i)
                sample_positions.extend(range(q_start - 1 - num_spec, q_start))
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        metadata = self._metadata(batch)
        if self.is_multimodal:
            inputs = vl_step_inputs(self.model, batch, ids)
        else:
            inputs = ModelInputs(ids, torch.tensor([positions], dtype=torch.long, device=self.device))
        hidden = self.model.forward_inputs(inputs, metadata)
        self.last_hidden_NH = hidden[0] if self.keep_hidden else None
        prompt_logits = {rid: self.model.compute_logits(hidden[0, rows]).float() for rid, rows in prompt_rows.items()}
        if not sample_rows:
            return hidden.new_empty(0, self.model.config.vocab_size, dtype=torch.float32), [], prompt_logits
        logits = self.model.compute_logits(hidden[0, sample_positions]).float()
        return logits, sample_rows, prompt_logits
