"""One sequence being generated: its tokens, how many of them have KV computed, and its sampling state.

Scheduling is token-based (vLLM v1): a request needs `num_tokens` tokens computed and has `num_computed_tokens`;
prefill chunks, decode steps and recomputation after preemption are all "compute the next few tokens".
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .multimodal import MultimodalInputs
from .sampling_params import SamplingParams
from .stop_checker import StopChecker
from .structured_output.backend import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass
class Request:
    """A single sequence (an `n > 1` request is fanned out into n of these sharing the prompt's cached blocks)."""

    request_id: str
    """Unique id of this sequence."""
    group_id: str
    """Id of the user request it belongs to (differs from request_id when n > 1)."""
    prompt_token_ids: list[int]
    """The prompt's token ids."""
    params: SamplingParams
    """How to sample."""
    stop_checker: StopChecker
    """Detokenizes outputs and decides when to stop."""
    generator: torch.Generator | None = None
    """Per-request RNG when `params.seed` is set (same seed, same output, whatever the batch)."""
    arrival_time: float = field(default_factory=time.time)
    """Wall-clock time the request was added."""
    extra_keys: tuple = ()
    """Mixed into prefix-cache block hashes (e.g. image content for multimodal prompts)."""
    in_reasoning: bool = False
    """The prompt left a thinking block open and the model has not closed it yet."""
    think_end_token_ids: tuple[int, ...] = ()
    """Token ids that close a thinking block (`</think>`)."""
    forced_token_ids: list[int] = field(default_factory=list)
    """Tokens the engine forces next (closing the thinking block when the budget is spent)."""
    prefix_parent: Request | None = None
    """For samples 2..n of a request: wait until sample 1 has computed (and cached) the shared prompt."""
    mm: MultimodalInputs | None = None
    """A VL prompt's images / videos (shared by the n samples: encoded once, on their first prefill chunk)."""
    grammar: RequestGrammar | None = None
    """The sequence's place in its structured-output grammar (None: unconstrained)."""
    spec_token_ids: list[int] = field(default_factory=list)
    """Draft tokens proposed after the last step, for the next step to verify (speculative decoding)."""

    status: RequestStatus = RequestStatus.WAITING
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_reasoning_tokens: int = 0
    num_preemptions: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    cumulative_logprob: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.finished else None
