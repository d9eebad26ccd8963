"""ERNIE 4.5 `<tool_call>` blocks -> OpenAI tool_calls, whole and streamed."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from ernie45.server import tool_calls

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "北京", "unit": "c"}}\n</tool_call>\n'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'


def test_answer_followed_by_two_calls():
    content, calls = tool_calls.parse("Let me check.\n" + WEATHER + TIME)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [c["index"] for c in calls] == [0, 1]
    assert json.loads(calls[0]["function"]["arguments"]) == {"location": "北京", "unit": "c"}
    assert calls[1]["function"]["arguments"] == "{}"
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


def test_string_arguments_are_kept_as_given():
    _, calls = tool_calls.parse('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert calls[0]["function"]["arguments"] == '{"x": 1}'


def test_malformed_block_stays_in_content():
    text = 'Hi <tool_call>{"name": broken}</tool_call> there'
    assert tool_calls.parse(text) == (text, [])
    no_name = '<tool_call>{"arguments": {}}</tool_call>'
    assert tool_calls.parse(no_name) == (no_name, [])


def test_unterminated_block_is_returned_as_text():
    text = 'answer <tool_call>{"name": "f"'
    assert tool_calls.parse(text) == (text, [])


def test_text_without_calls_is_untouched_including_lookalike_tags():
    for text in ["plain answer", "a < b and <tool> x", "ends with <tool_ca", "line\n"]:
        assert tool_calls.parse(text) == (text, [])


def test_strip_index_for_non_streamed_messages():
    _, calls = tool_calls.parse(TIME)
    assert "index" not in tool_calls.strip_index(calls[0])


def test_parsing_is_off_without_tools_or_with_tool_choice_none():
    assert not tool_calls.tool_parsing_enabled(None, None)
    assert not tool_calls.tool_parsing_enabled([{"type": "function"}], "none")
    assert tool_calls.tool_parsing_enabled([{"type": "function"}], "auto")
    assert tool_calls.tool_parsing_enabled([{"type": "function"}], None)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["Sure.\n" + WEATHER + TIME, WEATHER, "no calls here\n", "x <tool_call>{bad}</tool_call>\n" + TIME,
                        'a\n<tool_call>{"name": "f"']),
       st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_streamed_deltas_add_up_to_the_whole_parse(text, cuts):
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    stream = tool_calls.ToolCallStream()
    content, calls = "", []
    for piece in pieces:
        c, new = stream.feed(piece)
        content += c
        calls += new
    content += stream.finish()
    whole_content, whole_calls = tool_calls.parse(text)
    assert content == whole_content
    strip = [(c["index"], c["function"]) for c in calls]
    assert strip == [(c["index"], c["function"]) for c in whole_calls]
