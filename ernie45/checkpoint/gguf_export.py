"""Write a text model (dense or MoE; fine-tuned, LoRA-merged or weight-only quantized) as a llama.cpp GGUF file with
the `gguf` package: llama.cpp's `ernie4_5` / `ernie4_5-moe` architectures, tensor names and metadata keys as its
converter (convert_hf_to_gguf.py `Ernie4_5Model` / `Ernie4_5MoeModel`) writes them, except one shape the converter
gets wrong: `expert_shared_feed_forward_length` is `moe_num_shared_experts * moe_intermediate_size` (the width of
the shared-expert tensors), not `intermediate_size // num_key_value_heads`.

Tensors are produced and written one at a time (header and tensor infos first, from the shapes alone), so peak
memory is the model plus one GGUF tensor; the file is written next to the target and renamed into place.
Packed (int8/int4/2-bit) weights are dequantized one module at a time and requantized to the GGUF type asked for.
Legend: E experts, I (expert) intermediate width, H hidden width.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.registry import spec_for
from .gguf_vocab import add_tokenizer

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ARCH = {"ernie4_5": "ernie4_5", "ernie4_5_moe": "ernie4_5-moe"}
# Kept in F32 whatever the outtype, as llama.cpp's converter does: norms / biases (1-D), the router.
_F32_SUFFIXES = ("ffn_gate_inp.weight", "exp_probs_b.bias")


@dataclass
class GGUFTensor:
    """One GGUF tensor: its name, torch-order shape and how to produce it (float32, torch order)."""

    name: str
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


def _gguf():
    try:
        import gguf
    except ImportError as exc:
        raise ValueError("GGUF export needs the `gguf` package: pip install 'ernie45[gguf]' (or pip install gguf)") \
            from exc
    return gguf


def _dense(module: torch.nn.Module, attr: str = "weight") -> Callable[[], torch.Tensor]:
    """The full-precision weight of a linear (or stacked experts' `attr`), dequantized if it is packed."""

    def produce() -> torch.Tensor:
        obj = getattr(module, attr) if attr != "weight" else module
        if hasattr(obj, "dequantized_weight"):
            return obj.dequantized_weight(torch.float32)
        return (obj.weight if attr == "weight" else obj).detach().float()

    return produce


def _shape(module: torch.nn.Module, attr: str = "weight") -> tuple[int, ...]:
    obj = getattr(module, attr) if attr != "weight" else module
    if hasattr(obj, "dequantized_weight"):
        q = obj.qweight
        return (*q.shape[:-1], obj.in_features)
    return tuple((obj.weight if attr == "weight" else obj).shape)


def check_exportable(model) -> None:
    """Raise naming the field when llama.cpp's ERNIE graph cannot express the model."""
    spec = spec_for(model)
    if spec.family != "text":
        raise ValueError(f"GGUF export covers ERNIE 4.5 text models (ernie4_5, ernie4_5_moe), not {spec.family} models")
    adapters = [n for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    if adapters:
        raise ValueError(f"the model carries unmerged LoRA adapters ({adapters[0]}, ...): merge them first "
                         f"(training.lora.merge_lora, or ernie45 export --merge-lora ADAPTER_DIR)")
    c = model.config
    if c.use_bias:
        raise ValueError("config.json: use_bias is true, but llama.cpp's ernie4_5 graphs have no q/k/v/o or MLP biases")
    if c.model_type == "ernie4_5_moe":
        step, lead = c.moe_layer_interval, c.moe_layer_start_index
        for i in range(c.num_hidden_layers):
            llama_moe = i >= lead and (i + 1) % step == 0  # llama.cpp src/models/ernie4-5-moe.cpp
            if llama_moe != c.is_moe_layer(i):
                raise ValueError(
                    f"config.json: layer {i} is {'MoE' if c.is_moe_layer(i) else 'dense'} here but llama.cpp makes it "
                    f"{'MoE' if llama_moe else 'dense'} (it knows only moe_layer_start_index and moe_layer_interval; "
                    f"moe_layer_end_index / mlp_layer_types patterns beyond that cannot be written)")


def gguf_tensors(model) -> list[GGUFTensor]:
    """The GGUF tensors of `model` in llama.cpp's names (MTP layers are dropped, as llama.cpp's converter does)."""
    inner, c = model.model, model.config
    out = [GGUFTensor("token_embd.weight", tuple(inner.embed_tokens.weight.shape), _dense(inner.embed_tokens))]
    for i, layer in enumerate(inner.layers):
        b = f"blk.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        plain = [("attn_norm", layer.input_layernorm), ("attn_q", attn.q_proj), ("attn_k", attn.k_proj),
                 ("attn_v", attn.v_proj), ("attn_output", attn.o_proj), ("ffn_norm", layer.post_attention_layernorm)]
        if c.is_moe_layer(i):
            plain.append(("ffn_gate_inp", mlp.gate))
            if getattr(mlp, "shared_experts", None) is not None:
                se = mlp.shared_experts
                plain += [("ffn_gate_shexp", se.gate_proj), ("ffn_up_shexp", se.up_proj),
                          ("ffn_down_shexp", se.down_proj)]
        else:
            plain += [("ffn_gate", mlp.gate_proj), ("ffn_up", mlp.up_proj), ("ffn_down", mlp.down_proj)]
        out += [GGUFTensor(f"{b}{n}.weight", _shape(m), _dense(m)) for n, m in plain]
        if c.is_moe_layer(i):
            bias = mlp.moe_statics.e_score_correction_bias
            out.append(GGUFTensor(f"{b}exp_probs_b.bias", (bias.shape[-1],),  # [1, E] -> [E]
                                  lambda t=bias: t.detach().float().reshape(-1)))
            out += _expert_tensors(b, mlp.experts)
    out.append(GGUFTensor("output_norm.weight", tuple(inner.norm.weight.shape), _dense(inner.norm)))
    if not c.tie_word_embeddings:  # llama.cpp falls back to token_embd when `output` is absent
        out.append(GGUFTensor("output.weight", _shape(model.lm_head), _dense(model.lm_head)))
    return out


def _expert_tensors(prefix: str, experts) -> list[GGUFTensor]:
    E, two_i, H = _shape(experts, "gate_up_proj")
    inter = two_i // 2
    gate_up, down = _dense(experts, "gate_up_proj"), _dense(experts, "down_proj")
    # Ours: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]; llama.cpp: ffn_{gate,up}_exps [E, I, H].
    return [GGUFTensor(f"{prefix}ffn_gate_exps.weight", (E, inter, H), lambda: gate_up()[:, :inter]),
            GGUFTensor(f"{prefix}ffn_up_exps.weight", (E, inter, H), lambda: gate_up()[:, inter:]),
            GGUFTensor(f"{prefix}ffn_down_exps.weight", _shape(experts, "down_proj"), down)]


def _add_hparams(writer, c, gguf) -> None:
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_theta)
    if c.compression_ratio != 1.0:  # positions / ratio == linear RoPE scaling by the ratio
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.compression_ratio)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_vocab_size(c.vocab_size)
    if c.model_type == "ernie4_5_moe":
        writer.add_expert_count(c.moe_num_experts)
        writer.add_expert_used_count(c.moe_k)
        writer.add_interleave_moe_layer_step(c.moe_layer_interval)
        writer.add_leading_dense_block_count(c.moe_layer_start_index)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_shared_count(c.moe_num_shared_experts)
        # The shared experts form one SwiGLU this wide (llama.cpp's converter writes intermediate_size // kv heads).
        writer.add_expert_shared_feed_forward_length(c.moe_num_shared_experts * c.moe_intermediate_size)


def _qtype_of(t: GGUFTensor, requested, gguf):
    Q = gguf.GGMLQuantizationType
    if len(t.shape) == 1 or t.name.endswith(_F32_SUFFIXES):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[requested][0]
    if t.shape[-1] % block:  # rows must hold whole blocks; llama.cpp's converter falls back to F16 the same way
        return Q.F16
    return requested


def _encode(data: torch.Tensor, qtype, gguf) -> np.ndarray:
    arr = data.contiguous().numpy().astype(np.float32, copy=False)
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return arr
    if qtype == Q.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, qtype)


def export_gguf(model, output: str | Path, outtype: str = "f16", tokenizer_dir: str | Path | None = None,
                name: str | None = None) -> Path:
    """Write `model` to the GGUF file `output`; the tokenizer (tokenizer.model, tokenizer_config.json,
    added_tokens.json) comes from `tokenizer_dir` or the directory the model was loaded from."""
    gguf = _gguf()
    if outtype not in OUTTYPES:
        raise ValueError(f"GGUF outtype {outtype!r} is not one of {', '.join(OUTTYPES)} (K-quants: run llama.cpp's "
                         f"llama-quantize on an f16/f32 export)")
    check_exportable(model)
    source = tokenizer_dir or getattr(model, "source_dir", None)
    if source is None:
        raise ValueError("GGUF export needs the tokenizer: pass tokenizer_dir (a directory with tokenizer.model)")
    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    requested, file_type = {
        "f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
        "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0)}[outtype]
    c = model.config
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.tmp-", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH[c.model_type])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or Path(source).name)
        _add_hparams(writer, c, gguf)
        add_tokenizer(writer, Path(source), c.vocab_size, gguf)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tensors = gguf_tensors(model)
        qtypes = [_qtype_of(t, requested, gguf) for t in tensors]
        for t, qtype in zip(tensors, qtypes):
            if qtype in (Q.F32, Q.F16):
                dtype = np.float32 if qtype == Q.F32 else np.float16
                nbytes = int(np.prod(t.shape)) * np.dtype(dtype).itemsize
                writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), nbytes)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(t.shape, qtype)
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                       raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad():
            for t, qtype in zip(tensors, qtypes):
                data = t.produce()
                if tuple(data.shape) != t.shape:
                    raise ValueError(f"GGUF tensor {t.name}: produced shape {tuple(data.shape)}, expected {t.shape}")
                writer.write_tensor_data(_encode(data, qtype, gguf))
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600; the export gets the mode a plain open() would give
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return output
