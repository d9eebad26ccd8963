"""Sampler: processing order and masks against hand computations, seeded reproducibility whatever the batch,
raw logprobs, forced tokens and prompt logprobs. Tiny vocabularies throughout."""

import math

import pytest
import torch

from ernie45.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_top_k_top_p,
    make_generator,
    prompt_logprobs,
)
from ernie45.engine.sampling_params import SamplingParams


def _row(output=(), prompt=(), generator=None, forced=None, eos=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(max_tokens=None, **params), list(prompt), list(output), generator, forced, eos)


def _support(logits_V: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits_V).nonzero().flatten().tolist())


# ------------------------------------------------------------------------------------------ seeds


def _run_seeded(batch_builders, logits_steps, target: int, sampler: Sampler) -> list[int]:
    """Run 20 steps with rows from `batch_builders`; return the tokens of row `target`."""
    rows = [build() for build in batch_builders]
    tokens = []
    for step_logits in logits_steps:
        out = sampler(torch.stack([step_logits[i % len(step_logits)] for i in range(len(rows))]), rows)
        for row, token in zip(rows, out.token_ids):
            row.output_token_ids.append(token)
        tokens.append(out.token_ids[target])
    return tokens


def test_seeded_row_gives_same_tokens_alone_and_in_a_mixed_batch():
    vocab, steps = 32, 20
    gen = torch.Generator().manual_seed(0)
    # Flat-ish logits so that the draw, not the logits, decides the token; row A's logits are the same either way.
    logits_a = [torch.randn(vocab, generator=gen) * 0.5 for _ in range(steps)]
    others = [[torch.randn(vocab, generator=gen) for _ in range(4)] for _ in range(steps)]

    def seeded_a():
        return _row(generator=make_generator(1234), seed=1234, top_k=24, repetition_penalty=1.1)

    torch.manual_seed(1)
    alone = _run_seeded([seeded_a], [[la] for la in logits_a], 0, Sampler())
    batch = [
        lambda: _row(generator=make_generator(7), seed=7),
        lambda: _row(temperature=0.8),  # unseeded: shared draw
        lambda: _row(temperature=0.0),  # greedy
        seeded_a,
        lambda: _row(generator=make_generator(99), seed=99, top_p=0.9, presence_penalty=0.5),
    ]
    torch.manual_seed(2)  # the shared draw's state must not matter to seeded rows
    batched_steps = [[o[0], o[1], o[2], la, o[3]] for la, o in zip(logits_a, others)]
    in_batch = _run_seeded(batch, batched_steps, 3, Sampler())
    assert alone == in_batch

    # The same row first in a smaller batch with an explicit shared generator.
    mixed = [seeded_a, lambda: _row(temperature=1.3)]
    first = _run_seeded(mixed, [[la, o[0]] for la, o in zip(logits_a, others)], 0,
                        Sampler(torch.Generator().manual_seed(5)))
    assert alone == first

    # The seed does decide: another seed gives another sequence.
    other_seed = _run_seeded([lambda: _row(generator=make_generator(4321), top_k=24, repetition_penalty=1.1)],
                             [[la] for la in logits_a], 0, Sampler())
    assert other_seed != alone


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log()
    shared = Sampler(torch.Generator().manual_seed(0))
    tokens = shared(logits.expand(4000, 4).clone(), [_row() for _ in range(4000)]).token_ids
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03), freq
    seeded_rows = [_row(generator=make_generator(s)) for s in range(1000)]
    tokens = shared(logits.expand(1000, 4).clone(), seeded_rows).token_ids
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 1000
    assert torch.allclose(freq, probs, atol=0.05), freq


# ------------------------------------------------------------------------------------------ penalties


def test_penalties_match_hand_computation():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    prompt, output = [0, 1, 0], [3, 3, 2]
    rows = [
        _row(output, prompt, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        _row(output, prompt, presence_penalty=0.5, frequency_penalty=0.25),  # prompt tokens are not counted
        _row(output, prompt, repetition_penalty=2.0),
        _row(output, prompt, presence_penalty=-0.5),
        _row(output, prompt),
        _row(output, prompt, repetition_penalty=2.0, temperature=2.0),  # temperature comes after
    ]
    got = Sampler().process_logits(logits.expand(len(rows), 6), rows)
    expected = torch.tensor([
        [1.0, -2.0, 0.25 - 0.5 - 0.25, 1.5 - 0.5 - 0.5, -2.0, 1.0],
        [2.0, -1.0, 0.5 - 0.5 - 0.25, 3.0 - 0.5 - 0.5, -2.0, 1.0],
        [1.0, -2.0, 0.25, 1.5, -2.0, 1.0],
        [2.0, -1.0, 1.0, 3.5, -2.0, 1.0],
        [2.0, -1.0, 0.5, 3.0, -2.0, 1.0],
        [0.5, -1.0, 0.125, 0.75, -1.0, 0.5],
    ])
    torch.testing.assert_close(got, expected)


def test_logit_bias_comes_before_repetition_penalty_and_can_force_or_ban():
    logits = torch.tensor([[1.0, 5.0, 0.0]])
    got = Sampler().process_logits(logits, [_row([0], logit_bias={0: 3.0}, repetition_penalty=2.0)])
    assert got[0, 0].item() == pytest.approx((1.0 + 3.0) / 2.0)

    rows = [_row(temperature=0, logit_bias={2: 100}), _row(logit_bias={2: 100}),
            _row(temperature=0, logit_bias={1: -100})]
    out = Sampler(torch.Generator().manual_seed(0))(logits.expand(3, 3).clone(), rows)
    assert out.token_ids == [2, 2, 0]
    with pytest.raises(ValueError, match="logit_bias token id 3 is outside the vocabulary"):
        Sampler()(logits, [_row(logit_bias={3: 1.0})])


def test_greedy_uses_penalised_argmax_and_ignores_truncation():
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    assert Sampler()(logits, [_row(temperature=0)]).token_ids == [0]
    assert Sampler()(logits, [_row([0], temperature=0, repetition_penalty=2.0)]).token_ids == [1]
    processed = Sampler().process_logits(logits, [_row(temperature=0, top_k=1, top_p=0.1, min_p=0.9)])
    torch.testing.assert_close(processed, logits)  # greedy rows are neither scaled nor truncated
    randoms = torch.randn(16, 10, generator=torch.Generator().manual_seed(3))
    out = Sampler()(randoms, [_row(temperature=0.0, top_k=3) for _ in range(16)])
    assert out.token_ids == randoms.argmax(-1).tolist()


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 0.0, 10.0, 0.0, 9.0]])  # eos = 2, stop id = 4
    for done in range(3):
        row = _row([1] * done, temperature=0, min_tokens=3, stop_token_ids=[4], eos={2})
        processed = Sampler().process_logits(logits, [row])
        assert _support(processed[0]) == {0, 1, 3}
        sampled = _row([1] * done, min_tokens=3, stop_token_ids=[4], eos={2})
        assert Sampler()(logits.expand(50, 5).clone(), [sampled] * 50).token_ids.count(2) == 0
    assert Sampler()(logits, [_row([1] * 3, temperature=0, min_tokens=3, stop_token_ids=[4], eos={2})]).token_ids == [2]
    ignoring = _row([], temperature=0, min_tokens=3, stop_token_ids=[4], eos={2}, ignore_eos=True)
    assert _support(Sampler().process_logits(logits, [ignoring])[0]) == {0, 1, 2, 3}


# ------------------------------------------------------------------------------------------ truncation


PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
SUPPORTS = [
    (dict(top_k=2), {0, 1}),
    (dict(top_k=-1), {0, 1, 2, 3, 4}),
    (dict(top_k=0), {0, 1, 2, 3, 4}),
    (dict(top_k=99), {0, 1, 2, 3, 4}),
    (dict(top_p=0.5), {0, 1}),
    (dict(top_p=0.75), {0, 1, 2}),
    (dict(top_p=0.1), {0}),
    (dict(min_p=0.3), {0, 1, 2}),  # keep p >= 0.12
    (dict(min_p=1.0), {0}),
    (dict(top_k=3, top_p=0.6), {0, 1}),  # top_p sees the renormalised top 3: 0.47, 0.35, 0.18
    (dict(top_k=4, min_p=0.5), {0, 1}),
    (dict(top_p=0.9, min_p=0.45), {0, 1}),
    (dict(temperature=0.5, top_p=0.75), {0, 1}),  # sharpening first: 0.54, 0.30, 0.08, ...
]


@pytest.mark.parametrize(("params", "support"), SUPPORTS, ids=[str(p) for p, _ in SUPPORTS])
def test_truncation_gives_exactly_the_expected_support(params, support):
    logits = PROBS.log().expand(300, 5).clone()
    rows = [_row(**params) for _ in range(300)]
    processed = Sampler().process_logits(logits[:1], rows[:1])
    assert _support(processed[0]) == support
    tokens = Sampler(torch.Generator().manual_seed(0))(logits, rows).token_ids
    assert set(tokens) == support  # every kept token has p >= 0.05 after renormalisation: all appear in 300 draws


def test_top_k_keeps_ties_and_top_p_keeps_the_top_token():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [9.0, 0.0, 0.0, 0.0]])
    out = apply_top_k_top_p(logits, torch.tensor([1, 0]), torch.tensor([1.0, 1e-6]))
    assert _support(out[0]) == {1, 2} and _support(out[1]) == {0}
    torch.testing.assert_close(out[0, 1:3], logits[0, 1:3])  # kept logits are unchanged, in their place


# ------------------------------------------------------------------------------------------ logprobs, forcing


def test_logprobs_are_raw_log_softmax_and_top_logprobs_sorted():
    raw = torch.randn(3, 10, generator=torch.Generator().manual_seed(1)) * 3
    rows = [
        _row([1, 1], logprobs=3, temperature=0.7, top_k=2, repetition_penalty=1.5, generator=make_generator(0)),
        _row(logprobs=0, temperature=0),
        _row(frequency_penalty=1.0, logit_bias={4: 10.0}),
    ]
    out = Sampler()(raw, rows)
    expected = torch.log_softmax(raw, -1)
    for i, token in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(expected[i, token].item(), abs=1e-5)
        assert out.logprobs[i] <= 0
    top = out.top_logprobs[0]
    assert len(top) == 3
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    values, ids = expected[0].topk(3)
    assert [t for t, _ in top] == ids.tolist()
    assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-6)
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] is None


def test_forced_token_overrides_the_draw_and_gets_its_raw_logprob():
    logits = torch.tensor([[10.0, 0.0, 0.0, 1.0, 2.0]] * 3)
    rows = [_row(forced=4), _row(temperature=0, forced=3, generator=make_generator(0)), _row(temperature=0)]
    out = Sampler()(logits, rows)
    assert out.token_ids == [4, 3, 0]
    assert out.logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[4].item(), abs=1e-6)
    with pytest.raises(ValueError, match="forced_token_id 5 is outside the vocabulary"):
        Sampler()(logits[:1], [_row(forced=5)])


def test_prompt_logprobs_against_manual_log_softmax():
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    prompt = [1, 3, 0, 7, 2]
    got = prompt_logprobs(logits, prompt, 2)
    assert len(got) == 5 and got[0] is None
    manual = torch.log_softmax(logits, -1)
    for t in range(1, 5):
        assert got[t].token_id == prompt[t]
        assert got[t].logprob == pytest.approx(manual[t - 1, prompt[t]].item(), abs=1e-6)
        values, ids = manual[t - 1].topk(2)
        assert [i for i, _ in got[t].top_logprobs] == ids.tolist()
        assert [v for _, v in got[t].top_logprobs] == pytest.approx(values.tolist(), abs=1e-6)
    assert [g.logprob for g in prompt_logprobs(logits[:4], prompt, 0)[1:]] == [g.logprob for g in got[1:]]
    assert prompt_logprobs(logits, prompt, 0)[1].top_logprobs == []
    with pytest.raises(ValueError, match="need logits for at least 4 positions"):
        prompt_logprobs(logits[:3], prompt, 1)


def test_inputs_are_not_modified_and_half_precision_works():
    logits = torch.randn(2, 6, generator=torch.Generator().manual_seed(4))
    before = logits.clone()
    Sampler()(logits, [_row([1], repetition_penalty=2.0, logit_bias={1: 5}), _row(temperature=0.5, top_k=2)])
    assert torch.equal(logits, before)
    out = Sampler()(logits.bfloat16(), [_row(temperature=0), _row(logprobs=2)])
    assert out.token_ids[0] == logits.bfloat16().float().argmax(-1)[0].item()
    assert all(math.isfinite(lp) for lp in out.logprobs)
    with pytest.raises(ValueError, match="logits must be"):
        Sampler()(logits, [_row()])
    assert Sampler()(logits[:0], []).token_ids == []
