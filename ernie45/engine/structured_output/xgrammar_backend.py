"""The xgrammar backend: ERNIE's SentencePiece vocabulary as xgrammar's TokenizerInfo, grammars compiled once per
constraint (an LRU keyed by `StructuredOutputsParams.cache_key`), one GrammarMatcher per sequence.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict

import torch

from .backend import GrammarBackend, RequestGrammar
from .params import StructuredOutputsParams

# Between two JSON tokens, at most this many whitespace characters: a newline plus the indent of depth 4 at 2
# spaces or depth 2 at 4 (deeper pretty-printing is folded, still valid JSON). Without a bound, a weak or uncertain
# model can spend max_tokens on whitespace, the known failure of an any-whitespace grammar; disable_any_whitespace
# removes optional whitespace altogether.
MAX_JSON_WHITESPACE = 10
# Compiled grammars kept (a typical schema's grammar is tens of KB with its token-mask cache).
GRAMMAR_CACHE_SIZE = 256

_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
# xgrammar 0.2.9's JSON string characters, as it prints them, and what JSON allows unescaped instead. Bounded
# strings (minLength / maxLength) admit raw control characters (U+0000-U+001F, tab included) and every string
# admits UTF-8-encoded surrogates (ED A0..BF xx): invalid JSON / invalid UTF-8 that parsers reject (the output shows
# U+FFFD). Escapes stay out of bounded strings: stricter, still valid.
_JSON_STRING_CHARS = '[^\\"\\\\\\0-\\x1f\\uD800-\\uDFFF]'
_STRING_CHAR_FIXES = {
    '[^\\"\\\\\\r\\n]': _JSON_STRING_CHARS,
    '[^\\0-\\x1f\\"\\\\\\r\\n]': _JSON_STRING_CHARS,
}


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise RuntimeError("structured output needs xgrammar: pip install xgrammar -c <(echo torch==2.13.0) "
                           "(or the `serve` extra)") from None
    return xgrammar


def _field(params: StructuredOutputsParams) -> str:
    return params.kind


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string literals are valid EBNF string literals (same escapes), so any choice text is quoted exactly.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _json_safe(grammar):
    """The grammar with xgrammar's JSON string character classes fixed (see _STRING_CHAR_FIXES)."""
    text = fixed = str(grammar)
    for wrong, right in _STRING_CHAR_FIXES.items():
        fixed = fixed.replace(wrong, right)
    return grammar if fixed == text else _xgrammar().Grammar.from_ebnf(fixed)


def _grammar(params: StructuredOutputsParams):
    """The tokenizer-free xgrammar.Grammar of a constraint."""
    grammar = _unchecked_grammar(params)
    return _json_safe(grammar) if params.kind in ("json", "json_object", "structural_tag") else grammar


def _unchecked_grammar(params: StructuredOutputsParams):
    xgr = _xgrammar()
    if params.kind == "json":
        return xgr.Grammar.from_json_schema(
            json.dumps(params.json), any_whitespace=not params.disable_any_whitespace,
            max_whitespace_cnt=None if params.disable_any_whitespace else MAX_JSON_WHITESPACE)
    if params.kind == "json_object":
        return xgr.Grammar.from_json_schema(
            '{"type": "object"}', any_whitespace=not params.disable_any_whitespace,
            max_whitespace_cnt=None if params.disable_any_whitespace else MAX_JSON_WHITESPACE)
    if params.kind == "regex":
        return xgr.Grammar.from_regex(params.regex)
    if params.kind == "choice":
        return xgr.Grammar.from_ebnf(_choice_ebnf(params.choice))
    if params.kind == "grammar":
        return xgr.Grammar.from_ebnf(params.grammar)
    return xgr.Grammar.from_structural_tag(json.dumps(params.structural_tag))


def _clean(exc: Exception) -> str:
    return _CPP_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def encoded_vocab(tokenizer) -> tuple[list[str], str, bool]:
    """(token strings by id, xgrammar vocab type name, add_prefix_space) of an ErnieTokenizer.

    Special tokens get "" so that xgrammar treats them as special (never allowed by a grammar, stop tokens
    excepted): their text is dropped from the output, so letting a grammar count it as text would desync the two.
    """
    special = set(tokenizer.all_special_ids)
    tokens = [("" if i in special else tokenizer.convert_ids_to_tokens(i)) for i in range(len(tokenizer))]
    vocab = set(tokens)
    sentencepiece = any(t.startswith("\u2581") for t in tokens)
    if "<0x0A>" in vocab:
        vocab_type = "BYTE_FALLBACK"
    elif not sentencepiece and any(t.startswith("\u0120") for t in tokens):
        vocab_type = "BYTE_LEVEL"
    else:
        vocab_type = "RAW"
    return tokens, vocab_type, sentencepiece


class XgrammarRequestGrammar(RequestGrammar):
    def __init__(self, matcher):
        self.matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    def fill_bitmask(self, bitmask_SW: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask_SW, row)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XgrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_threads: int = 2):
        xgr = _xgrammar()
        tokens, vocab_type, prefix_space = encoded_vocab(tokenizer)
        # vocab_size is the model's (its head may be wider than the tokenizer): ids past the tokenizer are special.
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo(tokens, getattr(xgr.VocabType, vocab_type), vocab_size=vocab_size,
                                      stop_token_ids=sorted(stop_token_ids), add_prefix_space=prefix_space)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()  # compiles may come from the engine thread and a warm-up thread
        self.num_compiles = 0
        self.num_cache_hits = 0
        self.compile_seconds = 0.0

    @classmethod
    def validate(cls, params: StructuredOutputsParams) -> None:
        try:
            _grammar(params)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"{_field(params)} does not compile to a grammar: {_clean(exc)}") from None

    def compiled(self, params: StructuredOutputsParams):
        key = params.cache_key
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return compiled
            start = time.perf_counter()
            try:
                compiled = self.compiler.compile_grammar(_grammar(params))
            except (RuntimeError, ValueError, TypeError) as exc:
                raise ValueError(f"{_field(params)} does not compile to a grammar: {_clean(exc)}") from None
            self.compile_seconds += time.perf_counter() - start
            self.num_compiles += 1
            self._cache[key] = compiled
            if len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
            return compiled

    def grammar_for(self, params: StructuredOutputsParams) -> RequestGrammar:
        return XgrammarRequestGrammar(_xgrammar().GrammarMatcher(self.compiled(params)))

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        return _xgrammar().allocate_token_bitmask(num_rows, self.vocab_size)

    def stats(self) -> dict[str, float | int]:
        return {"grammar_compiles": self.num_compiles, "grammar_cache_hits": self.num_cache_hits,
                "grammar_compile_seconds": self.compile_seconds}
