"""ERNIEKit LoRA adapters (lora_config.json + peft_model.safetensors / lora_model_state.pdparams, Paddle-layout
module names, lora_A [in, r], lora_B [r, out]) on a Paddle-layout base: applied as ernie45 LoRA modules and merged,
they give the logits of the base merged by Paddle's own rule, W[in, out] += A @ B * scaling, in the Paddle layout
(what `erniekit export` writes), loaded by ernie45. Tolerance 1e-4 as in test_paddle_layout: both sides are fp32
sums of the same products in different orders."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np

import ernie45
from ernie45.checkpoint.erniekit_lora import load_erniekit_adapter
from ernie45.cli.main import main
from ernie45.training.lora import merge_lora

from .test_paddle_layout import logits_of, paddle_checkpoint

R, ALPHA = 4, 8.0


def erniekit_adapter(paddle_dir, out_dir, rslora=False, pdparams=False):
    """Random non-zero factors on every Linear of the Paddle checkpoint (routed experts included), written as
    ERNIEKit does; returns the merged Paddle checkpoint by Paddle's rule as the reference."""
    weights = load_np(str(paddle_dir / "model.safetensors"))
    rng = np.random.default_rng(0)
    factors = {}
    for name, w in weights.items():
        module = name.removesuffix(".weight")
        if not name.endswith("proj.weight") or w.ndim != 2 or "mtp_" in name:
            continue
        factors[f"{module}.lora_A"] = (rng.standard_normal((w.shape[0], R)) * 0.3).astype(np.float32)
        factors[f"{module}.lora_B"] = (rng.standard_normal((R, w.shape[1])) * 0.3).astype(np.float32)
    out_dir.mkdir()
    if pdparams:  # paddle.save of a state dict: a pickle of numpy arrays plus the structured-name table
        state = dict(factors, **{"StructuredToParameterName@@": {k: f"param_{i}" for i, k in enumerate(factors)}})
        (out_dir / "lora_model_state.pdparams").write_bytes(pickle.dumps(state, protocol=4))
    else:
        save_np(factors, str(out_dir / "peft_model.safetensors"), metadata={"format": "np"})
    config = {"r": R, "lora_alpha": ALPHA, "rslora": rslora, "lora_dropout": 0.0, "merge_weights": False,
              "target_modules": [".*qkv_proj.*", ".*o_proj.*", ".*up_gate_proj.*", ".*down_proj.*"],
              "trainable_bias": None, "base_model_name_or_path": str(paddle_dir), "dtype": "float32"}
    (out_dir / "lora_config.json").write_text(json.dumps(config))
    scaling = 4.0 / np.sqrt(R) if rslora else ALPHA / R
    merged = dict(weights)
    for name in list(merged):
        module = name.removesuffix(".weight")
        if f"{module}.lora_A" in factors:
            merged[name] = merged[name] + factors[f"{module}.lora_A"] @ factors[f"{module}.lora_B"] * scaling
    ref_dir = out_dir.parent / f"{out_dir.name}-merged"
    ref_dir.mkdir()
    save_np(merged, str(ref_dir / "model.safetensors"), metadata={"format": "np"})
    (ref_dir / "config.json").write_text((paddle_dir / "config.json").read_text())
    return ernie45.load_model(ref_dir)


@pytest.mark.parametrize("variant", ["safetensors", "pdparams_rslora"])
def test_erniekit_adapter_matches_paddle_merge(tmp_path, variant):
    _, paddle = paddle_checkpoint(tmp_path, "moe_shared2_untied")
    reference = erniekit_adapter(paddle, tmp_path / "adapter", rslora=variant != "safetensors",
                                 pdparams=variant != "safetensors")
    model = ernie45.load_model(paddle)
    base_logits = logits_of(model, 96)
    load_erniekit_adapter(model, tmp_path / "adapter")
    want = logits_of(reference, 96)
    assert (want - base_logits).abs().max() > 0.1  # the adapter matters
    assert (logits_of(model, 96) - want).abs().max().item() <= 1e-4  # unmerged LoRA forward
    merge_lora(model)
    assert (logits_of(model, 96) - want).abs().max().item() <= 1e-4


def test_export_merge_lora_takes_an_erniekit_adapter(tmp_path):
    _, paddle = paddle_checkpoint(tmp_path, "dense_bias_untied")
    reference = erniekit_adapter(paddle, tmp_path / "adapter")
    for fmt in ("hf", "paddle"):
        out = tmp_path / f"merged-{fmt}"
        assert main(["export", "--merge-lora", str(tmp_path / "adapter"), "--format", fmt, "--output", str(out)]) == 0
        assert (logits_of(ernie45.load_model(out), 96) - logits_of(reference, 96)).abs().max().item() <= 1e-4


def test_bad_erniekit_adapters_are_refused(tmp_path):
    _, paddle = paddle_checkpoint(tmp_path, "dense_bias_untied")
    erniekit_adapter(paddle, tmp_path / "adapter")
    factors = load_np(str(tmp_path / "adapter" / "peft_model.safetensors"))
    factors.pop("ernie.layers.0.self_attn.qkv_proj.lora_B")
    save_np(factors, str(tmp_path / "adapter" / "peft_model.safetensors"))
    with pytest.raises(ValueError, match="ernie.layers.0.self_attn.qkv_proj has lora_A but not both"):
        load_erniekit_adapter(ernie45.load_model(paddle), tmp_path / "adapter")
    factors["ernie.layers.0.self_attn.qkv_proj.lora_B"] = np.zeros((R, 200), np.float32)
    save_np(factors, str(tmp_path / "adapter" / "peft_model.safetensors"))
    with pytest.raises(ValueError, match="qkv_proj.lora_B has 200 columns, the model's fused module 128"):
        load_erniekit_adapter(ernie45.load_model(paddle), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "lora_config.json").read_text())
    (tmp_path / "adapter" / "lora_config.json").write_text(json.dumps(dict(config, use_mora=True)))
    with pytest.raises(ValueError, match="use_mora adapters are not supported"):
        load_erniekit_adapter(ernie45.load_model(paddle), tmp_path / "adapter")


def test_pdparams_with_code_objects_is_refused(tmp_path):
    from ernie45.checkpoint.erniekit_lora import read_tensors

    (tmp_path / "lora_model_state.pdparams").write_bytes(pickle.dumps({"x": torch.nn.Linear(1, 1)}))
    with pytest.raises(ValueError, match="torch.nn.modules.linear.Linear is not a numpy array class"):
        read_tensors(tmp_path)
