"""Synthetic tasks with checkable answers, in English and Chinese: multi-digit addition, counting a digit in a
list, unit conversion. Each problem carries its question, a step-by-step reasoning (the thinking-mode trace), the
answer text and the integer the answer must contain.

Train and held-out problems are disjoint by construction: a problem is held out iff the SHA-256 of its
canonical key (operands, not wording) falls in the held-out bucket, so no held-out problem is ever seen, in any
wording or language, during pretraining, SFT or DPO.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

TASKS = ("addition", "counting", "conversion")
LANGUAGES = ("en", "zh")
HELDOUT_PERCENT = 10


@dataclass(frozen=True)
class Problem:
    """One task instance; `answer` is the integer a correct reply ends with."""

    task: str
    lang: str
    key: str
    question: str
    reasoning: str
    answer_text: str
    answer: int
    statement: str
    """The fact in plain text ("347 + 85 = 432"), the form pretraining sees."""
    prefix: str
    """`statement` up to the answer, the completion prompt used to test the pretrained model."""


def is_held_out(key: str) -> bool:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


# ---- addition --------------------------------------------------------------------------------------------------

_PLACES_EN = ("ones", "tens", "hundreds", "thousands")
_PLACES_ZH = ("个位", "十位", "百位", "千位")


def _addition(rng: random.Random, lang: str) -> Problem:
    digits_a, digits_b = rng.choice(((2, 2), (2, 3), (3, 2), (3, 3), (3, 3)))
    a = rng.randint(10 ** (digits_a - 1), 10**digits_a - 1)
    b = rng.randint(10 ** (digits_b - 1), 10**digits_b - 1)
    return _render_addition(a, b, lang, drop_carries=False)


def _render_addition(a: int, b: int, lang: str, drop_carries: bool) -> Problem:
    """`drop_carries`: the classic mistake (every carry forgotten), for rejected DPO answers."""
    steps = []
    carry = 0
    total = 0
    for place in range(max(len(str(a)), len(str(b)))):
        da, db = a // 10**place % 10, b // 10**place % 10
        s = da + db + carry
        total += s % 10 * 10**place
        extra = f" + {carry}" if carry else ""
        if lang == "en":
            steps.append(f"{_PLACES_EN[place]}: {da} + {db}{extra} = {s}, write {s % 10}, carry {0 if drop_carries else s // 10}")
        else:
            steps.append(f"{_PLACES_ZH[place]}：{da} + {db}{extra} = {s}，写 {s % 10}，进 {0 if drop_carries else s // 10}")
        carry = 0 if drop_carries else s // 10
    total += carry * 10 ** len(steps)
    if carry:
        steps.append(f"{_PLACES_EN[len(steps)]}: carry {carry}" if lang == "en" else f"{_PLACES_ZH[len(steps)]}：进位 {carry}")
    fact = f"{a} + {b} = {total}"
    if lang == "en":
        question = f"What is {a} + {b}?"
        reasoning = "Add column by column from the right.\n" + "\n".join(steps) + f"\nSo {a} + {b} = {total}."
        answer_text = f"{a} + {b} = {total}."
    else:
        question = f"{a} 加 {b} 等于多少？"
        reasoning = "从右往左逐位相加。\n" + "\n".join(steps) + f"\n所以 {a} + {b} = {total}。"
        answer_text = f"{a} + {b} = {total}。"
    return Problem("addition", lang, f"add:{a}:{b}", question, reasoning, answer_text, total, fact + ".",
                   f"{a} + {b} =")


# ---- counting ---------------------------------------------------------------------------------------------------

def _counting(rng: random.Random, lang: str) -> Problem:
    length = rng.randint(5, 12)
    target = rng.randint(0, 9)
    items = [rng.choice((target, rng.randint(0, 9))) for _ in range(length)]
    return _render_counting(items, target, lang, miss_last=False)


def _render_counting(items: list[int], target: int, lang: str, miss_last: bool) -> Problem:
    """`miss_last`: the last occurrence is overlooked, for rejected DPO answers."""
    last = max((i for i, item in enumerate(items) if item == target), default=-1) if miss_last else -1
    count = items.count(target) - (last >= 0)
    listing = " ".join(map(str, items))
    running = 0
    steps = []
    for i, item in enumerate(items):
        hit = item == target and i != last
        running += hit
        mark = ("yes" if hit else "no") if lang == "en" else ("是" if hit else "否")
        steps.append(f"{item}: {mark} ({running})")
    if lang == "en":
        question = f"How many times does {target} appear in: {listing}?"
        times = "time" if count == 1 else "times"
        reasoning = f"Go through the list and count each {target}.\n" + "\n".join(steps) + f"\nSo {target} appears {count} {times}."
        answer_text = f"{target} appears {count} {times}."
        statement, prefix = f"In {listing}, the digit {target} appears {count} {times}.", f"In {listing}, the digit {target} appears"
    else:
        question = f"在 {listing} 中，{target} 出现了几次？"
        reasoning = f"逐个检查列表，数出 {target}。\n" + "\n".join(steps) + f"\n所以 {target} 出现了 {count} 次。"
        answer_text = f"{target} 出现了 {count} 次。"
        statement, prefix = f"在 {listing} 中，数字 {target} 出现了 {count} 次。", f"在 {listing} 中，数字 {target} 出现了"
    return Problem("counting", lang, f"count:{target}:{listing}", question, reasoning, answer_text, count, statement,
                   prefix)


# ---- unit conversion --------------------------------------------------------------------------------------------

# (English from, English to, Chinese from, Chinese to, factor, largest value asked)
_UNITS = (
    ("kilometers", "meters", "千米", "米", 1000, 99),
    ("meters", "centimeters", "米", "厘米", 100, 99),
    ("centimeters", "millimeters", "厘米", "毫米", 10, 999),
    ("kilograms", "grams", "千克", "克", 1000, 99),
    ("liters", "milliliters", "升", "毫升", 1000, 99),
    ("hours", "minutes", "小时", "分钟", 60, 20),
    ("minutes", "seconds", "分钟", "秒", 60, 20),
    ("days", "hours", "天", "小时", 24, 20),
    ("weeks", "days", "周", "天", 7, 30),
    ("feet", "inches", "英尺", "英寸", 12, 20),
)


def _multiply_steps(value: int, factor: int) -> list[str]:
    """value x factor by place value: 37 x 60 = 30 x 60 + 7 x 60 = 1800 + 420."""
    if factor in (10, 100, 1000):
        return [f"{value} × {factor} = {value * factor}"]
    parts = [int(d) * 10**i for i, d in enumerate(reversed(str(value))) if d != "0"][::-1]
    if len(parts) == 1:
        return [f"{value} × {factor} = {value * factor}"]
    products = [p * factor for p in parts]
    lines = [f"{p} × {factor} = {q}" for p, q in zip(parts, products)]
    lines.append(" + ".join(map(str, products)) + f" = {value * factor}")
    return lines


def _conversion(rng: random.Random, lang: str) -> Problem:
    unit = rng.choice(_UNITS)
    return _render_conversion(unit, rng.randint(2, unit[5]), lang, unit[4])


# A wrong conversion factor for each right one (the mistakes rejected DPO answers make).
WRONG_FACTORS = {1000: 100, 100: 10, 10: 100, 60: 100, 24: 12, 7: 5, 12: 10}


def _render_conversion(unit: tuple, value: int, lang: str, factor: int) -> Problem:
    src_en, dst_en, src_zh, dst_zh, _, _ = unit
    result = value * factor
    steps = "\n".join(_multiply_steps(value, factor))
    if lang == "en":
        question = f"How many {dst_en} are in {value} {src_en}?"
        reasoning = f"1 {src_en[:-1] if src_en != 'feet' else 'foot'} = {factor} {dst_en}, so multiply by {factor}.\n{steps}"
        answer_text = f"{value} {src_en} = {result} {dst_en}."
        statement, prefix = f"{value} {src_en} = {result} {dst_en}.", f"{value} {src_en} ="
    else:
        question = f"{value} {src_zh}等于多少{dst_zh}？"
        reasoning = f"1 {src_zh} = {factor} {dst_zh}，所以乘以 {factor}。\n{steps}"
        answer_text = f"{value} {src_zh} = {result} {dst_zh}。"
        statement, prefix = f"{value} {src_zh} = {result} {dst_zh}。", f"{value} {src_zh} ="
    return Problem("conversion", lang, f"convert:{src_en}:{value}", question, reasoning, answer_text, result,
                   statement, prefix)


_MAKERS = {"addition": _addition, "counting": _counting, "conversion": _conversion}


def generate(count: int, seed: int, heldout: bool, tasks: tuple[str, ...] = TASKS) -> list[Problem]:
    """`count` problems (task and language round-robin) from the train or the held-out split.

    Held-out problems are distinct; train problems may repeat (the conversion task has ~1,500 distinct ones).
    """
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 200 * count:
            raise ValueError(f"could not draw {count} distinct {'held-out' if heldout else 'train'} problems")
        task = tasks[len(out) % len(tasks)]
        lang = LANGUAGES[(len(out) // len(tasks)) % len(LANGUAGES)]
        problem = _MAKERS[task](rng, lang)
        if is_held_out(problem.key) != heldout or (heldout and (problem.key, lang) in seen):
            continue
        seen.add((problem.key, lang))
        out.append(problem)
    return out


_INTEGER = re.compile(r"-?\d+")


def extract_answer(text: str) -> int | None:
    """The last integer in a reply (answers end with the number asked for), None if there is none."""
    numbers = _INTEGER.findall(text.replace(",", ""))
    return int(numbers[-1]) if numbers else None


def first_integer(text: str) -> int | None:
    """The first integer of a completion (the pretrained model continues "347 + 85 =" with the sum)."""
    match = _INTEGER.search(text.replace(",", ""))
    return int(match.group()) if match else None


def mistaken(problem: Problem) -> Problem:
    """The same question answered with a typical mistake (a wrong answer with reasoning that leads to it)."""
    if problem.task == "addition":
        a, b = map(int, problem.key.split(":")[1:])
        wrong = _render_addition(a, b, problem.lang, drop_carries=True)
        if wrong.answer == problem.answer:  # nothing to carry: misadd the last column instead
            return _replace_answer(problem, problem.answer + 10 ** (len(str(problem.answer)) - 1))
        return wrong
    if problem.task == "counting":
        _, target, listing = problem.key.split(":")
        items = list(map(int, listing.split()))
        if problem.answer == 0:
            return _replace_answer(problem, 1)
        return _render_counting(items, int(target), problem.lang, miss_last=True)
    _, src_en, value = problem.key.split(":")
    unit = next(u for u in _UNITS if u[0] == src_en)
    return _render_conversion(unit, int(value), problem.lang, WRONG_FACTORS[unit[4]])


def _replace_answer(problem: Problem, wrong: int) -> Problem:
    """Right steps, wrong conclusion: the final number replaced in the last reasoning line and the answer."""
    head, _, last_line = problem.reasoning.rpartition("\n")
    right = str(problem.answer)
    last_line = last_line[: last_line.rfind(right)] + str(wrong) + last_line[last_line.rfind(right) + len(right):]
    answer_text = problem.answer_text[: problem.answer_text.rfind(right)] + str(wrong) + \
        problem.answer_text[problem.answer_text.rfind(right) + len(right):]
    return Problem(problem.task, problem.lang, problem.key, problem.question, f"{head}\n{last_line}", answer_text,
                   wrong, problem.statement, problem.prefix)
