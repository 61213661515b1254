"""Coordinate descent on the integer codes of a solved layer (QuantEase-style), grids fixed."""
from __future__ import annotations

import torch
from torch import Tensor

from .grid import QuantResult, group_index, make_result
from .hessian import as_work


def refine_codes(
    W: Tensor, H: Tensor, result: QuantResult, *, dXXt: Tensor | None = None, alpha: float = 0.25,
    H_out: Tensor | None = None, n_heads: int = 1, sweeps: int = 1,
) -> QuantResult:
    """Keep the grids; minimise L = tr(H_out dW H dW^T) - 2 tr(H_out W (alpha dXX^T) dW^T), dW = Q - W, by exact
    coordinate descent over single codes: each moves to the grid point nearest its 1-D optimum, so L never rises.

    H [n, n] or per head [n_heads, n, n]; H_out [n_heads, d_h, d_h] or None (= I: every row at once per column)."""
    W, H, H_out, R = as_work(W, H, H_out, dXXt)
    spec = result.spec
    rows, n = W.shape
    g = group_index(n, spec, W.device)
    h = n_heads if (H_out is not None or H.dim() == 3) else 1
    S = result.scales.to(W)[:, g].reshape(h, -1, n)
    C = result.codes.to(W).reshape(h, -1, n)
    Wv = W.reshape(h, -1, n)
    Hb = H if H.dim() == 3 else H[None]
    M = (Wv - (C - result.zeros.to(W)[:, g].reshape(h, -1, n)) * S) @ Hb  # -1/2 dL/dQ for H_out = I
    if R is not None:
        M += alpha * Wv @ (R if R.dim() == 3 else R[None])
    dH = Hb.diagonal(dim1=-2, dim2=-1)  # [1|h, n]
    live = (dH > 0)[:, None] & (S > 0)  # [h, d, n]
    for _ in range(sweeps):
        if H_out is None:  # rows independent: one column of every row at a time
            for j in range(n):
                step = _code_step(M[..., j], dH[:, j, None], S[..., j], C[..., j], live[..., j], spec.maxq)
                M -= step[..., None] * Hb[:, j, None, :]
        else:  # rows of a head coupled through H_out: one code at a time, row by row, all heads at once
            for i in range(C.shape[1]):
                _descend_row(M, i, H_out, Hb, dH, S[:, i], C[:, i], live[:, i], spec.maxq)
    codes = C.reshape(rows, n)
    return make_result(codes, result.scales, result.zeros, spec)


def _descend_row(M: Tensor, i: int, H_out: Tensor, Hb: Tensor, dH: Tensor, s: Tensor, c: Tensor, live: Tensor,
                 maxq: int) -> None:
    """One sweep over row i of every head, column by column, as `_code_step` would take it. A column where a code
    stays puts nothing in motion and heads are independent, so each pass moves every head to its own next column
    where a code does move: exactly the same steps, in as many passes as the busiest head has moves."""
    t, hii = (H_out[:, i : i + 1] @ M)[:, 0], H_out[:, i, i]  # (H_out M)[i], [h, n]
    h, n = c.shape
    live = live & (hii > 0)[:, None]  # a dead output row (H_out[i, i] = 0) keeps its codes
    denom = torch.where(live, hii[:, None] * dH * s, 1)
    heads, columns = torch.arange(h, device=c.device), torch.arange(n, device=c.device)
    start = torch.zeros(h, dtype=torch.long, device=c.device)  # each head's next column to visit
    while True:
        new = _nearest(c, t, denom, live, maxq)
        moves = (new != c) & (columns >= start[:, None])
        has = moves.any(1)
        if not has.any():
            return
        k = moves.to(torch.uint8).argmax(1)  # first moving column per head
        step = torch.where(has, (new[heads, k] - c[heads, k]) * s[heads, k], 0)
        c[heads, k] = torch.where(has, new[heads, k], c[heads, k])
        move = step[:, None] * Hb[heads if Hb.shape[0] > 1 else 0, k]
        M[:, i] -= move
        t -= hii[:, None] * move
        start = torch.where(has, k + 1, n)


def _code_step(t: Tensor, curv: Tensor, s: Tensor, c: Tensor, live: Tensor, maxq: int) -> Tensor:
    """Move codes c (in place) to the grid point nearest c + t / (curv s); return the weight change s * dc."""
    new = _nearest(c, t, torch.where(live, curv * s, 1), live, maxq)
    step = (new - c) * s
    c.copy_(new)
    return step


def _nearest(c: Tensor, t: Tensor, denom: Tensor, live: Tensor, maxq: int) -> Tensor:
    """The grid point nearest c + t / denom where `live`, else c (codes stay)."""
    return torch.where(live, torch.clamp(torch.round(c + t / denom), 0, maxq), c)
