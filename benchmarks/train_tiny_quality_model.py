"""Train a small ERNIE 4.5 MoE model on local text for a few hundred steps: a stand-in for the embedded default
model when measuring quantization quality (benchmarks/eval_quant_quality.py) before that model exists.

The text is any prose file; the tokenizer is the tiny byte-fallback SentencePiece used by the tests. The last
`--heldout-fraction` of the text is written beside the checkpoint (heldout.txt) and never trained on.

    python benchmarks/train_tiny_quality_model.py --text corpus.txt --out /tmp/tiny-moe --steps 300
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ernie45
from ernie45.checkpoint import build_empty_model
from ernie45.models import Ernie45Config
from ernie45.tokenizer import load_tokenizer
from ernie45.tokenizer.testing import build_tiny_sentencepiece_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--heldout-fraction", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)

    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    split = int(len(text) * (1 - args.heldout_fraction))
    tok_dir = build_tiny_sentencepiece_tokenizer(out.parent / f"{out.name}-tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    ids = torch.tensor(tokenizer.encode(text[:split]))
    print(f"{len(ids)} training tokens, vocab {len(tokenizer)}", flush=True)

    config = Ernie45Config.from_dict(
        {
            "model_type": "ernie4_5_moe",
            "vocab_size": len(tokenizer),
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "moe_num_experts": 8,
            "moe_k": 2,
            "moe_intermediate_size": 256,
            "moe_num_shared_experts": 1,
            "moe_layer_start_index": 1,
            "initializer_range": 0.02,
            "tie_word_embeddings": True,
        }
    )
    model = build_empty_model(config, torch.float32)
    model.init_weights(torch.Generator().manual_seed(0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, len(ids) - args.seq_len - 1, (args.batch,), generator=g)
        batch = torch.stack([ids[o : o + args.seq_len + 1] for o in offsets.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    ernie45.save_model(model, out, tokenizer=tokenizer)
    (out / "heldout.txt").write_text(text[split:], encoding="utf-8")
    (out / "train_excerpt.txt").write_text(text[: min(split, 200_000)], encoding="utf-8")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
