"""Reasoning/answer splitting for both ERNIE thinking formats, whole and streamed."""

import pytest

from ernie45.tokenizer import IncrementalDetokenizer, ReasoningParser

PARSER = ReasoningParser()

# (output text, starts_in_reasoning, expected reasoning_content, expected content)
CASES = [
    pytest.param(  # X1 / 21B-A3B-Thinking: the prompt ended in "<think>\n"
        "The user greets me.\nI should greet back.\n</think>\n\n"
        "<response>\nHello! 你好😀\nHow are you?\n</response>\n",
        True, "The user greets me.\nI should greet back.", "Hello! 你好😀\nHow are you?", id="x1-response",
    ),
    pytest.param(  # X1 tool call: no <response>, the call stays in content for the tool parser
        'Need the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>\n",
        True, "Need the weather.",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n', id="x1-tool-call",
    ),
    pytest.param(  # X1 answer followed by a tool call
        "think\n</think>\n\n<response>\nLet me check.\n</response>\n\n<tool_call>\n{}\n</tool_call>",
        True, "think", "Let me check.\n<tool_call>\n{}\n</tool_call>", id="x1-response-then-tool",
    ),
    pytest.param(  # VL format: the output opens the think block itself, no <response> wrapper
        "<think>\nLook at the picture.\n</think>\n\nIt is a cat. <response> is just text here.",
        False, "Look at the picture.", "It is a cat. <response> is just text here.", id="vl-think-in-output",
    ),
    pytest.param(  # VL format with thinking on: the prompt ended in "<think>"
        "reasoning</think>answer",
        True, "reasoning", "answer", id="vl-prompt-opened",
    ),
    pytest.param(  # thinking off: the prompt closed the think block, everything is content
        "Plain answer\n</think> stays as text.",
        False, None, "Plain answer\n</think> stays as text.", id="thinking-off",
    ),
    pytest.param(  # cut off while thinking
        "still thinking about it\n",
        True, "still thinking about it\n", "", id="unfinished-reasoning",
    ),
    pytest.param(
        "<thin",  # a partial tag that never completes is plain text
        False, None, "<thin", id="partial-tag-at-end",
    ),
    pytest.param(
        "", True, "", "", id="empty",
    ),
]


@pytest.mark.parametrize(("text", "starts_in_reasoning", "reasoning", "content"), CASES)
def test_parse(text, starts_in_reasoning, reasoning, content):
    assert PARSER.parse(text, starts_in_reasoning=starts_in_reasoning) == (reasoning, content)


@pytest.mark.parametrize(("text", "starts_in_reasoning", "reasoning", "content"), CASES)
def test_stream_one_character_at_a_time(text, starts_in_reasoning, reasoning, content):
    stream = PARSER.stream(starts_in_reasoning=starts_in_reasoning)
    reasoning_parts, content_parts = [], []
    for char in text:
        reasoning_delta, content_delta = stream.feed(char)
        reasoning_parts.append(reasoning_delta)
        content_parts.append(content_delta)
        # Tags must never leak into the streamed deltas.
        assert "</think>" not in "".join(reasoning_parts)
        assert "<response>" not in "".join(content_parts) or "just text" in text
    reasoning_delta, content_delta = stream.finish()
    reasoning_parts.append(reasoning_delta)
    content_parts.append(content_delta)
    assert ("".join(reasoning_parts) if stream.saw_reasoning else None) == reasoning
    assert "".join(content_parts) == content


@pytest.mark.parametrize(("text", "starts_in_reasoning", "reasoning", "content"), CASES)
@pytest.mark.parametrize("chunk", [2, 3, 5, 8])
def test_stream_in_chunks_matches_parse(text, starts_in_reasoning, reasoning, content, chunk):
    stream = PARSER.stream(starts_in_reasoning=starts_in_reasoning)
    pieces = [stream.feed(text[i : i + chunk]) for i in range(0, len(text), chunk)] + [stream.finish()]
    assert "".join(r for r, _ in pieces) == (reasoning or "")
    assert "".join(c for _, c in pieces) == content


def test_reasoning_is_released_as_it_streams():
    stream = PARSER.stream(starts_in_reasoning=True)
    assert stream.feed("Let me think") == ("Let me think", "")
    assert stream.in_reasoning
    # A newline and the start of a tag are held back until it is clear whether they close the block.
    assert stream.feed(" more\n</thi") == (" more", "")
    assert stream.feed("nk>\n\n<response>\nHi") == ("", "Hi")
    assert not stream.in_reasoning
    assert stream.feed(" there\n</response>\n") == ("", " there")
    assert stream.finish() == ("", "")
    with pytest.raises(RuntimeError):
        stream.feed("more")


def test_streaming_from_token_ids(tokenizer):
    # The serving path: ids -> IncrementalDetokenizer -> ReasoningStream, with skip_special_tokens=True.
    output = "思考一下😀\n</think>\n\n<response>\n答案是 42。\n</response>\n</s>"
    ids = tokenizer.encode(output)
    assert tokenizer.token_to_id("</think>") in ids  # a single token, kept by skip_special_tokens
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    stream = PARSER.stream(starts_in_reasoning=True)
    deltas = [stream.feed(detok.push(i)) for i in ids] + [stream.feed(detok.flush()), stream.finish()]
    assert "".join(r for r, _ in deltas) == "思考一下😀"
    assert "".join(c for _, c in deltas) == "答案是 42。"
