"""One request through the router: prefill on a prefill instance, KV import on a decode instance, generation there.

The two-phase flow of vLLM's disaggregated proxy: the prefill instance gets the request with max_tokens = 1 and no
streaming (it computes the prompt, samples the first token and exports the prompt's KV under the response's id);
the decode instance imports the blocks it lacks (POST /disagg/import) and then gets the original request, which its
prefix cache mostly hits. The client sees the decode instance's response only, so outputs equal a mixed
instance's. Requests that cannot be split (n > 1, several prompts, prompt logprobs) or that find no prefill
instance go to a decode or mixed instance whole.

Faults: a prefill instance that fails -> another one, or none (the decode instance computes the prompt); a failed
import -> the decode instance recomputes; a decode instance that fails before the client got a byte -> the same
request (same router request id) to another instance, up to `max_attempts`; after the first byte of a stream -> an
error event in OpenAI's shape, then `data: [DONE]`. Nothing reaches the client twice.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import httpx
from fastapi.responses import JSONResponse
from starlette.responses import Response, StreamingResponse

from .instances import Instance, Registry
from .metrics import RouterMetrics
from .policies import Policy, prefix_hashes

logger = logging.getLogger("ernie45.router")

_RETRYABLE = {502, 503, 504}
_TIMEOUT = httpx.Timeout(600.0, connect=5.0)


class _Retry(Exception):
    """The instance failed before the client got anything: try another."""


def error_body(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def estimate_prompt_tokens(body: dict) -> int:
    """Token ids count as they are; text as ~4 characters a token (the router has no tokenizer)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    text = prompt if isinstance(prompt, str) else json.dumps(body.get("messages", ""), ensure_ascii=False)
    return len(text) // 4


def _has_token(line: str) -> bool:
    """A streamed chunk carrying generated text (or the end) rather than the opening role chunk."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return False
    try:
        choices = json.loads(line[6:]).get("choices") or []
    except ValueError:
        return False
    for c in choices:
        delta = c.get("delta") or {}
        if c.get("text") or delta.get("content") or delta.get("reasoning_content") or c.get("finish_reason"):
            return True
    return False


class Proxy:
    def __init__(self, registry: Registry, policy: Policy, metrics: RouterMetrics, client: httpx.AsyncClient,
                 max_attempts: int = 3, pd_min_prompt_tokens: int = 0):
        """`pd_min_prompt_tokens`: prompts estimated shorter than this skip the prefill instance (their prefill is
        cheaper than the extra hop and the transfer); 0 sends every eligible request through one."""
        self.pd_min_prompt_tokens = pd_min_prompt_tokens
        self.registry = registry
        self.policy = policy
        self.metrics = metrics
        self.client = client
        self.max_attempts = max_attempts

    # ----------------------------------------------------------------------------------------------- entry
    async def handle(self, endpoint: str, body: dict, headers: dict) -> Response:
        arrival = time.perf_counter()
        request_id = uuid.uuid4().hex
        headers = {**headers, "x-router-request-id": request_id}
        self.metrics.requests_in.inc()
        hashes = prefix_hashes(body)
        timing: dict[str, float] = {}
        prefill = await self._prefill(endpoint, body, headers, hashes, timing, arrival)
        tried: list[Instance] = []
        outcome_pending = True
        try:
            for attempt in range(self.max_attempts):
                inst = self._choose_decode(hashes, tried, transferred=prefill is not None)
                if inst is None:
                    break
                tried.append(inst)
                if attempt:
                    self.metrics.retries.inc()
                    logger.warning("request %s: retrying on %s", request_id, inst.url)
                inst.in_flight += 1
                owned = True  # the in-flight count is ours to drop, unless a stream takes it over
                try:
                    if prefill is not None:
                        p_inst, transfer_id = prefill
                        prefill = None
                        await self._import(inst, p_inst, transfer_id, timing)
                    timing.setdefault("queue", time.perf_counter() - arrival)
                    sent = time.perf_counter()
                    if body.get("stream"):
                        response = await self._open_stream(inst, endpoint, body, headers, arrival, sent, timing)
                        owned = isinstance(response, JSONResponse)
                    else:
                        response = await self._post(inst, endpoint, body, headers)
                    outcome_pending = owned
                    if owned:
                        self._finish(response.status_code)
                    return response
                except _Retry as exc:
                    logger.warning("request %s: %s failed: %s", request_id, inst.url, exc)
                finally:
                    if owned:
                        inst.in_flight -= 1
        finally:
            if prefill is not None:  # never got to an import
                prefill[0].in_flight -= 1
        if outcome_pending:
            self.metrics.requests_out.labels("error").inc()
        what = "failed" if tried else "is available"
        return JSONResponse(error_body(f"no instance {what} to serve the request (tried {len(tried)})",
                                       "upstream_unavailable"), status_code=503 if not tried else 502)

    def _finish(self, status: int) -> None:
        self.metrics.requests_out.labels("ok" if status < 400 else "client_error" if status < 500 else "error").inc()

    # ----------------------------------------------------------------------------------------------- prefill
    @staticmethod
    def pd_eligible(endpoint: str, body: dict) -> bool:
        if body.get("n") not in (None, 1) or body.get("prompt_logprobs") is not None:
            return False
        if endpoint.endswith("/completions") and "chat" not in endpoint:
            prompt = body.get("prompt")
            single = isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
            if not single or (body.get("echo") and body.get("logprobs") is not None):
                return False
        return True

    async def _prefill(self, endpoint, body, headers, hashes, timing, arrival) -> tuple[Instance, str] | None:
        if not self.pd_eligible(endpoint, body) or not self.registry.usable("decode"):
            return None
        if self.pd_min_prompt_tokens and estimate_prompt_tokens(body) < self.pd_min_prompt_tokens:
            return None
        pbody = {**body, "stream": False, "max_tokens": 1, "n": 1}
        for key in ("stream_options", "min_tokens"):
            pbody.pop(key, None)
        if "max_completion_tokens" in pbody:
            pbody["max_completion_tokens"] = 1
        tried = []
        for _ in range(2):
            candidates = [i for i in self.registry.usable("prefill") if i.kv_address and i not in tried]
            if not candidates:
                break
            inst = self.policy.choose(candidates, hashes)
            tried.append(inst)
            inst.in_flight += 1
            timing["queue"] = time.perf_counter() - arrival
            start = time.perf_counter()
            status, transfer_id = 0, None
            try:
                resp = await self.client.post(inst.url + endpoint, json=pbody, headers=headers, timeout=_TIMEOUT)
                status = resp.status_code
                transfer_id = resp.json()["id"] if status == 200 else None
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                if isinstance(exc, httpx.TransportError):
                    inst.mark_failed()
            if transfer_id is None:
                inst.in_flight -= 1
                if 400 <= status < 500:
                    return None  # the request's own fault: the decode instance answers it with the same error
                continue
            timing["prefill"] = time.perf_counter() - start
            if "chat" not in endpoint:
                transfer_id += "-0"  # completions name each prompt's engine request `<id>-<k>`
            return inst, transfer_id
        self.metrics.pd_fallbacks.inc()
        return None

    async def _import(self, inst: Instance, p_inst: Instance, transfer_id: str, timing: dict) -> None:
        start = time.perf_counter()
        try:
            resp = await self.client.post(inst.url + "/disagg/import", json={
                "source": p_inst.kv_address, "transfer_id": transfer_id}, timeout=_TIMEOUT)
        except httpx.TransportError as exc:
            inst.mark_failed()
            raise _Retry(f"KV import: {exc}") from exc
        finally:
            p_inst.in_flight -= 1
        timing["transfer"] = time.perf_counter() - start
        reply = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
        if resp.status_code != 200 or not reply.get("ok"):
            self.metrics.pd_fallbacks.inc()
            logger.warning("KV import of %s on %s failed (%s); it recomputes the prompt", transfer_id, inst.url,
                           reply.get("error", resp.status_code))
            return
        self.metrics.kv_bytes.inc(reply.get("bytes", 0))
        self.metrics.kv_blocks.inc(reply.get("blocks_imported", 0))
        self.metrics.kv_blocks_cached.inc(reply.get("blocks_cached", 0))

    # ----------------------------------------------------------------------------------------------- decode
    def _choose_decode(self, hashes: list[str], tried: list[Instance], transferred: bool) -> Instance | None:
        # Where the KV went, if it went; otherwise any instance that generates; a prefill instance last of all.
        pools = ([self.registry.usable("decode")] if transferred else []) + [
            self.registry.usable("decode", "mixed"), self.registry.usable("prefill")]
        for pool in pools:
            candidates = [i for i in pool if i not in tried]
            if candidates:
                return self.policy.choose(candidates, hashes)
        return None

    async def _post(self, inst: Instance, endpoint: str, body: dict, headers: dict) -> Response:
        try:
            resp = await self.client.post(inst.url + endpoint, json=body, headers=headers, timeout=_TIMEOUT)
        except httpx.TransportError as exc:
            inst.mark_failed()
            raise _Retry(str(exc)) from exc
        if resp.status_code in _RETRYABLE:
            raise _Retry(f"HTTP {resp.status_code}")
        return Response(resp.content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"))

    async def _open_stream(self, inst, endpoint, body, headers, arrival, sent, timing) -> Response:
        """The stream once its first event arrived (a failure before that is retried); the returned response
        owns `inst.in_flight` and the request's outcome from then on."""
        request = self.client.build_request("POST", inst.url + endpoint, json=body, headers=headers,
                                            timeout=_TIMEOUT)
        try:
            resp = await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            inst.mark_failed()
            raise _Retry(str(exc)) from exc
        if resp.status_code != 200:
            content = await resp.aread()
            await resp.aclose()
            if resp.status_code in _RETRYABLE:
                raise _Retry(f"HTTP {resp.status_code}")
            return JSONResponse(json.loads(content or b"{}"), status_code=resp.status_code)
        lines = resp.aiter_lines()
        first: list[str] = []
        try:
            async for line in lines:
                first.append(line)
                if line == "":
                    break
        except httpx.HTTPError as exc:
            await resp.aclose()
            inst.mark_failed()
            raise _Retry(str(exc)) from exc
        if not first:
            await resp.aclose()
            raise _Retry("the stream ended before its first event")
        return StreamingResponse(self._relay(inst, resp, lines, first, arrival, sent, timing),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _relay(self, inst, resp, lines: AsyncIterator[str], first: list[str], arrival, sent,
                     timing) -> AsyncIterator[str]:
        outcome, got_token, done = "ok", False, False
        try:
            pending = list(first)
            while True:
                for line in pending:
                    if not got_token and _has_token(line):
                        got_token = True
                        self._observe_ttft(arrival, sent, timing)
                    if line.startswith("data: ") and '"error"' in line[:20]:
                        outcome = "error"
                    done = done or line == "data: [DONE]"
                    yield line + "\n"
                try:
                    line = await anext(lines)
                except StopAsyncIteration:
                    break
                pending = [line]
            if not done:
                raise httpx.RemoteProtocolError("the stream ended without data: [DONE]")
        except httpx.HTTPError as exc:
            outcome = "error"
            inst.mark_failed()
            logger.warning("a stream from %s broke after its first event: %s", inst.url, exc)
            yield _sse(error_body(f"the instance serving this stream failed mid-stream: {exc}",
                                  "upstream_failed"))
            yield "data: [DONE]\n\n"
        finally:
            inst.in_flight -= 1
            self.metrics.requests_out.labels(outcome).inc()
            await resp.aclose()

    def _observe_ttft(self, arrival: float, sent: float, timing: dict) -> None:
        now = time.perf_counter()
        self.metrics.ttft.observe(now - arrival)
        for part in ("queue", "prefill", "transfer"):
            if part in timing:
                self.metrics.ttft_parts[part].observe(timing[part])
        self.metrics.ttft_parts["first_decode"].observe(now - sent)
