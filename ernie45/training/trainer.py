"""The one training loop of every stage and model family (PT, SFT, DPO, VL-SFT; full, LoRA or QAT), on 1 or N
processes (torchrun). What is trained and how its loss is computed is the task's (task.py: data + objective).

step = load micro-batches -> global normalisers (all-reduce) -> forward/backward per micro-batch (gradient sync on
the last only) -> clip -> AdamW -> schedule -> aux-free bias update -> log / eval / checkpoint; at the end the HF
checkpoint (Full) or PEFT adapter (LoRA) with tokenizer (and processor) files in output_dir.
"""

from __future__ import annotations

import contextlib
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
from ..checkpoint.hub import resolve_model_path
from ..kernels import blas
from ..models.layers import cpu_has_fast_half
from ..models.registry import spec_for
from ..quant.qat import convert_qat
from ..tokenizer import load_tokenizer
from . import distributed as D
from .checkpointing import load_checkpoint, resolve_resume, save_checkpoint
from .config import ConfigError, TrainConfig
from .lora import adapter_state_dict, apply_lora, peft_mismatch, save_adapter
from .metrics import MetricsLogger
from .mtp_layers import add_mtp_layers, freeze_all_but_mtp, mtp_depths
from .optim import build_optimizer, build_scheduler, optimizer_step
from .plot import plot_run
from .task import task_for
from .text_task import prepare_qat_for

# Files of a VL checkpoint's media processors, copied next to the trained weights.
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


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
        source = resolve_model_path(cfg.model_name_or_path)
        self.tokenizer = load_tokenizer(source)
        base = load_model(source, dtype="float32", device=self.info.device)
        task_class = task_for(cfg)
        task_class.check_model(spec_for(base), source)
        base.train()
        self.source_dir = base.source_dir
        if model_transform is not None:
            model_transform(base, cfg)
        task_class.prepare_model(base, cfg)
        if cfg.num_nextn_predict_layers and cfg.num_nextn_predict_layers > mtp_depths(base):
            if not spec_for(base).supports_mtp:
                raise ConfigError(f"num_nextn_predict_layers: {source} is a {base.config.model_type} model, which "
                                  f"has no MTP layers")
            add_mtp_layers(base, cfg.num_nextn_predict_layers, cfg.seed)
        if cfg.mtp_only and not freeze_all_but_mtp(base):
            raise ConfigError(f"mtp_only: {source} has no MTP layers; set num_nextn_predict_layers: 1 to add one")
        self.lora = cfg.fine_tuning == "LoRA"
        if self.lora:
            apply_lora(base, cfg.target_modules, cfg.lora_rank, cfg.lora_scale_alpha, cfg.lora_dropout, cfg.seed)
            remapped = peft_mismatch(base, cfg.target_modules)
            if remapped and self.info.is_main:
                print(f"note: LoRA on {', '.join(remapped)} of a MoE model loads in ernie45 and merges with "
                      f"`ernie45 export`, but peft remaps these names to the fused experts on transformers' "
                      f"Ernie4_5_MoeForCausalLM; use q_proj,k_proj,v_proj,o_proj for a peft-loadable adapter")
        self.base = base
        self.task = task = task_class(cfg, base, self.info, self.tokenizer, self.lora)
        self.data = task.data
        if self.data.stats.skipped and self.info.is_main:
            print(f"train data: skipped {self.data.stats.skipped} malformed line(s) of {self.data.stats.lines}")
        if cfg.recompute:
            D.apply_activation_checkpointing(task.decoder_layers)
        module = task.module
        if self.info.enabled:
            module = task.parallelize(module)
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(module, cfg)
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.num_train_epochs * self.data.steps_per_epoch))
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        task.bind(module, cfg.gradient_accumulation_steps * self.info.world_size)
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
        cfg, info, task = self.cfg, self.info, self.task
        micro = [{k: v.to(info.device) for k, v in b.items()} for b in self.data.micro_batches(self.step, info.rank)]
        denom = D.reduce_dict(task.normalisers(micro), info)
        usage = task.new_usage()
        sums: dict[str, float] = {}
        for i, b in enumerate(micro):
            with self._sync_ctx(i == len(micro) - 1), self._autocast():
                loss, metrics = task.loss(b, denom, usage)
            # DDP / FSDP average gradients over ranks; our losses are already global means: undo the average.
            (loss * info.world_size).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        lr, grad_norm = optimizer_step(self.params, self.optimizer, self.scheduler, cfg.max_grad_norm)
        if usage is not None:
            task.update_biases(usage)
        out = D.reduce_dict(sums, info)
        out.update({"lr": lr, "grad_norm": grad_norm, **task.step_metrics(denom)})
        return out

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        """The task's eval metrics (every rank must call this)."""
        self.module.eval()
        try:
            return self.task.evaluate(self._autocast)
        finally:
            self.module.train()

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
            if self.task.eval_data is not None and cfg.eval_steps and self.step % cfg.eval_steps == 0:
                logger.log({"step": self.step, "split": "eval", **self.evaluate()})
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                save_checkpoint(self.run_dir, self.step, self.module, self.optimizer, self.scheduler,
                                self._trainer_state(), info, cfg.save_total_limit)
        final_eval = {}
        if self.task.eval_data is not None and not (cfg.eval_steps and self.step % cfg.eval_steps == 0):
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
        """Unsharded parameters (names of the model), on rank 0's CPU; all ranks must call this."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.info.enabled:
            sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = {k: v.detach() for k, v in self.module.state_dict().items()}
        prefix = "module." if any(k.startswith("module.") for k in sd) else ""
        # QAT's parametrizations keep the trained weight as `<owner>.parametrizations.<name>.original`.
        return {_QAT_NAME.sub(r".\1", k.removeprefix(prefix).removeprefix("model.")): v for k, v in sd.items()}

    def save_outputs(self) -> None:
        """output_dir gets the final HF checkpoint (Full) or PEFT adapter (LoRA), plus tokenizer files (and a VL
        checkpoint's processor configs)."""
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
                if mtp_depths(self.base) > mtp_depths(model):
                    add_mtp_layers(model, mtp_depths(self.base))  # weights come from `sd` below
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
            for name in PROCESSOR_FILES:
                if (self.source_dir / name).is_file():
                    shutil.copy2(self.source_dir / name, tmp / name)
            # config.json / adapter_config.json move last: a crash before leaves no loadable-looking output.
            files = sorted(tmp.iterdir(), key=lambda f: f.name in ("config.json", "adapter_config.json"))
            for f in files:
                os.replace(f, self.run_dir / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        D.barrier(self.info)


_QAT_NAME = re.compile(r"\.parametrizations\.(\w+)\.original$")


def train(cfg: TrainConfig, model_transform=None) -> dict:
    """Run a full training job from a config (1 process, or each torchrun process)."""
    trainer = Trainer(cfg, model_transform)
    try:
        return trainer.train()
    finally:
        D.shutdown(trainer.info)
