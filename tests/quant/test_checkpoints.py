"""quantize -> save -> load gives the same logits; the engine serves a quantized MoE checkpoint."""

import json

import pytest
import torch
from safetensors import safe_open

import ernie45
from ernie45.engine import EngineConfig, LLMEngine, SamplingParams
from ernie45.quant import QuantizedExperts, QuantizedLinear, dequantize_model, quantize, set_use_kernel

from ..engine.test_engine_vs_model import greedy_reference

CASES = {
    "int8-rtn": {"bits": 8},
    "int4-rtn-g16": {"bits": 4, "group_size": 16},
    "int4-gptq": {"bits": 4, "group_size": 16, "method": "gptq", "calib": True},
    "2bit-hqq": {"bits": 2, "group_size": 16, "method": "hqq"},
    "2bit-gptq-refit": {"bits": 2, "group_size": 16, "method": "gptq-refit", "calib": True},
    "mixed-2bit-gptq-hqq": {"bits": 2, "group_size": 16, "method": "gptq-hqq", "recipe": "mixed-2bit", "calib": True},
}


@pytest.fixture(scope="module")
def quantized(tiny_moe, calib_file, tmp_path_factory):
    out = {}
    for name, kwargs in CASES.items():
        kwargs = dict(kwargs)
        if kwargs.pop("calib", False):
            kwargs.update(calib=calib_file, num_calib_samples=4, calib_seq_len=32)
        path = tmp_path_factory.mktemp("q") / name
        model = quantize(tiny_moe, path, **kwargs)
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("case", CASES)
def test_save_load_round_trip_gives_identical_logits(quantized, case):
    model, path = quantized[case]
    loaded = ernie45.load_model(path)
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))  # prefill: reference path
        assert torch.equal(loaded(ids[:, :1]), model(ids[:, :1]))  # one row: kernel path
    assert any(isinstance(m, QuantizedExperts) for m in loaded.modules())


def test_checkpoint_layout_and_config(quantized, tiny_moe):
    _, path = quantized["mixed-2bit-gptq-hqq"]
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["method"] == "gptq-hqq" and config["recipe"] == "mixed-2bit" and config["bits"] == 2
    modules = config["modules"]
    assert modules["model.layers.1.mlp.experts.gate_up_proj"] == {"bits": 2, "group_size": 16, "symmetric": False}
    assert modules["model.layers.0.self_attn.q_proj"] == {"bits": 8, "group_size": -1, "symmetric": True}
    assert modules["model.layers.1.mlp.shared_experts.down_proj"]["bits"] == 8
    assert not any(k.startswith(("lm_head", "model.embed")) or "norm" in k or k.endswith(".mlp.gate") for k in modules)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.experts.3.up_proj.qweight").dtype == torch.uint8
        assert f.get_tensor("model.layers.1.mlp.experts.3.up_proj.scales").dtype == torch.float16
    assert "model.layers.1.mlp.experts.0.gate_proj.qzeros" in names
    assert "model.layers.0.self_attn.q_proj.qzeros" not in names  # symmetric int8: no zero points
    assert not any(n.endswith("_proj.weight") for n in names)  # no dense copies of quantized weights
    assert "model.layers.1.mlp.gate.weight" in names and "model.embed_tokens.weight" in names
    dense_bytes = sum(p.stat().st_size for p in tiny_moe.glob("*.safetensors"))
    assert sum(p.stat().st_size for p in path.glob("*.safetensors")) < dense_bytes



def kernel_and_reference_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits through the quantized kernel, then through the dequantize reference path."""
    with torch.no_grad():
        fast = model(ids)
        set_use_kernel(model, False)
        try:
            return fast, model(ids)
        finally:
            set_use_kernel(model, True)

def test_kernel_and_reference_paths_agree_on_the_model(quantized):
    model, _ = quantized["int4-rtn-g16"]
    ids = torch.arange(3, 7).view(4, 1)  # 4 sequences of one token: 4 decode rows
    fast, reference = kernel_and_reference_logits(model, ids)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


def test_engine_generates_from_quantized_moe_checkpoint(quantized):
    _, path = quantized["mixed-2bit-gptq-hqq"]
    model, tok = ernie45.load_model(path), ernie45.load_tokenizer(path)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    # A small KV pool: the default 1 GiB takes seconds to zero on a busy machine.
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=128, num_kv_blocks=32))
    prompts = [[5, 9, 17, 33, 40], [7, 8], list(range(3, 60))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
    dense = dequantize_model(ernie45.load_model(path))
    assert not any(isinstance(m, (QuantizedLinear, QuantizedExperts)) for m in dense.modules())
    for i, ids in enumerate(prompts):
        assert got[str(i)] == greedy_reference(dense, ids, 8)


def test_llm_api_loads_quantized_checkpoint(quantized):
    _, path = quantized["int8-rtn"]
    llm = ernie45.LLM(str(path), max_model_len=64, num_kv_blocks=8)
    out = llm.generate(["hello"], ernie45.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_quantized_checkpoint_loads_in_bfloat16(quantized):
    model, path = quantized["int4-rtn-g16"]
    bf16 = ernie45.load_model(path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert bf16.model.layers[0].mlp.up_proj.scales.dtype == torch.float16  # packed format unchanged
    ids = torch.arange(3, 20).view(1, -1)
    with torch.no_grad():
        for rows in (ids, ids[:, :1]):  # reference path, kernel path
            expected = model(rows)
            assert (bf16(rows).float() - expected).norm() < 0.02 * expected.norm()  # bf16 activations


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("rows", [1, 2])
def test_integer_path_decode_matches_reference_on_a_model(bits, rows):
    """Group 64 on a dense model whose widths are multiples of 64: batch-1/2 decode takes the integer path, with
    q/k/v and gate/up in grouped kernel calls; its logits stay within the path's rounding of the reference's."""
    from ernie45.checkpoint import build_empty_model
    from ernie45.kernels import qgemv
    from ernie45.models import Ernie45Config
    from ernie45.quant import build_config, quantize_model

    config = Ernie45Config.from_dict({
        "model_type": "ernie4_5", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 256,
        "tie_word_embeddings": True,
    })  # fmt: skip
    model = build_empty_model(config, torch.float32)
    model.init_weights(torch.Generator().manual_seed(0))
    model.tie_weights()
    model = quantize_model(model, build_config(model, bits=bits, method="rtn", group_size=64, quantize_lm_head=True))
    assert qgemv.uses_integer_path(bits, 64)
    ids = torch.arange(5, 5 + rows).view(rows, 1)
    fast, reference = kernel_and_reference_logits(model, ids)
    assert any(m._group_calls for m in model.modules() if isinstance(m, QuantizedLinear))  # grouped calls ran
    torch.testing.assert_close(fast, reference, rtol=1e-3, atol=1e-3 * reference.abs().max().item())
