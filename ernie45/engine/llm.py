"""Offline API in vLLM's shape: `LLM(...).generate(prompts, sampling_params)` and `.chat(messages, ...)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from ..default_model import resolve_model_argument
from ..parallel import load_engine_model
from ..tokenizer import ReasoningParser, load_tokenizer
from .engine_config import EngineConfig
from .llm_engine import LLMEngine
from .multimodal import split_content_parts
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .structured_output import StructuredOutputsParams
from .structured_output.tool_calls import forced_tool_call_tag


class LLM:
    """Loads a checkpoint (the embedded default model when `model` is None) and runs batches through the engine."""

    def __init__(self, model: str | None = None, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "cpu", **engine_args):
        """engine_args: EngineConfig's fields (max_num_seqs, max_num_batched_tokens, max_model_len, block_size,
        num_kv_blocks, kv_cache_memory, enable_prefix_caching, seed), vLLM's names and EngineConfig's defaults."""
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise TypeError(f"LLM() got unknown arguments {unknown}; engine arguments are {sorted(known)}")
        config = EngineConfig(**engine_args)
        self.model = load_engine_model(resolve_model_argument(model), dtype, device, config)
        self.tokenizer = load_tokenizer(tokenizer or self.model.source_dir)
        self.engine = LLMEngine(self.model, self.tokenizer, config)
        self._ids = itertools.count()

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, {"prompt_token_ids": [...]} or {"prompt": str}, or a list of them; outputs come back
        in input order. VL models: a dict prompt may carry "multi_modal_data": {"image": [...], "video": [...]},
        one placeholder token per item in the prompt."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                request_id = f"llm-{next(self._ids)}"
                self.engine.add_request(request_id, prompt, p)
                ids.append(request_id)
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template_kwargs: dict | None = None,
             add_generation_prompt: bool = True, tools: list[dict] | None = None, tool_choice=None,
             parallel_tool_calls: bool = True) -> list[RequestOutput]:
        """messages: one conversation (list of {"role", "content"}) or a list of conversations. The thinking part
        of each output is split into `outputs[i].reasoning_content`; `text` keeps the answer. With a VL model,
        content may be a list of OpenAI-style parts (text, image_url, video_url; see `split_content_parts`).
        tools (OpenAI's format) go to the chat template; tool_choice "required" or {"type": "function", "function":
        {"name": ...}} constrains the output to `<tool_call>` blocks whose arguments follow the tools' schemas."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        kwargs = dict(chat_template_kwargs or {})
        if tools:
            kwargs.setdefault("tools", tools)
        if tool_choice == "required" or isinstance(tool_choice, dict):
            tag = forced_tool_call_tag(tools, tool_choice, parallel_tool_calls)
            forced = []
            for params in self._params_list(sampling_params, len(conversations)):
                params = params.clone()
                params.structured_outputs = StructuredOutputsParams(structural_tag=tag)
                forced.append(params)
            sampling_params = forced
        prompts, requests = [], []
        for conv in conversations:
            data = {}
            if any(isinstance(m.get("content"), list) for m in conv):
                # VL: content parts become numbered placeholders; the media travel with the prompt
                conv, data = split_content_parts(conv, self.engine.model.config, self.tokenizer)
            prompt = self.tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, **kwargs)
            prompts.append(prompt)
            requests.append({"prompt": prompt, "multi_modal_data": data} if data else prompt)
        outputs = self.generate(requests, sampling_params, use_tqdm)
        parser = ReasoningParser()
        for prompt, output in zip(prompts, outputs):
            starts_in_reasoning = parser.prompt_ends_in_reasoning(prompt)
            for completion in output.outputs:
                reasoning, content = parser.parse(completion.text, starts_in_reasoning)
                completion.reasoning_content, completion.text = reasoning, content
        return outputs

    @staticmethod
    def _params_list(sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} sampling_params for {count} prompts; pass one or one per prompt")
        return params

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = _progress_bar(len(request_ids)) if use_tqdm and len(request_ids) > 1 else None
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [finished[i] for i in request_ids]


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Generating", unit="req")
