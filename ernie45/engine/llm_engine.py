"""The engine: add requests, then `step()` = schedule -> run the model -> sample -> update requests.

`n > 1` requests fan out into n sequences that share the prompt's KV through the prefix cache (as vLLM v1 does).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from ..generation.text import stop_ids_for
from ..models.ernie45 import Ernie45ForCausalLM
from ..models.ernie45_vl import Ernie45VLForConditionalGeneration
from .block_manager import BlockManager
from .engine_config import DEFAULT_KV_CACHE_MEMORY, DEFAULT_MAX_MODEL_LEN, EngineConfig
from .model_runner import ModelRunner
from .multimodal import MultimodalInputs, prepare_multimodal
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .paged_attention import KVCache
from .request import Request, RequestStatus
from .sampler import Sampler, SamplingRow, prompt_logprobs
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .stop_checker import StopChecker

_THINK_CLOSE_TEXT = "\n</think>\n\n"


@dataclass
class RequestGroup:
    """A user request: its prompt and its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[Request]
    arrival_time: float

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)


class LLMEngine:
    def __init__(self, model: Ernie45ForCausalLM, tokenizer, config: EngineConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        mcfg = model.config
        self.max_model_len = config.max_model_len or min(mcfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        num_layers = mcfg.num_hidden_layers
        block_bytes = KVCache.bytes_per_block(num_layers, config.block_size, mcfg.num_key_value_heads,
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
        self.cache = KVCache(num_layers, num_blocks, config.block_size, mcfg.num_key_value_heads, mcfg.head_dim,
                             model.dtype, model.device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_prefix_caching)
        self.runner = ModelRunner(model, self.cache, self.block_manager.block_table)
        self.sampler = Sampler()
        self.eos_token_ids = set(stop_ids_for(tokenizer, model))
        self._rng = random.Random(config.seed)
        self._groups: dict[str, RequestGroup] = {}
        self._sequence_ids: set[str] = set()  # ids of live sequences: user ids and "<id>-<i>" of n > 1 fan-outs
        self._think_start = tokenizer.token_to_id("<think>")
        self._think_end = tokenizer.token_to_id("</think>")
        self._think_close_ids = tokenizer.encode(_THINK_CLOSE_TEXT) if self._think_end is not None else []
        self._processors = None  # VL image / video processors, loaded on the first multimodal prompt
        # Counters for metrics.
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    # ------------------------------------------------------------------------------------------- requests
    def tokenize_prompt(self, prompt) -> tuple[str | None, list[int]]:
        """A prompt is a string or {"prompt_token_ids": [...]} (or {"prompt": str}); VL prompts add
        "multi_modal_data" (raw media) or "multi_modal_inputs" (from `prepare_multimodal`, ids already expanded)."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            vocab = self.model.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt_token_ids contains ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(f"a prompt must be a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def validate_prompt(self, prompt) -> tuple[str | None, list[int]]:
        """Tokenize and check a prompt without touching engine state (safe from any thread)."""
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len} "
                f"(prompt + at least one generated token must fit)"
            )
        return text, ids

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None, extra_keys: tuple = ()) -> RequestGroup:
        params = params or SamplingParams()
        sequence_ids = [f"{request_id}-{i}" for i in range(params.n)] if params.n > 1 else [request_id]
        if request_id in self._groups or self._sequence_ids.intersection(sequence_ids):
            raise ValueError(f"request id {request_id!r} is already in use")
        params.verify_token_ids(self.model.config.vocab_size)
        text, ids = self.validate_prompt(prompt)
        mm = prompt.get("multi_modal_inputs") if isinstance(prompt, dict) else None
        data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        if data and mm is None:
            ids, mm = self.prepare_multimodal(ids, data)
        if mm is not None:
            extra_keys = (*extra_keys, mm.content_hash)
        arrival = arrival_time if arrival_time is not None else time.time()
        in_reasoning = self._prompt_ends_in_reasoning(ids)
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
        group = RequestGroup(request_id, text, ids, params, sequences, arrival)
        self._groups[request_id] = group
        self._sequence_ids.update(sequence_ids)
        for seq in sequences:
            self.scheduler.add(seq)
        self.num_prompt_tokens_total += len(ids)
        return group

    def prepare_multimodal(self, ids: list[int], data: dict) -> tuple[list[int], MultimodalInputs]:
        """Expand a VL prompt's placeholders and process its media (processors read from the checkpoint). Safe from
        any thread (no engine state, no vision encoding): a server runs it before admitting the request, and then
        passes {"prompt_token_ids": expanded ids, "multi_modal_inputs": mm}."""
        if not isinstance(self.model, Ernie45VLForConditionalGeneration):
            raise ValueError("multi_modal_data needs a VL model (model_type ernie4_5_vl_moe)")
        from ..processing import ImageProcessor, VideoProcessor, load_processors  # needs pillow: the `vl` extra

        if self._processors is None:
            source = getattr(self.model, "source_dir", None)
            self._processors = load_processors(source) if source is not None else (ImageProcessor(), VideoProcessor())
        ids, mm = prepare_multimodal(self.model, *self._processors, ids, data)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens with its images / videos expanded, but max_model_len is "
                f"{self.max_model_len} (prompt + at least one generated token must fit)"
            )
        return ids, mm

    def _prompt_ends_in_reasoning(self, ids: list[int]) -> bool:
        if self._think_start is None:
            return False
        last_open = max((i for i, t in enumerate(ids) if t == self._think_start), default=-1)
        last_close = max((i for i, t in enumerate(ids) if t == self._think_end), default=-1)
        return last_open > last_close

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free everything it holds; unknown or finished ids are ignored."""
        group = self._forget(request_id)
        if group is None:
            return None
        for seq in group.sequences:
            if not seq.finished:
                self.scheduler.finish(seq, RequestStatus.FINISHED_ABORTED)
                seq.finish_time = time.time()
        return self._output(group, {})

    def _forget(self, request_id: str) -> RequestGroup | None:
        group = self._groups.pop(request_id, None)
        if group is not None:
            self._sequence_ids.difference_update(seq.request_id for seq in group.sequences)
        return group

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
            "generation_tokens_total": self.num_generation_tokens_total,
        }

    # ------------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample; returns an output for every request that made progress."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits, rows, prompt_logits = self.runner.execute(batch)
        for request, num_new in batch.requests:
            if request.request_id in prompt_logits:
                self._record_prompt_logprobs(request, prompt_logits[request.request_id])
            request.num_computed_tokens += num_new
            if self.config.enable_prefix_caching:
                self.block_manager.cache_full_blocks(request.request_id, request.token_ids,
                                                     request.num_computed_tokens, request.extra_keys)
        sampled = [batch.requests[i][0] for i in rows]
        if not sampled:
            return []
        sampling_rows = [
            SamplingRow(params=r.params, prompt_token_ids=r.prompt_token_ids, output_token_ids=r.output_token_ids,
                        generator=r.generator, forced_token_id=r.forced_token_ids[0] if r.forced_token_ids else None,
                        eos_token_ids=self.eos_token_ids)
            for r in sampled
        ]
        result = self.sampler(logits, sampling_rows)
        now = time.time()
        new_text: dict[str, str] = {}
        for j, request in enumerate(sampled):
            token = int(result.token_ids[j])
            new_text[request.request_id] = self._append_token(request, token, j, result, now)
        touched = dict.fromkeys(r.group_id for r in sampled)
        outputs = []
        for group_id in touched:
            group = self._groups.get(group_id)
            if group is None:
                continue
            outputs.append(self._output(group, new_text))
            if group.finished:
                self._forget(group_id)
        return outputs

    @staticmethod
    def _record_prompt_logprobs(request: Request, logits_TV: torch.Tensor) -> None:
        """Logprobs of the prompt tokens scored by this chunk (recomputation after preemption adds nothing)."""
        start = request.num_computed_tokens  # before this step's update
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None]
        if len(request.prompt_logprobs) > start + 1:
            return
        chunk = request.prompt_token_ids[start : start + logits_TV.shape[0] + 1]
        request.prompt_logprobs.extend(prompt_logprobs(logits_TV, chunk, request.params.prompt_logprobs)[1:])

    def _append_token(self, request: Request, token: int, row: int, result, now: float) -> str:
        if request.forced_token_ids:
            request.forced_token_ids.pop(0)
        request.token_ids.append(token)
        self.num_generation_tokens_total += 1
        if request.first_token_time is None:
            request.first_token_time = now
        if request.params.logprobs is not None:
            request.logprobs.append(Logprob(token, float(result.logprobs[row]), result.top_logprobs[row]))
        request.cumulative_logprob += float(result.logprobs[row])
        self._update_thinking_budget(request, token)
        text, finish_reason = request.stop_checker.append(token)
        if finish_reason is None and request.num_tokens >= self.max_model_len:
            finish_reason = "length"
            text += request.stop_checker.finish("length")
        if finish_reason is not None:
            status = RequestStatus.FINISHED_LENGTH if finish_reason == "length" else RequestStatus.FINISHED_STOPPED
            self.scheduler.finish(request, status)
            request.finish_time = now
        return text

    def _update_thinking_budget(self, request: Request, token: int) -> None:
        """Once `reasoning_max_tokens` thinking tokens are spent, force the tokens that close the block."""
        if not request.in_reasoning:
            return
        if token == self._think_end:
            request.in_reasoning = False
            return
        request.num_reasoning_tokens += 1
        budget = request.params.reasoning_max_tokens
        if budget is not None and request.num_reasoning_tokens >= budget and not request.forced_token_ids:
            request.forced_token_ids = list(self._think_close_ids)

    def _output(self, group: RequestGroup, new_text: dict[str, str]) -> RequestOutput:
        completions = []
        for i, seq in enumerate(group.sequences):
            checker = seq.stop_checker
            completions.append(CompletionOutput(
                index=i, text=checker.text, token_ids=seq.output_token_ids, finish_reason=seq.finish_reason,
                stop_reason=getattr(checker, "stop_reason", None),
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
            ))
        first = min((s.first_token_time for s in group.sequences if s.first_token_time), default=None)
        finish = max((s.finish_time or 0 for s in group.sequences), default=0) or None
        metrics = RequestMetrics(arrival_time=group.arrival_time, first_token_time=first,
                                 finish_time=finish if group.finished else None,
                                 num_cached_tokens=max(s.num_cached_tokens for s in group.sequences),
                                 num_preemptions=sum(s.num_preemptions for s in group.sequences))
        return RequestOutput(
            request_id=group.request_id, prompt=group.prompt, prompt_token_ids=group.prompt_token_ids,
            outputs=completions, finished=group.finished, metrics=metrics,
            prompt_logprobs=group.sequences[0].prompt_logprobs,
            new_text=[new_text.get(s.request_id, "") for s in group.sequences],
        )
