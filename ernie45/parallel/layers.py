"""The modules a tensor-parallel rank swaps into a built model: vocab-parallel embedding and LM head, expert-parallel
experts, and the all-reduce hook that completes a row-parallel block. Column- and row-parallel linears need no
class of their own: they are plain `Linear`s holding a slice of the rows / columns (the model reads head counts and
widths from the weights it holds), and the block whose last linear is row-parallel sums its partial output across
ranks in `all_reduce_output`.

Legend: N tokens, H hidden, V vocab, Vr vocab rows per rank, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import linear
from ..models.moe import Experts
from ..quant.quantized_linear import QuantizedExperts
from .comm import Communicator


def all_reduce_output(comm: Communicator):
    """A forward hook summing a module's output over the ranks: attention (its o_proj holds a slice of the input
    columns) and MLP / MoE blocks (down_proj likewise; MoE experts a slice of each expert or a subset of experts),
    one collective per block."""

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(output.contiguous())

    return hook


def vocab_rows(vocab_size: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """(first row, end row, rows per rank): rank r owns rows [first, end) of a vocabulary split into equal
    ceil(V / N)-row slices, the last one padded (equal slices let the LM head gather in one collective)."""
    per = -(-vocab_size // world_size)
    first = min(rank * per, vocab_size)
    return first, min(first + per, vocab_size), per


class VocabParallelEmbedding(nn.Module):
    """Rows [first, end) of the embedding (padded to `rows_per_rank`); ids outside them embed to 0 here, and the
    all-reduce adds the one rank's row that holds each id (exact: every other addend is 0)."""

    def __init__(self, vocab_size: int, hidden_size: int, comm: Communicator):
        super().__init__()
        self.first, self.end, per = vocab_rows(vocab_size, comm.world_size, comm.rank)
        self.weight = nn.Parameter(torch.empty(per, hidden_size))
        self.comm = comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.first) & (ids < self.end)
        out = F.embedding(torch.where(mine, ids - self.first, 0), self.weight)
        out = out.masked_fill_(~mine[..., None], 0.0)
        return self.comm.all_reduce(out)


class ParallelLMHead(nn.Module):
    """The LM head's rows [first, end) (tied: the embedding's own slice); rank 0 gathers the full logits [..., V],
    the other ranks return their slice (unused)."""

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool, comm: Communicator):
        super().__init__()
        self.vocab_size = vocab_size
        self.first, self.end, per = vocab_rows(vocab_size, comm.world_size, comm.rank)
        self.weight = nn.Parameter(torch.empty(per, hidden_size))
        self.bias = nn.Parameter(torch.empty(per)) if bias else None
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = linear(x, self.weight, self.bias)
        full = self.comm.gather_last_dim(local)
        return local if full is None else full[..., : self.vocab_size]


class _LocalExperts:
    """Routing stays replicated, and each rank adds only its experts' share of every token (assignments to other
    ranks' experts get weight 0 on a local expert, so the fused kernel's shapes stay [N, K]); the MoE block's
    all-reduce completes the sum. Mixed into the dense and the quantized experts."""

    def _map_experts(self, num_experts: int, global_ids: list[int]) -> None:
        self.global_ids = list(global_ids)
        # vLLM's expert_map (-1: another rank's expert). A plain attribute, not a buffer: the model is built on the
        # meta device and materialised with to_empty, which would leave a buffer uninitialised.
        local = torch.full((num_experts,), -1, dtype=torch.long, device="cpu")
        local[torch.tensor(global_ids, device="cpu")] = torch.arange(len(global_ids), device="cpu")
        self.local_of_global = local

    def forward(self, x_NH: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor, shared: nn.Module | None = None):
        if self.local_of_global.device != idx_NK.device:
            self.local_of_global = self.local_of_global.to(idx_NK.device)
        local_NK = self.local_of_global[idx_NK]
        remote = local_NK < 0
        return super().forward(x_NH, local_NK.masked_fill(remote, 0), w_NK.masked_fill(remote, 0.0), shared)


class ExpertParallelExperts(_LocalExperts, Experts):
    """The routed experts this rank holds (`global_ids`, stacked in that order)."""

    def __init__(self, num_experts: int, global_ids: list[int], hidden_size: int, intermediate_size: int):
        nn.Module.__init__(self)
        self.num_experts = len(global_ids)
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(len(global_ids), 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(len(global_ids), hidden_size, intermediate_size))
        self._map_experts(num_experts, global_ids)


class ExpertParallelQuantizedExperts(_LocalExperts, QuantizedExperts):
    """The packed routed experts this rank holds (`global_ids`, stacked in that order)."""

    def __init__(self, num_experts: int, global_ids: list[int], gate_up_proj, down_proj):
        QuantizedExperts.__init__(self, gate_up_proj, down_proj)
        self._map_experts(num_experts, global_ids)
