"""SamplingParams: vLLM's defaults, normalisation, and a message naming the field for every invalid value."""

import re

import pytest

from ernie45.engine.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.logit_bias is None and p.seed is None
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.include_stop_str_in_output and not p.ignore_eos and p.skip_special_tokens
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.reasoning_max_tokens is None
    assert not p.greedy


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=(5, 6), temperature=0, logit_bias={"7": 5, 8: -1.5}, max_tokens=None)
    assert p.stop == ["###"]
    assert p.stop_token_ids == [5, 6]
    assert p.logit_bias == {7: 5.0, 8: -1.5}  # JSON clients send string keys
    assert isinstance(p.temperature, float) and p.greedy
    assert SamplingParams(stop=["a", "b", "a"]).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == -1
    assert SamplingParams(min_tokens=50, max_tokens=None).min_tokens == 50


def test_greedy_threshold():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy


def test_clone_is_deep():
    p = SamplingParams(stop=["x"], stop_token_ids=[1], logit_bias={3: 1.0}, seed=4)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("y")
    q.stop_token_ids.append(2)
    q.logit_bias[4] = 2.0
    assert p.stop == ["x"] and p.stop_token_ids == [1] and p.logit_bias == {3: 1.0}


INVALID = [
    (dict(n=0), "n must be >= 1, got 0"),
    (dict(n=1.5), "n must be an integer, got float 1.5"),
    (dict(n=True), "n must be an integer, got bool True"),
    (dict(temperature=-1), "temperature must be >= 0, got -1"),
    (dict(temperature=float("nan")), "temperature must be >= 0, got nan"),
    (dict(temperature="hot"), "temperature must be a number, got str 'hot'"),
    (dict(temperature=None), "temperature must be a number, got NoneType None"),
    (dict(top_p=0), "top_p must be in (0, 1], got 0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_p="0.9"), "top_p must be a number, got str '0.9'"),
    (dict(top_k=-2), "top_k must be -1 or 0 (off) or >= 1, got -2"),
    (dict(top_k=2.5), "top_k must be an integer, got float 2.5"),
    (dict(min_p=-0.1), "min_p must be in [0, 1], got -0.1"),
    (dict(min_p=1.1), "min_p must be in [0, 1], got 1.1"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0, got 0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty must be > 0, got -1"),
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2], got 2.5"),
    (dict(presence_penalty=-3), "presence_penalty must be in [-2, 2], got -3"),
    (dict(frequency_penalty=2.01), "frequency_penalty must be in [-2, 2], got 2.01"),
    (dict(frequency_penalty=[1]), "frequency_penalty must be a number, got list [1]"),
    (dict(logit_bias=[1, 2]), "logit_bias must be a mapping of token id to bias, got list"),
    (dict(logit_bias={5: 101}), "logit_bias values must be in [-100, 100], got 101 for token 5"),
    (dict(logit_bias={5: -100.5}), "logit_bias values must be in [-100, 100], got -100.5 for token 5"),
    (dict(logit_bias={"abc": 1}), "logit_bias keys must be token ids (integers >= 0), got 'abc'"),
    (dict(logit_bias={-1: 1}), "logit_bias keys must be token ids (integers >= 0), got -1"),
    (dict(logit_bias={1: "x"}), "logit_bias values must be numbers, got str 'x' for 1"),
    (dict(seed="42"), "seed must be an integer or None, got str '42'"),
    (dict(stop=5), "stop must be a string or a list of strings, got 5"),
    (dict(stop=["ok", 3]), "stop must be a string or a list of strings, got ['ok', 3]"),
    (dict(stop=["ok", ""]), "stop must not contain an empty string"),
    (dict(stop_token_ids=3), "stop_token_ids must be a list of token ids, got int"),
    (dict(stop_token_ids=[1, -2]), "stop_token_ids must hold token ids (integers >= 0), got -2"),
    (dict(stop_token_ids=[1, "2"]), "stop_token_ids must hold token ids (integers >= 0), got '2'"),
    (dict(include_stop_str_in_output="yes"), "include_stop_str_in_output must be true or false, got str 'yes'"),
    (dict(ignore_eos=1), "ignore_eos must be true or false, got int 1"),
    (dict(skip_special_tokens=None), "skip_special_tokens must be true or false, got NoneType None"),
    (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
    (dict(max_tokens="16"), "max_tokens must be an integer or None, got str '16'"),
    (dict(min_tokens=-1), "min_tokens must be >= 0, got -1"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens must be <= max_tokens, got min_tokens=20 and max_tokens=10"),
    (dict(logprobs=-1), "logprobs must be in [0, 20], got -1"),
    (dict(logprobs=21), "logprobs must be in [0, 20], got 21"),
    (dict(logprobs=2.0), "logprobs must be an integer or None, got float 2.0"),
    (dict(prompt_logprobs=21), "prompt_logprobs must be in [0, 20], got 21"),
    (dict(prompt_logprobs=-1), "prompt_logprobs must be in [0, 20], got -1"),
    (dict(reasoning_max_tokens=-1), "reasoning_max_tokens must be >= 0, got -1"),
    (dict(reasoning_max_tokens=100, max_tokens=10),
     "reasoning_max_tokens must be <= max_tokens, got reasoning_max_tokens=100 and max_tokens=10"),
]


@pytest.mark.parametrize(("kwargs", "message"), INVALID, ids=[m.split(" ")[0] + "-" + str(i)
                                                              for i, (_, m) in enumerate(INVALID)])
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        SamplingParams(**kwargs)


def test_boundaries_are_accepted():
    SamplingParams(top_p=1.0, min_p=1.0, min_tokens=16, max_tokens=16, logprobs=0, prompt_logprobs=20,
                   presence_penalty=-2, frequency_penalty=2, logit_bias={0: -100, 1: 100}, reasoning_max_tokens=16,
                   repetition_penalty=1e-3, top_k=1, temperature=0)


def test_verify_token_ids():
    p = SamplingParams(logit_bias={9: 1.0}, stop_token_ids=[3])
    p.verify_token_ids(10)
    with pytest.raises(ValueError, match=r"logit_bias token id 9 is outside the vocabulary \[0, 9\)"):
        p.verify_token_ids(9)
    with pytest.raises(ValueError, match=r"stop_token_ids entry 3 is outside the vocabulary \[0, 3\)"):
        SamplingParams(stop_token_ids=[3]).verify_token_ids(3)
