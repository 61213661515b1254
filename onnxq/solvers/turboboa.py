"""TurboBoA (spec §4): BoA with N-row blocks (F1), the preceding-layer residual term (F2), adaptive grid + CD scales (F3)."""
from __future__ import annotations

import torch
from torch import Tensor

from .boa import setup_heads
from .engine import gptaq_term, obs_quantize, static_grid
from .grid import QuantResult, QuantSpec, make_result
from .gptq import gptq_batched
from .gso import refine_group_scales
from .hessian import as_work


def row_gain(U_out: Tensor, r1: int, r2: int) -> Tensor:
    """U_out[B, R]^T U_out[B, B]^-T for B = [r1, r2), R = [r2, d): W_R -= gain @ (W_B - Q_B) is the exact
    constrained optimum dW_R = -H_RR^-1 H_RB dW_B of tr(H_out dW H_in dW^T). U_out [h, d, d] -> [h, |R|, N]."""
    return torch.linalg.solve_triangular(U_out[:, r1:r2, r1:r2], U_out[:, r1:r2, r2:], upper=True).mT


def solve_turboboa(
    W: Tensor, H_in: Tensor, H_out: Tensor | None, spec: QuantSpec, *, n_heads: int, rows_per_block: int = 16,
    damp: float = 0.01, grid: str = "hessian", dXXt: Tensor | None = None, alpha: float = 0.25, refine: bool = True,
    act_order: bool = False, with_target: bool = False,
) -> QuantResult | tuple[QuantResult, Tensor]:
    """TurboBoA of W [n_heads*d_h, d_in]. H_out [n_heads, d_h, d_h] (Q/K): row blocks of rows_per_block rows of every
    head, closed-form compensation of later rows. H_out None (V/O/MLP): GPTQ with static groups, H_in [d_in, d_in] or
    per head [n_heads, d_in, d_in] (block_v). dXXt adds the F2 / GPTAQ term. refine: adaptive grid per row block and
    coordinate-descent scales (F3); without it the grid is searched once on the original weights. with_target (row
    blocks): also return the weights each row was quantized against (W after the compensation of earlier rows; W itself
    without H_out), [d_out, d_in]."""
    if H_out is None:
        Wv, Hv, Rv = as_work(W, H_in, dXXt)
        per_head = Hv.dim() == 3
        Wv, Hv = (Wv.reshape(n_heads, -1, Wv.shape[-1]), Hv) if per_head else (Wv[None], Hv[None])
        Rv = None if Rv is None else alpha * (Rv if Rv.dim() == 3 else Rv[None])
        codes, S, Z = gptq_batched(Wv, Hv, spec, damp=damp, act_order=act_order, static_groups=True, grid=grid, R=Rv)
        res, target = make_result(codes.flatten(0, 1), S.flatten(0, 1), Z.flatten(0, 1), spec), W
    else:
        p = setup_heads(W, H_in, H_out, n_heads=n_heads, damp=damp, act_order=act_order, dXXt=dXXt, alpha=alpha)
        Wh, d, gs = p.W.clone(), p.W.shape[1], spec.width(p.W.shape[-1])
        P = None if p.R is None else gptaq_term(p.R, p.U_in)
        RHi = None if p.R is None else p.R @ (p.U_in.mT @ p.U_in)  # alpha dXX^T H_in^-1
        S, Z = (None, None) if refine else p.grid(Wh, spec, grid)
        blocks = []
        for r1 in range(0, d, rows_per_block):
            r2 = min(r1 + rows_per_block, d)
            WB = Wh[:, r1:r2]
            SB, ZB = p.grid(WB, spec, grid) if refine else (S[:, r1:r2], Z[:, r1:r2])
            QB, CB = obs_quantize(WB, p.U_in, spec.maxq, *static_grid(SB, ZB, gs, p.cperm), P=P)
            if r2 < d:
                Wh[:, r2:] -= row_gain(p.U_out, r1, r2) @ (WB - QB if RHi is None else WB - QB + WB @ RHi)
            blocks.append((CB, SB, ZB))
        res = p.finish(*(torch.cat(x, 1) for x in zip(*blocks)), spec)
        target = p.original_order(Wh)  # a row block is final once quantized: Wh holds what each row was solved against
    if refine:
        res = refine_group_scales(W, H_in, res, dXXt=dXXt, alpha=alpha, H_out=H_out, n_heads=n_heads)
    return (res, target) if with_target else res
