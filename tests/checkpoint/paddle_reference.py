"""The legacy Paddle layout written and read by ERNIE's official converter rules (PaddlePaddle/ERNIE
tools/paddle2torch/tran_4_5t.py), re-implemented here with numpy independently of ernie45, as the tests' reference:

- `torch_to_paddle(hf_dir, out_dir)`: the inverse of the converter (what the `-Paddle` releases hold), from a
  transformers-written checkpoint: `model.` -> `ernie.`, q|k|v and gate|up concatenated along the output axis and
  stored [in, out], `o_proj`/`down_proj`/`gate.weight`/`mtp_linear_proj`/untied `lm_head` transposed, bf16 as uint16,
  `torch_dtype` -> `dtype` and the Paddle-only config keys the converter drops.
- `paddle_to_torch(paddle_dir)`: the converter itself (tensor part): name -> numpy array in the -PT layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

NEED_TRANSPOSE_KEYS = ("down_proj.weight", "o_proj.weight", "gate.weight", "mtp_linear_proj")
KEEP_FP32_KEYS = ("gate.weight", "moe_statics.e_score_correction_bias")
PADDLE_ONLY_KEYS = {"fuse_rms_norm": False, "fuse_swiglu": True, "use_flash_attention": True, "use_rmsnorm": True,
                    "max_sequence_length": 4096, "paddlenlp_version": "3.0.0"}


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()  # Paddle's numpy export of bf16
    return t.numpy()


def _read_torch(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
    return out


def torch_to_paddle(hf_dir: Path, out_dir: Path, dtype: torch.dtype | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `hf_dir`'s checkpoint (plus `extra_tensors`, -PT names) in the legacy Paddle layout into `out_dir`."""
    config = json.loads((hf_dir / "config.json").read_text())
    tensors = _read_torch(hf_dir)
    tensors.update(extra_tensors or {})
    tied = config.get("tie_word_embeddings", False)
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
        keep_fp32 = any(s in key for s in KEEP_FP32_KEYS)
        if dtype is not None and not keep_fp32:
            t = t.to(dtype)
        dest = key.replace("model.", "ernie.", 1)
        for part in ("q_proj", "k_proj", "v_proj"):
            if f".{part}." in dest:
                fused.setdefault(dest.replace(part, "qkv_proj"), {})[part] = _numpy(t).T
                break
        else:
            for part in ("gate_proj", "up_proj"):
                if f".{part}." in dest:
                    fused.setdefault(dest.replace(part, "up_gate_proj"), {})[part] = _numpy(t).T
                    break
            else:
                transpose = (not tied) if key == "lm_head.weight" else any(x in key for x in NEED_TRANSPOSE_KEYS)
                arr = _numpy(t)
                out[dest] = np.ascontiguousarray(arr.T if transpose else arr)
    for dest, parts in fused.items():
        order = ("q_proj", "k_proj", "v_proj") if "qkv_proj" in dest else ("gate_proj", "up_proj")
        out[dest] = np.ascontiguousarray(np.concatenate([parts[p] for p in order], axis=-1))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(out.items())), str(out_dir / "model.safetensors"), metadata={"format": "np"})
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 500000.0))
    config.pop("torch_dtype", None)
    config["dtype"] = {torch.bfloat16: "bfloat16", None: config.get("dtype", "float32")}.get(dtype, "float32")
    config["architectures"] = ["Ernie4_5_MoeForCausalLM" if "moe" in config["model_type"] else "Ernie4_5_ForCausalLM"]
    config.pop("transformers_version", None)
    config.update(PADDLE_ONLY_KEYS)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def paddle_to_torch(paddle_dir: Path) -> dict[str, np.ndarray]:
    """tran_4_5t.py's tensor conversion of a Paddle-layout directory: -PT name -> array (bf16 kept as uint16 bits)."""
    config = json.loads((paddle_dir / "config.json").read_text())
    nh, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // nh
    tied = config.get("tie_word_embeddings", False)
    out = {}
    for file in sorted(paddle_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as f:
            for key in f.keys():  # noqa: SIM118
                tensor = f.get_tensor(key)
                dest = key.replace("ernie.", "model.")
                if "qkv_proj" in key:
                    q, k, v = np.split(tensor, [nh * head_dim, (nh + kv) * head_dim], axis=-1)
                    for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                        out[dest.replace("qkv_proj", name)] = np.ascontiguousarray(part.T)
                elif "up_gate_proj" in key:
                    gate, up = np.split(tensor, 2, axis=-1)
                    out[dest.replace("up_gate_proj", "gate_proj")] = np.ascontiguousarray(gate.T)
                    out[dest.replace("up_gate_proj", "up_proj")] = np.ascontiguousarray(up.T)
                else:
                    transpose = (not tied) if "lm_head.weight" in key else any(x in key for x in NEED_TRANSPOSE_KEYS)
                    out[dest] = np.ascontiguousarray(tensor.T if transpose else tensor)
    return out
