"""Offline quantization of a model: choose every unit's format, compute its codes with the chosen method, and
swap the packed modules in. `quantize_model` works on a built model; `quantize` goes checkpoint -> checkpoint.

Calibrated methods (gptq, gptq-hqq, gptq-refit, and hqq when data is given) run layer by layer, as GPTQ does:
the calibration hidden states enter decoder layer l, its units' input statistics are recorded, its units are
quantized and swapped in, and the QUANTIZED layer's outputs feed layer l+1, so each layer is fitted to the errors
of the ones below it. Memory stays at one layer's statistics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..models.attention import CausalAttention
from .calibration import ExpertStats, InputStats, calibration_samples, read_calibration_texts, record_inputs
from .config import QuantizationConfig, default_spec, mixed_2bit_overrides
from .gptq import gptq_quantize, refit_group_params
from .hqq import hqq_group_params, hqq_quantize
from .modules import quantizable_units, resolve_modules, swap_in
from .packing import PackedWeight
from .rtn import rtn_quantize
from .spec import QuantSpec

logger = logging.getLogger(__name__)

CALIBRATED_METHODS = ("gptq", "gptq-hqq", "gptq-refit")
DEFAULT_NUM_CALIB_SAMPLES = 128
DEFAULT_CALIB_SEQ_LEN = 512


def build_config(
    model: nn.Module,
    bits: int = 4,
    method: str = "rtn",
    group_size: int | None = None,
    symmetric: bool | None = None,
    recipe: str | None = None,
    act_order: bool = True,
    quantize_lm_head: bool = False,
) -> QuantizationConfig:
    """The QuantizationConfig for these settings, with every module's format resolved (ValueError if invalid)."""
    default = default_spec(bits, group_size, symmetric)
    overrides: dict[str, QuantSpec | None] = {}
    if recipe == "mixed-2bit":
        moe_layers = [i for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i)]
        overrides.update(mixed_2bit_overrides(moe_layers, group_size))
    if quantize_lm_head:
        overrides["lm_head"] = default
    config = QuantizationConfig(method=method, default=default, overrides=overrides, recipe=recipe, act_order=act_order)
    config.modules = resolve_modules(model, config)
    return config


def quantize_weight(
    w: torch.Tensor, spec: QuantSpec, method: str, hessian: torch.Tensor | None, act_order: bool, name: str
) -> PackedWeight:
    """One weight [N, K] with `method`; `hessian` [K, K] for calibrated methods (diag used by hqq if given)."""
    if method == "rtn":
        return rtn_quantize(w, spec, name)
    if method == "hqq":
        return hqq_quantize(w, spec, None if hessian is None else hessian.diagonal(), name)
    if hessian is None:
        raise ValueError(f"method {method} needs calibration data (pass --calib FILE)")
    choose = hqq_group_params if method == "gptq-hqq" else None
    packed = gptq_quantize(w, hessian, spec, act_order=act_order, name=name, choose_group_params=choose)
    if method == "gptq-refit":
        packed = refit_group_params(w, hessian, packed, spec)
    return packed


def stack(packed: list[PackedWeight]) -> PackedWeight:
    """Per-expert packed weights -> one with a leading expert dim."""
    first = packed[0]
    return PackedWeight(
        qweight=torch.stack([p.qweight for p in packed]),
        scales=torch.stack([p.scales for p in packed]),
        zeros=None if first.zeros is None else torch.stack([p.zeros for p in packed]),
        bits=first.bits, group_size=first.group_size, in_features=first.in_features,
    )  # fmt: skip


def _quantize_units(model, config: QuantizationConfig, names: list[str], stats: dict, method: str) -> None:
    units = quantizable_units(model)
    act_order = config.act_order
    packed: dict[str, tuple[PackedWeight, QuantSpec]] = {}
    for name in names:
        unit, spec = units[name], config.modules[name]
        weight = unit.weight.detach()
        if weight.dim() == 3:  # stacked experts: one Hessian per expert
            expert_stats: ExpertStats | None = stats.get(unit.owner_name)
            hessians = expert_stats.hessians(unit.attr) if expert_stats else [None] * weight.shape[0]
            packed[name] = (
                stack(
                    [
                        quantize_weight(weight[e], spec, method, hessians[e], act_order, f"{name}[{e}]")
                        for e in range(weight.shape[0])
                    ]
                ),
                spec,
            )
        else:
            linear_stats: InputStats | None = stats.get(name)
            hessian = linear_stats.hessian() if linear_stats and linear_stats.count else None
            packed[name] = (quantize_weight(weight, spec, method, hessian, act_order, name), spec)
    swap_in(model, packed)


@torch.no_grad()
def quantize_model(
    model: nn.Module, config: QuantizationConfig, samples: list[torch.Tensor] | None = None
) -> nn.Module:
    """Quantize `model` in place per `config` (modules resolved by `build_config`); returns it, with the config
    recorded in `model.config.extra["quantization_config"]` so that saving writes it."""
    if config.method in CALIBRATED_METHODS and not samples:
        raise ValueError(f"method {config.method} needs calibration data (pass --calib FILE)")
    remaining = list(config.modules)
    if samples:
        core = model.model
        hidden = [core.embed_tokens(ids) for ids in samples]
        for i, layer in enumerate(core.layers):
            prefix = f"model.layers.{i}."
            local = {n[len(prefix) :]: n for n in remaining if n.startswith(prefix)}
            stats, handles = record_inputs(layer, local)
            rope = [core.rotary_emb(torch.arange(h.shape[1])) for h in hidden]
            try:
                for h, r in zip(hidden, rope):
                    layer(h, r, CausalAttention())
            finally:
                for handle in handles:
                    handle.remove()
            for s in stats.values():
                if isinstance(s, ExpertStats):
                    logger.info("layer %d routed calibration tokens per expert: %s", i, s.routed_counts())
            _quantize_units(model, config, list(local.values()), stats, config.method)
            remaining = [n for n in remaining if n not in local.values()]
            hidden = [layer(h, r, CausalAttention()) for h, r in zip(hidden, rope)]
        if "lm_head" in remaining:
            stats, handles = record_inputs(model, {"lm_head": "lm_head"})
            for h in hidden:
                model.compute_logits(h)
            for handle in handles:
                handle.remove()
            _quantize_units(model, config, ["lm_head"], stats, config.method)
            remaining.remove("lm_head")
    # Units outside the decoder stack (MTP) or everything when uncalibrated: from the weights alone.
    fallback = config.method if config.method not in CALIBRATED_METHODS else "rtn"
    if remaining:
        if samples:
            logger.info("quantizing %d module(s) outside the decoder stack with %s", len(remaining), fallback)
        _quantize_units(model, config, remaining, {}, fallback)
    model.config.extra["quantization_config"] = config.to_dict()
    return model


def quantize(
    model: str | Path | nn.Module,
    out_dir: str | Path | None = None,
    bits: int = 4,
    method: str = "rtn",
    group_size: int | None = None,
    calib: str | Path | None = None,
    num_calib_samples: int = DEFAULT_NUM_CALIB_SAMPLES,
    calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN,
    recipe: str | None = None,
    symmetric: bool | None = None,
    act_order: bool = True,
    quantize_lm_head: bool = False,
    tokenizer=None,
) -> nn.Module:
    """Quantize a checkpoint directory (or a loaded model) and, with `out_dir`, save the packed checkpoint.

    The Python face of `ernie45 quantize`; every invalid setting raises ValueError saying why.
    """
    from ..checkpoint import load_model, save_model
    from ..tokenizer import load_tokenizer

    default_spec(bits, group_size, symmetric)  # bits / group size refused before anything is loaded
    QuantizationConfig(method=method, recipe=recipe)
    if method in CALIBRATED_METHODS and calib is None:
        raise ValueError(f"method {method} needs calibration data: pass a .jsonl or text file as calib")
    if num_calib_samples < 1:
        raise ValueError(f"num_calib_samples must be at least 1, got {num_calib_samples}")
    texts = read_calibration_texts(calib, num_calib_samples) if calib is not None else None
    net = model if isinstance(model, nn.Module) else load_model(model)
    if "quantization_config" in net.config.extra:
        raise ValueError("the model is already quantized; quantize the full-precision checkpoint instead")
    config = build_config(net, bits, method, group_size, symmetric, recipe, act_order, quantize_lm_head)
    samples = None
    if texts is not None:
        source = getattr(net, "source_dir", None)
        if tokenizer is None:
            if source is None:
                raise ValueError("calibration needs a tokenizer: pass tokenizer= (the model has no source directory)")
            tokenizer = load_tokenizer(source)
        samples = calibration_samples(tokenizer, texts, num_calib_samples, calib_seq_len)
    quantize_model(net, config, samples)
    if out_dir is not None:
        save_model(net, out_dir, tokenizer=tokenizer)
    return net
