"""Load an HF-layout ERNIE 4.5 checkpoint of any family: the spec of config.json's model_type (`models.registry`)
gives the config and model classes, the checkpoint layout and the fp32 parameters. Build on the meta device, then
copy each safetensors tensor straight into its (uninitialised) parameter slot, so peak memory stays about one copy
of the weights."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..models.registry import spec_for
from ..quant.modules import apply_quantization_config
from . import paddle_layout
from .hf_layout import Target, place
from .hub import resolve_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX_FILE = "model.safetensors.index.json"


def parse_dtype(dtype: str | torch.dtype | None, config_extra: dict) -> torch.dtype:
    """'auto'/None -> the checkpoint's dtype (config.json `dtype`/`torch_dtype`, kept in `extra`), else float32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype in (None, "auto"):
        dtype = config_extra.get("dtype") or config_extra.get("torch_dtype") or "float32"
        return DTYPES.get(dtype, torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def list_weight_files(directory: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, from the index when sharded."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {exc}") from exc
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are not in {directory}: {', '.join(missing)}")
        return {name: directory / f for name, f in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files and any(directory.glob("*.pdparams")):
        raise FileNotFoundError(
            f"{directory}: a Paddle .pdparams checkpoint (pickled, not memory-mappable); rewrite it as safetensors "
            f"once with `ernie45 convert {directory} OUT --to hf` (or --to paddle to keep the Paddle layout)")
    if not files:
        present = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise FileNotFoundError(
            f"{directory}: no model.safetensors or {INDEX_FILE} (found: {present}). ernie45 reads safetensors "
            f"checkpoints (the `-PT` layout and the `-Paddle` one); Paddle's .pdparams files are not supported."
        )
    names: dict[str, Path] = {}
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                names[name] = file
    return names


def read_shapes(weight_files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """tensor name -> shape, from the safetensors headers (no tensor data is read)."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in weight_files.items():
        by_file[file].append(name)
    shapes = {}
    for file, names in by_file.items():
        with _open(file) as f:
            for name in names:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{file}: cannot read safetensors file (truncated or corrupt?): {exc}") from exc


def build_empty_model(config, dtype: torch.dtype = torch.float32, num_mtp_layers: int = 0, device="cpu",
                      transform: Callable[[torch.nn.Module], None] | None = None):
    """The model of `config`'s family (`models.registry`) with uninitialised weights in `dtype` (the spec's fp32
    parameters in fp32) on `device`, built via meta. `transform(model)` runs on the meta model first (a
    tensor-parallel rank swaps in its slices there: `parallel.sharding`)."""
    spec = spec_for(config)
    with torch.device("meta"):
        model = spec.model_class(config, num_mtp_layers)
        if transform is not None:
            transform(model)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if spec.keeps_fp32(name) else dtype)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_buffers()  # non-persistent buffers are not in checkpoints: recompute them on the real device
    return model


def load_model(model: str | Path, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu"):
    """Load a local checkpoint directory or hub id in eval mode, as the model class its config.json's model_type
    names in `models.registry` (`Ernie45ForCausalLM` for the text types, `Ernie45VLForConditionalGeneration` for
    `ernie4_5_vl_moe`)."""
    directory = resolve_model_path(model)
    model_type = read_model_type(directory)
    if model_type is not None:
        _spec(directory, model_type)  # an unsupported model_type is refused before the weights are listed
    weight_files = list_weight_files(directory)
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    paddle = paddle_layout.detect(directory / "config.json", raw, weight_files)
    if paddle:  # the legacy Paddle layout: converted tensor by tensor while filling the model
        raw = paddle_layout.paddle_config(directory / "config.json", raw, weight_files)
        model_type = raw["model_type"]
    spec = _spec(directory, model_type)
    if paddle and spec.family != "text":
        raise ValueError(f"{directory}: Paddle-layout checkpoints of {spec.family} models are not supported; convert "
                         f"them to the transformers layout with ERNIE's tools/paddle2torch first")
    if not paddle and spec.family == "text":
        paddle_layout.check_known(weight_files, str(directory))
    config = spec.config_class.from_dict(raw, source=str(directory / "config.json")) if paddle \
        else spec.config_class.from_file(directory)
    torch_dtype = parse_dtype(dtype, config.extra)
    num_mtp = (paddle_layout.count_mtp_layers if paddle else spec.layout.count_mtp_layers)(weight_files, config)
    net = build_empty_model(config, torch_dtype, num_mtp, device)
    if "quantization_config" in config.extra:
        if not spec.supports_quantized_checkpoints or paddle:
            raise ValueError(f"{directory}: packed (quantization_config) checkpoints of {spec.family} models"
                             f"{' in the Paddle layout' if paddle else ''} are not supported; load the full-precision "
                             f"checkpoint")
        # Packed checkpoint: the quantized modules replace the dense ones before their tensors are read.
        net = apply_quantization_config(net, config.extra["quantization_config"])
    layout = spec.layout
    if paddle:
        layout = paddle_layout.PaddleLayout(dict(net.named_parameters()), config.tie_word_embeddings)
        layout.check(read_shapes(weight_files), str(directory))
    fill_weights(net, directory, weight_files, lambda name: layout.targets_of(name, config),
                 lambda target, params: layout.skip(target, params, config))
    net.eval()
    net.source_dir = directory
    net.generation_config = read_optional_json(directory / "generation_config.json")
    return net


def _spec(directory: Path, model_type: str | None):
    try:
        return spec_for(model_type)
    except ValueError as exc:
        raise ValueError(f"{directory / 'config.json'}: {exc}") from None


def read_model_type(directory: Path) -> str | None:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config.json not found; a checkpoint directory needs one")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
    return raw.get("model_type") if isinstance(raw, dict) else None


def fill_weights(
    net: torch.nn.Module,
    directory: Path,
    weight_files: dict[str, Path],
    targets_of: Callable[[str], list[Target]],
    skip: Callable[[Target, dict], bool],
) -> None:
    """Copy every checkpoint tensor into the parameter slot(s) `targets_of` names; raise listing missing and
    unexpected tensors if the checkpoint does not cover the model exactly."""
    params = dict(net.named_parameters())
    filled: dict[str, set] = defaultdict(set)
    unexpected: list[str] = []
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in weight_files.items():
        by_file[file].append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            with _open(file) as f:
                for name in names:
                    raw = None  # read once, however many targets (fused Paddle tensors fill up to three)
                    for target in targets_of(name):
                        if skip(target, params):
                            continue
                        if target.name not in params:
                            unexpected.append(name)
                            continue
                        try:
                            raw = f.get_tensor(name) if raw is None else raw
                            tensor = target.source(raw)
                            view = place(params[target.name], target, tensor)
                        except (SafetensorError, OSError) as exc:
                            raise ValueError(f"{file}: tensor {name} cannot be read (truncated or corrupt?): {exc}") from exc
                        except ValueError as exc:
                            raise ValueError(f"{file}: tensor {name}: {exc}") from exc
                        view.copy_(tensor)
                        filled[target.name].add((target.expert, target.half))
    tied = "lm_head.weight" if getattr(net.config, "tie_word_embeddings", False) else None
    missing = [n for n, p in params.items() if n != tied and not _fully_filled(n, p, filled.get(n))]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(
                f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else "")
            )
        raise ValueError(f"{directory}: checkpoint does not match its config.json: " + "; ".join(parts))


def _fully_filled(name: str, param: torch.Tensor, slots: set | None) -> bool:
    if not slots:
        return False
    base = name.removesuffix(".qweight").removesuffix(".scales").removesuffix(".qzeros")  # packed expert tensors
    if base.endswith(".experts.gate_up_proj"):
        return len(slots) == param.shape[0] * 2 or (None, None) in slots
    if base.endswith(".experts.down_proj"):
        return len(slots) == param.shape[0] or (None, None) in slots
    return True


def read_optional_json(path: Path) -> dict:
    """A checkpoint's optional JSON file ({} when absent); malformed JSON raises naming the file and line."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
