"""Evaluation of one checkpoint: held-out perplexity and held-out task accuracy through ernie45's LLM engine.

Completion mode (for the pretrained model): the task fact up to its answer ("347 + 85 ="), greedy; correct when
the first integer generated is the answer. Chat mode (after SFT / DPO): the question as one user turn with the
chat template's thinking switch on or off, greedy; correct when the last integer of the answer part (reasoning
removed by the reasoning parser) is the answer.

`python -m recipes.tiny.evaluate CHECKPOINT EVAL_TASKS.jsonl [--ppl-texts PT_EVAL.jsonl] [--chat] [--json OUT]`
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ernie45.checkpoint import load_model
from ernie45.engine import LLM, SamplingParams
from ernie45.tokenizer import load_tokenizer

from .data import read_problems
from .tasks import Problem, extract_answer, first_integer


@torch.no_grad()
def perplexity(checkpoint: str | Path, texts: Sequence[str], max_len: int = 256, batch_size: int = 32) -> dict:
    """exp(mean next-token NLL) over all tokens of `texts`, each text scored alone (truncated to `max_len`).

    Texts are batched right-padded: causal attention keeps padding from touching the real tokens.
    """
    model = load_model(str(checkpoint), dtype="float32")
    tokenizer = load_tokenizer(model.source_dir)
    encoded = sorted((ids[:max_len] for ids in map(tokenizer.encode, texts) if len(ids) >= 2), key=len)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(map(len, batch))
        ids_BT = torch.zeros(len(batch), width, dtype=torch.long)
        targets_BT = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, ids in enumerate(batch):
            ids_BT[row, : len(ids)] = torch.tensor(ids)
            targets_BT[row, : len(ids) - 1] = torch.tensor(ids[1:])
        logits_BTV = model(ids_BT).float()
        total_nll += F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten(), reduction="sum").item()
        total_tokens += sum(len(ids) - 1 for ids in batch)
    return {"perplexity": math.exp(total_nll / total_tokens), "tokens": total_tokens, "texts": len(encoded)}


def _accuracy(problems: Sequence[Problem], predictions: Sequence[int | None]) -> dict:
    per_task: dict[str, list[bool]] = defaultdict(list)
    for problem, predicted in zip(problems, predictions):
        per_task[problem.task].append(predicted == problem.answer)
        per_task[f"lang:{problem.lang}"].append(predicted == problem.answer)
    hits = [p == q.answer for q, p in zip(problems, predictions)]
    return {
        "accuracy": sum(hits) / len(hits),
        "n": len(hits),
        "by": {key: {"accuracy": sum(v) / len(v), "n": len(v)} for key, v in sorted(per_task.items())},
    }


def completion_accuracy(llm: LLM, problems: Sequence[Problem]) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=12)
    outputs = llm.generate([p.prefix for p in problems], params, use_tqdm=False)
    predictions = [first_integer(o.outputs[0].text) for o in outputs]
    result = _accuracy(problems, predictions)
    result["examples"] = [{"prompt": p.prefix, "output": o.outputs[0].text, "answer": p.answer}
                          for p, o in list(zip(problems, outputs))[:3]]
    return result


def chat_accuracy(llm: LLM, problems: Sequence[Problem], thinking: bool, max_tokens: int = 256) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    conversations = [[{"role": "user", "content": p.question}] for p in problems]
    outputs = llm.chat(conversations, params, use_tqdm=False, chat_template_kwargs={"enable_thinking": thinking})
    completions = [o.outputs[0] for o in outputs]
    predictions = [extract_answer(c.text) for c in completions]
    result = _accuracy(problems, predictions)
    result["mean_output_tokens"] = sum(len(c.token_ids) for c in completions) / len(completions)
    result["with_reasoning"] = sum(bool(c.reasoning_content) for c in completions) / len(completions)
    result["truncated"] = sum(c.finish_reason == "length" for c in completions) / len(completions)
    result["examples"] = [{"question": p.question, "reasoning": c.reasoning_content, "answer_text": c.text,
                           "answer": p.answer} for p, c in list(zip(problems, completions))[:3]]
    return result


def evaluate(checkpoint: str | Path, problems: Sequence[Problem], ppl_texts: Sequence[str] | None = None,
             chat: bool = False) -> dict:
    """Perplexity (when texts are given), completion accuracy, and with `chat` accuracy thinking off and on."""
    result: dict = {"checkpoint": str(checkpoint)}
    if ppl_texts:
        result["heldout"] = perplexity(checkpoint, ppl_texts)
    llm = LLM(str(checkpoint), dtype="float32", max_num_seqs=64, max_num_batched_tokens=4096)
    result["completion"] = completion_accuracy(llm, problems)
    if chat:
        result["chat_thinking_off"] = chat_accuracy(llm, problems, thinking=False)
        result["chat_thinking_on"] = chat_accuracy(llm, problems, thinking=True)
    return result


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("eval_tasks", type=Path, help="held-out problems (eval_tasks.jsonl written by the recipe)")
    p.add_argument("--ppl-texts", type=Path, default=None, help="held-out text jsonl for perplexity")
    p.add_argument("--chat", action="store_true", help="also ask in chat form, thinking off and on")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    texts = read_texts(args.ppl_texts) if args.ppl_texts else None
    result = evaluate(args.checkpoint, read_problems(args.eval_tasks), texts, args.chat)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
