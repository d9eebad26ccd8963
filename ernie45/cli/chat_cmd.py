"""`ernie45 chat`: interactive multi-turn chat on stdin/stdout, with a thinking-mode toggle.

Commands: `/think on`, `/think off`, `/reset`, `/exit` (or end of input).
"""

from __future__ import annotations

import argparse
import sys

from ..generation.text import stream_text
from ..tokenizer import ReasoningParser
from .generate_cmd import load, sampling_config

HELP = "commands: /think on|off, /reset, /exit"


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load(args)
    cfg = sampling_config(args, model, tokenizer)
    parser = ReasoningParser()
    thinking = args.think
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    print(f"ernie45 chat ({HELP}); thinking {'on' if thinking else 'off'}", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/think"):
            thinking = text.split()[-1] == "on"
            print(f"(thinking {'on' if thinking else 'off'})", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text!r}; {HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True, enable_thinking=thinking)
        stream = parser.stream(starts_in_reasoning=parser.prompt_ends_in_reasoning(prompt))
        content = [_show(stream.feed(delta)) for delta in stream_text(model, tokenizer, tokenizer.encode(prompt), cfg)]
        content.append(_show(stream.finish()))
        sys.stdout.write("\n")
        sys.stdout.flush()
        # The history keeps only the answer: ERNIE's templates do not feed earlier reasoning back.
        history.append({"role": "assistant", "content": "".join(content)})


def _show(deltas: tuple[str, str]) -> str:
    """Print reasoning (dimmed, on stderr) and content (stdout); returns the content."""
    reasoning, content = deltas
    if reasoning:
        sys.stderr.write(f"\x1b[2m{reasoning}\x1b[0m")
        sys.stderr.flush()
    if content:
        sys.stdout.write(content)
        sys.stdout.flush()
    return content
