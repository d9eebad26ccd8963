"""The training loop for PT, SFT and DPO, full or LoRA, on 1 or N processes (torchrun).

step = load micro-batches -> global normalisers (all-reduce) -> forward/backward per micro-batch (gradient sync on
the last only) -> clip -> AdamW -> schedule -> aux-free bias update -> log / eval / checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model, save_model
from ..kernels import blas
from ..models.layers import cpu_has_fast_half
from ..quant.qat import convert_qat, prepare_qat
from ..tokenizer import load_tokenizer
from . import distributed as D
from .checkpointing import load_checkpoint, resolve_resume, save_checkpoint
from .config import TrainConfig, split_list
from .data import Encoder, EvalData, TrainData
from .forward import TrainingModel, moe_blocks
from .lora import adapter_state_dict, adapters_disabled, apply_lora, peft_mismatch, save_adapter
from .losses import update_correction_bias
from .metrics import MetricsLogger
from .objectives import Objective, counts
from .optim import build_optimizer, build_scheduler, optimizer_step
from .plot import plot_run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast only where the device computes bf16 natively; else fp32 (None)."""
    if cfg.compute_type != "bf16":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_half(torch.bfloat16) else None


class Trainer:
    def __init__(self, cfg: TrainConfig, model_transform=None):
        """`model_transform(model, cfg)`: an optional hook run on the built model before LoRA / sharding (e.g.
        QAT's prepare step)."""
        self.cfg = cfg
        self.info = D.init_distributed()
        self.run_dir = Path(cfg.output_dir)
        if cfg.accepted_hints and self.info.is_main:
            print("config: accepted with no effect here (Paddle kernel / loader / logging options, or the default "
                  "of a feature not implemented): " + ", ".join(f"{k}={v}" for k, v in cfg.accepted_hints.items()))
        if self.info.device.type == "cpu" and self.info.is_main:
            print(f"CPU fp32 GEMMs: {blas.describe()} (ERNIE45_BLAS)")
        seed_everything(cfg.seed)
        self.tokenizer = load_tokenizer(_resolve(cfg.model_name_or_path))
        base = load_model(cfg.model_name_or_path, dtype="float32", device=self.info.device)
        base.train()
        self.source_dir = base.source_dir
        if model_transform is not None:
            model_transform(base, cfg)
        if cfg.qat:
            prepare_qat_for(base, cfg)
        self.lora = cfg.fine_tuning == "LoRA"
        if self.lora:
            apply_lora(base, cfg.target_modules, cfg.lora_rank, cfg.lora_scale_alpha, cfg.lora_dropout, cfg.seed)
            remapped = peft_mismatch(base, cfg.target_modules)
            if remapped and self.info.is_main:
                print(f"note: LoRA on {', '.join(remapped)} of a MoE model loads in ernie45 and merges with "
                      f"`ernie45 export`, but peft remaps these names to the fused experts on transformers' "
                      f"Ernie4_5_MoeForCausalLM; use q_proj,k_proj,v_proj,o_proj for a peft-loadable adapter")
        reference, reference_ctx = None, None
        if cfg.stage == "DPO" and not cfg.reference_free:
            if self.lora:
                reference_ctx = lambda: adapters_disabled(base)
            else:
                ref_model = copy.deepcopy(base).eval().requires_grad_(False)
                reference = TrainingModel(ref_model)
        self.base = base
        orth = cfg.moe_group_orthogonal_loss if cfg.moe_orthogonal_loss_lambda else None
        module = TrainingModel(base, mtp=cfg.multi_token_pred_lambda > 0 and cfg.stage != "DPO", orthogonal_group=orth)
        self.mtp_depths = base.model.num_mtp_layers if module.mtp else 0
        if cfg.recompute:
            D.apply_activation_checkpointing(base.model.layers)
        if self.info.enabled:
            module = D.apply_fsdp(module, self.info) if cfg.fsdp else D.apply_ddp(module, self.info)
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(module, cfg)

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        encoder = Encoder(self.tokenizer, cfg.max_seq_len, cfg.max_prompt_len)
        self.data = TrainData(cfg, encoder, pad_id, self.info.world_size)
        self.eval_data = EvalData(cfg, encoder, pad_id) if cfg.eval_dataset_path and cfg.do_eval else None
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.num_train_epochs * self.data.steps_per_epoch))
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        n_micro = cfg.gradient_accumulation_steps * self.info.world_size
        self.objective = Objective(cfg, module, base, n_micro, reference, reference_ctx, self.mtp_depths)
        self.blocks = moe_blocks(base)
        self.amp = autocast_dtype(cfg, self.info.device)
        if cfg.compute_type == "bf16" and self.amp is None and self.info.is_main:
            print(f"compute_type bf16: {self.info.device.type} has no native bf16 matmul here; training in fp32")
        self.step = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ one optimizer step
    def _sync_ctx(self, last: bool):
        m = self.module
        if not self.info.enabled:
            return contextlib.nullcontext()
        if hasattr(m, "no_sync"):  # DDP
            return contextlib.nullcontext() if last else m.no_sync()
        m.set_requires_gradient_sync(last)  # FSDP2
        return contextlib.nullcontext()

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=self.amp)

    def train_step(self) -> dict:
        cfg, info = self.cfg, self.info
        micro = [{k: v.to(info.device) for k, v in b.items()} for b in self.data.micro_batches(self.step, info.rank)]
        denom: dict[str, float] = {}
        for b in micro:
            for k, v in counts(b, cfg, self.mtp_depths).items():
                denom[k] = denom.get(k, 0.0) + v
        denom = D.reduce_dict(denom, info)
        usage = [torch.zeros(b.gate.weight.shape[0], device=info.device) for b in self.blocks] \
            if cfg.moe_use_aux_free and self.blocks else None
        sums: dict[str, float] = {}
        for i, b in enumerate(micro):
            with self._sync_ctx(i == len(micro) - 1), self._autocast():
                loss, metrics = self.objective(b, denom, usage)
            # DDP / FSDP average gradients over ranks; our losses are already global means: undo the average.
            (loss * info.world_size).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        lr, grad_norm = optimizer_step(self.params, self.optimizer, self.scheduler, cfg.max_grad_norm)
        if usage is not None:
            for block, u in zip(self.blocks, usage):
                D.all_reduce_sum(u, info)
                update_correction_bias(block.moe_statics.e_score_correction_bias.data, u, cfg.moe_use_aux_free_update_coef)
        out = D.reduce_dict(sums, info)
        out.update({"lr": lr, "grad_norm": grad_norm, "tokens": denom["input_tokens"]})
        return out

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean eval loss over every eval target (pairs for DPO), perplexity for PT/SFT. Every rank runs the same
        number of forwards (FSDP needs that); filler batches carry weight 0."""
        info = self.info
        batches = self.eval_data.batches
        per_rank = math.ceil(len(batches) / info.world_size)
        self.module.eval()
        totals: dict[str, float] = {}
        for i in range(per_rank):
            idx = info.rank + i * info.world_size
            b = self.eval_data.collate(batches[idx if idx < len(batches) else 0])
            b = {k: v.to(info.device) for k, v in b.items()}
            denom = counts(b, self.cfg, self.mtp_depths)
            weight = 0.0 if idx >= len(batches) else denom["pairs"] if "pairs" in denom else denom["tokens"]
            with self._autocast():
                _, metrics = self.objective(b, denom)
            for k in _EVAL_KEYS:
                if k in metrics:
                    totals[k] = totals.get(k, 0.0) + metrics[k] * weight
            totals["_weight"] = totals.get("_weight", 0.0) + weight
        self.module.train()
        totals = D.reduce_dict(totals, info)
        weight = totals.pop("_weight", 0.0)
        out = {k: v / weight for k, v in totals.items()} if weight else {}
        if "lm_loss" in out:
            out["loss"] = out["lm_loss"]
            out["ppl"] = math.exp(min(out["lm_loss"], 50.0))
        elif "dpo_loss" in out:
            out["loss"] = out["dpo_loss"]
        return out

    # ------------------------------------------------------------------ loop
    def _trainer_state(self) -> dict:
        epoch, k = divmod(self.step, self.data.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "data_position": k * self.data.global_batch,
                "total_steps": self.total_steps, "history": self.history}

    def train(self) -> dict:
        cfg, info = self.cfg, self.info
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        resume = resolve_resume(cfg.resume_from_checkpoint, self.run_dir)
        if resume is not None:
            state = load_checkpoint(resume, self.module, self.optimizer, self.scheduler, info)
            self.step = state["step"]
            self.history = state.get("history", [])
        logger = MetricsLogger(self.run_dir, self.total_steps, self.step, info.is_main, not cfg.disable_tqdm)
        if info.is_main and self.data.stats.skipped:
            print(f"train data: skipped {self.data.stats.skipped} malformed line(s) of {self.data.stats.lines}")
        t0, tokens_since, steps_since = time.perf_counter(), 0.0, 0
        while self.step < self.total_steps:
            m = self.train_step()
            self.step += 1
            tokens_since += m["tokens"]
            steps_since += 1
            if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                dt = time.perf_counter() - t0
                record = {"step": self.step, "split": "train", **m, "tokens_per_s": tokens_since / max(dt, 1e-9),
                          "epoch": (self.step - 1) // self.data.steps_per_epoch}
                self.history.append({"step": self.step, "loss": m["loss"]})
                logger.log(record)
                logger.progress(steps_since, {"loss": m["loss"], "tok/s": round(record["tokens_per_s"])})
                t0, tokens_since, steps_since = time.perf_counter(), 0.0, 0
            if self.eval_data is not None and cfg.eval_steps and self.step % cfg.eval_steps == 0:
                logger.log({"step": self.step, "split": "eval", **self.evaluate()})
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                save_checkpoint(self.run_dir, self.step, self.module, self.optimizer, self.scheduler,
                                self._trainer_state(), info, cfg.save_total_limit)
        final_eval = {}
        if self.eval_data is not None and not (cfg.eval_steps and self.step % cfg.eval_steps == 0):
            final_eval = self.evaluate()
            logger.log({"step": self.step, "split": "eval", **final_eval})
        logger.close()
        if cfg.save_steps:
            save_checkpoint(self.run_dir, self.step, self.module, self.optimizer, self.scheduler,
                            self._trainer_state(), info, cfg.save_total_limit)
        self.save_outputs()
        if info.is_main:
            plot_run(self.run_dir)
        return {"steps": self.step, "history": self.history, "eval": final_eval}

    # ------------------------------------------------------------------ outputs
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded parameters (names of the Ernie45ForCausalLM), on rank 0's CPU; all ranks must call this."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.info.enabled:
            sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = {k: v.detach() for k, v in self.module.state_dict().items()}
        prefix = "module." if any(k.startswith("module.") for k in sd) else ""
        # QAT's parametrizations keep the trained weight as `<owner>.parametrizations.<name>.original`.
        return {_QAT_NAME.sub(r".\1", k.removeprefix(prefix).removeprefix("model.")): v for k, v in sd.items()}

    def save_outputs(self) -> None:
        """output_dir gets the final HF checkpoint (Full) or PEFT adapter (LoRA), plus tokenizer files."""
        sd = self.full_state_dict()
        if not self.info.is_main:
            D.barrier(self.info)
            return
        tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=self.run_dir))
        try:
            if self.lora:
                save_adapter(adapter_state_dict(sd.items()), tmp, self.cfg.lora_rank, self.cfg.lora_scale_alpha,
                             self.cfg.lora_dropout, self.cfg.target_modules, str(self.cfg.model_name_or_path))
                self.tokenizer.save_pretrained(tmp)
            else:
                model = load_model(self.source_dir, dtype="float32")
                missing, unexpected = model.load_state_dict(sd, strict=False)
                if [k for k in missing if k != "lm_head.weight"] or unexpected:
                    raise RuntimeError(f"final weights do not match the model: missing {missing}, unexpected {unexpected}")
                model.generation_config = getattr(self.base, "generation_config", {})
                if self.cfg.qat:
                    # The trained full-precision weights, packed with the grids the training saw.
                    prepare_qat_for(model, self.cfg)
                    convert_qat(model)
                save_model(model, tmp / "model", tokenizer=self.tokenizer)
                for f in (tmp / "model").iterdir():
                    os.replace(f, tmp / f.name)
                (tmp / "model").rmdir()
            # config.json / adapter_config.json move last: a crash before leaves no loadable-looking output.
            files = sorted(tmp.iterdir(), key=lambda f: f.name in ("config.json", "adapter_config.json"))
            for f in files:
                os.replace(f, self.run_dir / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        D.barrier(self.info)


_QAT_NAME = re.compile(r"\.parametrizations\.(\w+)\.original$")


def prepare_qat_for(model, cfg: TrainConfig) -> None:
    """Fake-quantize the configured linears of `model` (ernie45.quant.qat)."""
    prepare_qat(model, cfg.qat_bits, cfg.qat_group_size or None, split_list(cfg.qat_targets))


_EVAL_KEYS = ("lm_loss", "mtp_loss", "dpo_loss", "sft_loss", "rewards_chosen", "rewards_rejected", "rewards_margin",
              "rewards_accuracy")


def _resolve(model: str) -> Path:
    from ..checkpoint.hub import resolve_model_path

    return resolve_model_path(model)


def train(cfg: TrainConfig, model_transform=None) -> dict:
    """Run a full training job from a config (1 process, or each torchrun process)."""
    if cfg.stage == "VL-SFT":
        from .vl_trainer import train_vl

        return train_vl(cfg)
    trainer = Trainer(cfg, model_transform)
    try:
        return trainer.train()
    finally:
        D.shutdown(trainer.info)
