"""ERNIE 4.5 tokenizer: SentencePiece / tokenizer.json backends, chat templates, streaming detokenization and
reasoning/answer splitting."""

from .chat_template import (
    BUILTIN_ERNIE45_CHAT_TEMPLATE,
    BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE,
    render_chat_template,
)
from .detokenizer import IncrementalDetokenizer
from .reasoning import ReasoningParser, ReasoningStream
from .tokenizer import ErnieTokenizer, load_tokenizer

__all__ = [
    "BUILTIN_ERNIE45_CHAT_TEMPLATE",
    "BUILTIN_ERNIE45_THINKING_CHAT_TEMPLATE",
    "ErnieTokenizer",
    "IncrementalDetokenizer",
    "ReasoningParser",
    "ReasoningStream",
    "load_tokenizer",
    "render_chat_template",
]
