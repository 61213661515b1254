"""Mean (bias) correction: solve on centred statistics, then add the output bias that removes the mean error.

With an output bias b free, min_b E||W x_t - Q x - b||^2 (x_t = x + alpha (x_fp - x), the target of the solvers'
alpha-weighted residual term) is reached at b = W E[x_t] - Q E[x], and what is left is the same quadratic form with
the centred Hessian and residual; so every solver runs unchanged on those."""
from __future__ import annotations

from torch import Tensor


def centered_hessian(H: Tensor, mean: Tensor) -> Tensor:
    """(2/N) Σ (x - μ)(x - μ)ᵀ from H = (2/N) Σ x xᵀ and μ = E[x]."""
    return H - 2 * (mean[:, None] * mean[None, :]).to(H)


def centered_residual(dXXt: Tensor, mean: Tensor, mean_fp: Tensor) -> Tensor:
    """(2/N) Σ ((x_fp - μ_fp) - (x - μ))(x - μ)ᵀ from dXXᵀ = (2/N) Σ (x_fp - x) xᵀ and the two means."""
    return dXXt - 2 * ((mean_fp - mean)[:, None] * mean[None, :]).to(dXXt)


def output_bias(W: Tensor, Q: Tensor, mean: Tensor, mean_fp: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """b = W (E[x] + alpha (E[x_fp] - E[x])) - Q E[x]: [d_out] float32. alpha is the solver's weight on the float
    stream's residual (TurboBoA's F2 corrects only that share of the earlier layers' error); no float stream: W E[x]."""
    mean = mean.double().to(W.device)
    target = mean if mean_fp is None else mean + alpha * (mean_fp.double().to(W.device) - mean)
    return (W.double() @ target - Q.double() @ mean).float()
