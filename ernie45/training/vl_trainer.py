"""The VL-SFT loop (stage VL-SFT): an ERNIE 4.5 VL checkpoint fine-tuned (full or LoRA) on multimodal chatml data,
on one process or N (torchrun: DDP, each rank taking its share of every global batch).

step = encode this rank's micro-batches (images processed as at inference) -> forward/backward each (gradients
all-reduced on the last) -> clip -> AdamW -> schedule -> per-modality aux-free bias update (usage all-reduced) ->
log (metrics summed over ranks) -> eval / step checkpoint when due; at the end rank 0 writes the HF checkpoint or
the PEFT adapter (plus tokenizer and processor files) to output_dir. `freeze_vision` keeps the vision tower fixed;
`recompute` re-runs the language-model layers in backward; epochs concatenate or mix (`train_dataset_prob`) files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from ..checkpoint import load_model, save_model
from ..models.ernie45_vl import Ernie45VLForConditionalGeneration
from ..processing import load_processors
from ..tokenizer import load_tokenizer
from . import distributed as D
from .checkpointing import load_checkpoint, resolve_resume, save_checkpoint
from .config import ConfigError, TrainConfig, split_list
from .data.readers import ReadStats
from .data.vl_sft import VLEncoder, collate_vl, read_vl_records
from .lora import adapter_state_dict, apply_lora, save_adapter
from .losses import IGNORE, update_correction_bias
from .metrics import MetricsLogger
from .optim import build_optimizer, build_scheduler, optimizer_step
from .plot import plot_run
from .trainer import _resolve, autocast_dtype, seed_everything
from .vl_objective import MODALITIES, VLObjective, VLTrainingModel, vl_targets

PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


class VLTrainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info = D.init_distributed()
        self.run_dir = Path(cfg.output_dir)
        seed_everything(cfg.seed)
        source = _resolve(cfg.model_name_or_path)
        self.tokenizer = load_tokenizer(source)
        base = load_model(source, dtype="float32", device=self.info.device)
        if not isinstance(base, Ernie45VLForConditionalGeneration):
            raise ConfigError(f"config: model_name_or_path: stage VL-SFT needs an ERNIE 4.5 VL checkpoint "
                              f"(model_type ernie4_5_vl_moe); {source} holds {type(base).__name__}")
        base.train()
        if cfg.freeze_vision:
            base.model.vision_tower.requires_grad_(False)
        self.lora = cfg.fine_tuning == "LoRA"
        if self.lora:
            # Adapters on the named Linears of the language model (q/k/v/o_proj; the dense and shared-expert MLPs),
            # everything else frozen; PEFT applies them to transformers' Ernie4_5_VLMoeForConditionalGeneration.
            apply_lora(base, cfg.target_modules, cfg.lora_rank, cfg.lora_scale_alpha, cfg.lora_dropout, cfg.seed)
        self.base, self.source_dir = base, source
        orth = cfg.moe_group_orthogonal_loss if cfg.moe_orthogonal_loss_lambda else None
        self.module = VLTrainingModel(base, orthogonal_group=orth)
        self.eval_objective = VLObjective(cfg, self.module, 1)  # the unwrapped module: no DDP hooks in eval
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.module, cfg)
        self.blocks = self.module.blocks
        if cfg.recompute:
            D.apply_activation_checkpointing(base.model.language_model.layers)
        if self.info.enabled:
            if cfg.fsdp and self.info.is_main:
                print("VL-SFT on several processes: DDP (every rank holds the whole model; FSDP sharding is not "
                      "implemented for VL models)")
            # A micro-batch without images leaves the vision experts without gradient: DDP must look for those.
            self.module = D.apply_ddp(self.module, self.info, find_unused_parameters=True)

        self.read_stats = ReadStats()
        self.sources = [read_vl_records(path, cfg.skip_bad_lines, self.read_stats)
                        for path in split_list(cfg.train_dataset_path)]
        self.records = [r for source in self.sources for r in source]
        if self.read_stats.skipped and self.info.is_main:
            print(f"train data: skipped {self.read_stats.skipped} malformed line(s) of {self.read_stats.lines}")
        self.eval_records = [r for path in split_list(cfg.eval_dataset_path) for r in read_vl_records(path)] \
            if cfg.eval_dataset_path and cfg.do_eval else []
        image_processor, video_processor = load_processors(source)
        self.encoder = VLEncoder(self.tokenizer, base.config, image_processor, video_processor, cfg.max_seq_len)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.rank_batch = cfg.batch_size * cfg.gradient_accumulation_steps
        self.global_batch = self.rank_batch * self.info.world_size
        per_epoch = len(self.sample_order(0))
        self.steps_per_epoch = max(1, per_epoch // self.global_batch)
        if per_epoch < self.global_batch:
            raise ConfigError(f"config: batch_size: {per_epoch} VL-SFT samples per epoch are fewer than one step's "
                              f"batch_size x gradient_accumulation_steps x processes = {self.global_batch}")
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else \
            max(1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch))
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.objective = VLObjective(cfg, self.module, cfg.gradient_accumulation_steps * self.info.world_size)
        self.amp = autocast_dtype(cfg, self.info.device)
        self.step = 0
        self.history: list[dict] = []

    def sample_order(self, epoch: int) -> list[int]:
        """Indices into `records` for one epoch. Files are concatenated (each sample once), or with
        `train_dataset_prob` mixed as in the text stages: file i gives round(p_i x all samples) draws, cycling
        through its own shuffles, and the mix is shuffled. Seeded by seed and epoch (resume needs only the step)."""
        if not self.cfg.train_dataset_prob or len(self.sources) == 1:
            g = torch.Generator().manual_seed(self.cfg.seed + epoch)
            return torch.randperm(len(self.records), generator=g).tolist()
        rng = random.Random(self.cfg.seed * 1000003 + epoch)
        mixed, offset = [], 0
        for source, p in zip(self.sources, self.cfg.dataset_probs):
            want, draws = max(1, round(p * len(self.records))), []
            while source and len(draws) < want:
                perm = list(range(len(source)))
                rng.shuffle(perm)
                draws += perm
            mixed += [offset + i for i in draws[:want]]
            offset += len(source)
        rng.shuffle(mixed)
        return mixed

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share of step k's global batch, the next of a per-epoch shuffle (a partial tail is dropped)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch + self.info.rank * self.rank_batch
        order = self.sample_order(epoch)[start : start + self.rank_batch]
        bs = self.cfg.batch_size
        return [collate_vl([self.encoder.encode(self.records[i]) for i in order[j : j + bs]], self.pad_id)
                for j in range(0, len(order), bs)]

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=self.amp)

    def _sync_ctx(self, last: bool):
        """DDP all-reduces gradients on the last micro-batch of a step only."""
        if not self.info.enabled or last:
            return contextlib.nullcontext()
        return self.module.no_sync()

    def train_step(self) -> dict:
        cfg, info = self.cfg, self.info
        micro = [{k: v.to(info.device) for k, v in b.items()} for b in self.micro_batches(self.step)]
        counted = D.reduce_dict({"targets": sum(float((vl_targets(b) != IGNORE).sum()) for b in micro),
                                 "tokens": float(sum(int((b["segment_ids"] >= 0).sum()) for b in micro))}, info)
        blocks = self.blocks
        usage = [{m: torch.zeros(b.text_moe.gate.weight.shape[0], device=info.device) for m in MODALITIES}
                 for b in blocks] if cfg.moe_use_aux_free and blocks else None
        sums: dict[str, float] = {}
        for i, b in enumerate(micro):
            with self._sync_ctx(i == len(micro) - 1), self._autocast():
                loss, metrics = self.objective(b, counted["targets"], usage)
            # DDP averages gradients over ranks; the loss is already a global mean: undo the average.
            (loss * info.world_size).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        lr, grad_norm = optimizer_step(self.params, self.optimizer, self.scheduler, cfg.max_grad_norm)
        if usage is not None:
            for block, u in zip(blocks, usage):
                for modality, moe in (("text", block.text_moe), ("vision", block.vision_moe)):
                    D.all_reduce_sum(u[modality], info)
                    if bool(u[modality].any()):
                        update_correction_bias(moe.moe_statics.e_score_correction_bias.data, u[modality],
                                               cfg.moe_use_aux_free_update_coef)
        out = D.reduce_dict(sums, info)
        out.update({"lr": lr, "grad_norm": grad_norm, **counted})
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss over every assistant token of the eval data, and its perplexity. Ranks split the batches (in
        order, `batch_size` samples each) and the sums are added over ranks."""
        bs, info = self.cfg.batch_size, self.info
        starts = list(range(0, len(self.eval_records), bs))[info.rank :: info.world_size]
        self.module.train(False)
        nll, targets = 0.0, 0.0
        for start in starts:
            batch = collate_vl([self.encoder.encode(r) for r in self.eval_records[start : start + bs]], self.pad_id)
            batch = {k: v.to(info.device) for k, v in batch.items()}
            n = float((vl_targets(batch) != IGNORE).sum())
            with self._autocast():
                _, metrics = self.eval_objective(batch, n)
            nll, targets = nll + metrics["lm_loss"] * n, targets + n
        self.module.train(True)
        totals = D.reduce_dict({"nll": nll, "targets": targets}, info)
        loss = totals["nll"] / max(totals["targets"], 1.0)
        return {"loss": loss, "lm_loss": loss, "ppl": math.exp(min(loss, 50.0)), "targets": totals["targets"]}

    def _trainer_state(self) -> dict:
        epoch, k = divmod(self.step, self.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "data_position": k * self.global_batch,
                "total_steps": self.total_steps, "history": self.history}

    def _save_checkpoint(self) -> None:
        """Model, optimizer, scheduler, RNG and the step (the data position follows from it: the per-epoch
        shuffles are seeded), atomically (training/checkpointing.py)."""
        save_checkpoint(self.run_dir, self.step, self.module, self.optimizer, self.scheduler, self._trainer_state(),
                        self.info, self.cfg.save_total_limit)

    def train(self) -> dict:
        cfg = self.cfg
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if cfg.packing and self.info.is_main:
            print("VL-SFT: each sample gets its own (right-padded) row; packing does not apply")
        resume = resolve_resume(cfg.resume_from_checkpoint, self.run_dir)
        if resume is not None:
            state = load_checkpoint(resume, self.module, self.optimizer, self.scheduler, self.info)
            self.step, self.history = state["step"], state.get("history", [])
        logger = MetricsLogger(self.run_dir, self.total_steps, self.step, self.info.is_main,
                               self.info.is_main and not cfg.disable_tqdm)
        while self.step < self.total_steps:
            m = self.train_step()
            self.step += 1
            if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                logger.log({"step": self.step, "split": "train", **m})
                logger.progress(cfg.logging_steps, {"loss": m["loss"]})
            self.history.append({"step": self.step, "loss": m["loss"]})
            if self.eval_records and cfg.eval_steps and self.step % cfg.eval_steps == 0:
                logger.log({"step": self.step, "split": "eval", **self.evaluate()})
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                self._save_checkpoint()
        final_eval = {}
        if self.eval_records and not (cfg.eval_steps and self.step % cfg.eval_steps == 0):
            final_eval = self.evaluate()
            logger.log({"step": self.step, "split": "eval", **final_eval})
        logger.close()
        if cfg.save_steps:
            self._save_checkpoint()
        if self.info.is_main:
            self.save_outputs()
            plot_run(self.run_dir)
        D.barrier(self.info)
        return {"steps": self.step, "history": self.history, "eval": final_eval}

    def save_outputs(self) -> None:
        """output_dir gets the fine-tuned VL checkpoint (HF layout) or the PEFT adapter (LoRA), tokenizer and
        processor configs."""
        tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=self.run_dir))
        try:
            cfg = self.cfg
            if self.lora:
                save_adapter(adapter_state_dict(self.base.named_parameters()), tmp / "model", cfg.lora_rank,
                             cfg.lora_scale_alpha, cfg.lora_dropout, cfg.target_modules, str(cfg.model_name_or_path))
                self.tokenizer.save_pretrained(tmp / "model")
            else:
                save_model(self.base, tmp / "model", tokenizer=self.tokenizer)
            for name in PROCESSOR_FILES:
                if (self.source_dir / name).is_file():
                    shutil.copy2(self.source_dir / name, tmp / "model" / name)
            # config.json / adapter_config.json move last: a crash before leaves no loadable-looking output.
            last = ("config.json", "adapter_config.json")
            for f in sorted((tmp / "model").iterdir(), key=lambda f: f.name in last):
                os.replace(f, self.run_dir / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def train_vl(cfg: TrainConfig) -> dict:
    trainer = VLTrainer(cfg)
    try:
        return trainer.train()
    finally:
        D.shutdown(trainer.info)
