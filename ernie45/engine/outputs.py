"""What the engine returns, in vLLM's shape: RequestOutput with one CompletionOutput per sample (`n`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """A token's log-probability, its rank-ordered alternatives, as vLLM's `logprobs` entries."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None = None


@dataclass
class CompletionOutput:
    """One generated sequence."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float | None = None
    reasoning_content: str | None = None
    """Set by `LLM.chat` when the output had a thinking part (then `text` holds the answer only)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's life, and cache/queue facts."""

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    num_draft_tokens: int = 0
    """Speculative draft tokens verified for the request's sequences."""
    num_accepted_tokens: int = 0
    """Of those, the ones accepted."""

    @property
    def spec_acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list | None = None
    new_text: list[str] = field(default_factory=list)
    """Per output index: the text produced by the last step (for streaming)."""
