"""`ernie45 generate`: stream one completion to stdout."""

from __future__ import annotations

import argparse
import sys

import torch

from ..checkpoint import load_model
from ..default_model import resolve_model_argument
from ..generation.generate import GenerationConfig
from ..generation.text import stop_ids_for, stream_text
from ..tokenizer import load_tokenizer


def load(args: argparse.Namespace):
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_argument(args.model)
    model = load_model(path, dtype=args.dtype)
    tokenizer = load_tokenizer(model.source_dir)
    return model, tokenizer


def sampling_config(args: argparse.Namespace, model, tokenizer) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop_token_ids=stop_ids_for(tokenizer, model),
    )


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load(args)
    cfg = sampling_config(args, model, tokenizer)
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        prompt = args.prompt
    for delta in stream_text(model, tokenizer, tokenizer.encode(prompt), cfg):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
