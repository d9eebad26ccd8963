"""Inference engine: paged KV cache, token-budget scheduler with chunked prefill and preemption, prefix caching,
full sampler; offline `LLM` API and the asyncio `AsyncLLM` front for servers."""

from .async_llm import AsyncLLM
from .engine_config import EngineConfig
from .llm import LLM
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["AsyncLLM", "CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "RequestOutput", "SamplingParams"]
