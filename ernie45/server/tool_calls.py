"""Tool calls in ERNIE 4.5 output, turned into OpenAI's `tool_calls` (vLLM's and FastDeploy's `ernie45` /
`ernie-x1` tool parsers read the same format).

The released templates render a call as
    <tool_call>
    {"name": "get_weather", "arguments": {"location": "Beijing"}}
    </tool_call>
after the answer (or instead of it), one block per call. A block whose body is not a JSON object with a string
`name` stays in `content` as text: a malformed call is shown, never dropped. `ToolCallStream` is the streaming form;
`parse` runs the same machine over a whole text, so streamed deltas add up to the non-streamed result.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ..engine.structured_output.tool_calls import TOOL_CALL_END, TOOL_CALL_START


def _held_back(buffer: str) -> int:
    """Length of the end of `buffer` that could begin `\n<tool_call>` (kept until the next delta, so the
    separating newline is dropped the same way whether or not the tag arrives in the same delta)."""
    opening = "\n" + TOOL_CALL_START
    for length in range(min(len(buffer), len(opening) - 1), 0, -1):
        tail = buffer[-length:]
        if opening.startswith(tail) or TOOL_CALL_START.startswith(tail):
            return length
    return 0


def _as_tool_call(body: str, index: int) -> dict | None:
    """OpenAI's tool-call object for a block body, or None when the body is not a call."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": arguments}}


@dataclass
class ToolCallStream:
    """Splits one choice's content, delta by delta, into plain content and complete tool calls."""

    buffer: str = ""
    in_call: bool = False
    calls: list[dict] = field(default_factory=list)
    after_call: bool = False  # a call just closed: the newline the template puts after it may still arrive

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content that can be shown now, tool calls completed by this delta)."""
        self.buffer += text
        if self.after_call and self.buffer:
            # The newline the template puts after each block belongs to the call, not to the content.
            self.buffer = self.buffer.removeprefix("\n")
            self.after_call = False
        content, new_calls = [], []
        while True:
            if self.in_call:
                end = self.buffer.find(TOOL_CALL_END)
                if end < 0:
                    break
                body = self.buffer[:end]
                self.buffer = self.buffer[end + len(TOOL_CALL_END):]
                self.in_call = False
                call = _as_tool_call(body, len(self.calls))
                if call is None:
                    content.append(TOOL_CALL_START + body + TOOL_CALL_END)
                else:
                    self.calls.append(call)
                    new_calls.append(call)
                    self.after_call = not self.buffer
                    self.buffer = self.buffer.removeprefix("\n")
                continue
            start = self.buffer.find(TOOL_CALL_START)
            if start < 0:
                keep = _held_back(self.buffer)
                content.append(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            before = self.buffer[:start]
            # The newline between the answer and the first block is the template's separator.
            content.append(before.removesuffix("\n"))
            self.buffer = self.buffer[start + len(TOOL_CALL_START):]
            self.in_call = True
        return "".join(content), new_calls

    def finish(self) -> str:
        """Content still held back at the end (an unterminated block is returned as text)."""
        rest = (TOOL_CALL_START if self.in_call else "") + self.buffer
        self.buffer, self.in_call = "", False
        return rest


def parse(content: str) -> tuple[str, list[dict]]:
    """Split a whole content string into (content without the calls, tool calls)."""
    stream = ToolCallStream()
    text, calls = stream.feed(content)
    return text + stream.finish(), calls


def strip_index(call: dict) -> dict:
    """A tool call as it appears in a non-streamed message (the `index` field is for stream deltas only)."""
    return {key: value for key, value in call.items() if key != "index"}


def tool_parsing_enabled(tools: list | None, tool_choice) -> bool:
    """Parse calls when the request offers tools and does not forbid calling them."""
    return bool(tools) and tool_choice != "none"
