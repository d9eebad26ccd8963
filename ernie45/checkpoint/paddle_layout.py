"""The legacy Paddle layout of ERNIE 4.5 text checkpoints (the released `-Paddle` repositories, older ERNIEKit
outputs), both ways, one tensor at a time. The rules are those of ERNIE's official converter
(PaddlePaddle/ERNIE tools/paddle2torch/tran_4_5t.py):

- prefix `ernie.` where transformers has `model.`; `lm_head.weight` stays bare;
- linears stored [in, out]: `o_proj`, `down_proj` (dense, shared and routed experts), `mtp_linear_proj`, the router
  `mlp.gate.weight` [H, E], and `lm_head.weight` [H, V] when it is not tied;
- fused `self_attn.qkv_proj` [H, (nh + 2 kv) hd] (columns q | k | v) and `up_gate_proj` [H, 2 I] (columns gate
  first, then up), biases fused the same way;
- `mlp.moe_statics.e_score_correction_bias` [1, E] as in -PT; bf16 tensors on disk as uint16 (config `dtype`).

Every Paddle tensor is described by the model's own parameters (`PaddleLayout(params)`): its expected shape and the
`PaddleTarget`s (our parameter, its slot, the column range of the fused tensor, whether it is transposed). The same
view function `PaddleTarget.view` reads (`ours.copy_(view(paddle))`) and writes (`view(paddle).copy_(ours)`), so
the two directions cannot disagree.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .hf_layout import Target

PADDLE_PREFIX = "ernie."
# config.json `architectures` of the Paddle releases (underscore spelling) -> model_type, for configs without one.
PADDLE_ARCHITECTURES = {
    "Ernie4_5_ForCausalLM": "ernie4_5",
    "Ernie4_5ForCausalLM": "ernie4_5",
    "Ernie4_5_MoeForCausalLM": "ernie4_5_moe",
}
_QKV = re.compile(r"^(.*\.self_attn\.)([qkv])_proj\.(weight|bias)$")
_UP_GATE = re.compile(r"^(.*\.(?:mlp|shared_experts)\.)(gate|up)_proj\.(weight|bias)$")
_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
# [out, in] in our model, [in, out] in Paddle (tran_4_5t.py NEED_TRANSPOSE_KEYS, plus an untied lm_head).
_TRANSPOSED = re.compile(r"(\.o_proj\.weight|\.down_proj\.weight|\.mlp\.gate\.weight|\.mtp_linear_proj\.\d+\.weight"
                         r"|^lm_head\.weight)$")
_FUSED_NAME = re.compile(r"\.(qkv_proj|up_gate_proj)\.")
_MTP_BLOCK = re.compile(r"^ernie\.mtp_block\.(\d+)\.")


@dataclass(frozen=True)
class PaddleTarget(Target):
    """A `Target` whose source is (part of) a Paddle tensor: columns `cols` of a fused tensor, transposed if `flip`."""

    cols: tuple[int, int] | None = None
    flip: bool = False

    def view(self, paddle_tensor: torch.Tensor) -> torch.Tensor:
        """The part of the Paddle tensor this target covers, in our orientation (a view: read or write through it)."""
        t = paddle_tensor
        if self.cols is not None:
            t = t[..., self.cols[0] : self.cols[1]]
        return t.t() if self.flip and t.dim() == 2 else t

    def source(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype == torch.uint16:  # Paddle writes bf16 through numpy, which has no bf16: the bits as uint16
            tensor = tensor.view(torch.bfloat16)
        return self.view(tensor)


@dataclass
class PaddleTensor:
    """One tensor of the Paddle layout: its shape and the parameter slots it fills."""

    shape: tuple[int, ...]
    targets: list[PaddleTarget] = field(default_factory=list)
    hf_names: list[str] = field(default_factory=list)
    """What transformers' layout has instead (for error messages)."""

    def describe(self) -> str:
        text = str(self.shape)
        if len(self.shape) == 2 and any(t.flip for t in self.targets):
            text += " [in, out]"
        if len(self.targets) > 1:
            text += " (columns " + " | ".join(t.half or t.name.rsplit(".", 2)[-2] for t in self.targets) + ")"
        return text


def paddle_name(name: str) -> str:
    return PADDLE_PREFIX + name[len("model."):] if name.startswith("model.") else name


def is_paddle_name(name: str) -> bool:
    """A tensor name only the Paddle layout uses: the `ernie.` prefix or a fused qkv / up_gate projection."""
    return name.startswith(PADDLE_PREFIX) or bool(_FUSED_NAME.search(name))


class PaddleLayout:
    """The Paddle tensors of a model with parameters `params` (name -> tensor or shape), keyed by Paddle name."""

    def __init__(self, params: dict[str, torch.Tensor | torch.Size], tie_word_embeddings: bool):
        self.tie_word_embeddings = tie_word_embeddings
        self.tensors: dict[str, PaddleTensor] = {}
        fused: dict[str, list[tuple[int, str, tuple[int, ...]]]] = defaultdict(list)
        for name, p in params.items():
            shape = tuple(p.shape)
            if name == "lm_head.weight" and tie_word_embeddings:
                continue
            if ".lora_A." in name or ".lora_B." in name:
                raise ValueError(f"{name}: unmerged LoRA adapters have no place in a checkpoint; merge them first "
                                 f"(ernie45 export --merge-lora ADAPTER_DIR)")
            if name.endswith((".qweight", ".scales", ".qzeros")):
                raise ValueError(f"{name}: packed (quantized) weights have no Paddle layout; export the "
                                 f"full-precision model")
            if m := _QKV.match(name):
                fused[f"{paddle_name(m.group(1))}qkv_proj.{m.group(3)}"].append(("qkv".index(m.group(2)), name, shape))
            elif m := _UP_GATE.match(name):
                order = 0 if m.group(2) == "gate" else 1
                fused[f"{paddle_name(m.group(1))}up_gate_proj.{m.group(3)}"].append((order, name, shape))
            elif m := _EXPERTS.match(name):
                self._add_experts(paddle_name(m.group(1)), name, m.group(2), shape)
            else:
                flip = bool(_TRANSPOSED.search(name)) and len(shape) == 2
                self.tensors[paddle_name(name)] = PaddleTensor(
                    shape[::-1] if flip else shape, [PaddleTarget(name, flip=flip)], [name])
        for pname, parts in fused.items():
            parts.sort()
            start, targets = 0, []
            for _, name, shape in parts:
                targets.append(PaddleTarget(name, cols=(start, start + shape[0]), flip=len(shape) == 2))
                start += shape[0]
            first = parts[0][2]
            self.tensors[pname] = PaddleTensor((first[1], start) if len(first) == 2 else (start,), targets,
                                               [name for _, name, _ in parts])

    def _add_experts(self, prefix: str, name: str, which: str, shape: tuple[int, ...]) -> None:
        num_experts = shape[0]
        for e in range(num_experts):
            if which == "gate_up_proj":  # ours [E, 2I, H] gate rows first; Paddle per expert [H, 2I] gate columns first
                inter = shape[1] // 2
                targets = [PaddleTarget(name, e, "gate", cols=(0, inter), flip=True),
                           PaddleTarget(name, e, "up", cols=(inter, 2 * inter), flip=True)]
                hf = [f"{name[:-len('.gate_up_proj')]}.{e}.{w}_proj.weight" for w in ("gate", "up")]
                self.tensors[f"{prefix}.{e}.up_gate_proj.weight"] = PaddleTensor((shape[2], shape[1]), targets, hf)
            else:  # ours [E, H, I]; Paddle per expert [I, H]
                self.tensors[f"{prefix}.{e}.down_proj.weight"] = PaddleTensor(
                    (shape[2], shape[1]), [PaddleTarget(name, e, flip=True)],
                    [f"{name[:-len('.down_proj')]}.{e}.down_proj.weight"])

    # ---- the `models.registry.CheckpointLayout` side used by the loader ----------------------------------------
    def targets_of(self, name: str, config=None) -> list[Target]:
        entry = self.tensors.get(name)
        if entry is not None:
            return list(entry.targets)
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return [Target("lm_head.weight")]  # a tied checkpoint's copy of the embedding: skipped
        return [Target(name)]  # not ours: reported as unexpected

    def skip(self, target: Target, params: dict, config=None) -> bool:
        if target.name == "lm_head.weight" and self.tie_word_embeddings:
            return True
        return target.name.startswith(PADDLE_PREFIX + "mtp_")  # MTP depths beyond num_nextn_predict_layers

    def check(self, shapes: dict[str, tuple[int, ...]], where: str) -> None:
        """Raise naming the tensor and both layouts when a Paddle tensor is missing or has a shape neither layout
        gives it (the loader reports unknown names itself)."""
        for name, shape in shapes.items():
            entry = self.tensors.get(name)
            if entry is None or tuple(shape) == entry.shape:
                continue
            hf = ", ".join(self._hf_shapes(entry))
            if len(shape) == 2 and tuple(shape) == entry.shape[::-1]:
                raise ValueError(
                    f"{where}: tensor {name} has shape {tuple(shape)}, the transposed ([out, in], torch) orientation; "
                    f"the Paddle layout (the `ernie.` prefix) stores it {entry.describe()}, the transformers layout "
                    f"as {hf}: mixed layouts, convert the checkpoint with one set of rules")
            raise ValueError(
                f"{where}: tensor {name} has shape {tuple(shape)}, which fits neither layout for this config.json: "
                f"the Paddle layout expects {entry.describe()}, the transformers layout {hf}")
        missing = [n for n in self.tensors if n not in shapes]
        if missing:
            listed = "; ".join(f"{n} {self.tensors[n].describe()} (transformers layout: "
                               f"{', '.join(self.tensors[n].hf_names)})" for n in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise ValueError(f"{where}: Paddle-layout checkpoint is missing {len(missing)} tensor(s): {listed}{more}")

    @staticmethod
    def _hf_shapes(entry: PaddleTensor) -> list[str]:
        meta = torch.empty(entry.shape, device="meta")
        return [f"{hf} {tuple(t.view(meta).shape)}" for t, hf in zip(entry.targets, entry.hf_names)]

    # ---- writing --------------------------------------------------------------------------------------------
    def assemble(self, name: str, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The Paddle tensor `name` built from our parameters (a new contiguous tensor)."""
        from .hf_layout import place

        entry = self.tensors[name]
        first = params[entry.targets[0].name]
        out = torch.empty(entry.shape, dtype=first.dtype)
        for t in entry.targets:
            sink = t.view(out)
            sink.copy_(place(params[t.name], t, sink))
        return out


def count_mtp_layers(names, config) -> int:
    """MTP depth present in a Paddle checkpoint (`ernie.mtp_block.N.`), capped by the config's."""
    depths = {int(m.group(1)) for n in names if (m := _MTP_BLOCK.match(n))}
    present = max(depths) + 1 if depths else 0
    return min(present, config.num_nextn_predict_layers or present)


def detect(config_path, raw: dict, names) -> bool:
    """Whether a checkpoint is in the Paddle layout, from its tensor names, checked against config.json the way
    FastDeploy reads it (`dtype` = Paddle, `torch_dtype` = torch, both = an error). Raises on mixed layouts.
    Unlike FastDeploy, `dtype` alone does not make a checkpoint Paddle (transformers 5 and ernie45 write `dtype`
    too), and a config with neither key is read by its tensors."""
    paddle = next((n for n in names if is_paddle_name(n)), None)
    if paddle is None:
        return False
    hf = next((n for n in names if n.startswith("model.") and not is_paddle_name(n)), None)
    if hf is not None:
        raise ValueError(
            f"{config_path.parent}: mixed checkpoint layouts: tensor {paddle} is in the Paddle layout (`ernie.` "
            f"prefix, fused qkv_proj / up_gate_proj, [in, out] linears) but tensor {hf} is in the transformers "
            f"layout (`model.` prefix, separate q/k/v and gate/up, [out, in]); write the checkpoint in one layout")
    check_known(names, str(config_path.parent))
    has_dtype, has_torch_dtype = "dtype" in raw, "torch_dtype" in raw
    if has_dtype and has_torch_dtype:
        raise ValueError(f"{config_path}: has both `dtype` (the Paddle layout's key) and `torch_dtype` (the -PT "
                         f"layout's), so the format is ambiguous; tensor {paddle} is in the Paddle layout: keep "
                         f"`dtype` only")
    if has_torch_dtype:
        raise ValueError(f"{config_path}: `torch_dtype` says the transformers (-PT) layout, but tensor {paddle} is in "
                         f"the Paddle layout; rename the key to `dtype` (Paddle) or convert the tensors")
    return True


def check_known(names, where: str) -> None:
    """Raise when no tensor is in either text layout (neither `model.` nor `ernie.` names)."""
    names = list(names)
    if names and not any(n.startswith(("model.", PADDLE_PREFIX)) for n in names):
        raise ValueError(f"{where}: unknown checkpoint layout: tensor {names[0]} is neither in the transformers layout "
                         f"(`model.` prefix, e.g. model.layers.0.self_attn.q_proj.weight) nor in the Paddle layout "
                         f"(`ernie.` prefix, e.g. ernie.layers.0.self_attn.qkv_proj.weight)")


def paddle_config(config_path, raw: dict, names) -> dict:
    """config.json of a Paddle checkpoint as our config reads it: model_type filled in (`paddle_model_type`), and
    tie_word_embeddings, when absent, from whether `lm_head.weight` is stored (the official converter defaults to
    untied, transformers to tied: the tensors settle it)."""
    out = dict(raw, model_type=paddle_model_type(config_path, raw, names))
    out.setdefault("tie_word_embeddings", "lm_head.weight" not in names)
    return out


def paddle_model_type(config_path, raw: dict, names) -> str:
    """model_type of a Paddle config.json: its own, else from `architectures`, else from the tensor names."""
    if raw.get("model_type"):
        return raw["model_type"]
    for arch in raw.get("architectures") or []:
        if arch in PADDLE_ARCHITECTURES:
            return PADDLE_ARCHITECTURES[arch]
    if raw.get("architectures"):
        raise ValueError(f"{config_path}: no model_type and architectures {raw['architectures']} is none of "
                         f"{', '.join(PADDLE_ARCHITECTURES)}")
    return "ernie4_5_moe" if any(".mlp.experts." in n for n in names) else "ernie4_5"
