"""LoRA on the routed experts (`experts` targets -> PEFT `target_parameters`): the adapter ernie45 saves is applied
by peft to transformers' MoE model with the same logits, loads back into ernie45, and merges into plain weights."""

import json

import pytest
import torch

from ernie45.checkpoint import load_model
from ernie45.training.lora import (
    LoraExperts,
    adapter_state_dict,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
)


def adapted(model_dir, targets, seed=3):
    """ernie45's model with adapters on `targets`, every lora_B set to random values (a trained adapter)."""
    model = load_model(model_dir, dtype="float32")
    apply_lora(model, targets, r=2, alpha=4.0, dropout=0.0, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def save(model, out, targets):
    save_adapter(adapter_state_dict(model.named_parameters()), out, 2, 4.0, 0.0, targets, "tiny")


IDS = torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("targets", [["q_proj", "experts"], ["experts.down_proj"], ["experts.gate_up_proj", "v_proj"]])
def test_expert_adapter_round_trips_through_peft(tmp_path, tiny_moe, targets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = adapted(tiny_moe, targets)
    assert any(isinstance(m, LoraExperts) for _, m in lora_modules(ours))
    save(ours, tmp_path / "adapter", targets)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert all(p.startswith("mlp.experts.") for p in config["target_parameters"])
    assert "experts" not in " ".join(config["target_modules"])

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32),
                                   tmp_path / "adapter").eval()
    reloaded = load_model(tiny_moe, dtype="float32")
    load_adapter(reloaded, tmp_path / "adapter")
    with torch.no_grad():
        ours_logits = ours.eval()(IDS)
        assert not torch.allclose(ours_logits, load_model(tiny_moe, dtype="float32")(IDS), atol=1e-3)
        torch.testing.assert_close(hf(input_ids=IDS).logits, ours_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(reloaded(IDS), ours_logits, rtol=1e-5, atol=1e-5)
        merge_lora(reloaded)
        assert not lora_modules(reloaded)
        torch.testing.assert_close(reloaded(IDS), ours_logits, rtol=1e-4, atol=1e-4)


def test_expert_adapters_train_only_their_factors(tiny_moe):
    model = adapted(tiny_moe, ["experts"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".mlp.experts." in n and (".lora_A." in n or ".lora_B." in n) for n in trainable)
    model.train()
    model(IDS).logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_expert_targets_refuse_dropout_and_non_moe_models(tiny_moe, tiny_dense):
    with pytest.raises(ValueError, match="set lora_dropout: 0"):
        apply_lora(load_model(tiny_moe, dtype="float32"), ["experts"], r=2, alpha=4.0, dropout=0.1)
    with pytest.raises(ValueError, match="no Linear module or routed experts named experts"):
        apply_lora(load_model(tiny_dense, dtype="float32"), ["experts"], r=2, alpha=4.0)
