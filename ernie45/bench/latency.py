"""`ernie45 bench latency`: the wall time of one batch through the offline engine (`ernie45.LLM`), repeated, as
vLLM's `vllm bench latency` does: a batch of `batch_size` random prompts of `input_len` tokens, each generating
exactly `output_len` tokens (eos ignored); warm-up iterations first, then the average and percentiles."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

from .metrics import percentile

PERCENTILES = (10, 25, 50, 75, 90, 99)


@dataclass
class LatencyResult:
    latencies: list[float]
    """Seconds per iteration."""

    @property
    def avg_latency(self) -> float:
        return statistics.fmean(self.latencies)

    def percentiles(self) -> dict[str, float]:
        ordered = sorted(self.latencies)
        return {str(q): percentile(ordered, q) for q in PERCENTILES}

    def record(self) -> dict:
        """vLLM's --output-json fields."""
        return {"avg_latency": self.avg_latency, "latencies": self.latencies, "percentiles": self.percentiles()}


def dummy_prompts(batch_size: int, input_len: int, vocab_size: int, seed: int) -> list[dict]:
    """Random token ids below min(vocab, 10,000) (vLLM draws them below 10,000), one list per batch row."""
    rng = random.Random(seed)
    high = min(vocab_size, 10000)
    return [{"prompt_token_ids": [rng.randrange(high) for _ in range(input_len)]} for _ in range(batch_size)]


def run_latency(llm, batch_size: int, input_len: int, output_len: int, num_iters: int, num_iters_warmup: int,
                n: int = 1, seed: int = 0, progress: bool = True) -> LatencyResult:
    """Iterations of one `generate` over the same batch; temperature 1, top_p 1 as vLLM's latency benchmark."""
    from ..engine import SamplingParams

    if min(batch_size, input_len, output_len, num_iters, n) < 1 or num_iters_warmup < 0:
        raise ValueError("batch size, input/output lengths, iterations and n must be >= 1, warm-up iterations >= 0")
    prompts = dummy_prompts(batch_size, input_len, llm.model.config.vocab_size, seed)
    params = SamplingParams(n=n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len, seed=seed)
    iterations = range(num_iters_warmup + num_iters)
    if progress:
        from tqdm.auto import tqdm

        iterations = tqdm(iterations, desc="bench latency", unit="iter")
    latencies = []
    for i in iterations:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        if i >= num_iters_warmup:
            latencies.append(time.perf_counter() - start)
    return LatencyResult(latencies)
