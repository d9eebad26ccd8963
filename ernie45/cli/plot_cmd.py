"""`ernie45 plot RUN_DIR`: loss curves of a training run (PNG with matplotlib, else SVG)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training output_dir (with metrics.jsonl)")


def run(args: argparse.Namespace) -> int:
    from ..training.plot import plot_run

    print(plot_run(args.run_dir))
    return 0
