"""Every MoE expert gets a usable Hessian, including experts the router never picks during calibration."""

import torch

from ernie45.quant.calibration import EXPERT_PRIOR_TOKENS, ExpertStats, calibration_samples, read_calibration_texts

from .tiny_experts import tiny_experts


def test_unrouted_expert_gets_the_pooled_full_rank_hessian():
    module = tiny_experts()
    stats = ExpertStats(module)
    x = torch.randn(200, 32)
    idx = torch.randint(0, 2, (200, 2))  # experts 2 and 3 never chosen
    stats.add(x, idx)
    assert stats.routed_counts()[2:] == [0, 0]
    for which in ("gate_up_proj", "down_proj"):
        hessians = stats.hessians(which)
        for H in hessians:
            assert torch.linalg.matrix_rank(H) == H.shape[0]
    # No routed tokens: exactly the route-all statistics; many: mostly the expert's own.
    pooled = 2 * x.T @ x / 200
    torch.testing.assert_close(stats.hessians("gate_up_proj")[3], pooled, rtol=1e-4, atol=1e-4)
    routed0 = x[(idx == 0).any(-1)]
    n0 = routed0.shape[0]
    own = 2 * routed0.T @ routed0 / n0
    expected = (n0 * own + EXPERT_PRIOR_TOKENS * pooled) / (n0 + EXPERT_PRIOR_TOKENS)
    torch.testing.assert_close(stats.hessians("gate_up_proj")[0], expected, rtol=1e-4, atol=1e-4)


def test_down_projection_statistics_run_every_token_through_every_expert():
    module = tiny_experts()
    stats = ExpertStats(module)
    x = torch.randn(50, 32)
    stats.add(x, torch.zeros(50, 2, dtype=torch.long))  # all tokens to expert 0
    gate, up = (x @ module.gate_up_proj[3].detach().T).chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(stats.hessians("down_proj")[3], 2 * act.T @ act / 50, rtol=1e-4, atol=1e-4)


def test_jsonl_formats_and_sample_cutting(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text(
        '"plain string"\n{"text": "a text"}\n{"prompt": "p", "response": "r"}\n'
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    )
    texts = read_calibration_texts(path)
    assert texts == ["plain string", "a text", "p\nr", "hi\nyo"]

    class CharTokenizer:
        def encode(self, text):
            return [ord(c) for c in text]

    samples = calibration_samples(CharTokenizer(), texts, num_samples=3, seq_len=5)
    assert [s.shape for s in samples] == [torch.Size([1, 5])] * 3
