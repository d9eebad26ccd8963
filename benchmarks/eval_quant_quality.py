"""Held-out perplexity of a checkpoint and of its weight-only quantized versions (quality does not depend on
machine load, so these figures may be taken anywhere).

Variants: int8 RTN; int4 RTN vs GPTQ (vs GPTQ + grid refit); 2-bit RTN vs GPTQ vs HQQ (diag-weighted with
the calibration data) vs GPTQ over HQQ grids vs GPTQ + least-squares grid refit (our 2-bit method); the
mixed-2bit recipe; and, with --qat-steps, 2-bit QAT vs full-precision fine-tuning of the same steps.
Prints a table (ppl, delta vs the full-precision model, bytes on disk of the quantized checkpoint) and one JSON line.
With --tasks (the embedded default model's held-out problems, `eval_tasks.jsonl` of `python -m recipes.tiny.build`),
every variant's saved checkpoint is also asked those problems through the engine (recipes/tiny/evaluate.py:
completion, chat thinking off, chat thinking on; greedy) and its task accuracy reported.

    python benchmarks/eval_quant_quality.py --model DIR --text heldout.txt --calib train.txt [--tasks eval_tasks.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ernie45
from ernie45.quant import convert_qat, prepare_qat, quantize
from ernie45.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for recipes.tiny (--tasks)

VARIANTS = {
    "int8-rtn": {"bits": 8, "method": "rtn"},
    "int4-rtn": {"bits": 4, "method": "rtn"},
    "int4-gptq": {"bits": 4, "method": "gptq"},
    "2bit-rtn": {"bits": 2, "method": "rtn"},
    "2bit-gptq": {"bits": 2, "method": "gptq"},
    "2bit-hqq": {"bits": 2, "method": "hqq"},
    "2bit-gptq-hqq": {"bits": 2, "method": "gptq-hqq"},
    "2bit-gptq-refit": {"bits": 2, "method": "gptq-refit"},
    "int4-gptq-refit": {"bits": 4, "method": "gptq-refit"},
    "mixed-2bit-gptq-refit": {"bits": 2, "method": "gptq-refit", "recipe": "mixed-2bit"},
}


@torch.inference_mode()
def perplexity(model, windows: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    for ids in windows:
        logits = model(ids[None, :-1])[0]
        nll += F.cross_entropy(logits.float(), ids[1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def windows_of(tokenizer, text: str, seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    ids = torch.tensor(tokenizer.encode(text)[:max_tokens])
    return [ids[i : i + seq_len + 1] for i in range(0, len(ids) - seq_len, seq_len)]


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def finetuned(model_dir: Path, calib_text: str, tokenizer, steps: int, seq_len: int, group_size: int | None, qat: bool):
    """Fine-tune on the calibration text for `steps`: with 2-bit QAT on every quantizable linear but lm_head
    (fake-quant STE, then exported packed), or without (the full-precision baseline QAT must be compared with,
    since the fine-tuning itself also moves the perplexity)."""
    model = ernie45.load_model(model_dir)
    if qat:
        prepare_qat(model, bits=2, group_size=group_size)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    ids = torch.tensor(tokenizer.encode(calib_text))
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        offsets = torch.randint(0, len(ids) - seq_len - 1, (8,), generator=g).tolist()
        batch = torch.stack([ids[o : o + seq_len + 1] for o in offsets])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = 5e-4 * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
    model.eval()
    return convert_qat(model) if qat else model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="full-precision checkpoint directory")
    parser.add_argument("--text", required=True, help="held-out text for perplexity")
    parser.add_argument("--calib", required=True, help="calibration text (disjoint from --text)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-eval-tokens", type=int, default=32768)
    parser.add_argument("--num-calib-samples", type=int, default=64)
    parser.add_argument("--group-size-4bit", type=int, default=128)
    parser.add_argument("--group-size-2bit", type=int, default=64)
    parser.add_argument("--qat-steps", type=int, default=0, help="also fine-tune 2-bit QAT this many steps (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", type=Path, default=None,
                        help="held-out problems (recipes/tiny eval_tasks.jsonl): also report task accuracy")
    args = parser.parse_args()
    problems = None
    if args.tasks:
        from recipes.tiny.data import read_problems

        problems = read_problems(args.tasks)

    def task_accuracy(checkpoint: Path) -> dict:
        """Accuracy in % per mode (completion, chat thinking off / on), or {} without --tasks."""
        if problems is None:
            return {}
        from recipes.tiny.evaluate import evaluate

        result = evaluate(checkpoint, problems, chat=True)
        modes = ("completion", "chat_thinking_off", "chat_thinking_on")
        return {mode: 100 * result[mode]["accuracy"] for mode in modes}

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    tokenizer = load_tokenizer(model_dir)
    windows = windows_of(tokenizer, Path(args.text).read_text(encoding="utf-8"), args.seq_len, args.max_eval_tokens)
    base = ernie45.load_model(model_dir)
    base_ppl = perplexity(base, windows)
    rows = [{"variant": "full precision", "ppl": base_ppl, "delta_pct": 0.0, "disk_bytes": disk_bytes(model_dir),
             **task_accuracy(model_dir)}]
    print(f"full precision: ppl {base_ppl:.3f} on {sum(len(w) - 1 for w in windows)} held-out tokens", flush=True)
    del base

    scratch = Path(tempfile.mkdtemp(prefix="quant-quality-"))
    try:
        for name in args.variants.split(","):
            kwargs = dict(VARIANTS[name])
            gs = {4: args.group_size_4bit, 2: args.group_size_2bit}.get(kwargs["bits"])
            if gs is not None:
                kwargs["group_size"] = gs
            if kwargs["method"] in ("gptq", "gptq-hqq", "gptq-refit", "hqq"):
                kwargs.update(calib=args.calib, num_calib_samples=args.num_calib_samples, calib_seq_len=args.seq_len)
            start = time.perf_counter()
            model = quantize(model_dir, scratch / name, **kwargs)
            seconds = time.perf_counter() - start
            ppl = perplexity(model, windows)
            rows.append(
                {
                    "variant": name,
                    "ppl": ppl,
                    "delta_pct": 100 * (ppl / base_ppl - 1),
                    "disk_bytes": disk_bytes(scratch / name),
                    "quantize_s": seconds,
                    **task_accuracy(scratch / name),
                }
            )
            print(f"{name}: ppl {ppl:.3f} ({rows[-1]['delta_pct']:+.2f}%) in {seconds:.0f} s", flush=True)
            shutil.rmtree(scratch / name)
        if args.qat_steps:
            calib_text = Path(args.calib).read_text(encoding="utf-8")
            tuned_ppl = None
            for qat in (False, True):
                model = finetuned(
                    model_dir, calib_text, tokenizer, args.qat_steps, args.seq_len, args.group_size_2bit, qat
                )
                ppl = perplexity(model, windows)
                name = f"{'2bit-qat' if qat else 'fp-finetuned'}-{args.qat_steps}steps"
                ernie45.save_model(model, scratch / name)
                rows.append(
                    {
                        "variant": name,
                        "ppl": ppl,
                        "delta_pct": 100 * (ppl / base_ppl - 1),
                        "disk_bytes": disk_bytes(scratch / name),
                        **task_accuracy(scratch / name),
                    }
                )
                if qat:
                    rows[-1]["delta_vs_finetuned_pct"] = 100 * (ppl / tuned_ppl - 1)
                tuned_ppl = ppl
                print(f"{name}: ppl {ppl:.3f} ({rows[-1]['delta_pct']:+.2f}% vs the untuned model)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    tasks = "  completion / think off / think on" if problems is not None else ""
    print(f"\n{'variant':22} {'ppl':>9} {'delta':>8} {'disk MB':>8}{tasks}")
    for r in rows:
        accuracy = (f"  {r['completion']:6.1f}% / {r['chat_thinking_off']:6.1f}% / {r['chat_thinking_on']:6.1f}%"
                    if problems is not None else "")
        print(f"{r['variant']:22} {r['ppl']:9.3f} {r['delta_pct']:+7.2f}% {r['disk_bytes'] / 1e6:8.2f}{accuracy}")
    print(json.dumps({"bench": "quant_quality", "model": str(model_dir), "rows": rows}))


if __name__ == "__main__":
    main()
