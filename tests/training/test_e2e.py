"""End-to-end runs on a tiny model, each asserting what the stage is for."""

import json
from pathlib import Path

import pytest
import torch

from ernie45.checkpoint import load_model
from ernie45.cli.main import main
from ernie45.models import Ernie45Config
from ernie45.tokenizer import load_tokenizer
from ernie45.training import train
from ernie45.training.data import Encoder, collate, collate_pairs, pack
from ernie45.training.data.readers import read_records
from ernie45.training.forward import TrainingModel
from ernie45.training.init_model import init_checkpoint
from ernie45.training.lora import load_adapter
from ernie45.training.losses import sequence_logps, shifted_targets

from .helpers import dpo_erniekit, make_config, pt_text, sft_erniekit


def sft_nll(model_dir, data: Path, adapter: Path | None = None) -> float:
    """Mean NLL of the assistant tokens of `data` under a checkpoint (optionally + a LoRA adapter)."""
    model = load_model(model_dir, dtype="float32")
    if adapter is not None:
        load_adapter(model, adapter)
    enc = Encoder(load_tokenizer(model_dir), 64)
    samples = [s for _, r in read_records(data, "erniekit", "SFT") for s in enc.encode(r)]
    batch = collate(pack(samples, 64), 0)
    with torch.no_grad():
        logits = TrainingModel(model.eval())(batch["input_ids"], batch["positions"], batch["segment_ids"]).logits
    logp, n = sequence_logps(logits, shifted_targets(batch["input_ids"], batch["loss_mask"], batch["segment_ids"]))
    return float(-logp.sum() / n.sum())


def dpo_margin(model_dir, data: Path) -> float:
    """Mean log p(chosen) - log p(rejected) over the pairs of `data`."""
    model = load_model(model_dir, dtype="float32").eval()
    enc = Encoder(load_tokenizer(model_dir), 64)
    pairs = [enc.preference(r) for _, r in read_records(data, "erniekit", "DPO")]
    b = collate_pairs(pairs, 0)
    with torch.no_grad():
        logits = TrainingModel(model)(b["input_ids"], b["positions"], b["segment_ids"]).logits
    logp, _ = sequence_logps(logits, shifted_targets(b["input_ids"], b["loss_mask"], b["segment_ids"]))
    P = len(pairs)
    return float((logp[:P] - logp[P:]).mean())


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pt_with_moe_losses_and_mtp_loss_falls(tmp_path, tiny_moe):
    mtp_dir = init_checkpoint(Ernie45Config.from_file(tiny_moe), tiny_moe, tmp_path / "mtp", seed=3, num_mtp_layers=1)
    out = tmp_path / "run"
    cfg = make_config(mtp_dir, out, pt_text(tmp_path / "pt.jsonl"), stage="PT", train_dataset_type="text",
                      moe_aux_loss_lambda=0.01, moe_z_loss_lambda=0.001, moe_orthogonal_loss_lambda=0.01,
                      moe_use_aux_free=True, moe_gate_lr_ratio=0.01, token_balance_loss=True, max_steps=10)
    result = train(cfg)
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.8 * losses[0]
    rec = metrics(out)[-1]
    for term in ("lm_loss", "mtp_loss", "aux_loss", "z_loss", "orthogonal_loss"):
        assert rec[term] > 0, term  # each term logged apart
    trained = load_model(out)
    assert trained.model.num_mtp_layers == 1
    bias = trained.model.layers[1].mlp.moe_statics.e_score_correction_bias
    assert bias.abs().sum() > 0  # the aux-free update moved the correction bias
    assert (out / "loss_curve.svg").is_file() or (out / "loss_curve.png").is_file()


def test_sft_full_raises_likelihood_and_output_loads_in_transformers(tmp_path, tiny_moe):
    data = sft_erniekit(tmp_path / "sft.jsonl")
    out = tmp_path / "run"
    train(make_config(tiny_moe, out, data, eval_dataset_path=str(data), eval_steps=4, max_steps=8))
    assert sft_nll(out, data) < sft_nll(tiny_moe, data) - 1.0
    evals = [r for r in metrics(out) if r["split"] == "eval"]
    assert len(evals) == 2 and evals[-1]["loss"] < evals[0]["loss"] and evals[-1]["ppl"] > 1

    from transformers import AutoModelForCausalLM

    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Ernie4_5_MoeForCausalLM"
    ours = load_model(out, dtype="float32")
    ids = torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_sft_lora_peft_round_trip_and_merge_export(tmp_path, tiny_dense):
    data = sft_erniekit(tmp_path / "sft.jsonl")
    out = tmp_path / "run"
    train(make_config(tiny_dense, out, data, fine_tuning="LoRA", lora_rank=4, lora_alpha=8, learning_rate=1e-2,
                      lora_target_modules="q_proj,v_proj,gate_proj,down_proj", max_steps=8))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert sft_nll(tiny_dense, data, adapter=out) < sft_nll(tiny_dense, data) - 0.5

    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()  # noqa: SIM118

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32), out).eval()
    ours = load_model(tiny_dense, dtype="float32")
    load_adapter(ours, out)
    ids = torch.randint(5, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = load_model(tiny_dense, dtype="float32")(ids)
        ours_logits = ours(ids)
        assert not torch.allclose(ours_logits, base_logits, atol=1e-3)  # the adapter does something
        torch.testing.assert_close(hf(input_ids=ids).logits, ours_logits, rtol=1e-4, atol=1e-4)

    merged = tmp_path / "merged"
    assert main(["export", "--merge-lora", str(out), "--output", str(merged), "--base", str(tiny_dense)]) == 0
    export_yaml = tmp_path / "run_export.yaml"
    export_yaml.write_text(f"model_name_or_path: {tiny_dense}\noutput_dir: {out}\n")
    assert main(["export", str(export_yaml), "lora=True"]) == 0  # ERNIEKit style: output_dir/export
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged, dtype="float32")(ids), ours_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(load_model(out / "export", dtype="float32")(ids), ours_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fine_tuning", ["Full", "LoRA"])
def test_dpo_raises_chosen_minus_rejected_margin(tmp_path, tiny_moe, fine_tuning):
    data = dpo_erniekit(tmp_path / "dpo.jsonl")
    out = tmp_path / "run"
    train(make_config(tiny_moe, out, data, stage="DPO", fine_tuning=fine_tuning, learning_rate=2e-3, beta=0.1,
                      sft_loss_ratio=0.1, max_steps=6, lora_target_modules="q_proj,k_proj,v_proj,o_proj"))
    rec = metrics(out)
    assert rec[-1]["rewards_margin"] > rec[0]["rewards_margin"]
    assert {"dpo_loss", "sft_loss", "rewards_accuracy"} <= set(rec[-1])
    if fine_tuning == "Full":
        assert dpo_margin(out, data) > dpo_margin(tiny_moe, data) + 1.0
        return
    # a MoE adapter on the attention projections round-trips through peft on transformers' MoE model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32), out).eval()
    ours = load_model(tiny_moe, dtype="float32")
    load_adapter(ours, out)
    ids = torch.randint(5, 500, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not torch.allclose(ours(ids), load_model(tiny_moe, dtype="float32")(ids), atol=1e-3)
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, tiny_moe):
    data = sft_erniekit(tmp_path / "sft.jsonl")
    common = {"batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 6, "save_steps": 3,
              "lr_scheduler_type": "cosine", "warmup_steps": 2, "moe_use_aux_free": True, "moe_aux_loss_lambda": 0.01,
              "fine_tuning": "LoRA", "lora_dropout": 0.1}
    full = train(make_config(tiny_moe, tmp_path / "a", data, **common))
    assert (tmp_path / "a" / "checkpoint-3" / "trainer_state.json").is_file()
    resumed = train(make_config(tiny_moe, tmp_path / "b", data, resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"),
                                **common))
    a = [h["loss"] for h in full["history"]]
    b = [h["loss"] for h in resumed["history"]]
    assert len(b) == 6 and b[:3] == a[:3]
    assert b[3:] == pytest.approx(a[3:], rel=1e-6, abs=1e-7)


def test_atomic_checkpoints_and_save_total_limit(tmp_path, tiny_dense):
    data = sft_erniekit(tmp_path / "sft.jsonl")
    out = tmp_path / "run"
    train(make_config(tiny_dense, out, data, max_steps=6, save_steps=2, save_total_limit=2, batch_size=2))
    names = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-4", "checkpoint-6"]  # no leftover temp dirs, oldest pruned
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and "data_position" in state


def test_cli_train_plot_and_config_errors(tmp_path, tiny_dense, capsys):
    data = sft_erniekit(tmp_path / "sft.jsonl")
    out = tmp_path / "run"
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(f"stage: SFT\nmodel_name_or_path: {tiny_dense}\ntrain_dataset_type: erniekit\n"
                         f"train_dataset_path: {data}\noutput_dir: {out}\nmax_seq_len: 64\nbatch_size: 4\n"
                         f"learning_rate: 1.0e-3\ndisable_tqdm: true\n")
    assert main(["train", str(yaml_path), "max_steps=2"]) == 0
    assert (out / "config.json").is_file() and len(metrics(out)) == 2
    assert main(["plot", str(out)]) == 0
    assert main(["train", str(yaml_path), "max_step=2"]) == 1
    assert "unknown key 'max_step'; did you mean 'max_steps'?" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"src": ["a"], "tgt": ["b"]}\n{"src": "a", "tgt": 3}\n')
    assert main(["train", str(yaml_path), f"train_dataset_path={bad}"]) == 1
    assert f"{bad}:2: field 'tgt' must be a non-empty list of strings" in capsys.readouterr().err


def test_qat_sft_exports_a_packed_checkpoint_that_matches_its_training_forward(tmp_path, tiny_moe):
    """QAT: SFT with 4-bit fake-quantized linears; the output is the packed format `ernie45 quantize` writes, and
    its logits equal the trained fake-quantized model's (the grids the training saw)."""
    from ernie45.training.trainer import Trainer

    data = sft_erniekit(tmp_path / "sft.jsonl")
    out = tmp_path / "run"
    trainer = Trainer(make_config(tiny_moe, out, data, fine_tuning="QAT", qat_bits=4, qat_group_size=16,
                                  max_steps=8))
    trainer.train()
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 16 and qcfg["modules"]
    packed = load_model(out, dtype="float32")
    assert any(name.endswith(".qweight") for name, _ in packed.named_parameters())
    assert sft_nll(out, data) < sft_nll(tiny_moe, data) - 0.5  # the quantized model learned the SFT data
    ids = torch.randint(5, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fake_quantized = trainer.base.eval()(ids)
        torch.testing.assert_close(packed(ids), fake_quantized, rtol=1e-4, atol=1e-4)


def test_sft_lora_on_routed_experts_raises_likelihood_and_exports(tmp_path, tiny_moe):
    """`lora_target_modules: experts` trains adapters on the stacked expert weights alone; the adapter lowers the
    SFT data's NLL and `ernie45 export --merge-lora` folds it into a checkpoint with the same logits."""
    data = sft_erniekit(tmp_path / "sft.jsonl")
    out = tmp_path / "run"
    train(make_config(tiny_moe, out, data, fine_tuning="LoRA", lora_rank=4, lora_alpha=8, learning_rate=1e-2,
                      lora_target_modules="experts", lora_dropout=0.0, max_steps=8))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert sft_nll(tiny_moe, data, adapter=out) < sft_nll(tiny_moe, data) - 0.2
    assert main(["export", "--merge-lora", str(out), "--base", str(tiny_moe), "--output", str(tmp_path / "m")]) == 0
    ours = load_model(tiny_moe, dtype="float32")
    load_adapter(ours, out)
    ids = torch.randint(5, 500, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "m", dtype="float32")(ids), ours(ids), rtol=1e-4, atol=1e-4)
