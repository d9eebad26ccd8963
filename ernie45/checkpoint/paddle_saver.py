"""Save a text model in the legacy Paddle layout (`paddle_layout`), as the `-Paddle` releases hold it: `ernie.`
names, fused [in, out] tensors, bf16 bits as uint16, safetensors metadata {"format": "np"} (Paddle writes through
numpy), config.json with `dtype` and the underscore architectures. Shards are assembled one at a time (peak memory:
the model plus one shard), written to a temporary sibling directory and swapped in with one rename (`saver`)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.registry import spec_for
from .loader import INDEX_FILE
from .paddle_layout import PaddleLayout
from .saver import _DTYPE_NAMES, DEFAULT_MAX_SHARD_BYTES, publish_dir, write_tokenizer

PADDLE_METADATA = {"format": "np"}


def paddle_config(model) -> dict:
    """config.json of the Paddle layout: ours with `dtype`, top-level `rope_theta` and the Paddle architectures."""
    config = model.config.to_dict()
    config.pop("rope_parameters", None)
    config["rope_theta"] = model.config.rope_theta
    config.pop("torch_dtype", None)
    config["dtype"] = _DTYPE_NAMES[model.dtype]
    moe = model.config.model_type == "ernie4_5_moe"
    config["architectures"] = ["Ernie4_5_MoeForCausalLM" if moe else "Ernie4_5_ForCausalLM"]
    return dict(sorted(config.items()))


def _on_disk(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint16) if t.dtype == torch.bfloat16 else t


def save_paddle(model: torch.nn.Module, out_dir: str | Path, tokenizer=None,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write `model` (a text model; not packed) in the Paddle layout to `out_dir`, atomically."""
    spec = spec_for(model)
    if spec.family != "text":
        raise ValueError(f"the Paddle layout is written for text models only, not {spec.family} models")
    params = {n: p.detach() for n, p in model.named_parameters()}
    layout = PaddleLayout(params, model.config.tie_word_embeddings)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_tensors(layout, params, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(paddle_config(model), indent=2) + "\n", encoding="utf-8")
        generation = dict(getattr(model, "generation_config", None) or {})
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            generation.setdefault(key, getattr(model.config, key))
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        write_tokenizer(tokenizer if tokenizer is not None else getattr(model, "source_dir", None), tmp)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_tensors(layout: PaddleLayout, params: dict[str, torch.Tensor], tmp: Path, max_bytes: int) -> None:
    names = sorted(layout.tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        entry = layout.tensors[name]
        nbytes = params[entry.targets[0].name].element_size() * torch.Size(entry.shape).numel()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_file({n: _on_disk(layout.assemble(n, params)) for n in names}, str(tmp / "model.safetensors"),
                  metadata=PADDLE_METADATA)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _on_disk(layout.assemble(n, params)) for n in shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(tmp / file), metadata=PADDLE_METADATA)
        weight_map.update(dict.fromkeys(shard, file))
        del tensors  # one shard in memory at a time
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

