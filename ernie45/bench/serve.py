"""`ernie45 bench serve`: load an OpenAI-compatible server with streaming requests and time them, as vLLM's
`vllm bench serve` does.

Requests stream from /v1/completions (token-id or text prompts) or /v1/chat/completions (text prompts) with
`stream_options: {include_usage: true}`, so token counts are the server's own. Arrivals: all at once
(`request_rate=inf`) or a gamma process of that rate (`burstiness=1`: Poisson), optionally capped by
`max_concurrency` requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from .datasets import SampleRequest
from .metrics import RequestResult


@dataclass
class ServeTarget:
    """Where and how to send each request."""

    base_url: str
    """e.g. http://127.0.0.1:8000 (no /v1)."""
    model: str
    endpoint: str = "/v1/completions"
    """/v1/completions or /v1/chat/completions."""
    api_key: str | None = None
    ignore_eos: bool = False
    """vLLM's extension: generate exactly the requested output length."""
    extra_body: dict = field(default_factory=dict)
    """Sampling fields added to every request (temperature, top_p, ...)."""

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, request: SampleRequest) -> dict:
        body = {"model": self.model, "max_tokens": request.expected_output_len, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 0.0, **self.extra_body}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.chat:
            prompt = request.prompt if isinstance(request.prompt, str) else None
            if prompt is None:
                raise ValueError("chat endpoints take text prompts; build the dataset with as_text=True")
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = request.prompt
        return body


def served_model(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> str:
    """The first model /v1/models lists (what `--model` defaults to, as in vLLM)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base_url + "/v1/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ConnectionError(f"cannot reach {base_url}/v1/models: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise ConnectionError(f"{base_url}/v1/models answered {response.status_code}: {response.text[:300]}")
    data = response.json().get("data") or []
    if not data:
        raise ConnectionError(f"{base_url}/v1/models lists no model")
    return data[0]["id"]


def _chunk_text(chunk: dict, chat: bool) -> str | None:
    """The text a streamed chunk carries, or None when it carries no token. Completions: every chunk with a choice
    is a step's token, its text possibly empty (a byte of a character still incomplete), as vLLM counts them.
    Chat: the first chunk carries only the role, before any token, so a chunk counts when its delta has text."""
    choices = chunk.get("choices") or []
    if not choices:
        return None  # the usage chunk
    if not chat:
        return "".join(c.get("text") or "" for c in choices)
    for choice in choices:
        delta = choice.get("delta") or {}
        text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        if text or choice.get("token_ids"):
            return text
    return None


async def send_request(client: httpx.AsyncClient, target: ServeTarget, request: SampleRequest) -> RequestResult:
    """One streamed request, timed from sending it to each chunk that carries tokens and to the end."""
    result = RequestResult(prompt_len=request.prompt_len)
    texts, chunks = [], 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", target.endpoint, json=target.payload(request)) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
                return result
            async for data in _sse_data(response.aiter_lines()):
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    return result
                usage = chunk.get("usage")
                if usage:
                    result.prompt_len = usage.get("prompt_tokens", result.prompt_len)
                    result.output_tokens = usage.get("completion_tokens", 0)
                text = _chunk_text(chunk, target.chat)
                if text is None:
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
                texts.append(text)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2el = time.perf_counter() - start
    result.generated_text = "".join(texts)
    if not result.output_tokens:
        result.output_tokens = chunks  # a server without include_usage: one token per chunk, vLLM's fallback
    result.ok = chunks > 0
    if not result.ok:
        result.error = "the stream ended without a token"
    return result


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    async for line in lines:
        if line.startswith("data:"):
            yield line[len("data:"):].strip()


async def arrivals(requests: list[SampleRequest], request_rate: float, burstiness: float,
                   seed: int) -> AsyncIterator[SampleRequest]:
    """Each request at its arrival time: at once for an infinite rate, else gamma-distributed gaps of mean
    1 / rate (shape `burstiness`; 1 is a Poisson process), vLLM's get_request."""
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate and burstiness must be > 0, got {request_rate}, {burstiness}")
    rng = random.Random(seed)
    for i, request in enumerate(requests):
        yield request
        if math.isinf(request_rate) or i == len(requests) - 1:
            continue
        await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (request_rate * burstiness)))


async def run_requests(target: ServeTarget, requests: list[SampleRequest], request_rate: float = math.inf,
                       burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0,
                       progress: bool = True, timeout: float = 6 * 3600.0) -> tuple[list[RequestResult], float]:
    """Send `requests` at their arrival times (at most `max_concurrency` in flight); results in input order and
    the wall time from the first send to the last finish."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max concurrency must be >= 1, got {max_concurrency}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="bench serve", unit="req")
    limits = httpx.Limits(max_connections=(max_concurrency or len(requests)) + 4, max_keepalive_connections=None)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with httpx.AsyncClient(base_url=target.base_url, headers=target.headers, limits=limits,
                                 timeout=httpx.Timeout(timeout, connect=30.0)) as client:

        async def one(request: SampleRequest) -> RequestResult:
            if semaphore is None:
                result = await send_request(client, target, request)
            else:
                async with semaphore:
                    result = await send_request(client, target, request)
            if bar is not None:
                bar.update(1)
            return result

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(r)) async for r in arrivals(requests, request_rate, burstiness, seed)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return list(results), duration


def result_record(metrics: dict, results: list[RequestResult], *, target: ServeTarget, num_prompts: int,
                  request_rate: float, burstiness: float, max_concurrency: int | None, extra: dict | None = None
                  ) -> dict:
    """The JSON result file, in vLLM's field names (`--save-result` of `vllm bench serve`)."""
    return {
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if target.chat else "openai",
        "base_url": target.base_url,
        "endpoint": target.endpoint,
        "model_id": target.model,
        "num_prompts": num_prompts,
        "request_rate": "inf" if math.isinf(request_rate) else request_rate,
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
        **(extra or {}),
        **metrics,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens if r.ok else 0 for r in results],
        "ttfts": [r.ttft if r.ok else 0.0 for r in results],
        "itls": [r.itl for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
    }
