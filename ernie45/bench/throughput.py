"""`ernie45 bench throughput`: the offline engine (`ernie45.LLM`) on a batch of prompts submitted at once, as vLLM's
`vllm bench throughput` does: requests/s, total and output tokens/s over the wall time of one `generate`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .datasets import SampleRequest


@dataclass
class ThroughputResult:
    elapsed_time: float
    num_requests: int
    total_num_tokens: int
    total_output_tokens: int

    @property
    def requests_per_second(self) -> float:
        return self.num_requests / self.elapsed_time

    @property
    def tokens_per_second(self) -> float:
        return self.total_num_tokens / self.elapsed_time

    @property
    def output_tokens_per_second(self) -> float:
        return self.total_output_tokens / self.elapsed_time

    def record(self) -> dict:
        """vLLM's --output-json fields, plus output tokens/s."""
        return {"elapsed_time": self.elapsed_time, "num_requests": self.num_requests,
                "total_num_tokens": self.total_num_tokens, "total_output_tokens": self.total_output_tokens,
                "requests_per_second": self.requests_per_second, "tokens_per_second": self.tokens_per_second,
                "output_tokens_per_second": self.output_tokens_per_second}


def run_throughput(llm, requests: list[SampleRequest], n: int = 1, ignore_eos: bool = True,
                   progress: bool = True) -> ThroughputResult:
    """All of `requests` through `llm.generate` at once (greedy when n == 1, temperature 1 for n > 1 as vLLM
    samples); token counts are the outputs' own, so a request that stops early counts what it generated."""
    from ..engine import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt} if isinstance(r.prompt, list) else r.prompt for r in requests]
    params = [SamplingParams(n=n, temperature=1.0 if n > 1 else 0.0, top_p=1.0, ignore_eos=ignore_eos,
                             max_tokens=r.expected_output_len) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return ThroughputResult(elapsed, len(outputs), prompt_tokens + output_tokens, output_tokens)
