"""Packing through the real model: no attention across samples, positions restart per sample."""

import torch

from ernie45.checkpoint import load_model
from ernie45.training.data import Sample, collate, pack
from ernie45.training.forward import TrainingModel


def test_packed_logits_equal_separate_and_are_isolated(tiny_moe):
    model = TrainingModel(load_model(tiny_moe, dtype="float32")).eval()
    g = torch.Generator().manual_seed(0)
    a = torch.randint(5, 500, (7,), generator=g).tolist()
    b = torch.randint(5, 500, (5,), generator=g).tolist()
    b2 = torch.randint(5, 500, (5,), generator=g).tolist()

    def logits_of(samples):
        batch = collate(pack([Sample(s, [True] * len(s)) for s in samples], 64), 0)
        assert batch["input_ids"].shape[0] == 1  # all packed into one row
        with torch.no_grad():
            return model(batch["input_ids"], batch["positions"], batch["segment_ids"]).logits[0]

    packed = logits_of([a, b])
    changed = logits_of([a, b2])
    alone_b = logits_of([b])
    # a's logits do not depend on what follows it; b's logits equal b run alone (positions restart at 0).
    torch.testing.assert_close(packed[:7], changed[:7], rtol=0, atol=0)
    torch.testing.assert_close(packed[7:], alone_b, rtol=1e-5, atol=1e-5)
    # and changing the FIRST sample does not change the second's logits
    a2 = [(t * 7) % 500 + 5 for t in a]
    torch.testing.assert_close(logits_of([a2, b])[7:], packed[7:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits_of([a2, b])[:7], packed[:7])
