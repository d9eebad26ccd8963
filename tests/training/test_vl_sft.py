"""VL-SFT end to end on a tiny transformers-written VL checkpoint and generated PNG images: the loss falls, the
targets' likelihood rises, a frozen vision tower stays bit-identical, the router losses are balanced per modality,
bad lines name file:line, and the exported checkpoint loads in ernie45 and transformers with matching logits."""

from __future__ import annotations

import base64
import functools
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import ernie45
from ernie45.processing import load_processors
from ernie45.tokenizer import load_tokenizer
from ernie45.training import ConfigError, load_config, train
from ernie45.training.data.readers import DataError, ReadStats
from ernie45.training.data.vl_sft import VLEncoder, collate_vl, read_vl_records
from ernie45.training.losses import IGNORE
from ernie45.training.trainer import Trainer
from ernie45.training.vl_objective import VLObjective, VLTrainingModel, router_losses, vl_targets
from tests.tiny_checkpoint import make_tiny_vl_checkpoint

from .helpers import make_config, torchrun_two_processes, write_jsonl

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}


def _png(path, color, size):
    Image.new("RGB", size, color).save(path)
    return path


def _data_uri(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def vl_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl-data")
    (root / "img").mkdir()
    rows = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        _png(root / "img" / f"{name}.png", rgb, (56 + 28 * (i % 2), 56))  # two sizes
        rows.append({"messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"img/{name}.png"}},
                                         {"type": "text", "text": "What color is this?"}]},
            {"role": "assistant", "content": f"It is {name}."},
        ]})
    # an inline data: URI and a text-only line (routes every token to the text experts)
    rows.append({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                     {"type": "image_url", "image_url": {"url": _data_uri(COLORS["red"])}}]},
        {"role": "assistant", "content": "It is red."}]})
    rows.append({"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello"}]})
    # a video given as its frames (red, red, blue, blue)
    rows.append({"messages": [
        {"role": "user", "content": [{"type": "video", "video": [f"img/{c}.png" for c in ("red", "red", "blue", "blue")]},
                                     {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": "It turns from red to blue."}]})
    return write_jsonl(root / "train.jsonl", rows)


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    return make_tiny_vl_checkpoint(tmp_path_factory.mktemp("vl") / "model")


def _encoder(model_dir, model, max_seq_len=256):
    return VLEncoder(load_tokenizer(model_dir), model.config, *load_processors(model_dir), max_seq_len)


@torch.no_grad()
def _target_logprob(model_dir, data) -> float:
    """Mean log-prob of the SFT targets, through the plain inference forward of the saved checkpoint."""
    model = ernie45.load_model(model_dir, dtype="float32")
    enc = _encoder(model_dir, model)
    total, n = 0.0, 0
    for rec in read_vl_records(data):
        s = enc.encode(rec)
        logits = model(s.input_ids_T[None], s.media.get("pixel_values"), s.media.get("image_grid_thw"),
                       s.media.get("pixel_values_videos"), s.media.get("video_grid_thw"))[0]
        targets = vl_targets(collate_vl([s], 0))[0]
        keep = targets != IGNORE
        total += float(-F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        n += int(keep.sum())
    return total / n


@pytest.fixture(scope="module")
def trained(tiny_vl, vl_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vl-run")
    cfg = make_config(tiny_vl, out, vl_data, stage="VL-SFT", train_dataset_type="chatml", batch_size=3,
                      gradient_accumulation_steps=2, max_steps=10, max_seq_len=128, freeze_vision=True,
                      moe_aux_loss_lambda=1e-2, moe_z_loss_lambda=1e-3, moe_orthogonal_loss_lambda=1e-3,
                      moe_use_aux_free=True)
    result = train(cfg)
    return out, result


def test_vl_sft_loss_falls_and_targets_likelier(trained, tiny_vl, vl_data):
    out, result = trained
    losses = [h["loss"] for h in result["history"]]
    assert result["steps"] == 10
    assert losses[-1] < 0.5 * losses[0], losses
    assert _target_logprob(out, vl_data) > _target_logprob(tiny_vl, vl_data) + 1.0


def test_frozen_vision_tower_bit_identical_lm_changed(trained, tiny_vl):
    out, _ = trained
    before, after = load_file(str(tiny_vl / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    vision = [k for k in before if k.startswith("model.vision_model.")]  # the vision tower (released names)
    assert vision, sorted(before)[:10]
    for k in vision:
        assert torch.equal(before[k], after[k]), k
    changed = [k for k in before if k not in vision and not torch.equal(before[k], after[k])]
    assert any("embed_tokens" in k for k in changed)
    assert any("resampler" in k for k in changed)  # only the vision tower is frozen
    assert any("mlp.gate.weight_1" in k for k in changed)  # the vision router trained
    # aux-loss-free balancing moved both correction-bias rows (row 0 text experts, row 1 vision experts)
    for k in (k for k in before if k.endswith("e_score_correction_bias")):
        assert before[k].shape[0] == 2
        assert not torch.equal(before[k][0], after[k][0]) and not torch.equal(before[k][1], after[k][1]), k


@pytest.mark.parametrize("line", [1, 6], ids=["image", "video"])
def test_exported_checkpoint_matches_transformers(trained, vl_data, line):
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    out, _ = trained
    ours = ernie45.load_model(out, dtype="float32")
    hf = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    s = _encoder(out, ours).encode(read_vl_records(vl_data)[line])
    ids = s.input_ids_T[None]
    mm = torch.zeros_like(ids)
    mm[ids == ours.config.image_token_id] = 1
    mm[ids == ours.config.video_token_id] = 2
    assert int(mm.sum()) > 0
    inputs = dict(input_ids=ids, mm_token_type_ids=mm, moe_mm_token_type_ids=s.moe_types_T[None], **s.media)
    with torch.no_grad():
        ref, got = hf(**inputs).logits, ours(**inputs)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


def _hand_aux(x_NH, weight_EH, bias_1E, k) -> torch.Tensor:
    """E * sum_e mean_tokens(p_e) * count_e / N, written out with explicit per-token top-k."""
    probs = torch.softmax(x_NH.double() @ weight_EH.detach().double().T, -1)
    N, E = probs.shape
    counts = torch.zeros(E, dtype=torch.float64)
    for n in range(N):
        for e in torch.topk(probs[n] + bias_1E[0].double(), k).indices.tolist():
            counts[e] += 1
    return E * (probs.mean(0) * counts / N).sum()


def test_router_losses_per_modality_by_hand(tiny_vl, vl_data):
    model = ernie45.load_model(tiny_vl, dtype="float32")
    records = read_vl_records(vl_data)
    batch = collate_vl([_encoder(tiny_vl, model).encode(records[i]) for i in (0, 5, 1)], pad_id=0)
    assert bool((batch["segment_ids"] < 0).any()) and bool((batch["moe_types"] != 0).any())
    module = VLTrainingModel(model, orthogonal_group=False)
    inputs = []
    hooks = [b.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach())) for b in module.blocks]
    with torch.no_grad():
        out = module(batch, vl_targets(batch) != IGNORE)
        got = router_losses(out.routed, aux=True, z=False)
    for h in hooks:
        h.remove()

    vision = batch["moe_types"].reshape(-1) != 0
    real = batch["segment_ids"].reshape(-1) >= 0
    want = {"text": 0.0, "vision": 0.0}
    pooled = 0.0
    for block, x_BTH in zip(module.blocks, inputs):
        x = x_BTH.reshape(-1, x_BTH.shape[-1])
        for name, moe, rows in (("text", block.text_moe, real & ~vision), ("vision", block.vision_moe, vision)):
            want[name] += _hand_aux(x[rows], moe.gate.weight, moe.moe_statics.e_score_correction_bias, moe.gate.top_k)
        # One gate over every real token (what a text-only MoE would compute) is a different number.
        text = block.text_moe
        pooled += _hand_aux(x[real], text.gate.weight, text.moe_statics.e_score_correction_bias, text.gate.top_k)
    assert abs(float(got["aux_text"]) - float(want["text"])) < 1e-5
    assert abs(float(got["aux_vision"]) - float(want["vision"])) < 1e-5
    assert abs(float(pooled) - float(want["text"])) > 1e-3

    def orth(w):
        wn = w.detach().double() / w.detach().double().norm(dim=-1, keepdim=True)
        return ((wn @ wn.T - torch.eye(w.shape[0], dtype=torch.float64)) ** 2).mean()

    hand = sum(orth(b.text_moe.gate.weight) + orth(b.vision_moe.gate.weight) for b in module.blocks)
    assert abs(float(out.orthogonal) - float(hand)) < 1e-5


def test_malformed_lines_name_file_and_line(tmp_path, tiny_vl):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    missing = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "nope.png"}}]},
                            {"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "bad_image.jsonl", [good, missing])
    with pytest.raises(DataError, match=r"bad_image\.jsonl:2: .*nope\.png.* not found"):
        read_vl_records(path)
    bad_role = {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "bad_role.jsonl", [good, good, bad_role])
    with pytest.raises(DataError, match=r"bad_role\.jsonl:3: messages\[0\]\.role is 'robot'"):
        read_vl_records(path)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    undecodable = {"messages": [{"role": "user", "content": [{"type": "image", "image": "junk.png"}]},
                                {"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "junk.jsonl", [undecodable])
    record = read_vl_records(path)[0]
    model = ernie45.load_model(tiny_vl, dtype="float32")
    with pytest.raises(DataError, match=r"junk\.jsonl:1: .*not a decodable image"):
        _encoder(tiny_vl, model).encode(record)


def test_vl_config_checks(tmp_path, tiny_moe, tiny_vl, vl_data):
    cfg = load_config(Path(__file__).parents[2] / "examples/train/vl_sft.yaml")
    assert (cfg.stage, cfg.freeze_vision, cfg.train_dataset_type) == ("VL-SFT", True, "chatml")
    with pytest.raises(ConfigError, match="train_dataset_type: stage VL-SFT reads multimodal chatml"):
        make_config(tiny_vl, tmp_path, vl_data, stage="VL-SFT")
    with pytest.raises(ConfigError, match="freeze_vision: only applies to stage VL-SFT"):
        make_config(tiny_vl, tmp_path, vl_data, freeze_vision=True)
    with pytest.raises(ConfigError, match="QAT of VL models is not implemented"):
        make_config(tiny_vl, tmp_path, vl_data, stage="VL-SFT", train_dataset_type="chatml", qat=True)
    with pytest.raises(ConfigError, match="needs an ERNIE 4.5 VL checkpoint"):
        Trainer(make_config(tiny_moe, tmp_path, vl_data, stage="VL-SFT", train_dataset_type="chatml"))


def test_loss_only_on_assistant_tokens(tiny_vl, vl_data):
    model = ernie45.load_model(tiny_vl, dtype="float32")
    tok = load_tokenizer(tiny_vl)
    s = _encoder(tiny_vl, model).encode(read_vl_records(vl_data)[2])  # blue, an 84x56 image
    n_image = int((s.input_ids_T == model.config.image_token_id).sum())
    assert n_image == int(s.media["image_grid_thw"].prod()) // 4 > 0
    assert not bool(s.loss_mask_T[s.moe_types_T != 0].any())
    trained = tok.decode(s.input_ids_T[s.loss_mask_T].tolist(), skip_special_tokens=False)
    assert trained == "It is blue.<|end_of_sentence|>"
    assert s.positions_3T.shape == (3, len(s.input_ids_T))


def test_two_process_vl_sft_matches_one_process(tmp_path, tiny_vl, vl_data):
    """A real 2-process torchrun (gloo, DDP) on the same global batch gives the 1-process loss curve and final
    weights. Aux and z losses are per-micro-batch statistics (so they depend on the split by design); the
    orthogonal loss and the aux-free usage counts (all-reduced) do not.

    The two runs sum each gradient in another order (per rank, then all-reduced), so gradients differ by float
    noise delta (~1e-8 here). AdamW's step lr * g / (|g| + eps) moves by up to lr * delta / eps for that: with the
    default eps 1e-8 and lr 3e-3 that is up to 3e-3 per step for elements whose gradient is near zero (seen: 5e-4
    after 3 steps, 60 elements of 400k), so no weight tolerance is justified there. eps = 1e-2 bounds it by
    3e-9 per step, and makes the step proportional to the gradient for |g| < eps, so a wrongly scaled all-reduce
    (mean vs sum) would show, where Adam's scale invariance would hide it."""
    common = {"stage": "VL-SFT", "train_dataset_type": "chatml", "max_steps": 3, "max_seq_len": 128,
              "freeze_vision": True, "moe_orthogonal_loss_lambda": 1e-3, "moe_use_aux_free": True,
              "adam_epsilon": 1e-2}
    one = train(make_config(tiny_vl, tmp_path / "one", vl_data, batch_size=2, gradient_accumulation_steps=2, **common))
    cfg = make_config(tiny_vl, tmp_path / "two", vl_data, batch_size=1, gradient_accumulation_steps=2, **common)
    result = tmp_path / "two_result.json"
    torchrun_two_processes([(cfg, result)], timeout=300)
    a = [h["loss"] for h in one["history"]]
    b = [h["loss"] for h in json.loads(result.read_text())]
    assert len(b) == 3 and a[-1] < a[0] and max(abs(x - y) for x, y in zip(a, b)) < 2e-5, (a, b)
    one_sd = load_file(str(tmp_path / "one" / "model.safetensors"))
    two_sd = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert one_sd.keys() == two_sd.keys()
    for name, tensor in one_sd.items():
        torch.testing.assert_close(two_sd[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_recompute_gives_the_same_loss_curve(tmp_path, tiny_vl, vl_data):
    """`recompute: true` re-runs each language-model layer in backward: same losses, less activation memory."""
    common = {"stage": "VL-SFT", "train_dataset_type": "chatml", "max_steps": 3, "max_seq_len": 128, "batch_size": 2,
              "moe_aux_loss_lambda": 1e-2}
    plain = train(make_config(tiny_vl, tmp_path / "plain", vl_data, **common))
    recomputed = train(make_config(tiny_vl, tmp_path / "recompute", vl_data, recompute=True, **common))
    a, b = [h["loss"] for h in plain["history"]], [h["loss"] for h in recomputed["history"]]
    assert a[-1] < a[0] and b == pytest.approx(a, rel=1e-5, abs=1e-6)
    trainer = Trainer(make_config(tiny_vl, tmp_path / "check", vl_data, recompute=True, **common))
    assert all(isinstance(layer.forward, functools.partial) for layer in trainer.base.model.language_model.layers)


def test_skip_bad_lines_skips_and_counts(tmp_path, tiny_vl, vl_data, capsys):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    missing = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "nope.png"}}]},
                            {"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [good, missing, good])
    (tmp_path / "mixed.jsonl").write_text((tmp_path / "mixed.jsonl").read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: .*set skip_bad_lines: true"):
        read_vl_records(path)
    stats = ReadStats()
    assert len(read_vl_records(path, skip_bad_lines=True, stats=stats)) == 2
    assert (stats.lines, stats.skipped) == (4, 2)
    Trainer(make_config(tiny_vl, tmp_path / "run", path, stage="VL-SFT", train_dataset_type="chatml",
                          skip_bad_lines=True, batch_size=2))
    assert "train data: skipped 2 malformed line(s) of 4" in capsys.readouterr().out


def test_step_checkpoints_resume_the_loss_curve(tmp_path, tiny_vl, vl_data):
    """save_steps writes atomic checkpoints; resuming from step 2 reproduces steps 3-4 of the uninterrupted run."""
    common = {"stage": "VL-SFT", "train_dataset_type": "chatml", "max_steps": 4, "max_seq_len": 128, "batch_size": 2,
              "save_steps": 2, "moe_use_aux_free": True, "lr_scheduler_type": "cosine", "warmup_steps": 1}
    full = train(make_config(tiny_vl, tmp_path / "a", vl_data, **common))
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if "checkpoint" in p.name) == \
        ["checkpoint-2", "checkpoint-4"]  # no temp dirs left
    resumed = train(make_config(tiny_vl, tmp_path / "b", vl_data, resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"),
                                **common))
    a, b = [h["loss"] for h in full["history"]], [h["loss"] for h in resumed["history"]]
    assert len(b) == 4 and b == pytest.approx(a, rel=1e-6, abs=1e-7)


def test_eval_loss_is_the_saved_models_target_nll(tmp_path, tiny_vl, vl_data):
    """eval_dataset_path + eval_steps: eval records in metrics.jsonl; the last one is the mean NLL of the eval
    data's assistant tokens under the saved checkpoint (computed here through the plain inference forward)."""
    out = tmp_path / "run"
    result = train(make_config(tiny_vl, out, vl_data, stage="VL-SFT", train_dataset_type="chatml", max_steps=4,
                               max_seq_len=128, batch_size=2, eval_dataset_path=str(vl_data), eval_steps=2,
                               learning_rate=1e-3))
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and result["eval"] == {}
    assert evals[-1]["ppl"] == pytest.approx(math.exp(evals[-1]["loss"]))
    assert evals[-1]["loss"] == pytest.approx(-_target_logprob(out, vl_data), rel=1e-4)


def test_token_balance_loss_keeps_the_value_and_fixes_the_gradient_denominator(tiny_vl, vl_data, tmp_path):
    """token_balance_loss: the logged loss is still the mean over targets; the gradient is that of the sum over a
    fixed token_balance_seqlen x micro-batches, whatever the batch's target count.

    token_balance_seqlen = the batch's target count makes the fixed denominator (x 2 micro-batches) exactly twice
    the mean's, so the gradient must be exactly half: a power-of-two factor scales every rounded product and sum of
    the backward exactly, and the comparison is bit for bit. (With another factor, e.g. n / 2000, the two backwards
    round differently: an element summed from T terms moves by up to ~T * 2^-24 * sum|terms|, which for elements
    that cancel is far above any fixed atol; on an AVX2 CPU 1 of 40,960 elements came out 2.1e-9 off.)"""
    model = ernie45.load_model(tiny_vl, dtype="float32")
    batch = collate_vl([_encoder(tiny_vl, model).encode(r) for r in read_vl_records(vl_data)[:2]], 0)
    n_targets = int((vl_targets(batch) != IGNORE).sum())
    grads, values = [], []
    for balance in (False, True):
        cfg = make_config(tiny_vl, tmp_path, vl_data, stage="VL-SFT", train_dataset_type="chatml",
                          token_balance_loss=balance, token_balance_seqlen=n_targets)
        module = VLTrainingModel(model)
        model.zero_grad(set_to_none=True)
        loss, metrics = VLObjective(cfg, module, n_micro=2)(batch, float(n_targets))
        loss.backward()
        grads.append(model.lm_head.weight.grad.clone())
        values.append(metrics["lm_loss"])
    assert values[1] == values[0]
    assert grads[0].abs().max() > 0 and torch.equal(grads[1], grads[0] / 2)


def test_train_dataset_prob_mixes_files_by_probability(tmp_path, tiny_vl, vl_data):
    """Two files with train_dataset_prob 0.75,0.25: each epoch draws round(p x all samples) from each file (cycling
    the small one), shuffled; without probabilities the files are concatenated."""
    text_only = write_jsonl(vl_data.parent / "text_only.jsonl", [
        {"messages": [{"role": "user", "content": f"Count to {n}."}, {"role": "assistant", "content": "1 2 3"[: 2 * n]}]}
        for n in (1, 2)])
    both = f"{vl_data},{text_only}"
    common = {"stage": "VL-SFT", "train_dataset_type": "chatml", "max_seq_len": 128, "batch_size": 2}
    mixed = Trainer(make_config(tiny_vl, tmp_path / "m", both, train_dataset_prob="0.75,0.25", **common))
    n_vl, n_text = len(mixed.data.sources[0]), len(mixed.data.sources[1])
    for epoch in (0, 1):
        order = mixed.data.sample_order(epoch)
        from_text = sum(i >= n_vl for i in order)
        assert len(order) - from_text == round(0.75 * (n_vl + n_text)) and from_text == round(0.25 * (n_vl + n_text))
    assert mixed.data.sample_order(0) != mixed.data.sample_order(1)
    plain = Trainer(make_config(tiny_vl, tmp_path / "p", both, **common))
    assert sorted(plain.data.sample_order(0)) == list(range(n_vl + n_text))
    result = train(make_config(tiny_vl, tmp_path / "run", both, train_dataset_prob="0.75,0.25", max_steps=2, **common))
    assert len(result["history"]) == 2


def test_vl_sft_lora_adapter_round_trips_through_peft_and_merges(tmp_path, tiny_vl, vl_data):
    """fine_tuning: LoRA on a VL model: the loss falls, output_dir holds a PEFT adapter that peft
    applies to transformers' Ernie4_5_VLMoeForConditionalGeneration with ernie45's logits, and
    `ernie45 export --merge-lora` folds it into a VL checkpoint with the same logits."""
    from peft import PeftModel
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    from ernie45.cli.main import main
    from ernie45.training.lora import load_adapter

    out = tmp_path / "run"
    result = train(make_config(tiny_vl, out, vl_data, stage="VL-SFT", train_dataset_type="chatml", fine_tuning="LoRA",
                               lora_target_modules="q_proj,v_proj,o_proj", lora_rank=4, lora_alpha=8,
                               learning_rate=1e-2, max_steps=6, max_seq_len=128, batch_size=2))
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < losses[0]
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    ours = ernie45.load_model(tiny_vl, dtype="float32")
    load_adapter(ours, out)
    ids = torch.randint(5, 400, (1, 16), generator=torch.Generator().manual_seed(3))
    hf = PeftModel.from_pretrained(Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(tiny_vl, dtype=torch.float32),
                                   out).eval()
    with torch.no_grad():
        ours_logits = ours(ids)
        assert not torch.allclose(ours_logits, ernie45.load_model(tiny_vl, dtype="float32")(ids), atol=1e-3)
        torch.testing.assert_close(hf(input_ids=ids).logits, ours_logits, rtol=1e-4, atol=1e-4)
    assert main(["export", "--merge-lora", str(out), "--base", str(tiny_vl), "--output", str(tmp_path / "m")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(ernie45.load_model(tmp_path / "m", dtype="float32")(ids), ours_logits,
                                   rtol=1e-4, atol=1e-4)
