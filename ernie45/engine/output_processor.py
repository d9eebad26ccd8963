"""Output processing, in one place: a sampled token's logprobs, its text (detokenize + stop strings), the thinking
budget, the end of the sequence, and the `RequestOutput` a step returns for each user request.

The scheduler calls `on_token` for every token it appends (`Scheduler.update_from_output`), so whatever decides
that a sequence ends (eos, stop ids / strings, max_tokens, max_model_len) runs before the next step is scheduled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .request import Request, RequestStatus
from .sampler import prompt_logprobs
from .sampling_params import SamplingParams
from .structured_output import StructuredOutputManager, is_constrained

_THINK_CLOSE_TEXT = "\n</think>\n\n"


@dataclass
class RequestGroup:
    """A user request: its prompt and its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[Request]
    arrival_time: float

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)


class OutputProcessor:
    """Turns sampled tokens into text, stop decisions and RequestOutputs; holds the live request groups."""

    def __init__(self, tokenizer, max_model_len: int):
        self.max_model_len = max_model_len
        self.groups: dict[str, RequestGroup] = {}
        self._sequence_ids: set[str] = set()  # ids of live sequences: user ids and "<id>-<i>" of n > 1 fan-outs
        self._think_start = tokenizer.token_to_id("<think>")
        self._think_end = tokenizer.token_to_id("</think>")
        self._think_close_ids = tokenizer.encode(_THINK_CLOSE_TEXT) if self._think_end is not None else []
        self._new_text: dict[str, str] = {}  # sequence id -> text its tokens of this step produced
        self.num_generation_tokens_total = 0

    # ------------------------------------------------------------------------------------------- groups
    def check_new_ids(self, request_id: str, sequence_ids: list[str]) -> None:
        if request_id in self.groups or self._sequence_ids.intersection(sequence_ids):
            raise ValueError(f"request id {request_id!r} is already in use")

    def add(self, group: RequestGroup) -> None:
        self.groups[group.request_id] = group
        self._sequence_ids.update(seq.request_id for seq in group.sequences)

    def forget(self, request_id: str) -> RequestGroup | None:
        group = self.groups.pop(request_id, None)
        if group is not None:
            self._sequence_ids.difference_update(seq.request_id for seq in group.sequences)
        return group

    def prompt_ends_in_reasoning(self, ids: list[int]) -> bool:
        if self._think_start is None:
            return False
        last_open = max((i for i, t in enumerate(ids) if t == self._think_start), default=-1)
        last_close = max((i for i, t in enumerate(ids) if t == self._think_end), default=-1)
        return last_open > last_close

    # ------------------------------------------------------------------------------------------- tokens
    @staticmethod
    def record_prompt_logprobs(request: Request, logits_TV: torch.Tensor) -> None:
        """Logprobs of the prompt tokens scored by this chunk (recomputation after preemption adds nothing). Call
        before the scheduler advances `num_computed_tokens`."""
        start = request.num_computed_tokens
        if request.prompt_logprobs is None:
            request.prompt_logprobs = [None]
        if len(request.prompt_logprobs) > start + 1:
            return
        chunk = request.prompt_token_ids[start : start + logits_TV.shape[0] + 1]
        request.prompt_logprobs.extend(prompt_logprobs(logits_TV, chunk, request.params.prompt_logprobs)[1:])

    def on_token(self, request: Request, token: int, logprob: float, top_logprobs, now: float) -> RequestStatus | None:
        """The token was appended to `request.token_ids`: record it; returns the finished status if it ends the
        sequence."""
        # Decided before the forced-token and thinking state move on: it must be what the step sampled under.
        grammar_done = False
        if is_constrained(request):
            # A refused token (every token was masked) or a grammar that took its stop token ends the sequence,
            # ignore_eos or not: nothing may follow a complete constrained output.
            grammar_done = not StructuredOutputManager.accept(request, token) or request.grammar.is_terminated()
        if request.forced_token_ids:
            request.forced_token_ids.pop(0)
        self.num_generation_tokens_total += 1
        if request.first_token_time is None:
            request.first_token_time = now
        if request.params.logprobs is not None:
            request.logprobs.append(Logprob(token, logprob, top_logprobs))
        request.cumulative_logprob += logprob
        self._update_thinking_budget(request, token)
        text, finish_reason = request.stop_checker.append(token)
        if finish_reason is None and grammar_done:
            finish_reason = "stop"
            text += request.stop_checker.finish("stop")
        if finish_reason is None and request.num_tokens >= self.max_model_len:
            finish_reason = "length"
            text += request.stop_checker.finish("length")
        self._new_text[request.request_id] = self._new_text.get(request.request_id, "") + text
        if finish_reason is None:
            return None
        request.finish_time = now
        return RequestStatus.FINISHED_LENGTH if finish_reason == "length" else RequestStatus.FINISHED_STOPPED

    def _update_thinking_budget(self, request: Request, token: int) -> None:
        """Once `reasoning_max_tokens` thinking tokens are spent, force the tokens that close the block."""
        if not request.in_reasoning:
            return
        if token == self._think_end:
            request.in_reasoning = False
            return
        request.num_reasoning_tokens += 1
        budget = request.params.reasoning_max_tokens
        if budget is not None and request.num_reasoning_tokens >= budget and not request.forced_token_ids:
            request.forced_token_ids = list(self._think_close_ids)

    # ------------------------------------------------------------------------------------------- outputs
    def step_outputs(self, progressed: list[Request]) -> list[RequestOutput]:
        """One output per user request that made progress this step; finished groups are forgotten."""
        outputs = []
        for group_id in dict.fromkeys(r.group_id for r in progressed):
            group = self.groups.get(group_id)
            if group is None:
                continue
            outputs.append(self.output(group))
            if group.finished:
                self.forget(group_id)
        self._new_text.clear()
        return outputs

    def output(self, group: RequestGroup) -> RequestOutput:
        completions = []
        for i, seq in enumerate(group.sequences):
            checker = seq.stop_checker
            completions.append(CompletionOutput(
                index=i, text=checker.text, token_ids=seq.output_token_ids, finish_reason=seq.finish_reason,
                stop_reason=getattr(checker, "stop_reason", None),
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
            ))
        first = min((s.first_token_time for s in group.sequences if s.first_token_time), default=None)
        finish = max((s.finish_time or 0 for s in group.sequences), default=0) or None
        metrics = RequestMetrics(arrival_time=group.arrival_time, first_token_time=first,
                                 finish_time=finish if group.finished else None,
                                 num_cached_tokens=max(s.num_cached_tokens for s in group.sequences),
                                 num_preemptions=sum(s.num_preemptions for s in group.sequences),
                                 num_draft_tokens=sum(s.num_draft_tokens for s in group.sequences),
                                 num_accepted_tokens=sum(s.num_accepted_tokens for s in group.sequences))
        return RequestOutput(
            request_id=group.request_id, prompt=group.prompt, prompt_token_ids=group.prompt_token_ids,
            outputs=completions, finished=group.finished, metrics=metrics,
            prompt_logprobs=group.sequences[0].prompt_logprobs,
            new_text=[self._new_text.get(s.request_id, "") for s in group.sequences],
        )
