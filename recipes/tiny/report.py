"""RESULTS.md of a build: what was measured, on what machine, how long each stage took."""

from __future__ import annotations

import json
import time
from pathlib import Path

STAGES = ("pt", "sft", "dpo")
ROWS = (("pt", "PT"), ("sft", "SFT"), ("dpo", "DPO"), ("final", "DPO, bf16 weights (shipped)"))
MODES = (("completion", "completion (\"347 + 85 =\")"), ("chat_thinking_off", "chat, thinking off"),
         ("chat_thinking_on", "chat, thinking on"))
TASKS = ("addition", "counting", "conversion")


def _pct(result: dict | None) -> str:
    return "-" if result is None else f"{100 * result['accuracy']:.1f}%"


def _last_train_metrics(run_dir: Path) -> dict:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [m for m in lines if m.get("split") == "train"]
    evals = [m for m in lines if m.get("split") == "eval"]
    out = {"steps": train[-1]["step"] if train else 0, "first": train[0] if train else {}, "last": train[-1] if train else {}}
    if evals:
        out["eval"] = evals[-1]
    # `tokens` is per logged step: the mean over logged steps stands for every step.
    out["tokens_per_step"] = sum(m.get("tokens", 0) for m in train) / max(1, len(train))
    return out


def write_results(path: Path, out: Path, results: dict, final: Path, timings: dict, machine: str) -> None:
    size = sum(f.stat().st_size for f in final.iterdir() if f.is_file())
    weights = sum(f.stat().st_size for f in final.glob("*.safetensors"))
    config = json.loads((final / "config.json").read_text(encoding="utf-8"))
    pt = results["pt"]["heldout"]
    lines = [
        "# The embedded default model: results",
        "",
        f"Built {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m recipes.tiny.build` on {machine}. "
        f"Stage wall times (OUT/timings.json), {sum(timings.values()) / 60:.1f} min in all: "
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items()) + " min.",
        "",
        (f"Checkpoint: {size / 1e6:.1f} MB in total ({weights / 1e6:.1f} MB of bfloat16 safetensors), "
         f"{config['model_type']}, hidden {config['hidden_size']}, {config['num_hidden_layers']} layers "
         f"(layer 0 dense), {config['moe_num_experts']} experts top-{config['moe_k']} + "
         f"{config['moe_num_shared_experts']} shared, vocab {config['vocab_size']}."),
        "",
        "## Held-out perplexity after pretraining",
        "",
        f"{pt['perplexity']:.1f} over {pt['tokens']:,} tokens of {pt['texts']:,} held-out quotes "
        "(English fortunes and Chinese poems/quotes never trained on; each scored alone, at most 256 tokens). "
        "The same set after the later stages: " + ", ".join(
            f"{name} {results[stage]['heldout']['perplexity']:.1f}" for stage, name in ROWS[1:] if "heldout" in results[stage]
        ) + ".",
        "",
        "## Held-out task accuracy (greedy)",
        "",
        (f"{results['pt']['completion']['n']} held-out problems (addition, counting, unit conversion; English and "
         "Chinese alternating; operands never seen in any training stage)."),
        "",
        "| stage | " + " | ".join(label for _, label in MODES) + " |",
        "|---|" + "---|" * len(MODES),
    ]
    for stage, name in ROWS:
        r = results[stage]
        lines.append(f"| {name} | " + " | ".join(_pct(r.get(mode)) for mode, _ in MODES) + " |")
    lines += ["", "Per task:", "", "| stage, mode | " + " | ".join(TASKS) + " | en | zh |",
              "|---|" + "---|" * (len(TASKS) + 2)]
    for stage, name in ROWS:
        for mode, label in MODES:
            r = results[stage].get(mode)
            if r is None:
                continue
            cells = [_pct(r["by"].get(key)) for key in (*TASKS, "lang:en", "lang:zh")]
            lines.append(f"| {name}, {label} | " + " | ".join(cells) + " |")
    lines += ["", "Thinking mode, mean output tokens and share of outputs with a reasoning part:", ""]
    for stage, name in ROWS[1:]:
        for mode, label in MODES[1:]:
            r = results[stage][mode]
            lines.append(f"- {name}, {label}: {r['mean_output_tokens']:.1f} tokens, "
                         f"{100 * r['with_reasoning']:.0f}% with reasoning, {100 * r['truncated']:.0f}% cut at the limit")
    lines += ["", "## Training runs (`ernie45 train`, metrics.jsonl)", ""]
    for stage in STAGES:
        m = _last_train_metrics(out / stage)
        first, last = m["first"], m["last"]
        key = "dpo_loss" if stage == "dpo" else "lm_loss"
        extra = ""
        if stage == "dpo":
            extra = f", reward margin {last.get('rewards_margin', float('nan')):.3f}, reward accuracy " \
                    f"{last.get('rewards_accuracy', float('nan')):.2f}"
        if "eval" in m:
            extra += f", trainer eval ppl {m['eval'].get('ppl', float('nan')):.1f}"
        lines.append(f"- {stage.upper()}: {m['steps']} steps, about {m['tokens_per_step']:,.0f} target tokens a step, {key} "
                     f"{first.get(key, float('nan')):.3f} -> {last.get(key, float('nan')):.3f}{extra}")
    lines += ["", "## Examples (held-out, shipped model)", ""]
    for mode, label in MODES[1:]:
        for ex in results["final"][mode]["examples"][:3]:
            reasoning = (ex["reasoning"] or "").replace("\n", " / ")
            lines.append(f"- {label}: {ex['question']} -> " + (f"[think: {reasoning}] " if reasoning else "")
                         + f"{ex['answer_text']!r} (answer {ex['answer']})")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
