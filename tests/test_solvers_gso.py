"""Two-stage group-scale optimisation: stage-1 Hessian-weighted grid, stage-2 coordinate descent."""
import itertools

import pytest
import torch

from onnxq.solvers import QuantSpec, hessian_weighted_grid, layer_loss, refine_group_scales, solve_gptq, solve_gso
from onnxq.solvers.grid import fake_quant
from tests.problems import asym_objective, descends, problem

DT = torch.float64


def test_stage1_is_the_exhaustive_candidate_search():
    W, H, X = problem(0, rows=6, n=20)
    for spec in (QuantSpec(2, -1, False), QuantSpec(3, 8, False), QuantSpec(3, 8, True)):
        S, Z = hessian_weighted_grid(W, H, spec)
        gs = spec.width(20)
        for i, g in itertools.product(range(6), range(S.shape[1])):
            cols = slice(g * gs, min(g * gs + gs, 20))
            w, Hg = W[i, cols], H[cols, cols]
            lo, hi = min(w.min(), 0), max(w.max(), 0)
            if spec.sym:
                hi = max(-lo, hi)
                lo = -hi
            score = lambda s, z: float((d := fake_quant(w, s, z, spec.maxq)[0] - w) @ Hg @ d)
            best = min(
                score(p * (hi - lo) / spec.maxq, z)
                for p in (1 - k / 100 for k in range(100))
                for z in ([2 ** (spec.bits - 1)] if spec.sym else [torch.floor(-p * lo / (p * (hi - lo) / spec.maxq)),
                                                                    torch.ceil(-p * lo / (p * (hi - lo) / spec.maxq))])
            )
            assert score(S[i, g], Z[i, g]) == pytest.approx(best, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("gs", [-1, 16, 12])
@pytest.mark.parametrize("with_dx", [False, True])
def test_stage2_never_increases_the_layer_loss(gs, with_dx):
    for seed in range(3):
        W, H, X = problem(30 + seed, n=40)
        dXXt = torch.randn(40, 40, dtype=DT) @ H / 20 if with_dx else None
        spec = QuantSpec(3, gs, False)
        for start in (solve_gptq(W, H, spec), solve_gptq(W, H, spec, grid="hessian", static_groups=True, dXXt=dXXt)):
            assert descends([asym_objective(W, refine_group_scales(W, H, start, dXXt=dXXt, sweeps=k), H, dXXt)
                             for k in range(4)])


def test_stage2_per_channel_is_the_closed_form_least_squares():
    W, H, X = problem(40)
    dXXt = torch.randn(40, 40, dtype=DT) @ H / 20
    res = solve_gptq(W, H, QuantSpec(3, -1, False))
    Z = (res.codes - res.zeros).double()
    R = 0.25 * dXXt
    best = (((Z @ H) * W).sum(1) + ((W @ R) * Z).sum(1)) / ((Z @ H) * Z).sum(1)  # argmin_s of the row objective
    assert torch.allclose(refine_group_scales(W, H, res, dXXt=dXXt).scales[:, 0].double(), best.clamp(min=0), rtol=1e-6)


def test_gso_is_stage1_gptq_stage2():
    W, H, X = problem(41)
    spec = QuantSpec(2, 16, False)
    stage1 = solve_gptq(W, H, spec, grid="hessian", static_groups=True)
    gso = solve_gso(W, H, spec)
    assert torch.equal(gso.codes, stage1.codes)
    assert layer_loss(W, gso.qweight, H) < layer_loss(W, stage1.qweight, H)


def test_stage2_with_heads():
    """Per-head H (block_v) without H_out, and a dense H_out: both descend."""
    W, H, X = problem(42, rows=16, n=32)
    Hh = torch.stack([H, H + torch.diag(H.diagonal())])
    res = solve_gptq(W, H, QuantSpec(2, 16, False))
    per_head = lambda r: sum(layer_loss(W[8 * h : 8 * h + 8], r.qweight[8 * h : 8 * h + 8], Hh[h]) for h in range(2))
    assert per_head(refine_group_scales(W, Hh, res, n_heads=2)) < per_head(res)
    A = torch.randn(2, 8, 8, dtype=DT) + 1.0
    Ho = A @ A.mT
    new = refine_group_scales(W, H, res, H_out=Ho, n_heads=2, sweeps=2)
    assert layer_loss(W, new.qweight, H, Ho, 2) < layer_loss(W, res.qweight, H, Ho, 2)


@pytest.mark.parametrize("gs", [-1, 16, 12])
@pytest.mark.parametrize("with_dx", [False, True])
def test_stage2_float_zero_never_increases_the_loss_and_moves_the_zeros(gs, with_dx):
    for seed in range(3):
        W, H, X = problem(50 + seed, n=40)
        dXXt = torch.randn(40, 40, dtype=DT) @ H / 20 if with_dx else None
        start = solve_gptq(W, H, QuantSpec(2, gs, False, float_zero=True))
        runs = [refine_group_scales(W, H, start, dXXt=dXXt, sweeps=k) for k in range(4)]
        assert descends([asym_objective(W, r, H, dXXt) for r in runs])
        assert all(torch.equal(r.codes, start.codes) and r.zeros.is_floating_point() for r in runs)
        assert not torch.equal(runs[1].zeros, start.zeros) and bool((runs[3].scales > 0).all())


def test_stage2_float_zero_per_channel_is_the_joint_least_squares():
    """One group per row: one step is the exact argmin over (scale, offset) of the row objective, q = s*code - o."""
    W, H, X = problem(54)
    dXXt = torch.randn(40, 40, dtype=DT) @ H / 20
    res = solve_gptq(W, H, QuantSpec(3, -1, False, float_zero=True))
    new = refine_group_scales(W, H, res, dXXt=dXXt)
    for i in range(W.shape[0]):
        A = torch.stack([res.codes[i].double(), -torch.ones(40, dtype=DT)], 1)
        s, o = torch.linalg.solve(A.T @ H @ A, A.T @ (H @ W[i] + 0.25 * W[i] @ dXXt))
        assert float(new.scales[i, 0]) == pytest.approx(float(s), rel=1e-5)
        assert float(new.zeros[i, 0]) == pytest.approx(float(o / s), rel=1e-5, abs=1e-5)


def test_stage2_float_zero_with_heads():
    W, H, X = problem(55, rows=16, n=32)
    res = solve_gptq(W, H, QuantSpec(2, 16, False, float_zero=True))
    Hh = torch.stack([H, H + torch.diag(H.diagonal())])
    per_head = lambda r: sum(layer_loss(W[8 * h : 8 * h + 8], r.qweight[8 * h : 8 * h + 8], Hh[h]) for h in range(2))
    assert per_head(refine_group_scales(W, Hh, res, n_heads=2)) < per_head(res)
    A = torch.randn(2, 8, 8, dtype=DT) + 1.0
    Ho = A @ A.mT
    losses = [layer_loss(W, refine_group_scales(W, H, res, H_out=Ho, n_heads=2, sweeps=k).qweight, H, Ho, 2) for k in range(3)]
    assert losses[2] <= losses[1] < losses[0]
