"""Paged-KV block bookkeeping with prefix caching (vLLM v1 KVCacheManager, nano-vllm BlockManager).

The KV cache is `num_blocks` blocks of `block_size` token slots. This class only hands out block ids and tracks
who holds them; the tensors live with the attention backend. Requests are identified by string ids and grow their
block table token by token (chunked prefill and decode are the same `allocate_slots` call).

Prefix caching: once a block is full and computed, it is registered under a chain hash of
(parent block's hash, its token ids, extra_keys), so a later request with the same prefix reuses its KV. A block
whose ref count drops to 0 keeps its hash and stays hittable until the pool needs it back; never-cached free blocks
are handed out first, then cached ones least-recently-freed first.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

BlockHash = bytes


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> BlockHash:
    """Chain hash of one full block.

    sha256 rather than Python's `hash`: a collision would silently serve another prompt's KV, and the 64-bit tuple
    hash can be collided on purpose (vLLM moved to sha256 for the same reason). A fixed pickle protocol keeps the
    bytes, hence the hash, stable across Python versions.
    """
    payload = pickle.dumps((parent_hash, tuple(token_ids), tuple(extra_keys)), protocol=4)
    return hashlib.sha256(payload).digest()


@dataclass
class Block:
    """One block of `block_size` KV slots."""

    block_id: int
    """Index of the block in the KV cache tensors."""
    ref_count: int = 0
    """Number of live requests whose block table holds this block."""
    block_hash: BlockHash | None = None
    """Chain hash while the block is full and registered in the prefix cache, else None."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Two free lists, so allocation can prefer blocks whose cached KV nobody can hit anyway:
        # never-cached blocks (popped from the left), and cached ones in LRU order (oldest first, evicted first).
        self._fresh_free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[BlockHash, int] = {}
        self._tables: dict[str, list[int]] = {}
        # Hashes of each request's full, computed blocks in order. Kept per request rather than read back from the
        # blocks because a block that duplicates an already-cached hash stays unregistered, yet its hash is still
        # the parent of the next block's.
        self._req_hashes: dict[str, list[BlockHash]] = {}
        self._queries = 0
        self._hits = 0

    # ----------------------------------------------------------------------------------------------------------
    # Prefix cache lookup

    def get_computed_blocks(
        self, token_ids: Sequence[int], extra_keys: tuple = (), record_stats: bool = True
    ) -> tuple[list[int], int]:
        """Longest cached prefix of full blocks: (block ids, number of tokens they cover).

        At least one token is always left to compute (the model needs logits for the last prompt token), so a
        prompt whose every block hits, with a length that is a multiple of block_size, gets its last block dropped.
        Touches no ref counts: the scheduler may still decide not to admit the request. Counts the query and hit
        tokens for the prefix-cache hit-rate metric unless `record_stats` is False (a scheduler that looks up the
        same waiting request every step records once, on admission, with `record_prefix_lookup`).
        """
        if len(token_ids) == 0:
            raise ValueError("token_ids must not be empty: a request needs at least one token to compute")
        if not self.enable_prefix_caching:
            return [], 0
        max_hit_blocks = (len(token_ids) - 1) // self.block_size
        hit_blocks: list[int] = []
        parent: BlockHash | None = None
        for i in range(max_hit_blocks):
            chunk = token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = hash_block_tokens(parent, chunk, extra_keys)
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            hit_blocks.append(block_id)
        num_hit_tokens = len(hit_blocks) * self.block_size
        if record_stats:
            self.record_prefix_lookup(len(token_ids), num_hit_tokens)
        return hit_blocks, num_hit_tokens

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self._queries += num_query_tokens
        self._hits += num_hit_tokens

    @property
    def prefix_cache_queries(self) -> int:
        """Prompt tokens looked up in the prefix cache since the last stats reset."""
        return self._queries

    @property
    def prefix_cache_hits(self) -> int:
        """Of those, tokens served from the cache."""
        return self._hits

    def reset_prefix_cache_stats(self) -> None:
        self._queries = 0
        self._hits = 0

    # ----------------------------------------------------------------------------------------------------------
    # Allocation and release

    def allocate_slots(self, request_id: str, num_tokens_total: int, computed_blocks: list[int] | None = None) -> bool:
        """Grow the request's block table to cover `num_tokens_total` token slots (tables never shrink).

        `computed_blocks` (from `get_computed_blocks`, called just before) are only accepted on the request's first
        call and go first in its table. Returns False and changes nothing when the pool is short, so the scheduler
        can preempt someone and retry.
        """
        if not isinstance(num_tokens_total, int) or num_tokens_total < 0:
            raise ValueError(f"num_tokens_total must be a non-negative int, got {num_tokens_total!r}")
        computed = list(computed_blocks or ())
        table = self._tables.get(request_id)
        if table is not None and computed:
            raise ValueError(f"request {request_id!r} already has blocks; computed_blocks are only for its first call")
        if computed:
            self._check_computed_blocks(computed, num_tokens_total)
        num_held = len(computed) if table is None else len(table)
        num_new = -(-num_tokens_total // self.block_size) - num_held
        # Hit blocks sitting in the evictable list leave the free pool too, so they count against it.
        num_revived = sum(1 for b in computed if self.blocks[b].ref_count == 0)
        if max(num_new, 0) + num_revived > self.num_free_blocks:
            return False

        if table is None:
            table = self._tables[request_id] = []
            self._req_hashes[request_id] = []
        for block_id in computed:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._evictable[block_id]
            block.ref_count += 1
            table.append(block_id)
            self._req_hashes[request_id].append(block.block_hash)
        for _ in range(num_new):
            table.append(self._pop_free_block())
        return True

    def _check_computed_blocks(self, computed: list[int], num_tokens_total: int) -> None:
        if len(set(computed)) != len(computed):
            raise ValueError(f"computed_blocks has duplicates: {computed}")
        for block_id in computed:
            if not 0 <= block_id < self.num_blocks:
                raise ValueError(f"computed block id {block_id} out of range [0, {self.num_blocks})")
            block = self.blocks[block_id]
            # A hit evicted between get_computed_blocks and allocate_slots would hold someone else's KV now.
            if block.block_hash is None or self._cached.get(block.block_hash) != block_id:
                raise ValueError(f"computed block {block_id} is no longer cached; call get_computed_blocks again")
        if num_tokens_total < len(computed) * self.block_size:
            raise ValueError(
                f"num_tokens_total={num_tokens_total} is less than the {len(computed) * self.block_size} tokens "
                "covered by computed_blocks"
            )

    def _pop_free_block(self) -> int:
        if self._fresh_free:
            block_id = self._fresh_free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self._cached[block.block_hash]
            block.block_hash = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def cache_full_blocks(
        self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int, extra_keys: tuple = ()
    ) -> None:
        """Register the request's blocks that became full once `num_computed_tokens` tokens are computed.

        `token_ids` are all the request's tokens so far (prompt and outputs) and `extra_keys` must be the ones given
        to `get_computed_blocks`. When another block already holds the same hash, the cache keeps pointing there and
        this request keeps its own (unregistered) copy.
        """
        if request_id not in self._tables:
            raise KeyError(f"unknown request {request_id!r}")
        if not 0 <= num_computed_tokens <= len(token_ids):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} is outside [0, len(token_ids)={len(token_ids)}]"
            )
        if not self.enable_prefix_caching:
            return
        table = self._tables[request_id]
        hashes = self._req_hashes[request_id]
        num_full = num_computed_tokens // self.block_size
        if num_full > len(table):
            raise ValueError(
                f"request {request_id!r} computed {num_computed_tokens} tokens but holds only {len(table)} blocks"
            )
        for i in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else None
            chunk = token_ids[i * self.block_size : (i + 1) * self.block_size]
            block_hash = hash_block_tokens(parent, chunk, extra_keys)
            hashes.append(block_hash)
            block = self.blocks[table[i]]
            if block_hash not in self._cached:
                self._cached[block_hash] = block.block_id
                block.block_hash = block_hash

    def free(self, request_id: str) -> None:
        """Release the request's blocks. Unknown ids (already freed, never admitted) are a no-op: aborts race."""
        table = self._tables.pop(request_id, None)
        self._req_hashes.pop(request_id, None)
        if table is None:
            return
        # Reverse order: a request's tail blocks are the least likely to be shared, so they should be evicted first.
        for block_id in reversed(table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.block_hash is not None:
                self._evictable[block_id] = None  # most-recently-freed end: evicted last
            else:
                self._fresh_free.appendleft(block_id)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Refused (returns False, changes nothing) while any block is in use, as in vLLM:
        dropping only the free blocks' hashes would leave the running ones to re-register their blocks later, so the
        cache would not really be empty afterwards."""
        if self.num_used_blocks > 0:
            return False
        for block_id in self._evictable:
            self.blocks[block_id].block_hash = None
            self._fresh_free.append(block_id)
        self._evictable.clear()
        self._cached.clear()
        return True

    # ----------------------------------------------------------------------------------------------------------
    # Queries

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block ids in token order; KeyError if the request holds no table."""
        if request_id not in self._tables:
            raise KeyError(f"unknown request {request_id!r}")
        return list(self._tables[request_id])

    def has_request(self, request_id: str) -> bool:
        return request_id in self._tables

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, cached (evictable) ones included."""
        return len(self._fresh_free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1] (the `kv_cache_usage_perc` metric)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, in use or not."""
        return len(self._cached)

    # ----------------------------------------------------------------------------------------------------------
    # Self-check for tests

    def check_invariants(self) -> None:
        """Raise RuntimeError naming the first broken invariant (tests call this after every operation)."""

        def fail(msg: str) -> None:
            raise RuntimeError(f"BlockManager invariant broken: {msg}")

        if len(self.blocks) != self.num_blocks or any(b.block_id != i for i, b in enumerate(self.blocks)):
            fail("block list does not hold exactly blocks 0..num_blocks-1 in order")
        refs = [0] * self.num_blocks
        for rid, table in self._tables.items():
            if len(set(table)) != len(table):
                fail(f"request {rid!r} holds a block twice: {table}")
            for block_id in table:
                refs[block_id] += 1
            if len(self._req_hashes.get(rid, ())) > len(table):
                fail(f"request {rid!r} has more block hashes than blocks")
        if self._req_hashes.keys() != self._tables.keys():
            fail("per-request hash lists and block tables cover different requests")
        for block in self.blocks:
            if block.ref_count != refs[block.block_id]:
                fail(f"block {block.block_id} ref_count={block.ref_count} but {refs[block.block_id]} tables hold it")
        fresh, evictable = list(self._fresh_free), list(self._evictable)
        if len(set(fresh)) != len(fresh):
            fail("fresh free list has duplicates")
        if set(fresh) & set(evictable):
            fail(f"blocks in both free lists: {sorted(set(fresh) & set(evictable))}")
        if set(fresh) | set(evictable) != {b.block_id for b in self.blocks if b.ref_count == 0}:
            fail("free lists differ from the set of blocks with ref_count 0")
        if any(self.blocks[b].block_hash is not None for b in fresh):
            fail("a cached block sits in the never-cached free list")
        if any(self.blocks[b].block_hash is None for b in evictable):
            fail("an uncached block sits in the evictable list")
        for block_hash, block_id in self._cached.items():
            if self.blocks[block_id].block_hash != block_hash:
                fail(f"cache maps a hash to block {block_id}, whose own hash differs")
        for block in self.blocks:
            if block.block_hash is not None and self._cached.get(block.block_hash) != block.block_id:
                fail(f"block {block.block_id} has a hash the cache does not map to it")
        if self.num_used_blocks + self.num_free_blocks != self.num_blocks:
            fail("used + free != num_blocks")
