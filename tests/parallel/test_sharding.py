"""The rank layout rules: which heads and experts a rank holds, and the config combinations refused up front."""

from __future__ import annotations

import pytest

from ernie45.engine.engine_config import EngineConfig
from ernie45.parallel.config import RankLayout
from ernie45.parallel.layers import vocab_rows
from ernie45.parallel.sharding import expert_ids_of_rank, kv_heads_of_rank


def test_kv_heads_split_then_replicated():
    assert [kv_heads_of_rank(16, 2, 2, r) for r in range(2)] == [(0, 1), (1, 1)]  # 0.3B shape, TP=2
    assert [kv_heads_of_rank(20, 4, 2, r) for r in range(2)] == [(0, 2), (2, 2)]  # 21B shape, TP=2
    # More ranks than KV heads: each rank keeps the one KV head its query heads read (vLLM's replication).
    assert [kv_heads_of_rank(16, 2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    with pytest.raises(ValueError, match="must divide num_attention_heads"):
        kv_heads_of_rank(20, 4, 8, 0)
    with pytest.raises(ValueError, match="not a multiple"):
        kv_heads_of_rank(12, 4, 6, 0)


def test_expert_placements():
    assert [expert_ids_of_rank(8, 2, r, "linear") for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [expert_ids_of_rank(8, 2, r, "round_robin") for r in range(2)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ValueError, match="multiple of"):
        expert_ids_of_rank(6, 4, 0, "linear")


def test_vocab_rows_pad_the_last_slice():
    assert [vocab_rows(10, 3, r) for r in range(3)] == [(0, 4, 4), (4, 8, 4), (8, 10, 4)]


def test_nodes_split_the_ranks():
    assert list(RankLayout(4, 2, 1).local_ranks()) == [2, 3]


@pytest.mark.parametrize("fields, match", [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be a positive integer"),
    ({"enable_expert_parallel": True}, "needs tensor_parallel_size >= 2"),
    ({"tensor_parallel_size": 2, "expert_placement": "random"}, "expert_placement must be one of"),
    ({"tensor_parallel_size": 3, "nnodes": 2, "master_port": 29500}, "multiple of nnodes"),
    ({"tensor_parallel_size": 2, "nnodes": 2}, "master_port is needed"),
    ({"nnodes": 2, "node_rank": 2, "master_port": 29500}, "node_rank must be in"),
    ({"data_parallel_size": 0}, "data_parallel_size must be a positive integer"),
])
def test_bad_parallel_fields_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**fields)


def test_unshardable_checkpoints_are_refused_before_any_process_starts(tiny_moe_checkpoint):
    from ernie45 import LLM

    with pytest.raises(ValueError, match="must divide num_attention_heads"):
        LLM(str(tiny_moe_checkpoint), tensor_parallel_size=3, max_model_len=64)
    with pytest.raises(ValueError, match="CPU"):
        LLM(str(tiny_moe_checkpoint), tensor_parallel_size=2, device="meta", max_model_len=64)
