"""The model's engine/trainer-facing API: explicit positions and attention backends, router logits, packing."""

import pytest
import torch

from ernie45.checkpoint import build_empty_model
from ernie45.generation.static_cache import StaticKVCache
from ernie45.models import CausalAttention, Ernie45Config

CONFIG = dict(
    model_type="ernie4_5_moe", vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_num_experts=4, moe_k=2, moe_intermediate_size=16,
    moe_num_shared_experts=1, moe_layer_start_index=1, initializer_range=0.2,
)


def tiny_model():
    model = build_empty_model(Ernie45Config.from_dict(CONFIG), torch.float32)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


@torch.no_grad()
def test_logits_shape_and_split_api():
    model = tiny_model()
    ids = torch.randint(0, 80, (2, 7))
    logits = model(ids)
    assert logits.shape == (2, 7, 80)
    hidden = model.forward_hidden(ids)
    assert torch.allclose(model.compute_logits(hidden[:, [2, 6]]), logits[:, [2, 6]], atol=1e-6)


@torch.no_grad()
def test_router_logits_exposed_per_moe_layer():
    model = tiny_model()
    router_logits = []
    model(torch.randint(0, 80, (2, 5)), router_logits=router_logits)
    assert len(router_logits) == 2  # layers 1 and 2 are MoE
    assert all(r.shape == (10, 4) and r.dtype == torch.float32 for r in router_logits)


@torch.no_grad()
def test_packed_segments_do_not_attend_across_samples():
    model = tiny_model()
    a, b = torch.randint(0, 80, (5,)), torch.randint(0, 80, (4,))
    packed = torch.cat([a, b])[None]
    segments = torch.tensor([[0] * 5 + [1] * 4])
    positions = torch.cat([torch.arange(5), torch.arange(4)])[None]
    out = model(packed, positions, CausalAttention(segments))
    assert torch.allclose(out[0, :5], model(a[None])[0], atol=1e-5)
    assert torch.allclose(out[0, 5:], model(b[None])[0], atol=1e-5)
    other = torch.cat([a, torch.randint(0, 80, (4,))])[None]
    assert torch.allclose(model(other, positions, CausalAttention(segments))[0, :5], out[0, :5], atol=1e-6)


@torch.no_grad()
def test_chunked_prefill_and_decode_through_static_cache_match_full_forward():
    model = tiny_model()
    ids = torch.randint(0, 80, (2, 12))
    full = model(ids)
    cache = StaticKVCache(model.config, 2, 16, torch.float32)
    chunks = [ids[:, :5], ids[:, 5:11], ids[:, 11:]]  # prefill, prefill continuation, one decode step
    outs = []
    for chunk in chunks:
        positions = torch.arange(cache.length, cache.length + chunk.shape[1])
        outs.append(model(chunk, positions, cache))
        cache.advance()
    assert torch.allclose(torch.cat(outs, dim=1), full, atol=1e-5)


@torch.no_grad()
def test_model_protocol_generates_through_the_static_cache_like_the_full_forward():
    """prepare_inputs -> forward_inputs, then decode_inputs per step (the one generation path): each step's logits
    equal the full forward's at that position; a text model refuses media inputs by name."""
    model = tiny_model()
    ids = torch.randint(0, 80, (2, 9))
    full = model(ids)
    cache = StaticKVCache(model.config, 2, 12, torch.float32)
    prompt = model.prepare_inputs(ids[:, :6])
    outs = [model.forward_inputs(prompt, cache)]
    cache.advance()
    for t in range(6, 9):
        outs.append(model.forward_inputs(model.decode_inputs(ids[:, t : t + 1], cache.length, prompt), cache))
        cache.advance()
    torch.testing.assert_close(model.compute_logits(torch.cat(outs, dim=1)), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pixel_values: image / video inputs need a VL model"):
        model.prepare_inputs(ids, pixel_values=torch.zeros(1, 3), image_grid_thw=None)
