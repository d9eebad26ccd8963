"""The fused decode step (every decoder layer in one C call) against the op-by-op path: bit-identical logits for
dense fp32/bf16 and packed int8/int4 models at batch 1 and 2, and the cases it must leave to the op-by-op path."""

import pytest
import torch

from ernie45.generation.static_cache import StaticKVCache
from ernie45.models import Ernie45Config, Ernie45ForCausalLM
from ernie45.quant import build_config, quantize_model

DENSE = dict(  # noqa: C408
    vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
)  # fmt: skip
MOE = dict(
    DENSE, model_type="ernie4_5_moe", moe_num_experts=4, moe_k=2, moe_intermediate_size=32,
    moe_layer_start_index=1, moe_num_shared_experts=1,
)  # fmt: skip


def build(dtype=torch.float32, bits=None, **overrides):
    config = Ernie45Config(**{**DENSE, **overrides})
    model = Ernie45ForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(5))
    model = model.to(dtype)
    model.tie_weights()
    if bits == 8:
        model = quantize_model(model, build_config(model, bits=8, method="rtn"))
    elif bits == 4:
        model = quantize_model(model, build_config(model, bits=4, method="rtn", group_size=64))
    return model


def decode(model, batch, fused=True, steps=6):
    """Greedy decode through a StaticKVCache; returns (logits per step [steps, B, V] fp32, the cache)."""
    config = model.config
    cache = StaticKVCache(config, batch, 4 + steps + 1, model.dtype)
    if not fused:
        cache.run_fused_layers = lambda *args: None
    ids = torch.randint(3, config.vocab_size, (batch, 4), generator=torch.Generator().manual_seed(6))
    logits = []
    with torch.inference_mode():
        hidden = model.forward_hidden(ids, torch.arange(4), cache)
        cache.advance()
        for _ in range(steps):
            step = model.compute_logits(hidden[:, -1])
            logits.append(step.float())
            hidden = model.forward_hidden(step.argmax(-1)[:, None], torch.tensor([cache.length]), cache)
            cache.advance()
    return torch.stack(logits), cache


def planned(cache) -> bool:
    return cache._fused_plan is not None and cache._fused_plan[1] is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_step_equals_op_by_op_bit_for_bit(kernel_isa, dtype, bits, batch):
    model = build(dtype, bits)
    fused, cache = decode(model, batch)
    reference, _ = decode(model, batch, fused=False)
    assert planned(cache)
    assert torch.equal(fused, reference)


def test_bias_and_untied_head_take_the_fused_step():
    model = build(use_bias=True, tie_word_embeddings=False)
    fused, cache = decode(model, 1)
    assert planned(cache)
    assert torch.equal(fused, decode(model, 1, fused=False)[0])


def test_moe_layers_run_layer_by_layer():
    config = Ernie45Config(**MOE)
    model = Ernie45ForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(5))
    logits, cache = decode(model, 1)
    assert cache._fused_plan is not None and cache._fused_plan[1] is None  # looked at, declined
    assert torch.equal(logits, decode(model, 1, fused=False)[0])


def test_hooked_module_runs_layer_by_layer_and_its_hook_fires():
    model = build()
    seen = []
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    _, cache = decode(model, 1, steps=3)
    assert not planned(cache)
    assert len(seen) == 1 + 3  # the prefill and every decode step


def test_a_new_cache_plans_again_after_the_model_changed():
    """Plans live as long as their cache: quantizing the model between two generations is picked up."""
    model = build()
    _, first = decode(model, 1)
    assert planned(first)
    quantized = quantize_model(model, build_config(model, bits=4, method="rtn", group_size=64))
    logits, second = decode(quantized, 1)
    assert planned(second)
    assert torch.equal(logits, decode(quantized, 1, fused=False)[0])


def test_autograd_and_prefill_never_take_the_fused_step():
    model = build()
    cache = StaticKVCache(model.config, 1, 8, torch.float32)
    rope = model.model.rotary_emb(torch.tensor([0]))
    x = torch.randn(1, 1, 64, requires_grad=True)
    assert cache.run_fused_layers(model.model, x, rope) is None  # autograd: the layer-by-layer graph
    with torch.no_grad():
        two_tokens = torch.randn(1, 2, 64)
        assert cache.run_fused_layers(model.model, two_tokens, model.model.rotary_emb(torch.arange(2))) is None
        assert cache.run_fused_layers(model.model, x.detach(), rope) is not None
