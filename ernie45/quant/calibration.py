"""Calibration data and the per-layer input statistics GPTQ needs (H = 2 X^T X / n for each weight's inputs X).

MoE experts: a router sends each expert a fraction of the calibration tokens, and rarely chosen experts may see
none. Every calibration token is therefore also run through every expert ("route all"), and each expert's
Hessian is its routed tokens' statistics shrunk towards the route-all statistics:
    H_e = (X_e^T X_e + n0 * mean_all(x x^T)) / (n_e + n0)
so a popular expert is quantized for the inputs it really gets, and an expert with few or no tokens still gets a
full-rank Hessian from the pooled inputs (the multi-expert collaborative idea of the ERNIE 4.5 report).
Legend: N tokens, K input features, E experts, I expert width.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.moe import Experts

EXPERT_PRIOR_TOKENS = 32.0
"""n0 above: how many tokens' worth of the pooled statistics each expert's Hessian starts from."""


def read_calibration_texts(path: str | Path, num_samples: int | None = None) -> list[str]:
    """Texts from a .jsonl file (objects with "text", or "prompt"/"response", or "messages"; or bare strings) or
    any other text file (blank-line separated paragraphs). ValueError saying why when it cannot be used."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read calibration file {path}: {exc}") from exc
    texts: list[str] = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                texts.append(_text_of(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"calibration file {path}, line {lineno}: not a JSON string or an object with 'text', "
                    f"'prompt'/'response' or 'messages' ({exc})"
                ) from exc
    else:
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise ValueError(f"calibration file {path} contains no text")
    return texts if num_samples is None else texts[: max(num_samples, 1) * 16]


def _text_of(record) -> str:
    if isinstance(record, str):
        return record
    if "text" in record:
        return str(record["text"])
    if "messages" in record:
        return "\n".join(str(m["content"]) for m in record["messages"])
    return f"{record['prompt']}\n{record.get('response', '')}"


def calibration_samples(tokenizer, texts: list[str], num_samples: int, seq_len: int) -> list[torch.Tensor]:
    """Concatenate the tokenized texts and cut them into up to `num_samples` sequences [1, seq_len] (the last
    may be shorter); ValueError if the texts tokenize to nothing."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        if len(ids) >= num_samples * seq_len:
            break
    if not ids:
        raise ValueError("the calibration texts tokenize to no tokens")
    return [torch.tensor([ids[i : i + seq_len]]) for i in range(0, min(len(ids), num_samples * seq_len), seq_len)]


class InputStats:
    """Running sum of x x^T over inputs x [.., K] and their count (fp32, as GPTQ's reference code: fp64 matmuls
    cost several times more and the sums are of a few thousand positive-semidefinite terms)."""

    def __init__(self, K: int):
        self.xtx = torch.zeros(K, K, dtype=torch.float32)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx += x.T @ x
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return (2.0 * self.xtx / max(self.count, 1)).float()


class ExpertStats:
    """Routed and route-all input statistics for the two projections of every expert of one MoE layer."""

    def __init__(self, experts: Experts):
        E, twoI, H = experts.gate_up_proj.shape
        self.experts = experts
        self.all_gate_up = InputStats(H)
        self.routed_gate_up = [InputStats(H) for _ in range(E)]
        self.all_down = [InputStats(twoI // 2) for _ in range(E)]
        self.routed_down = [InputStats(twoI // 2) for _ in range(E)]

    def add(self, x_NH: torch.Tensor, idx_NK: torch.Tensor) -> None:
        x_NH = x_NH.detach().float()
        self.all_gate_up.add(x_NH)
        for e in range(self.experts.num_experts):
            routed = (idx_NK == e).any(dim=-1)
            gate_NI, up_NI = F.linear(x_NH, self.experts.gate_up_proj[e].float()).chunk(2, dim=-1)
            act_NI = F.silu(gate_NI) * up_NI  # the down projection's input, for every token (route all)
            self.all_down[e].add(act_NI)
            self.routed_gate_up[e].add(x_NH[routed])
            self.routed_down[e].add(act_NI[routed])

    @staticmethod
    def _shrunk(routed: InputStats, pooled: InputStats) -> torch.Tensor:
        prior = EXPERT_PRIOR_TOKENS * pooled.xtx / max(pooled.count, 1)
        return (2.0 * (routed.xtx + prior) / (routed.count + EXPERT_PRIOR_TOKENS)).float()

    def hessians(self, which: str) -> list[torch.Tensor]:
        """Per-expert Hessians for "gate_up_proj" or "down_proj"."""
        E = self.experts.num_experts
        if which == "gate_up_proj":
            return [self._shrunk(self.routed_gate_up[e], self.all_gate_up) for e in range(E)]
        return [self._shrunk(self.routed_down[e], self.all_down[e]) for e in range(E)]

    def routed_counts(self) -> list[int]:
        return [s.count for s in self.routed_gate_up]


def record_inputs(module: nn.Module, unit_names: dict[str, str]) -> tuple[dict[str, object], list]:
    """Hook the quantizable submodules of `module` (local name -> full unit name); returns (stats by unit name,
    hook handles). Linears record their input; Experts record routed and route-all statistics."""
    stats: dict[str, object] = {}
    handles = []
    for local, sub in module.named_modules():
        if isinstance(sub, Experts):
            full = unit_names.get(f"{local}.gate_up_proj")
            if full is None:
                continue
            expert_stats = ExpertStats(sub)
            stats[full.rsplit(".", 1)[0]] = expert_stats
            handles.append(sub.register_forward_pre_hook(lambda m, args, s=expert_stats: s.add(args[0], args[1])))
        elif isinstance(sub, nn.Linear) and local in unit_names:
            linear_stats = InputStats(sub.in_features)
            stats[unit_names[local]] = linear_stats
            handles.append(sub.register_forward_pre_hook(lambda m, args, s=linear_stats: s.add(args[0].detach())))
    return stats, handles
