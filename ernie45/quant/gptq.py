"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
ICLR 2023): quantize a weight column by column, each column's rounding error spread over the not-yet-quantized
columns through the inverse Hessian of the layer's calibration inputs (H = 2 X^T X / n), which minimises
||X W^T - X Wq^T||^2 instead of ||W - Wq||^2.

Group scales/zeros are chosen (min/max, as RTN) from the error-updated weights when the sweep reaches each group.
With act_order the columns are visited by decreasing H diagonal; groups are then fixed up front on the original
weights ("static groups") so each group keeps one scale whatever the visiting order.
Legend: N rows (outputs), K columns (inputs), S group size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .packing import PackedWeight, decode_zeros, round_zeros, symmetric_zero, unpack_codes, zero_step
from .rtn import codes_for, group_params, pack
from .spec import QuantSpec

BLOCK = 128
"""Columns updated together (lazy batch updates: the same result, one GEMM per block)."""


def inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after dampening the diagonal by `damp` x its mean (raising the damping until
    H is positive definite: calibration inputs may leave directions unseen)."""
    K = H.shape[0]
    H = H.double().clone()
    mean_diag = H.diagonal().mean().clamp(min=1e-8)
    for attempt in range(6):
        Hd = H + torch.eye(K, dtype=H.dtype) * mean_diag * damp * (10**attempt)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U.float()
    raise ValueError("Hessian is not positive definite even after dampening (calibration inputs all zero?)")


def gptq_quantize(
    w_NK: torch.Tensor,
    H_KK: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    act_order: bool = False,
    name: str = "weight",
    choose_group_params: Callable | None = None,
) -> PackedWeight:
    """GPTQ-quantize one weight [N, K] given its input Hessian [K, K].

    `choose_group_params(W [N, G, S], spec, input_weights [G, S]) -> (scale, zero)` picks each group's grid
    (default: min/max as RTN; hqq.hqq_group_params for the GPTQ+HQQ 2-bit method)."""
    N, K = w_NK.shape
    S = spec.group_size_for(K, name)
    W = w_NK.detach().float().clone()
    H = H_KK.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0  # inputs never seen: any value is as good; keep H invertible
    W[:, dead] = 0.0

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(K)
    inv_perm = torch.argsort(perm)
    diag = H.diagonal().clone()
    if choose_group_params is None:
        choose_group_params = lambda w, sp, cw: group_params(w, sp)
    if act_order:
        static_scale, static_zero = choose_group_params(
            W.view(N, K // S, S), spec, (diag / diag.mean()).view(K // S, S)
        )
    W, H = W[:, perm], H[perm][:, perm]
    U = inverse_hessian_cholesky(H, damp)

    scale = torch.empty(N, K // S)
    zero = None if spec.symmetric else torch.empty(N, K // S)
    codes = torch.empty(N, K)
    for b0 in range(0, K, BLOCK):
        b1 = min(b0 + BLOCK, K)
        W_blk = W[:, b0:b1].clone()
        err_blk = torch.zeros_like(W_blk)
        for j in range(b1 - b0):
            col = b0 + j  # position in the (possibly permuted) order
            group = int(perm[col]) // S
            if act_order:
                s, z = static_scale[:, group], None if static_zero is None else static_zero[:, group]
            else:
                if col % S == 0:
                    # Parameters from the error-updated weights of this whole group (columns col..col+S).
                    ahead = torch.cat([W_blk[:, j:], W[:, b1:]], dim=1)[:, :S]
                    d = diag[perm[col : col + S]]
                    s_new, z_new = choose_group_params(ahead[:, None, :], spec, (d / d.mean())[None, :])
                    scale[:, group] = s_new[:, 0]
                    if zero is not None:
                        zero[:, group] = z_new[:, 0]
                s, z = scale[:, group], None if zero is None else zero[:, group]
            q = codes_for(W_blk[:, j, None, None], s[:, None], None if z is None else z[:, None], spec)[:, 0, 0]
            codes[:, col] = q
            zp = symmetric_zero(spec.bits) if z is None else z
            deq = (q - zp) * s
            err = (W_blk[:, j] - deq) / U[col, col]
            W_blk[:, j:] -= err[:, None] * U[col, b0 + j : b1][None, :]
            err_blk[:, j] = err
        W[:, b1:] -= err_blk @ U[b0:b1, b1:]
    if act_order:
        scale, zero = static_scale, static_zero
    return pack(codes[:, inv_perm], scale, zero, spec, S)


def refit_group_params(w_NK: torch.Tensor, H_KK: torch.Tensor, packed: PackedWeight, spec: QuantSpec) -> PackedWeight:
    """Keep GPTQ's codes, re-solve every row's group scales s_g and offsets b_g = -s_g z_g for the layer-output
    objective (w - w_hat) H (w - w_hat)^T with w_hat_k = s_g q_k + b_g: linear least squares in 2G unknowns per
    row, solved exactly (batched 2G x 2G systems). GPTQ's own grid is one feasible point, so the objective can only
    drop (up to the storage rounding of s and z); rows where the solution is unusable (s <= 0, z off the storable
    range) or not better after rounding keep GPTQ's grid. Asymmetric formats only.
    """
    if spec.symmetric:
        return packed
    N, K = w_NK.shape
    S = packed.group_size
    G = K // S
    W = w_NK.detach().double()
    H = H_KK.double()
    q = unpack_codes(packed.qweight, spec.bits, K).double().view(N, G, S)
    H4 = H.view(G, S, G, S)
    # Normal equations M theta = r with theta = (s_1..s_G, b_1..b_G): the blocks of A^T H A for the design
    # A = [codes of group g | indicator of group g].
    Hq = torch.einsum("gsht,nht->ngsh", H4, q)  # (H q)_k restricted by target group h: [N, G(row k), S, G(h)]
    M_ss = torch.einsum("ngs,ngsh->ngh", q, Hq)
    M_sb = torch.einsum("ngsh->ngh", Hq).transpose(1, 2)  # sum_k in g 1 * (H q_h)_k -> [N, g(b), h(s)]^T
    M_bb = H4.sum(dim=(1, 3)).expand(N, G, G)
    M = torch.cat([torch.cat([M_ss, M_sb], dim=2), torch.cat([M_sb.transpose(1, 2), M_bb], dim=2)], dim=1)
    HW = (W @ H).view(N, G, S)
    r = torch.cat([(q * HW).sum(-1), HW.sum(-1)], dim=1)
    ridge = 1e-8 * M.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
    theta = torch.linalg.solve(M + ridge[:, None, None] * torch.eye(2 * G, dtype=M.dtype), r)
    s_new, b_new = theta[:, :G], theta[:, G:]
    z_new = -b_new / s_new.where(s_new.abs() > 1e-12, torch.ones_like(s_new))
    s_new = s_new.float().half().float()
    z_new = round_zeros(z_new.float(), spec.bits)
    usable = (s_new > 0).all(-1) & (z_new >= 0).all(-1) & (z_new <= 255 * zero_step(spec.bits)).all(-1)

    def objective(scale, zero):
        w_hat = ((q - zero.double()[..., None]) * scale.double()[..., None]).view(N, K)
        d = W - w_hat
        return ((d @ H) * d).sum(-1)

    old_s, old_z = packed.scales.float(), decode_zeros(packed.zeros, spec.bits)
    better = usable & (objective(s_new, z_new) < objective(old_s, old_z))
    scale = torch.where(better[:, None], s_new, old_s)
    zero = torch.where(better[:, None], z_new, old_z)
    return pack(q.view(N, K), scale, zero, spec, S)
