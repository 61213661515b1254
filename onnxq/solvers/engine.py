"""The one GPTQ/OBS column loop every solver runs (spec §1.5, §2b step 4, §7b), batched over [b, rows, cols]."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .grid import fake_quant

GridFn = Callable[[int, Tensor], tuple[Tensor, Tensor]]


def obs_quantize(
    W: Tensor, U: Tensor, maxq: int, grid: GridFn, step: int, *, block_size: int = 128, P: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Quantize W [b, r, n] column by column, compensating later columns through U = chol_upper(H^-1) [b|1, n, n].

    grid(c, Wc) runs at c = 0, step, 2*step, ... on the exact current columns [c, c+step) and returns (scale, zero)
    [b, r] for them. P [b|1, n, n] adds the GPTAQ term. Lazy batches of block_size columns. Returns (Q, codes int32)."""
    W, n = W.clone(), W.shape[-1]
    Q, codes = torch.empty_like(W), torch.empty(W.shape, dtype=torch.int32, device=W.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[..., i1:i2].clone()
        E1, V1 = torch.zeros_like(W1), torch.zeros_like(W1)  # scaled errors, pre-rounding columns (P term)
        for j, c in enumerate(range(i1, i2)):
            if c % step == 0:
                cur, k = W1[..., j : j + step], min(c + step, n)
                if k > i2:  # the group runs past this block: add the lazy update still pending for it
                    rest = W[..., i2:k] - E1[..., :j] @ U[:, i1:c, i2:k]
                    cur = torch.cat([cur, rest if P is None else rest + V1[..., :j] @ P[:, i1:c, i2:k]], -1)
                s, z = grid(c, cur)
            w = W1[..., j].clone()
            Q[..., c], code = fake_quant(w, s, z, maxq)
            codes[..., c] = code.to(torch.int32)
            E1[..., j], V1[..., j] = (w - Q[..., c]) / U[:, c, c, None], w
            W1[..., j:] -= E1[..., j, None] * U[:, None, c, c:i2]
            if P is not None:
                W1[..., j:] += w[..., None] * P[:, None, c, c:i2]
        W[..., i2:] -= E1 @ U[:, i1:i2, i2:]
        if P is not None:
            W[..., i2:] += V1 @ P[:, i1:i2, i2:]
    return Q, codes


def static_grid(S: Tensor, Z: Tensor, gs: int, perm: Tensor | None = None) -> tuple[GridFn, int]:
    """(grid, step) looking up precomputed group grids S, Z [b, r, G]; groups stay in original column order under perm."""
    if perm is None:
        return (lambda c, _: (S[..., c // gs], Z[..., c // gs])), gs
    g = (perm // gs).tolist()
    return (lambda c, _: (S[..., g[c]], Z[..., g[c]])), 1


def gptaq_term(R: Tensor, U: Tensor) -> Tensor:
    """P = triu(R U^T, +1) U for R = alpha * dXX^T (already permuted like U)."""
    return torch.triu(R @ U.transpose(-1, -2), 1) @ U
