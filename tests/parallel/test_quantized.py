"""Tensor (and expert) parallelism on packed weight-only checkpoints written by `ernie45.quant.quantize`: each rank
reads its slices of the codes, scales and zero points, a split that would cut a quantization group is refused
naming the tensor and the group size, and TP=2 greedy tokens equal TP=1's on the same quantized checkpoint."""

from __future__ import annotations

import pytest

from ernie45 import LLM
from ernie45.parallel import shutdown
from ernie45.quant import quantize

from ..tiny_checkpoint import make_tiny_checkpoint
from .test_tensor_parallel import ENGINE, GREEDY, PROMPTS

CASES = {
    # int8 per channel, symmetric: row-parallel ranks each keep the rows' scales, split mid-group.
    "int8": {"bits": 8},
    # int4 groups of 16, asymmetric (zero points): the experts' down_proj (32 inputs -> 16 per rank) splits inside
    # a 32-weight packing block, which the loader re-packs.
    "int4-g16": {"bits": 4, "group_size": 16},
}


@pytest.fixture(scope="module")
def dense_moe(tmp_path_factory):
    """The tiny MoE shape with experts 32 wide, so that each rank's slice of every quantized input (16) is still
    a whole number of the kernel's 16-weight units."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tpq") / "moe", seed=3, moe_intermediate_size=32)


@pytest.fixture(scope="module")
def packed(dense_moe, tmp_path_factory):
    root = tmp_path_factory.mktemp("tpq-packed")
    return {name: quantize(dense_moe, root / name, **kwargs) and root / name for name, kwargs in CASES.items()}


@pytest.mark.parametrize("case, extra", [
    ("int8", {}),
    ("int4-g16", {}),
    ("int4-g16", {"enable_expert_parallel": True}),
], ids=["int8-tp2", "int4-tp2", "int4-tp2-ep2"])
def test_quantized_tp2_matches_tp1(case, extra, packed, one_thread):
    single = LLM(str(packed[case]), **ENGINE)
    whole_bytes = sum(p.numel() * p.element_size() for p in single.model.parameters())
    expected = single.generate(PROMPTS, GREEDY, use_tqdm=False)
    tp = LLM(str(packed[case]), tensor_parallel_size=2, **ENGINE, **extra)
    try:
        got = tp.generate(PROMPTS, GREEDY, use_tqdm=False)
        reports = tp.model.parallel_driver.report(tp.engine.cache)
    finally:
        shutdown(tp.model)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    for r in reports:
        assert r["weight_bytes"] <= 0.55 * whole_bytes, (r, whole_bytes)


def test_split_cutting_a_group_is_refused(dense_moe, tmp_path):
    """Groups of 32 divide every input of the model, but TP=2 leaves the experts' down_proj 16 inputs per rank."""
    out = tmp_path / "int4-g32"
    quantize(dense_moe, out, bits=4, group_size=32)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.down_proj: .* would cut its "
                                         r"quantization groups of 32"):
        LLM(str(out), tensor_parallel_size=2, **ENGINE)
