"""PaddleFormers (the Paddle side's own Ernie4_5ForCausalLM) against ernie45, run as two halves in two
environments, since paddlepaddle and torch live in different venvs:

    PF_PY -m pip install paddlepaddle==3.3.1 paddleformers==1.2.0          # once, CPU wheels
    PF_PY benchmarks/check_paddleformers.py make DIR                        # Paddle builds, runs and saves a model
    python benchmarks/check_paddleformers.py compare DIR OUT                # ernie45 loads it, compares, saves OUT
    PF_PY benchmarks/check_paddleformers.py reload OUT DIR                  # PaddleFormers loads ernie45's save

`make`: a tiny random dense Ernie4_5 (GQA, untied head; fuse_rms_norm off, its fused RMSNorm is GPU-only), its
logits on fixed ids, and save_pretrained(safe_serialization=True) (PaddleFormers 1.2 writes the transformers layout).
PaddleFormers' MoE forward needs GPU-only fused kernels, so MoE is compared against transformers in the tests.
`compare` prints the max |logit difference| and one JSON line, and writes the model back with ernie45's save_model;
`reload` runs that copy in PaddleFormers against the logits in DIR. fp32 kernels differ in summation order only, so
anything above 1e-4 (logits ~5 here) is a real mismatch. (PaddleFormers 1.2 reads only the transformers layout,
not the legacy one ernie45 also writes: that one is checked against the official converter's rules in tests/.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

IDS = np.arange(3, 27).reshape(2, 12)


def make(out: Path) -> None:
    import paddle
    from paddleformers.transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    paddle.seed(0)
    cfg = Ernie4_5Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, fuse_rms_norm=False,
                         tie_word_embeddings=False, max_position_embeddings=256, rope_theta=10000.0)
    model = Ernie4_5ForCausalLM(cfg)
    model.eval()
    with paddle.no_grad():
        for name, p in model.named_parameters():  # random enough that a misplaced column moves the logits
            p.set_value(paddle.randn(p.shape, dtype=p.dtype) * 0.3 + (1.0 if "norm" in name else 0.0))
        out_ = model(input_ids=paddle.to_tensor(IDS))
    logits = (out_.logits if hasattr(out_, "logits") else out_[0]).numpy()
    model.save_pretrained(str(out), safe_serialization=True)
    np.save(out / "paddle_logits.npy", logits)


def reload(path: Path, reference: Path) -> None:
    import paddle
    from paddleformers.transformers import Ernie4_5ForCausalLM

    model = Ernie4_5ForCausalLM.from_pretrained(str(path), fuse_rms_norm=False)
    model.eval()
    with paddle.no_grad():
        out = model(input_ids=paddle.to_tensor(IDS))
    got = (out.logits if hasattr(out, "logits") else out[0]).numpy()
    diff = float(np.abs(got - np.load(reference / "paddle_logits.npy")).max())
    print(f"ernie45's save_model in PaddleFormers vs PaddleFormers' own logits: max |diff| {diff:.2e}")
    print(json.dumps({"reload_max_abs_diff": diff, "ok": diff <= 1e-4}))


def compare(path: Path, out: Path) -> None:
    import torch

    import ernie45

    model = ernie45.load_model(path, dtype="float32")
    want = np.load(path / "paddle_logits.npy")
    with torch.no_grad():
        got = model(torch.from_numpy(IDS)).numpy()
    diff = float(np.abs(got - want).max())
    print(f"PaddleFormers vs ernie45 logits: max |diff| {diff:.2e} (max |logit| {np.abs(want).max():.2f})")
    print(json.dumps({"max_abs_diff": diff, "max_abs_logit": float(np.abs(want).max()), "ok": diff <= 1e-4}))
    ernie45.save_model(model, out)


if __name__ == "__main__":
    commands = {"make": (make, 1), "compare": (compare, 2), "reload": (reload, 2)}
    if len(sys.argv) < 2 or sys.argv[1] not in commands or len(sys.argv) != 2 + commands[sys.argv[1]][1]:
        sys.exit(__doc__)
    commands[sys.argv[1]][0](*map(Path, sys.argv[2:]))
