"""POST /v1/chat/completions: render the messages with the chat template, generate, split thinking from the answer.

Thinking is "on" when the rendered prompt leaves a `<think>` block open (or when the output opens one); the
ReasoningParser then routes text to `reasoning_content` until `</think>`. Streamed deltas come from the same state
machine as the non-streamed message, so they always add up to it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.types import Receive

from ..engine.outputs import RequestOutput
from . import tool_calls
from .context import ServingContext
from .errors import APIError, bad_request
from .logprobs import chat_logprobs
from .middleware import RequestInfo
from .protocol import ChatCompletionRequest
from .streaming import DONE, SSEResponse, sse, unless_disconnected
from .structured_outputs import structured_outputs_of


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, info: RequestInfo,
                                 receive: Receive) -> Response:
    ctx.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", param="top_logprobs")
    messages, media = ctx.split_media(req.messages)
    prompt = ctx.render_chat(messages, req.add_generation_prompt, req.chat_template_kwargs, req.tools)
    text, prompt_ids = ctx.validate_prompt(prompt)
    engine_prompt = await ctx.prepare_media(text, prompt_ids, media)
    prompt_ids = engine_prompt["prompt_token_ids"]
    # OpenAI: without max_tokens the only limit is the context length (SamplingParams' default is 16).
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = ctx.sampling_params(
        req, max_tokens=max_tokens, reasoning_max_tokens=req.reasoning_max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        structured_outputs=structured_outputs_of(req, req.tools, req.tool_choice, req.parallel_tool_calls),
    )
    ctx.check_context_length(len(prompt_ids), max_tokens, "messages")
    starts_in_reasoning = ctx.parser.prompt_ends_in_reasoning(prompt)
    request_id = info.response_id = f"chatcmpl-{info.request_id}"
    info.prompt_tokens = len(prompt_ids)
    ticket = ctx.admission.admit(params.n)
    try:
        outputs = ctx.generate(engine_prompt, params, request_id)
        if req.stream:
            stream = _stream(ctx, req, info, outputs, prompt_ids, starts_in_reasoning)
            response, ticket = SSEResponse(stream, on_close=ticket.release), None
            return response
        final = await unless_disconnected(receive, _last(outputs))
        return JSONResponse(_response(ctx, req, info, final, starts_in_reasoning))
    finally:
        if ticket is not None:
            ticket.release()


async def _last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    try:
        async for final in outputs:
            pass
    finally:
        await outputs.aclose()
    if final is None or not final.finished:
        raise APIError(500, "the engine ended the request without a result", code="generation_failed")
    return final


def _response(ctx: ServingContext, req: ChatCompletionRequest, info: RequestInfo, final: RequestOutput,
              starts_in_reasoning: bool) -> dict:
    choices = []
    for completion in final.outputs:
        reasoning, content = ctx.parser.parse(completion.text, starts_in_reasoning)
        calls = []
        if tool_calls.tool_parsing_enabled(req.tools, req.tool_choice):
            content, calls = tool_calls.parse(content)
        # OpenAI / vLLM: reasoning_content is null when there was no reasoning; tool_calls only when there are calls.
        message = {"role": "assistant", "content": None if calls and not content.strip() else content,
                   "reasoning_content": reasoning or None}
        if calls:
            message["tool_calls"] = [tool_calls.strip_index(c) for c in calls]
        choice = {
            "index": completion.index,
            "message": message,
            "logprobs": ({"content": chat_logprobs(completion.logprobs or [], ctx.token_text)}
                         if req.logprobs else None),
            "finish_reason": _finish_reason(completion.finish_reason, calls),
            "stop_reason": completion.stop_reason,
        }
        if req.return_token_ids:
            choice["token_ids"] = completion.token_ids
        choices.append(choice)
    completion_tokens = sum(len(c.token_ids) for c in final.outputs)
    info.completion_tokens = completion_tokens
    body = {
        "id": info.response_id, "object": "chat.completion", "created": int(time.time()),
        "model": ctx.served_model_name, "choices": choices,
        "usage": _usage(len(final.prompt_token_ids), completion_tokens),
    }
    if req.return_token_ids:
        body["prompt_token_ids"] = final.prompt_token_ids
    return body


def _finish_reason(reason: str | None, calls: list) -> str | None:
    """OpenAI reports "tool_calls" when a choice that ended by itself called tools."""
    return "tool_calls" if calls and reason == "stop" else reason


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream(ctx: ServingContext, req: ChatCompletionRequest, info: RequestInfo,
                  outputs: AsyncIterator[RequestOutput], prompt_ids: list[int],
                  starts_in_reasoning: bool) -> AsyncIterator[str]:
    created = int(time.time())
    extra = {"usage": None} if req.include_usage else {}

    def chunk(choices: list[dict], **fields) -> str:
        return sse({"id": info.response_id, "object": "chat.completion.chunk", "created": created,
                    "model": ctx.served_model_name, "choices": choices, **extra, **fields})

    n = req.n
    first_fields = {"prompt_token_ids": prompt_ids} if req.return_token_ids else {}
    for i in range(n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}], **(first_fields if i == 0 else {}))
    splitters = [ctx.parser.stream(starts_in_reasoning) for _ in range(n)]
    parse_tools = tool_calls.tool_parsing_enabled(req.tools, req.tool_choice)
    call_streams = [tool_calls.ToolCallStream() for _ in range(n)]
    called = [False] * n
    sent = [0] * n  # tokens of each choice already streamed
    done = [False] * n
    completion_tokens = 0
    try:
        async for output in outputs:
            for i, completion in enumerate(output.outputs):
                if done[i]:
                    continue
                reasoning, content = splitters[i].feed(output.new_text[i])
                if completion.finish_reason is not None:
                    tail_reasoning, tail_content = splitters[i].finish()
                    reasoning, content = reasoning + tail_reasoning, content + tail_content
                    done[i] = True
                new_calls = []
                if parse_tools:
                    content, new_calls = call_streams[i].feed(content)
                    if done[i]:
                        content += call_streams[i].finish()
                    called[i] = called[i] or bool(new_calls)
                new_ids = completion.token_ids[sent[i]:]
                delta = {}
                if reasoning:
                    delta["reasoning_content"] = reasoning
                if content:
                    delta["content"] = content
                if new_calls:
                    delta["tool_calls"] = new_calls
                logprobs = None
                if req.logprobs and new_ids:
                    logprobs = {"content": chat_logprobs((completion.logprobs or [])[sent[i]:], ctx.token_text)}
                sent[i] = len(completion.token_ids)
                if not delta and logprobs is None and completion.finish_reason is None:
                    continue
                choice = {"index": i, "delta": delta, "logprobs": logprobs,
                          "finish_reason": _finish_reason(completion.finish_reason, [True] if called[i] else [])}
                if completion.finish_reason is not None:
                    choice["stop_reason"] = completion.stop_reason
                if req.return_token_ids:
                    choice["token_ids"] = new_ids
                yield chunk([choice])
            completion_tokens = sum(len(c.token_ids) for c in output.outputs)
            info.completion_tokens = completion_tokens
    except APIError as exc:
        yield sse(exc.body())
        yield DONE
        return
    finally:
        await outputs.aclose()  # the client left mid-stream: abort the request, free its KV blocks
    if req.include_usage:
        yield chunk([], usage=_usage(len(prompt_ids), completion_tokens))
    yield DONE
