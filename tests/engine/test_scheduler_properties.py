"""Scheduler + BlockManager, driven together without a model: a stateful property test (random arrivals, n > 1
groups sharing a prompt, steps with random sampled tokens, aborts, early stops) and deterministic preemption tests.

Each step runs the real `Scheduler.schedule` and `Scheduler.update_from_output` (computed tokens, block caching,
a sampled token when the step computed the request's last known token, finish at max_tokens), and is checked against what the scheduler promises: the batch respects the token budget and the sequence limit, every
scheduled request holds the blocks it is about to write, running requests go first in age order and waiting ones
are admitted FCFS, nobody is turned away while there is room, and memory is accounted exactly (blocks in use are
exactly the running requests' blocks). A simulated KV cache records, for every block slot, which token prefix's KV
was written there, so serving a request stale or foreign KV (a bad prefix hit, a block reused under a live request,
a write into a shared or cached block) fails the test. Liveness: while anything is unfinished every step schedules
something, and running everything to the end terminates with the pool empty.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ernie45.engine.block_manager import BlockManager
from ernie45.engine.request import Request, RequestStatus
from ernie45.engine.sampling_params import SamplingParams
from ernie45.engine.scheduler import Scheduler

TOKENS = st.integers(0, 2)  # a tiny alphabet, so prompts and outputs share prefixes (and prefix-cache hits) often
MAX_DRAIN_STEPS = 5000


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Harness:
    """A Scheduler and its BlockManager plus the engine's request bookkeeping, checking everything as it goes."""

    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int, caching: bool):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.sched = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens, enable_prefix_caching=caching)
        self.caching = caching
        self.capacity = num_blocks * block_size
        self.live: list[Request] = []  # added, not finished
        self.finished: list[Request] = []
        self.num_steps = 0
        self._ids = itertools.count()
        # Simulated KV cache: (block id, slot) -> node of the token prefix whose last token's KV is stored there.
        # Prefixes are interned in a trie ((parent node, token) -> node), so comparing them is O(1).
        self.kv: dict[tuple[int, int], int] = {}
        self._trie: dict[tuple[int, int], int] = {}
        self._nodes: dict[str, list[int]] = {}  # request id -> trie node of token_ids[:p + 1] for each p

    # -- requests ------------------------------------------------------------------------------------------------

    def add(self, prompt: list[int], max_tokens: int, n: int = 1) -> list[Request]:
        # The engine refuses prompts that leave no room for a generated token within max_model_len, and
        # max_model_len never exceeds the pool: a request alone always fits.
        assert 1 <= len(prompt) and len(prompt) + max_tokens <= self.capacity
        group_id = f"g{next(self._ids)}"
        params = SamplingParams(max_tokens=max_tokens)
        seqs: list[Request] = []
        for i in range(n):
            seqs.append(
                Request(
                    request_id=f"{group_id}-{i}",
                    group_id=group_id,
                    prompt_token_ids=list(prompt),
                    params=params,
                    stop_checker=None,  # the scheduler never reads it; stopping is decided below, as the engine does
                    prefix_parent=seqs[0] if seqs and self.caching else None,
                )
            )
        for seq in seqs:
            self.sched.add(seq)
            self.live.append(seq)
        return seqs

    def finish(self, request: Request, status: RequestStatus) -> None:
        self.sched.finish(request, status)
        assert request.status is status and not self.bm.has_request(request.request_id)
        if any(r is request for r in self.live):
            self.live.remove(request)
            self.finished.append(request)

    def _prefix_nodes(self, request: Request) -> list[int]:
        nodes = self._nodes.setdefault(request.request_id, [])
        parent = nodes[-1] if nodes else -1
        for token in request.token_ids[len(nodes) :]:
            key = (parent, token)
            parent = self._trie.setdefault(key, len(self._trie))
            nodes.append(parent)
        return nodes

    def check_kv(self, request: Request, num_tokens: int) -> None:
        """The KV the model would read for the request's first `num_tokens` tokens is that of its own prefix."""
        bs = self.bm.block_size
        table = self.bm.block_table(request.request_id)
        nodes = self._prefix_nodes(request)
        for p in range(num_tokens):
            assert self.kv.get((table[p // bs], p % bs)) == nodes[p], (
                f"{request.request_id} would read wrong KV at position {p} (block {table[p // bs]})"
            )

    # -- one engine step -----------------------------------------------------------------------------------------

    def step(self, next_token) -> None:
        sched, bm = self.sched, self.bm
        bs, budget, max_seqs = bm.block_size, sched.max_num_batched_tokens, sched.max_num_seqs
        unfinished = sched.has_unfinished()
        assert unfinished == bool(self.live)
        running_before, waiting_before = list(sched.running), list(sched.waiting)

        batch = sched.schedule()
        self.num_steps += 1
        scheduled = [r for r, _ in batch.requests]

        # Liveness: something always moves while anything is unfinished.
        if unfinished:
            assert batch.requests, "a step with unfinished requests scheduled nothing (deadlock)"
        else:
            assert not batch.requests and not batch.preempted
        # Budget, sequence limit, no duplicates.
        assert batch.num_tokens <= budget
        assert len(sched.running) <= max_seqs
        assert len({id(r) for r in scheduled}) == len(scheduled)
        for request, n in batch.requests:
            assert n >= 1
            assert request.num_computed_tokens + n <= request.num_tokens
            assert request.status is RequestStatus.RUNNING and any(r is request for r in sched.running)
            assert len(bm.block_table(request.request_id)) * bs >= request.num_computed_tokens + n
        # Preemption: the newest running requests, sent back to the waiting queue with nothing held or computed.
        for victim in batch.preempted:
            assert any(r is victim for r in running_before)
            assert victim.status is RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
            assert not bm.has_request(victim.request_id)
            assert any(r is victim for r in sched.waiting) and not any(r is victim for r in scheduled)
        # Order: running requests first, oldest first; the ones left out are preempted or the budget is spent.
        k = sum(1 for r in scheduled if any(r is x for x in running_before))
        assert all(a is b for a, b in zip(scheduled[:k], running_before[:k]))
        for request in running_before[k:]:
            assert any(v is request for v in batch.preempted) or batch.num_tokens == budget
        assert [id(v) for v in batch.preempted] == [id(r) for r in reversed(running_before)][: len(batch.preempted)]
        # Then waiting requests, FCFS, and none at all after a preemption.
        admitted = scheduled[k:]
        assert all(a is b for a, b in zip(admitted, waiting_before))
        # Preempted requests go back to the front of the queue, oldest first, so they resume before newer arrivals
        # (and a group's first sample stays ahead of the samples waiting for its prompt).
        expected_waiting = [*reversed(batch.preempted), *waiting_before[len(admitted) :]]
        assert [id(r) for r in sched.waiting] == [id(r) for r in expected_waiting]
        if batch.preempted:
            assert not admitted
        for request in admitted:  # samples 2..n of a group start once sample 1's prompt is computed (and cached)
            parent = request.prefix_parent
            assert parent is None or parent.finished or parent.num_computed_tokens >= parent.num_prompt_tokens
        preempted_ids = {id(v) for v in batch.preempted}
        assert [id(r) for r in sched.running] == [id(r) for r in running_before if id(r) not in preempted_ids] + [
            id(r) for r in admitted
        ]
        if not batch.preempted:
            self._check_head_of_line_is_blocked(budget - batch.num_tokens)

        # "Run the model": read the computed prefix's KV, write this step's tokens' KV into private blocks.
        for request, n in batch.requests:
            self.check_kv(request, request.num_computed_tokens)
        for request, n in batch.requests:
            table = bm.block_table(request.request_id)
            nodes = self._prefix_nodes(request)
            for p in range(request.num_computed_tokens, request.num_computed_tokens + n):
                block = bm.blocks[table[p // bs]]
                assert block.ref_count == 1, f"write into block {block.block_id} shared by {block.ref_count} requests"
                assert block.block_hash is None, f"write into block {block.block_id}, registered in the prefix cache"
                self.kv[(block.block_id, p % bs)] = nodes[p]

        # The scheduler's own update: computed tokens, block caching, sampled tokens appended, finishing. A request
        # samples when the step computed its last known token; it ends at max_tokens, as the engine's output
        # processing decides.
        sampled = [[next_token()] if r.num_computed_tokens + n == r.num_tokens else [] for r, n in batch.requests]

        def on_token(request: Request, token: int) -> RequestStatus | None:
            return RequestStatus.FINISHED_LENGTH if request.num_output_tokens >= request.params.max_tokens else None

        progressed = sched.update_from_output(batch, sampled, on_token)
        assert [id(r) for r in progressed] == [id(r) for (r, _), t in zip(batch.requests, sampled) if t]
        for request, n in batch.requests:
            assert request.num_computed_tokens <= request.num_tokens
        for request in progressed:
            if request.finished:
                assert request.status is RequestStatus.FINISHED_LENGTH and not bm.has_request(request.request_id)
                assert not any(r is request for r in sched.running)
                self.live.remove(request)
                self.finished.append(request)

    def _check_head_of_line_is_blocked(self, budget_left: int) -> None:
        """After admission stops, the head of the waiting queue really could not be admitted (work conservation)."""
        sched, bm = self.sched, self.bm
        if not sched.waiting or budget_left <= 0 or len(sched.running) >= sched.max_num_seqs:
            return
        head = sched.waiting[0]
        parent = head.prefix_parent
        if parent is not None and not parent.finished and parent.num_computed_tokens < parent.num_prompt_tokens:
            return
        hits, num_hit = bm.get_computed_blocks(head.token_ids, head.extra_keys, record_stats=False)
        num_new = min(head.num_tokens - num_hit, budget_left)
        needed = (
            cdiv(num_hit + num_new, bm.block_size) - len(hits) + sum(1 for b in hits if bm.blocks[b].ref_count == 0)
        )
        assert needed > bm.num_free_blocks, (
            f"{head.request_id} was left waiting with room for it: needs {needed}, {bm.num_free_blocks} free"
        )

    def drain(self, next_token) -> None:
        while self.sched.has_unfinished():
            assert self.num_steps < MAX_DRAIN_STEPS, "requests never finished (livelock)"
            self.step(next_token)
            self.check()
        assert not self.live and not self.sched.running and not self.sched.waiting
        assert self.bm.num_free_blocks == self.bm.num_blocks

    # -- invariants ----------------------------------------------------------------------------------------------

    def check(self) -> None:
        sched, bm = self.sched, self.bm
        bm.check_invariants()
        running, waiting = list(sched.running), list(sched.waiting)
        assert len({id(r) for r in running}) == len(running)
        assert len({id(r) for r in waiting}) == len(waiting)
        assert not {id(r) for r in running} & {id(r) for r in waiting}, "a request is both running and waiting"
        assert {id(r) for r in running} | {id(r) for r in waiting} == {id(r) for r in self.live}
        assert len(running) <= sched.max_num_seqs
        used: set[int] = set()
        for request in running:
            assert request.status is RequestStatus.RUNNING
            table = bm.block_table(request.request_id)
            assert len(table) == cdiv(request.num_computed_tokens, bm.block_size)
            assert request.num_computed_tokens < request.num_tokens  # a decode step or prefill is always pending
            self.check_kv(request, request.num_computed_tokens)
            used.update(table)
        for request in waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert request.num_computed_tokens == 0, f"waiting {request.request_id} claims computed tokens"
            assert not bm.has_request(request.request_id), f"waiting {request.request_id} holds blocks"
        for request in self.finished:
            assert request.finished and not bm.has_request(request.request_id)
        assert len(used) == bm.num_used_blocks, "blocks in use are not exactly the running requests' blocks"
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        for request in [*self.live, *self.finished]:
            assert request.token_ids[: request.num_prompt_tokens] == request.prompt_token_ids
            assert request.num_output_tokens <= request.params.max_tokens
            if request.status is RequestStatus.FINISHED_LENGTH:
                assert request.num_output_tokens == request.params.max_tokens
            elif not request.finished:
                assert request.num_output_tokens < request.params.max_tokens


# ---------------------------------------------------------------------------------------------------------------
# Stateful property test


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(2, 24),
        block_size=st.integers(1, 8),
        max_num_seqs=st.integers(1, 6),
        max_num_batched_tokens=st.integers(1, 64),
        caching=st.booleans(),
        seed=st.integers(0, 2**32 - 1),
    )
    def setup(self, num_blocks, block_size, max_num_seqs, max_num_batched_tokens, caching, seed) -> None:
        self.h = Harness(num_blocks, block_size, max_num_seqs, max_num_batched_tokens, caching)
        self.rng = random.Random(seed)  # sampled tokens while draining (teardown cannot draw from hypothesis)

    def _draw_request(self, data: st.DataObject) -> tuple[list[int], int]:
        cap = self.h.capacity
        # Lengths drawn uniformly rather than as list sizes (which hypothesis keeps short), so requests often fill
        # much of the pool and preemption is common.
        length = data.draw(st.integers(1, min(40, cap - 1)), label="prompt length")
        prompt = data.draw(st.lists(TOKENS, min_size=length, max_size=length), label="prompt")
        max_tokens = data.draw(st.integers(1, min(16, cap - length)), label="max_tokens")
        return prompt, max_tokens

    @rule(data=st.data())
    def add_request(self, data: st.DataObject) -> None:
        self.h.add(*self._draw_request(data))

    @rule(data=st.data(), n=st.integers(2, 3))
    def add_group(self, data: st.DataObject, n: int) -> None:
        """An n > 1 request: samples 2..n wait for sample 1's prompt blocks (with prefix caching on)."""
        self.h.add(*self._draw_request(data), n=n)

    @rule(data=st.data(), num_steps=st.integers(1, 6))
    def step(self, data: st.DataObject, num_steps: int) -> None:
        for _ in range(num_steps):
            self.h.step(lambda: data.draw(TOKENS, label="sampled"))
            self.h.check()

    @precondition(lambda self: self.h.live)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.h.live))
        self.h.finish(request, RequestStatus.FINISHED_ABORTED)

    @rule()
    def abort_unknown(self) -> None:
        stranger = Request(
            request_id="unknown", group_id="unknown", prompt_token_ids=[0], params=SamplingParams(), stop_checker=None
        )
        self.h.finish(stranger, RequestStatus.FINISHED_ABORTED)

    @precondition(lambda self: self.h.sched.running)
    @rule(data=st.data())
    def stop_early(self, data: st.DataObject) -> None:
        """A stop string or eos ends a running request before max_tokens."""
        request = data.draw(st.sampled_from(list(self.h.sched.running)))
        self.h.finish(request, RequestStatus.FINISHED_STOPPED)

    @rule()
    def drain(self) -> None:
        self.h.drain(lambda: self.rng.randrange(3))

    @invariant()
    def consistent(self) -> None:
        self.h.check()

    def teardown(self) -> None:
        if not hasattr(self, "h"):
            return
        self.h.drain(lambda: self.rng.randrange(3))
        event(f"preempted: {self.h.sched.num_preemptions > 0}")


SchedulerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSchedulerStateful = SchedulerMachine.TestCase


# ---------------------------------------------------------------------------------------------------------------
# Deterministic tests


@pytest.mark.parametrize("caching", [True, False])
def test_tiny_pool_preempts_and_still_completes_every_request(caching: bool):
    h = Harness(num_blocks=4, block_size=2, max_num_seqs=4, max_num_batched_tokens=8, caching=caching)
    requests = [h.add([i % 3, 1, 2], max_tokens=5)[0] for i in range(4)]  # 8 tokens each: one request fills the pool
    rng = random.Random(0)
    h.drain(lambda: rng.randrange(3))
    assert h.sched.num_preemptions > 0
    assert sum(r.num_preemptions for r in requests) == h.sched.num_preemptions
    for r in requests:
        assert r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 5


def test_preempted_request_recomputes_and_keeps_its_outputs():
    h = Harness(num_blocks=3, block_size=2, max_num_seqs=2, max_num_batched_tokens=16, caching=True)
    a = h.add([0, 1, 2], max_tokens=3)[0]
    b = h.add([0, 1, 1], max_tokens=3)[0]
    tokens = itertools.cycle([2, 0, 1])
    h.step(lambda: next(tokens))  # a prefills into 2 blocks; b would need 2 more with nothing cached yet: it waits
    h.check()
    assert b.status is RequestStatus.WAITING and h.bm.num_free_blocks == 1
    h.step(lambda: next(tokens))  # a decodes; b is admitted on a's cached block [0, 1] plus the last free one
    h.check()
    assert b.status is RequestStatus.RUNNING and b.num_cached_tokens == 2 and h.bm.num_free_blocks == 0
    assert h.bm.block_table(a.request_id)[0] == h.bm.block_table(b.request_id)[0]
    h.step(lambda: next(tokens))  # a needs a third block: b (the newest) is preempted, a decodes
    h.check()
    assert b.status is RequestStatus.PREEMPTED and b.num_output_tokens == 1 and h.sched.num_preemptions == 1
    assert a.num_output_tokens == 3 or a.num_computed_tokens == 5
    h.drain(lambda: next(tokens))
    assert a.num_output_tokens == 3 and b.num_output_tokens == 3 and b.num_preemptions == 1


def test_group_samples_share_the_prompt_blocks():
    h = Harness(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, caching=True)
    seqs = h.add(list(range(9)), max_tokens=4, n=3)
    h.step(lambda: 0)  # only sample 1 runs: the others wait for its prompt blocks
    assert [s.status for s in seqs] == [RequestStatus.RUNNING, RequestStatus.WAITING, RequestStatus.WAITING]
    h.step(lambda: 0)
    h.check()
    tables = [h.bm.block_table(s.request_id) for s in seqs]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert seqs[1].num_cached_tokens == seqs[2].num_cached_tokens == 8
    h.drain(lambda: 0)
