"""`ernie45 export --format paddle` and `ernie45 convert --to paddle|hf`: the Paddle layout written back byte for
byte as the official converter's rules give it, and the -PT layout byte for byte as transformers writes it."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ernie45
from ernie45.checkpoint.paddle_saver import save_paddle
from ernie45.cli.main import main

from .paddle_reference import paddle_to_torch, torch_to_paddle
from .test_paddle_layout import CASES, paddle_checkpoint


def config_of(path):
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_export_paddle_is_byte_identical_to_the_converter_rules(case, tmp_path):
    _, paddle = paddle_checkpoint(tmp_path, case)
    assert main(["export", str(paddle), "--format", "paddle", "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (paddle / "model.safetensors").read_bytes()
    written, reference = config_of(tmp_path / "out"), config_of(paddle)
    assert {k: written.get(k) for k in reference} == reference  # every key, Paddle-only extras included
    assert "torch_dtype" not in written and "rope_parameters" not in written
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # not the temporary directory's 0700


def test_export_paddle_bf16_and_mtp(tmp_path):
    from .test_paddle_layout import test_paddle_mtp_weights_load

    test_paddle_mtp_weights_load(tmp_path)  # writes tmp_path/hf (with MTP) and tmp_path/paddle
    for dtype in (None, torch.bfloat16):
        src = torch_to_paddle(tmp_path / "hf", tmp_path / f"paddle-{dtype}", dtype=dtype)
        model = ernie45.load_model(src)
        save_paddle(model, tmp_path / f"out-{dtype}")
        written = (tmp_path / f"out-{dtype}" / "model.safetensors").read_bytes()
        assert written == (src / "model.safetensors").read_bytes()


def test_convert_both_ways(tmp_path):
    _, paddle = paddle_checkpoint(tmp_path, "moe_shared2_untied")
    assert main(["convert", str(paddle), str(tmp_path / "pt"), "--to", "hf"]) == 0
    by_transformers = load_file(str(tmp_path / "hf" / "model.safetensors"))
    converted = load_file(str(tmp_path / "pt" / "model.safetensors"))
    assert converted.keys() == by_transformers.keys()
    for name, t in by_transformers.items():
        assert converted[name].dtype == t.dtype and torch.equal(converted[name], t), name
    # And back: -PT -> Paddle gives the reference Paddle file; the converter's own rules undo it exactly.
    assert main(["convert", str(tmp_path / "pt"), str(tmp_path / "pd2"), "--to", "paddle"]) == 0
    assert (tmp_path / "pd2" / "model.safetensors").read_bytes() == (paddle / "model.safetensors").read_bytes()
    by_rules = paddle_to_torch(tmp_path / "pd2")
    assert by_rules.keys() == by_transformers.keys()
    for name, t in by_transformers.items():
        assert np.array_equal(by_rules[name], t.numpy()), name


def test_sharded_paddle_export_loads_back(tmp_path):
    _hf, paddle = paddle_checkpoint(tmp_path, "moe_shared2_untied")
    model = ernie45.load_model(paddle)
    save_paddle(model, tmp_path / "sharded", max_shard_bytes=8192)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert all(n.startswith(("ernie.", "lm_head.")) for n in index["weight_map"])
    reloaded = ernie45.load_model(tmp_path / "sharded")
    for (name, p), (_, q) in zip(reloaded.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), name
    with safe_open(str(paddle / "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "np"}


def test_failed_paddle_export_leaves_previous_output_intact(tmp_path):
    _, paddle = paddle_checkpoint(tmp_path, "dense_bias_untied")
    model = ernie45.load_model(paddle)
    save_paddle(model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_paddle(model, tmp_path / "out", tokenizer=BrokenTokenizer())
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_packed_models_have_no_paddle_layout(tmp_path):
    from ernie45.quant.quantize import quantize

    _, paddle = paddle_checkpoint(tmp_path, "dense_bias_untied")
    quantize(str(paddle), str(tmp_path / "q8"), bits=8)
    with pytest.raises(ValueError, match="packed \\(quantized\\) weights have no Paddle layout"):
        save_paddle(ernie45.load_model(tmp_path / "q8"), tmp_path / "out")


def test_pdparams_checkpoint_converts_and_loads(tmp_path):
    """A .pdparams checkpoint (paddle.save's format: a pickle of numpy arrays, bf16 as uint16, plus its name table;
    checked against paddlepaddle 3.3.1) is refused by the loader with the convert command, and converts."""
    import pickle

    from safetensors.numpy import load_file as load_np

    _, paddle = paddle_checkpoint(tmp_path, "moe_shared2_untied", dtype=torch.bfloat16)
    arrays = load_np(str(paddle / "model.safetensors"))
    src = tmp_path / "pdparams"
    src.mkdir()
    state = dict(arrays, **{"StructuredToParameterName@@": {k: f"param_{i}" for i, k in enumerate(arrays)}})
    (src / "model_state.pdparams").write_bytes(pickle.dumps(state, protocol=4))
    (src / "config.json").write_text((paddle / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="Paddle .pdparams checkpoint .*`ernie45 convert"):
        ernie45.load_model(src)
    assert main(["convert", str(src), str(tmp_path / "pt"), "--to", "hf"]) == 0
    assert not [p for p in tmp_path.iterdir() if ".pdparams-" in p.name]  # staging removed
    converted, reference = ernie45.load_model(tmp_path / "pt"), ernie45.load_model(paddle)
    assert converted.dtype == torch.bfloat16
    for (name, p), (_, q) in zip(converted.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), name
