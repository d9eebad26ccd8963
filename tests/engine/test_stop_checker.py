"""StopChecker with a real (tiny) ERNIE tokenizer: stop strings across token boundaries, stop ids, eos, lengths,
min_tokens and multi-byte text, fed one token at a time as the engine does."""

import pytest

from ernie45.engine.sampling_params import SamplingParams
from ernie45.engine.stop_checker import StopChecker
from ernie45.tokenizer import load_tokenizer
from ernie45.tokenizer.testing import build_tiny_sentencepiece_tokenizer

ENGLISH = "The model predicts the next token. Our team checks a short answer."
# The rare characters are byte-fallback tokens, 3 per character.
CHINESE = "模型正在学习中文句子。罕见的字：龘靐齉"
EOS, END_OF_SENTENCE = 2, 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_tiny_sentencepiece_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer")))


def _feed(tokenizer, ids, eos=(EOS,), **params):
    """Feed ids until the checker finishes; return (checker, deltas). Checks invariants on every step."""
    params.setdefault("max_tokens", None)
    checker = StopChecker(SamplingParams(**params), tokenizer, set(eos))
    deltas = []
    for token_id in ids:
        delta, reason = checker.append(token_id)
        deltas.append(delta)
        assert "\ufffd" not in delta, "a delta broke a multi-byte character"
        assert checker.text == "".join(deltas)
        assert reason == checker.finish_reason
        if not params.get("include_stop_str_in_output"):
            for stop in checker.params.stop:
                if checker.params.min_tokens == 0:
                    assert stop not in checker.text, "a stop string was emitted"
        if reason is not None:
            break
    return checker, deltas


def test_stop_string_split_inside_two_tokens(tokenizer):
    ids = tokenizer.encode(ENGLISH)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert " next" in pieces and " token" in pieces  # the stop string below starts in one token, ends in the next
    checker, deltas = _feed(tokenizer, ids, stop=["xt tok"])
    assert checker.text == "The model predicts the ne"
    assert (checker.finish_reason, checker.stop_reason) == ("stop", "xt tok")
    assert len(checker.output_token_ids) == pieces.index(" token") + 1
    # While " next" is pending, its "xt" could be the start of the stop string: it is held back.
    assert deltas[pieces.index(" next")] == " ne"


def test_include_stop_str_in_output_and_text_after_the_stop_is_dropped(tokenizer):
    checker, _ = _feed(tokenizer, tokenizer.encode(ENGLISH), stop=["xt tok"], include_stop_str_in_output=True)
    assert checker.text == "The model predicts the next tok"
    assert checker.finish_reason == "stop"


def test_every_substring_as_stop_string_cuts_exactly_before_it(tokenizer):
    ids = tokenizer.encode(ENGLISH)
    for start in range(0, len(ENGLISH) - 1, 4):
        for length in (1, 3, 8):
            stop = ENGLISH[start : start + length]
            cut = ENGLISH.find(stop)
            checker, _ = _feed(tokenizer, ids, stop=["zzz", stop])
            assert checker.text == ENGLISH[:cut], stop
            assert checker.stop_reason == stop
            included, _ = _feed(tokenizer, ids, stop=[stop], include_stop_str_in_output=True)
            assert included.text == ENGLISH[: cut + len(stop)], stop


def test_earliest_stop_string_wins(tokenizer):
    checker, _ = _feed(tokenizer, tokenizer.encode(ENGLISH), stop=["short", "predicts the next"])
    assert checker.text == "The model " and checker.stop_reason == "predicts the next"


def test_near_miss_is_held_then_released(tokenizer):
    ids = tokenizer.encode(ENGLISH)
    pieces = [tokenizer.decode([i]) for i in ids]
    checker, deltas = _feed(tokenizer, ids, stop=["next turn"], max_tokens=len(ids))
    at_next = pieces.index(" next")
    assert deltas[at_next] == " "  # "next" might start "next turn"
    # " token" rules "next t..." out: the held text comes out, except the final "n", which could start it again.
    assert deltas[at_next + 1] == "next toke"
    assert checker.text == ENGLISH
    assert (checker.finish_reason, checker.stop_reason) == ("length", None)


def test_held_text_is_flushed_when_the_sequence_ends_otherwise(tokenizer):
    ids = tokenizer.encode("The model predicts the next")
    checker, _ = _feed(tokenizer, ids, stop=["next turn"])
    assert checker.text == "The model predicts the " and not checker.finished
    assert checker.finish("length") == "next"
    assert checker.text == "The model predicts the next" and checker.finish_reason == "length"

    by_length, deltas = _feed(tokenizer, ids, stop=["next turn"], max_tokens=len(ids))
    assert deltas[-1] == " next" and by_length.text == "The model predicts the next"

    flushed, _ = _feed(tokenizer, ids, stop=["next turn"])
    assert flushed.flush() == "next" and flushed.text.endswith("next")


def test_stop_token_ids(tokenizer):
    ids = tokenizer.encode("The model reads")
    checker, _ = _feed(tokenizer, [*ids, END_OF_SENTENCE, *ids], stop_token_ids=[END_OF_SENTENCE],
                       skip_special_tokens=False)
    assert checker.text == "The model reads"  # the stop token's text is not emitted
    assert (checker.finish_reason, checker.stop_reason) == ("stop", END_OF_SENTENCE)
    assert checker.output_token_ids == [*ids, END_OF_SENTENCE]
    # vLLM: include_stop_str_in_output keeps the stop token's text as well.
    included, _ = _feed(tokenizer, [*ids, END_OF_SENTENCE], stop_token_ids=[END_OF_SENTENCE],
                        skip_special_tokens=False, include_stop_str_in_output=True)
    assert included.text == "The model reads<|end_of_sentence|>"


def test_eos_and_ignore_eos(tokenizer):
    ids = tokenizer.encode("The model reads")
    checker, _ = _feed(tokenizer, [*ids, EOS, *ids], skip_special_tokens=False)
    assert checker.text == "The model reads"
    assert (checker.finish_reason, checker.stop_reason) == ("stop", None)  # vLLM: eos has no stop_reason

    ignoring, _ = _feed(tokenizer, [*ids, EOS, *ids], ignore_eos=True, max_tokens=2 * len(ids) + 1)
    assert ignoring.text == "The model readsThe model reads"  # eos is a skipped special token here
    assert ignoring.finish_reason == "length"
    assert len(ignoring.output_token_ids) == 2 * len(ids) + 1


def test_max_tokens_gives_length(tokenizer):
    ids = tokenizer.encode(ENGLISH)
    checker, deltas = _feed(tokenizer, ids, max_tokens=4)
    assert len(deltas) == 4 and checker.finish_reason == "length" and checker.stop_reason is None
    assert checker.text == tokenizer.decode(ids[:4])
    with pytest.raises(RuntimeError, match="after the sequence finished"):
        checker.append(ids[4])


def test_min_tokens_suppresses_every_stop_condition(tokenizer):
    ids = tokenizer.encode(ENGLISH)  # "The", " model", ...
    checker, _ = _feed(tokenizer, ids, stop=["model"], min_tokens=3)
    assert checker.text == ENGLISH and checker.finish_reason is None
    stopped, _ = _feed(tokenizer, ids, stop=["model"], min_tokens=2)
    assert stopped.text == "The " and stopped.stop_reason == "model"

    early_eos, _ = _feed(tokenizer, [ids[0], EOS, ids[1], EOS], min_tokens=3)
    assert early_eos.finish_reason == "stop" and len(early_eos.output_token_ids) == 4
    early_stop_id, _ = _feed(tokenizer, [END_OF_SENTENCE, ids[0], END_OF_SENTENCE], stop_token_ids=[END_OF_SENTENCE],
                             min_tokens=2)
    assert early_stop_id.output_token_ids == [END_OF_SENTENCE, ids[0], END_OF_SENTENCE]
    assert early_stop_id.stop_reason == END_OF_SENTENCE


def test_chinese_text_is_never_broken(tokenizer):
    ids = tokenizer.encode(CHINESE)
    assert len(ids) > 15  # byte-fallback characters take several tokens each
    checker, deltas = _feed(tokenizer, ids, max_tokens=len(ids))
    assert checker.text == CHINESE and checker.finish_reason == "length"
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("中文", "模型正在学习"),
        ("见的字", "模型正在学习中文句子。罕"),
        ("靐", "模型正在学习中文句子。罕见的字：龘"),
        ("龘靐齉", "模型正在学习中文句子。罕见的字："),
    ],
)
def test_chinese_stop_strings(tokenizer, stop, expected):
    checker, deltas = _feed(tokenizer, tokenizer.encode(CHINESE), stop=[stop])
    assert checker.text == expected
    assert (checker.finish_reason, checker.stop_reason) == ("stop", stop)
    included, _ = _feed(tokenizer, tokenizer.encode(CHINESE), stop=[stop], include_stop_str_in_output=True)
    assert included.text == expected + stop
