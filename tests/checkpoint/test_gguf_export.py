"""`ernie45 export --format gguf`: llama.cpp's names, shapes and metadata read back with the `gguf` package, and,
where llama-cpp-python is installed (pip install 'ernie45[gguf-check]'; it compiles llama.cpp, minutes), llama.cpp
itself running the file: f32 gives ernie45's 32 greedy tokens, q8_0 / f16 / bf16 agree on >= 95% of top-1 tokens.

Models, all with the default model's real SentencePiece tokenizer: the embedded default model (a trained MoE, 1
shared expert: intermediate_size // kv heads = 384 but the shared FFN is 256 wide, the case llama.cpp's own converter
writes wrong); a dense model made from its trained weights (each MoE layer's MLP = its shared expert + experts 0 and 1
at weight 1/2, concatenated into one 768-wide SwiGLU); a tiny random MoE with 2 shared experts and an untied head and
a tiny random dense model. Top-1 agreement under quantization is asserted on the trained weights only: random
weights give near-ties (median top-1/top-2 margin 0.12), and on them q8_0 agrees 0.90 (MoE) / 0.96 (dense) with fp32,
the same as ernie45 itself run on q8_0-rounded weights (0.915 / 0.944): the loss is q8_0's rounding, not the file.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import ernie45
from ernie45.checkpoint import build_empty_model
from ernie45.checkpoint.gguf_export import export_gguf, gguf_tensors
from ernie45.cli.main import main
from ernie45.default_model import DEFAULT_MODEL_DIR
from ernie45.generation.generate import generate
from ernie45.models import Ernie45Config

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed: pip install 'ernie45[gguf]'")

TINY = {"vocab_size": 8256, "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "initializer_range": 0.1,
        "max_position_embeddings": 512, "tie_word_embeddings": False}
MODELS = {
    "default_moe": None,
    "dense_from_default": "derived",
    "moe_shared2_untied": dict(TINY, model_type="ernie4_5_moe", moe_num_experts=4, moe_k=2, moe_intermediate_size=32,
                               moe_num_shared_experts=2, moe_layer_start_index=1),
    "dense_untied": dict(TINY, model_type="ernie4_5"),
}
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time there was"


@pytest.fixture(scope="module", params=list(MODELS))
def checkpoint(request, tmp_path_factory):
    if MODELS[request.param] is None:
        return DEFAULT_MODEL_DIR
    out = tmp_path_factory.mktemp("gguf") / request.param
    if MODELS[request.param] == "derived":
        return dense_from_default(out)
    config = Ernie45Config.from_dict(MODELS[request.param])
    model = build_empty_model(config, torch.float32)
    model.init_weights(torch.Generator().manual_seed(5))
    ernie45.save_model(model, out, tokenizer=ernie45.load_tokenizer(DEFAULT_MODEL_DIR))
    return out


def dense_from_default(out):
    moe = ernie45.load_model(DEFAULT_MODEL_DIR, dtype="float32")
    raw = {k: v for k, v in moe.config.to_dict().items() if not k.startswith("moe_")}
    config = Ernie45Config.from_dict(dict(raw, model_type="ernie4_5"))
    dense = build_empty_model(config, torch.float32)
    ours, theirs = dict(dense.named_parameters()), dict(moe.named_parameters())
    with torch.no_grad():
        for name, p in ours.items():
            if name in theirs:
                p.copy_(theirs[name])
                continue
            layer, kind = name.split(".mlp.")[0], name.split(".mlp.")[1].split("_proj")[0]
            shared = theirs[f"{layer}.mlp.shared_experts.{kind}_proj.weight"]
            gate_up, down = theirs[f"{layer}.mlp.experts.gate_up_proj"], theirs[f"{layer}.mlp.experts.down_proj"]
            inter = gate_up.shape[1] // 2
            if kind == "down":
                p.copy_(torch.cat([shared, down[0] / 2, down[1] / 2], dim=1))
            else:
                rows = slice(0, inter) if kind == "gate" else slice(inter, 2 * inter)
                p.copy_(torch.cat([shared, gate_up[0, rows], gate_up[1, rows]], dim=0))
    ernie45.save_model(dense, out, tokenizer=ernie45.load_tokenizer(DEFAULT_MODEL_DIR))
    return out


def load(path):
    return ernie45.load_model(path, dtype="float32")


def test_gguf_reader_reads_back_every_tensor_and_key(checkpoint, reference, tmp_path):
    model = reference[0]
    path = export_gguf(model, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.fields[key].contents()
    expected = {t.name: t for t in gguf_tensors(model)}
    assert {t.name for t in reader.tensors} == set(expected)
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert tuple(int(n) for n in t.shape[::-1]) == expected[t.name].shape  # GGUF stores ggml's ne (reversed)
        assert np.array_equal(t.data.reshape(expected[t.name].shape), expected[t.name].produce().numpy()), t.name
    c = model.config
    arch = "ernie4_5-moe" if c.model_type == "ernie4_5_moe" else "ernie4_5"
    assert field("general.architecture") == arch
    assert field(f"{arch}.block_count") == c.num_hidden_layers
    assert field(f"{arch}.attention.head_count_kv") == c.num_key_value_heads
    assert field(f"{arch}.attention.key_length") == c.head_dim
    assert field(f"{arch}.rope.freq_base") == pytest.approx(c.rope_theta)
    if arch == "ernie4_5-moe":
        shared = field(f"{arch}.expert_shared_feed_forward_length")
        assert shared == c.moe_num_shared_experts * c.moe_intermediate_size
        assert shared != c.intermediate_size // c.num_key_value_heads  # what llama.cpp's converter would write
        assert field(f"{arch}.leading_dense_block_count") == c.moe_layer_start_index
        assert field(f"{arch}.expert_count") == c.moe_num_experts and field(f"{arch}.expert_used_count") == c.moe_k
        assert reader.get_tensor(0).name == "token_embd.weight"
        biases = [t for t in reader.tensors if t.name.endswith("exp_probs_b.bias")]
        assert biases and all(t.data.shape == (c.moe_num_experts,) for t in biases)
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == c.vocab_size and tokens[-1] == f"[PAD{c.vocab_size - 1}]"
    tok = ernie45.load_tokenizer(checkpoint)
    assert tokens[8192] == "<|IMAGE_PLACEHOLDER|>"
    assert field("tokenizer.ggml.model") == "llama" and field("tokenizer.ggml.bos_token_id") == c.bos_token_id
    assert field("tokenizer.chat_template") == tok.chat_template
    assert ("output.weight" in expected) == (not c.tie_word_embeddings)


def test_q8_0_blocks_read_back_within_their_rounding(tmp_path):
    model = load(DEFAULT_MODEL_DIR)
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", "q8_0"))
    expected = {t.name: t for t in gguf_tensors(model)}
    Q = gguf.GGMLQuantizationType
    for t in reader.tensors:
        want = expected[t.name].produce().numpy()
        if want.ndim == 1 or t.name.endswith("ffn_gate_inp.weight"):
            assert t.tensor_type == Q.F32 and np.array_equal(t.data.reshape(want.shape), want)
            continue
        assert t.tensor_type == Q.Q8_0
        got = gguf.quants.dequantize(t.data, Q.Q8_0).reshape(want.shape)
        # Each block of 32 stores round(w / d) with d = max|w| / 127 (fp16): error <= d / 2 plus d's fp16 rounding.
        blocks = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True)
        bound = blocks / 127 * (0.5 + 127 * 2.0**-11) + 1e-12
        assert (np.abs(got - want).reshape(-1, 32) <= bound).all(), t.name


def test_cli_export_gguf_and_refusals(tmp_path):
    out = tmp_path / "m.gguf"
    assert main(["export", str(DEFAULT_MODEL_DIR), "--format", "gguf", "--outtype", "q4_0", "--output", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.gguf")]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's 0600
    model = load(DEFAULT_MODEL_DIR)
    with pytest.raises(ValueError, match="'q6_k' is not one of f32, f16, bf16, q8_0, q4_0"):
        export_gguf(model, tmp_path / "x.gguf", "q6_k")
    from ernie45.training.lora import apply_lora

    wrapped = load(DEFAULT_MODEL_DIR)
    apply_lora(wrapped, ["q_proj"], r=2, alpha=2.0)
    with pytest.raises(ValueError, match="unmerged LoRA adapters"):
        export_gguf(wrapped, tmp_path / "x.gguf", "f32")
    model.config.moe_layer_end_index = 2  # layer 3 dense: llama.cpp's rule cannot express it
    with pytest.raises(ValueError, match="layer 3 is dense here but llama.cpp makes it MoE"):
        export_gguf(model, tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "x.gguf").exists()


# ---- llama.cpp itself ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed: pip install 'ernie45[gguf-check]' (builds llama.cpp)")


def llama_logits(llama_cpp, path, ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    return llm, np.array(llm.scores[: len(ids)])


@pytest.fixture(scope="module")
def reference(checkpoint):
    """ernie45 on `checkpoint`: the model, the prompt ids, 32 greedy tokens, and the teacher-forced argmax over
    prompt + 48 greedy tokens."""
    model = load(checkpoint)
    prompt = ernie45.load_tokenizer(checkpoint).encode(PROMPT)
    ids = generate(model, torch.tensor([prompt]), max_new_tokens=48)[0].tolist()
    with torch.no_grad():
        argmax = model(torch.tensor([ids]))[0].argmax(-1).numpy()
    return model, prompt, ids[len(prompt):len(prompt) + 32], ids, argmax


def test_llama_cpp_f32_greedy_matches(reference, tmp_path, llama_cpp):
    model, prompt, greedy, _, _ = reference
    llm = llama_cpp.Llama(model_path=str(export_gguf(model, tmp_path / "m.gguf", "f32")), n_ctx=256, n_threads=2,
                          logits_all=True, verbose=False)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == prompt
    llm.eval(prompt)
    theirs = []
    for _ in range(32):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert theirs == greedy


# q8_0 on the trained weights only (see the module docstring); bf16 once (llama.cpp's CPU bf16 path is slow).
AGREEMENT_CASES = [("default_moe", "q8_0"), ("default_moe", "f16"), ("default_moe", "bf16"),
                   ("dense_from_default", "q8_0"), ("dense_from_default", "f16"), ("moe_shared2_untied", "f16"),
                   ("dense_untied", "f16")]


@pytest.mark.parametrize(("checkpoint", "outtype"), AGREEMENT_CASES, indirect=["checkpoint"])
def test_llama_cpp_top1_agreement(checkpoint, reference, tmp_path, llama_cpp, outtype):
    """Teacher-forced over prompt + ernie45's greedy continuation: the same argmax on >= 95% of positions."""
    model, _, _, ids, ours = reference
    _, logits = llama_logits(llama_cpp, export_gguf(model, tmp_path / f"m-{outtype}.gguf", outtype), ids)
    agreement = float((logits.argmax(-1) == ours).mean())
    assert agreement >= 0.95, agreement


def test_llama_cpp_renders_the_chat_template_as_ernie45(tmp_path, llama_cpp):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tok = ernie45.load_tokenizer(DEFAULT_MODEL_DIR)
    path = export_gguf(load(DEFAULT_MODEL_DIR), tmp_path / "m.gguf", "q8_0")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
    assert formatter(messages=messages).prompt == tok.apply_chat_template(messages)


def test_packed_int8_checkpoint_requantizes_to_q8_0(tmp_path, llama_cpp):
    from ernie45.quant.quantize import quantize

    shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "src")
    quantize(str(tmp_path / "src"), str(tmp_path / "int8"), bits=8)
    packed = load(tmp_path / "int8")
    assert "quantization_config" in json.loads((tmp_path / "int8" / "config.json").read_text())
    path = export_gguf(packed, tmp_path / "m.gguf", "q8_0")
    ids = ernie45.load_tokenizer(DEFAULT_MODEL_DIR).encode(PROMPT)
    ids = generate(packed, torch.tensor([ids]), max_new_tokens=32)[0].tolist()
    with torch.no_grad():
        ours = packed(torch.tensor([ids]))[0].argmax(-1).numpy()
    _, logits = llama_logits(llama_cpp, path, ids)
    assert float((logits.argmax(-1) == ours).mean()) >= 0.95


def test_lora_merged_export_carries_the_merged_weights(tmp_path):
    from ernie45.training.lora import adapter_state_dict, apply_lora, load_adapter, merge_lora, save_adapter

    model = load(DEFAULT_MODEL_DIR)
    apply_lora(model, ["q_proj", "o_proj", "gate_proj", "experts"], r=4, alpha=8.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    save_adapter(adapter_state_dict(model.named_parameters()), tmp_path / "adapter", 4, 8.0, 0.0,
                 ["q_proj", "o_proj", "gate_proj", "experts"], str(DEFAULT_MODEL_DIR))
    out = tmp_path / "merged.gguf"
    assert main(["export", "--merge-lora", str(tmp_path / "adapter"), "--format", "gguf", "--outtype", "f32",
                 "--dtype", "float32", "--output", str(out)]) == 0
    merged = load(DEFAULT_MODEL_DIR)
    load_adapter(merged, tmp_path / "adapter")
    merge_lora(merged)
    expected = {t.name: t.produce().numpy() for t in gguf_tensors(merged)}
    base = {t.name: t.produce().numpy() for t in gguf_tensors(load(DEFAULT_MODEL_DIR))}
    reader = gguf.GGUFReader(out)
    changed = 0
    for t in reader.tensors:
        got = t.data.reshape(expected[t.name].shape)
        assert np.array_equal(got, expected[t.name]), t.name
        changed += not np.array_equal(got, base[t.name])
    assert changed >= 4 * 4  # q, o, experts' gate/up and down in every layer, gate_proj in the dense one


def test_packed_int4_requantizes_to_q4_0_blocks(tmp_path):
    """A 4-bit checkpoint's weights are dequantized per module and requantized: each Q4_0 tensor equals gguf's own
    Q4_0 of ernie45's dequantized weight, byte for byte."""
    from ernie45.quant.quantize import quantize

    shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "src")
    quantize(str(tmp_path / "src"), str(tmp_path / "int4"), bits=4)
    packed = load(tmp_path / "int4")
    reader = gguf.GGUFReader(export_gguf(packed, tmp_path / "m.gguf", "q4_0"))
    expected = {t.name: t for t in gguf_tensors(packed)}
    Q = gguf.GGMLQuantizationType
    quantized = [t for t in reader.tensors if t.tensor_type == Q.Q4_0]
    assert len(quantized) >= 4 * 4
    for t in quantized:
        want = gguf.quants.quantize(expected[t.name].produce().numpy(), Q.Q4_0)
        assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), t.name
