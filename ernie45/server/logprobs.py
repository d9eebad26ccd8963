"""Engine logprobs in OpenAI's two shapes: chat (`content: [{token, logprob, bytes, top_logprobs}]`) and the legacy
completions one (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# JSON has no -inf; OpenAI-compatible servers (vLLM) send this floor instead.
_LOGPROB_FLOOR = -9999.0


def _value(logprob: float) -> float:
    return max(float(logprob), _LOGPROB_FLOOR)


def _top(entry) -> list[tuple[int, float]]:
    # Generated tokens carry `top`, prompt tokens (sampler.TokenLogprob) `top_logprobs`.
    top = getattr(entry, "top", None)
    if top is None:
        top = getattr(entry, "top_logprobs", None)
    return list(top or [])


def chat_logprobs(entries: Sequence, token_text: Callable[[int], str]) -> list[dict[str, Any]]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode("utf-8"))}

    return [
        {**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in _top(e)]}
        for e in entries
    ]


def legacy_logprobs(tokens: Sequence[tuple[int, Any]], token_text: Callable[[int], str],
                    offset: int = 0) -> tuple[dict[str, list], int]:
    """`tokens`: (token id, engine logprob entry or None for the first prompt token). Returns the dict and the
    text offset after the last token (offsets count characters of the choice's `text`)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in tokens:
        text = token_text(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_value(entry.logprob))
        top = {text: _value(entry.logprob)}
        for alt_id, alt_logprob in _top(entry):
            top.setdefault(token_text(alt_id), _value(alt_logprob))
        out["top_logprobs"].append(top)
    return out, offset
