"""Two-stage group-scale optimisation (spec §5): Hessian-weighted static grids, GPTQ, coordinate-descent scales.

Stage 2 (refine_group_scales) is also TurboBoA's F3 refinement (spec §4) when given H_out."""
from __future__ import annotations

import torch
from torch import Tensor

from .gptq import solve_gptq
from .grid import QuantResult, QuantSpec, group_index, make_result
from .hessian import as_work


def refine_group_scales(
    W: Tensor, H: Tensor, result: QuantResult, *, dXXt: Tensor | None = None, alpha: float = 0.25,
    H_out: Tensor | None = None, n_heads: int = 1, sweeps: int = 1,
) -> QuantResult:
    """Keep the codes; minimise L = tr(H_out dW H dW^T) - 2 tr(H_out W (alpha dXX^T) dW^T), dW = Q - W, by exact
    coordinate descent over every (row, group) grid, rows of a head in order, all heads at once. Integer zeros stay
    fixed and each step solves for the scale; float zeros move too: each step solves the 2x2 system for the group's
    scale and offset jointly (q = s*code - o, zero = o/s).

    H [n, n] or per head [n_heads, n, n]; H_out [n_heads, d_h, d_h] or None (= I: rows independent, all at once).
    Scales stay >= 0 (> 0 for float zeros); L never increases."""
    W, H, H_out, R = as_work(W, H, H_out, dXXt)
    spec = result.spec
    rows, n = W.shape
    gs, g = spec.width(n), group_index(n, spec, W.device)
    Z = (result.codes - result.zeros[:, g]).to(W)
    s = result.scales.to(W)
    if H_out is None and H.dim() == 2:  # every row is its own 1-row "head"
        shape, Ho = (rows, 1), W.new_ones(1, 1, 1)
    else:
        shape = (n_heads, rows // n_heads)
        Ho = H_out if H_out is not None else torch.eye(shape[1], dtype=W.dtype, device=W.device)[None]
    Wv, Zv, sv = W.reshape(*shape, n), Z.reshape(*shape, n), s.reshape(*shape, -1).clone()
    M = (Wv - sv[..., g] * Zv) @ H  # rows of (W - Q) H + W alpha dXX^T
    if R is not None:
        M += alpha * Wv @ R
    dH = H.diagonal(dim1=-2, dim2=-1)
    if spec.float_zero:
        Cv, ov = result.codes.to(W).reshape(*shape, n), (s * result.zeros.to(W)).reshape(*shape, -1).clone()
    for _ in range(sweeps):
        for i in range(shape[1]):
            t, hii = (Ho[:, i : i + 1] @ M)[:, 0], Ho[:, i, i]  # t = (H_out M)[i]
            for k in range(sv.shape[-1]):
                c0, c1 = k * gs, min(k * gs + gs, n)
                if spec.float_zero:
                    ds, do, move = _scale_offset_step(Cv[:, i, c0:c1], H[..., c0:c1, :], t, hii, c0, c1, sv[:, i, k])
                    sv[:, i, k] += ds
                    ov[:, i, k] += do
                else:
                    z = Zv[:, i, c0:c1]
                    zH = (z[:, None] @ H[..., c0:c1, :])[:, 0]
                    den = hii * (zH[:, c0:c1] * z).sum(-1)
                    ok = den > 1e-9 * hii * (z * z * dH[..., c0:c1]).sum(-1)  # skip numerically null directions
                    new = (sv[:, i, k] + torch.where(ok, (t[:, c0:c1] * z).sum(-1) / den, 0)).clamp(min=0)
                    move = (new - sv[:, i, k])[:, None] * zH
                    sv[:, i, k] = new
                M[:, i] -= move
                t -= hii[:, None] * move
    zeros = (ov / sv).reshape(rows, -1) if spec.float_zero else result.zeros
    return make_result(result.codes, sv.reshape(rows, -1), zeros, spec)


def _scale_offset_step(
    c: Tensor, Hg: Tensor, t: Tensor, hii: Tensor, c0: int, c1: int, s: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact minimiser over one group's (scale, offset) of q = s*c - o: returns (ds, do, dq H) per head; falls back
    to the offset alone where the joint step would make the scale <= 0 or the system is singular."""
    cH, oH = (c[:, None] @ Hg)[:, 0], -Hg.sum(-2)  # directions' rows of H: c H, (-1) H
    a, b, d = hii * (cH[:, c0:c1] * c).sum(-1), -hii * cH[:, c0:c1].sum(-1), -hii * oH[..., c0:c1].sum(-1)
    r1, r2 = (t[:, c0:c1] * c).sum(-1), -t[:, c0:c1].sum(-1)
    det = a * d - b * b
    joint = det > 1e-9 * a * d
    ds = torch.where(joint, (d * r1 - b * r2) / torch.where(joint, det, 1), 0)
    do = torch.where(joint, (a * r2 - b * r1) / torch.where(joint, det, 1), 0)
    alone = ~joint | (s + ds <= 0)
    ds = torch.where(alone, 0, ds)
    do = torch.where(alone, torch.where(d > 0, r2 / torch.where(d > 0, d, 1), 0), do)
    # q changes by ds*c + do*(-1); its row of H
    return ds, do, ds[:, None] * cH + do[:, None] * oH


def solve_gso(
    W: Tensor, H: Tensor, spec: QuantSpec, *, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
    dXXt: Tensor | None = None, alpha: float = 0.25, sweeps: int = 1,
) -> QuantResult:
    """Stage 1: Hessian-weighted static group grids; GPTQ (+ GPTAQ term) on them; stage 2: refine_group_scales."""
    res = solve_gptq(W, H, spec, damp=damp, block_size=block_size, act_order=act_order, static_groups=True,
                     grid="hessian", dXXt=dXXt, alpha=alpha)
    return refine_group_scales(W, H, res, dXXt=dXXt, alpha=alpha, sweeps=sweeps)
