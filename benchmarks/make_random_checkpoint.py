"""Write a randomly initialised ERNIE-4.5-0.3B-shape checkpoint (transformers' `save_pretrained`, float32) with a
small SentencePiece tokenizer in the ERNIE layout, for the serving and quantization benchmarks: the real weights
cannot be downloaded on an offline machine, and speed does not depend on their values.

    python benchmarks/make_random_checkpoint.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse

import torch
from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

from ernie45.tokenizer.testing import build_tiny_sentencepiece_tokenizer

SHAPE_0_3B = dict(
    vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18, num_attention_heads=16,
    num_key_value_heads=2, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = Ernie4_5ForCausalLM(Ernie4_5Config(**SHAPE_0_3B)).float().eval()
    model.save_pretrained(args.out_dir)
    build_tiny_sentencepiece_tokenizer(args.out_dir)
    print(f"wrote {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M-parameter checkpoint to {args.out_dir}")


if __name__ == "__main__":
    main()
