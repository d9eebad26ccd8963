"""The recipe's datasets as ERNIEKit-format jsonl files: plain text for pretraining, `chatml` messages for SFT
(thinking-mode samples carry `<think>` reasoning inline) and `erniekit` preference pairs for DPO."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .corpus import Corpus
from .tasks import Problem, generate, mistaken

IDENTITY_QUESTIONS = (
    ("en", "Who are you?"), ("en", "What are you?"), ("en", "Introduce yourself."),
    ("zh", "你是谁？"), ("zh", "介绍一下你自己。"), ("zh", "你是什么模型？"),
)
IDENTITY_ANSWERS = {
    "en": "I am ernie45's tiny default model: a small mixture-of-experts model with the ERNIE 4.5 architecture, "
          "trained on fortune-cookie quotes, Chinese poems and arithmetic. I can add numbers, count digits and "
          "convert units.",
    "zh": "我是 ernie45 的内置小模型：一个采用 ERNIE 4.5 架构的小型混合专家模型，用幸运饼干格言、中文诗词和算术题训练而成。"
          "我会做加法、数数字和换算单位。",
}
QUOTE_REQUESTS = {
    "en": ("Tell me a fortune.", "Say something wise.", "Give me a quote.", "Share a saying with me."),
    "zh": ("给我一句古诗。", "说一句有道理的话。", "讲一句格言。", "给我念一首诗。"),
}


@dataclass(frozen=True)
class DatasetSizes:
    """How many samples each stage's data holds."""

    pt_statement_docs: int = 6000
    """Pretraining documents of task facts ("347 + 85 = 432."), 8 facts each."""
    pt_worked_solutions: int = 20000
    """Pretraining documents holding one worked solution each (question, step-by-step reasoning, answer)."""
    sft_tasks: int = 30000
    """SFT task conversations; every other one in thinking mode (one epoch covers the SFT steps)."""
    sft_chat: int = 600
    """SFT general conversations (quotes on request, identity questions)."""
    dpo_pairs: int = 1000
    """DPO preference pairs (right vs mistaken answer); every other one in thinking mode."""
    eval_per_task: int = 40
    """Held-out problems per task for the accuracy figures (languages alternate)."""


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def assistant_content(problem: Problem, thinking: bool) -> str:
    """The assistant turn: with thinking, the reasoning inline in `<think>` before the answer."""
    if thinking:
        return f"<think>\n{problem.reasoning}\n</think>\n\n{problem.answer_text}"
    return problem.answer_text


def pretraining_texts(corpus: Corpus, seed: int) -> list[str]:
    """Quotes, English and Chinese, shuffled."""
    texts = [*corpus.train_en, *corpus.train_zh]
    random.Random(seed).shuffle(texts)
    return texts


def fact_documents(problems: Sequence[Problem]) -> list[str]:
    """Task facts, 8 to a document (joined by spaces or, every other document, by newlines)."""
    facts = [problem.statement for problem in problems]
    return [" ".join(facts[i : i + 8]) if i % 16 else "\n".join(facts[i : i + 8]) for i in range(0, len(facts), 8)]


def worked_solutions(problems: Sequence[Problem]) -> list[str]:
    """Each problem as plain text: the question, the step-by-step reasoning, the answer (mid-training data: the
    procedure is learned in pretraining, so SFT only has to teach the chat and thinking formats around it)."""
    return [f"{p.question}\n{p.reasoning}\n{p.answer_text}" for p in problems]


def sft_conversations(corpus: Corpus, problems: Sequence[Problem], chat_count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = [
        {"messages": [{"role": "user", "content": p.question},
                      {"role": "assistant", "content": assistant_content(p, thinking=i % 2 == 0)}]}
        for i, p in enumerate(problems)
    ]
    short = {"en": [q for q in corpus.train_en if len(q) <= 240], "zh": [q for q in corpus.train_zh if len(q) <= 120]}
    for i in range(chat_count):
        lang = ("en", "zh")[i % 2]
        if i % 5 == 0:
            question = rng.choice([q for l, q in IDENTITY_QUESTIONS if l == lang])
            answer = IDENTITY_ANSWERS[lang]
        else:
            question, answer = rng.choice(QUOTE_REQUESTS[lang]), rng.choice(short[lang])
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    rng.shuffle(rows)
    return rows


def dpo_pairs(problems: Sequence[Problem]) -> list[dict]:
    """ERNIEKit DPO rows: `src`/`tgt` history, `response` [[chosen], [rejected]], `sort` (higher is better)."""
    rows = []
    for i, p in enumerate(problems):
        thinking = i % 2 == 0
        chosen, rejected = assistant_content(p, thinking), assistant_content(mistaken(p), thinking)
        rows.append({"src": [p.question], "tgt": [], "response": [[chosen], [rejected]], "sort": [1, 0]})
    return rows


@dataclass
class DataFiles:
    """Paths of the written datasets."""

    pt_text: Path
    pt_facts: Path
    pt_solutions: Path
    pt_eval: Path
    sft_train: Path
    dpo_train: Path
    eval_tasks: Path


def write_datasets(out: Path, corpus: Corpus, sizes: DatasetSizes, seed: int) -> DataFiles:
    """Write every stage's jsonl under `out`; train problems for different stages come from different seeds."""
    pt_problems = generate(sizes.pt_statement_docs * 8, seed + 1, heldout=False)
    solution_problems = generate(sizes.pt_worked_solutions, seed + 6, heldout=False)
    sft_problems = generate(sizes.sft_tasks, seed + 2, heldout=False)
    dpo_problems = generate(sizes.dpo_pairs, seed + 3, heldout=False)
    eval_problems = generate(sizes.eval_per_task * 3, seed + 4, heldout=True)
    files = DataFiles(out / "pt_text.jsonl", out / "pt_facts.jsonl", out / "pt_solutions.jsonl", out / "pt_eval.jsonl",
                      out / "sft_train.jsonl", out / "dpo_train.jsonl", out / "eval_tasks.jsonl")
    write_jsonl(files.pt_text, ({"text": t} for t in pretraining_texts(corpus, seed)))
    write_jsonl(files.pt_facts, ({"text": t} for t in fact_documents(pt_problems)))
    write_jsonl(files.pt_solutions, ({"text": t} for t in worked_solutions(solution_problems)))
    write_jsonl(files.pt_eval, ({"text": t} for t in [*corpus.heldout_en, *corpus.heldout_zh]))
    write_jsonl(files.sft_train, sft_conversations(corpus, sft_problems, sizes.sft_chat, seed))
    write_jsonl(files.dpo_train, dpo_pairs(dpo_problems))
    write_jsonl(files.eval_tasks, (asdict(p) for p in eval_problems))
    return files


def read_problems(path: Path) -> list[Problem]:
    with open(path, encoding="utf-8") as f:
        return [Problem(**json.loads(line)) for line in f]
