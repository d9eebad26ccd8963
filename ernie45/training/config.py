"""Training configuration: one flat YAML file with ERNIEKit's key names -> `TrainConfig`.

An ERNIEKit user's config runs unchanged where the feature exists. Unknown keys are an error naming the key (with
a did-you-mean); ERNIEKit keys this trainer does not implement are a clear "not supported" error, never ignored.
Command-line overrides `key=value` are parsed as YAML scalars and applied before validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("PT", "SFT", "DPO", "VL-SFT")
FINE_TUNING = ("Full", "LoRA")
DATASET_TYPES = ("erniekit", "alpaca", "chatml", "text")
SCHEDULERS = ("linear", "cosine", "wsd", "constant")
COMPUTE_TYPES = ("fp32", "bf16")
DPO_LOSS_TYPES = ("sigmoid", "ipo")

# ERNIEKit keys for features not implemented here: key -> (values that mean "off", so configs stating the default
# still run; reason). Any other value is a "not supported" error.
NOT_SUPPORTED = {
    "tensor_parallel_degree": ({1}, "tensor parallelism is not implemented; FSDP2 shards over all torchrun processes"),
    "tensor_model_parallel_size": ({1}, "tensor parallelism is not implemented; FSDP2 shards over all processes"),
    "pipeline_parallel_degree": ({1}, "pipeline parallelism is not implemented; FSDP2 shards over all processes"),
    "pipeline_model_parallel_size": ({1}, "pipeline parallelism is not implemented"),
    "virtual_pp_degree": ({1}, "pipeline parallelism is not implemented"),
    "expert_model_parallel_size": ({1}, "expert parallelism is not implemented"),
    "context_parallel_size": ({1}, "context parallelism is not implemented"),
    "sharding_parallel_degree": (set(), "torchrun's process count sets the FSDP2 degree; remove this key"),
    "sequence_parallel": ({False}, "sequence parallelism is not implemented"),
    "use_expert_parallel": ({False}, "expert parallelism is not implemented"),
    "offload_optim": ({False}, "optimizer offload is not implemented"),
    "fp16": ({False}, "fp16 training is not supported; use compute_type: bf16 or fp32"),
    "recompute_granularity": ({"full"}, "only full-layer recompute is implemented (recompute: true)"),
    "layerwise_lr_decay_bound": ({1}, "layer-wise lr decay is not implemented"),
    "mix_strategy": ({"random"}, "only weighted random mixing (train_dataset_prob) is implemented"),
    "offset_alpha": ({0}, "DPO offset is not implemented"),
    "ref_model_update_steps": ({-1}, "reference model updates are not implemented; the reference is the start model"),
    "label_smoothing": ({0}, "DPO label smoothing is not implemented"),
    "normalize_logps": ({False}, "length-normalised DPO log-probs are not implemented"),
    "dpop_lambda": ({0}, "DPOP is not implemented"),
    "multimodal": ({False}, "multimodal training is stage: VL-SFT (with train_dataset_type: chatml); remove this key"),
    "template": (set(), "the checkpoint's own chat template is used; custom templates are not supported"),
}
# ERNIEKit keys that tune Paddle's kernels, data loader or logging and change no result: accepted, listed at start.
NO_EFFECT = {
    "fuse_rope", "fuse_linear", "fuse_rms_norm", "fuse_swiglu", "use_flash_attention", "use_sparse_flash_attn",
    "_attn_implementation", "use_sparse_head_and_loss_fn", "use_fused_head_and_loss_fn", "release_grads",
    "distributed_dataloader", "dataloader_num_workers", "prefetch_factor", "logging_dir", "evaluation_strategy",
    "save_strategy", "max_evaluate_steps", "eval_iters", "eval_accumulation_steps", "per_device_eval_batch_size",
    "eval_batch_size", "unified_checkpoint", "unified_checkpoint_config", "fp16_opt_level", "amp_master_grad",
    "amp_custom_white_list", "amp_custom_black_list", "greedy_intokens", "buffer_size", "random_shuffle",
    "num_samples_each_epoch", "use_template", "padding_free", "truncate_packing", "recompute_method",
    "recompute_num_layers", "sharding", "save_checkpoint_format", "load_checkpoint_format", "moe_group",
    "use_huggingface_model", "save_hf_steps", "split", "weight_quantize_algo",
    "simpo_gamma",  # read only by loss_type simpo, which is rejected
}
# ERNIEKit / PaddleNLP spellings of our keys.
ALIASES = {"per_device_train_batch_size": "batch_size"}
_CASE = {"fine_tuning": {"full": "Full", "lora": "LoRA", "qat": "QAT"},
         "stage": {"pt": "PT", "sft": "SFT", "dpo": "DPO", "vl-sft": "VL-SFT"}}
_NOT_SUPPORTED_VALUES = {
    ("loss_type", "kto_pair"): "loss_type kto_pair is not implemented; use sigmoid or ipo",
    ("compute_type", "fp16"): "compute_type fp16 is not supported; use bf16 or fp32",
    ("compute_type", "fp8"): "compute_type fp8 (FP8 QAT) is not supported yet",
    ("compute_type", "wint8"): "compute_type wint8 (weight-only LoRA) is not supported yet",
    ("compute_type", "wint4/8"): "compute_type wint4/8 is not supported yet",
    ("compute_type", "nf4"): "compute_type nf4 is not supported yet",
}


class ConfigError(ValueError):
    """A config problem, with the file and key it concerns in the message."""


@dataclass
class TrainConfig:
    """Every setting of `ernie45 train`, named as in ERNIEKit."""

    # ### model
    model_name_or_path: str = ""
    """Checkpoint directory (HF layout) or hub id to start from."""
    stage: str = "SFT"
    """PT (plain-text pretraining), SFT (supervised fine-tuning), DPO (preference optimisation) or VL-SFT (SFT of an
    ERNIE 4.5 VL model on multimodal chatml data)."""
    fine_tuning: str = "Full"
    """Full (all weights) or LoRA (low-rank adapters on `lora_target_modules`)."""
    freeze_vision: bool = False
    """VL-SFT: keep the vision tower's weights fixed (the resampler and the language model still train)."""
    # ### data
    train_dataset_type: str = "erniekit"
    """Format of each train dataset (comma-separated, one per path): erniekit, alpaca, chatml or text."""
    train_dataset_path: str = ""
    """Train data files (.jsonl / .json / .txt), comma-separated."""
    train_dataset_prob: str = ""
    """Sampling weight of each train dataset, comma-separated (default: equal)."""
    eval_dataset_type: str = ""
    """Format of each eval dataset (default: the train type)."""
    eval_dataset_path: str = ""
    """Eval data files, comma-separated; empty disables eval."""
    eval_dataset_prob: str = ""
    """Accepted for ERNIEKit configs; eval reads every eval file in full."""
    max_seq_len: int = 2048
    """Tokens per training sequence; longer SFT samples keep their start, DPO prompts keep their end."""
    packing: bool = True
    """Pack several samples into each sequence (no attention across samples, positions restart)."""
    skip_bad_lines: bool = False
    """Skip malformed data lines (their count is reported) instead of stopping with file:line."""
    max_prompt_len: int = 0
    """DPO: most prompt tokens kept (0: max_seq_len // 2)."""
    # ### optimisation
    batch_size: int = 1
    """Sequences per device per micro-step."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""
    max_steps: int = -1
    """Optimizer steps; -1 means derived from num_train_epochs."""
    num_train_epochs: float = 1.0
    """Passes over the train data when max_steps is -1."""
    learning_rate: float = 3e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay schedules."""
    lr_scheduler_type: str = "cosine"
    """linear, cosine, wsd (warmup-stable-decay) or constant; all with linear warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    decay_steps: int = 0
    """WSD: steps of the final decay (0: 10% of max_steps)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to norms, biases and the correction bias)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    moe_gate_lr_ratio: float | None = None
    """Router (gate) learning rate = this x learning_rate (ERNIE pretraining: 0.01); None: 1."""
    # ### MoE and MTP losses (ERNIE / Paddle key names)
    moe_aux_loss_lambda: float = 0.0
    """Coefficient of the load-balance loss E * sum_e mean(p_e) * f_e."""
    moe_z_loss_lambda: float = 0.0
    """Coefficient of the router z-loss mean(logsumexp(logits)^2)."""
    moe_orthogonal_loss_lambda: float = 0.0
    """Coefficient of the router orthogonal loss ||W W^T - I||^2 / numel over row-normalised gate weights."""
    moe_group_orthogonal_loss: bool = False
    """Orthogonal loss within k groups of E/k experts (W reshaped to [k, E/k, H])."""
    moe_use_aux_free: bool = False
    """Aux-loss-free balancing: after each step, bias += coef * sign(mean(usage) - usage)."""
    moe_use_aux_free_update_coef: float = 0.001
    """Step of the aux-loss-free correction-bias update."""
    token_balance_loss: bool = False
    """Gradient of sum(token_loss) / token_balance_seqlen (every token weighs the same); the mean is logged."""
    token_balance_seqlen: int = 0
    """Denominator of the token-balanced loss (0: max_seq_len * batch_size)."""
    multi_token_pred_lambda: float = 0.3
    """Weight of the MTP loss when the model has MTP layers."""
    num_nextn_predict_layers: int | None = None
    """MTP depths to train (None: the checkpoint's own). More than the checkpoint has adds fresh MTP layers."""
    mtp_only: bool = False
    """Train only the MTP layers: the base model (embedding, final norm and LM head included) stays fixed, so its
    outputs are unchanged and the trained head drafts for speculative decoding."""
    # ### LoRA
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = -1
    """LoRA scale numerator (scale = alpha / r); -1 means alpha = 2 * r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target_modules: str | list = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """Linear module names (last name component) that get adapters, comma-separated or a list; on MoE models also
    `experts` (the routed experts' stacked gate_up_proj and down_proj, PEFT `target_parameters`) or one of
    `experts.gate_up_proj` / `experts.down_proj` (these need lora_dropout 0)."""
    # ### QAT
    qat: bool = False
    """Quantization-aware training: the `qat_targets` weights are fake-quantized (straight-through estimator) in
    every forward, and output_dir gets the packed quantized checkpoint (`ernie45 quantize`'s format).
    `fine_tuning: QAT` is the same as `fine_tuning: Full` with `qat: true`."""
    qat_bits: int = 4
    """QAT weight bits: 8, 4 or 2."""
    qat_group_size: int = 0
    """QAT quantization group along the input dim; 0: the default for the bits (int8 per channel, int4 128, 2-bit 64)."""
    qat_targets: str | list = "*.self_attn.*,*.mlp.*"
    """Module-name patterns (fnmatch) whose linears are fake-quantized; never embeddings, lm_head or router gates."""
    # ### DPO
    beta: float = 0.1
    """DPO inverse temperature."""
    loss_type: str = "sigmoid"
    """DPO loss: sigmoid (DPO) or ipo."""
    sft_loss_ratio: float = 0.0
    """Weight of an SFT (chosen-response NLL) term added to the DPO loss."""
    reference_free: bool = False
    """DPO without a reference model (reference log-probs taken as 0)."""
    # ### performance
    compute_type: str = "fp32"
    """bf16 (autocast where the device computes bf16, else fp32) or fp32."""
    recompute: bool = False
    """Activation checkpointing of every decoder layer."""
    fsdp: bool = True
    """Shard the model with FSDP2 when launched on several processes (False: DDP)."""
    # ### output
    output_dir: str = "output"
    """Run directory: checkpoints, metrics.jsonl, loss curve, and the final HF checkpoint (or LoRA adapter)."""
    logging_steps: int = 1
    """Log train metrics every this many optimizer steps."""
    save_steps: int = 0
    """Write a resumable checkpoint every this many steps; 0: only at the end."""
    save_total_limit: int = 0
    """Keep at most this many step checkpoints (oldest removed); 0 keeps all."""
    eval_steps: int = 0
    """Evaluate every this many steps (0: only at the end, when eval data is given)."""
    seed: int = 42
    """Seed of weights init (LoRA), data order and dropout."""
    resume_from_checkpoint: str | None = None
    """A checkpoint directory to resume from, or 'auto' for the newest in output_dir."""
    do_train: bool = True
    """Accepted for ERNIEKit configs; training always runs."""
    do_eval: bool = True
    """Run evaluation when eval data is given."""
    disable_tqdm: bool = False
    """No progress bar."""
    accepted_hints: dict = field(default_factory=dict)
    """Filled by the loader: ERNIEKit performance/logging keys accepted with no effect here (printed at start)."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "config") -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{source}: {key}: {msg}")

        if self.fine_tuning == "QAT":  # full fine-tuning with fake-quantized weights
            self.fine_tuning, self.qat = "Full", True

        for (key, value), msg in _NOT_SUPPORTED_VALUES.items():
            if str(getattr(self, key)) == value:
                raise bad(key, f"{msg} (not supported)")
        if self.stage not in STAGES:
            raise bad("stage", f"{self.stage!r} is not one of {', '.join(STAGES)}")
        if self.fine_tuning not in FINE_TUNING:
            raise bad("fine_tuning", f"{self.fine_tuning!r} is not one of {', '.join(FINE_TUNING)}, QAT")
        if self.qat and self.qat_bits not in (8, 4, 2):
            raise bad("qat_bits", f"{self.qat_bits} is not one of 8, 4, 2")
        if self.qat and self.fine_tuning == "LoRA":
            raise bad("qat", "QAT trains the full weights; it cannot be combined with fine_tuning: LoRA")
        if self.qat and self.qat_group_size < 0:
            raise bad("qat_group_size", f"must be >= 0 (0: the default for the bits), got {self.qat_group_size}")
        for key in ("train_dataset_type", "eval_dataset_type"):
            for t in split_list(getattr(self, key)):
                if t not in DATASET_TYPES:
                    raise bad(key, f"{t!r} is not one of {', '.join(DATASET_TYPES)}")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise bad("lr_scheduler_type", f"{self.lr_scheduler_type!r} is not one of {', '.join(SCHEDULERS)}")
        if self.compute_type not in COMPUTE_TYPES:
            raise bad("compute_type", f"{self.compute_type!r} is not one of {', '.join(COMPUTE_TYPES)}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise bad("loss_type", f"{self.loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
        for key in ("max_seq_len", "batch_size", "gradient_accumulation_steps", "lora_rank", "logging_steps"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "decay_steps", "save_steps", "eval_steps", "save_total_limit", "weight_decay",
                    "max_grad_norm", "learning_rate", "min_lr", "sft_loss_ratio", "max_prompt_len"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise bad("max_steps", f"must be positive or -1, got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise bad("num_train_epochs", "must be positive when max_steps is -1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.moe_gate_lr_ratio is not None and self.moe_gate_lr_ratio < 0:
            raise bad("moe_gate_lr_ratio", f"must be >= 0, got {self.moe_gate_lr_ratio}")
        if self.do_train and not self.train_dataset_path:
            raise bad("train_dataset_path", "required (comma-separated data files)")
        if not self.model_name_or_path:
            raise bad("model_name_or_path", "required (a checkpoint directory or hub id)")
        n_paths = len(split_list(self.train_dataset_path))
        n_types = len(split_list(self.train_dataset_type))
        if n_types not in (1, n_paths):
            raise bad("train_dataset_type", f"{n_types} types for {n_paths} paths (give one, or one per path)")
        if self.train_dataset_prob and len(split_list(self.train_dataset_prob)) != n_paths:
            raise bad("train_dataset_prob", f"{len(split_list(self.train_dataset_prob))} weights for {n_paths} paths")
        if self.stage == "PT" and any(t != "text" for t in split_list(self.train_dataset_type)):
            raise bad("train_dataset_type", "stage PT reads plain text: use train_dataset_type: text")
        if self.stage == "VL-SFT" and any(t != "chatml" for t in split_list(self.train_dataset_type)):
            raise bad("train_dataset_type", "stage VL-SFT reads multimodal chatml messages: use train_dataset_type: chatml")
        if self.stage == "VL-SFT" and self.qat:
            raise bad("qat", "QAT of VL models is not implemented (stage VL-SFT)")
        if self.num_nextn_predict_layers is not None and self.num_nextn_predict_layers < 0:
            raise bad("num_nextn_predict_layers", f"must be >= 0, got {self.num_nextn_predict_layers}")
        if self.mtp_only:
            if self.stage not in ("PT", "SFT"):
                raise bad("mtp_only", f"trains the MTP head on PT or SFT data, not stage {self.stage}")
            if self.fine_tuning != "Full" or self.qat:
                raise bad("mtp_only", "trains the MTP layers' full weights: use fine_tuning: Full without qat")
            if self.multi_token_pred_lambda <= 0:
                raise bad("mtp_only", "needs multi_token_pred_lambda > 0 (the MTP loss is all it trains)")
        if self.freeze_vision and self.stage != "VL-SFT":
            raise bad("freeze_vision", "only applies to stage VL-SFT")

    # ------------------------------------------------------------------ derived
    @property
    def dataset_types(self) -> list[str]:
        types, paths = split_list(self.train_dataset_type), split_list(self.train_dataset_path)
        return types * len(paths) if len(types) == 1 else types

    @property
    def dataset_probs(self) -> list[float]:
        paths = split_list(self.train_dataset_path)
        if not self.train_dataset_prob:
            return [1.0 / len(paths)] * len(paths)
        probs = [float(p) for p in split_list(self.train_dataset_prob)]
        return [p / sum(probs) for p in probs]

    @property
    def eval_types(self) -> list[str]:
        paths = split_list(self.eval_dataset_path)
        types = split_list(self.eval_dataset_type) or split_list(self.train_dataset_type)[:1]
        return types * len(paths) if len(types) == 1 else types

    @property
    def target_modules(self) -> list[str]:
        return split_list(self.lora_target_modules)

    @property
    def lora_scale_alpha(self) -> float:
        return 2.0 * self.lora_rank if self.lora_alpha == -1 else float(self.lora_alpha)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def split_list(value: str | list | None) -> list[str]:
    """'a, b' or ['a', 'b'] -> ['a', 'b']."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def field_docs() -> dict[str, str]:
    """Field name -> its one-line docstring (read from this file's source), for `--help` style listings."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{source}: {key}: a value is required")
    try:
        if text.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if text.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if text.startswith("float"):
            return float(value)
        if text.startswith("str | list"):
            return value if isinstance(value, list) else str(value)
        if text.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key}: expected {text}, got {value!r}") from None
    return value


def config_from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate keys (unknown -> did-you-mean, unsupported -> 'not supported'), coerce types, build the config."""
    hints = {f.name: f.type for f in dataclasses.fields(TrainConfig)}  # annotation strings, e.g. 'float | None'
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    kwargs: dict[str, Any] = {}
    accepted: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "accepted_hints":  # a dumped config (train_config.json) read back
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: accepted_hints is filled by the loader; expected a mapping, got {value!r}")
            accepted.update(value)
            continue
        if key == "bf16":  # PaddleNLP's switch
            if value:
                kwargs["compute_type"] = "bf16"
            continue
        if key in NOT_SUPPORTED:
            neutral, why = NOT_SUPPORTED[key]
            if value in neutral:
                accepted[key] = value
                continue
            raise ConfigError(f"{source}: {key}: {value!r} is not supported: {why}")
        if key in NO_EFFECT:
            accepted[key] = value
            continue
        key = ALIASES.get(key) or key
        if key not in names:
            known = names + list(NOT_SUPPORTED) + sorted(NO_EFFECT)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        if key in _CASE and isinstance(value, str):
            value = _CASE[key].get(value.lower(), value)
        kwargs[key] = _coerce(key, value, hints[key], source)
    kwargs["accepted_hints"] = accepted
    cfg = TrainConfig.__new__(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        setattr(cfg, f.name, kwargs.get(f.name, default))
    cfg.validate(source)
    return cfg


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['key=value', ...] -> {key: YAML-parsed value}."""
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value != "" else ""
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value")
    raw.update(parse_overrides(overrides or []))
    return config_from_dict(raw, source=str(path))
