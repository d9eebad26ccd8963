"""Chat templates: the released ERNIE 4.5 templates render exactly, and messages are validated."""

import hashlib

import jinja2
import pytest

from ernie45.tokenizer import (
    BUILTIN_ERNIE45_CHAT_TEMPLATE,
    BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE,
    ReasoningParser,
    render_chat_template,
)

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 1+1?"},
]

# A VL-style template (thinking off unless enable_thinking): the released text templates have no such switch.
SWITCHABLE_THINKING_TEMPLATE = (
    '{{- cls_token -}}{%- for m in messages -%}{{- "User: " + m["content"] + "\\n" -}}{%- endfor -%}'
    '{%- if add_generation_prompt -%}{{- "Assistant: " -}}'
    '{%- if enable_thinking is defined and enable_thinking -%}{{- "<think>" -}}'
    '{%- else -%}{{- "<think>\\n\\n</think>\\n\\n" -}}{%- endif -%}{%- endif -%}'
)


def test_builtin_templates_are_the_released_bytes():
    # Guards the data files against edits: these are the released templates, byte for byte.
    assert hashlib.sha256(BUILTIN_ERNIE45_CHAT_TEMPLATE.encode()).hexdigest() == (
        "471fb571976770318fe6f27749e37940be8d29c0a7770558140f141f5906f2a2"
    )
    assert hashlib.sha256(BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE.encode()).hexdigest() == (
        "e141f14fb656c78182da82e2d900e404c021112a7f2df1953db26cab705c06f0"
    )


def test_released_template_system_and_two_turns(tokenizer):
    prompt = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert prompt == (
        "<|begin_of_sentence|>You are a helpful assistant.\n"
        "User: Hi\n"
        "Assistant: Hello! How can I help?<|end_of_sentence|>"
        "User: What is 1+1?\n"
        "Assistant: "
    )
    without_prompt = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert without_prompt == prompt.removesuffix("Assistant: ")


def test_tokenized_prompt_starts_with_cls_not_bos(tokenizer):
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(CONVERSATION))
    assert ids[0] == tokenizer.cls_token_id
    assert tokenizer.bos_token_id not in ids
    assert ids.count(tokenizer.sep_token_id) == 1


def test_thinking_template_system_and_two_turns(tokenizer):
    prompt = tokenizer.apply_chat_template(CONVERSATION, chat_template=BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE)
    assert prompt == (
        "<|im_start|>system\n<system_setting>\nYou are a helpful assistant.\n</system_setting>\n\n"
        "<global_setting>\nthink_mode=True\n</global_setting><|im_end|>\n\n"
        "<|im_start|>user\nHi<|im_end|>\n\n"
        "<|im_start|>assistant\n<response>\nHello! How can I help?\n</response>\n<|im_end|>\n\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert ReasoningParser().prompt_ends_in_reasoning(prompt)


def test_thinking_template_cannot_be_switched_off(tokenizer):
    # The released 21B-A3B-Thinking template always opens the think block (FastDeploy: thinking cannot be
    # disabled for this model), so enable_thinking must not change it.
    messages = [{"role": "user", "content": "Hi"}]
    on = tokenizer.apply_chat_template(messages, chat_template=BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE)
    off = tokenizer.apply_chat_template(
        messages, chat_template=BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE, enable_thinking=False
    )
    assert on == off == (
        "<|im_start|>system\n<global_setting>\nthink_mode=True\n</global_setting><|im_end|>\n\n"
        "<|im_start|>user\nHi<|im_end|>\n\n<|im_start|>assistant\n<think>\n"
    )


def test_enable_thinking_reaches_a_switchable_template(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    parser = ReasoningParser()
    on = tokenizer.apply_chat_template(messages, chat_template=SWITCHABLE_THINKING_TEMPLATE, enable_thinking=True)
    off = tokenizer.apply_chat_template(messages, chat_template=SWITCHABLE_THINKING_TEMPLATE, enable_thinking=False)
    default = tokenizer.apply_chat_template(messages, chat_template=SWITCHABLE_THINKING_TEMPLATE)
    assert on == "<|begin_of_sentence|>User: Hi\nAssistant: <think>"
    assert off == default == "<|begin_of_sentence|>User: Hi\nAssistant: <think>\n\n</think>\n\n"
    assert parser.prompt_ends_in_reasoning(on)
    assert not parser.prompt_ends_in_reasoning(off)
    assert not parser.prompt_ends_in_reasoning(tokenizer.apply_chat_template(messages))


def test_special_tokens_reach_the_template_and_kwargs_override_them(tokenizer):
    template = "{{ bos_token }}|{{ eos_token }}|{{ cls_token }}|{{ sep_token }}|{{ pad_token }}"
    assert tokenizer.apply_chat_template([], chat_template=template) == (
        "<s>|</s>|<|begin_of_sentence|>|<|end_of_sentence|>|<unk>"
    )
    assert tokenizer.apply_chat_template([], chat_template="{{ cls_token }}", cls_token="X") == "X"


def test_content_parts_are_joined():
    messages = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert render_chat_template(BUILTIN_ERNIE45_CHAT_TEMPLATE, messages, add_generation_prompt=True) == (
        "<|begin_of_sentence|>User: one\ntwo\nAssistant: "
    )


def test_unknown_role_is_rejected_with_index_and_field():
    messages = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    with pytest.raises(ValueError, match=r"messages\[1\]: field 'role' is 'robot'"):
        render_chat_template(BUILTIN_ERNIE45_CHAT_TEMPLATE, messages)


def test_missing_content_is_rejected_with_index_and_field():
    with pytest.raises(ValueError, match=r"messages\[0\]: field 'content' is missing"):
        render_chat_template(BUILTIN_ERNIE45_CHAT_TEMPLATE, [{"role": "user"}])
    with pytest.raises(ValueError, match=r"messages\[0\]: field 'content' is missing"):
        render_chat_template(BUILTIN_ERNIE45_CHAT_TEMPLATE, [{"role": "system", "content": None}])


def test_non_text_part_is_rejected_with_index_and_field():
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match=r"messages\[0\]: field 'content\[0\]' is a 'image_url' part"):
        render_chat_template(BUILTIN_ERNIE45_CHAT_TEMPLATE, messages)


def test_tool_round_trip_renders_in_thinking_template():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "晴, 20°C"},
    ]
    prompt = render_chat_template(BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE, messages, add_generation_prompt=True)
    assert prompt.endswith(
        "<|im_start|>assistant\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<|im_end|>\n\n'
        '<|im_start|>tool\n<tool_output>"晴, 20°C"</tool_output><|im_end|>\n\n'
        "<|im_start|>assistant\n<think>\n"
    )


def test_template_helpers_behave_like_transformers():
    assert render_chat_template("{{ x | tojson }}", [], x="<a & 'b'> 中") == "\"<a & 'b'> 中\""
    assert render_chat_template("{{ strftime_now('%Y') | length }}", []) == "4"
    assert render_chat_template("{% generation %}kept{% endgeneration %}", []) == "kept"
    with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{% set ns = namespace(_secret=1) %}", [])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [])
