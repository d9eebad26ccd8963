"""The engine: add requests, then `step()` = schedule -> run the model -> sample -> update requests.

`n > 1` requests fan out into n sequences that share the prompt's KV through the prefix cache (as vLLM v1 does).
"""

from __future__ import annotations

import random
import time

import torch

from ..generation.text import stop_ids_for
from ..models import spec_for
from ..models.ernie45 import Ernie45ForCausalLM
from .block_manager import BlockManager
from .engine_config import DEFAULT_KV_CACHE_MEMORY, DEFAULT_MAX_MODEL_LEN, EngineConfig
from .input_processor import InputProcessor
from .model_runner import ModelRunner
from .multimodal import MultimodalInputs
from .output_processor import OutputProcessor, RequestGroup
from .outputs import RequestOutput
from .paged_attention import KVCache
from .request import Request, RequestStatus
from .sampler import Sampler, SamplerOutput, SamplingRow
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .spec_decode import MtpProposer, SpecDecodeStats, SpeculativeConfig, propose_ngram, verify
from .stop_checker import StopChecker
from .structured_output import StructuredOutputManager


class LLMEngine:
    def __init__(self, model: Ernie45ForCausalLM, tokenizer, config: EngineConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        mcfg = model.config
        self.max_model_len = config.max_model_len or min(mcfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        self.speculative_config = spec = SpeculativeConfig.of(config.speculative_config)
        if spec is not None and spec_for(model).is_multimodal:
            raise ValueError("speculative_config: speculative decoding does not support VL models yet")
        # The MTP head's attention keeps its KV in one more layer of the same blocks (index num_hidden_layers).
        num_layers = mcfg.num_hidden_layers + (1 if spec is not None and spec.uses_mtp else 0)
        # A tensor-parallel rank caches only its KV heads (ernie45.parallel.sharding).
        num_kv_heads = getattr(model, "kv_heads_per_rank", None) or mcfg.num_key_value_heads
        block_bytes = KVCache.bytes_per_block(num_layers, config.block_size, num_kv_heads,
                                              mcfg.head_dim, model.dtype)
        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            memory = config.kv_cache_memory
            if memory is None:
                blocks_needed = config.max_num_seqs * -(-self.max_model_len // config.block_size)
                memory = min(DEFAULT_KV_CACHE_MEMORY, blocks_needed * block_bytes)
            num_blocks = memory // block_bytes
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks x {config.block_size} = {num_blocks * config.block_size} "
                f"tokens, fewer than max_model_len={self.max_model_len}; raise num_kv_blocks / kv_cache_memory or "
                f"lower max_model_len"
            )
        self.num_kv_blocks = num_blocks
        self.cache = KVCache(num_layers, num_blocks, config.block_size, num_kv_heads, mcfg.head_dim,
                             model.dtype, model.device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_prefix_caching)
        uses_mtp = spec is not None and spec.uses_mtp
        self.runner = ModelRunner(model, self.cache, self.block_manager.block_table, keep_hidden=uses_mtp)
        self.mtp = MtpProposer(model, self.runner, self.block_manager, spec) if uses_mtp else None
        self.sampler = Sampler()
        self.eos_token_ids = set(stop_ids_for(tokenizer, model))
        self.spec_stats = SpecDecodeStats()
        self.structured_outputs = StructuredOutputManager(tokenizer, mcfg.vocab_size, sorted(self.eos_token_ids),
                                                          config.structured_outputs_backend)
        self._rng = random.Random(config.seed)
        self.inputs = InputProcessor(tokenizer, mcfg, self.max_model_len, getattr(model, "source_dir", None))
        self.outputs = OutputProcessor(tokenizer, self.max_model_len)
        self.num_prompt_tokens_total = 0  # for metrics

    # ------------------------------------------------------------------------------------------- requests
    def validate_prompt(self, prompt) -> tuple[str | None, list[int]]:
        """Tokenize and check a prompt without touching engine state (safe from any thread)."""
        return self.inputs.validate_prompt(prompt)

    def prepare_multimodal(self, ids: list[int], data: dict) -> tuple[list[int], MultimodalInputs]:
        """Expand a VL prompt's placeholders and process its media (see `InputProcessor.prepare_multimodal`)."""
        return self.inputs.prepare_multimodal(ids, data)

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None, extra_keys: tuple = ()) -> RequestGroup:
        """prompt: a string, {"prompt_token_ids": [...]} or {"prompt": str} (VL: plus "multi_modal_data" or
        "multi_modal_inputs"), or an `EnginePrompt` an InputProcessor made already."""
        params = params or SamplingParams()
        sequence_ids = [f"{request_id}-{i}" for i in range(params.n)] if params.n > 1 else [request_id]
        self.outputs.check_new_ids(request_id, sequence_ids)
        params.verify_token_ids(self.model.config.vocab_size)
        engine_prompt = self.inputs.process(prompt)
        ids, mm = engine_prompt.prompt_token_ids, engine_prompt.multi_modal_inputs
        if mm is not None:
            extra_keys = (*extra_keys, mm.content_hash)
        arrival = arrival_time if arrival_time is not None else time.time()
        in_reasoning = self.outputs.prompt_ends_in_reasoning(ids)
        sequences = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else self._rng.getrandbits(63)
            sequences.append(Request(
                request_id=sequence_ids[i],
                group_id=request_id,
                prompt_token_ids=ids,
                params=params,
                stop_checker=StopChecker(params, self.tokenizer, self.eos_token_ids),
                generator=torch.Generator(device=self.model.device).manual_seed(seed),
                arrival_time=arrival,
                extra_keys=extra_keys,
                in_reasoning=in_reasoning,
                prefix_parent=sequences[0] if sequences and self.config.enable_prefix_caching else None,
                mm=mm,
            ))
        self.structured_outputs.init_requests(sequences)
        group = RequestGroup(request_id, engine_prompt.prompt, ids, params, sequences, arrival)
        self.outputs.add(group)
        for seq in sequences:
            self.scheduler.add(seq)
        self.num_prompt_tokens_total += len(ids)
        return group

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free everything it holds; unknown or finished ids are ignored."""
        group = self.outputs.forget(request_id)
        if group is None:
            return None
        for seq in group.sequences:
            if not seq.finished:
                self.scheduler.finish(seq, RequestStatus.FINISHED_ABORTED)
                seq.finish_time = time.time()
        return self.outputs.output(group)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict[str, float | int]:
        """Gauges and counters for metrics (read from any thread: plain ints and floats)."""
        bm = self.block_manager
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_cache_usage_perc": bm.usage,
            "num_kv_blocks": self.num_kv_blocks,
            "num_free_kv_blocks": bm.num_free_blocks,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": self.num_prompt_tokens_total,
            "generation_tokens_total": self.outputs.num_generation_tokens_total,
            **self.structured_outputs.stats(),
            **self.spec_stats.as_dict(),
        }

    # ------------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample (or verify drafts), update, draft; returns an output for every request
        that made progress."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits, rows, prompt_logits = self.runner.execute(batch)
        for request, _ in batch.requests:
            if request.request_id in prompt_logits:
                self.outputs.record_prompt_logprobs(request, prompt_logits[request.request_id])
        sampled_token_ids, num_rejected, token_logprobs = self._tokens_of_step(batch, logits, rows)
        now = time.time()

        def on_token(request: Request, token: int) -> RequestStatus | None:
            logprob, top = token_logprobs[request.request_id].pop(0)
            return self.outputs.on_token(request, token, float(logprob), top, now)

        progressed = self.scheduler.update_from_output(batch, sampled_token_ids, on_token, num_rejected)
        if self.speculative_config is not None:
            self._propose_drafts(batch, num_rejected)
        return self.outputs.step_outputs(progressed)

    def _tokens_of_step(self, batch: ScheduledBatch, logits: torch.Tensor, rows: list[int]):
        """Per batch row: its new tokens (one sampled, or accepted drafts + one), its rejected draft count, and per
        request the (logprob, top logprobs) of each new token. Rows verifying k drafts own k + 1 logits rows."""
        sampled_token_ids: list[list[int]] = [[] for _ in batch.requests]
        num_rejected = [0] * len(batch.requests)
        token_logprobs: dict[str, list] = {}  # request id -> (logprob, top logprobs) of each of its new tokens
        plain = []  # (batch index, logits row) of the rows that sample one token
        offset = 0
        for i in rows:
            request = batch.requests[i][0]
            num_spec = batch.num_spec.get(request.request_id, 0)
            if num_spec:
                # Drafts the grammar refuses are dropped here (their logits rows are left unused); the grammar
                # gives each remaining position its mask.
                drafts, bitmasks = self.structured_outputs.draft_bitmasks(request, request.spec_token_ids[:num_spec])
                verified = verify(self.sampler, logits[offset:offset + len(drafts) + 1], self._row(request), drafts,
                                  bitmasks)
                sampled_token_ids[i] = verified.token_ids
                num_rejected[i] = num_spec - verified.num_accepted
                token_logprobs[request.request_id] = list(zip(verified.logprobs, verified.top_logprobs))
                request.num_draft_tokens += num_spec
                request.num_accepted_tokens += verified.num_accepted
                self.spec_stats.record(num_spec, verified.num_accepted)
            else:
                plain.append((i, offset))
            offset += num_spec + 1
        if plain:
            result = self._sample(logits[[o for _, o in plain]], [batch.requests[i][0] for i, _ in plain])
            for j, (i, _) in enumerate(plain):
                sampled_token_ids[i] = [int(result.token_ids[j])]
                token_logprobs[batch.requests[i][0].request_id] = [(result.logprobs[j], result.top_logprobs[j])]
        return sampled_token_ids, num_rejected, token_logprobs

    def _propose_drafts(self, batch: ScheduledBatch, num_rejected: list[int]) -> None:
        """Draft the next tokens of every decoding sequence, unless the batch is too large to gain from it."""
        config = self.speculative_config
        running = self.scheduler.running
        if config.disable_by_batch_size is not None and len(running) > config.disable_by_batch_size:
            return
        budgets = self._draft_budgets(running)
        if self.mtp is not None:
            mtp_drafts = self.mtp.propose(batch, num_rejected,
                                          {r.request_id: min(k, config.num_mtp_tokens) for r, k in budgets})
        for request, k in budgets:
            if self.mtp is None:
                request.spec_token_ids = propose_ngram(request.token_ids, k, config.prompt_lookup_min,
                                                       config.prompt_lookup_max)
                continue
            if request.request_id not in mtp_drafts:
                continue  # not in this step's batch: the drafts it holds still continue its tokens
            drafts = mtp_drafts[request.request_id]
            if config.method == "mtp_ngram" and len(drafts) < k:
                # Prompt lookup continues from the MTP drafts, as if they were accepted.
                drafts = drafts + propose_ngram(request.token_ids + drafts, k - len(drafts),
                                                config.prompt_lookup_min, config.prompt_lookup_max)
            request.spec_token_ids = drafts

    def _draft_budgets(self, running) -> list[tuple[Request, int]]:
        """(request, most drafts it may take) for each decoding sequence that may draft."""
        config = self.speculative_config
        budgets = []
        for request in running:
            # Forced tokens are not drafted (the forcing decides them); constrained ones are, and the grammar
            # trims their drafts before verification.
            if request.num_computed_tokens != request.num_tokens - 1 or request.forced_token_ids:
                continue
            room = self.max_model_len - request.num_tokens
            if request.params.max_tokens is not None:
                room = min(room, request.params.max_tokens - request.num_output_tokens - 1)
            budget = request.params.reasoning_max_tokens
            if request.in_reasoning and budget is not None:
                # Every token these drafts add must fall inside the thinking budget, the bonus token included.
                room = min(room, budget - request.num_reasoning_tokens - 1)
            k = min(config.num_speculative_tokens, room)
            if k > 0:
                budgets.append((request, k))
        return budgets

    def _row(self, r: Request, bitmask: torch.Tensor | None = None) -> SamplingRow:
        return SamplingRow(params=r.params, prompt_token_ids=r.prompt_token_ids, output_token_ids=r.output_token_ids,
                           generator=r.generator, forced_token_id=r.forced_token_ids[0] if r.forced_token_ids else None,
                           eos_token_ids=self.eos_token_ids, token_bitmask=bitmask)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        bitmasks = self.structured_outputs.bitmasks(requests)
        return self.sampler(logits, [self._row(r, bitmask) for r, bitmask in zip(requests, bitmasks)])
