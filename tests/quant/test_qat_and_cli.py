"""QAT: gradients flow through the fake quantization (STE) and the trained model exports the packed format;
`ernie45 quantize` writes a checkpoint the loader reads."""

import json

import torch
import torch.nn.functional as F

import ernie45
from ernie45.cli.main import main
from ernie45.quant import QuantizedExperts, QuantizedLinear, convert_qat, prepare_qat
from ernie45.quant.qat import FakeQuantize
from ernie45.quant.rtn import fake_quantize
from ernie45.quant.spec import QuantSpec


def test_straight_through_gradient_reaches_the_full_precision_weights(tiny_moe):
    model = ernie45.load_model(tiny_moe)
    chosen = prepare_qat(model, bits=2, group_size=16, targets=["*.mlp.experts.*", "*.self_attn.q_proj"])
    assert set(chosen) == {
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    }
    q_proj = model.model.layers[0].self_attn.q_proj
    original = q_proj.parametrizations.weight.original
    assert torch.equal(q_proj.weight, fake_quantize(original.detach(), QuantSpec(2, 16), 16))  # forward is quantized
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.arange(3, 20).view(1, -1)
    loss = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
    loss.backward()
    experts = model.model.layers[1].mlp.experts
    assert original.grad is not None and original.grad.abs().sum() > 0
    assert experts.parametrizations.gate_up_proj.original.grad.abs().sum() > 0
    # STE: the gradient w.r.t. the latent weight equals the gradient w.r.t. the quantized weight it produced.
    x = torch.randn(4, 32)
    w = original.detach().clone().requires_grad_(True)
    (x @ FakeQuantize(QuantSpec(2, 16), 16)(w).T).sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand_as(w))


def test_convert_exports_what_training_saw_and_round_trips(tiny_moe, tmp_path):
    model = ernie45.load_model(tiny_moe)
    prepare_qat(model, bits=4, group_size=16)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.arange(3, 30).view(1, -1)
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(ids)
    convert_qat(model)
    assert isinstance(model.model.layers[1].mlp.experts, QuantizedExperts)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), trained, rtol=1e-4, atol=1e-4)
    ernie45.save_model(model, tmp_path / "qat")
    with torch.no_grad():
        assert torch.equal(ernie45.load_model(tmp_path / "qat")(ids), model(ids))


def test_cli_quantize_writes_a_loadable_checkpoint(tiny_moe, calib_file, tmp_path, capsys):
    out = tmp_path / "int4"
    argv = [
        "quantize",
        str(tiny_moe),
        "--bits",
        "4",
        "--group-size",
        "16",
        "--method",
        "gptq",
        "--calib",
        str(calib_file),
        "--num-calib-samples",
        "2",
        "--calib-seq-len",
        "32",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "with gptq" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 4 and config["group_size"] == 16 and config["method"] == "gptq"
    model = ernie45.load_model(out)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLinear)
    assert model.model.layers[0].mlp.up_proj.spec.bits == 4
