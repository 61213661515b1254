"""GPTQ (spec §2) with act-order, static / dynamic groups and the GPTAQ residual term (spec §7)."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .engine import gptaq_term, obs_quantize, static_grid
from .grid import QuantResult, QuantSpec, find_grid, make_result
from .hessian import as_work, drop_dead, factor


def gptq_batched(
    W: Tensor, H: Tensor, spec: QuantSpec, *, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
    static_groups: bool = False, grid: str = "mse", R: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ on W [b, r, n] with H [b|1, n, n] and R = alpha*dXX^T (same batching as H) in the working dtype.

    Returns (codes [b, r, n], scales, zeros [b, r, G]). act_order (columns by diag(H), summed over b) forces static groups."""
    W, H, R = drop_dead(W, H, R)
    n, gs = W.shape[-1], spec.width(W.shape[-1])
    perm = torch.argsort(H.diagonal(dim1=-2, dim2=-1).sum(0), descending=True) if act_order else None
    if perm is not None:
        W, H, R = W[..., perm], H[..., perm, :][..., perm], None if R is None else R[..., perm, :][..., perm]
    Hd, U = factor(H, damp, what="the input Hessian")
    inv = None if perm is None else torch.argsort(perm)
    Hg = Hd if perm is None else Hd[..., inv, :][..., inv]  # grid scores use original column order
    if act_order or static_groups:
        S, Z = find_grid(W if perm is None else W[..., inv], spec, grid, Hg)
        fn, step = static_grid(S, Z, gs, perm)
    else:
        S = W.new_empty(*W.shape[:-1], -(-n // gs))
        Z = torch.empty_like(S)
        one = replace(spec, group_size=-1)

        def fn(c: int, Wc: Tensor) -> tuple[Tensor, Tensor]:
            s, z = find_grid(Wc, one, grid, Hg[..., c : c + gs, c : c + gs])
            S[..., c // gs], Z[..., c // gs] = s[..., 0], z[..., 0]
            return s[..., 0], z[..., 0]

        step = gs
    P = None if R is None else gptaq_term(R, U)
    codes = obs_quantize(W, U, spec.maxq, fn, step, block_size=block_size, P=P)[1]
    return (codes if inv is None else codes[..., inv]), S, Z


def solve_gptq(
    W: Tensor, H: Tensor, spec: QuantSpec, *, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
    static_groups: bool = False, grid: str = "mse", dXXt: Tensor | None = None, alpha: float = 0.25,
) -> QuantResult:
    """GPTQ of W [d_out, d_in] under H [d_in, d_in]; dXXt [d_in, d_in] adds the GPTAQ term alpha * dXX^T."""
    W, H, dXXt = as_work(W, H, dXXt)
    R = None if dXXt is None else alpha * dXXt[None]
    codes, S, Z = gptq_batched(W[None], H[None], spec, damp=damp, block_size=block_size, act_order=act_order,
                               static_groups=static_groups, grid=grid, R=R)
    return make_result(codes[0], S[0], Z[0], spec)
