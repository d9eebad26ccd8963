"""`ernie45 convert` as a real subprocess: a Paddle-layout checkpoint (as the -Paddle releases and `erniekit export`
ship it, tokenizer included) generates the same text as its transformers-layout twin, and converts back unchanged."""

import subprocess
import sys

from safetensors.torch import load_file

from ..tiny_checkpoint import make_tiny_checkpoint


def ernie45_cli(*args):
    return subprocess.run([sys.executable, "-m", "ernie45.cli.main", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_paddle_checkpoint_generates_like_its_hf_twin_and_converts_back(tmp_path):
    hf = make_tiny_checkpoint(tmp_path / "hf")
    out = ernie45_cli("convert", str(hf), str(tmp_path / "paddle"), "--to", "paddle")
    assert out.returncode == 0, out.stderr
    names = load_file(str(tmp_path / "paddle" / "model.safetensors"))
    assert "ernie.layers.1.mlp.experts.0.up_gate_proj.weight" in names
    assert (tmp_path / "paddle" / "tokenizer.model").is_file()
    prompt = ("generate", "--prompt", "The model reads", "--temperature", "0", "--max-new-tokens", "12")
    from_hf = ernie45_cli(prompt[0], str(hf), *prompt[1:])
    from_paddle = ernie45_cli(prompt[0], str(tmp_path / "paddle"), *prompt[1:])
    assert from_hf.returncode == 0 and from_paddle.returncode == 0, from_paddle.stderr
    assert from_paddle.stdout == from_hf.stdout and from_hf.stdout.strip()
    back = ernie45_cli("convert", str(tmp_path / "paddle"), str(tmp_path / "back"), "--to", "hf")
    assert back.returncode == 0, back.stderr
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()


def test_convert_errors_are_clear(tmp_path):
    hf = make_tiny_checkpoint(tmp_path / "hf")
    (tmp_path / "pd").mkdir()
    (tmp_path / "pd" / "model_state.pdparams").write_bytes(b"\x80\x04K\x01.")  # a pickled int, not a state dict
    (tmp_path / "pd" / "config.json").write_text((hf / "config.json").read_text())
    out = ernie45_cli("convert", str(tmp_path / "pd"), str(tmp_path / "x"), "--to", "hf")
    assert out.returncode == 1 and "model_state.pdparams: not a state dict" in out.stderr
    out = ernie45_cli("generate", str(tmp_path / "pd"), "--prompt", "x")
    assert out.returncode == 1 and "ernie45 convert" in out.stderr
