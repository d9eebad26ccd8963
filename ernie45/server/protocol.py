"""Request bodies of the OpenAI-compatible API (pydantic), with vLLM's / FastDeploy's extra sampling fields.

Only types are checked here; value ranges are SamplingParams' job, so that the API and the offline engine give the
same messages. Types are strict (no "0.5" for a number, no 1 for a boolean, no 2.5 for an integer; 2.0 is 2) and
numbers must be finite. Unknown fields are accepted and ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _integral(value: Any) -> Any:
    # JSON has one number type: 8.0 is an integer to JSON Schema (and to Python's json for 8.0 written by a client).
    return int(value) if isinstance(value, float) and value.is_integer() else value


Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Int = Annotated[int, Field(strict=True), BeforeValidator(_integral)]
Bool = Annotated[bool, Field(strict=True)]
Str = Annotated[str, Field(strict=True)]
TokenIds = list[Int]

# seed + i seeds the i-th of n sequences in a torch.Generator, which takes 64-bit values.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# OpenAI's upper limit on n; the engine needs one KV lane per sequence, so unbounded n would be a denial of service.
MAX_N = 128
# Template arguments a request may not override: they are the server's to set.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt", "tokenize", "chat_template"})


def _find_lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string that is not valid Unicode text (JSON's "\\ud800" escapes allow that)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _find_lone_surrogate(key, path) or _find_lone_surrogate(item, f"{path}.{key}".lstrip("."))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _find_lone_surrogate(item, f"{path}.{index}".lstrip("."))
            if found:
                return found
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Request(_Body):
    """A request body: its strings must be encodable text, or the tokenizer and the JSON encoder would fail later."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        found = _find_lone_surrogate(data, "")
        if found:
            raise ValueError(f"{found} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); "
                             "strings must be valid Unicode text")
        return data


class StreamOptions(_Body):
    include_usage: Bool | None = None
    """Send one more chunk before `data: [DONE]` with the usage of the whole request (and `usage: null` before)."""


class SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Str | None = None
    """The served model name; None means the one model this server serves."""
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_N), BeforeValidator(_integral)] = 1
    temperature: Float | None = None
    top_p: Float | None = None
    max_tokens: Int | None = None
    stop: Str | list[Str] | None = None
    seed: Annotated[int, Field(strict=True, ge=SEED_MIN, le=SEED_MAX), BeforeValidator(_integral)] | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[str, Float] | None = None
    user: Str | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    # vLLM / FastDeploy extras (extra_body in the openai client).
    top_k: Int | None = None
    min_p: Float | None = None
    repetition_penalty: Float | None = None
    min_tokens: Int | None = None
    ignore_eos: Bool | None = None
    stop_token_ids: TokenIds | None = None
    include_stop_str_in_output: Bool | None = None
    skip_special_tokens: Bool | None = None
    return_token_ids: Bool | None = None
    """Add `prompt_token_ids` to the response and `token_ids` to each choice (vLLM's field names)."""
    # Output constraints (structured_outputs.py reads them; a request gives at most one).
    response_format: dict[str, Any] | None = None
    """OpenAI: {"type": "text" | "json_object" | "json_schema" (+ "json_schema": {name, schema, strict})}."""
    structured_outputs: dict[str, Any] | None = None
    """vLLM: {"json" | "regex" | "choice" | "grammar" | "json_object" | "structural_tag": ...}."""
    guided_json: dict[str, Any] | Str | None = None
    """FastDeploy / vLLM < 0.12: a JSON schema the output follows."""
    guided_regex: Str | None = None
    guided_choice: list[Str] | None = None
    guided_grammar: Str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Body):
    type: Literal["text"]
    text: Str


class FunctionCall(_Body):
    name: Str
    arguments: Str | dict[str, Any]
    """OpenAI sends a JSON string; a JSON object is accepted too (the templates render either)."""


class ToolCall(_Body):
    """A call an earlier assistant turn made, sent back in the conversation history."""

    id: Str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class MediaURL(_Body):
    url: Str
    """http(s) URL, data: URI (base64) or a path the server can read."""


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoPart(_Body):
    type: Literal["video_url"]
    video_url: MediaURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: Str | list[TextPart] | None = None
    name: Str | None = None
    reasoning_content: Str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # OpenAI: only an assistant turn that calls tools may leave content null.
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content is required for a {self.role} message (null only for an assistant turn "
                             "with tool_calls)")
        return self


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Int | None = None
    """OpenAI's newer name for max_tokens; wins when both are given."""
    logprobs: Bool | None = None
    top_logprobs: Int | None = None
    tools: list[dict[str, Any]] | None = None
    """Passed to the chat template; `<tool_call>` blocks in the output come back as `tool_calls`."""
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    """"none": no calls parsed; "auto" (the default with tools): the model decides; "required" or a named function
    ({"type": "function", "function": {"name": ...}}): the output is constrained to valid calls."""
    parallel_tool_calls: Bool | None = None
    """With a forced tool_choice, allow several calls in one answer (OpenAI's default: true)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Template variables, e.g. {"enable_thinking": true}."""
    add_generation_prompt: Bool = True
    reasoning_max_tokens: Int | None = None
    """Thinking budget: after this many tokens inside <think>, the engine closes the block."""


class CompletionRequest(SamplingFields):
    prompt: Str | list[Str] | TokenIds | list[TokenIds]
    """A string, a list of strings, a list of token ids, or a list of token-id lists (one choice set per prompt)."""
    echo: Bool = False
    logprobs: Int | None = None
    """Legacy shape: the chosen token's logprob plus this many alternatives per token."""
    suffix: Str | None = None
    best_of: Int | None = None


class TokenizeRequest(_Request):
    model: Str | None = None
    prompt: Str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: Bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Request):
    model: Str | None = None
    tokens: TokenIds


class VLChatMessage(ChatMessage):
    """A chat message of a VL model's server: content parts may be images and videos too."""

    content: Str | list[ContentPart] | None = None


class VLChatCompletionRequest(ChatCompletionRequest):
    """/v1/chat/completions of a VL model (its OpenAPI schema offers image_url / video_url parts)."""

    messages: Annotated[list[VLChatMessage], Field(min_length=1)]
