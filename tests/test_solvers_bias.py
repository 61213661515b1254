"""Mean (bias) correction: the bias is the least-squares intercept, and the centred statistics give the loss left."""
import numpy as np
import pytest
import torch

from onnxq.solvers import QuantSpec, centered_hessian, centered_residual, layer_loss, output_bias, solve_gptq
from onnxq.calibrate.stats import Covariance

DT = torch.float64


def _streams(seed, n=12, rows=6, tokens=400):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=DT) + 3 * torch.randn(n, generator=g, dtype=DT)  # far from 0-mean
    Xf = X + 0.1 * torch.randn(tokens, n, generator=g, dtype=DT) + 0.2  # float stream: shifted, noisy
    W = torch.randn(rows, n, generator=g, dtype=DT)
    Q = W + 0.05 * torch.randn(rows, n, generator=g, dtype=DT)
    return X, Xf, W, Q


def _stats(X, Xf):
    cov = Covariance(X.shape[1], residual=True)
    for part in (slice(0, 150), slice(150, None)):  # two batches: the running sums must add up
        cov.add(X[part].float().numpy(), Xf[part].float().numpy())
    return cov


def test_output_bias_is_the_least_squares_intercept():
    X, Xf, W, Q = _streams(0)
    cov = _stats(X, Xf)
    b = output_bias(W, Q, cov.mean(), cov.mean_fp())
    target = Xf @ W.T - X @ Q.T  # [tokens, rows]: what the bias should absorb
    assert torch.allclose(b.double(), target.mean(0), rtol=1e-5, atol=1e-5)
    loss = lambda c: float(((target - c) ** 2).sum())  # noqa: E731
    assert loss(b.double()) < loss(b.double() + 1e-2) and loss(b.double()) < loss(torch.zeros_like(b, dtype=DT))
    assert torch.allclose(output_bias(W, Q, cov.mean()).double(), X.mean(0) @ (W - Q).T, atol=1e-5)  # no float stream
    partial = (X + 0.25 * (Xf - X)) @ W.T - X @ Q.T  # TurboBoA's alpha-weighted target
    assert torch.allclose(output_bias(W, Q, cov.mean(), cov.mean_fp(), 0.25).double(), partial.mean(0), atol=1e-5)


def test_centred_statistics_give_the_loss_left_after_the_bias():
    """(2/N) Σ ||W x_fp - Q x - b||² = const - 2 tr(W Rc ΔWᵀ) + tr(ΔW Hc ΔWᵀ), Hc and Rc centred, for any Q."""
    X, Xf, W, _ = _streams(1)
    cov = _stats(X, Xf)
    mean, mean_fp = cov.mean(), cov.mean_fp()
    Hc = centered_hessian(cov.hessian().double(), mean)
    Rc = centered_residual(cov.residual().double(), mean, mean_fp)
    const = 2 / len(X) * float((((Xf - Xf.mean(0)) - (X - X.mean(0))) @ W.T).pow(2).sum())
    for seed in range(3):
        Q = W + 0.1 * torch.randn(W.shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
        b = output_bias(W, Q, mean, mean_fp).double()
        direct = 2 / len(X) * float((Xf @ W.T - X @ Q.T - b).pow(2).sum())
        dW = Q - W
        formula = const - 2 * float(((W @ Rc) * dW).sum()) + layer_loss(W, Q, Hc)
        assert formula == pytest.approx(direct, rel=1e-4)


def test_gptq_on_centred_hessian_with_bias_beats_plain_gptq():
    """On inputs with a large mean, the centred solve plus bias leaves less output error than GPTQ without a bias."""
    X, _, W, _ = _streams(2, n=32, rows=8, tokens=600)
    W = torch.randn(8, 32, dtype=DT)
    H = 2 / len(X) * X.T @ X
    mean = X.mean(0)
    spec = QuantSpec(2, 16, False)
    plain = solve_gptq(W, H, spec)
    centred = solve_gptq(W, centered_hessian(H, mean), spec)
    b = output_bias(W, centred.qweight.double(), mean).double()
    err = lambda Q, c: float((X @ (W - Q).T - c).pow(2).sum())  # noqa: E731
    assert err(centred.qweight.double(), b) < err(plain.qweight.double(), 0)
    assert np.isclose(err(centred.qweight.double(), b) * 2 / len(X),
                      layer_loss(W, centred.qweight, centered_hessian(H, mean)), rtol=1e-6)
