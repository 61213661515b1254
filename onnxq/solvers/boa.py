"""BoA (spec §3): Kronecker Hessian H_out ⊗ H_in per head, one row of every head at a time, exact row compensation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import obs_quantize, static_grid
from .grid import QuantResult, QuantSpec, find_grid, make_result
from .hessian import as_work, drop_dead, factor


def _rows(X: Tensor, idx: Tensor) -> Tensor:
    """Reorder the rows of X [h, d, k] per head by idx [h, d]."""
    return X.gather(1, idx[..., None].expand_as(X))


@dataclass
class Heads:
    """A projection split into heads and preprocessed for the row-wise solvers (BoA, TurboBoA)."""

    W: Tensor  # [h, d_h, n]: rows (per head) and columns in act-order, dead columns zeroed
    Hg: Tensor  # damped H_in [1|h, n, n], original column order (grid scores)
    U_in: Tensor  # chol_upper(H_in^-1) [1|h, n, n], act-order
    U_out: Tensor  # chol_upper(H_out^-1) [h, d_h, d_h], act-order
    R: Tensor | None  # alpha * dXX^T [1|h, n, n], act-order
    cperm: Tensor | None
    rperm: Tensor | None

    def orig_cols(self, X: Tensor) -> Tensor:
        return X if self.cperm is None else X[..., torch.argsort(self.cperm)]

    def grid(self, X: Tensor, spec: QuantSpec, kind: str) -> tuple[Tensor, Tensor]:
        """Group grids of rows X [h, k, n] (act-order columns), groups in original column order."""
        return find_grid(self.orig_cols(X), spec, kind, self.Hg)

    def orig_rows(self, X: Tensor) -> Tensor:
        return X if self.rperm is None else _rows(X, torch.argsort(self.rperm, 1))

    def finish(self, codes: Tensor, S: Tensor, Z: Tensor, spec: QuantSpec) -> QuantResult:
        """Undo the permutations and return the [h*d_h, n] result."""
        codes, S, Z = self.orig_rows(self.orig_cols(codes)), self.orig_rows(S), self.orig_rows(Z)
        return make_result(codes.flatten(0, 1), S.flatten(0, 1), Z.flatten(0, 1), spec)

    def original_order(self, X: Tensor) -> Tensor:
        """[h, d_h, n] in act-order -> [h*d_h, n] in the original row and column order."""
        return self.orig_rows(self.orig_cols(X)).flatten(0, 1)


def setup_heads(
    W: Tensor, H_in: Tensor, H_out: Tensor, *, n_heads: int, damp: float, act_order: bool,
    dXXt: Tensor | None = None, alpha: float = 0.25,
) -> Heads:
    """Split W [n_heads*d_h, n] into heads; dead columns, damping of H_in and of each H_out[h], optional act-order
    (columns by diag(H_in), rows of each head by diag(H_out[h]), both descending)."""
    W, H_in, H_out, dXXt = as_work(W, H_in, H_out, dXXt)
    W = W.reshape(n_heads, -1, W.shape[-1])
    H_in = H_in if H_in.dim() == 3 else H_in[None]
    R = None if dXXt is None else alpha * (dXXt if dXXt.dim() == 3 else dXXt[None])
    W, H_in, R = drop_dead(W, H_in, R)
    cperm = rperm = None
    if act_order:
        cperm = torch.argsort(H_in.diagonal(dim1=-2, dim2=-1).sum(0), descending=True)
        W, H_in = W[..., cperm], H_in[..., cperm, :][..., cperm]
        R = None if R is None else R[..., cperm, :][..., cperm]
        rperm = torch.argsort(H_out.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
        W, H_out = _rows(W, rperm), _rows(_rows(H_out, rperm).mT, rperm).mT
    Hd, U_in = factor(H_in, damp, what="the input Hessian H_in")
    U_out = factor(H_out, damp, what="the output Hessian H_out")[1]
    Hg = Hd if cperm is None else Hd[..., torch.argsort(cperm), :][..., torch.argsort(cperm)]
    return Heads(W, Hg, U_in, U_out, R, cperm, rperm)


def solve_boa(
    W: Tensor, H_in: Tensor, H_out: Tensor, spec: QuantSpec, *, n_heads: int, damp: float = 0.01,
    grid: str = "hessian", act_order: bool = False,
) -> QuantResult:
    """BoA of W [n_heads*d_h, d_in] under H_out [n_heads, d_h, d_h] ⊗ H_in [d_in, d_in]; the grid is searched once on
    the original weights. After row r of every head is quantized, w_r' -= U_out[r, r'] / U_out[r, r] * (w_r - q_r)."""
    p = setup_heads(W, H_in, H_out, n_heads=n_heads, damp=damp, act_order=act_order)
    Wh, gs = p.W.clone(), spec.width(p.W.shape[-1])
    S, Z = p.grid(Wh, spec, grid)
    codes = []
    for r in range(Wh.shape[1]):
        WB = Wh[:, r : r + 1]
        QB, CB = obs_quantize(WB, p.U_in, spec.maxq, *static_grid(S[:, r : r + 1], Z[:, r : r + 1], gs, p.cperm))
        Wh[:, r + 1 :] -= (p.U_out[:, r, r + 1 :] / p.U_out[:, r, r, None])[..., None] * (WB - QB)
        codes.append(CB)
    return p.finish(torch.cat(codes, 1), S, Z, spec)
