"""Save a model in the released HF layout (per-expert tensors, shards + index above a size), atomically:
everything is written to a temporary sibling directory which then replaces the target in one rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.registry import spec_for
from .loader import INDEX_FILE

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def released_state_dict(model: torch.nn.Module, layout: str = "released") -> dict[str, torch.Tensor]:
    """Tensor name -> tensor in one of the layouts the model family's spec writes (`models.registry`: "released"
    for every family, "transformers" for VL models); tied head omitted."""
    spec = spec_for(model)
    if layout not in spec.layout.save_layouts:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(spec.layout.save_layouts)} ({spec.family} models)")
    params = [
        (name, param.detach())
        for name, param in model.named_parameters(remove_duplicate=False)
        if not (name == "lm_head.weight" and model.config.tie_word_embeddings)
    ]
    return spec.layout.to_disk(params, model.config, layout)


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_model(
    model: torch.nn.Module,
    out_dir: str | Path,
    tokenizer=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    layout: str = "released",
) -> Path:
    """Write config.json, generation_config.json, safetensors (sharded above `max_shard_bytes`) and tokenizer files.

    `layout`: "released" (per-expert tensors; what transformers' save_pretrained writes) or, for VL models,
    "transformers" (its in-memory names: stacked experts, split gates and biases).

    `tokenizer`: an object with `save_pretrained(dir)`, or a directory whose tokenizer files are copied; by
    default the tokenizer files of the directory the model was loaded from (if any).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write(model, tmp, tokenizer, max_shard_bytes, layout)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write(model, tmp: Path, tokenizer, max_shard_bytes: int, layout: str) -> None:
    tensors = released_state_dict(model, layout)
    shards = _shard(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file({k: v.contiguous() for k, v in shards[0].items()}, str(tmp / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in shard.items()}, str(tmp / file), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    config = model.config.to_dict()
    config["dtype"] = _DTYPE_NAMES[model.dtype]
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = dict(getattr(model, "generation_config", None) or {})
    text_config = spec_for(model).text_config(model.config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        generation.setdefault(key, getattr(text_config, key))
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")

    write_tokenizer(tokenizer if tokenizer is not None else getattr(model, "source_dir", None), tmp)


def write_tokenizer(source, directory: Path) -> None:
    """The tokenizer into `directory`: `source.save_pretrained`, or its files copied from a directory; None: none."""
    if source is None:
        return
    if hasattr(source, "save_pretrained"):
        source.save_pretrained(directory)
        return
    for name in _TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, directory / name)


def publish_dir(tmp: Path, target: Path) -> None:
    """Give a finished temporary directory the mode mkdir would (mkdtemp made it 0700, so no other user or service
    could serve it), then swap it into place atomically."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    _replace_dir(tmp, target)


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing target is moved aside first and removed only after the swap."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
