"""Hessian preprocessing: dead inputs, damping + inverse Cholesky, RoPE de-rotation, GQA, layer loss (spec §1.4, §3)."""
from __future__ import annotations

import torch
from torch import Tensor

from onnxq.errors import OnnxqError


def as_work(W: Tensor, *others: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast W and the others to the working dtype (float64 if W is, else float32) on W's device."""
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    return (W.to(dt), *(None if t is None else t.to(W.device, dt) for t in others))


def drop_dead(W: Tensor, H: Tensor, R: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Dead inputs (diag(H) == 0): zero W's column and R's (dXX^T) column, set H_jj = 1. H [..., n, n] batches like W."""
    dead = H.diagonal(dim1=-2, dim2=-1) == 0
    if not dead.any():
        return W, H, R
    keep = (~dead).unsqueeze(-2).to(W.dtype)
    return W * keep, H + torch.diag_embed(dead.to(H.dtype)), None if R is None else R * keep


def factor(H: Tensor, damp: float, *, what: str = "Hessian", tries: int = 5) -> tuple[Tensor, Tensor]:
    """Damp H [..., n, n] by damp*mean(diag) per matrix; return (H_damped, U) with H_damped^-1 = U^T U, U upper.

    A failed Cholesky adds the same damping again (per failing matrix), up to `tries` times, then raises."""
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    step = damp * H.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * eye
    Hd = H + step
    for _ in range(tries):
        L, info = torch.linalg.cholesky_ex(Hd)
        if not info.any():
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if not info.any():
                return Hd, U
        Hd = Hd + step * (info > 0)[..., None, None]
    raise OnnxqError(
        f"{what} is not positive definite even after {tries} extra damping steps of {damp:g} x mean(diag): "
        "raise the damping (e.g. --damp 0.1) or calibrate on more tokens"
    )


def derotate_average(C: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """mean_p R_p^T C R_p, R_p = diag(cos_p) + diag(sin_p) J the HF rotate-half RoPE; C [h, d, d], cos/sin [T, d]."""
    cos, sin, h = cos.to(C), sin.to(C), C.shape[-1] // 2
    T = cos.shape[0]
    xj = lambda X: torch.cat([X[..., h:], -X[..., :h]], -1)  # X @ J
    jtx = lambda X: torch.cat([X[..., h:, :], -X[..., :h, :]], -2)  # J^T @ X
    cc, cs, sc, ss = (a.T @ b / T for a, b in ((cos, cos), (cos, sin), (sin, cos), (sin, sin)))
    return C * cc + xj(C * cs) + jtx(C * sc) + jtx(xj(C * ss))


def gqa_average(C: Tensor, n_kv: int) -> Tensor:
    """[n_heads, ...] -> [n_kv, ...]: mean over the query heads sharing a KV head (head h uses KV head h // (n_heads/n_kv))."""
    return C.unflatten(0, (n_kv, -1)).mean(1)


def gqa_replicate(C: Tensor, n_heads: int) -> Tensor:
    """[n_kv, ...] -> [n_heads, ...]: every query head gets its KV head's matrix."""
    return C.repeat_interleave(n_heads // C.shape[0], 0)


def value_row_hessian(W_O: Tensor, n_heads: int, n_kv_heads: int) -> Tensor:
    """BoA's V row factor: per KV head, the mean over its query heads h of W_O,h^T W_O,h [d_h, d_h].

    W_O [d_model, n_heads*d_h] (torch orientation); W_O,h its columns of head h. Returns [n_kv_heads, d_h, d_h]."""
    Wh = W_O.reshape(W_O.shape[0], n_heads, -1).movedim(1, 0)  # [n_heads, d_model, d_h]
    return gqa_average(Wh.mT @ Wh, n_kv_heads)


def up_row_hessian(J: Tensor, act_cov: Tensor) -> Tensor:
    """Row Hessian of a gated MLP's up projection, (J Jᵀ) ⊙ E[a aᵀ] [1, d_ff, d_ff]: J [d_ff, d_model] maps the
    product a * u to the MLP output, a is the activation up's output is multiplied by (Kronecker-factored like BoA's)."""
    J = J.to(act_cov)
    return ((J @ J.T) * act_cov)[None]


LOSS_ROWS = 2048  # rows whose fp64 error terms are held at once where rows are independent: an LM head's (49152 x 576)
# in one piece took 1.1 GB of temporaries, in 2048-row pieces 36 MB


def layer_loss(W: Tensor, Q: Tensor, H_in: Tensor, H_out: Tensor | None = None, n_heads: int = 1) -> float:
    """tr(H_out dW H_in dW^T) summed over heads (fp64); H_in [n, n] or [n_heads, n, n], H_out [n_heads, d_h, d_h] or None (I)."""
    if H_out is None and n_heads == 1 and len(W) > LOSS_ROWS:  # independent rows: summed piece by piece
        return sum(layer_loss(W[r:r + LOSS_ROWS], Q[r:r + LOSS_ROWS], H_in) for r in range(0, len(W), LOSS_ROWS))
    D = (Q.double() - W.double()).reshape(n_heads, -1, W.shape[-1])
    DH = D @ H_in.double()
    return float(((D if H_out is None else H_out.double() @ D) * DH).sum())
