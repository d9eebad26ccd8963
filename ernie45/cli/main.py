"""`ernie45` command line: generate, chat, serve, bench, train, export, convert, plot, quantize."""

from __future__ import annotations

import argparse
import sys

from ..server import serve as server_cli
from . import bench_cmd, chat_cmd, convert_cmd, export_cmd, generate_cmd, plot_cmd, quantize_cmd, router_cmd, train_cmd


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or hub id (default: the embedded default model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype (auto: the checkpoint's)")


def add_sampling_arguments(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=temperature, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0, help="0 means off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ernie45", description="ERNIE 4.5 in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a completion of --prompt")
    add_model_arguments(gen)
    gen.add_argument("--prompt", required=True, help="text to complete")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as one user turn")
    add_sampling_arguments(gen, temperature=0.8)
    gen.set_defaults(run=generate_cmd.run)

    chat = sub.add_parser("chat", help="interactive multi-turn chat (/think on|off, /reset, /exit)")
    add_model_arguments(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--think", action="store_true", help="start with thinking mode on")
    add_sampling_arguments(chat, temperature=0.8)
    chat.set_defaults(run=chat_cmd.run)

    serve = sub.add_parser("serve", help="OpenAI-compatible server (FastAPI + uvicorn)")
    add_model_arguments(serve)
    server_cli.add_serve_arguments(serve)
    serve.set_defaults(run=server_cli.run)

    for name, module, help_text in (
        ("train", train_cmd, "train (PT / SFT / DPO, Full or LoRA) from an ERNIEKit-style YAML config"),
        ("export", export_cmd, "write a model (LoRA merged) as an HF checkpoint, the Paddle layout or GGUF"),
        ("convert", convert_cmd, "convert a checkpoint between the transformers (-PT) and Paddle layouts"),
        ("plot", plot_cmd, "plot the loss curves of a training run"),
        ("quantize", quantize_cmd, "weight-only int8/int4/2-bit quantization into a packed checkpoint"),
        ("bench", bench_cmd, "benchmark a server (serve) or the offline engine (throughput, latency), as vllm bench"),
        ("router", router_cmd, "OpenAI-compatible router over prefill / decode / mixed serve instances"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
