"""What every handler needs: the engine front, the tokenizer, admission (the --max-queue bound), metrics, and the
checks that turn bad input into 400s before anything reaches the engine."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import jinja2

from ..engine.client import EngineClient, EngineDeadError
from ..engine.multimodal import split_content_parts
from ..engine.outputs import RequestOutput
from ..engine.sampling_params import SamplingParams
from ..tokenizer import ReasoningParser
from .errors import APIError, bad_request
from .metrics import ServerMetrics
from .protocol import RESERVED_TEMPLATE_KWARGS, ChatMessage, SamplingFields

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


class Ticket:
    """The admission of one request (its n sequences per prompt); `release()` may be called more than once."""

    def __init__(self, admission: Admission, num_seqs: int):
        self._admission = admission
        self._num_seqs = num_seqs

    def release(self) -> None:
        if self._num_seqs:
            self._admission.in_flight -= self._num_seqs
            self._num_seqs = 0


class Admission:
    """Bounds the queue: sequences the server handed to the engine that are not running yet (waiting in the
    scheduler or still in the engine's inbox). Everything runs on the event loop, so plain ints suffice."""

    def __init__(self, stats, max_queue: int | None):
        self._stats = stats
        self.max_queue = max_queue
        self.in_flight = 0

    def num_queued(self) -> int:
        return max(0, self.in_flight - self._stats()["num_requests_running"])

    def admit(self, num_seqs: int) -> Ticket:
        if self.max_queue is not None:
            queued = self.num_queued()
            if queued >= self.max_queue:
                raise APIError(429, f"the server is busy: {queued} sequences are already waiting "
                                    f"(--max-queue {self.max_queue}); retry later", code="queue_full")
        self.in_flight += num_seqs
        return Ticket(self, num_seqs)


class ServingContext:
    def __init__(self, front: EngineClient, tokenizer, served_model_name: str, max_queue: int | None = None,
                 model_root: str | None = None, max_images_per_prompt: int = 8, max_videos_per_prompt: int = 2,
                 allowed_local_media_path: str | None = None):
        self.front = front
        self.model_info = front.model_info
        self.tokenizer = tokenizer
        self.served_model_name = served_model_name
        self.model_root = model_root
        self.max_model_len = self.model_info.max_model_len
        self.vocab_size = self.model_info.vocab_size
        self.parser = ReasoningParser()
        self.admission = Admission(front.stats, max_queue)
        self.metrics = ServerMetrics(front.stats, served_model_name, self.admission.num_queued)
        self._token_text: dict[int, str] = {}
        self.media_limits = {"image": max_images_per_prompt, "video": max_videos_per_prompt}
        self.allowed_local_media_path = (Path(allowed_local_media_path).resolve()
                                         if allowed_local_media_path else None)

    # ------------------------------------------------------------------------------------ checks
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.served_model_name}`.",
                           param="model", code="model_not_found")

    def validate_prompt(self, prompt) -> tuple[str | None, list[int]]:
        try:
            return self.front.validate_prompt(prompt)
        except ValueError as exc:
            message = str(exc)
            code = "context_length_exceeded" if "max_model_len" in message else None
            raise bad_request(message, param="prompt", code=code) from None

    def check_context_length(self, prompt_tokens: int, max_tokens: int | None, what: str = "messages") -> None:
        """400 when the prompt plus the completion a request asks for cannot fit in max_model_len (vLLM's rule; a
        request without max_tokens may use whatever is left)."""
        if max_tokens is not None and prompt_tokens + max_tokens > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, {max_tokens} in the "
                f"completion). Please reduce the length of the {what} or completion.",
                param="max_tokens", code="context_length_exceeded")

    def sampling_params(self, req: SamplingFields, **fields: Any) -> SamplingParams:
        """SamplingParams from the fields a request sets (None: SamplingParams' default) and the endpoint's own
        `fields` (passed as they are, None included)."""
        names = ("n", "temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty", "frequency_penalty",
                 "logit_bias", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                 "include_stop_str_in_output", "skip_special_tokens")
        values = {name: getattr(req, name) for name in names if getattr(req, name) is not None}
        values.update(fields)
        try:
            params = SamplingParams(**values)
            params.verify_token_ids(self.vocab_size)
        except ValueError as exc:
            message = str(exc)
            first = message.split(" ", 1)[0]
            raise bad_request(message, param=first if first in _SAMPLING_FIELDS else None) from None
        return params

    def render_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
                    chat_template_kwargs: dict | None = None, tools: list | None = None) -> str:
        kwargs = dict(chat_template_kwargs or {})
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
        if tools:
            kwargs.setdefault("tools", tools)
        # The released templates read `content` of every message; OpenAI lets an assistant turn that only calls
        # tools send it as null.
        plain = [{"content": "", **(m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else m)}
                 for m in messages]
        try:
            return self.tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, **kwargs)
        except (ValueError, TypeError, jinja2.TemplateError) as exc:
            raise bad_request(f"the messages cannot be rendered with the chat template: {exc}",
                              param="messages") from None

    def split_media(self, messages: Sequence[ChatMessage]) -> tuple[list, dict]:
        """Messages with image / video parts -> (messages with numbered placeholders, media); limits -> 400."""
        plain = [m.model_dump(exclude_none=True) for m in messages]
        kinds = [p.get("type") for m in plain if isinstance(m.get("content"), list) for p in m["content"]]
        if not any(kind in ("image_url", "video_url") for kind in kinds):
            return list(messages), {}
        if not self.model_info.is_multimodal:
            raise bad_request("image and video content parts need a VL model; this server serves a text model",
                              param="messages", code="unsupported_content")
        for media, limit in self.media_limits.items():
            count = kinds.count(f"{media}_url")
            if count > limit:
                raise bad_request(f"{count} {media}s in the request; this server accepts at most {limit} per request",
                                  param="messages", code="too_many_media")
        for m in plain:
            for part in m["content"] if isinstance(m.get("content"), list) else ():
                if part.get("type") in ("image_url", "video_url"):
                    self.check_media_url(part[part["type"]]["url"])
        try:
            return split_content_parts(plain, self.model_info.model_config, self.tokenizer)
        except ValueError as exc:
            raise bad_request(str(exc), param="messages") from None

    def check_media_url(self, url: str) -> None:
        """data: URIs and http(s) URLs are always allowed; a local path (or file:// URL) only inside
        --allowed-local-media-path (vLLM's rule): a client must not read the server's files."""
        if url.startswith(("data:", "http://", "https://")):
            return
        path = url.removeprefix("file://")
        if self.allowed_local_media_path is None:
            raise bad_request("local media paths are not allowed on this server (start it with "
                              "--allowed-local-media-path DIR); send a data: URI or an http(s) URL",
                              param="messages", code="invalid_media")
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.allowed_local_media_path):
            raise bad_request(f"{path} is outside the allowed local media directory", param="messages",
                              code="invalid_media")

    async def prepare_media(self, text: str | None, ids: list[int], data: dict) -> dict:
        """The engine prompt; with media, their placeholders expanded and pixels processed (off the event loop)."""
        if not data:
            return {"prompt_token_ids": ids, "prompt": text}
        try:
            ids, mm = await asyncio.to_thread(self.front.prepare_multimodal, ids, data)
        except ValueError as exc:  # MediaError included: undecodable, zero size, too many pixels, bad URL
            message = str(exc)
            code = "context_length_exceeded" if "max_model_len" in message else "invalid_media"
            raise bad_request(message, param="messages", code=code) from None
        return {"prompt_token_ids": ids, "prompt": text, "multi_modal_inputs": mm}

    # ------------------------------------------------------------------------------------ running
    async def generate(self, prompt: dict, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one prompt; engine failures come out as APIError. Closing it aborts."""
        try:
            async for output in self.front.generate(prompt, params, request_id=request_id):
                if output.finished:
                    self.metrics.observe_finished(output)
                yield output
        except EngineDeadError as exc:
            raise APIError(503, f"the engine is not running: {exc}", code="engine_unavailable") from None
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 (a failed engine step fails its requests, not the server)
            raise APIError(500, f"generation failed: {exc}", code="generation_failed") from None

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text
