"""aespa (spec §6): static Hessian-weighted grids, GPTQ under H_in, rounding refined on tr(H_out dW H_in dW^T).

Documented substitutes: the Hessian-weighted grid search for Z-FOLD, exact coordinate descent on the codes
(refine_codes, grids fixed) for AdaRound's 2000 iterations on the same objective."""
from __future__ import annotations

import torch
from torch import Tensor

from .codes import refine_codes
from .grid import QuantResult, QuantSpec, make_result
from .gptq import gptq_batched
from .hessian import as_work


def solve_aespa(
    W: Tensor, H_in: Tensor, spec: QuantSpec, *, H_out: Tensor | None = None, n_heads: int = 1, damp: float = 0.01,
    act_order: bool = True, sweeps: int = 2, grid: str = "hessian",
) -> QuantResult:
    """aespa of W [d_out, d_in]; H_in [d_in, d_in] or per head [n_heads, d_in, d_in] (V), H_out None (= I: O, V, MLP)
    or per head [n_heads, d_h, d_h] (Q: E[K^T K], K: E[Q^T Q]). `sweeps` descent passes on the undamped objective."""
    Wv, Hv, Ho = as_work(W, H_in, H_out)
    Wb, Hb = (Wv.reshape(n_heads, -1, Wv.shape[-1]), Hv) if Hv.dim() == 3 else (Wv[None], Hv[None])
    codes, S, Z = gptq_batched(Wb, Hb, spec, damp=damp, act_order=act_order, static_groups=True, grid=grid)
    res = make_result(codes.flatten(0, 1), S.flatten(0, 1), Z.flatten(0, 1), spec)
    if Ho is not None:  # a zero row of H_out (dead output) would give 0/0 steps: fall back to H_in alone there
        Ho = Ho + torch.diag_embed((Ho.diagonal(dim1=-2, dim2=-1) == 0).to(Ho))
    return refine_codes(Wv, Hv, res, H_out=Ho, n_heads=n_heads, sweeps=sweeps)
