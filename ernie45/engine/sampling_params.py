"""`SamplingParams`: how one request samples and when it stops, with vLLM's fields, defaults and limits.

Values are checked once here, at admission, so the sampler and the stop checker can trust them; every error names
the field and the allowed range so that an API server can return it to the client as is.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass
from typing import Any

from .structured_output.params import StructuredOutputsParams

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing by them would only overflow the logits.
_SAMPLING_EPS = 1e-5
# vLLM's default max_logprobs and OpenAI's limit on top_logprobs.
MAX_LOGPROBS = 20
# OpenAI's range for logit_bias values; +-100 already amounts to forcing or banning a token.
MAX_LOGIT_BIAS = 100.0
# OpenAI's range for presence_penalty and frequency_penalty.
MAX_PENALTY = 2.0


def _type_name(value: Any) -> str:
    return type(value).__name__


def _as_int(name: str, value: Any, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    # bool is an int subclass, but `n=True` is a caller's mistake, not a count.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        wanted = "an integer or None" if optional else "an integer"
        raise ValueError(f"{name} must be {wanted}, got {_type_name(value)} {value!r}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_type_name(value)} {value!r}")
    return float(value)


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {_type_name(value)} {value!r}")
    return value


def _fmt(value: float) -> str:
    """Print whole numbers without a trailing `.0`, so the message echoes what the user wrote (`got -1`)."""
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass
class SamplingParams:
    """Sampling and stopping settings of one request (vLLM's `SamplingParams`, OpenAI's semantics)."""

    n: int = 1
    """Number of sequences generated for the prompt."""
    temperature: float = 1.0
    """Logits are divided by it before sampling; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Sample from the smallest set of most likely tokens whose probability mass reaches top_p, in (0, 1]."""
    top_k: int = 0
    """Sample from the k most likely tokens; 0 or -1 turns it off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's, in [0, 1]."""
    repetition_penalty: float = 1.0
    """HF/CTRL penalty on tokens of the prompt and the output: positive logits divided by it, negative multiplied."""
    presence_penalty: float = 0.0
    """OpenAI: subtracted once from the logit of every token already in the output, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI: subtracted from a token's logit once per occurrence in the output, in [-2, 2]."""
    logit_bias: dict[int, float] | None = None
    """Token id -> value added to its logit before anything else, values in [-100, 100]."""
    seed: int | None = None
    """Seed of the request's own random generator: same seed and logits, same tokens, whatever the batch."""
    stop: str | list[str] | None = None
    """Strings that end the generation; not part of the output text. Normalised to a list."""
    stop_token_ids: list[int] | None = None
    """Token ids that end the generation besides eos; their text is not output. Normalised to a list."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string (or stop token text) at the end of the output text."""
    ignore_eos: bool = False
    """Keep generating after eos (benchmarks): eos is then an ordinary token."""
    max_tokens: int | None = 16
    """Most tokens generated per sequence; None leaves only the model's context length as the limit."""
    min_tokens: int = 0
    """Fewest tokens generated before eos, stop_token_ids or stop strings may end the sequence."""
    logprobs: int | None = None
    """Return the chosen token's logprob plus this many top alternatives per step (0: the chosen one only)."""
    prompt_logprobs: int | None = None
    """Return each prompt token's logprob plus this many top alternatives per position."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the output text."""
    reasoning_max_tokens: int | None = None
    """Thinking budget: after this many tokens inside <think>, the engine forces the block closed."""
    structured_outputs: StructuredOutputsParams | dict | None = None
    """A constraint on the output (JSON schema, regex, choice, grammar, ...); a dict is read as its fields."""

    def __post_init__(self) -> None:
        self.n = _as_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

        self.temperature = _as_float("temperature", self.temperature)
        if not self.temperature >= 0:  # written this way so that NaN fails too
            raise ValueError(f"temperature must be >= 0, got {_fmt(self.temperature)}")
        self.top_p = _as_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {_fmt(self.top_p)}")
        self.top_k = _as_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}")
        self.min_p = _as_float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {_fmt(self.min_p)}")

        self.repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {_fmt(self.repetition_penalty)}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _as_float(name, getattr(self, name))
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-2, 2], got {_fmt(value)}")
            setattr(self, name, value)
        self.logit_bias = self._checked_logit_bias(self.logit_bias)

        self.seed = _as_int("seed", self.seed, optional=True)
        self.stop = self._checked_stop(self.stop)
        self.stop_token_ids = self._checked_token_ids("stop_token_ids", self.stop_token_ids)
        self.include_stop_str_in_output = _as_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        self.ignore_eos = _as_bool("ignore_eos", self.ignore_eos)
        self.skip_special_tokens = _as_bool("skip_special_tokens", self.skip_special_tokens)

        self.max_tokens = _as_int("max_tokens", self.max_tokens, optional=True)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.min_tokens = _as_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} and max_tokens={self.max_tokens}"
            )

        for name in ("logprobs", "prompt_logprobs"):
            value = _as_int(name, getattr(self, name), optional=True)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
            setattr(self, name, value)

        self.reasoning_max_tokens = _as_int("reasoning_max_tokens", self.reasoning_max_tokens, optional=True)
        if self.reasoning_max_tokens is not None:
            if self.reasoning_max_tokens < 0:
                raise ValueError(f"reasoning_max_tokens must be >= 0, got {self.reasoning_max_tokens}")
            if self.max_tokens is not None and self.reasoning_max_tokens > self.max_tokens:
                # A budget the output can never reach is almost always a forgotten max_tokens (default 16).
                raise ValueError(
                    f"reasoning_max_tokens must be <= max_tokens, got reasoning_max_tokens="
                    f"{self.reasoning_max_tokens} and max_tokens={self.max_tokens}"
                )

        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)

    @staticmethod
    def _checked_logit_bias(bias: Any) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a mapping of token id to bias, got {_type_name(bias)}")
        checked: dict[int, float] = {}
        for key, value in bias.items():
            # JSON object keys are strings, so OpenAI clients send {"50256": -100}.
            token_id = int(key) if isinstance(key, str) and key.strip().isdigit() else key
            if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral) or token_id < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"logit_bias values must be numbers, got {_type_name(value)} {value!r} for {key!r}")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {_fmt(value)} for token {token_id}")
            checked[int(token_id)] = float(value)
        return checked

    @staticmethod
    def _checked_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        if any(s == "" for s in stops):
            raise ValueError("stop must not contain an empty string (it would match before any text)")
        return list(dict.fromkeys(stops))

    @staticmethod
    def _checked_token_ids(name: str, ids: Any) -> list[int]:
        if ids is None:
            return []
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple, set, frozenset)):
            raise ValueError(f"{name} must be a list of token ids, got {_type_name(ids)}")
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral) or token_id < 0:
                raise ValueError(f"{name} must hold token ids (integers >= 0), got {token_id!r}")
        return [int(i) for i in ids]

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax of the (penalised) logits: temperature 0."""
        return self.temperature < _SAMPLING_EPS

    def clone(self) -> SamplingParams:
        """A deep copy, so that changing one request's lists or logit_bias never touches another's."""
        return copy.deepcopy(self)

    def verify_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError if logit_bias or stop_token_ids name ids outside a vocabulary of `vocab_size`.

        Separate from `__post_init__` because the vocabulary is only known once a model is loaded.
        """
        for token_id in self.logit_bias or {}:
            if token_id >= vocab_size:
                raise ValueError(f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab_size})")
        for token_id in self.stop_token_ids or []:
            if token_id >= vocab_size:
                raise ValueError(f"stop_token_ids entry {token_id} is outside the vocabulary [0, {vocab_size})")
