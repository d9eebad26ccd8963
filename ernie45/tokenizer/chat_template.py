"""Rendering chat templates the way transformers does, plus ERNIE 4.5's released templates as fallbacks.

The released templates are data and are kept byte for byte in `templates/`:
- `ernie45_chat.jinja`: ERNIE-4.5-0.3B-PT / 21B-A3B-PT / 300B-A47B-PT (non-thinking text models), as in their
  tokenizer_config.json and in transformers' Ernie 4.5 tokenizer (`DEFAULT_CHAT_TEMPLATE`).
- `ernie45_thinking_chat.jinja`: ERNIE-4.5-21B-A3B-Thinking (hub revision 960d37ea, chat_template.jinja).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

_TEMPLATE_DIR = Path(__file__).parent / "templates"


def _read_template(name: str) -> str:
    # The released templates end without a newline, and a trailing newline after `}}` would be rendered, so an
    # editor adding one must not change the prompt.
    return (_TEMPLATE_DIR / name).read_text(encoding="utf-8").removesuffix("\n")


BUILTIN_ERNIE45_CHAT_TEMPLATE = _read_template("ernie45_chat.jinja")
"""`<|begin_of_sentence|>{system}\\nUser: {u}\\nAssistant: {a}<|end_of_sentence|>User: {u}\\nAssistant: `."""

BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE = _read_template("ernie45_thinking_chat.jinja")
"""ChatML-style `<|im_start|>` turns; always ends in `<|im_start|>assistant\\n<think>\\n` (no switch to turn
thinking off: FastDeploy documents that this model does not support disabling it)."""

KNOWN_ROLES = ("system", "user", "assistant", "tool")

# Other names a message's reasoning arrives under; transformers copies them to `reasoning_content` and `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` markers (they only track assistant spans)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, as transformers' sandbox does (no reach into internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in the same sandbox and with the same helpers transformers provides."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def _is_text_part(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _flatten_content(content: Any, index: int, role: str) -> Any:
    if isinstance(content, str):
        return content
    if role == "tool" and not (isinstance(content, list) and content and all(map(_is_text_part, content))):
        # A tool result may be any JSON value; the thinking template writes it with `tojson`.
        return content
    if not isinstance(content, Sequence):
        raise ValueError(f"messages[{index}]: field 'content' must be a string or a list of parts, got {content!r}")
    texts = []
    for part_index, part in enumerate(content):
        if _is_text_part(part):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(
                f"messages[{index}]: field 'content[{part_index}]' is a {kind!r} part; this tokenizer renders text "
                "only, so each part must be {'type': 'text', 'text': str}"
            )
    # Text parts are joined with newlines, as vLLM does for OpenAI-style content lists.
    return "\n".join(texts)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate chat messages and bring them to the plain form the released templates expect.

    Keys whose value is None are dropped (as transformers does), list content is flattened to its text, and
    reasoning given as `reasoning_content`/`thinking`/`reasoning` is copied under all three names.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}]: expected a dict with 'role' and 'content', got {message!r}")
        message = {key: value for key, value in message.items() if value is not None}
        role = message.get("role")
        if role not in KNOWN_ROLES:
            raise ValueError(f"messages[{index}]: field 'role' is {role!r}; expected one of {', '.join(KNOWN_ROLES)}")
        if "content" in message:
            message["content"] = _flatten_content(message["content"], index, role)
        elif not (role == "assistant" and message.get("tool_calls")):
            # Only an assistant turn that just calls tools may come without text.
            raise ValueError(f"messages[{index}]: field 'content' is missing for a {role!r} message")
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        normalized.append(message)
    return normalized


def render_chat_template(
    template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, **kwargs: Any
) -> str:
    """Render `messages` with a Jinja chat template, as `transformers` `apply_chat_template(tokenize=False)` does.

    `kwargs` become template variables: special tokens (`bos_token`, `cls_token`, ...), `tools`, `documents`,
    `enable_thinking`, `system_settings`, ... Errors a template raises on purpose surface as
    `jinja2.exceptions.TemplateError`.
    """
    context = {"tools": None, "documents": None, **kwargs}
    return compile_chat_template(template).render(
        messages=normalize_messages(messages), add_generation_prompt=add_generation_prompt, **context
    )
