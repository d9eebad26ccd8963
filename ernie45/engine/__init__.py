"""Inference engine: paged KV cache, token-budget scheduler with chunked prefill and preemption, prefix caching,
full sampler; offline `LLM` API, and `EngineClient`s for servers: `AsyncLLM` (core on a thread) and `MPEngineClient`
(core in its own process)."""

from .async_llm import AsyncLLM
from .client import EngineClient, EngineDeadError, ModelInfo
from .core_process import CoreLaunch
from .engine_config import EngineConfig
from .llm import LLM
from .llm_engine import LLMEngine
from .mp_client import MPEngineClient
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["AsyncLLM", "CompletionOutput", "CoreLaunch", "EngineClient", "EngineConfig", "EngineDeadError", "LLM",
           "LLMEngine", "MPEngineClient", "ModelInfo", "RequestOutput", "SamplingParams"]
