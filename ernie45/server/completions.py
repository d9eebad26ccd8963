"""POST /v1/completions: one engine request per prompt (a string, a list of strings, token ids or a list of token-id
lists); choice `index` is prompt_index * n + sample_index, as in OpenAI's API."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.types import Receive

from ..engine.outputs import RequestOutput
from .context import ServingContext
from .errors import APIError, bad_request
from .logprobs import legacy_logprobs
from .middleware import RequestInfo
from .protocol import CompletionRequest
from .streaming import DONE, SSEResponse, merge, sse, unless_disconnected
from .structured_outputs import structured_outputs_of


def _prompts(req: CompletionRequest) -> list:
    """The request's prompts as engine prompts (strings or {"prompt_token_ids": [...]})."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be an empty list", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [{"prompt_token_ids": list(p)} for p in prompt]


async def create_completion(ctx: ServingContext, req: CompletionRequest, info: RequestInfo,
                            receive: Receive) -> Response:
    ctx.check_model(req.model)
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (it must be unset or equal to n)", param="best_of")
    prompts = [ctx.validate_prompt(p) for p in _prompts(req)]
    fields = {"logprobs": req.logprobs, "structured_outputs": structured_outputs_of(req)}
    if req.echo and req.logprobs is not None:
        fields["prompt_logprobs"] = req.logprobs
    params = ctx.sampling_params(req, **fields)
    for _, ids in prompts:
        ctx.check_context_length(len(ids), params.max_tokens, "prompt")
    request_id = info.response_id = f"cmpl-{info.request_id}"
    info.prompt_tokens = sum(len(ids) for _, ids in prompts)
    ticket = ctx.admission.admit(params.n * len(prompts))
    try:
        streams = [
            ctx.generate({"prompt_token_ids": ids, "prompt": text}, params, f"{request_id}-{k}")
            for k, (text, ids) in enumerate(prompts)
        ]
        echoes = [(text if text is not None else ctx.tokenizer.decode(ids)) if req.echo else "" for text, ids in prompts]
        if req.stream:
            response, ticket = SSEResponse(_stream(ctx, req, info, streams, echoes), on_close=ticket.release), None
            return response
        finals = await unless_disconnected(receive, _finals(streams))
        return JSONResponse(_response(ctx, req, info, finals, echoes))
    finally:
        if ticket is not None:
            ticket.release()


async def _finals(streams: list[AsyncIterator]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    merged = merge(streams)
    try:
        async for k, output in merged:
            finals[k] = output
    finally:
        await merged.aclose()
    if not all(f is not None and f.finished for f in finals):
        raise APIError(500, "the engine ended a request without a result", code="generation_failed")
    return finals


def _echo_logprobs(ctx: ServingContext, output: RequestOutput) -> list[tuple[int, object]]:
    entries = list(output.prompt_logprobs or [])
    entries += [None] * (len(output.prompt_token_ids) - len(entries))
    return list(zip(output.prompt_token_ids, entries))


def _response(ctx: ServingContext, req: CompletionRequest, info: RequestInfo, finals: list[RequestOutput],
              echoes: list[str]) -> dict:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for k, final in enumerate(finals):
        prompt_tokens += len(final.prompt_token_ids)
        for completion in final.outputs:
            completion_tokens += len(completion.token_ids)
            logprobs = None
            if req.logprobs is not None:
                tokens = _echo_logprobs(ctx, final) if req.echo else []
                tokens += list(zip(completion.token_ids, completion.logprobs or []))
                logprobs, _ = legacy_logprobs(tokens, ctx.token_text)
            choice = {"index": k * req.n + completion.index, "text": echoes[k] + completion.text,
                      "logprobs": logprobs, "finish_reason": completion.finish_reason,
                      "stop_reason": completion.stop_reason}
            if req.return_token_ids:
                choice["prompt_token_ids"] = final.prompt_token_ids
                choice["token_ids"] = completion.token_ids
            choices.append(choice)
    info.completion_tokens = completion_tokens
    return {"id": info.response_id, "object": "text_completion", "created": int(time.time()),
            "model": ctx.served_model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


async def _stream(ctx: ServingContext, req: CompletionRequest, info: RequestInfo, streams: list[AsyncIterator],
                  echoes: list[str]) -> AsyncIterator[str]:
    created = int(time.time())
    extra = {"usage": None} if req.include_usage else {}

    def chunk(choices: list[dict], **fields) -> str:
        return sse({"id": info.response_id, "object": "text_completion", "created": created,
                    "model": ctx.served_model_name, "choices": choices, **extra, **fields})

    n = req.n
    sent: dict[int, int] = {}  # choice index -> tokens streamed
    offsets: dict[int, int] = {}  # choice index -> text offset for legacy logprobs
    prompt_tokens: dict[int, int] = {}
    completion_tokens: dict[int, int] = {}
    merged = merge(streams)
    try:
        async for k, output in merged:
            prompt_tokens[k] = len(output.prompt_token_ids)
            for completion in output.outputs:
                index = k * n + completion.index
                first = index not in sent
                if first:  # the echoed prompt (and its logprobs) opens this choice's stream
                    sent[index], offsets[index] = 0, 0
                if sent[index] < 0:
                    continue  # finished already
                new_ids = completion.token_ids[sent[index]:]
                text = (echoes[k] if first else "") + output.new_text[completion.index]
                if not text and not new_ids and completion.finish_reason is None:
                    continue  # this step advanced another choice of the prompt
                tokens = _echo_logprobs(ctx, output) if first and req.echo and req.logprobs is not None else []
                logprobs = None
                if req.logprobs is not None:
                    tokens += list(zip(new_ids, (completion.logprobs or [])[sent[index]:]))
                    logprobs, offsets[index] = legacy_logprobs(tokens, ctx.token_text, offsets[index])
                choice = {"index": index, "text": text, "logprobs": logprobs,
                          "finish_reason": completion.finish_reason}
                if completion.finish_reason is not None:
                    choice["stop_reason"] = completion.stop_reason
                if req.return_token_ids:
                    choice["token_ids"] = new_ids
                    if first:
                        choice["prompt_token_ids"] = output.prompt_token_ids
                sent[index] = -1 if completion.finish_reason is not None else len(completion.token_ids)
                yield chunk([choice])
            completion_tokens[k] = sum(len(c.token_ids) for c in output.outputs)
            info.completion_tokens = sum(completion_tokens.values())
    except APIError as exc:
        yield sse(exc.body())
        yield DONE
        return
    finally:
        await merged.aclose()  # the client left mid-stream: abort every prompt's request
    if req.include_usage:
        p, c = sum(prompt_tokens.values()), sum(completion_tokens.values())
        yield chunk([], usage={"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
    yield DONE
