"""`StopChecker`: one sequence's output text and the decision to stop, fed one sampled token at a time.

Stop strings can span several tokens, and a streamed delta cannot be taken back, so the checker holds back the
longest tail of the not-yet-emitted text that could still grow into a stop string (vLLM / TGI). Text therefore
leaves the checker only once it is known not to be part of a stop string; when one completes, the text before it
is emitted (plus the stop string with include_stop_str_in_output) and everything after it is dropped.

Semantics follow vLLM: stop checks (eos, stop_token_ids, stop strings) are skipped while fewer than min_tokens
tokens were generated; eos ends the sequence unless ignore_eos and gives stop_reason None; a stop token id or a stop
string gives itself as stop_reason; a stop token's own text is emitted only with include_stop_str_in_output;
max_tokens ends the sequence with "length" when no stop condition fired on the same token.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ..tokenizer import IncrementalDetokenizer
from .sampling_params import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


class StopChecker:
    """Detokenizes one sequence's tokens and decides when it ends (eos, stop ids, stop strings, max_tokens)."""

    def __init__(self, params: SamplingParams, tokenizer: Any, eos_token_ids: Collection[int] = ()):
        self.params = params
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self._stop_token_ids = frozenset(params.stop_token_ids or ())
        self._stops: list[str] = list(params.stop or [])
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self._output_token_ids: list[int] = []
        self._text = ""
        # Decoded but not yet emitted: the longest tail of the text that is a prefix of some stop string.
        self._held = ""
        self._finish_reason: str | None = None
        self._stop_reason: int | str | None = None

    # -------------------------------------------------------------------------------------------- state

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the deltas `append` returned)."""
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        """Every token appended, the stop token included."""
        return list(self._output_token_ids)

    @property
    def finish_reason(self) -> str | None:
        """"stop", "length", or None while the sequence runs."""
        return self._finish_reason

    @property
    def stop_reason(self) -> int | str | None:
        """The stop string or stop token id that ended the sequence; None for eos, length, or while running."""
        return self._stop_reason

    @property
    def finished(self) -> bool:
        return self._finish_reason is not None

    # -------------------------------------------------------------------------------------------- feeding

    def append(self, token_id: int) -> tuple[str, str | None]:
        """Add the sequence's next token; return (text to emit now, finish_reason or None)."""
        if self.finished:
            raise RuntimeError(f"append() after the sequence finished ({self._finish_reason}); start a new checker")
        token_id = int(token_id)
        params = self.params
        self._output_token_ids.append(token_id)
        may_stop = len(self._output_token_ids) >= params.min_tokens

        is_eos = token_id in self.eos_token_ids and not params.ignore_eos
        if may_stop and (is_eos or token_id in self._stop_token_ids):
            text = self._detokenizer.push(token_id) if params.include_stop_str_in_output else ""
            return self._finish(FINISH_STOP, None if is_eos else token_id, text, may_stop)

        delta = self._release(self._detokenizer.push(token_id), final=False, may_stop=may_stop)
        if self.finished:  # a stop string completed
            return delta, self._finish_reason
        if params.max_tokens is not None and len(self._output_token_ids) >= params.max_tokens:
            delta2, reason = self._finish(FINISH_LENGTH, None, "", may_stop)
            return delta + delta2, reason
        return delta, None

    def flush(self) -> str:
        """Emit everything held back (the caller ends the sequence for its own reason, e.g. the context length)."""
        return self._release(self._detokenizer.flush(), final=True, may_stop=self._may_stop())

    def finish(self, reason: str = FINISH_LENGTH) -> str:
        """End the sequence from outside (context length, abort) with `reason`; return the text still held."""
        if self.finished:
            return ""
        text, _ = self._finish(reason, None, "", self._may_stop())
        return text

    # -------------------------------------------------------------------------------------------- internals

    def _may_stop(self) -> bool:
        return len(self._output_token_ids) >= self.params.min_tokens

    def _finish(self, reason: str, stop_reason: int | str | None, text: str, may_stop: bool) -> tuple[str, str]:
        # Whatever was held back was only a possible start of a stop string; at the end it is plain text, unless
        # the last flushed characters complete one after all (then _release records that stop string).
        delta = self._release(text + self._detokenizer.flush(), final=True, may_stop=may_stop)
        if not self.finished:
            self._finish_reason, self._stop_reason = reason, stop_reason
        return delta, self._finish_reason

    def _release(self, new_text: str, final: bool, may_stop: bool) -> str:
        """Add decoded text; return the part that can be emitted, recording a stop string if one completed."""
        pending = self._held + new_text
        self._held = ""
        if may_stop and self._stops:
            match = self._find_stop(pending)
            if match is not None:
                start, stop = match
                end = start + len(stop) if self.params.include_stop_str_in_output else start
                self._finish_reason, self._stop_reason = FINISH_STOP, stop
                return self._emit(pending[:end])
            if not final:
                hold = self._held_back_length(pending)
                self._held = pending[len(pending) - hold :]
                pending = pending[: len(pending) - hold]
        return self._emit(pending)

    def _emit(self, text: str) -> str:
        self._text += text
        return text

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The earliest stop string in `text` (the longest one when several start at the same place)."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start < 0:
                continue
            if best is None or start < best[0] or (start == best[0] and len(stop) > len(best[1])):
                best = (start, stop)
        return best

    def _held_back_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = min(len(text), max(len(s) for s in self._stops) - 1)
        for length in range(longest, 0, -1):
            tail = text[len(text) - length :]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
