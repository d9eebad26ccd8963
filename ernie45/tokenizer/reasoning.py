"""Splitting ERNIE 4.5 thinking-model output into `reasoning_content` and `content`.

Two output shapes exist:
- X1 / ERNIE-4.5-21B-A3B-Thinking: the prompt already ends in `<think>\\n`, so the output is
  `reasoning\\n</think>\\n\\n<response>\\nanswer\\n</response>\\n` (or `...</think>\\n\\n<tool_call>...`).
- VL and other thinking models: the output may itself open with `<think>`; the answer follows `</think>` with no
  `<response>` wrapper.

One state machine handles both, and the non-streaming `parse` runs the same machine over the whole text, so the
streamed deltas always add up to the non-streamed result. The rules:
- an output that starts with `<think>` opens reasoning (one newline after the tag is dropped);
- otherwise the output is reasoning if the prompt left a think block open (`starts_in_reasoning`), else content;
- reasoning ends at the first `</think>` (one newline before the tag is dropped); without it, all is reasoning;
- the newlines after `</think>` are dropped; a `<response>` right there is removed with the newline after it, and
  its first `</response>` with one newline on each side; everything else (e.g. `<tool_call>` blocks) is content.
"""

from __future__ import annotations

from dataclasses import dataclass

_OPENING = "opening"  # nothing seen yet: does the output open with <think>?
_THINK_OPENED = "think_opened"  # right after <think>: drop one newline
_REASONING = "reasoning"
_ANSWER_START = "answer_start"  # right after </think>: drop newlines, look for <response>
_RESPONSE_OPENED = "response_opened"  # right after <response>: drop one newline
_RESPONSE = "response"
_RESPONSE_CLOSED = "response_closed"  # right after </response>: drop one newline
_PASSTHROUGH = "passthrough"


@dataclass(frozen=True)
class ReasoningParser:
    """The tags of ERNIE 4.5's thinking format; `stream()` and `parse()` do the splitting."""

    think_start: str = "<think>"
    think_end: str = "</think>"
    response_start: str = "<response>"
    response_end: str = "</response>"

    def stream(self, starts_in_reasoning: bool = True) -> ReasoningStream:
        """A stateful splitter for one generation; `starts_in_reasoning`: the prompt left a think block open."""
        return ReasoningStream(self, starts_in_reasoning)

    def parse(self, text: str, starts_in_reasoning: bool = True) -> tuple[str | None, str]:
        """Split a complete output into (reasoning_content, content); reasoning is None if there was none."""
        stream = self.stream(starts_in_reasoning)
        reasoning_a, content_a = stream.feed(text)
        reasoning_b, content_b = stream.finish()
        reasoning = reasoning_a + reasoning_b if stream.saw_reasoning else None
        return reasoning, content_a + content_b

    def prompt_ends_in_reasoning(self, prompt: str) -> bool:
        """Whether a rendered prompt leaves a think block open (the X1 template does; a closed one does not)."""
        return prompt.rfind(self.think_start) > prompt.rfind(self.think_end)


def _partial_tag_length(buffer: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of `buffer` that could be the start of one of `tags` (must be held back)."""
    longest = 0
    for tag in tags:
        for size in range(min(len(tag) - 1, len(buffer)), longest, -1):
            if buffer.endswith(tag[:size]):
                longest = size
                break
    return longest


class ReasoningStream:
    """Feed text deltas, get (reasoning_delta, content_delta) back; a tag split across deltas is held back."""

    def __init__(self, parser: ReasoningParser, starts_in_reasoning: bool):
        self.parser = parser
        self.starts_in_reasoning = starts_in_reasoning
        self.saw_reasoning = starts_in_reasoning
        self._state = _OPENING
        self._buffer = ""
        self._finished = False

    @property
    def in_reasoning(self) -> bool:
        """True while output is still going to `reasoning_content`."""
        if self._state == _OPENING:
            return self.starts_in_reasoning
        return self._state in (_THINK_OPENED, _REASONING)

    def feed(self, delta_text: str) -> tuple[str, str]:
        """Add generated text; return the (reasoning, content) text that is now certain ("" for none)."""
        if self._finished:
            raise RuntimeError("feed() after finish(): start a new stream for a new generation")
        self._buffer += delta_text
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        """End of generation: release whatever was held back."""
        if self._finished:
            return "", ""
        self._finished = True
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while self._step(final, reasoning, content):
            pass
        return "".join(reasoning), "".join(content)

    def _step(self, final: bool, reasoning: list[str], content: list[str]) -> bool:
        """Consume what the current state can; return True if the state changed and should run again."""
        p = self.parser
        buf = self._buffer
        state = self._state
        if state == _PASSTHROUGH:
            content.append(buf)
            self._buffer = ""
            return False
        if state in (_REASONING, _RESPONSE):
            return self._until_tag(final, p.think_end if state == _REASONING else p.response_end,
                                   reasoning if state == _REASONING else content)
        if state == _ANSWER_START:
            buf = self._buffer = buf.lstrip("\n")
            if not buf or (not final and len(buf) < len(p.response_start) and p.response_start.startswith(buf)):
                return False  # wait: the answer may still open with <response>
            if buf.startswith(p.response_start):
                self._buffer = buf[len(p.response_start) :]
                self._state = _RESPONSE_OPENED
            else:
                self._state = _PASSTHROUGH
            return True
        if state == _OPENING:
            if not buf or (not final and len(buf) < len(p.think_start) and p.think_start.startswith(buf)):
                return False  # wait: the output may still open with <think>
            if buf.startswith(p.think_start):
                self._buffer = buf[len(p.think_start) :]
                self._state = _THINK_OPENED
                self.saw_reasoning = True
            else:
                self._state = _REASONING if self.starts_in_reasoning else _PASSTHROUGH
            return True
        # _THINK_OPENED, _RESPONSE_OPENED, _RESPONSE_CLOSED: drop one newline if one comes next.
        if not buf:
            return False
        if buf.startswith("\n"):
            self._buffer = buf[1:]
        self._state = {_THINK_OPENED: _REASONING, _RESPONSE_OPENED: _RESPONSE, _RESPONSE_CLOSED: _PASSTHROUGH}[state]
        return True

    def _until_tag(self, final: bool, tag: str, out: list[str]) -> bool:
        buf = self._buffer
        index = buf.find(tag)
        if index >= 0:
            text = buf[:index]
            out.append(text[:-1] if text.endswith("\n") else text)  # the newline before a closing tag is format
            self._buffer = buf[index + len(tag) :]
            self._state = _ANSWER_START if tag == self.parser.think_end else _RESPONSE_CLOSED
            return True
        # Hold back a possible partial tag, and a newline that may turn out to precede the tag.
        held = 0 if final else _partial_tag_length(buf, ("\n" + tag, tag))
        out.append(buf[: len(buf) - held])
        self._buffer = buf[len(buf) - held :]
        return False
