"""BlockManager: unit tests of prefix caching and eviction, and a stateful property test (random arrivals,
chunked prefill, decode, preemption, finishes and aborts) that checks no block is ever leaked, double-freed,
over-committed or shared while its KV could still change."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ernie45.engine.block_manager import BlockManager


def run_prompt(bm: BlockManager, rid: str, tokens: list[int], extra_keys: tuple = ()) -> tuple[list[int], int]:
    """Admit a request and compute its whole prompt in one step, as the scheduler and runner would."""
    hits, num_hit = bm.get_computed_blocks(tokens, extra_keys)
    assert bm.allocate_slots(rid, len(tokens), hits)
    bm.cache_full_blocks(rid, tokens, len(tokens), extra_keys)
    bm.check_invariants()
    return hits, num_hit


def test_prefix_hit_after_request_finishes():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    assert run_prompt(bm, "a", prompt) == ([], 0)
    first_blocks = bm.block_table("a")[:2]
    bm.free("a")
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2
    hits, num_hit = run_prompt(bm, "b", prompt)
    assert hits == first_blocks and num_hit == 8
    assert bm.block_table("b")[:2] == first_blocks


def test_last_full_block_is_never_a_hit():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))  # exactly two full blocks
    run_prompt(bm, "a", prompt)
    bm.free("a")
    hits, num_hit = bm.get_computed_blocks(prompt)
    assert len(hits) == 1 and num_hit == 4  # one token (here a whole block) is left to compute
    hits, num_hit = bm.get_computed_blocks(prompt + [99])
    assert len(hits) == 2 and num_hit == 8


def test_partial_blocks_are_never_cached():
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prompt(bm, "a", [1, 2, 3, 4, 5, 6])
    assert bm.num_cached_blocks == 1
    bm.free("a")
    _, num_hit = bm.get_computed_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert num_hit == 4


def test_chunked_prefill_caches_blocks_as_they_fill():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(12))
    assert bm.allocate_slots("a", 6)
    bm.cache_full_blocks("a", prompt, 6)
    assert bm.num_cached_blocks == 1
    assert bm.allocate_slots("a", 12)
    bm.cache_full_blocks("a", prompt, 12)
    assert bm.num_cached_blocks == 3
    bm.check_invariants()
    assert bm.get_computed_blocks(prompt + [0])[0] == bm.block_table("a")


def test_fresh_blocks_are_used_before_evicting_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=2)
    run_prompt(bm, "a", [1, 2, 3, 4])
    bm.free("a")
    assert bm.allocate_slots("b", 4)  # exactly the two never-cached blocks
    assert bm.num_cached_blocks == 2
    assert bm.get_computed_blocks([1, 2, 3, 4, 5])[1] == 4


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    run_prompt(bm, "a", a)
    run_prompt(bm, "b", b)
    bm.free("a")
    bm.free("b")
    # Evicted in free order, and within a request tail first: a's second block, a's first, then b's.
    assert bm.allocate_slots("x", 1)
    assert bm.get_computed_blocks(a + [0])[1] == 2
    assert bm.get_computed_blocks(b + [0])[1] == 4
    assert bm.allocate_slots("y", 1)
    assert bm.get_computed_blocks(a + [0])[1] == 0
    assert bm.get_computed_blocks(b + [0])[1] == 4
    assert bm.allocate_slots("z", 1)
    assert bm.get_computed_blocks(b + [0])[1] == 2
    bm.check_invariants()


def test_hit_revives_a_block_from_the_evictable_list():
    bm = BlockManager(num_blocks=3, block_size=2)
    run_prompt(bm, "a", [1, 2, 3])
    bm.free("a")
    hits, _ = bm.get_computed_blocks([1, 2, 3])
    assert bm.allocate_slots("b", 3, hits)
    assert bm.blocks[hits[0]].ref_count == 1
    # The revived block is no longer free, so it cannot be evicted under b.
    assert bm.allocate_slots("c", 2)
    assert not bm.allocate_slots("d", 1)
    assert bm.block_table("b")[0] == hits[0]
    bm.check_invariants()


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert not bm.allocate_slots("big", 17)
    assert not bm.has_request("big") and bm.num_free_blocks == 4
    assert bm.allocate_slots("a", 8)
    assert bm.allocate_slots("b", 4)
    table = bm.block_table("a")
    assert not bm.allocate_slots("a", 16)  # needs two more, one is left
    assert bm.block_table("a") == table
    assert bm.num_free_blocks == 1
    assert bm.allocate_slots("a", 12)
    assert bm.allocate_slots("a", 3)  # tables never shrink
    assert len(bm.block_table("a")) == 3
    bm.check_invariants()


def test_all_or_nothing_counts_revived_hit_blocks():
    bm = BlockManager(num_blocks=2, block_size=2)
    run_prompt(bm, "a", [1, 2, 3])
    bm.free("a")
    hits, _ = bm.get_computed_blocks([1, 2, 3, 4, 5])
    assert len(hits) == 1
    # 5 tokens need 3 blocks: the hit plus two new ones, but only one other block exists.
    assert not bm.allocate_slots("b", 5, hits)
    assert not bm.has_request("b") and bm.num_free_blocks == 2 and bm.num_cached_blocks == 1
    bm.check_invariants()


def test_live_requests_share_prefix_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    run_prompt(bm, "a", prompt)
    hits, num_hit = run_prompt(bm, "b", prompt)
    assert num_hit == 8 and hits == bm.block_table("a")[:2] == bm.block_table("b")[:2]
    assert all(bm.blocks[b].ref_count == 2 for b in hits)
    assert bm.block_table("a")[2] != bm.block_table("b")[2]
    assert bm.num_used_blocks == 4
    bm.free("a")
    assert all(bm.blocks[b].ref_count == 1 for b in hits) and bm.num_used_blocks == 3
    bm.free("b")
    assert bm.num_free_blocks == 8


def test_identical_blocks_computed_concurrently_keep_the_first_mapping():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(5))
    for rid in ("a", "b"):  # both admitted before either computed anything: both miss
        assert bm.get_computed_blocks(prompt) == ([], 0)
        assert bm.allocate_slots(rid, 5)
    for rid in ("a", "b"):
        bm.cache_full_blocks(rid, prompt, 5)
    bm.check_invariants()
    assert bm.num_cached_blocks == 1
    assert bm.get_computed_blocks(prompt)[0] == bm.block_table("a")[:1]
    assert bm.blocks[bm.block_table("b")[0]].block_hash is None
    # b's own chain continues past the duplicate: its next block is cached under the shared prefix.
    assert bm.allocate_slots("b", 9)
    bm.cache_full_blocks("b", prompt + [5, 6, 7, 8], 9)
    assert bm.get_computed_blocks(prompt + [5, 6, 7, 8, 9])[1] == 8
    bm.free("a")
    bm.free("b")
    bm.check_invariants()
    assert bm.num_free_blocks == 8


def test_extra_keys_separate_identical_prompts():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    run_prompt(bm, "a", prompt, extra_keys=("image-1",))
    bm.free("a")
    assert bm.get_computed_blocks(prompt, ("image-2",)) == ([], 0)
    assert bm.get_computed_blocks(prompt)[1] == 0
    assert bm.get_computed_blocks(prompt, ("image-1",))[1] == 8


def test_free_of_unknown_or_freed_request_is_a_no_op():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.free("never-seen")
    run_prompt(bm, "a", list(range(6)))
    bm.free("a")
    bm.free("a")
    bm.check_invariants()
    assert bm.num_free_blocks == 4 and not bm.has_request("a")


def test_reset_prefix_cache_is_refused_while_blocks_are_in_use():
    bm = BlockManager(num_blocks=4, block_size=2)
    run_prompt(bm, "a", [1, 2, 3])
    assert not bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 1
    bm.free("a")
    assert bm.reset_prefix_cache()
    bm.check_invariants()
    assert bm.num_cached_blocks == 0 and bm.get_computed_blocks([1, 2, 3]) == ([], 0)


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    run_prompt(bm, "a", [1, 2, 3])
    bm.free("a")
    assert bm.num_cached_blocks == 0 and bm.get_computed_blocks([1, 2, 3]) == ([], 0)


def test_prefix_cache_stats_count_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prompt(bm, "a", list(range(9)))
    run_prompt(bm, "b", list(range(9)))
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (18, 8)
    bm.reset_prefix_cache_stats()
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0, 0)


def test_usage_and_counts():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.usage == 0.0
    assert bm.allocate_slots("a", 5)
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.usage) == (2, 2, 0.5)


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)
    bm = BlockManager(num_blocks=4, block_size=2)
    with pytest.raises(ValueError, match="empty"):
        bm.get_computed_blocks([])
    with pytest.raises(ValueError, match="num_tokens_total"):
        bm.allocate_slots("a", -1)
    with pytest.raises(KeyError):
        bm.block_table("a")
    with pytest.raises(KeyError):
        bm.cache_full_blocks("a", [1, 2], 2)
    run_prompt(bm, "a", [1, 2, 3])
    hits, _ = bm.get_computed_blocks([1, 2, 3])
    with pytest.raises(ValueError, match="first call"):
        bm.allocate_slots("a", 4, hits)
    with pytest.raises(ValueError, match="holds only"):
        bm.cache_full_blocks("a", [1, 2, 3, 4, 5, 6, 7, 8], 8)
    with pytest.raises(ValueError, match="no longer cached"):
        bm.allocate_slots("b", 3, [bm.block_table("a")[1]])
    with pytest.raises(ValueError, match="duplicates"):
        bm.allocate_slots("b", 6, hits + hits)
    bm.check_invariants()


# ---------------------------------------------------------------------------------------------------------------
# Stateful property test. The model tracks, per block, the token prefix whose KV it holds once full and computed
# (`content`), so a prefix hit can be checked to really carry the right KV, and a block handed to a second request
# while another still relies on it shows up as a content change.

TOKENS = st.integers(0, 1)  # a tiny alphabet, so prompts share prefixes often


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 16), block_size=st.integers(1, 4), caching=st.booleans())
    def setup(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.running: dict[str, tuple[list[int], int]] = {}  # id -> (tokens, num computed)
        self.waiting: dict[str, list[int]] = {}  # preempted, or never admitted for lack of blocks
        self.finished: set[str] = set()
        self.content: dict[int, tuple[int, ...]] = {}
        self.next_id = 0

    # -- helpers -------------------------------------------------------------------------------------------------

    def _snapshot(self) -> tuple:
        bm = self.bm
        tables = {rid: bm.block_table(rid) for rid in self.running}
        return tables, bm.num_free_blocks, bm.num_cached_blocks, [(b.ref_count, b.block_hash) for b in bm.blocks]

    def _took_new_blocks(self, rid: str, num_before: int) -> None:
        # Fresh or evicted blocks will be overwritten by this request: whatever KV they held is gone.
        for block_id in self.bm.block_table(rid)[num_before:]:
            self.content.pop(block_id, None)

    def _compute(self, rid: str, target: int) -> None:
        tokens, _ = self.running[rid]
        self.running[rid] = (tokens, target)
        self.bm.cache_full_blocks(rid, tokens, target)
        bs = self.bm.block_size
        for i, block_id in enumerate(self.bm.block_table(rid)[: target // bs]):
            expected = tuple(tokens[: (i + 1) * bs])
            assert self.content.setdefault(block_id, expected) == expected

    def _admit(self, rid: str, tokens: list[int], chunk: int) -> None:
        bm = self.bm
        hits, num_hit = bm.get_computed_blocks(tokens)
        assert num_hit == len(hits) * bm.block_size and num_hit < len(tokens)
        assert bm.enable_prefix_caching or num_hit == 0
        for i, block_id in enumerate(hits):
            assert self.content[block_id] == tuple(tokens[: (i + 1) * bm.block_size])
        target = min(len(tokens), num_hit + chunk)
        before = self._snapshot()
        if not bm.allocate_slots(rid, target, hits):
            assert self._snapshot() == before and not bm.has_request(rid)
            self.waiting[rid] = tokens
            return
        assert bm.block_table(rid)[: len(hits)] == hits
        self.waiting.pop(rid, None)
        self.running[rid] = (tokens, num_hit)
        self._took_new_blocks(rid, len(hits))
        self._compute(rid, target)

    def _preempt(self, rid: str) -> None:
        self.bm.free(rid)
        self.waiting[rid] = self.running.pop(rid)[0]  # recomputed from scratch later, like vLLM's recompute mode

    # -- rules ---------------------------------------------------------------------------------------------------

    @rule(tokens=st.lists(TOKENS, min_size=1, max_size=24), chunk=st.integers(1, 24))
    def add_request(self, tokens: list[int], chunk: int) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        self._admit(rid, tokens, chunk)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data(), chunk=st.integers(1, 24))
    def resume(self, data: st.DataObject, chunk: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.waiting)))
        self._admit(rid, self.waiting[rid], chunk)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), num_new=st.integers(1, 6), sampled=st.lists(TOKENS, min_size=1, max_size=3))
    def extend(self, data: st.DataObject, num_new: int, sampled: list[int]) -> None:
        """Next prefill chunk, or a decode step once the prompt is done; preempt the request if blocks run out."""
        rid = data.draw(st.sampled_from(sorted(self.running)))
        tokens, num_computed = self.running[rid]
        if num_computed == len(tokens):
            tokens.extend(sampled)
        target = min(len(tokens), num_computed + num_new)
        num_before = len(self.bm.block_table(rid))
        before = self._snapshot()
        if not self.bm.allocate_slots(rid, target):
            assert self._snapshot() == before
            self._preempt(rid)
            return
        self._took_new_blocks(rid, num_before)
        self._compute(rid, target)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        self._preempt(data.draw(st.sampled_from(sorted(self.running))))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.running)))
        self.bm.free(rid)
        del self.running[rid]
        self.finished.add(rid)

    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        """Abort anything: a running or waiting request, one already finished (double free) or an unknown id."""
        rid = data.draw(st.sampled_from(sorted(self.running) + sorted(self.waiting) + sorted(self.finished) + ["?"]))
        self.bm.free(rid)
        self.running.pop(rid, None)
        self.waiting.pop(rid, None)

    @rule()
    def reset_prefix_cache(self) -> None:
        in_use = self.bm.num_used_blocks > 0
        assert self.bm.reset_prefix_cache() is not in_use
        if not in_use:
            assert self.bm.num_cached_blocks == 0

    # -- checks --------------------------------------------------------------------------------------------------

    @invariant()
    def accounting_holds(self) -> None:
        bm = self.bm
        bm.check_invariants()
        assert bm.num_used_blocks + bm.num_free_blocks == bm.num_blocks
        for rid in [*self.waiting, *self.finished]:
            assert rid in self.running or not bm.has_request(rid)
        refs: dict[int, int] = {}
        for rid, (tokens, num_computed) in self.running.items():
            table = bm.block_table(rid)
            assert len(table) == -(-num_computed // bm.block_size)
            num_full = num_computed // bm.block_size
            for i, block_id in enumerate(table):
                refs[block_id] = refs.get(block_id, 0) + 1
                if i < num_full:  # computed KV this request relies on has not been overwritten
                    assert self.content[block_id] == tuple(tokens[: (i + 1) * bm.block_size])
                else:  # a block still being written is never shared
                    assert bm.blocks[block_id].ref_count == 1
        assert len(refs) == bm.num_used_blocks  # nothing leaked: every used block belongs to a live request
        assert all(bm.blocks[b].ref_count == n for b, n in refs.items())

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for rid in list(self.running):
            self.bm.free(rid)
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBlockManagerStateful = BlockManagerMachine.TestCase
