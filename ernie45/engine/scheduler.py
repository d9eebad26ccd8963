"""Token-budget scheduler (vLLM v1 style): each step fills one budget of tokens with the running requests'
next tokens (decode steps and remaining prefill chunks), then admits waiting requests FCFS.

When KV blocks run out, the newest running request is preempted: its blocks are freed and it goes back to the
front of the waiting queue to be recomputed later (its prompt and outputs so far; prefix caching usually makes
that cheap). A request that could never fit is refused when added, so preemption always makes progress.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """What one engine step computes: (request, number of new tokens) in batch order."""

    requests: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_spec: dict[str, int] = field(default_factory=dict)
    """request id -> how many of its draft tokens this step verifies (the last ones of its new tokens)."""

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.requests)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_prefix_caching: bool = True,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[str] = set()

        # 1. Running requests first, oldest first: they hold KV already.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            # A decoding request verifies its drafts in the same forward: they are scheduled like any tokens.
            num_spec = min(len(request.spec_token_ids), budget - 1) if num_new == 1 else 0
            num_new += num_spec
            while not self.block_manager.allocate_slots(request.request_id, request.num_computed_tokens + num_new):
                victim = self.running.pop()  # the newest running request
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is request:
                    break
            else:
                batch.requests.append((request, num_new))
                if num_spec:
                    batch.num_spec[request.request_id] = num_spec
                scheduled_ids.add(request.request_id)
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted: nothing after it is left running

        # A preemption means memory is short: admit nobody new this step.
        if batch.preempted:
            return batch

        # 2. Waiting requests, FCFS, while the budget and the sequence limit allow.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            parent = request.prefix_parent
            if parent is not None and not parent.finished and parent.num_computed_tokens < parent.num_prompt_tokens:
                break  # admitted once its sibling's prompt blocks are cached, so it shares them
            computed_blocks, num_hit = [], 0
            if self.enable_prefix_caching:
                computed_blocks, num_hit = self.block_manager.get_computed_blocks(
                    request.token_ids, request.extra_keys, record_stats=False
                )
            num_new = min(request.num_tokens - num_hit, budget)
            if not self.block_manager.allocate_slots(request.request_id, num_hit + num_new, computed_blocks):
                break  # not enough blocks: wait for running requests to finish
            self.waiting.popleft()
            if self.enable_prefix_caching:
                self.block_manager.record_prefix_lookup(request.num_tokens, num_hit)
            request.num_computed_tokens = num_hit
            request.num_cached_tokens = max(request.num_cached_tokens, num_hit)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.requests.append((request, num_new))
            budget -= num_new
        return batch

    def update_from_output(
        self,
        batch: ScheduledBatch,
        sampled_token_ids: list[list[int]],
        on_token: Callable[[Request, int], RequestStatus | None],
        num_rejected: list[int] | None = None,
    ) -> list[Request]:
        """After the model ran `batch`: advance each request's computed tokens by its new tokens less its
        `num_rejected[i]` rejected drafts (their KV is garbage, overwritten later), append `sampled_token_ids[i]`
        (the tokens row i of the batch sampled, accepted drafts first; empty when it did not sample) one at a time,
        and register its newly full blocks in the prefix cache (verified tokens only, so a cached block never holds
        unverified KV). `on_token(request, token)` sees each appended token and returns a finished status when it
        ends the sequence; later tokens of that row are dropped. Returns the requests that received tokens."""
        progressed = []
        for i, ((request, num_new), tokens) in enumerate(zip(batch.requests, sampled_token_ids, strict=True)):
            request.spec_token_ids = []  # verified (or not) by this step: the next step gets fresh drafts
            if request.finished:  # aborted while the step ran
                continue
            request.num_computed_tokens += num_new - (num_rejected[i] if num_rejected else 0)
            status = None
            if tokens:
                progressed.append(request)
            for token in tokens:
                request.token_ids.append(token)
                status = on_token(request, token)
                if status is not None:
                    break
            if self.enable_prefix_caching:
                # A stop inside accepted drafts drops the tokens after it: only what token_ids holds is cached.
                computed = min(request.num_computed_tokens, request.num_tokens)
                self.block_manager.cache_full_blocks(request.request_id, request.token_ids, computed,
                                                     request.extra_keys)
            if status is not None:
                self.finish(request, status)
        return progressed

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished (stopped, length or aborted) and release everything it holds."""
        request.status = status
        self.block_manager.free(request.request_id)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
