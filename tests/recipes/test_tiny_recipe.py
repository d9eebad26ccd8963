"""The default-model recipe's parts that run in milliseconds: task generation and splits, the fortune parser, the
chat template's contract with the trainer, the ERNIE-layout tokenizer writer."""

import json

import pytest

from ernie45.tokenizer import load_tokenizer, render_chat_template
from ernie45.tokenizer.training import CONTROL_PIECES, USER_DEFINED_PIECES
from recipes.tiny.corpus import clean, split_fortunes
from recipes.tiny.corpus import is_held_out as quote_held_out
from recipes.tiny.data import assistant_content, dpo_pairs
from recipes.tiny.tasks import TASKS, extract_answer, first_integer, generate, is_held_out, mistaken
from recipes.tiny.tokenizer import build_tokenizer, chat_template


def test_generated_problems_are_right_and_splits_disjoint():
    train = generate(600, seed=1, heldout=False)
    heldout = generate(90, seed=2, heldout=True)
    assert {p.task for p in train} == set(TASKS) and {p.lang for p in heldout} == {"en", "zh"}
    assert not {p.key for p in train} & {p.key for p in heldout}
    assert all(is_held_out(p.key) for p in heldout) and not any(is_held_out(p.key) for p in train)
    assert len({(p.key, p.lang) for p in heldout}) == len(heldout)
    for p in train + heldout:
        assert extract_answer(p.answer_text) == p.answer == extract_answer(p.reasoning)
        assert first_integer(p.statement[len(p.prefix):]) == p.answer
        if p.task == "addition":
            a, b = map(int, p.key.split(":")[1:])
            assert p.answer == a + b
        elif p.task == "counting":
            _, target, listing = p.key.split(":")
            assert p.answer == listing.split().count(target)


def test_generation_is_deterministic():
    assert generate(50, seed=3, heldout=True) == generate(50, seed=3, heldout=True)


def test_mistakes_are_wrong_and_consistent():
    for p in generate(300, seed=4, heldout=False):
        wrong = mistaken(p)
        assert wrong.question == p.question and wrong.answer != p.answer
        assert extract_answer(wrong.answer_text) == wrong.answer == extract_answer(wrong.reasoning)


def test_dpo_rows_are_erniekit_pairs():
    rows = dpo_pairs(generate(4, seed=5, heldout=False))
    assert all(set(r) == {"src", "tgt", "response", "sort"} and r["sort"] == [1, 0] for r in rows)
    assert rows[0]["response"][0][0].startswith("<think>\n") and "</think>" not in rows[1]["response"][0][0]


def test_fortune_files_are_split_and_cleaned():
    text = "One.\n  \n\n\n\nTwo\x1b[33m lines\x1b[m\n%\n%\n\x1b[32m《诗》\x1b[m\n床前明月光\n%\n"
    assert split_fortunes(text) == ["One.\n\nTwo lines", "《诗》\n床前明月光"]
    assert clean(" a \t\nb") == "a\nb"
    assert quote_held_out("x", 100) and not quote_held_out("x", 0)


def test_template_extends_prompts_as_the_trainer_requires():
    template = chat_template()
    q = [{"role": "user", "content": "What is 1 + 2?"}]
    thinking = q + [{"role": "assistant", "content": "<think>\n1 + 2 = 3\n</think>\n\n3"}]
    direct = q + [{"role": "assistant", "content": "3"}]
    full_thinking, full_direct = render_chat_template(template, thinking), render_chat_template(template, direct)
    for kwargs in ({}, {"enable_thinking": True}):
        assert full_thinking.startswith(render_chat_template(template, q, add_generation_prompt=True, **kwargs))
    off = render_chat_template(template, q, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("Assistant: <think>\n\n</think>\n\n") and full_direct.startswith(off)
    assert full_direct.endswith("3<|end_of_sentence|>")
    # The released non-thinking template's frame: cls, "User: ", "Assistant: ", sep.
    assert render_chat_template(template, q, add_generation_prompt=True) == \
        "<|begin_of_sentence|>User: What is 1 + 2?\nAssistant: "


@pytest.fixture(scope="module")
def recipe_tokenizer(tmp_path_factory):
    texts = ["The quick brown fox jumps over the lazy dog.", "床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"] * 20
    out = build_tokenizer(tmp_path_factory.mktemp("tok"), texts, generate(60, seed=6, heldout=False), vocab_size=400)
    return load_tokenizer(out), out


def test_tokenizer_has_ernie_layout_and_splits_digits(recipe_tokenizer):
    tok, out = recipe_tokenizer
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    for piece in (*CONTROL_PIECES, *USER_DEFINED_PIECES):
        assert tok.token_to_id(piece) is not None
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == chat_template()
    assert len(tok.encode("12345")) == 5
    for text in ("What is 347 + 85?", "床前明月光，疑是地上霜。龘😀"):
        assert tok.decode(tok.encode(text)) == text


def test_assistant_content_inlines_reasoning():
    p = generate(1, seed=7, heldout=False)[0]
    assert assistant_content(p, thinking=True) == f"<think>\n{p.reasoning}\n</think>\n\n{p.answer_text}"
    assert assistant_content(p, thinking=False) == p.answer_text
